"""The task-vector table of docs/task-vectors.md: held-out perplexity of each merge of the demo models.

    python benchmarks/task_vectors_table.py [--max-tokens 8192] [--device cpu]

Builds the demo models if needed, applies each plan below with `surgery` into a temporary folder,
and scores every model on the same held-out prose, code and mixed text (the texts the models, and
the aTLAS fit, never saw), and on the mixed dev text the aTLAS coefficients are learned from. Task arithmetic is shown at the uniform weight that scores best on the
mixed text over a grid of 0.1 ... 1.0 (a choice made on the test text itself, so a generous baseline).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from surgery import pipeline
from surgery.demo_models import demo_model
from surgery.evaluation.run import EvalSettings, evaluate

DATA = ("builtin:prose-heldout", "builtin:code-heldout", "builtin:mixed-heldout", "builtin:mixed-dev")


def plans(base: Path, prose: Path, code: Path) -> dict[str, str]:
    both = f"[{prose}, {code}]"
    return {
        "TIES (density 0.2, lambda 1)": f"base: {base}\nsteps:\n  - op: ties\n    models: {both}\n",
        "LiNeS on prose (alpha 0.2)": f"model: {prose}\nbase: {base}\nsteps:\n  - op: lines\n    alpha: 0.2\n",
        "task arithmetic + LiNeS (beta 0.5, alpha default)":
            f"base: {base}\nsteps:\n  - op: task_arithmetic\n    models: {both}\n  - op: lines\n    beta: 0.5\n",
        **{f"aTLAS per {granularity}, learned on mixed-dev":
           f"base: {base}\nsteps:\n  - op: atlas\n    granularity: {granularity}\n    models: {both}\n"
           "    learn: {data: builtin:mixed-dev, steps: 100}\n" for granularity in ("tensor", "layer", "module")},
    }


def task_arithmetic(base: Path, prose: Path, code: Path, weight: float) -> str:
    return (f"base: {base}\nsteps:\n  - op: task_arithmetic\n    models:\n"
            f"      - {{model: {prose}, weight: {weight}}}\n      - {{model: {code}, weight: {weight}}}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    settings = EvalSettings(data=DATA, max_tokens=args.max_tokens, window=None, stride=None, batch_size=4,
                            device=args.device, dtype="float32")
    base, prose, code = (demo_model(name) for name in ("base", "prose", "code"))

    def score(folder: Path) -> list[float]:
        return [d.perplexity for d in evaluate(folder, settings).datasets]

    def apply(body: str, work: Path) -> list[float]:
        plan = work / "plan.yaml"
        plan.write_text(f"output: {work / 'out'}\n{body}")
        return score(pipeline.apply(plan, device=args.device, force=True, fsync=False).output)

    rows = {"base": score(base), "prose specialist": score(prose), "code specialist": score(code)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        grid = {w / 10: apply(task_arithmetic(base, prose, code, w / 10), work) for w in range(1, 11)}
        best = min(grid, key=lambda w: grid[w][2])
        rows[f"task arithmetic, best uniform weight ({best:g})"] = grid[best]
        for name, body in plans(base, prose, code).items():
            rows[name] = apply(body, work)
    print(f"held-out perplexity, first {args.max_tokens} tokens of each text, float32 on {args.device}\n")
    print("| model | prose | code | mixed | mixed-dev (aTLAS' fit text) |")
    print("|---|---|---|---|---|")
    for name, scores in rows.items():
        print(f"| {name} | " + " | ".join(f"{s:.1f}" for s in scores) + " |")
    print("\ntask arithmetic grid (mixed): " + ", ".join(f"{w:g}: {s[2]:.1f}" for w, s in grid.items()))


if __name__ == "__main__":
    main()
