"""What records and checks of whole files compare: a file's sha256, as the Hub computes it, and its
cheap stamp (size and modification time) where rereading it is too dear."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub.utils.sha import sha_fileobj


def file_stamp(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_size, status.st_mtime_ns


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return sha_fileobj(f).hex()
