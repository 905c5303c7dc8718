"""`surgery demo`: build the trained demo models, apply every example plan, show what each did; or, with
--model, run the example plans that fit on the user's own model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from surgery.cli.app import app
from surgery.cli.console import console, err_console, print_json
from surgery.cli.options import Device, Json, ModelHelp, model_folder
from surgery.formatting import human_bytes


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Where the demo writes its edited models.")] = Path(
        "surgery-demo"
    ),
    model: Annotated[str | None, typer.Option(
        "--model", help=f"Run the example plans that fit on this model instead of the demo models: {ModelHelp}",
    )] = None,
    device: Device = "auto",
    as_json: Json = False,
) -> None:
    """Build (or reuse) the small trained demo models, apply the example plans, and show what each did."""
    from surgery.demo_models import TRAINED, demo_model, example_plans

    say = (err_console if as_json else console).print  # with --json, stdout holds the JSON alone
    if model is None:
        for name in TRAINED:
            demo_model(name, log=say)
        say(f"demo models: {', '.join(str(demo_model(n)) for n in TRAINED)}")
        runs: list[tuple[str, Path | str]] = [(plan.stem, plan) for plan in example_plans()]
    else:
        runs = _fitted_runs(model, out_dir, say)
    rows = [{"plan": name, "skipped": plan} if isinstance(plan, str)
            else _run(name, plan, out_dir / name, device, say, own_model=model is not None) for name, plan in runs]
    if as_json:
        print_json({"plans": rows})
        return
    _print_rows(rows)
    written = next((r["output"] for r in rows if "output" in r), None)
    if written:
        console.print(f"edited models are in {out_dir}/; try `surgery inspect {written}`",
                      markup=False, highlight=False)


def _print_rows(rows: list[dict[str, Any]]) -> None:
    """One table row per plan and text (narrow enough for 80 columns), then what each plan did and its
    layer map in full, wrapped, never cut off."""
    from rich import box
    from rich.table import Table

    table = Table("plan", "layers", "size", "time", "text", "ppl", "ref", "change", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, padding=(0, 1, 0, 0),
                  title="example plans: perplexity (ppl) on held-out text beside the reference model's (ref)")
    for column in table.columns:
        column.overflow = "fold"
    for row in rows:
        scores = row.get("scores") or [None]
        for i, score in enumerate(scores):
            if i > 0:
                first = ["", "", "", ""]
            elif "skipped" in row:
                first = [row["plan"], "skipped", "", ""]
            else:
                first = [row["plan"], row["layers"], human_bytes(row["bytes"]), f"{row['seconds']:.1f}s"]
            if score is None:
                table.add_row(*first, "", "", "", "")
                continue
            change = 100 * (score["perplexity"] / score["reference"] - 1)
            table.add_row(*first, score["data"].removeprefix("builtin:").removesuffix("-heldout"),
                          f"{score['perplexity']:.1f}", f"{score['reference']:.1f}", f"{change:+.1f}%")
    console.print(table)
    skipped: dict[str, list[str]] = {}
    for row in rows:
        if "skipped" in row:
            skipped.setdefault(row["skipped"], []).append(row["plan"])
        else:
            label = "Layers: " if row["layers"] else ""  # an ensemble's description says what it is made of
            console.print(f"{row['plan']}: {row['about']}. {label}{row['layer_map']}", markup=False, highlight=False)
    for reason, names in skipped.items():
        console.print(f"skipped {', '.join(names)}: {reason}", markup=False, highlight=False)


def _fitted_runs(model: str, out_dir: Path, say: Any) -> list[tuple[str, Path | str]]:
    """Each example plan written for `model` into OUT_DIR/plans/ (so it can be re-run), or why it does not fit."""
    import yaml

    from surgery.checkpoint.reader import read_config
    from surgery.demo_models.plans import example_plans, fitted_plan, summary
    from surgery.errors import SurgeryError
    from surgery.evaluation.models import require_causal_lm
    from surgery.formats.inspection import inspect

    folder = model_folder(model)
    ref = str(folder) if Path(model).expanduser().is_dir() else model  # a Hub id stays one, for the card
    depth = inspect(folder).get("layers")
    if not isinstance(depth, int):
        raise SurgeryError(f"{model}: the example plans edit one model's layers; {folder} is an ensemble")
    try:
        require_causal_lm(read_config(folder), folder)
        scored = True
    except SurgeryError as e:
        scored = False
        say(f"{e}: the plans are applied without their evaluate: sections")
    say(f"{model}: {depth} layers; the example plans that fit it, written to {out_dir / 'plans'}/")
    (out_dir / "plans").mkdir(parents=True, exist_ok=True)
    runs: list[tuple[str, Path | str]] = []
    for example in example_plans():
        plan = fitted_plan(example, ref, depth, (out_dir / example.stem).resolve(), scored)
        if isinstance(plan, str):
            runs.append((example.stem, plan))
            continue
        path = out_dir / "plans" / example.name
        path.write_text(f"# {summary(example)}. (plans/{example.name}, fitted to {model}: {depth} layers, by "
                        f"`surgery demo --model`)\n" + yaml.safe_dump(plan, sort_keys=False))
        runs.append((example.stem, path))
    return runs


def _run(name: str, plan: Path, out: Path, device: str, say: Any, own_model: bool) -> dict[str, Any]:
    """Apply one plan and say what it did; on the user's own model a plan the planner refuses is skipped
    with its reason (on the demo models a refusal is a bug, and raised)."""
    from surgery.demo_models.plans import summary
    from surgery.errors import SurgeryError
    from surgery.pipeline import apply
    from surgery.recipe.view import format_layer_map

    say(f"{name}: editing{' and scoring' if 'evaluate:' in plan.read_text() else ''} ...")
    start = time.perf_counter()
    try:
        result = apply(plan, out=out, force=True, device=device)
    except SurgeryError as e:
        if not own_model:
            raise
        return {"plan": name, "skipped": str(e)}
    seconds = time.perf_counter() - start  # the whole step: fits, writing and scoring
    recipe = result.recipe
    datasets = result.evaluation.datasets if result.evaluation else []
    return {"plan": name, "about": summary(plan), "output": str(out),
            "layer_map": recipe.description or format_layer_map(recipe.layer_map()),
            "layers": "" if recipe.description else f"{recipe.view.layout.num_layers} -> {len(recipe.view.layers)}",
            "bytes": recipe.total_bytes, "seconds": round(seconds, 2),
            "scores": [{"data": d.data, "perplexity": d.perplexity, "reference": d.base_perplexity} for d in datasets]}
