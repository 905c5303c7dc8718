"""Read element ranges of tensors straight from their files into reused float32 buffers.

No memory map of whole files (its touched pages would count against the process) and no fresh
allocation per block (page faults cost more than the arithmetic): a block costs one `preadv` and
one decode. Shared by `diff` (comparing, in numpy: it must not pay torch's import) and the executor
(computing tensors block by block, in torch). diff's C kernel, which needs no decoded copy, reads a
short-lived memory map of just the range instead, saving the kernel's copy into a buffer.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from surgery.checkpoint.reader import DTYPE_SIZES, TensorInfo
from surgery.errors import SurgeryError

if TYPE_CHECKING:
    import torch

TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
STORED_DTYPES = {name: code for code, name in TORCH_DTYPES.items()}  # torch's name -> safetensors'
NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
                "U8": np.uint8, "BOOL": np.bool_}


def torch_dtype(dtype: str) -> torch.dtype:
    import torch

    return getattr(torch, TORCH_DTYPES[dtype])


def decode(raw: memoryview | np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    """Raw little-endian elements of a safetensors dtype widened into the float32 array `out`."""
    if dtype == "BF16":  # bfloat16 is the high half of a float32: widen, shift, reinterpret
        bits = out.view(np.uint32)
        np.copyto(bits, np.frombuffer(raw, dtype=np.uint16))
        np.left_shift(bits, 16, out=bits)
    elif dtype in NUMPY_DTYPES:
        np.copyto(out, np.frombuffer(raw, dtype=NUMPY_DTYPES[dtype]), casting="unsafe")
    elif out.size:  # float8: numpy has no such type
        import torch

        out[:] = torch.frombuffer(raw, dtype=torch_dtype(dtype)).float().numpy()
    return out


class BlockReader:
    """Slots (any hashable key) of reused buffers; a block read into a slot stays valid until that slot is reused."""

    def __init__(self) -> None:
        self._files: dict[Path, int] = {}  # raw descriptors: pread needs no seek and no Python buffer
        self._raw: dict[Hashable, bytearray] = {}
        self._floats: dict[Hashable, torch.Tensor] = {}  # torch is imported only when something must be decoded
        self._arrays: dict[Hashable, np.ndarray] = {}

    def _fd(self, path: Path) -> int:
        fd = self._files.get(path)
        if fd is None:
            fd = self._files[path] = os.open(path, os.O_RDONLY)
        return fd

    def raw(self, slot: Hashable, info: TensorInfo, start: int, stop: int) -> memoryview:
        """The bytes of elements [start, stop) of a tensor (flattened, row-major)."""
        fd = self._fd(info.file)
        size = DTYPE_SIZES[info.dtype]
        count = (stop - start) * size
        if len(self._raw.get(slot, b"")) < count:
            self._raw[slot] = bytearray(count)
        view = memoryview(self._raw[slot])[:count]
        done = 0
        while done < count:
            n = os.preadv(fd, [view[done:]], info.start + start * size + done)
            if n == 0:
                raise SurgeryError(f"{info.file}: unexpected end of file reading {info.name}")
            done += n
        return view

    @contextmanager
    def mapped(self, info: TensorInfo, start: int, stop: int, populate: bool = False) -> Iterator[memoryview]:
        """The bytes of elements [start, stop) (at least one), mapped from the file only while in use:
        resident pages stay bounded by the range, not the model. `populate` maps every page up front (one
        call instead of a fault per page, for a range that is read whole)."""
        size = DTYPE_SIZES[info.dtype]
        offset = info.start + start * size
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
            window = mmap.mmap(self._fd(info.file), offset + (stop - start) * size - base, flags=flags,
                               prot=mmap.PROT_READ, offset=base)
        except ValueError:  # shorter than its header says: changed since it was opened
            raise SurgeryError(f"{info.file}: unexpected end of file reading {info.name}") from None
        except OSError as e:  # a file system that cannot map files
            raise SurgeryError(f"{info.file}: cannot be memory-mapped to read {info.name} ({e.strerror})") from None
        with window, memoryview(window) as whole, whole[offset - base:] as view:
            yield view

    def floats(self, slot: Hashable, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of a tensor as float32 (the caller may overwrite them)."""
        import torch

        raw = self.raw(slot, info, start, stop)
        out = self.scratch(slot, stop - start)
        if len(raw):
            out.copy_(torch.frombuffer(raw, dtype=torch_dtype(info.dtype)))
        return out

    def array(self, slot: Hashable, info: TensorInfo, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of a tensor as a float32 numpy array (the caller may overwrite them)."""
        return decode(self.raw(slot, info, start, stop), info.dtype, self.array_scratch(slot, stop - start))

    def array_scratch(self, slot: Hashable, numel: int) -> np.ndarray:
        """Float32 numpy working buffer `slot` of `numel` elements."""
        buffer = self._arrays.get(slot)
        if buffer is None or buffer.size < numel:
            buffer = self._arrays[slot] = np.empty(numel, dtype=np.float32)
        return buffer[:numel]

    def scratch(self, slot: Hashable, numel: int) -> torch.Tensor:
        """Float32 working buffer `slot` of `numel` elements (slots of `floats` and spare ones share keys)."""
        import torch

        buffer = self._floats.get(slot)
        if buffer is None or buffer.numel() < numel:
            buffer = self._floats[slot] = torch.empty(numel)
        return buffer[:numel]

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __enter__(self) -> BlockReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
