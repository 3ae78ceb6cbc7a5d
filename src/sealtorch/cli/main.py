"""The ``sealtorch`` command: one entry point, one sub-module per command family.

Heavy imports (torch, the key server) happen inside the commands, so ``--help`` stays fast.
Every :class:`~sealtorch.errors.SealtorchError` is printed as one clear line and exits non-zero,
without a traceback.
"""

from __future__ import annotations

import sys

import click

from sealtorch.errors import SealtorchError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sealtorch")
def cli() -> None:
    """Seal PyTorch models and load them only inside an attested TEE."""


def _register() -> None:
    from sealtorch.cli import attest_cmds, bench_cmds, client_cmds, format_cmds, serve_cmds

    for module in (format_cmds, attest_cmds, bench_cmds, serve_cmds, client_cmds):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def run_cli(group: click.Group, args: list[str] | None = None) -> None:
    """Run a click group, turning sealtorch errors into one-line messages and exit code 2."""
    try:
        group.main(args=args, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except SealtorchError as e:
        code = getattr(e, "denial", None) or e.code
        click.echo(f"error [{code}]: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


def main(args: list[str] | None = None) -> None:
    """Console-script entry point of ``sealtorch``."""
    run_cli(cli, args)
