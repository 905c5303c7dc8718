"""Evaluation texts: built-in corpora (no download) and the user's .txt / .jsonl files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError
from surgery.evaluation import corpora

# `builtin` is all of Python's documentation text (pydoc_data.topics, sorted key order); the -heldout
# and -dev splits are what the demo models never saw in training: -heldout to score on, -dev for fits
# (aTLAS coefficients), so a fit is never scored on its own text.
BUILTIN = {
    "builtin": lambda: corpora.prose("all"),
    "builtin:prose-heldout": lambda: corpora.prose("heldout"),
    "builtin:code-heldout": lambda: corpora.code("heldout"),
    "builtin:mixed-heldout": lambda: _interleave(corpora.prose("heldout"), corpora.code("heldout")),
    "builtin:prose-dev": lambda: corpora.prose("dev"),
    "builtin:code-dev": lambda: corpora.code("dev"),
    "builtin:mixed-dev": lambda: _interleave(corpora.prose("dev"), corpora.code("dev")),
}


PREFIX_MARGIN = 64  # tokens past the ones used: a prefix's cut changes the last few tokens only


@dataclass(frozen=True)
class EvalText:
    """A named text to score."""

    name: str
    text: str


def load_text(spec: str) -> EvalText:
    """`builtin`, `builtin:NAME`, a .txt file (read whole) or a .jsonl file (`text` fields, joined)."""
    if spec in BUILTIN:
        return EvalText(spec, BUILTIN[spec]())
    if spec.startswith("builtin"):
        raise SurgeryError(f"unknown built-in data {spec!r}; known: {', '.join(BUILTIN)}")
    path = Path(spec)
    if path.is_dir():
        raise SurgeryError(f"data {spec} is a folder; give a .txt or .jsonl file (or several), or builtin")
    if not path.is_file():
        looked = "" if path.is_absolute() else f" (looked for {path.absolute()})"
        raise SurgeryError(f"data file {spec} does not exist{looked}; give a .txt or .jsonl file, or builtin")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SurgeryError(f"data file {spec} is not UTF-8 text; give a .txt or .jsonl file") from None
    if "\x00" in raw:
        raise SurgeryError(f"data file {spec} is not text (it contains NUL bytes); give a .txt or .jsonl file")
    if path.suffix == ".jsonl":
        return EvalText(spec, "\n\n".join(_jsonl_texts(path, raw)))
    return EvalText(spec, raw)


def first_tokens(tokenizer: Any, text: str, count: int) -> list[int]:
    """The first `count` token ids of `text`, as tokenizing it whole gives them, without tokenizing all
    of a long text (the code corpus is megabytes; a score reads a few thousand tokens): prefixes of
    doubling length until two of them, each `PREFIX_MARGIN` tokens past `count`, agree."""
    size, previous = max(4096, count * 8), None
    while size < len(text):
        ids = tokenizer(text[:size])["input_ids"]
        if len(ids) >= count + PREFIX_MARGIN:
            if previous is not None and previous[:count] == ids[:count]:
                return ids[:count]
            previous = ids
        size *= 2
    return tokenizer(text)["input_ids"][:count]


def _jsonl_texts(path: Path, raw: str) -> list[str]:
    texts = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SurgeryError(f"{path}:{number}: not a JSON line ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise SurgeryError(f"{path}:{number}: each line needs a string 'text' field")
        texts.append(record["text"])
    return texts


def _interleave(prose: str, code: str, chunk: int = 4000) -> str:
    """Alternate chunks of both texts, so any prefix is a mix of the two."""
    parts = []
    for start in range(0, max(len(prose), len(code)), chunk):
        parts.extend(p for p in (prose[start : start + chunk], code[start : start + chunk]) if p)
    return "\n\n".join(parts)
