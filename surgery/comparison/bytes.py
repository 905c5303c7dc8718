"""Byte-level identity of tensors, streamed in small chunks: never decoded, never mapped whole, so
memory stays flat whatever the model size."""

from __future__ import annotations

import hashlib

import numpy as np

from surgery.checkpoint.blocks import BlockReader
from surgery.checkpoint.reader import DTYPE_SIZES, TensorInfo, numel
from surgery.comparison.workers import Workers

CHUNK_BYTES = 1 << 20  # both chunks stay in cache while compared
PART_BYTES = 2 << 20  # one task of the pool
SAMPLE_ELEMENTS = 2048  # per sample: 4 KiB of bfloat16; in elements, so tensors of one shape sample alike whatever the dtype


def sample_ranges(info: TensorInfo) -> list[tuple[int, int]]:
    """The element ranges of the three samples (start, middle, end) that stand for a tensor."""
    count = numel(info.shape)
    starts = {0, max(0, count // 2 - SAMPLE_ELEMENTS // 2), max(0, count - SAMPLE_ELEMENTS)}
    return [(start, min(count, start + SAMPLE_ELEMENTS)) for start in sorted(starts)]


def bytes_equal(x: memoryview, y: memoryview) -> bool:
    """memcmp-speed equality of two buffers (comparing memoryviews directly goes element by element)."""
    if len(x) != len(y):
        return False
    words = len(x) // 8 * 8
    return bool(np.array_equal(np.frombuffer(x[:words], np.uint64), np.frombuffer(y[:words], np.uint64))) \
        and x[words:].tobytes() == y[words:].tobytes()


class ByteComparer:
    """Answers identity questions once per pair, each tensor's bytes split across the workers."""

    def __init__(self, workers: Workers) -> None:
        self.workers = workers
        self._identical: dict[frozenset[TensorInfo], bool] = {}
        self._samples: dict[TensorInfo, bytes] = {}
        self._fingerprints: dict[TensorInfo, str] = {}

    def samples(self, info: TensorInfo) -> bytes:
        """The raw bytes of the tensor's three samples, read once: fingerprints and the similarity
        sketches of diff/stats.py both use them."""
        if info not in self._samples:
            reader = self.workers.reader()
            self._samples[info] = b"".join(bytes(reader.raw(0, info, start, stop)) for start, stop in sample_ranges(info))
        return self._samples[info]

    def fingerprint(self, info: TensorInfo) -> str:
        """A cheap identity hint: dtype, shape and a hash of the samples. Equal fingerprints only
        nominate candidates; `identical` confirms them byte for byte."""
        if info not in self._fingerprints:
            digest = hashlib.blake2b(f"{info.dtype}{info.shape}".encode(), digest_size=16)
            digest.update(self.samples(info))
            self._fingerprints[info] = digest.hexdigest()
        return self._fingerprints[info]

    def identical(self, a: TensorInfo, b: TensorInfo) -> bool:
        """Byte-for-byte equality."""
        return self.all_identical([(a, b)])

    def all_identical(self, pairs: list[tuple[TensorInfo, TensorInfo]]) -> bool:
        """Whether every pair is byte-for-byte equal: the parts of all pairs run at once, and the
        first part that differs cancels the rest."""
        unknown = [(a, b) for a, b in pairs if frozenset((a, b)) not in self._identical]
        candidates = []
        for a, b in unknown:
            if a.dtype == b.dtype and a.shape == b.shape and self.fingerprint(a) == self.fingerprint(b):
                candidates.append((a, b))
            else:
                self._identical[frozenset((a, b))] = False
        if any(not self._identical[frozenset(pair)] for pair in pairs if frozenset(pair) in self._identical):
            return False
        queued = [(a, b, self.workers.ranges(a.nbytes // DTYPE_SIZES[a.dtype], PART_BYTES // DTYPE_SIZES[a.dtype],
                                             lambda reader, start, stop, a=a, b=b: _range_equal(reader, a, b, start, stop)))
                  for a, b in candidates]
        same = True
        for a, b, parts in queued:
            for part in parts:
                if not same:
                    part.cancel()
                elif not part.result():
                    same = False
                    self._identical[frozenset((a, b))] = False
            if same:
                self._identical[frozenset((a, b))] = True
        return same


def _range_equal(reader: BlockReader, a: TensorInfo, b: TensorInfo, start: int, stop: int) -> bool:
    step = max(1, CHUNK_BYTES // DTYPE_SIZES[a.dtype])
    for chunk in range(start, stop, step):
        end = min(stop, chunk + step)
        if not bytes_equal(reader.raw(0, a, chunk, end), reader.raw(1, b, chunk, end)):
            return False
    return True
