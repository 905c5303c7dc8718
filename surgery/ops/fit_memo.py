"""Fits remembered between `check` and `apply`: a data-dependent fit (aTLAS coefficients, bits' layer
scores) is a function of its step, its input folders' files, its texts, where it runs and the library
versions, so a second run with all of those unchanged reads what the first found instead of fitting
again. Kept in `$SURGERY_CACHE/fits` (default ~/.cache/surgery/fits); a cache that cannot be read or
written is skipped, never an error."""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from surgery.checkpoint.digest import file_stamp
from surgery.errors import SurgeryError
from surgery.user_cache import cache_home, read_record, store_record

T = TypeVar("T")


def folder_stamp(folder: Path) -> list[tuple[str, int, int]]:
    """Every regular file of a model folder by name, size and modification time: weights, config and
    tokenizer, whatever a fit reads."""
    return sorted((p.name, *file_stamp(p)) for p in folder.iterdir() if p.is_file())


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def finite_numbers(value: Any, count: int) -> bool:
    """Whether a remembered value is a list of `count` finite numbers (a check for `valid`)."""
    return (isinstance(value, list) and len(value) == count
            and all(isinstance(x, float | int) and not isinstance(x, bool) and math.isfinite(x) for x in value))


def remembered(kind: str, key: dict[str, Any], fit: Callable[[], T], valid: Callable[[Any], bool],
               log: Callable[[str], None]) -> T:
    """`fit()`, or what it returned before for the same `key` (JSON-able values only) when that still
    passes `valid` (a damaged or foreign file is fitted afresh, not trusted)."""
    digest = _digest(kind, key)
    path = cache_home() / "fits" / f"{kind}-{digest[:40]}.json"
    value = read_record(path, digest)
    if value is not None and valid(value):
        log(f"{kind}: the same fit on the same inputs ran before; reusing it ({path})")
        return value
    value = fit()
    store_record(path, digest, value)
    return value


def fit_folder(kind: str, key: dict[str, Any]) -> Path:
    """The folder for a fit too large for JSON (GPTQ's integers), named by the same digest `remembered`
    uses; what the fit writes there is its own to check."""
    return cache_home() / "fits" / f"{kind}-{_digest(kind, key)[:40]}"


def save_fit_tensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str], failing: str, room: str) -> None:
    """A fit's tensors written whole then renamed into place (never half a file); a write that fails is one line,
    `{failing} to FOLDER (why)`, saying the fits cache needs room for `room`."""
    from safetensors.torch import save_file

    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, staging, metadata=metadata)
        os.replace(staging, path)
    except OSError as e:
        staging.unlink(missing_ok=True)
        raise SurgeryError(f"{failing} to {path.parent} ({e.strerror}); set SURGERY_CACHE to a writable folder with "
                           f"room for {room}") from None


def _digest(kind: str, key: dict[str, Any]) -> str:
    import torch
    import transformers

    from surgery.version import __version__

    versions = {"surgery": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    return hashlib.sha256(json.dumps([kind, key, versions], sort_keys=True, default=str).encode()).hexdigest()
