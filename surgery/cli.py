"""The `surgery` command: parse, call the library, render with rich. No logic lives here."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from surgery.errors import SurgeryError
from surgery.formatting import human_bytes
from surgery.version import __version__

if TYPE_CHECKING:
    from surgery.plan.resolve import Recipe

app = typer.Typer(
    name="surgery",
    help="Model surgery on Hugging Face checkpoints from declarative YAML plans, streamed tensor by tensor.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class _LazyConsole:
    """rich's Console, imported at first use: a `--json` run into a pipe never needs rich, whose
    import is a tenth of the CLI's start-up."""

    def __init__(self, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console: Any = None

    def instance(self) -> Any:
        """The Console itself, for rich objects that take one."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.instance(), name)


console: Any = _LazyConsole()
err_console: Any = _LazyConsole(stderr=True)
_state = {"debug": False}

Device = Annotated[str, typer.Option(help="Where computed tensors are made: auto (CUDA when present), cpu, cuda.")]


def _version(value: bool) -> None:
    if value:
        console.print(f"surgery {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    _state["debug"] = debug


@app.command()
def apply(
    plan: Annotated[Path, typer.Argument(metavar="PLAN.yaml", help="The plan YAML file.")],
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: the plan's `output`).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder (or discard an interrupted run's).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run: its finished shards are re-hashed and kept.")] = False,
    device: Device = "auto",
    shard_size: Annotated[str, typer.Option("--shard-size", help="Largest shard, e.g. 5GB, 500MB.")] = "5GB",
    fsync: Annotated[
        bool, typer.Option("--fsync/--no-fsync", help="Flush the output to disk before it appears (survives power loss).")
    ] = True,
    push_to: Annotated[str | None, typer.Option("--push", metavar="REPO_ID",
                                                help="Push the output to this Hub repo after it is written (and scored).")] = None,
) -> None:
    """Validate a plan against the real checkpoints, then stream the edit into the output folder."""
    from surgery.execute import execute
    from surgery.plan.resolve import resolve

    recipe = resolve(plan, out, device)
    push_repo = push_to or (recipe.plan.push.repo if recipe.plan.push else None)
    if push_repo is not None:
        from surgery.hub import ready_to_push

        ready_to_push(push_repo)  # before the work, not after it
    start = time.perf_counter()
    with _byte_progress(recipe.total_bytes, f"writing {recipe.output}") as advance, _terminate_as_interrupt():
        written = execute(
            recipe, force=force, resume=resume, max_shard_size=_shard_size(shard_size), device=device, fsync=fsync,
            on_bytes=advance, log=_log,
        )
    elapsed = time.perf_counter() - start
    _print_recipe(recipe, shard_size)
    console.print(f"[green]wrote[/] {written} in {elapsed:.2f}s")
    if recipe.plan.evaluate is not None:
        from surgery.pipeline import evaluate_output

        print_eval(evaluate_output(recipe, device))
    if push_repo is not None:
        section = recipe.plan.push
        _push(written, push_repo, private=bool(section and section.private), revision=section.revision if section else None)


@app.command()
def verify(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="An output folder of `surgery apply`, or any model folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the checks as JSON.")] = False,
) -> None:
    """Re-open every shard and check headers, offsets, index, sizes and the hashes recorded in surgery.json;
    exit 0 only when all hold (1 when one does not)."""
    from surgery.verify import verify as verify_folder

    checks = verify_folder(folder)
    failed = [c for c in checks if not c.ok]
    if as_json:
        _print_json({"ok": not failed, "checks": [vars(c) for c in checks]})
    else:
        from rich.table import Table

        table = Table(title=f"verify {folder}")
        for column in ("", "what", "found"):
            table.add_column(column, overflow="fold")
        for check in checks:
            table.add_row("[green]ok[/]" if check.ok else "[red]FAIL[/]", check.subject, check.detail)
        console.print(table)
        console.print(f"[red]{len(failed)} check(s) failed[/]" if failed else f"[green]all {len(checks)} checks hold[/]")
    if failed:
        raise typer.Exit(1)


@app.command()
def push(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="An output folder of `surgery apply`.")],
    repo_id: Annotated[str, typer.Argument(metavar="REPO_ID", help="OWNER/NAME on the Hub (created if needed).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", metavar="BRANCH", help="Push to this branch (created if needed).")] = None,
    commit_message: Annotated[str | None, typer.Option("--commit-message", metavar="TEXT")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would go up, show the card, send nothing.")] = False,
) -> None:
    """Upload an output folder (weights, config, tokenizer, surgery.json, model card) to the Hugging Face Hub."""
    if dry_run:
        from rich.table import Table

        from surgery.card import CARD_NAME
        from surgery.hub import upload_list

        files = upload_list(folder)
        table = Table("file", "bytes", title=f"would upload to {repo_id}")
        for name, size in files:
            table.add_row(name, human_bytes(size))
        console.print(table)
        console.print(f"{len(files)} files, {human_bytes(sum(s for _, s in files))}; nothing sent. The card:")
        console.print((folder / CARD_NAME).read_text(), markup=False, highlight=False)
        return
    _push(folder, repo_id, private=private, revision=revision, commit_message=commit_message, create_pr=create_pr)


def _push(folder: Path, repo_id: str, **options: Any) -> None:
    from surgery.hub import push as push_folder

    result = push_folder(folder, repo_id, **options)
    console.print(f"[green]pushed[/] {result.files} files ({human_bytes(result.bytes)}) to {repo_id}: {result.url}")


@app.command()
def materialize(
    compact: Annotated[Path, typer.Argument(metavar="COMPACT", help="A compact recursive model (written by `tie`).")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Where the standard checkpoint goes.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder (or discard an interrupted run's).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run: its finished shards are re-hashed and kept.")] = False,
    device: Device = "auto",
    shard_size: Annotated[str, typer.Option("--shard-size", help="Largest shard, e.g. 5GB, 500MB.")] = "5GB",
) -> None:
    """Write a compact recursive model as a standard checkpoint plain transformers loads (each depth:
    its shared layer + B A)."""
    from surgery.checkpoint.reader import read_config
    from surgery.execute import execute
    from surgery.formats.recursive import is_compact
    from surgery.ops.materialize import MaterializeStep
    from surgery.plan.resolve import resolve
    from surgery.plan.schema import Plan

    if not is_compact(read_config(compact)):
        raise SurgeryError(f"{compact} is not a compact recursive model (its config.json has no surgery_recursive)")
    plan = Plan(model=str(compact.resolve()), steps=[MaterializeStep(op="materialize")])
    recipe = resolve(plan, out, device)
    with _byte_progress(recipe.total_bytes, f"writing {recipe.output}") as advance, _terminate_as_interrupt():
        written = execute(recipe, force=force, resume=resume, max_shard_size=_shard_size(shard_size), device=device,
                          on_bytes=advance, log=_log)
    console.print(f"[green]wrote[/] {written}")


@app.command()
def check(
    plan: Annotated[Path, typer.Argument(metavar="PLAN.yaml", help="The plan YAML file.")],
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: the plan's `output`).")] = None,
    shard_size: Annotated[str, typer.Option("--shard-size", help="Largest shard, e.g. 5GB, 500MB.")] = "5GB",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    device: Device = "auto",
) -> None:
    """Validate a plan (headers, plus the data its fits need) and print what would be written.
    Exit 0 when valid, 2 when not."""
    from surgery.plan.resolve import resolve

    recipe = resolve(plan, out, device)
    if as_json:
        shards = recipe.shards(_shard_size(shard_size))
        summary = recipe.provenance() | {
            "output": str(recipe.output),
            "shards": [{"file": s.filename, "tensors": len(s.names)} for s in shards],
            "recipe": [
                {"name": name, "dtype": r.dtype, "shape": list(r.shape), "from": r.describe()}
                for name, r in recipe.tensors.items()
            ],
        }
        _print_json(summary)
        return
    _print_recipe(recipe, shard_size)
    console.print("[green]plan is valid[/]")


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="A model folder (config.json + *.safetensors).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Architecture, layers, per-layer tensor groups, dtypes, parameter count, bytes and shards."""
    from rich.table import Table

    from surgery.checkpoint.reader import Checkpoint
    from surgery.formats.inspection import describe

    info = describe(Checkpoint.open(model))
    if as_json:
        _print_json(info)
        return
    console.print(f"[bold]{info['path']}[/]  {info['architecture']} ({info['model_type']})")
    console.print(
        f"{info['layers']} layers under {info['layer_prefix']}.N ({info['layer_count_key']}), "
        f"{info['parameters']:,} parameters, {human_bytes(info['bytes'])} in {len(info['shards'])} shard(s), "
        f"dtypes {', '.join(f'{k} x{v}' for k, v in info['dtypes'].items())}, tied embeddings: "
        f"{info['tie_word_embeddings']}"
    )
    if "recursive" in info:
        recursive = info["recursive"]
        relaxed = ", ".join(f"{s} r{r}" for s, r in recursive["relaxed"].items()) or "none"
        console.print(f"compact recursive: {info['layers']} shared layers looped to {len(recursive['loop_map'])} depths "
                      f"(loop map {recursive['loop_map']}); relaxed: {relaxed}")
    table = Table("per-layer tensor", "dtype", "shape", "layers", "bytes", title="layer tensors")
    for group in info["layer_groups"]:
        table.add_row(group["suffix"], group["dtype"], str(group["shape"]), str(group["layers"]), human_bytes(group["bytes"]))
    console.print(table)
    table = Table("tensor", "dtype", "shape", "bytes", title="outside the layers")
    for tensor in info["outside_layers"]:
        table.add_row(tensor["name"], tensor["dtype"], str(tensor["shape"]), human_bytes(tensor["bytes"]))
    console.print(table)
    table = Table("shard", "tensors", "bytes", title="shards")
    for shard in info["shards"]:
        table.add_row(shard["file"], str(shard["tensors"]), human_bytes(shard["bytes"]))
    console.print(table)


@app.command("eval")
def eval_(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="A model folder surgery can load.")],
    data: Annotated[
        list[str] | None,
        typer.Option("--data", help="builtin (Python's docs), builtin:prose-heldout|code-heldout|mixed-heldout, "
                     "or a .txt/.jsonl file; repeat for several."),
    ] = None,
    compare: Annotated[
        Path | None,
        typer.Option("--compare", metavar="BASE", help="Score BASE on the same tokens [a surgery output's source model]."),
    ] = None,
    no_compare: Annotated[bool, typer.Option("--no-compare", help="Score MODEL alone.")] = False,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=2, help="Score the first N tokens of each text.")] = 8192,
    window: Annotated[int | None, typer.Option("--window", min=2, help="Tokens per window [min(2048, context)].")] = None,
    stride: Annotated[int | None, typer.Option("--stride", min=1, help="New tokens per window [window / 2].")] = None,
    device: Device = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto (bf16/fp16 on GPU, fp32 on CPU), float32, bfloat16, float16.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Windows per forward pass.")] = 4,
    tasks: Annotated[
        str | None,
        typer.Option("--tasks", help="lm-eval tasks, NAME[,NAME] or task .yaml files (needs surgery[lm-eval])."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Perplexity (sliding window) and tokens/s of a model, beside a base model on the same tokens."""
    from surgery.evaluation.run import EvalSettings, evaluate, source_of

    task_list = tuple(t.strip() for t in (tasks or "").split(",") if t.strip())
    settings = EvalSettings(tuple(data or ["builtin"]), max_tokens, window, stride, batch_size, device, dtype, task_list)
    reference = None if no_compare else compare or source_of(model)
    report = evaluate(model, settings, reference)
    if as_json:
        _print_json(report.to_dict())
    else:
        print_eval(report)


def print_eval(report: Any) -> None:
    """A table: one row per text, the model beside its reference."""
    from rich.table import Table

    table = Table("data", "tokens", "perplexity", "reference", "delta", title=f"perplexity of {report.model}")
    for d in report.datasets:
        base = "" if d.base_perplexity is None else f"{d.base_perplexity:.3f}"
        delta = "" if d.delta is None else f"{d.delta:+.3f}"
        table.add_row(d.data, str(d.tokens), f"{d.perplexity:.3f}", base, delta)
    console.print(table)
    console.print(
        f"{report.parameters:,} parameters on {report.device} ({report.dtype}), window {report.window}, "
        f"stride {report.stride}: {report.tokens_per_second:,.0f} tokens/s"
    )
    if report.base:
        console.print(f"reference: {report.base} ({report.base_tokens_per_second:,.0f} tokens/s)")
    if report.tasks:
        table = Table("task", "metric", "value", "reference", title="lm-eval tasks")
        for task, metrics in report.tasks.items():
            for metric, value in metrics.items():
                base = (report.base_tasks or {}).get(task, {}).get(metric)
                table.add_row(task, metric, f"{value:.4f}", "" if base is None else f"{base:.4f}")
        console.print(table)


@app.command("diff")
def diff_(
    a: Annotated[Path, typer.Argument(metavar="A", help="The reference checkpoint (e.g. the base).")],
    b: Annotated[Path, typer.Argument(metavar="B", help="The checkpoint compared with it.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    top: Annotated[int, typer.Option("--top", min=0, help="How many most-changed tensors to list.")] = 10,
    plot: Annotated[Path | None, typer.Option("--plot", metavar="FILE.png", help="Heat map of per-layer, "
                                              "per-module relative change (needs surgery[plot]).")] = None,
    include: Annotated[str | None, typer.Option("--include", metavar="REGEX", help="Only tensors matching.")] = None,
    exclude: Annotated[str | None, typer.Option("--exclude", metavar="REGEX", help="Skip tensors matching.")] = None,
    atol: Annotated[float, typer.Option("--atol", min=0.0, help="Absolute tolerance for 'unchanged'.")] = 0.0,
    rtol: Annotated[float, typer.Option("--rtol", min=0.0, help="Relative tolerance for 'unchanged'.")] = 0.0,
    exit_code: Annotated[bool, typer.Option("--exit-code", help="Exit 1 when the checkpoints differ.")] = False,
) -> None:
    """What changed between two checkpoints: config, tensors, and the layer of A each layer of B is."""
    from surgery.diff.report import diff

    report = diff(a, b, include=include, exclude=exclude, atol=atol, rtol=rtol)
    if plot is not None:
        from surgery.diff.plot import heat_map

        heat_map(report, plot)
    if as_json:
        _print_json(report.to_dict(top))
    else:
        from surgery.diff.render import print_diff

        print_diff(report, console, top)
    if exit_code and report.differs:
        raise typer.Exit(1)


@app.command()
def analyze(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="A model folder.")],
    data: Annotated[list[str], typer.Option("--data", help="builtin, builtin:NAME or a .txt/.jsonl file; repeatable.")] = ["builtin"],  # noqa: B006
    samples: Annotated[int, typer.Option("--samples", min=1, help="Calibration rows measured (a quarter more are held out for --suggest).")] = 32,
    seq_len: Annotated[int, typer.Option("--seq-len", min=2, help="Tokens per row.")] = 256,
    device: Device = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
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

    from surgery import suggest as suggestions
    from surgery.analyze import analyze as measure
    from surgery.analyze import plot_analysis
    from surgery.devices import resolve_device

    spec = suggestions.parse_spec(suggest) if suggest else None
    if spec is not None and search_chain:
        raise SurgeryError("give --suggest or --search-chain, not both: each writes one plan")
    resolved = resolve_device(device)
    session = measure(str(model), data, samples, seq_len, resolved)
    analysis = session.analysis
    if plot is not None:
        plot_analysis(analysis, str(plot))
    log = (lambda line: err_console.print(line, markup=False)) if as_json else (lambda line: console.print(line, markup=False))
    suggestion = None
    if spec is not None:
        kind, value = spec
        if kind == "drop":
            suggestion = suggestions.suggest_drop(session.model, session.prefix, analysis, session.held_out, int(value),
                                                  candidates, str(model), log)
        elif kind == "bits":
            suggestion = suggestions.suggest_bits(analysis, value, suggestions.group_size_for(session.input_dims),
                                                  str(model), data[0])
        else:
            suggestion = suggestions.suggest_tie(model, int(value), session.held_out, str(model), resolved, log)
    if search_chain:
        with Progress(TextColumn("searching chains"), BarColumn(), TimeRemainingColumn(), console=err_console.instance(),
                      disable=not err_console.is_terminal) as bar:
            task = bar.add_task("search", total=1.0)
            suggestion = suggestions.search_chain(session.model, session.prefix, session.held_out, len(analysis.layers),
                                                  budget, length_penalty, str(model),
                                                  lambda done: bar.update(task, completed=done), log)
    if suggestion is not None and write_plan is not None:
        write_plan.write_text(suggestion.plan)
    if as_json:
        out = analysis.to_dict()
        if suggestion is not None:
            out["suggestion"] = {"kind": suggestion.kind, "plan": suggestion.plan, "trials": suggestion.trials}
        _print_json(out)
        return
    ranks = {m.index: r + 1 for r, m in enumerate(sorted(analysis.layers, key=lambda m: -m.bi))}
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


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Where the demo writes its edited models.")] = Path(
        "surgery-demo"
    ),
    device: Device = "auto",
) -> None:
    """Build (or reuse) the small trained demo models, apply the example plans, and show what each did."""
    from surgery.demo import run_demo

    run_demo(out_dir, device=device, console=console)


def _print_recipe(recipe: Recipe, shard_size: str) -> None:
    from surgery.recipe.view import format_layer_map

    shards = recipe.shards(_shard_size(shard_size))
    console.print(f"[bold]{recipe.plan_path}[/] -> {recipe.output}")
    description = recipe.view.storage.description if recipe.view.storage else None
    console.print(description or f"layer map ({len(recipe.layer_map())} layers): {format_layer_map(recipe.layer_map())}")
    console.print(
        f"{len(recipe.tensors)} tensors, {human_bytes(recipe.total_bytes)} in {len(shards)} shard(s): "
        + ", ".join(s.filename for s in shards)
    )


def _shard_size(text: str) -> int | str:
    return int(text) if text.isdigit() else text


class _byte_progress:
    """A rich progress bar over bytes written, shown only on a terminal."""

    def __init__(self, total: int, label: str) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=err_console.instance(), disable=not err_console.is_terminal, transient=True,
        )
        self.task = self.progress.add_task(label, total=total)

    def __enter__(self) -> Any:
        self.progress.__enter__()
        return lambda n: self.progress.advance(self.task, n)

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]


def _print_json(data: Any) -> None:
    """`--json` output: highlighted on a terminal; plain, and without rich's highlighting pass, in a pipe."""
    text = json.dumps(data, indent=2, default=str)
    if sys.stdout.isatty():
        console.print_json(text)
    else:
        print(text)


def _log(line: str) -> None:
    err_console.print(line, markup=False, highlight=False)


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM stops a run the way Ctrl-C does: the finished shards are kept for --resume."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> None:
    """Entry point: user errors are one line on stderr and exit code 2 (tracebacks only with --debug)."""
    try:
        app()
    except SurgeryError as e:
        if _state["debug"]:
            raise
        err_console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
