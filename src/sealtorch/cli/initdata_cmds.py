"""``sealtorch initdata``: write a Confidential Containers initdata document holding the
measured ``sealtorch.toml``, and print what the pod spec and the policy need from it."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from sealtorch.attestation.initdata import ALGORITHMS, ANNOTATION, CONFIG_ENTRY, REGISTER_BYTES
from sealtorch.errors import ConfigError

_POLICY_FIELD = {"tdx": "mrconfigid", "snp": "host_data"}


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} is not UTF-8 text; initdata entries are text files") from None


def check_bound_config(raw: bytes) -> None:
    """``raw`` must be a valid measured configuration whose every role table names the
    initdata document (``initdata = PATH``); otherwise the roles in the pod would check the
    register against the config's own digest and refuse to start."""
    from sealtorch.keycache.config import parse_config
    from sealtorch.runtime.config import parse_runtime_config

    try:
        tables = set(tomllib.loads(_text(raw, "the config")))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"the config is not valid TOML ({type(e).__name__})") from e
    parsed: dict[str, Callable[[bytes], Any]] = {"keycache": parse_config,
                                                 "runtime": parse_runtime_config}
    if not tables & set(parsed):
        raise ConfigError("the config has neither a [keycache] nor a [runtime] table")
    for table in sorted(tables & set(parsed)):
        if parsed[table](raw).initdata is None:
            raise ConfigError(
                f"[{table}] has no `initdata = PATH`: add the path where the pod mounts its "
                f"{ANNOTATION} annotation (e.g. /run/sealtorch-initdata/cc_init_data), so the "
                "role checks the binding through the document")


@click.command("initdata")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("initdata.toml"), show_default=True,
              help="where to write the initdata TOML document")
@click.option("--entry", "entries", multiple=True, metavar="NAME=FILE",
              help="another [data] entry, e.g. policy.rego=agent-policy.rego, "
              "aa.toml=aa.toml, cdh.toml=cdh.toml; repeatable")
@click.option("--algorithm", type=click.Choice(sorted(ALGORITHMS)), default="sha384",
              show_default=True, help="digest algorithm named in the document")
@click.option("--force", is_flag=True, help="overwrite OUTPUT if it exists")
@click.option("--json", "as_json", is_flag=True, help="print the values as one JSON object")
def initdata_cmd(config: Path, output: Path, entries: tuple[str, ...], algorithm: str,
                 force: bool, as_json: bool) -> None:
    """Write a CoCo initdata document whose "sealtorch.toml" entry is CONFIG, byte for byte,
    and print its digest, the TDX MRCONFIGID and SNP HOST_DATA values to pin in the policy,
    and the pod annotation value (base64 of gzip)."""
    from sealtorch._outputs import output_file, write_file
    from sealtorch.attestation.initdata import (
        encode_annotation,
        parse_initdata,
        render_initdata,
    )

    output_file(output, overwrite=force)
    raw = config.read_bytes()
    check_bound_config(raw)
    data = {CONFIG_ENTRY: _text(raw, "the config")}
    for item in entries:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise click.UsageError("--entry: expected NAME=FILE")
        if name in data:
            raise click.UsageError(f"--entry: {name!r} given twice (CONFIG is the "
                                   f"{CONFIG_ENTRY!r} entry)")
        try:
            data[name] = _text(Path(path).read_bytes(), f"--entry {name}")
        except OSError as e:
            raise click.UsageError(f"--entry {name}: cannot read {path} ({e.strerror})") \
                from None
    document = render_initdata(data, algorithm)
    doc = parse_initdata(document)
    values = {"file": str(output), "algorithm": algorithm, "entries": sorted(doc.data),
              "digest": doc.digest.hex(),
              **{_POLICY_FIELD[t]: doc.register(t).hex() for t in REGISTER_BYTES},
              "annotation": ANNOTATION, "annotation_value": encode_annotation(document)}
    write_file(output, document, overwrite=force)  # after every check: a refusal writes nothing
    if as_json:
        click.echo(json.dumps(values, indent=2))
        return
    click.echo(f"wrote {output} ({algorithm}; entries: {', '.join(values['entries'])})")
    click.echo(f"initdata digest:  {values['digest']}")
    click.echo(f"TDX MRCONFIGID:   {values['mrconfigid']}  (policy: mrconfigid)")
    click.echo(f"SNP HOST_DATA:    {values['host_data']}  (policy: host_data)")
    click.echo(f"pod annotation {ANNOTATION}:")
    click.echo(values["annotation_value"])


COMMANDS: list[click.Command] = [initdata_cmd]
