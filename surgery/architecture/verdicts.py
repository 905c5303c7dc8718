"""Structure checks remembered between runs. A check's verdict is a function of the output's and the
sources' configs, tensor names and shapes, the layer map, torch's and transformers' versions and the
checking code itself, so a later run with all of those unchanged (`check` then `apply`, `apply --force`
while iterating) reuses a passing verdict instead of importing transformers' modeling code again, the
3-4 s that dominate a chain edit of a small model. Kept in `$SURGERY_CACHE/verified`; refusals are not
kept (they are checked afresh, so the message always reflects the code that gives it)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from surgery.recipe.view import ModelView
from surgery.user_cache import cache_home, read_record, store_record
from surgery.version import __version__

_CHECKING_CODE = ("structure.py", "verify.py", "verdicts.py")


def verdict_key(view: ModelView, sources: Mapping[str, ModelView]) -> str:
    """Everything the check of `view` against its sources reads, digested."""
    code = hashlib.sha256(b"".join((Path(__file__).parent / name).read_bytes() for name in _CHECKING_CODE))
    labels = sorted({layer.origin.model for layer in view.layers})
    inputs = {
        "versions": {"surgery": __version__, **{name: _installed(name) for name in ("torch", "transformers")}},
        "code": code.hexdigest(),
        "output": _described(view),
        "origins": [[layer.origin.model, layer.origin.index] for layer in view.layers],
        "sources": {label: _described(sources[label]) for label in labels},
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def passed_before(key: str) -> str | None:
    """The note of a check that passed on these inputs before, or None."""
    note = read_record(_path(key), key)
    return note if isinstance(note, str) else None


def remember_pass(key: str, note: str) -> None:
    store_record(_path(key), key, note)


def _described(view: ModelView) -> dict[str, Any]:
    return {"config": view.config(), "source_config": view.source.config, "prefix": view.layout.prefix,
            "shapes": sorted((name, list(r.shape)) for name, r in view.tensors().items())}


def _installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _path(key: str) -> Path:
    return cache_home() / "verified" / f"{key[:40]}.json"
