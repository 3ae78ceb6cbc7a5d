"""An attacker with SQL access to dkeyserver's database, but neither the KEK nor a token, tries
to forge, roll back or erase what decides a release; every attempt is refused or detected, and
nothing is released meanwhile. Against a real server, on SQLite and on PostgreSQL.

The server runs with ``state_recheck_seconds = 0`` so that rows edited in place are caught at
the next request (the default re-checks every 60 s and at every change of the state sequence).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from tests.keyserver.conftest import SimCache
from tests.servers import RunningKeyServer, keyserver_cli, sim_policy, start_keyserver

from sealtorch.attestation import sim
from sealtorch.errors import GrantError, ServiceUnavailableError
from sealtorch.protocol import hpke
from sealtorch.protocol.release_client import tls_client_context

warnings.filterwarnings("ignore", category=RuntimeWarning)
MEAS = sim.measure("dkeycache")
OTHER = sim.measure("dkeycache", b"an old, vulnerable build")
STRICT = {"SEALTORCH_KS_STATE_RECHECK_SECONDS": "0"}


@dataclass
class World:
    ks: RunningKeyServer
    eng: sa.Engine
    cache: SimCache
    cache_id: str
    key: bytes
    db_url: str | None

    # --- the attacker's SQL -----------------------------------------------------------------
    def rows(self, table: str, where: str = "1=1", **params: Any) -> list[dict[str, Any]]:
        with self.eng.connect() as c:
            return [dict(r._mapping) for r in c.execute(
                sa.text(f"SELECT * FROM {table} WHERE {where}"), params)]

    def sql(self, statement: str, **params: Any) -> None:
        with self.eng.begin() as c:
            c.execute(sa.text(statement), params)

    def write_back(self, table: str, row: dict[str, Any], pk: tuple[str, ...]) -> None:
        """Put an old copy of a row back, as a database administrator can."""
        sets = ", ".join(f"{k} = :{k}" for k in row if k not in pk)
        where = " AND ".join(f"{k} = :{k}" for k in pk)
        with self.eng.begin() as c:
            if not c.execute(sa.text(f"UPDATE {table} SET {sets} WHERE {where}"), row).rowcount:
                cols = ", ".join(row)
                c.execute(sa.text(f"INSERT INTO {table} ({cols}) VALUES "
                                  f"({', '.join(':' + k for k in row)})"), row)

    def dump(self) -> dict[str, list[dict[str, Any]]]:
        """Every row of every table (what a backup holds)."""
        names = sa.inspect(self.eng).get_table_names()
        return {t: self.rows(t) for t in names if t != "schema_migrations"}

    def restore(self, dump: dict[str, list[dict[str, Any]]]) -> None:
        """Replace every table's content with the backup's."""
        meta = sa.MetaData()
        meta.reflect(self.eng)
        with self.eng.begin() as c:
            for t, rows in dump.items():
                c.execute(meta.tables[t].delete())
                if rows:
                    c.execute(meta.tables[t].insert(), rows)

    # --- what the server answers ------------------------------------------------------------
    def refusal(self) -> str:
        """'ready', or the code /readyz refuses with."""
        with httpx.Client(verify=tls_client_context(self.ks.ca_cert_path), timeout=30) as h:
            r = h.get(self.ks.url + "/readyz")
        return "ready" if r.status_code == 200 else str(r.json()["error"]["code"])

    def release(self, models: list[str] | None = None) -> Any:
        """A release by the approved cache (raises ServiceUnavailableError on a 503)."""
        with self.ks.client() as client:
            ev, sk, pk, n = self.cache.request(client)
            return client.release(ev, pk, n, models or ["m"], private_key=sk)

    def refused_release(self, expect: str) -> None:
        """A release is refused as a whole with ``expect``, and no key leaves the server."""
        with pytest.raises(ServiceUnavailableError, match="503"):
            self.release()
        assert self.refusal() == expect

    def admin(self, method: str, path: str, body: Any = None, token: str | None = None
              ) -> httpx.Response:
        tok = token or self.ks.admin_token_file.read_text().strip()
        with httpx.Client(verify=tls_client_context(self.ks.ca_cert_path), timeout=30) as h:
            return h.request(method, self.ks.admin_url + path, json=body,
                             headers={"Authorization": f"Bearer {tok}"})


@pytest.fixture(params=["sqlite", "postgresql"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    db_url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    ks = start_keyserver(tmp_path, db_url=db_url, sim=True, env=STRICT)
    eng = sa.create_engine(db_url or f"sqlite:///{ks.data_dir / 'keyserver.db'}")
    try:
        cache = SimCache(ks.sim_platform(), MEAS)
        key = os.urandom(32)
        ks.add_model("m", key)
        ks.set_policy("m", sim_policy(MEAS, cache.platform_key))
        with ks.client() as client:
            ev, sk, pk, n = cache.request(client)
            cache_id = client.release(ev, pk, n, ["m"], private_key=sk).cache_id
        ks.approve_cache(cache_id)
        w = World(ks, eng, cache, cache_id, key, db_url)
        assert [g.grant.model_id for g in w.release().grants] == ["m"]
        yield w
    finally:
        eng.dispose()
        w_ks = locals().get("w")
        (w_ks.ks if w_ks else ks).stop()


# --- forged rows ---------------------------------------------------------------------------
def test_a_forged_token_row_is_refused(world: World) -> None:
    token = "stk_" + "a" * 43  # the attacker's own token, and its hash in a new row
    world.sql("INSERT INTO tokens (token_id, tenant, token_hash, expires, revoked, created,"
              " row_seq, mac) VALUES ('evil', 'default', :h, 4102444800, :f, 1, 99, :m)",
              h=hashlib.sha256(token.encode()).hexdigest(), f=False, m=os.urandom(32))
    r = world.admin("GET", "/v1/admin/models", token=token)
    assert r.status_code == 503 and r.json()["error"]["code"] == "state_tampered"
    assert "tokens[evil]" in r.json()["error"]["message"]  # names the row, not its content
    world.refused_release("state_tampered")
    # recovery, explicit and audited, drops the forged row: the token is unknown after it
    report = keyserver_cli("recover", "--data-dir", str(world.ks.data_dir), env=world.ks.env,
                           check=False)
    assert report.returncode == 1 and "tokens[evil]" in report.stdout
    keyserver_cli("recover", "--data-dir", str(world.ks.data_dir), "--yes", "--reason",
                  "forged token row", "--drop-invalid-rows", env=world.ks.env)
    assert world.admin("GET", "/v1/admin/models", token=token).status_code == 401
    assert world.admin("GET", "/v1/admin/models").status_code == 200
    assert [g.grant.model_id for g in world.release().grants] == ["m"]
    (entry,) = world.rows("audit_log", "action = 'recover'")
    assert "tokens[evil]" in entry["details"] and "forged token row" in entry["details"]


def test_an_export_cannot_be_rearmed(world: World) -> None:
    assert world.admin("POST", "/v1/admin/models", {"model_id": "gen", "key": None}
                       ).status_code == 200
    saved = world.rows("key_exports", "model_id = 'gen'")
    assert len(saved) == 1

    def export() -> httpx.Response:
        _, pk = hpke.generate_keypair()
        return world.admin("POST", "/v1/admin/model-export/gen",
                           {"key_version": 1, "public_key": base64.b64encode(pk).decode()})

    assert export().status_code == 200
    second = export()
    assert second.status_code == 409 and "sealed_key" not in second.text
    # the copy a backup held is written back: the server sees a row nobody sealed
    world.write_back("key_exports", saved[0], ("model_id", "key_version"))
    third = export()
    assert third.status_code == 503 and third.json()["error"]["code"] == "state_tampered"
    assert "sealed_key" not in third.text
    # a copy made up from the key_versions row (no KEK: the MAC cannot be right)
    world.sql("DELETE FROM key_exports")
    kv = world.rows("key_versions", "model_id = 'gen'")[0]
    world.sql("INSERT INTO key_exports VALUES ('gen', 1, :w, 1, :s, :m)", w=kv["wrapped"],
              s=kv["row_seq"], m=kv["mac"])
    fourth = export()
    assert fourth.status_code == 503 and "sealed_key" not in fourth.text
    world.sql("DELETE FROM key_exports")
    assert export().status_code == 409  # as it was: exported once


def test_an_edited_row_is_refused_and_service_resumes_when_it_is_put_back(world: World
                                                                          ) -> None:
    before = world.rows("policies", "model_id = 'm'")[0]
    loosened = before["policy"].replace(MEAS.hex(), OTHER.hex())
    world.sql("UPDATE policies SET policy = :p WHERE model_id = 'm'", p=loosened)
    world.refused_release("state_tampered")
    world.write_back("policies", before, ("model_id",))
    assert world.refusal() == "ready"
    assert [g.grant.model_id for g in world.release().grants] == ["m"]


# --- rolled-back rows ----------------------------------------------------------------------
ROLLBACKS = ["policy", "model_state", "key_version_state", "cache_approval", "token_revoked",
             "sim_platform_deleted", "tenant_deleted", "audit_head"]


@pytest.mark.parametrize("kind", ROLLBACKS)
def test_a_rolled_back_row_is_detected(world: World, kind: str) -> None:
    """Keep a copy of a row, let the owner change it, write the copy back: refused."""
    token_file = world.ks.data_dir / "admin.token"
    if kind == "policy":  # the owner withdraws the cache's build; the old row comes back
        table, pk, where = "policies", ("model_id",), "model_id = 'm'"
        old = world.rows(table, where)[0]
        world.ks.set_policy("m", sim_policy(OTHER, world.cache.platform_key, version=2))
        assert world.release().denials == {"m": "denied"}
    elif kind == "model_state":
        table, pk, where = "models", ("model_id",), "model_id = 'm'"
        old = world.rows(table, where)[0]
        world.ks.admin("POST", "/v1/admin/model-revoke/m", {})
    elif kind == "key_version_state":
        table, pk, where = "key_versions", ("model_id", "key_version"), \
            "model_id = 'm' AND key_version = 1"
        old = world.rows(table, where)[0]
        world.ks.admin("POST", "/v1/admin/model-rotate/m", {})
        world.ks.admin("POST", "/v1/admin/model-retire/m", {"key_version": 1})
    elif kind == "cache_approval":
        table, pk, where = "cache_approvals", ("tenant", "cache_id"), "tenant = 'default'"
        old = world.rows(table, where)[0]
        world.ks.revoke_cache(world.cache_id)
    elif kind == "token_revoked":
        new = world.admin("POST", "/v1/admin/tokens", {"ttl_seconds": 3600}).json()
        table, pk, where = "tokens", ("token_id",), f"token_id = '{new['token_id']}'"
        old = world.rows(table, where)[0]
        world.admin("DELETE", f"/v1/admin/tokens/{new['token_id']}")
        assert world.admin("GET", "/v1/admin/models", token=new["token"]).status_code == 401
    elif kind == "sim_platform_deleted":
        table, pk, where = "sim_platforms", ("key",), "1=1"
        old = None
        world.sql("DELETE FROM sim_platforms")
    elif kind == "tenant_deleted":
        table, pk, where = "tenants", ("name",), "1=1"
        old = None
        world.sql("DELETE FROM tenants")
    else:  # the audit chain's head pointer rewound by one entry (and the entry deleted)
        table, pk, where = "audit_log", ("seq",), "1=1"
        last = max(r["seq"] for r in world.rows("audit_log"))
        prev = world.rows("audit_log", "seq = :s", s=last - 1)[0]
        old = None
        world.sql("DELETE FROM audit_log WHERE seq = :s", s=last)
        world.sql("UPDATE server_state SET audit_seq = :s, audit_head = :h",
                  s=prev["seq"], h=prev["hash"])
    if old is not None:
        world.write_back(table, old, pk)
    expect = "state_rollback" if kind == "audit_head" else "state_tampered"
    world.refused_release(expect)
    r = world.admin("POST", "/v1/admin/tokens", {"ttl_seconds": 3600})
    assert r.status_code in (401, 503) and "token" not in r.json()  # no admin write either
    assert token_file.exists()


# --- the whole database restored from a backup --------------------------------------------------
def test_a_restored_database_is_refused_until_recovered(world: World, tmp_path: Path) -> None:
    backup = world.dump()
    world.ks.revoke_cache(world.cache_id)  # the owner revokes the cache; the backup predates it
    with world.ks.client() as client:  # a cache that saw the newer state
        ev, sk, pk, n = world.cache.request(client)
        seen = client.release(ev, pk, n, ["m"], private_key=sk)
        assert seen.grants == [] and seen.cache_state == "revoked"
        world.restore(backup)
        # the running server: refuses (its memory holds the newer state)
        world.refused_release("state_rollback")
        # restarted: refuses too (the high-water mark file)
        world.ks.stop()
        world.ks = world.ks.restart()
        world.refused_release("state_rollback")
        # a brand-new replica that never saw this database accepts it (documented): but the
        # cache that saw the newer state refuses what it answers
        fresh = tmp_path / "replica"
        shutil.copytree(world.ks.data_dir, fresh, ignore=shutil.ignore_patterns(
            "run.json", "state.hwm*", "*.db*", "*.writelock"))
        if world.db_url is None:
            for f in world.ks.data_dir.glob("keyserver.db*"):
                shutil.copy(f, fresh / f.name)
            (fresh / "config.toml").write_text((fresh / "config.toml").read_text())
        replica = start_keyserver(tmp_path, data_dir=fresh, env={**STRICT})
        try:
            with replica.client() as rc:
                rc.verifier = client.verifier  # the cache's verifier: it has seen newer state
                ev, sk, pk, n = world.cache.request(rc)
                with pytest.raises(GrantError, match="older than state"):
                    rc.release(ev, pk, n, ["m"], private_key=sk)
        finally:
            replica.stop()
    # the operator recovers, explicitly and audited: the server serves the accepted state
    out = keyserver_cli("recover", "--data-dir", str(world.ks.data_dir), "--yes", "--reason",
                        "restored last night's backup", env=world.ks.env)
    done = json.loads(out.stdout)
    assert done["recovered"] is True and done["state_seq"] > seen.state_seq
    assert [g.grant.model_id for g in world.release().grants] == ["m"]
    verdict = keyserver_cli("audit", "verify", "--data-dir", str(world.ks.data_dir),
                            env=world.ks.env)
    assert json.loads(verdict.stdout)["ok"] is True


# --- the audit log ------------------------------------------------------------------------------
def test_audit_edits_reorders_deletions_and_truncation_are_named(world: World,
                                                                 tmp_path: Path) -> None:
    head_file = tmp_path / "head.json"
    head_file.write_text(json.dumps(world.admin("GET", "/v1/admin/audit/head").json()))
    for _ in range(3):
        world.release()
    world.ks.stop()
    d = str(world.ks.data_dir)

    def verify(*extra: str) -> list[str]:
        out = keyserver_cli("audit", "verify", "--data-dir", d, *extra, env=world.ks.env,
                            check=False)
        assert out.returncode == (1 if json.loads(out.stdout)["problems"] else 0)
        return list(json.loads(out.stdout)["problems"])

    assert verify("--head", str(head_file)) == []
    rows = world.rows("audit_log")
    a, b = rows[-3], rows[-2]
    # edited
    world.sql("UPDATE audit_log SET code = 'denied' WHERE seq = :s", s=a["seq"])
    assert any(f"seq {a['seq']}: edited" in p for p in verify())
    world.write_back("audit_log", a, ("seq",))
    # reordered: two entries swap places
    world.sql("DELETE FROM audit_log WHERE seq IN (:x, :y)", x=a["seq"], y=b["seq"])
    world.write_back("audit_log", {**a, "seq": b["seq"]}, ("seq",))
    world.write_back("audit_log", {**b, "seq": a["seq"]}, ("seq",))
    assert any("reordered" in p for p in verify())
    world.write_back("audit_log", a, ("seq",))
    world.write_back("audit_log", b, ("seq",))
    assert verify() == []
    # deleted from the middle
    world.sql("DELETE FROM audit_log WHERE seq = :s", s=a["seq"])
    assert any(f"seq {a['seq']}-{a['seq']}: deleted" in p for p in verify())
    world.write_back("audit_log", a, ("seq",))
    # truncated: the newest entries deleted and the head pointer rewound
    signed = json.loads(head_file.read_text())["audit_head"]["body"]
    world.sql("DELETE FROM audit_log WHERE seq >= :s", s=signed["seq"])
    keep = world.rows("audit_log", "seq = :s", s=signed["seq"] - 1)[0]
    world.sql("UPDATE server_state SET audit_seq = :s, audit_head = :h", s=keep["seq"],
              h=keep["hash"])
    problems = verify("--head", str(head_file))
    assert any("truncated" in p and str(signed["seq"]) in p for p in problems)
    # without a saved head, this server's high-water mark still says so
    assert any("truncated: this server has seen" in p for p in verify())
