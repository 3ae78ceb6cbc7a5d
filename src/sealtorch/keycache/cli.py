"""``dkeycache`` command (filled in by the key cache work)."""

from __future__ import annotations

import click

from sealtorch.cli.main import run_cli


@click.group()
def cli() -> None:
    """The in-TEE key cache."""


def main(args: list[str] | None = None) -> None:
    run_cli(cli, args)
