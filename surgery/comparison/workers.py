"""Threads that split one tensor's work by element ranges: `preadv` and numpy release the GIL, so a
diff uses every core while the report's logic stays sequential. Each thread owns a BlockReader
(its own buffers and file descriptors)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from surgery.checkpoint.blocks import BlockReader

T = TypeVar("T")


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class Workers:
    """A thread pool whose tasks receive the running thread's BlockReader."""

    def __init__(self, count: int | None = None) -> None:
        self.count = count or min(available_cores(), 8)
        self._pool = ThreadPoolExecutor(self.count, thread_name_prefix="surgery-diff")
        self._local = threading.local()
        self._readers: list[BlockReader] = []
        self._lock = threading.Lock()

    def reader(self) -> BlockReader:
        """The calling thread's reader."""
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._local.reader = BlockReader()
            with self._lock:
                self._readers.append(reader)
        return reader

    def submit(self, work: Callable[[BlockReader], T]) -> Future[T]:
        """`work(reader)` on a pool thread, with that thread's reader."""
        return self._pool.submit(lambda: work(self.reader()))

    def ranges(self, total: int, part: int, work: Callable[[BlockReader, int, int], T]) -> list[Future[T]]:
        """`work(reader, start, stop)` for consecutive ranges of at most `part` elements covering [0, total)."""
        return [self.submit(lambda reader, s=start: work(reader, s, min(total, s + part)))
                for start in range(0, max(total, 1), part)]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for reader in self._readers:
            reader.close()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
