"""The partial output of a run: a hidden sibling of the output folder, with a journal of the shards
finished so far, so `apply --resume` continues an interrupted run. A sibling lock file is held from
the start of the run until the finished folder has been renamed into place, so two runs on one
output never interleave.

A shard enters the journal only once it is whole: its bytes hashed (BLAKE3, read back from the
file) and, with fsync, on the disk. Resuming re-hashes every journaled shard before trusting it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from surgery.checkpoint.digest import SHARD_DIGEST, file_blake3, shard_hash
from surgery.checkpoint.reader import is_plain_name, read_json_file
from surgery.errors import SurgeryError

PARTIAL_TAG = ".surgery-partial"
JOURNAL_NAME = ".surgery-journal.json"
LOCK_TAG = ".surgery-lock"


def partial_folder(out: Path) -> Path:
    """Where the run writing `out` keeps its work until the rename (same filesystem, so the rename is atomic)."""
    return out.parent / f".{out.name}{PARTIAL_TAG}"


def lock_path(out: Path) -> Path:
    """The file a run writing `out` holds locked, beside the partial folder (not in it: it outlives the rename)."""
    return out.parent / f".{out.name}{LOCK_TAG}"


@dataclass(frozen=True)
class ShardRecord:
    """A finished shard: what `verify` and `--resume` check it against."""

    digest: str  # BLAKE3, hex
    bytes: int


def hash_shard(path: Path) -> ShardRecord:
    """A shard on disk, hashed from the file itself: what a journaled or recorded shard is checked against."""
    return ShardRecord(file_blake3(path), path.stat().st_size)


class TrailingHash:
    """The digest of a shard computed while it is written: a thread reads the file (from the page cache)
    up to the bytes the writer reports done, so hashing overlaps the write instead of following it."""

    CHUNK = 8 << 20

    def __init__(self, path: Path, header_bytes: int) -> None:
        self.path = path
        self._ready = header_bytes  # the header is on file before the first tensor is reported
        self._reported = False
        self._closed = False
        self._hash = shard_hash()
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._follow, name="surgery-hash", daemon=True)
        self._thread.start()

    def advance(self, nbytes: int) -> None:
        """The writer finished `nbytes` more bytes (flushed to the file)."""
        with self._changed:
            self._ready += nbytes
            self._reported = True
            self._changed.notify()

    def finish(self, fsync: bool) -> ShardRecord:
        """The digest once the writer is done and the thread has caught up; then, with fsync, sync."""
        self.close()
        if self._error is not None:
            raise self._error
        if fsync:
            with open(self.path, "rb") as f:
                os.fsync(f.fileno())
        return ShardRecord(self._hash.hexdigest(), self.path.stat().st_size)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()

    def _follow(self) -> None:
        try:
            done = 0
            with self._changed:
                self._changed.wait_for(lambda: self._reported or self._closed)
                if not self._reported:
                    return
            buffer = memoryview(bytearray(self.CHUNK))
            with open(self.path, "rb", buffering=0) as f:
                while True:
                    with self._changed:
                        self._changed.wait_for(lambda: self._ready > done or self._closed)
                        target = self._ready
                    if done >= target:
                        return
                    while done < target:
                        read = f.readinto(buffer[:min(self.CHUNK, target - done)])
                        if not read:
                            raise OSError(f"{self.path}: shorter than the bytes written to it")
                        self._hash.update(buffer[:read])
                        done += read
        except BaseException as e:  # handed to finish(), on the writer's thread
            self._error = e


def read_journal(folder: Path) -> dict[str, object]:
    """The journal of a partial folder, or an empty one when there is none, or it is unreadable or
    malformed (then nothing is kept: every shard is written again)."""
    try:
        journal = read_json_file(folder / JOURNAL_NAME, "journal", "")
    except SurgeryError:
        return {}
    if not isinstance(journal, dict) or not isinstance(journal.get("fingerprint"), str):
        return {}
    shards = journal.get("shards", {})
    if not isinstance(shards, dict) or not all(_journaled(name, entry) for name, entry in shards.items()):
        return {}
    return journal


def _journaled(name: object, entry: object) -> bool:
    """A well-formed journal entry: a plain shard name -> its digest and byte count."""
    return (isinstance(name, str) and is_plain_name(name) and isinstance(entry, dict)
            and isinstance(entry.get(SHARD_DIGEST), str) and type(entry.get("bytes")) is int)


def journaled_bytes(folder: Path, fingerprint: str) -> int:
    """Bytes an earlier run of the same recipe already finished there (0 for another recipe)."""
    journal = read_journal(folder)
    if journal.get("fingerprint") != fingerprint:
        return 0
    return sum(int(entry.get("bytes", 0)) for entry in dict(journal.get("shards", {})).values())


@dataclass
class PartialOutput:
    """A locked partial folder for one recipe (named by its fingerprint) and its finished shards."""

    folder: Path
    fingerprint: str
    fsync: bool
    shards: dict[str, ShardRecord] = field(default_factory=dict)
    _lock_fd: int | None = None
    _lock_path: Path | None = None
    _created: list[Path] = field(default_factory=list)  # parent folders this run made, deepest first

    @classmethod
    def open(cls, out: Path, fingerprint: str, *, resume: bool, force: bool, fsync: bool) -> PartialOutput:
        """Lock `out`, then create or take over its partial folder.

        Another live run holding the lock is an error; an interrupted run's folder is continued with
        `resume`, discarded with `force`, and otherwise an error that names both choices. A link or
        a file planted at the partial folder's name is never written through, whatever the flags.
        """
        folder = partial_folder(out)
        partial = cls(folder, fingerprint, fsync, _lock_path=lock_path(out), _created=_make_parents(out.parent))
        try:
            partial._lock()
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                raise SurgeryError(f"{folder} is a {'link' if folder.is_symlink() else 'file'}, not a partial output "
                                   "surgery made; surgery never writes through it: remove it and run again")
            existed = folder.exists()
            if not existed:
                folder.mkdir()
            journal = read_journal(folder)
            if existed and not resume and not force:
                raise SurgeryError(
                    f"an interrupted run left partial output in {folder}; pass --resume to continue it, "
                    "or --force to start over"
                )
            if resume and journal and journal.get("fingerprint") != fingerprint:
                raise SurgeryError(
                    f"the partial output in {folder} was made by another plan, inputs, version or device; "
                    "pass --force instead of --resume to start over"
                )
        except BaseException:
            partial.release()  # nothing to release when the lock itself was refused
            partial._remove_created()
            raise
        if resume:
            partial.shards = {
                name: ShardRecord(str(entry[SHARD_DIGEST]), int(entry["bytes"]))
                for name, entry in dict(journal.get("shards", {})).items()
            }
        partial._clear(keep=set(partial.shards))
        return partial

    def verified(self, filename: str) -> bool:
        """True when a journaled shard is still on disk with the recorded size and content hash."""
        record = self.shards.get(filename)
        path = self.folder / filename
        if record is None or not path.is_file() or path.stat().st_size != record.bytes:
            self.shards.pop(filename, None)
            return False
        if hash_shard(path) != record:
            self.shards.pop(filename, None)
            return False
        return True

    def record(self, filename: str, shard: ShardRecord) -> None:
        """Journal a finished shard (written to a temporary file and renamed, then synced)."""
        self.shards[filename] = shard
        journal = {
            "fingerprint": self.fingerprint,
            "shards": {name: {SHARD_DIGEST: r.digest, "bytes": r.bytes} for name, r in sorted(self.shards.items())},
        }
        staging = self.folder / (JOURNAL_NAME + ".tmp")
        with open(staging, "w") as f:
            f.write(json.dumps(journal, indent=1))
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(staging, self.folder / JOURNAL_NAME)

    def publish(self, out: Path) -> None:
        """Sync the finished folder (with fsync), drop the journal and lock, and rename it to `out`: the
        last moment, so a run killed before it resumes from its journal."""
        if self.fsync:
            _fsync_tree(self.folder)
        (self.folder / JOURNAL_NAME).unlink(missing_ok=True)
        if self.fsync:
            _fsync_entries(self.folder)
        _replace(self.folder, out)
        self.release()
        if self.fsync:
            _fsync_entries(out.parent)  # the rename itself

    def release(self) -> None:
        """Let go of the lock (the folder stays, for --resume): the file goes first, while still held, so
        a run that opened it meanwhile sees it was replaced and takes the new one."""
        if self._lock_fd is not None:
            assert self._lock_path is not None
            self._lock_path.unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    def discard(self) -> None:
        """Remove the partial folder and everything in it, and the parent folders the run made."""
        self.release()
        shutil.rmtree(self.folder, ignore_errors=True)
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:  # not empty (something else was put there meanwhile): it stays
                return

    def _lock(self) -> None:
        assert self._lock_path is not None
        while True:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise SurgeryError(f"another surgery run is writing {self.folder} right now; wait for it to "
                                   "finish") from None
            try:
                same = os.stat(self._lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the holder before us removed it as we opened it: take the new one
                self._lock_fd = fd
                return
            os.close(fd)

    def _clear(self, keep: set[str]) -> None:
        """Everything but the lock, the journal and the journaled shards goes: leftovers of a killed
        run (a half-written shard, a temporary file) must never reach the output."""
        for item in self.folder.iterdir():
            if item.name in keep | {JOURNAL_NAME}:
                continue
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
        if not keep:
            (self.folder / JOURNAL_NAME).unlink(missing_ok=True)


def remove_stale_lock(out: Path) -> None:
    """A run killed between its rename and its release leaves its lock file behind, held by nobody: the
    next run that finds `out` complete removes it (unless a live run holds it)."""
    path = lock_path(out)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return  # none (or not a file surgery made)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return
    path.unlink(missing_ok=True)
    os.close(fd)


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and the folders above it that are missing; the ones made, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir()
    return missing


def _fsync_tree(folder: Path) -> None:
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
    if out.exists() or out.is_symlink():
        out.rename(out.parent / f".{out.name}.surgery-old-{uuid.uuid4().hex[:8]}")
    staging.rename(out)
    leftovers = [item for item in out.parent.iterdir() if item.name.startswith(f".{out.name}.surgery-old-")]
    for leftover in leftovers:  # the replaced folder, and any a run killed at this point left
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
