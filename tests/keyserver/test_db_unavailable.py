"""A database that drops its connections (PostgreSQL restart, failover) or stops accepting
new ones makes dkeyserver answer 503 ``unavailable`` on every request path, never a 500, and
release no key; once the database is back the same process serves again.

The outage is real: the server's backend connections are terminated with
``pg_terminate_backend`` and the database refuses new ones (``ALLOW_CONNECTIONS false``)."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from tests.keyserver.conftest import SimCache, _pg_admin_conn
from tests.servers import sim_policy, start_keyserver

from sealtorch.attestation import sim
from sealtorch.errors import StoreError
from sealtorch.keyserver.bootstrap import init_data_dir, open_store
from sealtorch.keyserver.nonces import NonceBook
from sealtorch.keyserver.store import DatabaseUnavailableError, Store
from sealtorch.protocol import hpke
from sealtorch.protocol.messages import ReleaseRequest, StatusRequest, status_key_info
from sealtorch.protocol.release_client import tls_client_context

MEAS = sim.measure("dkeycache")


def _db_name(pg_url: str) -> str:
    return pg_url.rsplit("/", 1)[1]


def _terminate_backends(pg_url: str) -> int:
    """Terminate every connection to the test database (as a PostgreSQL restart does)."""
    with _pg_admin_conn() as c:
        rows = c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                         " WHERE datname = %s AND pid <> pg_backend_pid()",
                         (_db_name(pg_url),)).fetchall()
    return len(rows)


@contextmanager
def _database_down(pg_url: str) -> Iterator[None]:
    """The test database refuses new connections and has lost its open ones, until exit."""
    name = _db_name(pg_url)
    with _pg_admin_conn() as c:
        c.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    try:
        _terminate_backends(pg_url)
        yield
    finally:
        with _pg_admin_conn() as c:
            c.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


# --- the group-commit writer (raw DBAPI statements) on a connection that died ------------------
@pytest.fixture
def pg_store(tmp_path: Path, pg_url: str) -> Iterator[Store]:
    cfg = init_data_dir(tmp_path / "ks", db=pg_url)
    st, kek = open_store(cfg)
    yield st
    st.close()
    kek.close()


def _audit_op(store: Store) -> Any:
    def op(conn: Any) -> Any:
        return store.append_audit(conn, actor="test", action="release", decision="deny",
                                  code="denied")
    return op


@pytest.mark.parametrize("write", ["nonce_burn", "audit_append", "state_read"])
def test_writer_on_a_terminated_connection_raises_unavailable(pg_store: Store, pg_url: str,
                                                              write: str) -> None:
    committer = pg_store.committer()
    # no idle ping: the next batch runs on the connection the database has just killed
    committer.IDLE_PING_SECONDS = float("inf")
    db = pg_store.db
    ops = {
        "nonce_burn": lambda conn: NonceBook.burn(db, conn, os.urandom(32),
                                                  int(time.time()) + 60),
        "audit_append": _audit_op(pg_store),
        "state_read": lambda conn: pg_store.in_batch(conn),
    }
    assert committer.run(ops["nonce_burn"]) is True  # the writer holds its connection now
    assert _terminate_backends(pg_url) >= 1
    with pytest.raises(DatabaseUnavailableError, match="retry") as err:
        committer.run(ops[write])
    assert isinstance(err.value, StoreError) and err.value.code == "unavailable"
    assert _db_name(pg_url) in str(err.value)  # the message names the database
    # the writer reconnects by itself on the next batch
    committer.run(ops[write])
    with db.engine.connect() as c:
        seq = c.execute(sa.text("SELECT audit_seq FROM server_state")).scalar_one()
        rows = c.execute(sa.text("SELECT count(*) FROM audit_log")).scalar_one()
    assert seq == rows  # the chain's head and its rows stayed in step


def test_reads_while_the_database_is_down_raise_unavailable(pg_store: Store,
                                                            pg_url: str) -> None:
    from sealtorch.keyserver.migrations import schema_version

    pg_store.states.forget()
    with _database_down(pg_url):
        for read in (pg_store.state, pg_store.audit_head, lambda: schema_version(pg_store.db)):
            with pytest.raises(DatabaseUnavailableError):
                read()
        with pytest.raises(DatabaseUnavailableError), pg_store.db.tx():
            pass
    assert pg_store.audit_head().seq == 3  # init, tenant_add, token_create
    assert pg_store.state().tenants == {"default"}


# --- over HTTP: every route answers 503 'unavailable' and releases nothing ---------------------
def test_database_outage_answers_503_unavailable_and_releases_nothing(tmp_path: Path,
                                                                     pg_url: str) -> None:
    ks = start_keyserver(tmp_path, db_url=pg_url, sim=True, auto_approve=True)
    try:
        key = os.urandom(32)
        ks.add_model("m", key)
        cache = SimCache(ks.sim_platform(), MEAS)
        ks.set_policy("m", sim_policy(MEAS, cache.platform_key))
        with ks.client() as client, httpx.Client(
                verify=tls_client_context(ks.ca_cert_path), timeout=30) as h:

            sent: list[tuple[Any, bytes]] = []

            def release() -> httpx.Response:
                ev, sk, pk, n = cache.request(client)
                sent.append((sk, n))
                body = ReleaseRequest(evidence=ev.to_dict(), public_key=pk, nonce=n,
                                      models=["m"]).to_json()
                return h.post(ks.url + "/v1/release", json=body)

            ok = release()
            assert ok.status_code == 200 and len(ok.json()["grants"]) == 1
            cache_id = ok.json()["cache_id"]
            status_key = hpke.open(base64.b64decode(ok.json()["status_key"]), sent[0][0],
                                   status_key_info(cache_id, sent[0][1]))
            with _database_down(pg_url):
                answers = [release() for _ in range(3)]
                status = h.post(ks.url + "/v1/status", json=StatusRequest(
                    nonce=os.urandom(32), cache_id=cache_id, models=["m"]
                ).authenticated(status_key.view()).to_json())
                token = ks.admin_token_file.read_text().strip()
                admin = h.get(ks.admin_url + "/v1/admin/models",
                              headers={"Authorization": f"Bearer {token}"})
            for r in [*answers, status, admin]:
                assert r.status_code == 503, (r.status_code, r.text)
                assert r.json()["error"]["code"] == "unavailable", r.text
                assert "grants" not in r.json()
            # the database is back: the same process releases the same key again
            again = release()
            assert again.status_code == 200, again.text
            assert len(again.json()["grants"]) == 1
        assert ks.admin("GET", "/v1/admin/audit/verify")["ok"] is True
        assert "Traceback" not in ks.log_path.read_text()
    finally:
        ks.stop()


# --- in process: the nonce burn commits, then the database goes away mid-release --------------
def test_release_answers_503_when_the_database_goes_away_after_the_burn(
        tmp_path: Path, pg_url: str) -> None:
    """The burn commits on the writer's connection; the next read of the release (the sim
    platforms of the verifier) finds every other connection gone and no new one allowed."""
    import asyncio

    from sealtorch._secret import Secret
    from sealtorch.attestation import binding
    from sealtorch.keyserver.admin import Admin, Principal
    from sealtorch.keyserver.app import release_app
    from sealtorch.keyserver.bootstrap import load_signing_key
    from sealtorch.keyserver.service import KeyServer

    cfg = init_data_dir(tmp_path / "ks", sim=True, auto_approve=True, db=pg_url)
    store, kek = open_store(cfg)
    platform = sim.init_platform_key(tmp_path / "platform")
    ks = KeyServer(cfg, store, load_signing_key(cfg))
    admin, me = Admin(ks), Principal("default", "test")
    admin.sim_register(me, (tmp_path / "platform" / sim.PUBLIC_FILE).read_text())
    admin.model_add(me, "m", Secret(os.urandom(32)), 1)
    admin.policy_set(me, "m", sim_policy(MEAS, platform))
    cache = SimCache(platform, MEAS)

    def request() -> dict[str, Any]:
        n = ks.nonces.issue()
        _, pk = hpke.generate_keypair()
        rd = binding.report_data("remote", n, hpke.KEM_ID, pk, ks.audience)
        return ReleaseRequest(evidence=cache.attester().attest(rd).to_dict(), public_key=pk,
                              nonce=n, models=["m"]).to_json()

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=release_app(ks), client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://ks") as h:
            first = await h.post("/v1/release", json=request())
            writer_pid = store.committer()._conn.connection.driver_connection.info.backend_pid
            ks.invalidate_verifier()  # as a sim registration does: re-read on the next release
            name = _db_name(pg_url)
            with _pg_admin_conn() as c:
                c.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE"
                          " datname = %s AND pid <> %s", (name, writer_pid))
            try:
                lost = request()
                during = await h.post("/v1/release", json=lost)
            finally:
                with _pg_admin_conn() as c:
                    c.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            replay = await h.post("/v1/release", json=lost)
            after = await h.post("/v1/release", json=request())
        return [first, during, replay, after]

    try:
        first, during, replay, after = asyncio.run(scenario())
        assert first.status_code == 200 and len(first.json()["grants"]) == 1, first.text
        assert during.status_code == 503, (during.status_code, during.text)
        assert during.json() == {"error": {"code": "unavailable", "message":
                                           "the key server could not complete the request"}}
        # the nonce was burned before the failure: it never gets a key, not even on replay
        assert replay.status_code == 403 and replay.json()["error"]["code"] == "nonce_invalid"
        assert after.status_code == 200 and len(after.json()["grants"]) == 1, after.text
        with store.db.read() as c:
            granted = c.execute(sa.text("SELECT count(*) FROM audit_log WHERE action = 'release'"
                                        " AND decision = 'release'")).scalar_one()
        assert granted == 2
    finally:
        store.close()
        kek.close()
