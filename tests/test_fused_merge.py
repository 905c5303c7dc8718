"""The merges' fused weighted sum (surgery/compute/_combine.c) gives the torch path's bits: the kernel
against each compute it stands for, on every dtype pair, with NaN, infinities, signed zeros and a
length that is no multiple of its chunk; and whole merges through `apply`, with the kernel and without."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery.compute import fused
from surgery.compute import sce as sce_module
from surgery.compute.sce import SceMerge
from surgery.compute.select import rank_cuts, top_cuts
from surgery.compute.sparse import ModelTrim, SparseMerge
from surgery.compute.sphere import SphereMerge
from surgery.compute.updates import WeightedUpdate
from surgery.demo_models import demo_model
from surgery.errors import SurgeryError
from surgery.recipe.raw import RawBlock
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
    fused_pass = compute.fused_pass()
    assert fused_pass is not None
    count = len(compute.weights) + (1 if isinstance(compute, WeightedUpdate) or compute.has_base else 0)
    inputs = _inputs(dtype, count, seed=len(name))
    _assert_same_bits(compute, fused_pass, inputs, dtype, out_dtype)


def _assert_same_bits(compute, fused_pass, inputs: list[torch.Tensor], dtype: str, out_dtype: str) -> None:
    """The same bits; or, for float16 out, refused where a value of finite inputs overflowed to inf."""
    expected = compute(Block([t.float().clone() for t in inputs])).to(DTYPES[out_dtype])
    out = torch.empty(N, dtype=DTYPES[out_dtype])
    block = RawBlock(0, tuple(_raw(t) for t in inputs), dtype)
    finite = torch.stack([t.isfinite() for t in inputs]).all(0)
    if out_dtype == "F16" and bool((expected.isinf() & finite).any()):
        with pytest.raises(SurgeryError, match="overflow float16"):
            fused_pass.into(_raw(out), out_dtype, block)
        return
    fused_pass.into(_raw(out), out_dtype, block)
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)  # a NaN's payload is the CPU's own (torch's x86 conversion: 0xFFFF)
    assert torch.equal(out[~nan].view(INTS[out_dtype]), expected[~nan].view(INTS[out_dtype]))


def test_per_row_coefficients_are_not_fused():
    merge = SphereMerge("nuslerp", (2, 3), (1.0, 1.0), grouping="rows", coefficients=((0.5, 0.5), (0.2, 0.8)))
    assert merge.fused_pass() is None


TRIMS = {  # (weight, density) per model, consensus, normalize, lambda
    "ties": (((0.5, 0.5), (0.3, 0.5)), True, True, 1.0),
    "ties, three models, one dense, one empty, scaled": (((0.5, 0.3), (-0.3, 1.0), (0.8, 0.0)), True, True, 0.6),
    "magnitude trim without consensus": (((0.5, 0.7), (0.5, 0.2)), False, True, 1.0),
    "neither, weights summing to zero": (((0.5, 0.5), (-0.5, 0.9)), False, True, 1.0),
    "consensus without normalizing": (((1.0, 0.5), (1.0, 0.5), (1.0, 0.4)), True, False, 1.0),
}


@needs_kernel
@pytest.mark.parametrize("name", list(TRIMS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("out_dtype", ["BF16", "F32"])
def test_trimmed_merges_give_the_torch_computes_bits_and_the_same_cuts(name, dtype, out_dtype):
    settings, consensus, normalize, lam = TRIMS[name]
    inputs = _inputs(dtype, len(settings) + 1, seed=len(name))
    inputs[1][10:40] = inputs[0][10:40]  # zero task-vector entries
    inputs[2][100:300] = inputs[0][100:300] + 0.5  # many equal magnitudes: ties at the cut split by position
    merge = SparseMerge(tuple(ModelTrim(w, d) for w, d in settings), (N,), trim="magnitude", consensus=consensus,
                        normalize=normalize, lam=lam)
    by_torch = merge.prepare(lambda: iter([Block([t.float().clone() for t in inputs], 0)]))
    raw = lambda sampled=False: iter([RawBlock(0, tuple(_raw(t) for t in inputs), dtype)])  # noqa: E731
    by_kernel = merge.prepare(_RawAndTorch(lambda: iter([Block([t.float().clone() for t in inputs], 0)]), raw))
    assert by_kernel.keeps == by_torch.keeps
    _assert_same_bits(by_torch, by_kernel.fused_pass(), inputs, dtype, out_dtype)


KERNEL_TRIMS = {  # trim, (weight, density, gamma) per model, consensus, normalize, rescale
    "dare_ties": ("random", ((0.5, 0.5, 0.0), (0.3, 0.3, 0.0)), True, False, True),
    "dare_linear, three models, one dense": ("random", ((0.5, 0.1, 0.0), (0.7, 1.0, 0.0), (0.2, 0.9, 0.0)),
                                             False, False, True),
    "breadcrumbs": ("outliers", ((0.5, 0.5, 0.1), (0.3, 0.6, 0.05)), False, False, False),
    "breadcrumbs_ties, no largest dropped, rescaled": ("outliers", ((0.5, 0.4, 0.0), (0.5, 0.7, 0.2)), True, True,
                                                      True),
    "ties, rescaled": ("magnitude", ((0.5, 0.5, 0.0), (0.3, 0.2, 0.0)), True, True, True),
}


@needs_kernel
@pytest.mark.parametrize("name", list(KERNEL_TRIMS))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_random_and_banded_trims_give_the_torch_computes_bits_block_by_block(name, dtype):
    """DARE's seeded masks and breadcrumbs' bands, made in the kernel, across blocks (the mask's stream and the
    band's tie positions continue from one block to the next): the torch compute's bits, and its L1 rescale
    up to the order its sums are added in."""
    trim, settings, consensus, normalize, rescale = KERNEL_TRIMS[name]
    inputs = _inputs(dtype, len(settings) + 1, seed=len(name))
    inputs[2][100:300] = inputs[0][100:300] + 0.5  # many equal magnitudes: ties at the band's edges
    if rescale:  # finite norms (an infinite entry makes the scale NaN on both paths)
        inputs = [t.nan_to_num(0.0, 0.0, 0.0) for t in inputs]
    merge = SparseMerge(tuple(ModelTrim(w, d, g) for w, d, g in settings), (N,), trim=trim, consensus=consensus,
                        normalize=normalize, rescale=rescale, seed=5, tensor="layers.0.w")
    step = 97 * 8
    torch_blocks = lambda: (Block([t[s:s + step].float().clone() for t in inputs], s)  # noqa: E731
                            for s in range(0, N, step))
    by_torch = merge.prepare(torch_blocks)
    by_kernel = merge.prepare(_RawAndTorch(torch_blocks, _raw_in_blocks(inputs, dtype, step)))
    assert by_kernel.keeps == by_torch.keeps
    assert by_kernel.scales == pytest.approx(by_torch.scales, rel=1e-12, abs=0)
    assert any(s != 1.0 for s in by_kernel.scales) == rescale  # rescaled: a trimmed model's L1 grows
    fused_pass = by_kernel.fused_pass()
    assert fused_pass is not None
    for start in range(0, N, step):
        expected = by_kernel(Block([t[start:start + step].float().clone() for t in inputs], start)).to(torch.bfloat16)
        out = torch.empty(expected.numel(), dtype=torch.bfloat16)
        fused_pass.into(_raw(out), "BF16", RawBlock(start, tuple(_raw(t[start:start + step]) for t in inputs), dtype))
        nan = expected.isnan()
        assert torch.equal(out.isnan(), nan)
        assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16)), start


@needs_kernel
@pytest.mark.parametrize("models", [1, 2, 3])
@pytest.mark.parametrize("topk", [1.0, 0.3, 1e-6, 0.0])
@pytest.mark.parametrize("missed", [False, True])  # True: the bracket holds only zeros, the cut comes from torch
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_sce_gives_the_torch_computes_bits_block_by_block(models, topk, missed, dtype, monkeypatch):
    """SCE's variance selection, energies and merge made by the kernels: the torch compute's cut, its weights
    up to the order their float64 sums are added in, and its bits, across blocks and with ties at the cut."""
    monkeypatch.setattr(fused, "_WHOLE_SAMPLE", 1 << 10)  # sampled as a large tensor is
    if missed:
        monkeypatch.setattr(fused, "_bracket", lambda *args: (0, 0, 16))
    generator = torch.Generator().manual_seed(models)
    n = 20_011
    inputs = [torch.randn(n, generator=generator).to(DTYPES[dtype]) for _ in range(models + 1)]
    inputs[1][500:2500] = inputs[0][500:2500] + 0.25  # many equal variances: ties at the cut split by position
    if models > 1:
        inputs[2][500:2500] = inputs[0][500:2500] - 0.25
        inputs[2][3000:3100] = inputs[1][3000:3100]  # and some of zero variance (not counted toward k)
    merge = SceMerge(models, (n,), topk).scaled(0.7)
    step = 4096 + 3
    torch_blocks = lambda: (Block([t[s:s + step].float().clone() for t in inputs], s)  # noqa: E731
                            for s in range(0, n, step))
    by_torch = merge.prepare(torch_blocks)
    from_torch = []
    monkeypatch.setattr(sce_module, "top_cuts", lambda *args: from_torch.append(1) or top_cuts(*args))
    by_kernel = merge.prepare(_RawAndTorch(torch_blocks, _raw_in_blocks(inputs, dtype, step)))
    assert (by_kernel.cut, by_kernel.keep_none) == (by_torch.cut, by_torch.keep_none)
    assert bool(from_torch) == (missed and by_kernel.cut is not None)
    assert by_kernel.weights == pytest.approx(by_torch.weights, rel=1e-12, abs=0)
    fused_pass = by_kernel.fused_pass()
    for start in range(0, n, step):
        expected = by_kernel(Block([t[start:start + step].float().clone() for t in inputs], start)).to(torch.bfloat16)
        out = torch.empty(expected.numel(), dtype=torch.bfloat16)
        fused_pass.into(_raw(out), "BF16", RawBlock(start, tuple(_raw(t[start:start + step]) for t in inputs), dtype))
        assert torch.equal(out.view(torch.int16), expected.view(torch.int16)), start


@needs_kernel
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("consensus", [True, False])  # della, della_linear
@pytest.mark.parametrize("shape", [(13, 157), (13, 1), (2001,), (70, 1001)])
@pytest.mark.parametrize("rescale", [False, True])
def test_della_gives_the_torch_computes_bits_row_block_by_row_block(dtype, consensus, shape, rescale):
    """DELLA's keep probabilities rank each |tau| in its row (ties by position, NaN and infinities included):
    made in the kernel on blocks of whole rows, the torch compute's masks, L1 rescale and bits. With the
    rescale the L1 pass keeps the masks as bits for the merge; (70, 1001) is one block split in halves on
    two threads, at a multiple of 8 rows, each writing its own bytes of them."""
    n = int(torch.tensor(shape).prod())
    generator = torch.Generator().manual_seed(n)
    inputs = [torch.randn(n, generator=generator).to(DTYPES[dtype]) for _ in range(3)]
    inputs[1][:4] = torch.tensor([float("nan"), float("inf"), -0.0, 1.0])
    inputs[2][200:400] = inputs[0][200:400] + 0.5  # equal magnitudes within rows: ranked by position
    if rescale:  # finite norms (an infinite entry makes the scale NaN on both paths)
        inputs = [t.nan_to_num(0.0, 0.0, 0.0) for t in inputs]
    merge = SparseMerge((ModelTrim(0.6, 0.5, epsilon=0.2), ModelTrim(0.4, 0.3, epsilon=0.1)), shape, trim="della",
                        consensus=consensus, normalize=consensus, rescale=rescale, seed=3, tensor="w")
    step = 3 * shape[-1] if len(shape) > 1 and n < 1 << 16 else n
    torch_blocks = lambda: (Block([t[s:s + step].float().clone() for t in inputs], s)  # noqa: E731
                            for s in range(0, n, step))
    by_torch = merge.prepare(torch_blocks)
    by_kernel = merge.prepare(_RawAndTorch(torch_blocks, _raw_in_blocks(inputs, dtype, step)))
    assert by_kernel.scales == pytest.approx(by_torch.scales, rel=1e-12, abs=0)
    assert bool(by_kernel.scales) == rescale
    fused_pass = by_kernel.fused_pass()
    for start in range(0, n, step):
        expected = by_kernel(Block([t[start:start + step].float().clone() for t in inputs], start)).to(torch.bfloat16)
        out = torch.empty(expected.numel(), dtype=torch.bfloat16)
        fused_pass.into(_raw(out), "BF16", RawBlock(start, tuple(_raw(t[start:start + step]) for t in inputs), dtype))
        nan = expected.isnan()
        assert torch.equal(out.isnan(), nan)
        assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16)), start


@needs_kernel
def test_della_refuses_blocks_of_part_rows():
    merge = SparseMerge((ModelTrim(0.5, 0.5, epsilon=0.1),), (4, 8), trim="della").prepare(lambda: iter(()))
    inputs = tuple(_raw(torch.zeros(12)) for _ in range(2))
    with pytest.raises(ValueError, match="whole rows"):
        merge.fused_pass().into(_raw(torch.empty(12)), "F32", RawBlock(0, inputs, "F32"))


class _RawAndTorch:
    def __init__(self, blocks, raw):
        self.blocks, self.raw = blocks, raw

    def __call__(self):
        return self.blocks()


@needs_kernel
def test_cuts_across_blocks_equal_one_pass():
    """The streamer hands the cuts many blocks: the counts add up and a tie's position is found in a later one."""
    inputs = _inputs("BF16", 3, seed=7)
    inputs[1][::3] = inputs[0][::3] + 0.25
    merge = SparseMerge((ModelTrim(0.5, 0.4), ModelTrim(0.5, 0.6)), (N,), trim="magnitude", consensus=True,
                        normalize=True)
    whole = merge.prepare(lambda: iter([Block([t.float().clone() for t in inputs], 0)]))
    step = 97

    def raw(sampled=False):
        for start in range(0, N, step):
            yield RawBlock(start, tuple(_raw(t[start:start + step]) for t in inputs), "BF16")

    assert merge.prepare(_RawAndTorch(lambda: iter(()), raw)).keeps == whole.keeps


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
    "ties": "base: {base}\nsteps:\n  - op: ties\n    models: [{prose}, {code}]\n    density: 0.4\n",
    "ties + lines": ("base: {base}\nsteps:\n  - op: ties\n    models: [{prose}, {code}]\n    density: 0.4\n"
                     "  - op: lines\n    alpha: 0.5\n    beta: 0.5\n"),
    "breadcrumbs": "base: {base}\nsteps:\n  - op: breadcrumbs\n    models: [{prose}, {code}]\n    density: 0.5\n",
    "breadcrumbs_ties, rescaled": ("base: {base}\nsteps:\n  - op: breadcrumbs_ties\n    models: [{prose}, {code}]\n"
                                   "    density: 0.5\n    gamma: 0.1\n    rescale: true\n"),
    "dare_ties": "base: {base}\nsteps:\n  - op: dare_ties\n    models: [{prose}, {code}]\n    density: 0.5\n",
    "dare_linear, seeded": ("base: {base}\nsteps:\n  - op: dare_linear\n    models: [{prose}, {code}]\n"
                            "    density: 0.3\n    seed: 7\n"),
    "ties, rescaled": "base: {base}\nsteps:\n  - op: ties\n    models: [{prose}, {code}]\n    density: 0.4\n    rescale: true\n",
    "sce": "base: {base}\nsteps:\n  - op: sce\n    models: [{prose}, {code}]\n    select_topk: 0.5\n",
    "sce + lines": ("base: {base}\nsteps:\n  - op: sce\n    models: [{prose}, {code}]\n    select_topk: 0.3\n"
                    "  - op: lines\n    alpha: 0.5\n    beta: 0.5\n"),
    "della": "base: {base}\nsteps:\n  - op: della\n    models: [{prose}, {code}]\n    density: 0.5\n",
    "della_linear": ("base: {base}\nsteps:\n  - op: della_linear\n    models: [{prose}, {code}]\n    density: 0.4\n"
                     "    epsilon: 0.2\n    seed: 11\n"),
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
    for name in ("combine", "ties", "sce"):
        kernel = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *args, kernel=kernel: calls.append(1) or kernel(*args))
    (tmp_path / "fused").mkdir()
    with_kernel = _apply(cli, tmp_path / "fused", body)
    assert bool(calls) == ("mixed" not in plan and "not fused" not in plan)  # an input of another dtype: torch
    for name in ("combine", "l1_norms", "magnitude_counts", "ties", "sce"):  # as built without a C compiler
        monkeypatch.setattr(fused, name, None)
    (tmp_path / "torch").mkdir()
    assert _apply(cli, tmp_path / "torch", body) == with_kernel


@needs_kernel
@pytest.mark.parametrize("plan", ["ties", "dare_ties", "sce", "della", "breadcrumbs_ties, rescaled"])
def test_a_fused_merge_never_imports_torch(plan, bf16_family, tmp_path):
    """Importing torch costs more than a second of start-up: a merge the kernels make on CPU needs none of it."""
    import subprocess
    import sys

    body = PLANS[plan].format(**{k: str(v) for k, v in bf16_family.items()})
    plan_file = write_plan(tmp_path, f"output: {tmp_path / 'out'}\n{body}")
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "surgery", "apply", str(plan_file), "--no-fsync",
                          "--device", "cpu"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported


@needs_kernel
@pytest.mark.parametrize("isa", ["default", "avx2"])
@pytest.mark.parametrize("plan", ["task_arithmetic", "ties", "dare_ties", "sce", "della", "breadcrumbs_ties, rescaled"])
def test_every_version_of_the_kernel_writes_the_same_bytes(plan, isa, bf16_family, cli, tmp_path):
    """The kernels are built plain, for AVX2 and for AVX-512, and the CPU picks one: each narrower one,
    asked for by SURGERY_KERNEL_ISA, writes what this machine's widest one does."""
    import subprocess
    import sys

    from surgery.compute import _combine

    versions = ["default", "avx2", "avx512"]
    if versions.index(_combine.isa()) <= versions.index(isa):
        pytest.skip(f"this CPU runs no version wider than {isa}")
    body = PLANS[plan].format(**{k: str(v) for k, v in bf16_family.items()})
    (tmp_path / "widest").mkdir()
    widest = _apply(cli, tmp_path / "widest", body)
    plan_file = write_plan(tmp_path, f"output: {tmp_path / isa}\n{body}", name=f"{isa}.yaml")
    run = subprocess.run([sys.executable, "-m", "surgery", "apply", str(plan_file), "--no-fsync", "--device", "cpu"],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "SURGERY_KERNEL_ISA": isa})
    assert run.returncode == 0, run.stderr[-2000:]
    ran = subprocess.run([sys.executable, "-c", "from surgery.compute import _combine; print(_combine.isa())"],
                         capture_output=True, text=True, env={**os.environ, "SURGERY_KERNEL_ISA": isa})
    assert ran.stdout.strip() == isa
    written = load_file(tmp_path / isa / "model.safetensors")
    assert {k: v.view(torch.uint8).numpy().tobytes() for k, v in written.items()} == widest


def test_ci_built_the_kernel():
    """CI sets SURGERY_REQUIRE_KERNEL: there the kernel must have compiled, so these tests do not skip."""
    if not os.environ.get("SURGERY_REQUIRE_KERNEL"):
        pytest.skip("SURGERY_REQUIRE_KERNEL not set")
    assert fused.combine is not None


@needs_kernel
def test_a_large_block_counted_on_two_threads_gives_the_same_cuts():
    generator = torch.Generator().manual_seed(3)
    n = (1 << 17) + 5
    inputs = [torch.randn(n, generator=generator).to(torch.bfloat16) for _ in range(3)]
    merge = SparseMerge((ModelTrim(0.5, 0.3), ModelTrim(0.5, 0.5)), (n,), trim="magnitude", consensus=True)
    whole = merge.prepare(lambda: iter([Block([t.float().clone() for t in inputs], 0)]))
    raw = lambda sampled=False: iter([RawBlock(0, tuple(_raw(t) for t in inputs), "BF16")])  # noqa: E731
    assert merge.prepare(_RawAndTorch(lambda: iter(()), raw)).keeps == whole.keeps


def _raw_in_blocks(inputs: list[torch.Tensor], dtype: str, step: int):
    n = inputs[0].numel()
    return lambda sampled=False: (RawBlock(start, tuple(_raw(t[start:start + step]) for t in inputs), dtype)
                    for start in range(0, n, step))


@needs_kernel
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("margin", [fused._MARGIN, 0.0])  # 0: brackets too narrow, most cuts from the radix select
def test_cuts_bracketed_by_a_sample_equal_the_radix_selects(dtype, margin, monkeypatch):
    """The sampled bracket and the window pass give the radix select's cut (value and tie position) for
    any rank, across blocks, with many equal magnitudes; where the bracket misses, the radix select's."""
    monkeypatch.setattr(fused, "_MARGIN", margin)
    monkeypatch.setattr(fused, "_WHOLE_SAMPLE", 1 << 12)  # small tensors sampled too, as large ones are
    generator = torch.Generator().manual_seed(11)
    n = 70_001
    inputs = [torch.randn(n, generator=generator).to(DTYPES[dtype]) for _ in range(4)]
    steps = torch.randint(-3, 4, (n,), generator=generator).float() * 0.25
    inputs[2] = (inputs[0].float() + steps).to(DTYPES[dtype])  # few distinct magnitudes: ties at every cut
    inputs[3] = (inputs[0].float() + torch.linspace(0, 4, n)).to(DTYPES[dtype])  # magnitude grows with position
    for counts in ([1, n // 2, n - 1], [n // 3, None, 7], [None, 5, n // 10]):
        for step in (n, 4096 + 3):
            raw = _raw_in_blocks(inputs, dtype, step)
            assert fused.top_magnitude_cuts(raw, counts, n) == fused._radix_cuts(raw, counts, n), (counts, step)
    magnitudes = lambda block: (model.sub_(block[0]).abs_() for model in block[1:])  # noqa: E731
    for ranks in ([[1, n // 2], [n - 1], []], [[], [7, n - 8], [n // 3, n // 3 + 1]]):
        for step in (n, (1 << 16) + 3):  # blocks of a whole sample period (smaller ones overflow it: the radix's)
            blocks = lambda step=step: (Block([t[s:s + step].float().clone() for t in inputs], s)  # noqa: E731
                                        for s in range(0, n, step))
            found = fused.rank_magnitude_cuts(_raw_in_blocks(inputs, dtype, step), ranks, n)
            expected = [[(c.value, c.position) for c in cuts] for cuts in rank_cuts(blocks, magnitudes, ranks)]
            # the third model's magnitudes grow with position, which a sample of this small tensor (two chunks) misses
            assert found == expected or (found is None and (margin == 0 or ranks[2])), (ranks, step)


@pytest.mark.parametrize("kernel", [True, False])
def test_a_float16_output_that_overflows_is_refused_and_an_inf_it_was_given_is_kept(kernel, cli, tmp_path,
                                                                                    monkeypatch):
    """40000 + 40000 is beyond float16's 65504: written as inf, the weight would be broken without a word, so
    the merge stops naming the tensor and nothing is written; an inf one input already holds is the plan's
    own result and is written. The kernels' pass and the torch path alike."""
    if kernel and fused.combine is None:
        pytest.skip("the fused kernel was not built (no C compiler)")
    if not kernel:
        for name in ("combine", "l1_norms", "magnitude_counts", "ties", "sce"):
            monkeypatch.setattr(fused, name, None)
    source = demo_model("base")
    tensors = load_file(source / "model.safetensors")

    def model(name: str, value: float, inf_at: str | None = None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for item in source.iterdir():
            if item.suffix != ".safetensors":
                (folder / item.name).write_bytes(item.read_bytes())
        made = {k: torch.full_like(v, value).half() for k, v in tensors.items()}
        if inf_at is not None:
            made[inf_at].view(-1)[7] = float("inf")
        save_file(made, folder / "model.safetensors", metadata={"format": "pt"})
        return folder

    base, big, small = model("base", 0.0), model("big", 40000.0), model("small", 1.0, "model.norm.weight")
    plan = write_plan(tmp_path, f"output: {tmp_path / 'out'}\nbase: {base}\nsteps:\n  - op: task_arithmetic\n"
                                f"    models: [{big}, {{model: {big}, weight: 1.0}}]\n", name="over.yaml")
    result = cli("apply", plan, "--no-fsync", "--device", "cpu")
    assert result.code == 2 and "overflow float16" in result.err and "dtype: bfloat16" in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    plan = write_plan(tmp_path, f"output: {tmp_path / 'kept'}\nbase: {base}\nsteps:\n  - op: task_arithmetic\n"
                                f"    models: [{small}]\n", name="inf.yaml")
    result = cli("apply", plan, "--no-fsync", "--device", "cpu")
    assert result.code == 0, result.err
    written = load_file(tmp_path / "kept" / "model.safetensors")["model.norm.weight"]
    assert written.view(-1)[7] == float("inf") and int(written.isinf().sum()) == 1
