"""Write safetensors shards tensor by tensor, with every header fixed before any data.

The writer knows shard entries, not how tensors are made: each entry is a name, dtype and shape,
and either a byte range of a source file to copy or a producer of its bytes. Shard boundaries and
offsets come from the sizes alone, so each shard is one header write followed by a sequential
stream: copied tensors go source-file to output-file in the kernel (`copy_file_range`), produced
ones arrive block by block. Peak memory is one produced block.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from huggingface_hub.serialization import split_state_dict_into_shards_factory

from surgery.checkpoint.reader import DTYPE_SIZES, INDEX_NAME, SINGLE_NAME, TensorInfo, numel
from surgery.formatting import byte_size

ALIGNMENT = 8
_KERNEL_COPY = hasattr(os, "copy_file_range")
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}
COPY_CHUNK = 1 << 30


class Sized(Protocol):
    """What shard planning and headers need of a tensor: its dtype, shape and size."""

    @property
    def dtype(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def nbytes(self) -> int: ...


@dataclass(frozen=True)
class ShardEntry:
    """One tensor of a shard: copied from `source`'s byte range, or made by `produce` block by block."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorInfo | None = None
    produce: Callable[[], Iterable[memoryview]] | None = None

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class ShardPlan:
    """One output file: its name and its tensors in on-disk order."""

    filename: str
    names: list[str]


def shard_size_bytes(size: int | str) -> int:
    """A shard size in bytes (see `byte_size`); at least 1KB, so a typo never splits a model into one file per
    tensor."""
    return byte_size(size, "shard size")


def plan_shards(tensors: Mapping[str, Sized], max_shard_size: int | str) -> list[ShardPlan]:
    """Split tensors into shards the way transformers names them (model-0000i-of-0000n.safetensors).

    Within a shard, wider dtypes come first so every tensor starts aligned to its element size.
    """
    split = split_state_dict_into_shards_factory(
        dict(tensors),
        get_storage_size=lambda r: r.nbytes,
        get_storage_id=lambda r: None,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=shard_size_bytes(max_shard_size),
    )
    shards = []
    for filename, names in split.filename_to_tensors.items():
        ordered = sorted(names, key=lambda n: -DTYPE_SIZES[tensors[n].dtype])  # stable: keeps the given order
        shards.append(ShardPlan(filename=filename if split.is_sharded else SINGLE_NAME, names=ordered))
    return shards


def shard_header(tensors: Mapping[str, Sized], names: list[str]) -> bytes:
    """The 8-byte length plus JSON header, padded with spaces to an 8-byte boundary."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        tensor = tensors[name]
        header[name] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % ALIGNMENT)
    return struct.pack("<Q", len(raw)) + raw


def write_shard(path: Path, entries: list[ShardEntry], on_tensor: Callable[[int], None] = lambda n: None) -> None:
    """Stream one shard: header, then each entry's bytes in order. `on_tensor` hears of each tensor
    once its bytes are in the file (a reader of the file sees them); syncing is the caller's."""
    with ExitStack() as stack, open(path, "wb") as out, ThreadPoolExecutor(1) as writer:
        sources: dict[Path, BinaryIO] = {}
        out.write(shard_header({entry.name: entry for entry in entries}, [entry.name for entry in entries]))
        out.flush()
        for entry in entries:
            if entry.source is not None:
                info = entry.source
                if info.file not in sources:
                    sources[info.file] = stack.enter_context(open(info.file, "rb"))
                _copy_range(sources[info.file], out, info.start, info.nbytes)
            else:
                assert entry.produce is not None
                written = _write_overlapped(out, entry.produce(), writer)
                if written != entry.nbytes:
                    raise RuntimeError(f"{entry.name}: produced {written} bytes, expected {entry.nbytes}")
            on_tensor(entry.nbytes)


def _write_overlapped(out: BinaryIO, blocks: Iterable[memoryview], writer: ThreadPoolExecutor) -> int:
    """Write each block while the next is computed (file writes release the GIL). One write is in
    flight at a time and it ends before the next block is asked for, so a producer that reuses two
    buffers in turn never overwrites bytes still being written."""
    pending: Future[int | None] | None = None
    written = 0
    for block in blocks:
        if pending is not None:
            pending.result()
        pending = writer.submit(out.write, block)
        written += len(block)
    if pending is not None:
        pending.result()
    out.flush()
    return written


def write_index(folder: Path, shards: list[ShardPlan], total_size: int) -> None:
    """model.safetensors.index.json, only when there is more than one shard (as transformers does)."""
    if len(shards) <= 1:
        return
    weight_map = {name: shard.filename for shard in shards for name in shard.names}
    index = {
        "metadata": {"total_size": total_size},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _copy_range(src: BinaryIO, dst: BinaryIO, offset: int, count: int) -> None:
    """Copy bytes between files inside the kernel where possible, else through a bounded buffer."""
    done = 0
    if _KERNEL_COPY:
        try:
            while done < count:
                n = os.copy_file_range(src.fileno(), dst.fileno(), min(count - done, COPY_CHUNK), offset + done)
                if n == 0:
                    raise OSError(f"{src.name}: unexpected end of file")
                done += n
            return
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
    for chunk in _read_chunks(src, offset + done, count - done):
        dst.write(chunk)
    dst.flush()


def _read_chunks(src: BinaryIO, offset: int, count: int, chunk: int = 16 << 20) -> Iterator[bytes]:
    src.seek(offset)
    while count > 0:
        data = src.read(min(chunk, count))
        if not data:
            raise OSError(f"{src.name}: unexpected end of file")
        count -= len(data)
        yield data
