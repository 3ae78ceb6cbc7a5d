"""`sealtorch` and `dkeycache`: every command and every option has help text, and the options
that read an environment variable name it in their help."""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest

from sealtorch.cli.main import cli as sealtorch_cli
from sealtorch.cli.main import with_version
from sealtorch.keycache.cli import cli as dkeycache_cli


def _walk(cmd: click.Command, path: str) -> Iterator[tuple[str, click.Command]]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _walk(sub, f"{path} {name}")


COMMANDS = [*_walk(sealtorch_cli, "sealtorch"), *_walk(dkeycache_cli, "dkeycache")]


@pytest.mark.parametrize(("path", "cmd"), COMMANDS, ids=[p for p, _ in COMMANDS])
def test_every_command_and_option_has_help(path: str, cmd: click.Command) -> None:
    assert (cmd.help or cmd.short_help or "").strip(), f"{path} has no help text"
    missing = [p.name for p in cmd.params
               if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert missing == [], f"{path}: options without help: {missing}"
    for p in cmd.params:
        if isinstance(p, click.Option) and p.envvar:
            assert p.show_envvar, f"{path} --{p.name} reads {p.envvar} but does not say so"


@pytest.mark.parametrize("group", [sealtorch_cli, dkeycache_cli], ids=["sealtorch", "dkeycache"])
def test_version_option(group: click.Group) -> None:
    from importlib.metadata import version

    from click.testing import CliRunner

    with_version(group)
    res = CliRunner().invoke(group, ["--version"], prog_name="x")
    assert res.exit_code == 0 and res.output.strip() == f"x, version {version('sealtorch')}"


@pytest.mark.parametrize("group", [sealtorch_cli, dkeycache_cli], ids=["sealtorch", "dkeycache"])
def test_environment_variables_are_named_in_help(group: click.Group) -> None:
    from click.testing import CliRunner

    res = CliRunner().invoke(group, ["--help"])
    assert res.exit_code == 0 and "SEALTORCH_SIM_DIR" in res.output
