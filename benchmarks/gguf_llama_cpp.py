"""The GGUF path end to end in llama.cpp itself: build llama.cpp from the llama-cpp-python sdist (cmake; tens
of minutes on 2 cores the first time, so not part of the suite), make GGUFs of `bits` outputs with
`surgery gguf`, score them with llama-perplexity, and score the same tokens (llama.cpp's own, as it
tokenized the text, with its BOS handling and chunking) in transformers.

Rows: the source converted alone (is llama.cpp's run of the model transformers' run?), and per plan the
GGUF beside the dense `bits` output (the same widths; llama.cpp rounds with its own types). Checked: every
tensor has the type llama-tensor-types.txt names (`surgery gguf` refuses otherwise) and each GGUF's
perplexity is within 1% of transformers'; then, per tiny architecture, whether llama.cpp's converter takes
it and, where it does, the types hold. Exit 1 when a check fails.

    python benchmarks/gguf_llama_cpp.py [--work DIR] [--python CONVERTER_VENV_PYTHON]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SDIST = "llama-cpp-python==0.3.36"
TOOLS = ("llama-quantize", "llama-perplexity")
CONTEXT, CHUNKS = 256, 24
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma2", "phi3", "gpt2", "gpt_neox")
PLANS = {  # name -> bits step
    "8/4 by ZD, asymmetric, layer 0 kept": {"op": "bits", "score": "zd", "manual": {0: 16},
                                           "assign": {"high": 8, "low": 4, "low_fraction": 0.5},
                                           "quantizer": {"group_size": 32}},
    "4 bits, symmetric": {"op": "bits", "width": 4, "quantizer": {"group_size": 32, "symmetric": True}},
    "3/8 by LIM, symmetric": {"op": "bits", "score": "lim", "assign": {"high": 8, "low": 3, "low_fraction": 0.5},
                             "quantizer": {"group_size": 32, "symmetric": True}},
}


def run(command: list[str], **kwargs) -> str:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        sys.exit(f"{command[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done.stdout + done.stderr


def llama_cpp(work: Path) -> tuple[Path, Path]:
    """llama.cpp's source (from the sdist) and its built tools, reused when already there."""
    found = sorted(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if not found:
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(work)])
        run(["tar", "xzf", str(next(work.glob("llama_cpp_python-*.tar.gz"))), "-C", str(work)])
        found = sorted(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
    source, build = found[0], work / "build"
    if not all((build / "bin" / tool).is_file() for tool in TOOLS):
        started = time.perf_counter()
        run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_OPENSSL=OFF",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"])
        run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *TOOLS])
        print(f"built llama.cpp in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return source, build / "bin"


def converter_python(work: Path, given: str | None) -> str:
    """A venv for llama.cpp's converter: torch (the CPU build), this transformers, sentencepiece."""
    if given:
        return given
    venv = work / "converter-venv"
    python = venv / "bin" / "python"
    if not python.is_file():
        import transformers

        run([sys.executable, "-m", "venv", str(venv)])
        run([str(python), "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"])
        run([str(python), "-m", "pip", "install", "-q", f"transformers=={transformers.__version__}", "sentencepiece",
             "protobuf", "safetensors", "numpy"])
    return str(python)


def llama_perplexity(binary: Path, gguf: Path, text: Path, logits: Path | None = None) -> float:
    extra = ["--kl-divergence-base", str(logits)] if logits else []
    out = run([str(binary), "-m", str(gguf), "-f", str(text), "-c", str(CONTEXT), "-b", str(CONTEXT),
               "--chunks", str(CHUNKS), "-t", str(os.cpu_count() or 2), *extra])
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", out)[1])


def saved_tokens(logits: Path) -> np.ndarray:
    """The tokens llama-perplexity scored, from its --kl-divergence-base file: '_logits_', n_ctx, n_vocab,
    n_chunk, then the tokens (int32), as llama.cpp tokenized the text."""
    data = logits.read_bytes()
    assert data[:8] == b"_logits_", logits
    n_ctx, _, n_chunk = struct.unpack("<3i", data[8:20])
    return np.frombuffer(data, dtype="<i4", count=n_ctx * n_chunk, offset=20).reshape(n_chunk, n_ctx)


def transformers_perplexity(folder: Path, chunks: np.ndarray, bos: int | None) -> float:
    """llama-perplexity's own measure in transformers: each chunk starts with BOS where llama.cpp adds one,
    and only its second half is scored (each token after the first n_ctx/2 predicted from all before it)."""
    from surgery.evaluation.loading import load_for_eval

    model = load_for_eval(folder, "cpu", "float32").model
    first, total, count = CONTEXT // 2, 0.0, 0
    with torch.no_grad():
        for chunk in chunks:
            ids = torch.tensor(chunk, dtype=torch.long)
            if bos is not None:
                ids[0] = bos
            logits = model(ids[None]).logits[0, first:-1].double()
            total -= logits.log_softmax(-1).gather(1, torch.tensor(chunk[first + 1:], dtype=torch.long)[:, None]).sum().item()
            count += len(chunk) - first - 1
    return math.exp(total / count)


def bos_added(gguf: Path, chunks: np.ndarray) -> int | None:
    """llama.cpp's BOS token where it adds one (its first token of the text is BOS), else None."""
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.ggml.bos_token_id")
    bos = int(field.parts[field.data[0]][0]) if field else None
    return bos if bos is not None and chunks[0, 0] == bos else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("SURGERY_CACHE", "/tmp")) / "llama-cpp")
    parser.add_argument("--python", help="a Python with llama.cpp's converter requirements (default: a venv made in --work)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    source, bin_dir = llama_cpp(args.work)
    python = converter_python(args.work, args.python)
    from surgery.demo_models import demo_model
    from surgery.evaluation.data import load_text

    base = demo_model("base")
    runs = args.work / "runs"
    runs.mkdir(exist_ok=True)
    text = runs / "mixed-heldout.txt"
    text.write_text(load_text("builtin:mixed-heldout").text[:200_000])
    env = {**os.environ, "LLAMA_CPP": str(source)}
    gguf_command = [sys.executable, "-m", "surgery", "gguf", "--converter", str(REPO / "benchmarks" / "llama_cpp_convert.py"),
                    "--python", python, "--quantize", str(bin_dir / "llama-quantize"), "--force"]

    converted = runs / "source.gguf"
    run([python, str(REPO / "benchmarks" / "llama_cpp_convert.py"), str(base), "--outtype", "f32", "--outfile", str(converted)],
        env=env)
    chunks = saved_tokens_of(bin_dir, converted, text, runs)
    bos = bos_added(converted, chunks)
    tokens_agree = same_tokens(base, text, chunks, bos)
    rows, failed = [], False
    reference = llama_perplexity(bin_dir / "llama-perplexity", converted, text)
    rows.append(("source (f32), converted alone", "f32 only", reference, transformers_perplexity(base, chunks, bos)))
    for name, step in PLANS.items():
        plan, out, gguf = runs / f"plan-{len(rows)}.yaml", runs / f"out-{len(rows)}", runs / f"out-{len(rows)}.gguf"
        plan.write_text(yaml.safe_dump({"base": str(base), "steps": [step]}))
        run([sys.executable, "-m", "surgery", "apply", str(plan), "--out", str(out), "--force"])
        done = subprocess.run([*gguf_command, str(out), str(gguf)], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(f"{name}: {done.stderr.strip().splitlines()[-1]}", file=sys.stderr)
            rows.append((name, "refused", math.nan, transformers_perplexity(out, chunks, bos)))
            failed = True
            continue
        types = done.stdout.strip().split(": ", 1)[1]
        rows.append((name, types, llama_perplexity(bin_dir / "llama-perplexity", gguf, text),
                     transformers_perplexity(out, chunks, bos)))
    print(f"llama.cpp from {SDIST}; demo base model; {CHUNKS} chunks of {CONTEXT} tokens of builtin:mixed-heldout, "
          f"as llama.cpp tokenized them (BOS {'added' if bos is not None else 'not added'}; {tokens_agree}), "
          "second halves scored\n")
    print("| model | GGUF tensor types (checked against the type file) | llama.cpp perplexity | transformers perplexity "
          "(dense output) | difference |")
    print("|---|---|---|---|---|")
    for name, types, ours, theirs in rows:
        difference = ours / theirs - 1
        failed |= not abs(difference) <= 0.01
        print(f"| {name} | {types} | {ours:.4f} | {theirs:.4f} | {difference:+.2%} |")
    print("\nThe tiny architectures (random weights: types only), every layer at 4 bits, symmetric, groups of 16:\n")
    print("| architecture | `surgery gguf` |\n|---|---|")
    for arch in ARCHITECTURES:
        plan, out = runs / f"{arch}.yaml", runs / arch
        plan.write_text(yaml.safe_dump({"base": str(demo_model(f"tiny-{arch}")), "steps": [
            {"op": "bits", "width": 4, "quantizer": {"group_size": 16, "symmetric": True}}]}))
        run([sys.executable, "-m", "surgery", "apply", str(plan), "--out", str(out), "--force"])
        done = subprocess.run([*gguf_command, str(out), str(runs / f"{arch}.gguf")], capture_output=True, text=True, env=env)
        said = (done.stdout if done.returncode == 0 else done.stderr).strip().splitlines()[-1]
        failed |= "did not write the plan's types" in said  # the type file's fault; a converter failure is not
        cache = os.environ.get("SURGERY_CACHE")
        said = said.replace(str(runs) + "/", "").replace(cache or "\0", "$SURGERY_CACHE")
        print(f"| {arch} | {said} |")
    sys.exit(1 if failed else 0)


def same_tokens(base: Path, text: Path, chunks: np.ndarray, bos: int | None) -> str:
    """Whether transformers' tokenizer gives llama.cpp's tokens (the converter's tokenizer metadata is right)."""
    from transformers import AutoTokenizer

    ours = chunks.reshape(-1)[1 if bos is not None else 0:]
    theirs = AutoTokenizer.from_pretrained(base)(text.read_text())["input_ids"][:len(ours)]
    differ = np.flatnonzero(np.asarray(theirs) != ours)
    return "transformers' tokenizer gives the same tokens" if not len(differ) else \
        f"transformers' tokenizer first differs at token {differ[0]} ({len(differ)} of {len(ours)} differ)"


def saved_tokens_of(bin_dir: Path, gguf: Path, text: Path, runs: Path) -> np.ndarray:
    logits = runs / "source.logits"
    llama_perplexity(bin_dir / "llama-perplexity", gguf, text, logits)
    return saved_tokens(logits)


if __name__ == "__main__":
    main()
