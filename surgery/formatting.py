"""Human-readable sizes, for every message and table that shows one, and sizes read from users."""

from __future__ import annotations

from surgery.errors import SurgeryError


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def byte_size(size: int | str, what: str, least: int = 1000) -> int:
    """A size in bytes: a count, or a number with a unit (5GB, 500MB as huggingface_hub reads them; 5GiB,
    512MiB in powers of 1024), at least `least`; anything else is one line naming `what`."""
    from huggingface_hub.serialization._base import parse_size_to_int

    value = str(size).strip()
    if value[-1:].upper() == "B" and value[:-1].strip().isdigit():  # a count of bytes with its unit: 2097152B
        value = value[:-1].strip()
    binary = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}
    try:
        unit = next((u for u in binary if value.upper().endswith(u)), None)
        found = int(float(value[:-3]) * binary[unit]) if unit else int(value) if value.isdigit() else parse_size_to_int(value)
    except (ValueError, OverflowError):  # not a number, or inf
        raise SurgeryError(f"{what} {size}: not a size; write bytes or a number with a unit, e.g. 5GB, "
                           "500MB, 4GiB") from None
    if found < least:
        at_least = f"{least >> 20}MiB" if least % (1 << 20) == 0 else f"{least // 1000}KB" if least % 1000 == 0 else least
        raise SurgeryError(f"{what} {size}: must be at least {at_least}; e.g. 5GB, 500MB")
    return found


def memory_bytes(size: str, what: str = "max_memory") -> int:
    """A memory cap (`--max-memory`, an evaluate section's `max_memory`): at least 1MiB."""
    return byte_size(size, what, least=1 << 20)
