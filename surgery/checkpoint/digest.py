"""What records and checks of whole files compare: a shard's BLAKE3 digest (a cryptographic hash fast
enough to run beside the write without slowing it), a file's sha256 where the Hub's own hash is what
is compared, and its cheap stamp (size and modification time) where rereading it is too dear."""

from __future__ import annotations

from pathlib import Path

from blake3 import blake3
from huggingface_hub.utils.sha import sha_fileobj

SHARD_DIGEST = "blake3"  # the name records give the digest of every output shard


def file_stamp(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_size, status.st_mtime_ns


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return sha_fileobj(f).hex()


def shard_hash() -> blake3:
    """A digest to feed a shard's bytes as they are written."""
    return blake3()


def file_blake3(path: Path) -> str:
    """A whole file's BLAKE3 digest, read through a memory map on one thread (callers hash files in parallel;
    blake3's own thread pool would not survive a fork)."""
    return blake3().update_mmap(path).hexdigest()
