"""`surgery gguf`: a llama.cpp GGUF of a `bits` output, made and checked with llama.cpp's own tools."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surgery.cli.app import app
from surgery.cli.console import console, log, terminate_as_interrupt


@app.command()
def gguf(
    output: Annotated[Path, typer.Argument(metavar="OUTPUT", help="A folder `surgery apply` wrote from a bits plan.")],
    out: Annotated[Path, typer.Argument(metavar="OUT.gguf", help="The GGUF file to write.")],
    llama_cpp: Annotated[Path | None, typer.Option("--llama-cpp", metavar="DIR",
                         help="A llama.cpp checkout: its convert_hf_to_gguf.py, and build/bin/llama-quantize once built.")] = None,
    converter: Annotated[Path | None, typer.Option(metavar="FILE", help="convert_hf_to_gguf.py, where not in --llama-cpp.")] = None,
    quantize: Annotated[Path | None, typer.Option(metavar="FILE", help="llama-quantize, where not in --llama-cpp/build/bin or on PATH.")] = None,
    python: Annotated[str | None, typer.Option(metavar="FILE", help="The Python the converter runs in (default: this one); it needs torch, transformers and sentencepiece.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing OUT.gguf.")] = False,
) -> None:
    """Convert the model a bits plan read with llama.cpp's converter, give each tensor the type
    llama-tensor-types.txt names with llama-quantize, and check every tensor's type before the file appears."""
    from surgery.llama_cpp import locate, make_gguf
    from surgery.output.execute import Interrupted

    try:
        with terminate_as_interrupt():  # SIGTERM too removes the intermediate files
            types = make_gguf(output, out, locate(llama_cpp, converter, quantize, python), force=force, log=log)
    except KeyboardInterrupt:
        raise Interrupted(f"gguf: interrupted; nothing written to {out}") from None
    console.print(f"[green]wrote[/] {out}: " + ", ".join(f"{count} {kind}" for kind, count in types.items()))
