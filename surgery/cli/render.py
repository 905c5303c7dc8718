"""What several commands show: a recipe's summary and an evaluation's table."""

from __future__ import annotations

from typing import TYPE_CHECKING

from surgery.cli.console import console
from surgery.formatting import human_bytes

if TYPE_CHECKING:
    from surgery.evaluation.run import EvalReport
    from surgery.plan.mergekit import Translation
    from surgery.plan.resolve import Recipe


def print_recipe(recipe: Recipe, shard_size: int | str) -> None:
    """Where it goes, its layer map (or what its format says it is), its tensors, bytes and shards."""
    from surgery.architecture.verify import UNCHANGED
    from surgery.recipe.view import format_layer_map

    shards = recipe.shards(shard_size)
    console.print(f"[bold]{recipe.plan_path or 'plan'}[/] -> {recipe.output}")
    layers = recipe.layer_map()
    console.print(recipe.description or f"layer map ({len(layers)} layers): {format_layer_map(layers)}")
    if recipe.verification != UNCHANGED:
        console.print(recipe.verification.note)
    console.print(
        f"{len(recipe.tensors)} tensors, {human_bytes(recipe.total_bytes)} in {len(shards)} shard(s): "
        + ", ".join(s.filename for s in shards)
    )


def print_translation(translation: Translation) -> None:
    """The surgery plan a mergekit config was translated to, as a user would write it."""
    from surgery.plan.mergekit import plan_yaml

    console.print("mergekit config, translated to this surgery plan:", markup=False, highlight=False)
    console.print(plan_yaml(translation.plan).rstrip(), markup=False, highlight=False)


def print_eval(report: EvalReport) -> None:
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
        + ("" if report.max_memory is None else f" (at most {human_bytes(report.max_memory)} of weights on the device)")
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
