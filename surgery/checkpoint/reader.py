"""Open a Hugging Face checkpoint folder by its headers alone.

Nothing here reads tensor data: the planner works from names, dtypes, shapes and byte ranges, and
the executor copies those byte ranges or streams them block by block (recipe/stream.py).
"""

from __future__ import annotations

import hashlib
import json
import stat
import struct
from dataclasses import dataclass, field
from functools import cached_property
from operator import attrgetter
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError, one_line

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_JSON_BYTES = 64 * 1024 * 1024  # far above any config, index or record; a bound before reading
# Weight files that are pickles: refused, never loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

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
    """Parse a safetensors header (8-byte little-endian length, then JSON) without touching data.

    The header is untrusted input: every field is checked, so that the byte ranges handed to the
    planner and executor are exactly the ones safetensors itself would accept (it rejects the same
    files), and any bad byte content is one SurgeryError, never another exception.
    """
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
        raise SurgeryError(f"{path}: cannot read ({e.strerror or e})") from e
    if len(raw) != header_len:  # the file shrank under us
        raise SurgeryError(f"{path}: corrupt safetensors header (truncated shard?)")
    header = _parse_json(raw, f"{path}: corrupt safetensors header", "re-download or re-save the shard")
    if not isinstance(header, dict):
        raise SurgeryError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(_is_text(k) and _is_text(v) for k, v in metadata.items()):
        raise SurgeryError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    data_start = 8 + header_len
    tensors = {name: _tensor_info(path, name, entry, data_start, size) for name, entry in header.items()}
    _check_coverage(path, tensors, data_start, size)
    digest = hashlib.sha256(prefix + raw).hexdigest()
    return ShardHeader(path=path, sha256=digest, metadata=metadata, tensors=tensors)


def _is_text(value: object) -> bool:
    """A str that is valid Unicode (Python's json accepts lone surrogates; safetensors does not)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_count(value: object) -> bool:
    """A JSON integer that fits safetensors' usize (bools are ints in Python; 2.0 is not a count)."""
    return type(value) is int and 0 <= value < 2**64


def _tensor_info(path: Path, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    """One header entry, checked field by field: the message names the tensor and the bad field."""
    where = f"{path}: tensor {_short(name)}"
    if not _is_text(name):
        raise SurgeryError(f"{where}: the name is not valid Unicode (corrupt header)")
    if not isinstance(entry, dict):
        raise SurgeryError(f"{where}: header entry is not an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise SurgeryError(f"{where} has unsupported dtype {_short(dtype)} (known: {', '.join(DTYPE_SIZES)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise SurgeryError(f"{where}: shape {_short(shape)} is not a list of non-negative integers (corrupt header)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise SurgeryError(
            f"{where}: data_offsets {_short(offsets)} is not [begin, end] with 0 <= begin <= end (corrupt header)"
        )
    begin, end = offsets
    if data_start + end > size:
        raise SurgeryError(
            f"{where}: byte range [{begin}, {end}) lies past the end of the file's "
            f"{size - data_start}-byte data area (truncated shard? re-download it)"
        )
    # Capped: a header of huge dimensions must not make us multiply megadigit integers.
    if _numel_capped(shape, end - begin) * DTYPE_SIZES[dtype] != end - begin:
        raise SurgeryError(
            f"{where}: byte range [{begin}, {end}) holds {end - begin} bytes, which does not match shape "
            f"{_short(shape)} of {dtype} ({DTYPE_SIZES[dtype]} bytes each) (corrupt header)"
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end)


def _numel_capped(shape: list[int], cap: int) -> int:
    """numel(shape), or some value above `cap` as soon as the product exceeds it."""
    if 0 in shape:
        return 0
    n = 1
    for d in shape:
        n *= d
        if n > cap:
            return cap + 1
    return n


def _short(value: object, limit: int = 80) -> str:
    """repr for an error line: escapes newlines, and a megabyte of header stays out of the message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_coverage(path: Path, tensors: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """The tensors tile the data area exactly: no overlap, no gap, nothing after the last one.

    This is safetensors' own rule (its `validate` sorts by offsets and requires each tensor to start
    where the previous ended and the last to end at the end of the file: `MetadataIncompleteBuffer`),
    so a file we accept is one `safe_open` accepts. Sorting keeps it O(n log n) for thousands of tensors.
    """
    at, previous = data_start, None
    for info in sorted(tensors.values(), key=attrgetter("start", "end")):
        if info.start < at:
            raise SurgeryError(f"{path}: tensors {_short(previous)} and {_short(info.name)} overlap in the data area (corrupt header)")
        if info.start > at:
            after = f"after tensor {_short(previous)}" if previous is not None else "at the start of the data area"
            raise SurgeryError(
                f"{path}: {info.start - at} unused bytes {after}, before tensor {_short(info.name)} "
                "(not a valid safetensors file: the tensors must cover the data area)"
            )
        at, previous = info.end, info.name
    if at != size:
        raise SurgeryError(
            f"{path}: {size - at} trailing bytes after the last tensor (not a valid safetensors file; "
            "re-download or re-save the shard)"
        )


def _parse_json(raw: bytes, what: str, fix: str) -> object:
    """Strict UTF-8 JSON; a parse error of any kind (deep nesting, huge numbers) is one line."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SurgeryError(f"{what} (not UTF-8 at byte {e.start}; {fix})") from None
    except RecursionError:
        raise SurgeryError(f"{what} (JSON nested too deeply; {fix})") from None
    except ValueError as e:  # JSONDecodeError, or an integer with too many digits
        raise SurgeryError(f"{what} (not valid JSON: {one_line(str(e))}; {fix})") from None



def is_plain_name(name: str) -> bool:
    """A file name that stays in its folder: not empty, `.`, `..`, a path, or unprintable."""
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and name.isprintable()


def regular_file(path: Path, fix: str) -> Path:
    """`path`, refused unless it is a regular file: a FIFO would block the read forever, a device
    (a link to /dev/zero) never end it."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise SurgeryError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise SurgeryError(f"{path}: not a regular file (a FIFO, socket, device or folder); {fix}")
    return path


def read_json_file(path: Path, what: str, fix: str) -> object:
    """A JSON file read with bounds: a regular file, at most MAX_JSON_BYTES, strict UTF-8 JSON."""
    regular_file(path, fix)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise SurgeryError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise SurgeryError(f"{path}: larger than {MAX_JSON_BYTES >> 20} MiB, more than any {what} holds; {fix}")
    return _parse_json(raw, f"{path}: not a valid {what}", fix)


@dataclass
class Checkpoint:
    """A checkpoint folder: config, shards, and every tensor's location, from headers only."""

    path: Path
    config: dict[str, Any]
    shards: list[ShardHeader]
    tensors: dict[str, TensorInfo] = field(repr=False)

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """Read config, index and every shard header; any inconsistency is one SurgeryError."""
        folder = Path(path)
        try:
            return cls._open(folder)
        except OSError as e:  # unreadable folder, name too long, permissions: still one line
            raise SurgeryError(f"{folder}: cannot read ({e.strerror or e})") from e

    @classmethod
    def _open(cls, folder: Path) -> Checkpoint:
        if not folder.exists():
            raise SurgeryError(f"model folder {folder} does not exist")
        if not folder.is_dir():
            raise SurgeryError(f"model {folder} is not a folder (expected config.json and *.safetensors)")
        config = read_config(folder)
        index_path = folder / INDEX_NAME
        weight_map = _read_index(index_path) if index_path.exists() else None
        shards = [read_shard_header(p) for p in _shard_files(folder, weight_map)]
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            for name, info in shard.tensors.items():
                if name in tensors:
                    raise SurgeryError(
                        f"{folder}: tensor {name!r} appears in both {tensors[name].file.name} and {shard.path.name}"
                    )
                tensors[name] = info
        if weight_map is not None:
            _check_index_matches(index_path, weight_map, tensors)
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


def inside_model(folder: Path, path: Path) -> Path:
    """`path`, a file of model folder `folder`, refused where it is a link leading out of the folder:
    surgery copies and uploads what it reads, and a link to a token file must never travel with a model.
    A Hub cache snapshot's links into its own repo's `blobs/` are the one exception."""
    try:
        target, root = path.resolve(), folder.resolve()
    except RuntimeError:  # a symlink loop
        raise SurgeryError(f"{path}: cannot resolve it (a link on the way leads back to itself)") from None
    if target.is_relative_to(root):
        return path
    if root.parent.name == "snapshots" and target.is_relative_to(root.parent.parent / "blobs"):
        return path
    raise SurgeryError(f"{path}: is a link to {target}, outside the model folder; surgery never reads or copies a file "
                       "through a link that leaves the model folder: copy the file in, or remove the link")


def read_config(folder: Path) -> dict[str, Any]:
    """config.json as a dict: the architecture, layer count and everything the planner reads."""
    config_path = folder / "config.json"
    if not config_path.exists():
        raise SurgeryError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    inside_model(folder, config_path)
    config = read_json_file(config_path, "config", "fix or re-download config.json")
    if not isinstance(config, dict):
        raise SurgeryError(f"{config_path}: expected a JSON object, found a JSON {type(config).__name__}")
    return config


def _read_index(index_path: Path) -> dict[str, str]:
    """The index's weight_map (tensor name -> shard file name), checked before any shard is opened.

    Shard names must be plain file names: an index is untrusted input and must not make us read
    outside the model folder (`../`, absolute paths, sub-folders).
    """
    index = read_json_file(index_path, "index", "fix it or re-download it")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise SurgeryError(f"{index_path}: not a valid index (needs a 'weight_map' object of tensor name -> shard file)")
    for name, file in weight_map.items():
        if not _is_text(name) or not _is_text(file):
            raise SurgeryError(f"{index_path}: weight_map entry {_short(name)}: {_short(file)} is not string -> string")
        if not is_plain_name(file):
            raise SurgeryError(
                f"{index_path}: shard {_short(file, 200)} (for tensor {_short(name)}) is not a plain file name in the "
                "model folder; an index may only name files next to it"
            )
    return weight_map


def _shard_files(folder: Path, weight_map: dict[str, str] | None) -> list[Path]:
    """The shards to read: those the index names, else model.safetensors, else every *.safetensors.

    Files the index does not name are ignored, as transformers ignores them.
    """
    if weight_map is not None and (folder / SINGLE_NAME).exists():
        raise SurgeryError(f"{folder}: has both {SINGLE_NAME} and {INDEX_NAME}; transformers reads {SINGLE_NAME}, vLLM "
                           "the shards the index names: remove whichever is stale")
    if weight_map is not None:
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise SurgeryError(f"{folder / INDEX_NAME}: names shard {missing[0]} which does not exist in {folder}")
        return [folder / n for n in names]
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    found = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if found:
        return found
    if any(any(folder.glob(f"*{suffix}")) for suffix in PICKLE_SUFFIXES):
        raise SurgeryError(
            f"{folder}: only pickle weights ({'/'.join(PICKLE_SUFFIXES)}) found; surgery never loads pickle. "
            "Convert them first: load with transformers and call save_pretrained(..., safe_serialization=True)"
        )
    raise SurgeryError(f"{folder}: no *.safetensors weights found")


def _check_index_matches(index_path: Path, weight_map: dict[str, str], tensors: dict[str, TensorInfo]) -> None:
    """Every tensor the index names is in the shard it names.

    Tensors present in a shard but absent from the index are kept, not refused: transformers
    (5.x `_load_pretrained_model`) loads every tensor of every shard the index lists, so they are
    part of the model as users load it, and a copy must keep them.
    """
    for name, file in weight_map.items():
        info = tensors.get(name)
        if info is None:
            raise SurgeryError(f"{index_path}: names tensor {_short(name)} which is not in shard {file}")
        if info.file.name != file:
            raise SurgeryError(f"{index_path}: says {_short(name)} is in {file} but it is in {info.file.name}")
