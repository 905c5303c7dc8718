"""Which device computes: one rule for every command that takes --device."""

from __future__ import annotations

import re
from pathlib import Path

from surgery.errors import SurgeryError

DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N"


def check_device_name(device: str) -> None:
    """Reject a device name that can never work, without importing torch."""
    if device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise SurgeryError(f"unknown device {device!r}; use {DEVICE_HELP}")


def resolve_device(device: str) -> str:
    """`auto` is CUDA when present; asking for CUDA where there is none is an error, not a fallback."""
    check_device_name(device)
    if device == "cpu" or (device == "auto" and not _may_have_cuda()):
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise SurgeryError(f"--device {device}: no CUDA device is available here; use --device cpu or auto")
    return device


def _may_have_cuda() -> bool:
    """False when torch surely sees no GPU, found without importing it (a second at start-up): a CPU build
    of torch, or no GPU device node (NVIDIA's, ROCm's, WSL's) on the machine."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        if version("torch").endswith("+cpu"):
            return False
    except PackageNotFoundError:
        return False
    return any(Path(node).exists() for node in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")) \
        or not Path("/dev").is_dir()  # not a Linux-like /dev: ask torch
