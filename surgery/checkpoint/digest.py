"""sha256 of a file, as the Hub computes it: what records and checks of whole files compare."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub.utils.sha import sha_fileobj


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return sha_fileobj(f).hex()
