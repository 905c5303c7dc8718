"""Run a recipe into an output folder, streaming, with bounded memory, appearing atomically.

Everything is written under a hidden sibling folder (output/partial.py), fsynced, and renamed into
place last, so an interrupted run never leaves a folder under the output name that looks complete;
the shards it finished are journaled with their hashes, and `--resume` continues from them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.checkpoint.digest import SHARD_DIGEST, file_stamp
from surgery.checkpoint.writer import ShardEntry, ShardPlan, shard_header, write_index, write_shard
from surgery.devices import resolve_device
from surgery.errors import Interrupted, SurgeryError
from surgery.formatting import human_bytes
from surgery.ops.vocabulary import TOKENIZER_FILES
from surgery.output.partial import (
    PartialOutput,
    ShardRecord,
    TrailingHash,
    journaled_bytes,
    partial_folder,
    remove_stale_lock,
)
from surgery.output.provenance import read_provenance, write_json, write_record
from surgery.output.side_files import copy_side_files, side_file_bytes
from surgery.plan.resolve import Recipe
from surgery.recipe.stream import RecipeStreamer

# Room asked for beyond the shards and side files: config, index, surgery.json, card, journal.
FREE_SPACE_MARGIN = 16 << 20
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class WriteFailed(SurgeryError):
    """The output could not be written (disk full, I/O error); its partial files are gone."""

    exit_code = 1


@dataclass(frozen=True)
class Written:
    """A finished output folder and what its surgery.json records."""

    folder: Path
    provenance: dict[str, Any]
    already_complete: bool = False  # --resume found it finished: nothing was written


def execute(
    recipe: Recipe,
    *,
    force: bool = False,
    resume: bool = False,
    max_shard_size: int | str = "5GB",
    device: str = "auto",
    fsync: bool = True,
    on_bytes: Callable[[int], None] = lambda n: None,
    log: Callable[[str], None] = lambda line: None,
) -> Written:
    """Write the recipe's output folder.

    With `fsync` every file and the folder reach the disk before the rename, so the output survives
    power loss too; without it the output is still atomic for a killed or crashed process. With
    `resume`, the shards an interrupted run of the same recipe finished are re-hashed and kept.
    """
    out = recipe.output
    tensors = recipe.tensors
    shards = recipe.shards(max_shard_size)
    needs_compute = any(r.compute is not None for r in tensors.values())
    compute_device = resolve_device(device) if needs_compute or device != "auto" else "cpu"
    headers = {shard.filename: shard_header(tensors, shard.names) for shard in shards}
    fingerprint = recipe_fingerprint(recipe, headers, compute_device)
    if out.exists() or out.is_symlink():
        existing = read_provenance(out) if resume and not partial_folder(out).exists() else None
        if existing is not None and existing.get("fingerprint") == fingerprint:
            remove_stale_lock(out)
            log(f"{out} is already complete: nothing to write")
            return Written(out, existing, already_complete=True)
        if not force:
            raise SurgeryError(f"output {out} already exists; pass --force to replace it")
    done = journaled_bytes(partial_folder(out), fingerprint) if resume else 0
    shard_bytes = sum(len(headers[s.filename]) + sum(tensors[n].nbytes for n in s.names) for s in shards)
    needed = shard_bytes - done + side_file_bytes(recipe.view.source.path)
    _check_free_space(out, needed)

    partial = PartialOutput.open(out, fingerprint, resume=resume, force=force, fsync=fsync)
    staging = partial.folder
    try:
        _write_shards(recipe, shards, headers, partial, compute_device, on_bytes, log)
        write_index(staging, shards, recipe.total_bytes)
        write_json(staging / "config.json", recipe.config)
        tokenizer = recipe.view.tokenizer_files
        copy_side_files(recipe.view.source.path, staging, TOKENIZER_FILES if tokenizer is not None else ())
        for name, data in (tokenizer or {}).items():
            _inside(staging, name).write_bytes(data)
        for name, data in recipe.view.extra_files.items():
            path = _inside(staging, name)
            path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        provenance = recipe.provenance() | {
            "output_shards": [s.filename for s in shards],
            f"output_{SHARD_DIGEST}": {name: record.digest for name, record in sorted(partial.shards.items())},
            "fingerprint": fingerprint,
        }
        write_record(staging, provenance, recipe.config, out)
        partial.publish(out)
    except KeyboardInterrupt:
        partial.release()
        raise Interrupted(
            f"interrupted; the {len(partial.shards)} finished shard(s) are kept in {staging}: "
            "run the same command with --resume to continue"
        ) from None
    except OSError as e:
        partial.discard()
        what = "no space left on the device" if e.errno in _DISK_FULL else e.strerror or str(e)
        raise WriteFailed(
            f"cannot write {out}: {what} ({e.filename or staging}); the partial output was removed"
            + ("; free some space or choose another --out" if e.errno in _DISK_FULL else "")
        ) from e
    except BaseException:
        partial.discard()
        raise
    return Written(out, provenance)


def recipe_fingerprint(recipe: Recipe, headers: dict[str, bytes], device: str) -> str:
    """What must match for a resumed run to finish the same bytes: the resolved plan, the sources'
    headers, the fits, the tool version, every shard header, the compute device, and each source
    shard's size and modification time (tensor bytes rewritten under an unchanged header change it)."""
    provenance = recipe.provenance()
    provenance.pop("plan_file", None)  # the same plan named from another folder is the same plan,
    provenance.pop("plan_text", None)  # and with other comments
    digests = {filename: hashlib.sha256(header).hexdigest() for filename, header in headers.items()}
    files = {str(shard.path.resolve()): file_stamp(shard.path) for checkpoint in recipe.sources.values()
             for shard in checkpoint.shards}
    text = json.dumps({"recipe": provenance, "shards": digests, "device": device, "source_files": files},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _write_shards(
    recipe: Recipe,
    shards: list[ShardPlan],
    headers: dict[str, bytes],
    partial: PartialOutput,
    device: str,
    on_bytes: Callable[[int], None],
    log: Callable[[str], None],
) -> None:
    """Write each shard not already verified, hashing it as it is written; sync a finished shard on a
    second thread while the next one is written, and journal it once both are done."""
    kept = [shard for shard in shards if partial.verified(shard.filename)]
    if kept:
        log(f"resuming: {len(kept)} of {len(shards)} shards verified and kept")
        for shard in kept:
            on_bytes(sum(recipe.tensors[name].nbytes for name in shard.names))
    pending: list[tuple[str, Future[ShardRecord]]] = []
    streamer = RecipeStreamer(device)
    with ThreadPoolExecutor(1, thread_name_prefix="surgery-finish") as finisher:
        try:
            for shard in shards:
                if shard in kept:
                    continue
                path = partial.folder / shard.filename
                digest = TrailingHash(path, len(headers[shard.filename]))
                try:
                    write_shard(path, _entries(recipe, shard, streamer), _both(digest.advance, on_bytes))
                except BaseException:
                    digest.close()
                    raise
                pending.append((shard.filename, finisher.submit(digest.finish, partial.fsync)))
                _journal_finished(partial, pending, wait=False)
            _journal_finished(partial, pending, wait=True)
        finally:
            for _, future in pending:
                future.cancel()
            streamer.close()


def _entries(recipe: Recipe, shard: ShardPlan, streamer: RecipeStreamer) -> list[ShardEntry]:
    """The shard's tensors for the writer: a stored tensor's byte range, or the streamer's blocks."""
    entries = []
    for name in shard.names:
        tensor = recipe.tensors[name]
        produce = None if tensor.stored is not None else (lambda t=tensor, n=name: _named(n, streamer.encoded(t)))
        entries.append(ShardEntry(name, tensor.dtype, tensor.shape, tensor.stored, produce))
    return entries


def _named(name: str, blocks: Iterator[memoryview]) -> Iterator[memoryview]:
    """A tensor's blocks; a refusal raised computing them names the tensor."""
    try:
        yield from blocks
    except SurgeryError as e:
        raise type(e)(f"{name}: {e}") from None


def _journal_finished(partial: PartialOutput, pending: list[tuple[str, Future[ShardRecord]]], wait: bool) -> None:
    """Journal the finished shards in order (all of them with `wait`), taking them off `pending`."""
    while pending and (wait or pending[0][1].done()):
        filename, future = pending.pop(0)
        partial.record(filename, future.result())


def _both(first: Callable[[int], None], second: Callable[[int], None]) -> Callable[[int], None]:
    def both(n: int) -> None:
        first(n)
        second(n)

    return both


def _check_free_space(out: Path, needed: int) -> None:
    """Refuse before writing anything when the output's filesystem cannot hold it."""
    folder = out.parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed + FREE_SPACE_MARGIN:
        raise SurgeryError(
            f"not enough free space for {out}: it needs {human_bytes(needed + FREE_SPACE_MARGIN)} and "
            f"{folder} has {human_bytes(free)} free; free some space or choose another --out"
        )


def _inside(folder: Path, name: str) -> Path:
    """`folder / name`, refused when the name would land anywhere else (absolute, `..`, a subfolder)."""
    target = folder / name
    if Path(name).name != name or name in ("", ".", "..") or target.parent != folder:
        raise SurgeryError(f"refusing to write {name!r}: output file names must be plain names inside the output folder")
    return target
