"""The merges' fused weighted sum (surgery/compute/_combine.c) gives the torch path's bits: the kernel
against each compute it stands for, on every dtype pair, with NaN, infinities, signed zeros and a
length that is no multiple of its chunk; and whole merges through `apply`, with the kernel and without."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import surgery.recipe.stream as stream
from surgery.compute import fused
from surgery.compute.sphere import SphereMerge
from surgery.compute.updates import WeightedUpdate
from surgery.recipe.tensor import Block
from tests.conftest import write_plan

needs_kernel = pytest.mark.skipif(fused.combine is None, reason="the fused kernel was not built (no C compiler)")

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
INTS = {"BF16": torch.int16, "F16": torch.int16, "F32": torch.int32}
N = 3 * 512 + 37  # whole chunks and a tail


def _inputs(dtype: str, count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(N, generator=generator).to(DTYPES[dtype]) for _ in range(count)]
    tensors[0][:4] = torch.tensor([0.0, -0.0, float("inf"), 1.0])
    tensors[1][:4] = torch.tensor([-0.0, -0.0, 1.0, float("nan")])
    tensors[-1][N - 2:] = torch.tensor([float("-inf"), 65504.0])
    return tensors


def _raw(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().view(torch.uint8).numpy())


COMPUTES = {
    "task arithmetic": WeightedUpdate((0.5, 0.3)),
    "task arithmetic, LiNeS-scaled": WeightedUpdate((0.5, -1.25)).scaled(0.35),
    "linear, normalized": SphereMerge("linear", (N,), (0.7, 0.2, 1.3)),
    "linear, not normalized": SphereMerge("linear", (N,), (0.7, 0.2, 1.3), normalize=False),
    "linear of task vectors, scaled": SphereMerge("linear", (N,), (0.7, 0.2), has_base=True, centered=True,
                                                  normalize=False, factor=0.6),
    "solved coefficients": SphereMerge("slerp", (N,), (0.5, 0.5), coefficients=((0.61, 0.43),)),
}


@needs_kernel
@pytest.mark.parametrize("name", list(COMPUTES))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("out_dtype", list(DTYPES))
def test_the_kernel_gives_the_torch_computes_bits(name, dtype, out_dtype):
    compute = COMPUTES[name].prepare(lambda: iter(()))
    formula = compute.weighted_sum()
    assert formula is not None
    count = len(compute.weights) + (1 if isinstance(compute, WeightedUpdate) or compute.has_base else 0)
    inputs = _inputs(dtype, count, seed=len(name))
    expected = compute(Block([t.float().clone() for t in inputs])).to(DTYPES[out_dtype])
    out = torch.empty(N, dtype=DTYPES[out_dtype])
    formula.into(_raw(out), out_dtype, tuple(_raw(t) for t in inputs), dtype)
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)  # a NaN's payload is the CPU's own (torch's x86 conversion: 0xFFFF)
    assert torch.equal(out[~nan].view(INTS[out_dtype]), expected[~nan].view(INTS[out_dtype]))


def test_per_row_coefficients_are_not_fused():
    merge = SphereMerge("nuslerp", (2, 3), (1.0, 1.0), grouping="rows", coefficients=((0.5, 0.5), (0.2, 0.8)))
    assert merge.weighted_sum() is None


@needs_kernel
def test_the_kernel_refuses_what_it_cannot_compute():
    out = memoryview(bytearray(8))
    with pytest.raises(ValueError, match="different numbers"):
        fused.combine(out, "F32", (memoryview(bytearray(8)), memoryview(bytearray(4))), "F32", (1.0,), True, True,
                      False, 0.0, 1.0)
    with pytest.raises(ValueError, match="one per model"):
        fused.combine(out, "F32", (memoryview(bytearray(8)),), "F32", (1.0, 2.0), False, False, True, 0.0, 1.0)
    with pytest.raises(ValueError, match="dtype I8 is not"):
        fused.combine(out, "I8", (memoryview(bytearray(8)),), "F32", (1.0,), False, False, True, 0.0, 1.0)


# ---------------------------------------------------------------- whole merges, with and without the kernel


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory) -> dict[str, Path]:
    """The demo family in bfloat16 (the kernel's commonest input), F16 for one model (mixed: not fused)."""
    from surgery.demo_models import demo_model

    root = tmp_path_factory.mktemp("bf16")
    folders = {}
    for name, dtype in (("base", torch.bfloat16), ("prose", torch.bfloat16), ("code", torch.bfloat16),
                        ("code16", torch.float16)):
        source = demo_model("code" if name == "code16" else name)
        folder = folders[name] = root / name
        folder.mkdir()
        for item in source.iterdir():
            if item.suffix != ".safetensors":
                (folder / item.name).write_bytes(item.read_bytes())
        tensors = {k: v.to(dtype) for k, v in load_file(source / "model.safetensors").items()}
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folders


PLANS = {
    "task_arithmetic": "base: {base}\nsteps:\n  - op: task_arithmetic\n    models: [{prose}, {code}]\n",
    "task_arithmetic + lines": ("base: {base}\nsteps:\n  - op: task_arithmetic\n    models: [{prose}, {code}]\n"
                                "  - op: lines\n    alpha: 0.5\n    beta: 0.5\n"),
    "linear": "steps:\n  - op: linear\n    models: [{prose}, {{model: {code}, weight: 0.5}}]\n",
    "slerp": "steps:\n  - op: slerp\n    models: [{prose}, {code}]\n    t: [0, 0.5, 1]\n",
    "model_stock": "base: {base}\nsteps:\n  - op: model_stock\n    models: [{prose}, {code}]\n",
    "mixed dtypes": "base: {base}\nsteps:\n  - op: task_arithmetic\n    models: [{prose}, {code16}]\n",
}


def _apply(cli, folder: Path, body: str) -> dict[str, bytes]:
    plan = write_plan(folder, f"output: {folder / 'out'}\n{body}")
    result = cli("apply", plan, "--no-fsync", "--device", "cpu")
    assert result.code == 0, result.err
    return {k: v.view(torch.uint8).numpy().tobytes() for k, v in load_file(folder / "out" / "model.safetensors").items()}


@needs_kernel
@pytest.mark.parametrize("plan", list(PLANS))
def test_a_merge_writes_the_same_bytes_with_the_kernel_and_without(plan, bf16_family, cli, tmp_path, monkeypatch):
    body = PLANS[plan].format(**{k: str(v) for k, v in bf16_family.items()})
    calls = []
    kernel = fused.combine
    monkeypatch.setattr(fused, "combine", lambda *args: calls.append(1) or kernel(*args))
    (tmp_path / "fused").mkdir()
    with_kernel = _apply(cli, tmp_path / "fused", body)
    assert bool(calls) == (plan != "mixed dtypes")  # an input of another dtype: the torch path
    monkeypatch.setattr(stream, "combine", None)
    (tmp_path / "torch").mkdir()
    assert _apply(cli, tmp_path / "torch", body) == with_kernel


def test_ci_built_the_kernel():
    """CI sets SURGERY_REQUIRE_KERNEL: there the kernel must have compiled, so these tests do not skip."""
    if not os.environ.get("SURGERY_REQUIRE_KERNEL"):
        pytest.skip("SURGERY_REQUIRE_KERNEL not set")
    assert fused.combine is not None
