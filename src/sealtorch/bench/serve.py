"""`sealtorch bench serve` (filled in by its owner)."""

from __future__ import annotations

import click


@click.command("serve")
def command() -> None:
    """Benchmark: not implemented yet."""
    raise click.ClickException("bench serve is not implemented yet")
