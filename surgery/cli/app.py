"""The typer application every command registers on, and the entry point: user errors are one line
on stderr and the error's exit code (tracebacks only with --debug)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from surgery.cli.console import console, err_console
from surgery.errors import SurgeryError
from surgery.version import __version__

app = typer.Typer(
    name="surgery",
    help="Model surgery on Hugging Face checkpoints from declarative YAML plans, streamed tensor by tensor.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        console.print(f"surgery {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    _state["debug"] = debug or _state["debug"]


def main() -> None:
    """Entry point: user errors are one line on stderr and exit code 2 (tracebacks only with --debug,
    given before or after the command)."""
    _state["debug"] = "--debug" in sys.argv[2:]  # after the command: taken out before typer parses it
    sys.argv = sys.argv[:2] + [arg for arg in sys.argv[2:] if arg != "--debug"]
    try:
        app()
    except SystemExit as e:  # typer turns a Ctrl-C that no command caught into a silent exit 130
        if e.code == 130 and _from_interrupt(e):
            err_console.print("error: interrupted before the command finished (Ctrl-C)", markup=False,
                              highlight=False, soft_wrap=True)
        raise
    except SurgeryError as e:
        if _state["debug"]:
            raise
        err_console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except OSError as e:  # a filesystem failure no check foresaw: still one line naming the path
        if _state["debug"]:
            raise
        where = f"{e.filename}: " if e.filename else ""
        err_console.print(f"error: {where}{e.strerror or e} (check the path, its permissions and free space)",
                          markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)


def _from_interrupt(error: BaseException) -> bool:
    """Whether a KeyboardInterrupt is among the causes and contexts of `error`."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False
