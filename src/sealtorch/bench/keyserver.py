"""`sealtorch bench keyserver` (filled in by its owner)."""

from __future__ import annotations

import click


@click.command("keyserver")
def command() -> None:
    """Benchmark: not implemented yet."""
    raise click.ClickException("bench keyserver is not implemented yet")
