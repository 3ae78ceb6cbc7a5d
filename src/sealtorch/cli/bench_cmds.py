"""``sealtorch bench ...``: each benchmark prints its figures as ratios against a baseline
measured in the same run (``--json`` for machines)."""

from __future__ import annotations

import click

from sealtorch.bench import keycache, keyserver, load, serve


@click.group("bench")
def bench() -> None:
    """Benchmarks of the design's performance targets."""


for _module in (load, keyserver, keycache, serve):
    bench.add_command(_module.command)

COMMANDS: list[click.Command] = [bench]
