"""Run a recipe into an output folder, streaming, with bounded memory, appearing atomically.

Everything is written under a hidden sibling folder, fsynced, and renamed into place last, so an
interrupted run never leaves a folder under the output name that looks complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from surgery.checkpoint.reader import INDEX_NAME
from surgery.checkpoint.writer import write_index, write_shard
from surgery.devices import resolve_device
from surgery.errors import SurgeryError
from surgery.planner import Recipe
from surgery.card import write_card
from surgery.provenance import PROVENANCE_NAME, write_json
from surgery.streaming import RecipeStreamer

# Files of a source folder that describe its own weights or card, and so are not carried over.
NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
NOT_COPIED_NAMES = {"config.json", INDEX_NAME, "pytorch_model.bin.index.json", PROVENANCE_NAME, "README.md"}


def execute(
    recipe: Recipe,
    *,
    force: bool = False,
    max_shard_size: int | str = "5GB",
    device: str = "auto",
    fsync: bool = True,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> Path:
    """Write the recipe's output folder and return its path.

    With `fsync` every file and the folder reach the disk before the rename, so the output survives
    power loss too; without it the output is still atomic for a killed or crashed process.
    """
    out = recipe.output
    if out.exists() and not force:
        raise SurgeryError(f"output {out} already exists; pass --force to replace it")
    tensors = recipe.tensors
    shards = recipe.shards(max_shard_size)
    needs_compute = any(r.compute is not None for r in tensors.values())
    compute_device = resolve_device(device) if needs_compute or device != "auto" else "cpu"

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.surgery-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        streamer = RecipeStreamer(compute_device)
        try:
            for shard in shards:
                write_shard(staging / shard.filename, tensors, shard.names, streamer.encoded, on_bytes, fsync=fsync)
        finally:
            streamer.close()
        write_index(staging, shards, tensors)
        write_json(staging / "config.json", recipe.config)
        _copy_side_files(recipe.view.source.path, staging)
        for name, text in recipe.view.extra_files.items():
            (staging / name).write_text(text)
        provenance = recipe.provenance() | {"output_shards": [s.filename for s in shards]}
        write_json(staging / PROVENANCE_NAME, provenance)
        write_card(staging, out.name)
        if fsync:
            _fsync_dir(staging)
        _replace(staging, out)
        if fsync:
            _fsync_entries(out.parent)  # the rename itself
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _copy_side_files(source: Path, dest: Path) -> None:
    """Tokenizer, generation config, chat template, sentence-transformers modules...: every file of the
    source folder that is not weights (nor its card, config or index), subfolders included."""
    for item in sorted(source.rglob("*")):
        relative = item.relative_to(source)
        if any(part.startswith(".") for part in relative.parts) or not item.is_file():
            continue
        if (relative.name in NOT_COPIED_NAMES and len(relative.parts) == 1) or item.suffix in NOT_COPIED_SUFFIXES:
            continue
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(item, target)


def _fsync_dir(folder: Path) -> None:
    """fsync the small files (shards were fsynced as they closed), then the folder's entries."""
    for item in sorted(folder.rglob("*"), reverse=True):  # files before the folders holding them
        if item.is_dir():
            _fsync_entries(item)
        elif item.suffix != ".safetensors":
            with open(item, "rb") as f:
                os.fsync(f.fileno())
    _fsync_entries(folder)


def _fsync_entries(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(staging: Path, out: Path) -> None:
    """Rename the finished folder into place; an existing one (with --force) is moved aside first."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.surgery-old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    staging.rename(out)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
