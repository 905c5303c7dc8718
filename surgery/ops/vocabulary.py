"""Merges of models whose vocabularies differ (added tokens, resized embeddings): the rows of every
vocabulary-indexed tensor (embeddings, LM head) aligned by token before the merge, or a refusal.

A merge's `tokenizer:` picks the output vocabulary:
- `base`: that of the model the output builds on (the plan's model; the base for task-vector merges);
- `union`: that one, then every token another model has and it lacks, appended in the models' order
  (each model's tokens by id; an added token keeps its flags), as mergekit's union builds it;
- a model of the merge: its vocabulary and tokenizer files.
Each model's rows are taken, by token, into the output's ids; a token a model lacks gets, in that model,
the row mergekit gives it: the one model that has it, else the base's if the base has it, else the mean
of the models that have it. So a token only one model has keeps that model's row through any merge.
Ids the output's tokenizer has no token for (padding rows) come from the model whose tokenizer it is.
Without `tokenizer:`, models whose vocabularies differ are refused, also when their sizes agree (rows of
one token merged with another's would be a silently wrong model). The ensemble checks the same.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from surgery.checkpoint.config import TOKEN_ID_KEYS
from surgery.checkpoint.reader import FLOAT_DTYPES, numel
from surgery.errors import SurgeryError
from surgery.formats.ensemble_folder import vocab_size, vocabulary_files
from surgery.recipe.rows import RowGather, Sources, runs_of
from surgery.recipe.tensor import TensorRecipe
from surgery.recipe.view import ModelView

# The files that make a tokenizer; `tokenizer: MODEL` or `union` replaces all of them in the output.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")


@dataclass(frozen=True, eq=False)  # one per model of a merge, found by identity
class MergeInput:
    """One model of a merge: how the plan names it, and its view."""

    ref: str
    view: ModelView


def rows_of(view: ModelView) -> int | None:
    """The embedding's rows: config.json's vocab_size (a text model's, or a VLM's text_config's)."""
    return vocab_size(view.source.config)


@lru_cache(maxsize=32)
def _token_ids(folder: Path, stamp: tuple[int, ...]) -> dict[str, int] | None:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return dict(AutoTokenizer.from_pretrained(str(folder)).get_vocab())
    except Exception as e:  # noqa: BLE001 - any tokenizer that will not load is one line
        raise SurgeryError(f"{folder}: its tokenizer does not load ({type(e).__name__}: {e})") from None


def token_ids(view: ModelView) -> dict[str, int] | None:
    """token -> id of a model's tokenizer (None: it has no tokenizer files)."""
    folder = view.source.path
    stamp = tuple(int((folder / name).stat().st_mtime_ns) for name in TOKENIZER_FILES if (folder / name).is_file())
    return _token_ids(folder, stamp)


def _tokenizer_bytes(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()}


def first_difference(a: dict[str, int], b: dict[str, int], label_a: str, label_b: str) -> str:
    """The first token (by id) one vocabulary lacks or numbers differently, in words."""
    for token, index in sorted(a.items(), key=lambda item: item[1]):
        if b.get(token) != index:
            return (f"{label_b} lacks token {token!r} ({label_a}'s {index})" if token not in b else
                    f"token {token!r} is {label_a}'s {index} but {label_b}'s {b[token]}")
    token = min((t for t in b if t not in a), key=b.__getitem__)
    return f"{label_a} lacks token {token!r} ({label_b}'s {b[token]})"


def vocabulary_mismatch(members: list[MergeInput]) -> str | None:
    """Where the members' vocabularies differ (tokens or embedding rows), in words; None where they agree."""
    first, *others = members
    files, rows = vocabulary_files(first.view.source.path), rows_of(first.view)
    if all(vocabulary_files(m.view.source.path) == files and rows_of(m.view) == rows for m in others):
        return None  # the same vocabulary files: no tokenizer needs loading
    mine = token_ids(first.view)
    for other in others:
        theirs, their_rows = token_ids(other.view), rows_of(other.view)
        if mine is not None and theirs is not None and mine != theirs:
            return first_difference(mine, theirs, first.ref, other.ref)
        if rows != their_rows:
            return f"{first.ref} has {rows} embedding rows and {other.ref} {their_rows}"
    return None


def check_one_vocabulary(op: str, members: list[MergeInput], hint: str) -> None:
    """Refuse models whose vocabularies differ, naming the first token that does."""
    mismatch = vocabulary_mismatch(members)
    if mismatch is not None:
        raise SurgeryError(f"{op}: the models' vocabularies differ ({mismatch}); {hint}")


def aligned(op: str, choice: str | None, start: MergeInput, members: list[MergeInput],
            base: MergeInput | None) -> list[ModelView]:
    """The members' views with their vocabulary rows in the output's ids (the same views where the
    vocabularies agree); the start's view also carries the output's vocab size and tokenizer files."""
    mismatch = vocabulary_mismatch(members)
    if mismatch is None:
        return [m.view for m in members]
    if choice is None:
        raise SurgeryError(f"{op}: the models' vocabularies differ ({mismatch}); set the step's 'tokenizer:' to base, "
                           "union or one of the models to align their embedding rows by token")
    vocabularies = []
    for m in members:
        ids, rows = token_ids(m.view), rows_of(m.view)
        if ids is None or rows is None:
            raise SurgeryError(f"{op}: {m.ref} has no tokenizer files (or no vocab_size): its embedding rows "
                               "cannot be aligned by token")
        vocabularies.append({token: index for token, index in ids.items() if index < rows})
    owner, out_ids, files = _output_vocabulary(op, choice, start, members, vocabularies)
    out_rows = max(rows_of(owner.view) or 0, max(out_ids.values()) + 1)
    row_sources = _row_sources(op, out_ids, out_rows, members, vocabularies, members.index(owner),
                               members.index(base) if base in members else None)
    names = _vocabulary_tensors(op, members)
    inputs = {name: tuple(m.view.outside[name] for m in members) for name in names}
    views = []
    for index, m in enumerate(members):
        runs = runs_of(row_sources[index])

        def edit(name: str, recipe: TensorRecipe, runs: tuple = runs) -> TensorRecipe:
            if name not in names:
                return recipe
            return TensorRecipe.computed(recipe.dtype, (out_rows, *recipe.shape[1:]), inputs[name],
                                         RowGather(numel(recipe.shape[1:]), runs))

        views.append(m.view.map_tensors(edit))
    out = members.index(start)
    views[out] = _with_tokenizer(views[out], start, owner, out_ids, out_rows, files)
    return views


def _output_vocabulary(op: str, choice: str, start: MergeInput, members: list[MergeInput],
                       vocabularies: list[dict[str, int]]) -> tuple[MergeInput, dict[str, int], dict[str, bytes] | None]:
    """The model whose tokenizer the output takes (the start's for union), the output's token ids, and the
    tokenizer files that replace the start's (None: the start's own)."""
    if choice == "base":
        return start, vocabularies[members.index(start)], None
    if choice == "union":
        return start, *_union(start, members, vocabularies)
    owner = next((m for m in members if m.ref == choice), None)
    if owner is None:
        raise SurgeryError(f"{op}: tokenizer {choice!r} is not one of the merge's models; give base, union or one of "
                           f"{', '.join(m.ref for m in members)}")
    files = None if owner is start else _tokenizer_bytes(owner.view.source.path)
    return owner, vocabularies[members.index(owner)], files


def _union(start: MergeInput, members: list[MergeInput], vocabularies: list[dict[str, int]]) -> tuple[dict[str, int],
                                                                                              dict[str, bytes]]:
    """The start's tokenizer with every other model's missing tokens added (an added token with its flags)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(start.view.source.path))
    known = set(tokenizer.get_vocab())
    for m, ids in zip(members, vocabularies):
        if m is start:
            continue
        added = {info.content: info for info in AutoTokenizer.from_pretrained(str(m.view.source.path))
                 .added_tokens_decoder.values()}
        new = sorted((t for t in ids if t not in known), key=ids.__getitem__)
        tokenizer.add_tokens([added.get(token, token) for token in new])
        known.update(new)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        files = {path.name: path.read_bytes() for path in Path(folder).iterdir() if path.is_file()}
    return dict(tokenizer.get_vocab()), files


def _row_sources(op: str, out_ids: dict[str, int], out_rows: int, members: list[MergeInput],
                 vocabularies: list[dict[str, int]], owner: int, base: int | None) -> list[list[Sources]]:
    """Per member, per output row: the (member, row) pairs it is the mean of."""
    token_of = {index: token for token, index in out_ids.items()}
    owner_rows = rows_of(members[owner].view) or 0
    sources: list[list[Sources]] = [[] for _ in members]
    for index in range(out_rows):
        token = token_of.get(index)
        if token is None:  # a padding row: the tokenizer's model's
            if index >= owner_rows:
                raise SurgeryError(f"{op}: the output's id {index} has no token and no row in {members[owner].ref}")
            for rows in sources:
                rows.append(((owner, index),))
            continue
        holders = [j for j, ids in enumerate(vocabularies) if token in ids]
        if not holders:
            raise SurgeryError(f"{op}: token {token!r} of the output's tokenizer has an embedding row in no model")
        if len(holders) == 1:
            default: Sources = ((holders[0], vocabularies[holders[0]][token]),)
        elif base is not None and base in holders:
            default = ((base, vocabularies[base][token]),)
        else:
            default = tuple((j, vocabularies[j][token]) for j in holders)
        for j, rows in enumerate(sources):
            rows.append(((j, vocabularies[j][token]),) if token in vocabularies[j] else default)
    return sources


def _vocabulary_tensors(op: str, members: list[MergeInput]) -> set[str]:
    """The tensors outside the layers indexed by token (first dimension the model's embedding rows), the
    same in every model."""
    found: list[set[str]] = []
    for m in members:
        rows = rows_of(m.view)
        names = {name for name, recipe in m.view.outside.items() if recipe.shape and recipe.shape[0] == rows}
        for name in names:
            if m.view.outside[name].dtype not in FLOAT_DTYPES:
                raise SurgeryError(f"{op}: {m.ref}'s {name} is {m.view.outside[name].dtype}; rows aligned by token "
                                   "need float tensors")
        found.append(names)
    if any(names != found[0] for names in found) or not found[0]:
        raise SurgeryError(f"{op}: the models' token-indexed tensors differ ({', '.join(sorted(found[0]))}); "
                           "vocabularies can only be aligned between models of one architecture")
    return found[0]


def _with_tokenizer(view: ModelView, start: MergeInput, owner: MergeInput, out_ids: dict[str, int], out_rows: int,
                    files: dict[str, bytes] | None) -> ModelView:
    """The output's config (vocab size, special token ids renumbered by token) and tokenizer files."""
    config = start.view.source.config
    if "vocab_size" not in config:
        raise SurgeryError("a model whose vocab_size is not at the top of config.json (a vision-language model) "
                           "cannot change its vocabulary yet; merge models of one vocabulary")
    updates: dict[str, Any] = {"vocab_size": out_rows}
    extra = dict(view.extra_files)
    if owner is not start:
        start_ids = token_ids(start.view) or {}
        token_of = {index: token for token, index in start_ids.items()}
        updates |= _renumbered(config, token_of, out_ids)
        generation = start.view.source.path / "generation_config.json"
        if generation.is_file():
            settings = json.loads(generation.read_text())
            changed = _renumbered(settings, token_of, out_ids)
            if changed:
                extra["generation_config.json"] = json.dumps({**settings, **changed}, indent=2) + "\n"
    return replace(view, config_updates={**view.config_updates, **updates}, extra_files=extra,
                   tokenizer_files=files)


def _renumbered(settings: dict[str, Any], token_of: dict[int, str], out_ids: dict[str, int]) -> dict[str, Any]:
    """Special token ids of a config, renumbered by their tokens into the output's ids."""

    def moved(index: Any) -> Any:
        if isinstance(index, list):
            return [moved(i) for i in index]
        if isinstance(index, int) and not isinstance(index, bool) and token_of.get(index) in out_ids:
            return out_ids[token_of[index]]
        return index

    return {key: moved(settings[key]) for key in TOKEN_ID_KEYS
            if key in settings and moved(settings[key]) != settings[key]}
