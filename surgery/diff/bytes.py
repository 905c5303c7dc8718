"""Byte-level identity of tensors, streamed in small chunks: never decoded, never mapped whole, so
memory stays flat whatever the model size."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

from surgery.checkpoint.reader import TensorInfo

CHUNK = 8 << 20
SAMPLE = 4096


class ByteComparer:
    """Reads tensors' raw bytes from open files; answers identity questions once per pair."""

    def __init__(self) -> None:
        self._files: dict[Path, BinaryIO] = {}
        self._identical: dict[frozenset[TensorInfo], bool] = {}
        self._fingerprints: dict[TensorInfo, str] = {}
        self._buffers = (bytearray(CHUNK), bytearray(CHUNK))  # reused: no page faults per chunk

    def _handle(self, info: TensorInfo) -> BinaryIO:
        handle = self._files.get(info.file)
        if handle is None:
            handle = self._files[info.file] = open(info.file, "rb")
        return handle

    def read(self, info: TensorInfo, offset: int, size: int) -> bytes:
        handle = self._handle(info)
        handle.seek(info.start + offset)
        return handle.read(size)

    def _chunks_equal(self, a: TensorInfo, b: TensorInfo, offset: int, size: int) -> bool:
        if size < CHUNK:
            return self.read(a, offset, size) == self.read(b, offset, size)
        for info, buffer in zip((a, b), self._buffers):
            handle = self._handle(info)
            handle.seek(info.start + offset)
            handle.readinto(buffer)
        return self._buffers[0] == self._buffers[1]  # memcmp, no copies

    def fingerprint(self, info: TensorInfo) -> str:
        """A cheap identity hint: dtype, shape and a hash of three 4 KiB samples (start, middle, end).
        Equal fingerprints only nominate candidates; `identical` confirms them byte for byte."""
        if info not in self._fingerprints:
            digest = hashlib.blake2b(f"{info.dtype}{info.shape}".encode(), digest_size=16)
            size = info.nbytes
            for offset in sorted({0, max(0, size // 2 - SAMPLE // 2), max(0, size - SAMPLE)}):
                digest.update(self.read(info, offset, min(SAMPLE, size)))
            self._fingerprints[info] = digest.hexdigest()
        return self._fingerprints[info]

    def identical(self, a: TensorInfo, b: TensorInfo) -> bool:
        """Byte-for-byte equality, chunk by chunk, stopping at the first difference."""
        key = frozenset((a, b))
        if key not in self._identical:
            same = a.dtype == b.dtype and a.shape == b.shape and self.fingerprint(a) == self.fingerprint(b)
            offset = 0
            while same and offset < a.nbytes:
                size = min(CHUNK, a.nbytes - offset)
                same = self._chunks_equal(a, b, offset, size)
                offset += size
            self._identical[key] = same
        return self._identical[key]

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
