"""Seeded uniform noise that depends only on (seed, stream, position): the same on every block size,
device and run, so a random drop (DARE, DELLA) gives byte-identical output for one seed.

Each entry is SplitMix64 (Steele et al. 2014) of the stream's key plus its position, kept to its top
24 bits: a uniform float32 in [0, 1) with no state carried from one block to the next.
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


def stream_key(seed: int, tensor: str, model: int) -> int:
    """One stream per (seed, tensor name, model): masks of different tensors and models are independent."""
    return _splitmix_int((_splitmix_int(seed & _MASK64) ^ (zlib.crc32(tensor.encode()) << 16) ^ model) & _MASK64)


def uniform(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform float32 noise in [0, 1) for positions start .. start + count - 1 of the stream `key`."""
    import torch

    positions = torch.arange(start + 1, start + count + 1, dtype=torch.int64, device=device)
    z = positions.mul_(_signed(_GOLDEN)).add_(_signed(key))  # int64 arithmetic wraps, as uint64's would
    z = _xorshift(z, 30).mul_(_signed(_MIX1))
    z = _xorshift(z, 27).mul_(_signed(_MIX2))
    z = _xorshift(z, 31)
    return _logical_shift(z, 40).to(torch.float32).mul_(1.0 / (1 << 24))


def noise_threshold(probability: float) -> int:
    """How many of the 2^24 noise values lie below `probability`, compared as torch compares a float32 tensor
    with a Python float: in float32."""
    import numpy as np

    return min(1 << 24, max(0, math.ceil(float(np.float32(probability)) * (1 << 24))))


def _xorshift(z: torch.Tensor, shift: int) -> torch.Tensor:
    return z.bitwise_xor_(_logical_shift(z, shift))


def _logical_shift(z: torch.Tensor, shift: int) -> torch.Tensor:
    """z >>> shift on int64 (torch's >> keeps the sign)."""
    return (z >> shift).bitwise_and_((1 << (64 - shift)) - 1)


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _splitmix_int(x: int) -> int:
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)
