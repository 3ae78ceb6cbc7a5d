"""The ``sealtorch`` command: one entry point, one sub-module per command family.

Heavy imports (torch, the key server) happen inside the commands, so ``--help`` stays fast.
Every :class:`~sealtorch.errors.SealtorchError` is printed as one clear line and exits non-zero,
without a traceback.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import click

from sealtorch.errors import SealtorchError

ENV_HELP = """\b
Environment:
  SEALTORCH_SIM_DIR  where the sim TEE keeps its platform key (default ~/.sealtorch/sim);
                     read by `sim init` and by `--attester sim`"""


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=ENV_HELP)
def cli() -> None:
    """Seal PyTorch models and load them only inside an attested TEE."""


def _register() -> None:
    from sealtorch.cli import (
        attest_cmds,
        bench_cmds,
        client_cmds,
        format_cmds,
        initdata_cmds,
        serve_cmds,
    )

    for module in (format_cmds, attest_cmds, initdata_cmds, bench_cmds, serve_cmds,
                   client_cmds):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def _show_warning(message: Warning | str, category: type[Warning], filename: str,
                  lineno: int, file: Any = None, line: str | None = None) -> None:
    """One line per warning, without the Python source location."""
    click.echo(f"warning: {message}", err=True)


def quiet_warnings() -> None:
    """Print each distinct warning once, as one ``warning: ...`` line (a CLI's users need the
    message, not the file and source line that raised it); ``-W``/``PYTHONWARNINGS`` win."""
    warnings.showwarning = _show_warning
    if not sys.warnoptions:
        for category in (RuntimeWarning, UserWarning):
            warnings.filterwarnings("once", category=category)


def with_version(group: click.Group) -> click.Group:
    """Give ``group`` a ``--version`` option (sealtorch's version), once: the one definition
    for ``sealtorch``, ``dkeyserver`` and ``dkeycache``."""
    if not any(p.name == "version" for p in group.params):
        click.version_option(package_name="sealtorch")(group)
    return group


def run_cli(group: click.Group, args: list[str] | None = None) -> None:
    """Run a click group, turning sealtorch errors into one-line messages and exit code 2."""
    quiet_warnings()
    with_version(group)
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
