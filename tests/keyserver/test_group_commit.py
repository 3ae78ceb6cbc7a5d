"""Group commit: concurrent nonce burns, decisions and audit entries share transactions, each
answer waits for its own committed batch, one failing operation never fails or commits on
behalf of its neighbours, and the audit chain stays intact under concurrent releases."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from tests.keyserver.conftest import SimCache
from tests.servers import sim_policy, start_keyserver

from sealtorch.attestation import sim
from sealtorch.errors import ReleaseDenied
from sealtorch.keyserver import queries
from sealtorch.keyserver.audit import Head, verify_chain
from sealtorch.keyserver.bootstrap import init_data_dir, open_store
from sealtorch.keyserver.nonces import NonceBook
from sealtorch.keyserver.store import Store

MEAS = sim.measure("dkeycache")


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    db = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    st, kek = open_store(init_data_dir(tmp_path / "ks", db=db))
    yield st
    st.close()
    kek.close()


def _count(st: Store, table: str) -> int:
    with st.db.engine.connect() as c:
        return int(c.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())


def _burn(st: Store, n: bytes) -> Any:
    return lambda conn: NonceBook.burn(st.db, conn, n, 2**40)


def _verify(st: Store, rows: list[dict[str, Any]], head: Head | None = None) -> list[str]:
    keyed_from = st.state().keyed_from
    return verify_chain(rows, mac=st.keyring.audit, keyed_from=keyed_from, head=head)


def test_concurrent_burns_accept_each_nonce_once(store: Store) -> None:
    nonces = [os.urandom(32) for _ in range(20)]
    attempts = nonces * 3  # every nonce offered three times, concurrently
    committer = store.committer()

    def burn(n: bytes) -> bool:
        return committer.run(_burn(store, n))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(burn, attempts))
    fresh = [n for n, ok in zip(attempts, results, strict=True) if ok]
    assert sorted(fresh) == sorted(nonces)  # each accepted exactly once
    assert _count(store, "consumed_nonces") == len(nonces)


def test_a_failing_operation_is_isolated_from_its_batch(store: Store) -> None:
    committer = store.committer()
    gate = threading.Event()
    first = committer.submit(lambda conn: gate.wait(30))  # holds the writer: the rest queue up
    a, b = os.urandom(32), os.urandom(32)

    def boom(conn: Any) -> None:
        store.append_audit(conn, actor="t", action="x", decision="deny", code="c")
        raise ValueError("operation failed")

    start = store.audit_head().seq
    fa = committer.submit(_burn(store, a))
    fbad = committer.submit(boom)
    fb = committer.submit(lambda conn: store.append_audit(
        conn, actor="t", action="y", decision="admin", code="ok"))
    fc = committer.submit(_burn(store, b))
    gate.set()
    assert first.result(30) is True
    assert fa.result(30) is True and fc.result(30) is True
    with pytest.raises(ValueError):
        fbad.result(30)
    head = fb.result(30)
    # the neighbours committed; the failed operation left nothing behind
    assert _count(store, "consumed_nonces") == 2
    rows = queries.audit_rows(store.db)
    assert [r["action"] for r in rows[start:]] == ["y"]
    assert store.audit_head() == head == Head(start + 1, rows[-1]["hash"])
    assert _verify(store, rows, head) == []


def test_batched_audit_entries_chain_and_head(store: Store) -> None:
    committer = store.committer()

    def append(i: int) -> Head:
        return committer.run(lambda conn: store.append_audit(
            conn, actor=f"a{i}", action="release", decision="release", code="granted"))

    start = store.audit_head().seq
    with ThreadPoolExecutor(16) as pool:
        heads = list(pool.map(append, range(64)))
    # and more entries in one batch than one statement inserts
    n = queries.ROWS_PER_STATEMENT + 3
    last = committer.run(lambda conn: [store.append_audit(
        conn, actor=f"b{i}", action="release", decision="release", code="granted")
        for i in range(n)][-1])
    rows = queries.audit_rows(store.db)
    assert len(rows) == start + 64 + n and last.seq == start + 64 + n
    assert sorted(h.seq for h in heads) == list(range(start + 1, start + 65))
    assert store.audit_head() == Head(start + 64 + n, rows[-1]["hash"])
    assert _verify(store, rows, store.audit_head()) == []


def test_enrolments_are_written_with_their_batch(store: Store) -> None:
    """A batch's cache enrolments are upserted together before its COMMIT: a cache enrolled
    twice keeps its first sighting and takes the later key; a rolled-back batch enrols none."""
    committer = store.committer()

    def enrol(conn: Any, cache_id: str, key: str, now: int) -> None:
        store.enrol_cache(conn, cache_id, "sim", "p", key, "m", now)

    def rows() -> dict[str, tuple[str, int, int]]:
        return {r["cache_id"]: (r["public_key"], r["first_seen"], r["last_seen"])
                for r in queries.cache_rows(store.db)}

    committer.run(lambda conn: [enrol(conn, "c1", "k1", 10), enrol(conn, "c2", "k2", 11),
                                enrol(conn, "c1", "k3", 12)])  # one batch
    assert rows() == {"c1": ("k3", 10, 12), "c2": ("k2", 11, 11)}
    committer.run(lambda conn: [enrol(conn, "c2", "k4", 20), enrol(conn, "c2", "k5", 21)])
    assert rows()["c2"] == ("k5", 11, 21)  # an enrolled cache keeps its first sighting
    many = [f"m{i}" for i in range(queries.ROWS_PER_STATEMENT + 5)]  # two statements
    committer.run(lambda conn: [enrol(conn, c, "k", 30) for c in many])
    assert set(many) <= set(rows())

    def enrol_then_fail(conn: Any) -> None:
        store.enrol_cache(conn, "c9", "sim", "p", "k9", "m", 13)
        raise RuntimeError("this operation fails after enrolling")

    with pytest.raises(RuntimeError, match="fails after enrolling"):
        committer.run(enrol_then_fail)
    assert queries.cache_rows(store.db, {"c9"}) == []
    with store.db.engine.connect() as conn, pytest.raises(RuntimeError, match="outside"):
        store.enrol_cache(conn, "c8", "sim", "p", "k8", "m", 14)


def _concurrent_releases(tmp_path: Path, db_url: str | None) -> None:
    ks = start_keyserver(tmp_path, db_url=db_url, auto_approve=True)
    try:
        cache = SimCache(ks.sim_platform(), MEAS)
        key = os.urandom(32)
        ks.add_model("m", key)
        ks.set_policy("m", sim_policy(MEAS, cache.platform_key))
        start = ks.admin("GET", "/v1/admin/audit?limit=1000")["entries"]

        def one(_: int) -> tuple[Any, ...]:
            with ks.client() as client:
                ev, sk, pk, n = cache.request(client)
                res = client.release(ev, pk, n, ["m"], private_key=sk)
                return res, ev, pk, n

        with ThreadPoolExecutor(12) as pool:
            done = list(pool.map(one, range(36)))
        for res, *_ in done:
            assert res.denials == {} and len(res.grants) == 1
            assert res.grants[0].key is not None and res.grants[0].key.equals(key)
        # every answer carried a distinct committed audit head
        assert len({res.audit_head.seq for res, *_ in done}) == len(done)
        # replaying any of them is refused: its nonce was burned
        res, ev, pk, n = done[0]
        with ks.client() as client, pytest.raises(ReleaseDenied) as ei:
            client.release(ev, pk, n, ["m"])
        assert ei.value.denial == "nonce_invalid"
        entries = ks.admin("GET", "/v1/admin/audit?limit=1000")["entries"]
        granted = [e for e in entries[len(start):] if e["code"] == "granted"]
        assert len(granted) == len(done)
        verdict = ks.admin("GET", "/v1/admin/audit/verify")
        assert verdict["ok"] is True, verdict["problems"]
        # every cache that got a key was enrolled by its release's batch
        listed = {c["cache_id"] for c in ks.admin("GET", "/v1/admin/caches")["caches"]}
        assert {res.cache_id for res, *_ in done} <= listed
    finally:
        ks.stop()


def test_concurrent_releases_sqlite(tmp_path: Path) -> None:
    _concurrent_releases(tmp_path, None)


def test_concurrent_releases_postgresql(tmp_path: Path, pg_url: str) -> None:
    _concurrent_releases(tmp_path, pg_url)
