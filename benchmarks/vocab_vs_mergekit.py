"""Merges of models whose vocabularies differ, through surgery and through mergekit 0.1.5, one mergekit
config run as it is by both tools: the demo models, with `plus` (the prose model with three added tokens,
its embeddings resized by transformers) and `renumbered` (the prose model with two tokens' ids
exchanged, its rows exchanged to match), built as tests/test_vocabularies.py builds them.

    python benchmarks/vocab_vs_mergekit.py [--mergekit-venv /tmp/mk-venv]

Per config: whether both outputs' tokenizers hold the same tokens at the same ids, and the largest
|surgery - mergekit| over every tensor, the token-indexed ones compared row by token.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from merges_vs_mergekit import mergekit_yaml, weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from surgery.demo_models import demo_model  # noqa: E402
from tests.test_vocabularies import _renumbered, _with_added_tokens  # noqa: E402

CONFIGS = {  # name: (mergekit config body, the fine-tune merged with code)
    "task_arithmetic, tokenizer_source: union": ("merge_method: task_arithmetic\ntokenizer_source: union", "plus"),
    "task_arithmetic, tokenizer_source: base": ("merge_method: task_arithmetic\ntokenizer_source: base", "plus"),
    "task_arithmetic, tokenizer_source: plus": ("merge_method: task_arithmetic\ntokenizer_source: {plus}", "plus"),
    "ties, tokenizer_source: base (renumbered)": ("merge_method: ties\ntokenizer_source: base", "renumbered"),
    "linear, tokenizer_source: union": ("merge_method: linear\ntokenizer_source: union", "plus"),
}


def vocabulary(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(str(folder)).get_vocab())


def largest_error(ours: Path, theirs: Path) -> tuple[bool, float]:
    mine, other = vocabulary(ours), vocabulary(theirs)
    tokens = sorted(mine, key=mine.__getitem__)
    a, b = weights(ours), weights(theirs)
    worst = 0.0
    for name, x in a.items():
        y = b[name]
        if x.shape[:1] == (len(tokens),) and set(mine) == set(other) and x.shape != (1,):
            x, y = x[torch.tensor([mine[t] for t in tokens])], y[torch.tensor([other[t] for t in tokens])]
        worst = max(worst, float((x.float() - y.float()).abs().max()))
    return mine == other, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mergekit-venv", type=Path, default=Path(tempfile.gettempdir()) / "mk-venv")
    args = parser.parse_args()
    exe = mergekit_yaml(args.mergekit_venv)
    work = Path(tempfile.mkdtemp())
    models = {name: demo_model(name) for name in ("base", "prose", "code")}
    models["plus"] = _with_added_tokens(models["prose"], work / "plus")
    models["renumbered"] = _renumbered(models["prose"], work / "renumbered")
    print("| config | same tokens at the same ids | largest error |")
    print("|---|---|---|")
    for label, (body, tuned) in CONFIGS.items():
        config = work / "merge.yaml"
        density = ", density: 0.5" if body.startswith("merge_method: ties") else ""
        config.write_text(body.format(**models) + f"\nbase_model: {models['base']}\ndtype: float32\nmodels:\n"
                          f"  - {{model: {models[tuned]}, parameters: {{weight: 0.7{density}}}}}\n"
                          f"  - {{model: {models['code']}, parameters: {{weight: 0.4{density}}}}}\n"
                          + (f"  - {{model: {models['base']}, parameters: {{weight: 0.2}}}}\n"
                             if body.startswith("merge_method: linear") else ""))
        for out in ("ours", "theirs"):
            subprocess.run(["rm", "-rf", str(work / out)], check=True)
        for cmd in ([sys.executable, "-m", "surgery", "apply", str(config), "--out", str(work / "ours"), "--no-fsync"],
                    [str(exe), str(config), str(work / "theirs"), "--quiet"]):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{label}: {cmd[0]} failed: {done.stderr.strip().splitlines()[-1]}")
        same, worst = largest_error(work / "ours", work / "theirs")
        print(f"| {label} | {'yes' if same else 'no'} | {worst:.2e} |", flush=True)
    subprocess.run(["rm", "-rf", str(work)], check=True)


if __name__ == "__main__":
    main()
