"""`sealtorch bench load` (filled in by its owner)."""

from __future__ import annotations

import click


@click.command("load")
def command() -> None:
    """Benchmark: not implemented yet."""
    raise click.ClickException("bench load is not implemented yet")
