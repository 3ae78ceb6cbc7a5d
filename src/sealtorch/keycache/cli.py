"""``dkeycache`` command: ``serve`` the in-TEE key cache and show its ``status``."""

from __future__ import annotations

import json
from typing import Any

import click

from sealtorch.cli.main import ENV_HELP, run_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
             epilog=ENV_HELP)
def cli() -> None:
    """The in-TEE key cache: attests to dkeyserver, holds leased model keys in memory only and
    hands file keys to attested local runtimes."""


def _models(values: tuple[str, ...]) -> list[str] | None:
    out = [m for v in values for m in v.split(",") if m]
    return out or None


@cli.command("serve")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="measured configuration file (TOML, [keycache] table)")
@click.option("--attester", default="auto", show_default=True,
              type=click.Choice(["auto", "sgx", "tdx", "snp", "sim"]),
              help="TEE backend; auto never picks sim (sim reads its platform key from "
                   "$SEALTORCH_SIM_DIR)")
@click.option("--socket", "socket_path", default=None, help="override the socket path")
@click.option("--models", multiple=True, help="model ids to fetch (repeat or comma-separate)")
def serve(config_path: str, attester: str, socket_path: str | None,
          models: tuple[str, ...]) -> None:
    """Attest to dkeyserver, hold leased keys in memory, serve local runtimes."""
    import logging

    from sealtorch.keycache.config import load_config
    from sealtorch.keycache.decisions import DECISION_LOGGER
    from sealtorch.keycache.service import make_attester, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s "
                        "%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    # local decisions are one bare JSON object per line on stderr (for log shippers)
    decisions = logging.getLogger(DECISION_LOGGER)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    decisions.addHandler(handler)
    decisions.propagate = False
    config = load_config(config_path)
    run(config, make_attester(attester, config), socket_path=socket_path,
        models=_models(models))


@cli.command("status")
@click.option("--socket", "socket_path", default=None,
              help="socket of the cache, or tcp://127.0.0.1:PORT (its tcp_listen)")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="read the socket path from this config file")
@click.option("--json", "as_json", is_flag=True, help="print the raw JSON")
@click.option("--cache-id", "cache_id_only", is_flag=True,
              help="print only the cache id (what `dkeyserver cache approve` takes)")
@click.option("--wait", is_flag=True,
              help="wait until the cache answers (for scripts that just started it)")
@click.option("--wait-keys", is_flag=True,
              help="wait until the cache holds a model key (implies --wait; which models is "
                   "told only to an attested runtime)")
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(0),
              help="seconds --wait/--wait-keys wait before failing")
def status(socket_path: str | None, config_path: str | None, as_json: bool,
           cache_id_only: bool, wait: bool, wait_keys: bool, timeout: float) -> None:
    """Show the cache's state, its id and counts (exit 1 when down). Per-model leases are told
    only to an attested runtime's session (KeyCacheClient.status()); decisions go to the log."""
    import time

    from sealtorch.errors import ServiceUnavailableError

    if socket_path is None:
        from sealtorch.keycache.config import CacheConfig, load_config

        socket_path = load_config(config_path).socket if config_path else CacheConfig.socket
    deadline = time.monotonic() + timeout
    while True:
        try:
            health = _health(socket_path)
            if not wait_keys or health["leases"]:
                break
            problem = (f"it holds no model key yet (cache_state {health['cache_state']}, "
                       f"{health['models_denied']} models denied)")
        except ServiceUnavailableError as e:
            if not (wait or wait_keys):
                raise
            problem = str(e)
        if time.monotonic() >= deadline:
            raise ServiceUnavailableError(f"gave up after {timeout:g} s: {problem}")
        time.sleep(0.2)
    if cache_id_only:
        if not health["cache_id"]:
            raise ServiceUnavailableError("the cache has no id yet: it has not reached "
                                          "dkeyserver; see its log")
        click.echo(health["cache_id"])
        return
    if as_json:
        click.echo(json.dumps(health, indent=2, sort_keys=True))
    else:
        dec = health.get("decisions") or {}
        click.echo(f"state: {health['state']}  upstream: {health['upstream']}  "
                   f"cache_id: {health['cache_id']}  cache_state: {health['cache_state']}")
        click.echo(f"leases: {health['leases']}  models denied: {health['models_denied']}  "
                   f"renewals: {health['refreshes']}  polls: {health['polls']}  "
                   f"local decisions: {dec.get('allow', 0)} allowed, {dec.get('deny', 0)} "
                   "denied")
    if health["state"] == "down":
        raise SystemExit(1)


def _health(socket_path: str) -> dict[str, Any]:
    """The cache's health summary over its socket (state, id, counts: no model names)."""
    from sealtorch.errors import ServiceUnavailableError
    from sealtorch.keycache.address import connect, parse_endpoint
    from sealtorch.protocol.local import call

    s = connect(parse_endpoint(socket_path), 5)
    try:
        ans = call(s, {"op": "health"}, timeout=5)
    finally:
        s.close()
    health = ans.get("health")
    if not ans.get("ok") or not isinstance(health, dict):
        raise ServiceUnavailableError("dkeycache answered status with an error")
    return health


def main(args: list[str] | None = None) -> None:
    """Console-script entry point of ``dkeycache``."""
    run_cli(cli, args)
