"""`surgery diff` of ensemble folders: what they combine and how, member by member. Members stored by
reference are compared by their recorded file hashes (their weights live elsewhere: the note names
the `surgery diff` of the two members); members stored in the folder are compared tensor by tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surgery.comparison.result import DiffReport, config_changes
from surgery.errors import SurgeryError
from surgery.formats.ensemble_folder import EnsembleSpec, is_ensemble, read_spec


def ensemble_pair(a: Path, b: Path, a_config: dict[str, Any], b_config: dict[str, Any]) -> DiffReport | None:
    """The report of two ensembles by reference; None when neither is an ensemble or both store their
    members (then their tensors are compared like any checkpoint's)."""
    if not (is_ensemble(a_config) or is_ensemble(b_config)):
        return None
    if is_ensemble(a_config) != is_ensemble(b_config):
        ensemble, model = (a, b) if is_ensemble(a_config) else (b, a)
        raise SurgeryError(f"{ensemble} is an ensemble and {model} a single model; diff compares like with like: "
                           f"compare {model} with one of the ensemble's members "
                           f"(`surgery inspect {ensemble}` lists them)")
    specs = read_spec(a, a_config), read_spec(b, b_config)
    if specs[0].layout == specs[1].layout == "copy":
        return None
    report = DiffReport(a=str(a), b=str(b))
    config_changes(_settings(specs[0]), _settings(specs[1]), report)
    for index in range(max(len(specs[0].members), len(specs[1].members))):
        ma, mb = (spec.members[index] if index < len(spec.members) else None for spec in specs)
        key = f"members.{index}"
        if ma is None or mb is None:
            (report.config_added if ma is None else report.config_removed)[key] = (mb or ma).path or "stored"
        elif ma.path is None or mb.path is None:
            report.config_changed[key] = [ma.path or "stored in the folder", mb.path or "stored in the folder"]
            report.notes.append(f"member {index}: one is stored in its folder and one by reference; "
                                f"`surgery diff` the two member folders to compare their weights")
        elif ma.sha256 == mb.sha256:
            report.notes.append(f"member {index}: the same files (sha256) in both")
        else:
            report.config_changed[key] = [ma.path, mb.path]
            report.notes.append(f"member {index} differs: `surgery diff {ma.path} {mb.path}` compares its weights")
    return report


def _settings(spec: EnsembleSpec) -> dict[str, Any]:
    return {"combine": spec.combine, "weights": spec.weights, "layout": spec.layout, "members": len(spec.members)}
