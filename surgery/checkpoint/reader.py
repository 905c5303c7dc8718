"""Open a Hugging Face checkpoint folder by its headers alone.

Nothing here reads tensor data until asked: the planner works from names, dtypes, shapes and
byte ranges, and the executor copies those byte ranges or decodes single tensors lazily.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgery.errors import SurgeryError

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024

# Bytes per element of each safetensors dtype.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def numel(shape: tuple[int, ...]) -> int:
    """Number of elements of a tensor of this shape (1 for a scalar)."""
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte range, dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute offset of the first data byte in `file`
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class ShardHeader:
    """One parsed safetensors header."""

    path: Path
    sha256: str
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]


def read_shard_header(path: Path) -> ShardHeader:
    """Parse a safetensors header (8-byte little-endian length, then JSON) without touching data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SurgeryError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise SurgeryError(
                    f"{path}: corrupt safetensors header (declares {header_len} header bytes in a {size}-byte file)"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise SurgeryError(f"{path}: cannot read ({e.strerror})") from e
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SurgeryError(f"{path}: corrupt safetensors header (not JSON: {e})") from e
    if not isinstance(header, dict):
        raise SurgeryError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise SurgeryError(f"{path}: corrupt header entry for tensor {name!r}") from e
        if dtype not in DTYPE_SIZES:
            raise SurgeryError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if end - begin != numel(shape) * DTYPE_SIZES[dtype] or begin < 0 or data_start + end > size:
            raise SurgeryError(
                f"{path}: tensor {name!r} byte range [{begin}, {end}) does not match its shape {list(shape)} "
                f"and dtype {dtype}, or lies past the end of the file (truncated shard?)"
            )
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end)
    digest = hashlib.sha256(prefix + raw).hexdigest()
    return ShardHeader(path=path, sha256=digest, metadata=metadata, tensors=tensors)


@dataclass
class Checkpoint:
    """A checkpoint folder: config, shards, and every tensor's location, from headers only."""

    path: Path
    config: dict[str, Any]
    shards: list[ShardHeader]
    tensors: dict[str, TensorInfo] = field(repr=False)

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        folder = Path(path)
        if not folder.exists():
            raise SurgeryError(f"model folder {folder} does not exist")
        if not folder.is_dir():
            raise SurgeryError(f"model {folder} is not a folder (expected config.json and *.safetensors)")
        config = read_config(folder)
        shards = [read_shard_header(p) for p in _shard_files(folder)]
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            for name, info in shard.tensors.items():
                if name in tensors:
                    raise SurgeryError(
                        f"{folder}: tensor {name!r} appears in both {tensors[name].file.name} and {shard.path.name}"
                    )
                tensors[name] = info
        index_path = folder / INDEX_NAME
        if index_path.exists():
            _check_index_matches(folder, index_path, tensors)
        if not tensors:
            raise SurgeryError(f"{folder}: the checkpoint holds no tensors")
        return cls(path=folder, config=config, shards=shards, tensors=tensors)

    @cached_property
    def header_hashes(self) -> dict[str, str]:
        """sha256 of each shard's header: identifies the exact source in provenance records."""
        return {s.path.name: s.sha256 for s in self.shards}

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def load(self, name: str) -> torch.Tensor:
        """Decode one tensor (memory-mapped by safetensors; only this tensor is materialised)."""
        from safetensors import safe_open

        info = self.tensors[name]
        with safe_open(info.file, framework="pt") as f:
            return f.get_tensor(name)


def read_config(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.exists():
        raise SurgeryError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SurgeryError(f"{config_path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise SurgeryError(f"{config_path}: expected a JSON object")
    return config


def _shard_files(folder: Path) -> list[Path]:
    index_path = folder / INDEX_NAME
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise SurgeryError(f"{index_path}: not a valid index (needs a 'weight_map' object)") from e
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise SurgeryError(f"{index_path}: names shard {missing[0]} which does not exist in {folder}")
        return [folder / n for n in names]
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise SurgeryError(
            f"{folder}: only pickle weights (.bin/.pt) found; surgery never loads pickle. Convert them first: "
            "load with transformers and call save_pretrained(..., safe_serialization=True)"
        )
    raise SurgeryError(f"{folder}: no *.safetensors weights found")


def _check_index_matches(folder: Path, index_path: Path, tensors: dict[str, TensorInfo]) -> None:
    weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    for name, file in weight_map.items():
        info = tensors.get(name)
        if info is None:
            raise SurgeryError(f"{index_path}: names tensor {name!r} which is not in shard {file}")
        if info.file.name != file:
            raise SurgeryError(f"{index_path}: says {name!r} is in {file} but it is in {info.file.name}")
