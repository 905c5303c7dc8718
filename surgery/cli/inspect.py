"""`surgery inspect`: what a checkpoint holds, from its headers."""

from __future__ import annotations

from typing import Annotated

import typer

from surgery.cli.app import app
from surgery.cli.console import console, print_json
from surgery.cli.options import Json, ModelHelp, model_folder
from surgery.formatting import human_bytes


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(metavar="MODEL", help=ModelHelp)],
    as_json: Json = False,
) -> None:
    """Architecture, layers, per-layer tensor groups, dtypes, parameter count, bytes and shards."""
    from rich.table import Table

    from surgery.formats.inspection import inspect as inspect_model

    info = inspect_model(model_folder(model))
    if as_json:
        print_json(info)
        return
    if "ensemble" in info:
        ensemble = info["ensemble"]
        console.print(f"[bold]{info['path']}[/]  ensemble of {len(ensemble['members'])} models (combine: "
                      f"{ensemble['combine']}), members {'by reference' if ensemble['layout'] == 'reference' else 'stored'}")
        for m in ensemble["members"]:
            console.print(f"  member {m['index']}: {m['path'] or 'stored here'}  {m['architecture']} ({m['model_type']}), "
                          f"{m['layers']} layers, weight {m['weight']:g}", markup=False, highlight=False)
        return
    console.print(f"[bold]{info['path']}[/]  {info['architecture']} ({info['model_type']})")
    console.print(
        f"{info['layers']} layers under {info['layer_prefix']}.N ({info['layer_count_key']}), "
        f"{info['parameters']:,} parameters, {human_bytes(info['bytes'])} in {len(info['shards'])} shard(s), "
        f"dtypes {', '.join(f'{k} x{v}' for k, v in info['dtypes'].items())}, tied embeddings: "
        f"{info['tie_word_embeddings']}"
    )
    others = [s for s in info["stacks"] if not s["edited"]]
    if others:
        console.print("other stacks (a plan's 'stack:' names one to edit): " + ", ".join(
            f"{s['name']} {s['layers']} layers under {s['prefix']}.N ({s['count_key']})" for s in others))
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
