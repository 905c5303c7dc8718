"""The ensemble folder: models that share a tokenizer, scored as one model whose next-token logits
are the weighted mean of theirs (Bochkov 2025, "Growing Transformers").

config.json names model type `surgery_ensemble`, so plain transformers refuses the folder. The
`surgery_ensemble` section lists the members, each with its own config:
- `layout: reference`: each member is a `path`, with the sha256 of each of its files, checked
  when the ensemble is loaded;
- `layout: copy`: each member's tensors are stored in this folder as `members.{i}.{name}`. A
  tensor byte-identical to an earlier member's (the frozen embeddings the paper's specialists
  share) is stored once; `aliases` maps the omitted name to the stored one.
The tokenizer files are the first member's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgery.checkpoint.digest import file_sha256
from surgery.checkpoint.reader import SINGLE_NAME
from surgery.errors import SurgeryError

MODEL_TYPE = "surgery_ensemble"
SECTION = "surgery_ensemble"
FORMAT_VERSION = 1
# Files that define the vocabulary: members must have the same ones, with the same content.
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt")
# Settings in tokenizer.json that change how text is cut or padded, not the vocabulary.
_NOT_VOCABULARY = ("truncation", "padding")


def is_ensemble(config: dict[str, Any]) -> bool:
    return config.get("model_type") == MODEL_TYPE


def member_name(index: int, name: str) -> str:
    return f"members.{index}.{name}"


@dataclass(frozen=True)
class Member:
    config: dict[str, Any]
    path: str | None = None  # reference layout
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> digest, reference layout


@dataclass(frozen=True)
class EnsembleSpec:
    members: list[Member]
    weights: list[float]
    combine: str
    layout: str
    aliases: dict[str, str] = field(default_factory=dict)  # copy layout: omitted name -> stored name

    def to_dict(self) -> dict[str, Any]:
        members = [{"config": m.config, **({"path": m.path, "sha256": m.sha256} if m.path else {})} for m in self.members]
        return {"format_version": FORMAT_VERSION, "combine": self.combine, "weights": self.weights,
                "layout": self.layout, "members": members, "aliases": self.aliases}


def ensemble_config(spec: EnsembleSpec, vocab_size: int) -> dict[str, Any]:
    return {"model_type": MODEL_TYPE, "architectures": ["SurgeryEnsembleForCausalLM"], "vocab_size": vocab_size,
            SECTION: spec.to_dict()}


def read_spec(folder: Path, config: dict[str, Any]) -> EnsembleSpec:
    where = folder / "config.json"
    try:
        section = config[SECTION]
        if section["format_version"] != FORMAT_VERSION:
            raise SurgeryError(f"{where}: ensemble format version {section['format_version']} is not supported "
                               f"(this surgery reads {FORMAT_VERSION}); upgrade surgery")
        members = [Member(m["config"], m.get("path"), m.get("sha256", {})) for m in section["members"]]
        return EnsembleSpec(members, [float(w) for w in section["weights"]], section["combine"], section["layout"],
                            dict(section.get("aliases", {})))
    except (KeyError, TypeError, ValueError) as e:
        raise SurgeryError(f"{where}: not a valid ensemble config (bad or missing {e})") from None


def vocab_size(config: dict[str, Any]) -> int | None:
    size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return size if isinstance(size, int) else None


def check_same_tokenizer(folders: list[Path], labels: list[str]) -> None:
    """Members must tokenize alike: the same vocabulary files with the same content, and one vocab size."""
    first, first_label = folders[0], labels[0]
    mine = vocabulary_files(first)
    if not mine:
        raise SurgeryError(f"ensemble: {first_label} has no tokenizer files ({', '.join(VOCABULARY_FILES[:2])}, ...)")
    for folder, label in zip(folders[1:], labels[1:]):
        theirs = vocabulary_files(folder)
        for name in sorted(set(mine) | set(theirs)):
            if mine.get(name) != theirs.get(name):
                what = "has no" if name not in theirs else "has a different" if name in mine else "has an extra"
                raise SurgeryError(f"ensemble: {label} {what} {name} than {first_label}; members must share one tokenizer")


def vocabulary_files(folder: Path) -> dict[str, Any]:
    """The files that define a folder's vocabulary, as compared (tokenizer.json without its padding and
    truncation settings)."""
    found: dict[str, Any] = {}
    for name in VOCABULARY_FILES:
        path = folder / name
        if path.is_file():
            if name == "tokenizer.json":
                data = json.loads(path.read_text())
                found[name] = {k: v for k, v in data.items() if k not in _NOT_VOCABULARY}
            else:
                found[name] = path.read_bytes()
    return found


def member_hashes(folder: Path) -> dict[str, str]:
    """sha256 of a member's config and weights: an ensemble by reference notices a member that changed."""
    names = ["config.json"] + sorted(p.name for p in folder.glob("*.safetensors"))
    if len(names) == 1:
        raise SurgeryError(f"ensemble: {folder} has no {SINGLE_NAME} or shards")
    return {name: file_sha256(folder / name) for name in names}


def check_member_unchanged(path: Path, sha256: dict[str, str]) -> None:
    """A member by reference must still be the bytes the ensemble was made from."""
    for name, digest in sha256.items():
        file = path / name
        if not file.is_file():
            raise SurgeryError(f"ensemble member {path} lacks {name}; was it moved? re-run the ensemble plan")
        if file_sha256(file) != digest:
            raise SurgeryError(f"ensemble member {path} changed since the ensemble was made ({name} has another "
                               "sha256); re-run the ensemble plan")
