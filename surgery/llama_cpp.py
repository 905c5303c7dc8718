"""A llama.cpp GGUF of a `bits` output, made by llama.cpp's own tools: its converter turns the model `bits`
read into a GGUF in that model's dtype, llama-quantize gives each tensor the type llama-tensor-types.txt
names, and the result is checked tensor by tensor against the file before it appears.

llama.cpp's tools rather than a GGUF writer of our own: the converter owns every architecture's tensor
names and layouts and its tokenizer metadata (the part a second implementation would get silently
wrong), and only llama-quantize implements the k-quants. What it does not do is say when it gave a
tensor another type than asked: the check here does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.checkpoint.digest import file_sha256
from surgery.checkpoint.reader import Checkpoint
from surgery.errors import SurgeryError, one_line
from surgery.formats.gguf import (
    FLOAT_TYPES,
    TENSOR_TYPES_FILE,
    gguf_reader,
    gguf_tensors,
    read_tensor_types,
    type_mismatches,
)
from surgery.output.provenance import read_provenance

DEFAULT_QUANTIZED_TYPE = "q8_0"  # llama-quantize applies a type file only when its default type is quantized


class ToolFailed(SurgeryError):
    """A llama.cpp tool failed or wrote what the plan did not say: not the input's fault."""

    exit_code = 1


@dataclass(frozen=True)
class LlamaCpp:
    converter: Path  # convert_hf_to_gguf.py
    quantize: Path  # the llama-quantize binary
    python: str  # the interpreter the converter runs in (it needs torch, transformers, sentencepiece)


def locate(root: Path | None, converter: Path | None, quantize: Path | None, python: str | None) -> LlamaCpp:
    """The tools from the flags: a llama.cpp checkout holds the converter and, once built, build/bin/llama-quantize;
    llama-quantize on PATH serves otherwise."""
    converter = converter or (root / "convert_hf_to_gguf.py" if root else None)
    if converter is None or not converter.is_file():
        where = f"{converter} is not a file" if converter else "no converter given"
        raise SurgeryError(f"gguf: {where}; pass --llama-cpp DIR (a llama.cpp checkout, which holds "
                           "convert_hf_to_gguf.py) or --converter FILE")
    built = root / "build" / "bin" / "llama-quantize" if root else None
    found = quantize or (built if built and built.is_file() else None) or shutil.which("llama-quantize")
    if found is None or not Path(found).is_file() or not os.access(found, os.X_OK):
        what = f"{quantize} is not an executable file" if quantize else "llama-quantize not found"
        raise SurgeryError(f"gguf: {what}; build llama.cpp (cmake -B build && cmake --build build --target "
                           "llama-quantize) and pass --quantize FILE, or put it on PATH")
    return LlamaCpp(converter, Path(found), python or sys.executable)


@dataclass(frozen=True)
class BitsOutput:
    source: Path  # the model bits read: what llama.cpp converts
    rules_file: Path
    layer_weights: list[int]  # weights quantized per layer
    method: str
    float_type: str  # the converter's --outtype


def bits_output(folder: Path) -> BitsOutput:
    """What a `bits` output says about its source, checked: one bits step read that source as stored (so its
    GGUF, given the file's types, is the plan's model), the type file is the one bits wrote, every matrix
    it rounds has a llama.cpp type, and the source's headers are still the ones it read."""
    record = read_provenance(folder)
    if record is None:
        raise SurgeryError(f"gguf: {folder} is not a surgery output (no surgery.json); pass a folder `surgery apply` "
                           "wrote from a bits plan")
    try:
        steps = record["plan"]["steps"]
        ops = [step["op"] for step in steps]
        fit = next((f for f in record.get("fits", []) if f["op"] == "bits"), {})
        source = Path(record["source_model"])
        recorded = next((s["header_sha256"] for s in record["sources"].values() if Path(s["path"]).resolve()
                         == source.resolve()), None)
        layer_weights = [int(n) for n in fit.get("quantized_weights") or []]
        llama_cpp = fit.get("llama_cpp") or {}
        method = str((steps[0].get("quantizer") or {}).get("method", "rtn")) if ops == ["bits"] else ""
    except (KeyError, TypeError, AttributeError, ValueError):
        raise SurgeryError(f"gguf: {folder / 'surgery.json'} is not as surgery writes it; apply the plan again") from None
    if ops != ["bits"]:
        raise SurgeryError(f"gguf: {folder}'s plan is {ops}; the GGUF is made from the model a bits step read, so the "
                           "plan must be that one step (apply earlier steps as their own plan)")
    rules_file = folder / TENSOR_TYPES_FILE
    if not rules_file.is_file() or not layer_weights or "tensor_types_sha256" not in llama_cpp:
        raise SurgeryError(f"gguf: {folder} has no {TENSOR_TYPES_FILE} or no record of it in surgery.json (written by "
                           "an older surgery); apply the plan again")
    if file_sha256(rules_file) != llama_cpp["tensor_types_sha256"]:
        raise SurgeryError(f"gguf: {rules_file} is not the file bits wrote (it was edited); apply the plan again, with "
                           "the widths you want in the plan (`manual`)")
    unfit = llama_cpp.get("unfit") or []
    if unfit:
        more = f" and {len(unfit) - 1} more" if len(unfit) > 1 else ""
        raise SurgeryError(f"gguf: no llama.cpp type holds {unfit[0]}{more}: its types' blocks are 32 or 256 weights "
                           "per row; this plan cannot be a GGUF (keep those tensors, or choose a model whose rows fit)")
    checkpoint = Checkpoint.open(source) if source.is_dir() else None
    if checkpoint is None or checkpoint.header_hashes != recorded:
        raise SurgeryError(f"gguf: {source}, the model bits read, is gone or has changed since {folder} was written; "
                           "apply the plan again")
    return BitsOutput(source, rules_file, layer_weights, method, source_float_type(checkpoint))


def source_float_type(checkpoint: Checkpoint) -> str:
    """The converter's --outtype: the source's own dtype where all its matrices share one, else f32, which holds
    float16 and bfloat16 exactly, so nothing is rounded on the way into GGUF."""
    dtypes = {t.dtype for t in checkpoint.tensors.values() if len(t.shape) >= 2}
    if not dtypes <= set(FLOAT_TYPES):
        raise SurgeryError(f"gguf: {checkpoint.path} stores matrices as {sorted(dtypes - set(FLOAT_TYPES))[0]}; the converter "
                           "takes float32, float16 or bfloat16 models")
    return FLOAT_TYPES[dtypes.pop()] if len(dtypes) == 1 else "f32"


def _run(command: list[str], what: str) -> None:
    """Run a llama.cpp tool; its failure becomes one line: the last line it printed, which names the cause."""
    done = subprocess.run(command, capture_output=True, text=True, errors="replace")
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise ToolFailed(f"gguf: {what} failed (exit {done.returncode}): {one_line(lines[-1]) if lines else 'no output'}")


def make_gguf(folder: Path, out: Path, tools: LlamaCpp, *, force: bool = False,
              log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Convert the source of bits output `folder`, quantize it with the folder's type file, check every tensor's
    type, then move the file to `out`; return the count of tensors per type. Nothing else is written: the
    intermediate files lie beside `out` under hidden names and are removed."""
    bits = bits_output(folder)
    if out.suffix != ".gguf":
        raise SurgeryError(f"gguf: {out}: name the output file *.gguf")
    if out.is_dir():
        raise SurgeryError(f"gguf: {out} is a folder; name the GGUF file to write")
    if out.exists() and not force:
        raise SurgeryError(f"gguf: {out} exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise SurgeryError(f"gguf: {out.parent} does not exist; create it first")
    for inside in (bits.source, folder):
        if out.resolve().is_relative_to(inside.resolve()):
            raise SurgeryError(f"gguf: {out} is inside {inside}, an input; write the GGUF elsewhere")
    gguf_reader()  # before the converter runs, not after
    rules = read_tensor_types(bits.rules_file)
    if bits.method != "rtn":
        log(f"gguf: llama-quantize rounds {bits.source} itself: the GGUF has the plan's widths, not {bits.method}'s "
            "integers")
    converted, partial = (out.with_name(f".{out.name}.{part}") for part in ("source", "partial"))
    try:
        log(f"gguf: converting {bits.source} ({bits.float_type}) with {tools.converter}")
        _run([tools.python, str(tools.converter), str(bits.source), "--outtype", bits.float_type,
              "--outfile", str(converted)], "convert_hf_to_gguf.py")
        base = gguf_tensors(converted)
        blocks = {int(name.split(".")[1]) for name in base if name.startswith("blk.")}
        if blocks != set(range(len(bits.layer_weights))):
            raise ToolFailed(f"gguf: the converted model has {len(blocks)} blocks, the plan {len(bits.layer_weights)} "
                             "layers; llama.cpp's converter does not map this architecture layer for layer")
        outside = [[flag, base[name].kind] for flag, name in (("--token-embedding-type", "token_embd.weight"),
                                                               ("--output-tensor-type", "output.weight")) if name in base]
        log(f"gguf: quantizing with {bits.rules_file.name} ({len(rules)} lines)")
        _run([str(tools.quantize), "--pure", "--tensor-type-file", str(bits.rules_file), *sum(outside, []),
              str(converted), str(partial), DEFAULT_QUANTIZED_TYPE], "llama-quantize")
        if not partial.is_file():
            raise ToolFailed(f"gguf: {tools.quantize} exited 0 but wrote no file; is it llama-quantize?")
        quantized = gguf_tensors(partial)
        problems = type_mismatches(rules, base, quantized, bits.layer_weights)
        if problems:
            raise ToolFailed(f"gguf: llama-quantize did not write the plan's types for {len(problems)} tensors "
                             f"({problems[0]}{'; ...' if len(problems) > 1 else ''}); nothing written")
        os.replace(partial, out)
    finally:
        for path in (converted, partial):
            path.unlink(missing_ok=True)
    return dict(sorted(Counter(t.kind for t in quantized.values()).items()))
