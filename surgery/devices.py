"""Which device computes: one rule for every command that takes --device."""

from __future__ import annotations

import re

from surgery.errors import SurgeryError

DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N"


def check_device_name(device: str) -> None:
    """Reject a device name that can never work, without importing torch."""
    if device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise SurgeryError(f"unknown device {device!r}; use {DEVICE_HELP}")


def resolve_device(device: str) -> str:
    """`auto` is CUDA when present; asking for CUDA where there is none is an error, not a fallback."""
    check_device_name(device)
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise SurgeryError(f"--device {device}: no CUDA device is available here; use --device cpu or auto")
    return device
