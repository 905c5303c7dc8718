"""The files of a source folder that go with its weights into the output: tokenizer, generation
config, chat template, sentence-transformers modules... (not its weights, config, index, card or
surgery record, which describe the source itself)."""

from __future__ import annotations

import shutil
from collections.abc import Collection
from pathlib import Path

from surgery.checkpoint.reader import INDEX_NAME, inside_model, regular_file
from surgery.formats.gguf import TENSOR_TYPES_FILE
from surgery.output.card import CARD_NAME
from surgery.output.provenance import PROVENANCE_NAME

NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
# Derived files describe their own folder's tensors (llama-tensor-types.txt names its layers): a later
# edit of that folder would carry them stale, so they are never copied, only written by the step that makes them.
DERIVED_NAMES = {TENSOR_TYPES_FILE}
NOT_COPIED_NAMES = {"config.json", INDEX_NAME, "pytorch_model.bin.index.json", PROVENANCE_NAME, CARD_NAME,
                    *DERIVED_NAMES}


def side_files(source: Path, leave_out: Collection[str] = ()) -> list[Path]:
    """Every file of the source folder that is not weights (nor its card, config or index, nor the top-level
    names in `leave_out`), subfolders included, hidden ones left out; a link leading out of the folder is
    refused (`inside_model`)."""
    files = []
    for item in sorted(source.rglob("*")):
        relative = item.relative_to(source)
        if any(part.startswith(".") for part in relative.parts) or (item.is_dir() and not item.is_symlink()):
            continue
        top = len(relative.parts) == 1
        if (top and (relative.name in NOT_COPIED_NAMES or relative.name in leave_out)) or item.suffix in NOT_COPIED_SUFFIXES:
            continue
        files.append(regular_file(inside_model(source, item), "surgery copies only regular files: replace it with "
                                  "the file itself, or remove it"))
    return files


def side_file_bytes(source: Path) -> int:
    return sum(item.stat().st_size for item in side_files(source))


def copy_side_files(source: Path, dest: Path, leave_out: Collection[str] = ()) -> None:
    for item in side_files(source, leave_out):
        target = dest / item.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(item, target)
