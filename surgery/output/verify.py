"""`surgery verify`: is a folder a whole, uncorrupted checkpoint, and exactly what surgery wrote?

Every check runs, so one report lists every problem: config, each shard's header (offsets, sizes,
coverage of its data area), the index, the totals and the content hashes recorded in surgery.json
as each shard was finished.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.checkpoint.digest import SHARD_DIGEST, file_blake3, file_sha256
from surgery.checkpoint.reader import INDEX_NAME, Checkpoint, read_config, read_shard_header
from surgery.errors import SurgeryError
from surgery.formats.ensemble_folder import check_member_unchanged, is_ensemble, read_spec
from surgery.output.provenance import PROVENANCE_NAME, plain_file_names, read_provenance


@dataclass(frozen=True)
class Check:
    """One verified property: what was checked, whether it holds, and what was found."""

    subject: str
    ok: bool
    detail: str


def verify(folder: Path) -> list[Check]:
    """Check everything that can be checked about `folder`; a folder that is not a model at all is a
    SurgeryError (bad input), anything wrong inside it is a failed Check."""
    if not folder.is_dir():
        raise SurgeryError(f"{folder} is not a folder; give the output folder of `surgery apply` (or any model folder)")
    checks: list[Check] = []
    config = _attempt(checks, "config.json", lambda: read_config(folder), lambda c: f"{len(c)} keys")
    provenance = _attempt(checks, PROVENANCE_NAME, lambda: read_provenance(folder),
                          lambda p: "present" if p else "absent: not a surgery output, no hashes to check")
    kind = _digest_kind(provenance)
    recorded = _attempt_quietly(checks, f"surgery.json output_{kind}", lambda: _hashes(provenance, kind)) or {}
    expected = _attempt_quietly(checks, "surgery.json output_shards", lambda: _shard_list(provenance))
    on_disk = sorted(p.name for p in folder.glob("*.safetensors"))
    names = sorted(set(on_disk) | set(expected or []))
    for name in names:
        if expected is not None and name not in expected:
            checks.append(Check(name, False, "not among the shards surgery.json lists (a stray or renamed file)"))
        elif not (folder / name).is_file():
            checks.append(Check(name, False, "missing"))
        else:
            _attempt(checks, name, lambda n=name: read_shard_header(folder / n),
                     lambda h: f"header valid, {len(h.tensors)} tensors")
    if names:
        checkpoint = _attempt(checks, "index and tensor names", lambda: Checkpoint.open(folder), _describe_layout)
        if checkpoint is not None and provenance is not None:
            _check_totals(checks, checkpoint, provenance)
    elif config is not None and is_ensemble(config):
        _check_members(checks, folder, config)
    else:
        checks.append(Check("weights", False, "no *.safetensors shards"))
    checks.extend(_check_hashes(folder, recorded, kind))
    if expected is not None and not recorded and names:
        checks.append(Check("hashes", False, "surgery.json records no shard hashes (written before surgery recorded them)"))
    return checks


def _digest_kind(provenance: dict[str, Any] | None) -> str:
    """Which digest the record holds: BLAKE3, or sha256 in outputs written by earlier versions of surgery."""
    return "sha256" if provenance and f"output_{SHARD_DIGEST}" not in provenance and "output_sha256" in provenance \
        else SHARD_DIGEST


def _hashes(provenance: dict[str, Any] | None, kind: str) -> dict[str, str]:
    recorded = (provenance or {}).get(f"output_{kind}", {})
    if not isinstance(recorded, dict) or not all(isinstance(digest, str) for digest in recorded.values()):
        raise SurgeryError(f"surgery.json output_{kind}: not an object of shard name -> {kind}")
    plain_file_names(list(recorded), f"surgery.json output_{kind}")
    return recorded


def _shard_list(provenance: dict[str, Any] | None) -> list[str] | None:
    shards = (provenance or {}).get("output_shards")
    return None if shards is None else plain_file_names(shards, "surgery.json output_shards")


def _attempt_quietly(checks: list[Check], subject: str, run: Any) -> Any:
    """A check that is reported only when it fails (a well-formed record needs no line of its own)."""
    try:
        return run()
    except SurgeryError as e:
        checks.append(Check(subject, False, str(e)))
        return None


def _attempt(checks: list[Check], subject: str, run: Any, describe: Any) -> Any:
    """Run one check that raises SurgeryError (or fails to read) when it does not hold."""
    try:
        value = run()
    except (SurgeryError, OSError, ValueError) as e:
        checks.append(Check(subject, False, str(e)))
        return None
    checks.append(Check(subject, True, describe(value)))
    return value


def _describe_layout(checkpoint: Checkpoint) -> str:
    index = "index consistent" if (checkpoint.path / INDEX_NAME).exists() else "single shard, no index"
    return f"{len(checkpoint.tensors)} tensors, {checkpoint.total_bytes} bytes, {index}"


def _check_totals(checks: list[Check], checkpoint: Checkpoint, provenance: dict[str, Any]) -> None:
    found = (len(checkpoint.tensors), checkpoint.total_bytes)
    wanted = (provenance.get("tensors"), provenance.get("bytes"))
    checks.append(Check("totals", found == wanted, f"{found[0]} tensors, {found[1]} bytes"
                        + ("" if found == wanted else f"; surgery.json says {wanted[0]} tensors, {wanted[1]} bytes")))


def _check_hashes(folder: Path, recorded: dict[str, str], kind: str) -> list[Check]:
    """Each shard's digest against the one recorded when it was finished, files hashed in parallel."""
    digest_of = file_blake3 if kind == SHARD_DIGEST else file_sha256

    def check(name: str) -> Check:
        path = folder / name
        if not path.is_file():
            return Check(f"{name} {kind}", False, "missing")
        digest = digest_of(path)
        if digest != recorded[name]:
            return Check(f"{name} {kind}", False, f"content changed: {digest[:16]}..., recorded {recorded[name][:16]}...")
        return Check(f"{name} {kind}", True, f"{digest[:16]}... as recorded")

    with ThreadPoolExecutor(min(len(recorded), os.cpu_count() or 1) or 1) as pool:
        return list(pool.map(check, sorted(recorded)))


def _check_members(checks: list[Check], folder: Path, config: dict[str, Any]) -> None:
    """An ensemble by reference stores no weights: its members must still be what it was made from."""
    spec = _attempt(checks, "ensemble config", lambda: read_spec(folder, config), lambda s: f"{len(s.members)} members")
    for member in spec.members if spec is not None else []:
        if member.path is not None:
            _attempt(checks, f"member {member.path}", lambda m=member: check_member_unchanged(Path(m.path), m.sha256),
                     lambda _: "unchanged since the ensemble was made")
