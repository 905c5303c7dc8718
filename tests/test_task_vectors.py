"""Task-vector ops: each formula against an independent implementation (exact, float32), and what
LiNeS and aTLAS do to the trained demo models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery.checkpoint.layout import find_layout
from surgery.compute.sparse import ModelTrim, SparseMerge
from surgery.compute.updates import WeightedUpdate
from surgery.demo_models import demo_model
from surgery.ops.lines import depth_scales
from surgery.recipe.tensor import Block
from tests.conftest import assert_plan_refused, write_plan

# ---------------------------------------------------------------- independent implementations


def task_arithmetic_reference(base, models, weights):
    return base + sum(w * (m - base) for w, m in zip(weights, models))


def ties_reference(base, models, weights, density, lam):
    """TIES as written in the paper, with mergekit's weights and k = max(1, floor(density * n)): exactly
    the k largest magnitudes, by a stable sort (ties at the k-th kept by lowest position)."""
    trimmed = []
    for model in models:
        tau = (model - base).flatten()
        if density < 1:
            k = max(1, int(density * tau.numel()))
            keep = torch.zeros_like(tau, dtype=torch.bool)
            keep[torch.argsort(tau.abs(), descending=True, stable=True)[:k]] = True
            tau = torch.where(keep, tau, torch.zeros_like(tau))
        trimmed.append(tau)
    weighted = torch.stack([w * t for w, t in zip(weights, trimmed)])
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(weighted) == sign
    numerator = torch.where(agree, weighted, torch.zeros_like(weighted)).sum(0)
    divisor = (torch.tensor(weights)[:, None] * agree).sum(0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return (base.flatten() + lam * (numerator / divisor)).view(base.shape)


def ties(weights, density, lam=1.0, shape=(37, 29)):
    return SparseMerge(tuple(ModelTrim(w, density) for w in weights), shape, "magnitude", consensus=True,
                       normalize=True, lam=lam)


def _streamed(compute, tensors, block):
    """Run a compute as the executor does: prepare over aligned blocks (whole rows where the compute
    asks for them), then block by block, each block knowing where it starts."""
    if getattr(compute, "whole_rows", False):
        row = tensors[0].shape[-1] if tensors[0].dim() > 1 else tensors[0].numel()
        block = max(1, block // row) * row

    def blocks():
        total = tensors[0].numel()
        for start in range(0, total, block):
            yield Block([t.reshape(-1)[start : start + block].clone() for t in tensors], start)

    prepared = compute.prepare(blocks)
    return torch.cat([prepared(inputs) for inputs in blocks()]).view(tensors[0].shape)


def _tensors(models: int, shape=(37, 29), seed=0):
    """A base and fine-tunes, rounded through bf16 so many magnitudes tie."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).bfloat16().float()
    tuned = [(base + torch.randn(shape, generator=g) * 0.05).bfloat16().float() for _ in range(models)]
    return base, tuned


# ---------------------------------------------------------------- formulas


@pytest.mark.parametrize("block", [7, 64, 10_000])
def test_task_arithmetic_formula(block):
    base, tuned = _tensors(3)
    weights = (0.5, -0.25, 1.3)
    got = _streamed(WeightedUpdate(weights), [base, *tuned], block)
    assert torch.equal(got, task_arithmetic_reference(base, tuned, weights))


@pytest.mark.parametrize("density", [0.2, 0.5, 0.9, 1.0, 1e-4])
@pytest.mark.parametrize("block", [7, 256, 10_000])
def test_ties_formula(density, block):
    base, tuned = _tensors(3, seed=1)
    weights = (1.0, 0.6, 0.3)
    got = _streamed(ties(weights, density, lam=0.8), [base, *tuned], block)
    assert torch.equal(got, ties_reference(base, tuned, weights, density, 0.8))


def test_ties_keeps_exactly_k_entries_when_magnitudes_tie():
    """bf16 task vectors tie often: exactly floor(density * n) entries survive, never the whole tied group."""
    base = torch.zeros(1000)
    model = torch.tensor([1.0, 2.0, 3.0, 4.0]).repeat(250)  # 250 copies of each magnitude
    got = _streamed(ties((1.0,), 0.3, shape=(1000,)), [base, model], 33)
    assert int((got != 0).sum()) == 300
    assert int((got == 4.0).sum()) == 250 and int((got == 3.0).sum()) == 50
    assert torch.equal((got == 3.0).nonzero().flatten(), torch.arange(2, 200, 4))  # the lowest positions


def test_lines_depth_scales():
    assert depth_scales(0.2, 0.8, 8) == [0.2 + 0.8 * (l / 7) for l in range(8)]  # as the LiNeS code writes it
    assert depth_scales(0.5, 0.5, 1) == [0.5]


# ---------------------------------------------------------------- on the trained demo models


@pytest.fixture(scope="module")
def demo():
    return {name: demo_model(name) for name in ("base", "prose", "code")}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out |= load_file(shard)
    return out


def _apply(cli, tmp_path: Path, body: str, name: str = "out") -> Path:
    out = tmp_path / name
    plan = write_plan(tmp_path, f"output: {out}\n{body}", name=f"{name}.yaml")
    result = cli("apply", plan, "--no-fsync")
    assert result.code == 0, result.err
    return out


def _layer_of(folder: Path):
    config = json.loads((folder / "config.json").read_text())
    layout = find_layout(config, _weights(folder).keys())
    return lambda name: (layout.split(name) or (None,))[0], layout.num_layers


def test_task_arithmetic_and_ties_on_demo_models(demo, cli, tmp_path):
    models = f"      - {{model: {demo['prose']}, weight: 0.7}}\n      - {{model: {demo['code']}, weight: 0.4}}\n"
    ta = _apply(cli, tmp_path, f"base: {demo['base']}\nsteps:\n  - op: task_arithmetic\n    models:\n{models}", "ta")
    ties = _apply(cli, tmp_path, f"base: {demo['base']}\nsteps:\n  - op: ties\n    density: 0.3\n    lambda: 0.9\n"
                  f"    models:\n{models}", "ties")
    base, prose, code = (_weights(demo[n]) for n in ("base", "prose", "code"))
    got_ta, got_ties = _weights(ta), _weights(ties)
    assert set(got_ta) == set(base) == set(got_ties)
    for name, b in base.items():
        assert torch.equal(got_ta[name], task_arithmetic_reference(b, [prose[name], code[name]], (0.7, 0.4))), name
        assert torch.equal(got_ties[name], ties_reference(b, [prose[name], code[name]], (0.7, 0.4), 0.3, 0.9)), name
    provenance = json.loads((ta / "surgery.json").read_text())
    assert provenance["layer_map"][0].endswith("task_arithmetic")


def test_a_compact_recursive_model_merges_as_its_standard_checkpoint(demo, cli, tmp_path):
    """A model stored as computed tensors (a compact recursive model's relaxed depths are shared + B A)
    is read by a merge exactly as its materialized checkpoint: every depth, not its shared slot."""
    compact = _apply(cli, tmp_path, f"model: {demo['prose']}\nsteps:\n  - op: tie\n    loops: 2\n"
                     "    relax: {rank: 4}\n", "compact")
    standard = tmp_path / "standard"
    assert cli("materialize", compact, standard).code == 0
    merged = {}
    for label, model in (("compact", compact), ("standard", standard)):
        out = _apply(cli, tmp_path, f"base: {demo['base']}\nsteps:\n  - op: ties\n    density: 0.5\n"
                     f"    models: [{demo['code']}, {model}]\n  - op: lines\n    alpha: 0.5\n    beta: 0.5\n",
                     f"merged-{label}")
        merged[label] = (out / "model.safetensors").read_bytes()
    assert merged["compact"] == merged["standard"]


def test_lines_single_task_and_after_ties(demo, cli, tmp_path):
    single = _apply(cli, tmp_path, f"model: {demo['prose']}\nbase: {demo['base']}\nsteps:\n  - op: lines\n    alpha: 0.3\n",
                    "single")
    after_ties = _apply(cli, tmp_path, f"base: {demo['base']}\nsteps:\n  - op: ties\n    models: [{demo['prose']}, "
                        f"{demo['code']}]\n    density: 0.5\n  - op: lines\n    alpha: 0.4\n    beta: 0.5\n", "after")
    base, prose, code = (_weights(demo[n]) for n in ("base", "prose", "code"))
    layer_of, layers = _layer_of(demo["base"])
    for name, b in base.items():
        layer = layer_of(name)
        scale = 0.3 if layer is None else depth_scales(0.3, 0.7, layers)[layer]
        expected = prose[name] if scale == 1.0 else task_arithmetic_reference(b, [prose[name]], (scale,))
        assert torch.equal(_weights(single)[name], expected), name  # at scale 1 the fine-tune itself
        scale = 0.4 if layer is None else depth_scales(0.4, 0.5, layers)[layer]
        expected = ties_reference(b, [prose[name], code[name]], (1.0, 1.0), 0.5, scale)
        assert torch.equal(_weights(after_ties)[name], expected), name


def test_lines_multitask_alpha_default(demo, cli, tmp_path):
    out = _apply(cli, tmp_path, f"base: {demo['base']}\nsteps:\n  - op: task_arithmetic\n    models:\n"
                 f"      - {{model: {demo['prose']}, weight: 0.3}}\n      - {{model: {demo['code']}, weight: 0.7}}\n"
                 "  - op: lines\n    beta: 0.5\n")
    base, prose, code = (_weights(demo[n]) for n in ("base", "prose", "code"))
    summed = sum(float((prose[n].double() - b.double() + code[n].double() - b.double()).abs().sum()) for n, b in base.items())
    merged = sum(float((0.3 * (prose[n].double() - b) + 0.7 * (code[n].double() - b)).abs().sum()) for n, b in base.items())
    fits = json.loads((out / "surgery.json").read_text())["fits"]
    assert fits[0]["op"] == "lines" and fits[0]["step"] == 1
    assert fits[0]["alpha"] == pytest.approx(summed / (2 * merged), rel=1e-5)


def test_atlas_given_layer_coefficients(demo, cli, tmp_path):
    per_layer = {str(i): 0.1 * i for i in range(8)} | {"outside": 0.25}
    coefficients = json.dumps({str(demo["prose"]): per_layer, str(demo["code"]): 0.6})
    out = _apply(cli, tmp_path, f"base: {demo['base']}\nsteps:\n  - op: atlas\n    granularity: layer\n"
                 f"    models: [{demo['prose']}, {demo['code']}]\n    coefficients: {coefficients}\n")
    base, prose, code = (_weights(demo[n]) for n in ("base", "prose", "code"))
    layer_of, _ = _layer_of(demo["base"])
    for name, b in base.items():
        layer = layer_of(name)
        weight = per_layer["outside" if layer is None else str(layer)]
        assert torch.equal(_weights(out)[name], task_arithmetic_reference(b, [prose[name], code[name]], (weight, 0.6)))


def test_integer_buffers_are_the_bases(demo, cli, tmp_path):
    folders = {}
    for name, value in (("base", 3), ("prose", 5)):
        folder = tmp_path / name
        shutil.copytree(demo[name], folder)
        shard = next(folder.glob("*.safetensors"))
        tensors = load_file(shard) | {"model.step_counter": torch.full((4,), value, dtype=torch.int64)}
        save_file(tensors, shard, metadata={"format": "pt"})
        folders[name] = folder
    out = _apply(cli, tmp_path, f"base: {folders['base']}\nsteps:\n  - op: ties\n    models: [{folders['prose']}]\n")
    assert torch.equal(_weights(out)["model.step_counter"], torch.full((4,), 3, dtype=torch.int64))


# ---------------------------------------------------------------- what they do


def test_atlas_learned_coefficients_are_recorded_and_re_run_exactly(demo, cli, tmp_path):
    """A learned fit moves the coefficients from their start and is recorded in the plan's own form:
    pasting it back gives the same bytes. (How well they score against a task-arithmetic grid is a
    figure of the CPU the demo models were trained on: benchmarks/task_vectors_table.py, docs/task-vectors.md.)"""
    learned = _apply(cli, tmp_path, f"base: {demo['base']}\nsteps:\n  - op: atlas\n    granularity: module\n"
                     f"    models: [{demo['prose']}, {demo['code']}]\n"
                     "    learn: {data: builtin:mixed-dev, steps: 5, max_tokens: 1024}\n", "atlas")
    fits = json.loads((learned / "surgery.json").read_text())["fits"]
    coefficients = fits[0]["coefficients"]
    assert len(coefficients) == 2 and all(len(by_kind) == 4 and any(c != 0 for c in by_kind.values())
                                          for by_kind in coefficients.values())
    again = _apply(cli, tmp_path, f"base: {demo['base']}\nsteps:\n  - op: atlas\n    granularity: module\n"
                   f"    models: [{demo['prose']}, {demo['code']}]\n    coefficients: {json.dumps(coefficients)}\n", "again")
    assert (again / "model.safetensors").read_bytes() == (learned / "model.safetensors").read_bytes()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("model: {prose}\nbase: {base}\nsteps:\n  - op: task_arithmetic\n    models: [{code}]\n", "builds on the base"),
        ("steps:\n  - op: ties\n    models: [{code}]\nmodel: {base}\n", "add 'base: PATH'"),
        ("model: {prose}\nbase: {base}\nsteps:\n  - op: lines\n", "give alpha"),
        ("base: {base}\nsteps:\n  - op: task_arithmetic\n    models: [{code}, {prose}]\n  - op: lines\n    alpha: 0.5\n",
         "needs beta"),
        ("base: {base}\nsteps:\n  - op: task_arithmetic\n    models: [{tiny}]\n", "task vectors need"),
        ("base: {base}\nsteps:\n  - op: atlas\n    models: [{code}]\n", "either 'coefficients'"),
        ("base: {base}\nsteps:\n  - op: atlas\n    granularity: layer\n    models: [{code}]\n"
         "    coefficients: {{{code}: {{'0': 1, '99': 2}}}}\n", "block '99'"),
        ("base: {base}\nsteps:\n  - op: ties\n    density: 0\n    models: [{code}]\n", "density"),
    ],
)
def test_bad_task_vector_plans(demo, tiny, cli, tmp_path, body, message):
    names = {k: str(v) for k, v in demo.items()} | {"tiny": str(tiny("llama"))}
    assert_plan_refused(cli, tmp_path, f"output: {tmp_path / 'out'}\n" + body.format(**names), message)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_merge_on_cuda_equals_cpu(demo, cli, tmp_path):
    body = (f"base: {demo['base']}\nsteps:\n  - op: ties\n    models: [{demo['prose']}, {demo['code']}]\n"
            "  - op: lines\n    alpha: 0.5\n    beta: 0.5\n")
    cpu = _apply(cli, tmp_path, body, "cpu")
    plan = write_plan(tmp_path, f"output: {tmp_path / 'cuda'}\n{body}", name="cuda.yaml")
    assert cli("apply", plan, "--device", "cuda").code == 0
    for name, tensor in _weights(cpu).items():
        torch.testing.assert_close(_weights(tmp_path / "cuda")[name], tensor, rtol=1e-6, atol=1e-6)
