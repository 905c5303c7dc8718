"""Where the commands print: rich consoles made at first use, JSON, log lines, progress, signals."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from surgery.plan.resolve import Recipe


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


def print_json(data: Any) -> None:
    """`--json` output: highlighted on a terminal; plain, and without rich's highlighting pass, in a pipe."""
    text = json.dumps(data, indent=2, default=str)
    if sys.stdout.isatty():
        console.print_json(text)
    else:
        print(text)


def log(line: str) -> None:
    """A progress line on stderr, as written (no markup)."""
    err_console.print(line, markup=False, highlight=False)


@contextmanager
def phase(text: str) -> Iterator[None]:
    """What a long step is doing, as a spinner on a terminal that goes when it ends; nothing in a pipe,
    where a failure stays the one line that names it."""
    if not err_console.is_terminal:
        yield
        return
    with err_console.status(text):
        yield


@contextmanager
def byte_progress(recipe: Recipe) -> Iterator[Callable[[int], None]]:
    """A progress bar over the recipe's bytes as they are written, shown only on a terminal."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=err_console.instance(), disable=not err_console.is_terminal, transient=True,
    )
    task = progress.add_task(f"writing {recipe.output}", total=recipe.total_bytes)
    with progress:
        yield lambda n: progress.advance(task, n)


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM stops a run the way Ctrl-C does: the finished shards are kept for --resume."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
