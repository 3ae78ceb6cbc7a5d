"""``dkeyserver``: init, serve, and admin subcommands that call the admin listener.

The admin token is read from ``--token-file`` or ``$SEALTORCH_ADMIN_TOKEN``, never from argv.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from sealtorch.cli.main import run_cli
from sealtorch.errors import AuthError, ConfigError, SealtorchError, ServiceUnavailableError

TOKEN_ENV = "SEALTORCH_ADMIN_TOKEN"  # noqa: S105 - an env var name


def _echo(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """The model owner's key server."""
    from sealtorch._secret import harden_process

    harden_process()  # every subcommand may touch the KEK or key material


@cli.command()
@click.option("--data-dir", required=True, type=click.Path(file_okay=False),
              help="new (or empty) directory for config, keys, TLS and the SQLite database")
@click.option("--db", default=None, help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db "
              "(an empty database; default: SQLite in the data dir)")
@click.option("--kek", type=click.Choice(["file", "pkcs11"]), default="file", show_default=True,
              help="where the KEK lives: a 0600 file, or a PKCS#11 token (PIN from "
                   "$SEALTORCH_PKCS11_PIN)")
@click.option("--pkcs11-module", default=None,
              help="PKCS#11 module (default /usr/lib/softhsm/libsofthsm2.so)")
@click.option("--pkcs11-token", default=None, help="PKCS#11 token label (default sealtorch)")
@click.option("--release-host", default="127.0.0.1", show_default=True,
              help="address of the release listener (key caches connect here)")
@click.option("--release-port", type=int, default=8443, show_default=True,
              help="port of the release listener (0: any free port, see run.json)")
@click.option("--admin-host", default="127.0.0.1", show_default=True,
              help="address of the admin listener (keep it loopback or VPN only)")
@click.option("--admin-port", type=int, default=8444, show_default=True,
              help="port of the admin listener (0: any free port)")
@click.option("--tenant", default="default", show_default=True,
              help="the first tenant; its admin token goes to DATA_DIR/admin.token")
@click.option("--sim/--no-sim", default=False, help="trust registered sim platforms (dev only)")
@click.option("--auto-approve/--no-auto-approve", default=False,
              help="admit new caches without 'cache approve' (demo/tests)")
@click.option("--lease-seconds", type=int, default=None,
              help="lease of a grant when its policy names none (default 300)")
@click.option("--workers", type=int, default=None,
              help="release worker processes sharing the release socket (default 1)")
def init(data_dir: str, db: str | None, kek: str, pkcs11_module: str | None,
         pkcs11_token: str | None, release_host: str, release_port: int, admin_host: str,
         admin_port: int, tenant: str, sim: bool, auto_approve: bool,
         lease_seconds: int | None, workers: int | None) -> None:
    """Create the data dir: TLS CA+cert, release-signing key, KEK, schema, first tenant+token."""
    from sealtorch.keyserver.bootstrap import SIGNING_PUB, TOKEN_FILE, init_data_dir

    cfg = init_data_dir(data_dir, tenant=tenant, db=db, kek=kek, pkcs11_module=pkcs11_module,
                        pkcs11_token=pkcs11_token, release_host=release_host,
                        release_port=release_port, admin_host=admin_host,
                        admin_port=admin_port, sim=sim, auto_approve=auto_approve,
                        lease_seconds=lease_seconds, workers=workers)
    _echo({"data_dir": str(cfg.data_dir), "signing_public_key": str(cfg.data_dir / SIGNING_PUB),
           "ca_cert": str(cfg.path(cfg.ca_cert)), "admin_token_file":
           str(cfg.data_dir / TOKEN_FILE), "tenant": tenant})


@cli.command()
@click.option("--data-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="the directory 'dkeyserver init' made")
@click.option("--db", default=None, help="override the database URL (or $SEALTORCH_KS_DB)")
@click.option("--release-port", type=int, default=None,
              help="override the release port (or $SEALTORCH_KS_RELEASE_PORT)")
@click.option("--admin-port", type=int, default=None,
              help="override the admin port (or $SEALTORCH_KS_ADMIN_PORT)")
@click.option("--workers", type=int, default=None,
              help="override the release worker count (or $SEALTORCH_KS_WORKERS)")
def serve(data_dir: str, db: str | None, release_port: int | None, admin_port: int | None,
          workers: int | None) -> None:
    """Run the release and admin listeners until SIGTERM. Every config.toml setting can be
    overridden by $SEALTORCH_KS_<SETTING> (e.g. SEALTORCH_KS_STATE_RECHECK_SECONDS)."""
    from sealtorch.keyserver.config import load_config
    from sealtorch.keyserver.server import run

    run(load_config(data_dir, db=db, release_port=release_port, admin_port=admin_port,
                    workers=workers))


@cli.command("tenant-add")
@click.option("--data-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="the key server's data directory (needs its KEK)")
@click.option("--tenant", required=True, help="new tenant name: [a-z0-9][a-z0-9_-]{0,63}")
@click.option("--token-out", required=True, type=click.Path(dir_okay=False),
              help="write the new tenant's admin token here (0600)")
@click.option("--ttl-days", type=int, default=90, show_default=True,
              help="days until the token expires")
def tenant_add(data_dir: str, tenant: str, token_out: str, ttl_days: int) -> None:
    """(local, owner machine) Add a tenant and write its first admin token to a 0600 file."""
    from sealtorch._outputs import write_private
    from sealtorch.keyserver.admin import add_tenant

    with _local_store(data_dir) as store:
        with store.states.change(store.now()) as ch:
            _, token = add_tenant(ch, tenant, ttl_days * 86400, actor="local")
        write_private(Path(token_out), (token + "\n").encode("ascii"))
    _echo({"tenant": tenant, "token_file": token_out})


@contextlib.contextmanager
def _local_store(data_dir: str) -> Iterator[Any]:
    """The store of a data dir, for local (owner machine) commands."""
    from sealtorch.keyserver.bootstrap import open_store
    from sealtorch.keyserver.config import load_config

    store, kek = open_store(load_config(data_dir))
    try:
        yield store
    finally:
        store.close()
        kek.close()


class Admin:
    """A small admin-API client (TLS 1.3, pinned CA, bearer token from file/env)."""

    def __init__(self, url: str, ca_cert: str, token_file: str | None) -> None:
        import httpx

        from sealtorch.protocol.release_client import tls_client_context

        token = os.environ.get(TOKEN_ENV)
        if token_file:
            token = Path(token_file).read_text().strip()
        if not token:
            raise AuthError(f"no admin token: pass --token-file or set ${TOKEN_ENV}")
        self._http = httpx.Client(base_url=url.rstrip("/"), verify=tls_client_context(ca_cert),
                                  headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             params: dict[str, Any] | None = None) -> Any:
        import httpx

        try:
            r = self._http.request(method, path, json=body, params=params)
        except httpx.HTTPError as e:
            raise ServiceUnavailableError(
                f"admin API at {self._http.base_url} unreachable ({type(e).__name__}); check "
                "that dkeyserver serve runs and --admin-url (or $SEALTORCH_ADMIN_URL)") from e
        try:
            obj = r.json()
        except ValueError as e:
            raise ServiceUnavailableError(f"admin API answered HTTP {r.status_code}") from e
        if r.status_code >= 400:
            err = obj.get("error", {}) if isinstance(obj, dict) else {}
            e2 = SealtorchError(f"HTTP {r.status_code}: {err.get('message', 'error')}")
            e2.code = str(err.get("code", "error"))
            raise e2
        return obj


def admin_options(f: Any) -> Any:
    f = click.option("--admin-url", default="https://127.0.0.1:8444", show_default=True,
                     envvar="SEALTORCH_ADMIN_URL", show_envvar=True,
                     help="the key server's admin listener")(f)
    f = click.option("--ca-cert", required=True, envvar="SEALTORCH_CA_CERT", show_envvar=True,
                     type=click.Path(exists=True, dir_okay=False),
                     help="the key server's CA (DATA_DIR/tls/ca.crt)")(f)
    f = click.option("--token-file", default=None, envvar="SEALTORCH_ADMIN_TOKEN_FILE",
                     show_envvar=True, type=click.Path(exists=True, dir_okay=False),
                     help=f"file holding your admin token (or the token itself in ${TOKEN_ENV})")(f)
    return f


def _admin(kw: dict[str, Any]) -> Admin:
    return Admin(kw.pop("admin_url"), kw.pop("ca_cert"), kw.pop("token_file"))


@cli.group()
def model() -> None:
    """Models and key versions of your tenant."""


@model.command("list")
@admin_options
def model_list(**kw: Any) -> None:
    """Your tenant's models, their key versions and policy versions."""
    _echo(_admin(kw).call("GET", "/v1/admin/models"))


@model.command("add")
@admin_options
@click.option("--model-id", required=True, help="the model id the file was sealed with")
@click.option("--key-file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="the 0600 key file from 'sealtorch keygen'")
def model_add(model_id: str, key_file: str, **kw: Any) -> None:
    """Import a key written by 'sealtorch keygen'."""
    from sealtorch.format.keyfile import read_key_file
    from sealtorch.protocol.b64 import b64e

    mk = read_key_file(key_file)
    if mk.model_id != model_id:
        raise ConfigError("the key file names another model id than --model-id")
    with mk.key:
        body = {"model_id": model_id, "key_version": mk.key_version, "key": b64e(mk.key.view())}
    _echo(_admin(kw).call("POST", "/v1/admin/models", body))


@model.command("create")
@admin_options
@click.option("--model-id", required=True, help="the new model's id")
def model_create(model_id: str, **kw: Any) -> None:
    """Let the server generate the key (fetch it once with 'model export')."""
    _echo(_admin(kw).call("POST", "/v1/admin/models", {"model_id": model_id, "key": None}))


@model.command("rotate")
@admin_options
@click.argument("model_id")
def model_rotate(model_id: str, **kw: Any) -> None:
    """Add a new, server-generated key version to MODEL_ID (caches get it at renewal)."""
    _echo(_admin(kw).call("POST", f"/v1/admin/model-rotate/{model_id}", {}))


@model.command("retire-version")
@admin_options
@click.argument("model_id")
@click.argument("key_version", type=int)
def model_retire(model_id: str, key_version: int, **kw: Any) -> None:
    """Stop releasing KEY_VERSION of MODEL_ID; caches drop it at their next status poll."""
    _echo(_admin(kw).call("POST", f"/v1/admin/model-retire/{model_id}",
                          {"key_version": key_version}))


@model.command("revoke")
@admin_options
@click.argument("model_id")
def model_revoke(model_id: str, **kw: Any) -> None:
    """Stop releasing every key of MODEL_ID; caches drop them at their next status poll."""
    _echo(_admin(kw).call("POST", f"/v1/admin/model-revoke/{model_id}", {}))


@model.command("export")
@admin_options
@click.argument("model_id")
@click.option("--key-version", type=int, default=1, show_default=True,
              help="which server-generated key version")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="write a sealtorch key file (0600) with the server-generated key")
@click.option("--signing-public-key", required=True, type=click.Path(exists=True),
              help="the server's release-signing public key (PEM) to verify the export")
def model_export(model_id: str, key_version: int, out: str, signing_public_key: str,
                 **kw: Any) -> None:
    """Fetch a server-generated key once, HPKE-sealed to a fresh local key pair."""
    import datetime

    from sealtorch.format.keyfile import ModelKey, write_key_file
    from sealtorch.protocol import hpke
    from sealtorch.protocol.b64 import b64d, b64e
    from sealtorch.protocol.signing import (
        KIND_KEY_EXPORT,
        body_digest,
        load_public_key,
        verify_document,
    )

    sk, pk = hpke.generate_keypair()
    res = _admin(kw).call("POST", f"/v1/admin/model-export/{model_id}",
                          {"key_version": key_version, "public_key": b64e(pk)})
    body = verify_document(load_public_key(Path(signing_public_key).read_text()),
                           KIND_KEY_EXPORT, res["export"])
    if body["recipient"] != b64e(pk) or body["model_id"] != model_id:
        raise ConfigError("export document is not for this request")
    key = hpke.open(b64d(res["sealed_key"], field="sealed_key", max_len=4096), sk,
                    body_digest(body))
    write_key_file(out, ModelKey(model_id, key_version, key,
                                 datetime.datetime.now(datetime.UTC).isoformat()))
    _echo({"model_id": model_id, "key_version": key_version, "key_file": out})


@cli.group()
def policy() -> None:
    """Release policies."""


@policy.command("set")
@admin_options
@click.argument("model_id")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
def policy_set(model_id: str, file: str, **kw: Any) -> None:
    """Set MODEL's policy from a JSON or TOML FILE (its 'version' must increase)."""
    import tomllib

    text = Path(file).read_text()
    doc = tomllib.loads(text) if file.endswith(".toml") else json.loads(text)
    _echo(_admin(kw).call("PUT", f"/v1/admin/policy/{model_id}", {"policy": doc}))


@policy.command("show")
@admin_options
@click.argument("model_id")
def policy_show(model_id: str, **kw: Any) -> None:
    """Print MODEL_ID's current policy and its version."""
    _echo(_admin(kw).call("GET", f"/v1/admin/policy/{model_id}"))


@policy.command("test")
@admin_options
@click.argument("model_id")
@click.argument("evidence", type=click.Path(exists=True, dir_okay=False))
def policy_test(model_id: str, evidence: str, **kw: Any) -> None:
    """Explain claim by claim whether EVIDENCE (JSON) would get MODEL's key."""
    ev = json.loads(Path(evidence).read_text())
    _echo(_admin(kw).call("POST", f"/v1/admin/policy-test/{model_id}", {"evidence": ev}))


@cli.group()
def cache() -> None:
    """Key cache enrolment."""


@cache.command("list")
@admin_options
def cache_list(**kw: Any) -> None:
    """Caches your tenant approved or revoked, or that asked for one of your models."""
    _echo(_admin(kw).call("GET", "/v1/admin/caches"))


@cache.command("approve")
@admin_options
@click.argument("cache_id")
def cache_approve(cache_id: str, **kw: Any) -> None:
    """Admit CACHE_ID (32 hex, from 'cache list' or the cache's status) for your models."""
    _echo(_admin(kw).call("POST", f"/v1/admin/caches/{cache_id}/approve"))


@cache.command("revoke")
@admin_options
@click.argument("cache_id")
def cache_revoke(cache_id: str, **kw: Any) -> None:
    """Stop releasing your keys to CACHE_ID; it drops them at its next status poll."""
    _echo(_admin(kw).call("POST", f"/v1/admin/caches/{cache_id}/revoke"))


@cli.group()
def audit() -> None:
    """The keyed, hash-chained audit log."""


@audit.command("show")
@admin_options
@click.option("--after", type=int, default=0, help="only entries after this sequence number")
@click.option("--limit", type=int, default=100, help="at most this many entries (max 1000)")
@click.option("--oldest", is_flag=True, help="the oldest entries instead of the newest")
def audit_show(after: int, limit: int, oldest: bool, **kw: Any) -> None:
    """Your tenant's audit entries (the newest LIMIT by default), in chain order."""
    params = {"after": after, "limit": limit, "order": "oldest" if oldest else "newest"}
    _echo(_admin(kw).call("GET", "/v1/admin/audit", params=params))


@audit.command("head")
@admin_options
def audit_head(**kw: Any) -> None:
    """Print the current signed audit head; keep it outside the database for 'audit verify
    --head' (every release answer carries one too)."""
    _echo(_admin(kw).call("GET", "/v1/admin/audit/head"))


@audit.command("verify")
@click.option("--data-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="the key server's data directory (needs its KEK)")
@click.option("--head", "head_file", default=None, type=click.Path(exists=True),
              help="a signed audit head saved earlier (JSON, as 'audit head' prints it or a "
                   "release answer carries it): detects a truncated or rewritten tail")
def audit_verify(data_dir: str, head_file: str | None) -> None:
    """(local, needs the KEK) Verify the keyed chain; names edited, inserted, reordered,
    deleted and truncated entries."""
    from sealtorch.keyserver.admin import verify_audit
    from sealtorch.keyserver.audit import Head
    from sealtorch.keyserver.bootstrap import load_signing_key
    from sealtorch.keyserver.config import load_config
    from sealtorch.protocol.grant import GrantVerifier

    head = None
    if head_file:
        doc = json.loads(Path(head_file).read_text())
        doc = doc.get("audit_head", doc) if isinstance(doc, dict) else doc
        v = GrantVerifier(load_signing_key(load_config(data_dir)).public_key())
        h = v.verify_audit_head(doc)
        head = Head(h.seq, h.head)
    with _local_store(data_dir) as store:
        problems, _ = verify_audit(store, head)
    _echo({"ok": not problems, "problems": problems})
    if problems:
        sys.exit(1)


@audit.command("export")
@click.option("--data-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="the key server's data directory (needs its KEK)")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="new file: one JSON line per entry, then the signed head")
def audit_export(data_dir: str, out: str) -> None:
    """(local) Write the chain as JSON lines plus a signed head, for write-once storage."""
    import time

    from sealtorch.keyserver import queries
    from sealtorch.keyserver.bootstrap import load_signing_key
    from sealtorch.keyserver.config import load_config
    from sealtorch.protocol.grant import AuditHead, sign_audit_head
    from sealtorch.protocol.signing import key_id

    with _local_store(data_dir) as store:
        rows = queries.audit_rows(store.db)
    sk = load_signing_key(load_config(data_dir))
    seq, hh = (int(rows[-1]["seq"]), str(rows[-1]["hash"])) if rows else (0, "00" * 32)
    head = sign_audit_head(sk, AuditHead(seq, hh, int(time.time()), key_id(sk)))
    with open(out, "x") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
        f.write(json.dumps({"audit_head": head}, sort_keys=True) + "\n")
    _echo({"entries": len(rows), "out": out})


@cli.command()
@click.option("--data-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="the key server's data directory (needs its KEK)")
@click.option("--reason", default="", help="why (recorded in the audit entry)")
@click.option("--drop-invalid-rows", is_flag=True,
              help="delete rows that fail their MAC (forged or edited without the KEK)")
@click.option("--reseal-server-state", is_flag=True,
              help="accept a server_state row that fails its MAC as it is")
@click.option("--yes", is_flag=True, help="do it; without --yes only report what is wrong")
def recover(data_dir: str, reason: str, drop_invalid_rows: bool, reseal_server_state: bool,
            yes: bool) -> None:
    """(local, needs the KEK) After a restore, rollback or tampering: report what the server
    refuses, and with --yes accept the database as it now is (audited)."""
    from sealtorch.keyserver import recovery

    with _local_store(data_dir) as store:
        if not yes:
            report = recovery.inspect(store)
            _echo(report.to_dict())
            if not report.healthy:
                sys.exit(1)
            return
        if not reason:
            raise ConfigError("say why with --reason (it is recorded in the audit log)")
        _echo(recovery.recover(store, reason=reason, drop_invalid_rows=drop_invalid_rows,
                               reseal_server_state=reseal_server_state))


@cli.group()
def sim() -> None:
    """Sim platforms (development only; needs 'sim = true' in the server config)."""


@sim.command("register")
@admin_options
@click.argument("public_key_file", type=click.Path(exists=True, dir_okay=False))
def sim_register(public_key_file: str, **kw: Any) -> None:
    """Trust the sim platform whose public key is in PUBLIC_KEY_FILE, for your tenant."""
    _echo(_admin(kw).call("POST", "/v1/admin/sim/platforms",
                          {"public_key": Path(public_key_file).read_text()}))


@cli.group()
def collateral() -> None:
    """DCAP collateral for offline verification."""


@collateral.command("import")
@click.option("--data-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="the key server's data directory")
@click.argument("src", type=click.Path(exists=True))
def collateral_import(data_dir: str, src: str) -> None:
    """(local) Copy collateral JSON FILE or DIR into the server's collateral directory."""
    import shutil

    from sealtorch.keyserver.config import load_config

    cfg = load_config(data_dir)
    dest = cfg.path(cfg.collateral_dir)
    dest.mkdir(mode=0o700, exist_ok=True)
    p = Path(src)
    files = [p] if p.is_file() else sorted(x for x in p.iterdir() if x.is_file())
    for f in files:
        json.loads(f.read_text())  # must be JSON
        shutil.copyfile(f, dest / f.name)
    _echo({"imported": [f.name for f in files], "dir": str(dest)})


def main(args: list[str] | None = None) -> None:
    run_cli(cli, args)
