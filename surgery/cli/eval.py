"""`surgery eval`: perplexity and throughput, beside a base model on the same tokens."""

from __future__ import annotations

from typing import Annotated

import typer

from surgery.cli.app import app
from surgery.cli.console import phase, print_json
from surgery.cli.options import Data, Device, Json, MaxMemory, ModelHelp, model_folder, parse_max_memory
from surgery.cli.render import print_eval


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(metavar="MODEL", help=ModelHelp)],
    data: Data = None,
    compare: Annotated[
        str | None,
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
    max_memory: MaxMemory = None,
    as_json: Json = False,
) -> None:
    """Perplexity (sliding window) and tokens/s of a model, beside a base model on the same tokens."""
    from surgery.evaluation.run import EvalSettings, evaluate
    from surgery.output.provenance import recorded_source

    task_list = tuple(t.strip() for t in (tasks or "").split(",") if t.strip())
    settings = EvalSettings(tuple(data or ["builtin"]), max_tokens, window, stride, batch_size, device, dtype, task_list,
                            parse_max_memory(max_memory))
    folder = model_folder(model)
    reference = None if no_compare else model_folder(compare) if compare else recorded_source(folder)
    report = evaluate(folder, settings, reference, phase=phase)
    if as_json:
        print_json(report.to_dict())
    else:
        print_eval(report)
