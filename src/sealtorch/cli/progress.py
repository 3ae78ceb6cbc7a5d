"""Rich progress displays for CLI steps that can take more than a second (on stderr, and only
on a terminal: redirected output stays clean)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


def _progress(*columns: Any) -> Any:
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    return Progress(*columns, console=console, transient=True, disable=not console.is_terminal)


@contextlib.contextmanager
def activity(description: str) -> Iterator[None]:
    """A spinner with the elapsed time while a step whose length is unknown runs."""
    from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

    with _progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()) as p:
        p.add_task(description, total=None)
        yield


@contextlib.contextmanager
def bytes_bar(first: str, then: str) -> Iterator[Callable[[int, int], None]]:
    """Show ``first`` with a spinner until the returned ``progress(done, total)`` is first
    called, then ``then`` with a bar over bytes, their count, the speed and the time left."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with _progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                   DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn()) as p:
        task = p.add_task(first, total=None)

        def progress(done: int, total: int) -> None:
            p.update(task, description=then, completed=done, total=total)

        yield progress
