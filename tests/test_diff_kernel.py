"""diff's arithmetic against float64 computed independently: the C kernel and the numpy fallback,
every dtype path (decoded by the kernel, widened first), tails, NaN and tolerances; the layer sketch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from surgery.checkpoint.blocks import BlockReader
from surgery.checkpoint.reader import Checkpoint
from surgery.comparison import stats
from surgery.errors import SurgeryError

KERNELS = ["fused", "numpy"]


def _pair(tmp_path: Path, a: torch.Tensor, b: torch.Tensor):
    save_file({"a": a.contiguous(), "b": b.contiguous()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    tensors = Checkpoint.open(tmp_path).tensors
    return tensors["a"], tensors["b"]


def _measure(kernel: str, a, b, atol: float = 0.0, rtol: float = 0.0, start: int = 0, stop: int | None = None):
    if kernel == "fused" and stats.fused_measure is None:
        pytest.skip("the C kernel was not built (no compiler at install)")
    measure_range = stats.fused_range if kernel == "fused" else stats.numpy_range
    with BlockReader() as reader:
        return measure_range(reader, a, b, start, a.shape[0] if stop is None else stop, atol, rtol)


def _reference(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    x, y = a.double().numpy(), b.double().numpy()
    d = y - x
    return {"diff_sq": float(d @ d), "a_sq": float(x @ x), "b_sq": float(y @ y), "dot": float(x @ y),
            "max_abs": float(np.abs(d).max()) if d.size else 0.0, "scale": math.sqrt(float(x @ x) * float(y @ y))}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                    (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.float16, torch.float16), (torch.float64, torch.bfloat16)])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 4099, 70_001])
def test_sums_equal_float64(kernel, dtypes, n, tmp_path):
    generator = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=generator) * 0.05
    a = base.to(dtypes[0])
    b = (base + 0.001 * torch.randn(n, generator=generator)).to(dtypes[1])
    change, want = _measure(kernel, *_pair(tmp_path, a, b)), _reference(a, b)
    for field in ("diff_sq", "a_sq", "b_sq"):
        assert getattr(change, field) == pytest.approx(want[field], rel=1e-5), field
    assert abs(change.dot - want["dot"]) <= 1e-5 * want["scale"]
    assert change.max_abs == pytest.approx(want["max_abs"], rel=1e-6)  # one float32 rounding of the difference
    assert change.within_tolerance is False


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_range_is_the_sums_over_those_elements(kernel, tmp_path):
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(10_000, generator=generator), torch.randn(10_000, generator=generator)
    change, want = _measure(kernel, *_pair(tmp_path, a, b), start=123, stop=7777), _reference(a[123:7777], b[123:7777])
    assert change.diff_sq == pytest.approx(want["diff_sq"], rel=1e-5)
    assert change.max_abs == pytest.approx(want["max_abs"], rel=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_identical_values_are_within_no_tolerance(kernel, tmp_path):
    a = torch.randn(1000).to(torch.bfloat16)
    change = _measure(kernel, *_pair(tmp_path, a, a.float()))  # same values, another dtype
    assert (change.diff_sq, change.max_abs, change.within_tolerance) == (0.0, 0.0, True)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("atol", "rtol"), [(1e-3, 0.0), (0.0, 0.5), (1e-4, 0.01), (1.0, 0.0)])
def test_tolerance_is_every_element_within_atol_plus_rtol_times_a(kernel, atol, rtol, tmp_path):
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(3001, generator=generator)
    b = a + 0.0005 * torch.randn(3001, generator=generator)
    want = bool(torch.all((b - a).abs() <= atol + rtol * a.abs()))
    assert _measure(kernel, *_pair(tmp_path, a, b), atol=atol, rtol=rtol).within_tolerance is want


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("position", [0, 17, 2999])
def test_a_nan_difference_is_reported_not_hidden(kernel, position, tmp_path):
    a = torch.randn(3000)
    b = a + 1.0
    b[position] = math.nan
    change = _measure(kernel, *_pair(tmp_path, a, b), atol=10.0)
    assert math.isnan(change.max_abs) and math.isnan(change.diff_sq) and change.within_tolerance is False
    assert math.isnan((stats.ZERO + change).max_abs) and math.isnan((change + stats.ZERO).max_abs)


def test_layer_sketches_dot_to_the_mean_cosine_of_the_samples(tmp_path):
    """A tensor's sketch is its start, middle and end samples as one unit vector, whatever its dtype;
    the dot product of two layers' sketches is the mean cosine over their tensors."""
    from surgery.comparison.bytes import ByteComparer
    from surgery.comparison.workers import Workers

    generator = torch.Generator().manual_seed(2)
    a = [torch.randn(40, 300, generator=generator), torch.randn(64, 100, generator=generator)]
    b = [a[0] + 0.3 * torch.randn(40, 300, generator=generator), torch.randn(64, 100, generator=generator)]
    save_file({"a0": a[0].to(torch.bfloat16), "a1": a[1].to(torch.bfloat16), "b0": b[0], "b1": b[1]},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    tensors = Checkpoint.open(tmp_path).tensors

    def samples(t: torch.Tensor) -> np.ndarray:  # elements [0, 2048), the middle 2048, the last 2048
        flat = t.flatten().double().numpy()
        middle = flat.size // 2 - 1024
        return np.concatenate([flat[:2048], flat[middle:middle + 2048], flat[-2048:]])

    def cosine(x: np.ndarray, y: np.ndarray) -> float:
        return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))

    with Workers(1) as workers:
        sketches = stats.Sketches(ByteComparer(workers).samples)
        unit = sketches.unit_samples(tensors["a0"])
        want = samples(a[0].to(torch.bfloat16))
        np.testing.assert_allclose(unit, want / np.linalg.norm(want), rtol=1e-12)
        score = float(sketches((tensors["a0"], tensors["a1"])) @ sketches((tensors["b0"], tensors["b1"])))
    expected = (cosine(samples(a[0].to(torch.bfloat16)), samples(b[0]))
                + cosine(samples(a[1].to(torch.bfloat16)), samples(b[1]))) / 2
    assert score == pytest.approx(expected, rel=1e-6)


def test_mapped_range_is_the_raw_bytes_and_a_truncated_file_is_one_error(tmp_path):
    save_file({"w": torch.arange(100_000, dtype=torch.float32)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    info = Checkpoint.open(tmp_path).tensors["w"]
    with BlockReader() as reader:
        with reader.mapped(info, 1234, 56789) as view:
            assert bytes(view) == bytes(reader.raw(0, info, 1234, 56789))
        with open(info.file, "r+b") as f:
            f.truncate(info.end - 4096 * 4)
        with pytest.raises(SurgeryError, match="unexpected end of file"):
            with reader.mapped(info, 0, 100_000):
                pass


def test_kernel_is_built_where_required():
    """CI sets SURGERY_REQUIRE_KERNEL: there the kernel must have compiled, so its tests do not skip."""
    import os

    if not os.environ.get("SURGERY_REQUIRE_KERNEL"):
        pytest.skip("SURGERY_REQUIRE_KERNEL not set")
    assert stats.fused_measure is not None
