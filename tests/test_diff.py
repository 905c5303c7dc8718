"""`surgery diff`: chain outputs are recognised as their layer lists; fine-tunes as measured changes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_plan


def _chain(cli, tmp_path: Path, model: Path, layers: str, name: str = "out") -> Path:
    out = tmp_path / name
    plan = write_plan(tmp_path, f"model: {model}\noutput: {out}\nsteps:\n  - op: chain\n    layers: {layers}\n",
                      name=f"{name}.yaml")
    assert cli("apply", plan).code == 0
    return out


def _diff(cli, *args) -> dict:
    result = cli("diff", *args, "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)


@pytest.mark.parametrize("layers", [[0, 1, 2, 5], [0, 1, 2, 3, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [0, 0, 0]])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_chain_output_layer_map_equals_the_plan(arch, layers, tiny, cli, tmp_path):
    out = _chain(cli, tmp_path, tiny(arch), json.dumps(layers))
    data = _diff(cli, tiny(arch), out)
    assert data["layer_map"] == layers
    assert data["changed"] == [] and data["added"] == [] and data["reshaped"] == []
    dropped = sorted(set(range(6)) - set(layers))
    assert len(data["removed"]) == len(dropped) * len(_layer_tensors(tiny(arch)))
    count_key = "n_layer" if arch == "gpt2" else "num_hidden_layers"
    assert data["config"]["changed"].get(count_key, [6, 6]) == [6, len(layers)]


def _layer_tensors(folder: Path) -> list[str]:
    from surgery.formats.inspection import inspect

    return [g["suffix"] for g in inspect(folder)["layer_groups"]]


def test_frankenmerge_layer_map(tiny, cli, tmp_path):
    a = tiny("llama")
    other = tmp_path / "other"
    shutil.copytree(a, other)
    out = _chain(cli, tmp_path, a, f"\n      - {{layers: 0-2}}\n      - {{model: {_noisy(other)}, layers: 3-5}}")
    data = _diff(cli, a, out)
    assert data["layer_map"] == [0, 1, 2, None, None, None]
    assert [layer["closest"] for layer in data["layers"]] == [0, 1, 2, 3, 4, 5]  # the noisy copies are close


def _noisy(folder: Path, scale: float = 0.01) -> Path:
    """Perturb every float tensor of a checkpoint in place (a stand-in fine-tune)."""
    from safetensors.torch import save_file

    torch.manual_seed(3)
    for shard in folder.glob("*.safetensors"):
        tensors = {k: v + scale * torch.randn_like(v) for k, v in load_file(shard).items()}
        save_file(tensors, shard, metadata={"format": "pt"})
    return folder


def test_fine_tune_statistics_equal_a_direct_computation(cli):
    from surgery.demo_models import demo_model

    base, tuned = demo_model("base"), demo_model("prose")
    data = _diff(cli, base, tuned, "--top", "3")
    a, b = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    assert data["layer_map"] == [None] * 8 and [layer["closest"] for layer in data["layers"]] == list(range(8))
    assert sorted(data["changed"]) == sorted(a)
    for layer in data["layers"]:
        names = [n for n in a if n.startswith(f"model.layers.{layer['index']}.")]
        update = torch.cat([(b[n] - a[n]).flatten().double() for n in names])
        norm_a = torch.cat([a[n].flatten().double() for n in names]).norm()
        assert layer["update_norm"] == pytest.approx(float(update.norm()), rel=1e-5)
        assert layer["relative_change"] == pytest.approx(float(update.norm() / norm_a), rel=1e-5)
    top = data["top"][0]
    delta = (b[top["name"]] - a[top["name"]]).double()
    assert top["relative_change"] == pytest.approx(float(delta.norm() / a[top["name"]].double().norm()), rel=1e-5)
    assert top["max_abs_diff"] == pytest.approx(float(delta.abs().max()), rel=1e-6)
    assert top["cosine"] == pytest.approx(float(torch.nn.functional.cosine_similarity(
        a[top["name"]].double().flatten(), b[top["name"]].double().flatten(), dim=0)), rel=1e-6)


def test_identical_checkpoints_and_exit_code(tiny, cli, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny("qwen3"), copy)
    assert cli("diff", tiny("qwen3"), copy, "--exit-code").code == 0
    data = _diff(cli, tiny("qwen3"), copy)
    assert not data["differs"] and data["layer_map"] == list(range(6))
    _noisy(copy, scale=1e-6)
    assert cli("diff", tiny("qwen3"), copy, "--exit-code").code == 1
    assert _diff(cli, tiny("qwen3"), copy, "--atol", "1e-3")["differs"] is False  # within tolerance
    assert cli("diff", tiny("qwen3"), copy, "--exit-code", "--exclude", ".").code == 0  # nothing selected


def test_diff_command_loads_no_heavy_library(tiny):
    """Beyond reading, a diff's cost is its start-up: `--json` into a pipe loads neither torch nor
    transformers, nor rich, nor pydantic (which typer>=0.29 would load to coerce the arguments)."""
    heavy = {"torch", "transformers", "rich", "pydantic"}
    script = ("import sys\nfrom surgery.cli import main\nsys.argv[0] = 'surgery'\n"
              "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
              f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy!r}), file=sys.stderr)")
    model = str(tiny("llama"))
    result = subprocess.run([sys.executable, "-c", script, "diff", "--json", model, model],
                            capture_output=True, text=True, check=True)
    assert json.loads(result.stdout)["differs"] is False
    assert result.stderr.strip() == "[]"


def test_include_filter(cli):
    from surgery.demo_models import demo_model

    data = _diff(cli, demo_model("base"), demo_model("code"), "--include", r"mlp\.down_proj")
    assert len(data["changed"]) == 8 and all("down_proj" in n for n in data["changed"])


def test_different_architectures_are_compared_as_far_as_meaningful(tiny, cli):
    data = _diff(cli, tiny("llama"), tiny("gpt2"))
    assert data["differs"] and any("different architectures" in note for note in data["notes"])
    assert data["config"]["changed"]["model_type"] == ["llama", "gpt2"]


def test_plot(cli, tmp_path):
    pytest.importorskip("matplotlib")
    from surgery.demo_models import demo_model

    assert cli("diff", demo_model("base"), demo_model("prose"), "--plot", tmp_path / "h.png").code == 0
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_diff_input(tiny, cli, tmp_path):
    result = cli("diff", tiny("llama"), tmp_path / "missing")
    assert result.code == 2 and "does not exist" in result.err and "Traceback" not in result.err
    broken = tmp_path / "broken"
    shutil.copytree(tiny("mistral"), broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 4)
    result = cli("diff", tiny("mistral"), broken)
    assert result.code == 2 and "not a safetensors file" in result.err
    result = cli("diff", tiny("llama"), tiny("llama"), "--include", "([")
    assert result.code == 2 and "not a regular expression" in result.err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64,
                                   torch.float8_e4m3fn, torch.int64, torch.uint8])
def test_numpy_decode_equals_torch(dtype, tmp_path):
    """diff decodes in numpy (no torch import); every dtype must widen exactly as torch does."""
    from safetensors.torch import save_file

    from surgery.checkpoint.blocks import BlockReader
    from surgery.checkpoint.reader import Checkpoint

    source = (torch.randn(1000) * 7).to(dtype)
    save_file({"w": source}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    info = Checkpoint.open(tmp_path).tensors["w"]
    with BlockReader() as reader:
        assert torch.equal(torch.from_numpy(reader.array(0, info, 10, 990).copy()), source[10:990].float())


def test_bytes_equal_sees_a_difference_anywhere():
    from surgery.comparison.bytes import bytes_equal

    base = bytes(range(256)) * 4 + b"xyz"
    for position in (0, 7, 8, 500, len(base) - 1):
        changed = bytearray(base)
        changed[position] ^= 1
        assert not bytes_equal(memoryview(base), memoryview(changed))
    assert bytes_equal(memoryview(base), memoryview(bytes(base)))
    assert not bytes_equal(memoryview(base), memoryview(base[:-1]))


@pytest.mark.parametrize("kernel", ["fused", "numpy"])
def test_statistics_split_across_many_parts_and_threads(kernel, monkeypatch):
    """Tiny blocks and parts on 3 threads: the sums must not depend on how a tensor is split."""
    from surgery.checkpoint.reader import Checkpoint
    from surgery.comparison import bytes as byte_module
    from surgery.comparison import stats
    from surgery.comparison.workers import Workers
    from surgery.demo_models import demo_model

    if kernel == "numpy":
        monkeypatch.setattr(stats, "fused_measure", None)
    elif stats.fused_measure is None:
        pytest.skip("the C kernel was not built (no compiler at install)")
    base, tuned = Checkpoint.open(demo_model("base")), Checkpoint.open(demo_model("prose"))
    name = "model.embed_tokens.weight"
    a, b = base.tensors[name], tuned.tensors[name]
    with Workers(1) as workers:
        whole = stats.total(stats.measure(workers, a, b, 0.0, 0.0))
    monkeypatch.setattr(stats, "BLOCK_ELEMENTS", 1000)
    monkeypatch.setattr(stats, "PART_ELEMENTS", 3001)
    monkeypatch.setattr(byte_module, "CHUNK_BYTES", 999)
    monkeypatch.setattr(byte_module, "PART_BYTES", 4096)
    with Workers(3) as workers:
        split = stats.total(stats.measure(workers, a, b, 0.0, 0.0))
        comparer = byte_module.ByteComparer(workers)
        assert comparer.identical(a, a)
        assert not comparer.identical(a, b)
    assert split.max_abs == whole.max_abs
    for field in ("diff_sq", "a_sq", "b_sq", "dot"):
        assert getattr(split, field) == pytest.approx(getattr(whole, field), rel=1e-6)


def test_numpy_fallback_reports_what_the_kernel_does(cli, monkeypatch):
    """Installed without a C compiler, diff computes the same report in numpy."""
    from surgery.comparison import stats
    from surgery.demo_models import demo_model

    if stats.fused_measure is None:
        pytest.skip("the C kernel was not built (no compiler at install)")
    fused = _diff(cli, demo_model("base"), demo_model("code"))
    monkeypatch.setattr(stats, "fused_measure", None)
    fallback = _diff(cli, demo_model("base"), demo_model("code"))
    assert fallback["changed"] == fused["changed"] and fallback["layer_map"] == fused["layer_map"]
    for mine, theirs in zip(fallback["layers"] + fallback["top"], fused["layers"] + fused["top"]):
        for key in ("relative_change", "cosine", "max_abs_diff", "update_norm"):
            if key in mine:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5), key
