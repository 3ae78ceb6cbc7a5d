"""``dkeyserver`` command (filled in by the key server work)."""

from __future__ import annotations

import click

from sealtorch.cli.main import run_cli


@click.group()
def cli() -> None:
    """The model owner's key server."""


def main(args: list[str] | None = None) -> None:
    run_cli(cli, args)
