"""`sealtorch bench keycache` (filled in by its owner)."""

from __future__ import annotations

import click


@click.command("keycache")
def command() -> None:
    """Benchmark: not implemented yet."""
    raise click.ClickException("bench keycache is not implemented yet")
