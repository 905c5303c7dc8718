"""`surgery analyze`: per-layer importance and redundancy, and plans suggested from them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surgery.cli.app import app
from surgery.cli.console import console, err_console, print_json
from surgery.cli.options import Data, Device, Json, MaxMemory, ModelHelp, model_folder, parse_max_memory
from surgery.errors import SurgeryError


@app.command()
def analyze(
    model: Annotated[str, typer.Argument(metavar="MODEL", help=ModelHelp)],
    data: Data = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Calibration rows measured (a quarter more are held out for --suggest).")] = 32,
    seq_len: Annotated[int, typer.Option("--seq-len", min=2, help="Tokens per row.")] = 256,
    device: Device = "auto",
    max_memory: MaxMemory = None,
    as_json: Json = False,
    plot: Annotated[Path | None, typer.Option("--plot", metavar="FILE.png", help="Depth profiles and the i/i+n distance heat map.")] = None,
    suggest: Annotated[str | None, typer.Option("--suggest", metavar="drop=N|bits=AVG|tie=B", help="Write a plan from the measurements.")] = None,
    candidates: Annotated[int, typer.Option("--candidates", min=1, help="drop: layers (lowest BI) scored at each step.")] = 8,
    write_plan: Annotated[Path | None, typer.Option("--write-plan", metavar="FILE.yaml", help="Where the suggested plan goes.")] = None,
    search_chain: Annotated[bool, typer.Option("--search-chain", help="Search chains with skips and repeats (CoLa).")] = False,
    budget: Annotated[float, typer.Option("--budget", min=0.0, help="--search-chain: seconds to spend.")] = 60.0,
    length_penalty: Annotated[float, typer.Option("--length-penalty", min=0.0, help="--search-chain: added to the mean loss per 1x of the original depth.")] = 0.05,
) -> None:
    """Per-layer importance (BI, LIM, ZD, residual contributions), redundancy between layers, and plans
    suggested from them."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from surgery.analysis import chain_search, measure, suggestions

    spec = suggestions.parse_spec(suggest) if suggest else None
    if spec is not None and search_chain:
        raise SurgeryError("give --suggest or --search-chain, not both: each writes one plan")
    session = measure.analyze(model_folder(model), data or ["builtin"], samples, seq_len, device,
                              parse_max_memory(max_memory))
    analysis = session.analysis
    if plot is not None:
        from surgery.analysis.plot import plot_analysis

        plot_analysis(analysis, plot)
    out = err_console if as_json else console
    log = lambda line: out.print(line, markup=False)  # noqa: E731
    suggestion = None
    if spec is not None:
        suggestion = suggestions.suggest(session, spec, candidates, log)
    elif search_chain:
        with Progress(TextColumn("searching chains"), BarColumn(), TimeRemainingColumn(), console=err_console.instance(),
                      disable=not err_console.is_terminal) as bar:
            task = bar.add_task("search", total=1.0)
            suggestion = chain_search.search_chain(session, budget, length_penalty,
                                                   lambda done: bar.update(task, completed=done), log)
    if suggestion is not None and write_plan is not None:
        write_plan.write_text(suggestion.plan)
    if as_json:
        print_json(analysis.to_dict() | ({"suggestion": suggestion.to_dict()} if suggestion is not None else {}))
        return
    ranks = analysis.bi_ranks()
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    table = Table("layer", "rank (BI)", "bi", "lim", "zd", "attn/h", "mlp/h", "layer/h",
                  title=f"{model}: {analysis.tokens:,} calibration tokens")
    for m in analysis.layers:
        table.add_row(str(m.index), str(ranks[m.index]), fmt(m.bi), fmt(m.lim), fmt(m.zd), fmt(m.attn), fmt(m.mlp), fmt(m.layer))
    console.print(table)
    for n, start in analysis.best_blocks.items():
        console.print(f"most redundant block of {n}: layers {start}-{start + n - 1} "
                      f"(angular distance {analysis.distances[n][start]:.4f})")
    if suggestion is not None:
        console.print(f"suggested plan ({suggestion.kind}):")
        console.print(suggestion.plan, markup=False, highlight=False)
        if write_plan is not None:
            console.print(f"written to {write_plan}")
