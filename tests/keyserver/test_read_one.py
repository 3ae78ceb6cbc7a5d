"""``Database.read_one``: the one-statement read behind every state freshness check (status
polls, readiness) sees what was committed before it ran, and survives a dropped connection."""

from __future__ import annotations

import psycopg
from sqlalchemy.engine import make_url

from sealtorch.keyserver.db import Database


def _raw(url: str) -> psycopg.Connection:
    u = make_url(url).set(drivername="postgresql")
    return psycopg.connect(u.render_as_string(hide_password=False), autocommit=True)


def test_read_one_sees_each_commit_at_once_and_reconnects(pg_url: str) -> None:
    db = Database(pg_url)
    try:
        with _raw(pg_url) as other:
            other.execute("CREATE TABLE t (v integer)")
            other.execute("INSERT INTO t VALUES (1)")
            assert db.read_one("SELECT v FROM t") == (1,)
            other.execute("UPDATE t SET v = 2")  # committed by another session
            assert db.read_one("SELECT v FROM t") == (2,)  # no snapshot kept from before
            assert db.read_one("SELECT v FROM t WHERE v = 9") is None
            # the database drops the reader's connection (a restart, an admin's kill)
            killed = other.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <>"
                " pg_backend_pid() AND datname = current_database()").fetchall()
            assert killed and all(k[0] for k in killed)
            other.execute("UPDATE t SET v = 3")
            assert db.read_one("SELECT v FROM t") == (3,)
    finally:
        db.close()


def test_read_one_on_sqlite(tmp_path: object) -> None:
    db = Database(f"sqlite:///{tmp_path}/x.db")
    try:
        with db.tx() as conn:
            conn.exec_driver_sql("CREATE TABLE t (v integer)")
            conn.exec_driver_sql("INSERT INTO t VALUES (5)")
        assert db.read_one("SELECT v FROM t") == (5,)
    finally:
        db.close()
