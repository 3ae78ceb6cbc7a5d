"""Shared test fixtures: the attestation vectors, PostgreSQL, and the rule for missing services."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests import pgserver

VECTORS = Path(__file__).resolve().parent / "vectors" / "attestation"


def services_required() -> bool:
    """True in CI (``SEALTORCH_REQUIRE_SERVICES=1`` or ``CI`` set): missing services fail."""
    return os.environ.get("SEALTORCH_REQUIRE_SERVICES") == "1" or bool(os.environ.get("CI"))


def require_service(what: str) -> None:
    """Skip locally when a service is missing, but fail in CI (SEALTORCH_REQUIRE_SERVICES=1)."""
    if services_required():
        pytest.fail(f"{what} is required in CI but not available")
    pytest.skip(f"{what} not available")


@pytest.fixture(scope="session")
def vectors() -> Path:
    """The real attestation vectors, kept in the repository (tests/vectors/attestation)."""
    if not VECTORS.is_dir():
        pytest.fail(f"attestation vectors not found at {VECTORS}")
    return VECTORS


def pg_admin_conn() -> Any:
    """An autocommit admin connection to the session's PostgreSQL server (for helpers that
    are not fixtures; a test using it must depend on ``pg_url`` or ``pg_server``)."""
    return pgserver.current().admin_conn()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pgserver.PgServer]:
    """The PostgreSQL server of this session: the machine's at 127.0.0.1:5432 (or
    ``$SEALTORCH_TEST_PG_PORT``) if it answers, else a throwaway one (see tests/pgserver.py)."""
    try:
        server = pgserver.find_or_start()
    except pgserver.PgUnavailable as e:
        require_service(f"PostgreSQL ({e})")
        raise
    pgserver.CURRENT[:] = [server]
    try:
        yield server
    finally:
        pgserver.CURRENT.clear()
        server.stop()


@pytest.fixture
def pg_url(pg_server: pgserver.PgServer) -> Iterator[str]:
    """A fresh database ``sealtorch_<random>`` on the session's server, dropped afterwards."""
    name = "sealtorch_" + secrets.token_hex(6)
    with pg_server.admin_conn() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield pg_server.url(name)
    finally:
        with pg_server.admin_conn() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_throwaway() -> Iterator[pgserver.PgServer]:
    """A PostgreSQL server of the test's own (for tests that restart or stop it), always a
    throwaway one: the machine's server is shared and never restarted by a test."""
    try:
        server = pgserver.start_throwaway()
    except pgserver.PgUnavailable as e:
        require_service(f"a throwaway PostgreSQL ({e})")
        raise
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def _private_tempdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every temporary file of the session, of this process and of the servers it starts,
    goes to one private directory; whatever a test left there fails the session (after it is
    removed), so no key or TLS private key outlives a run in the machine's temp directory."""
    import shutil
    import tempfile

    tmp_path_factory.getbasetemp()  # pytest's own base, fixed before the temp dir changes
    private = Path(tempfile.mkdtemp(prefix="sealtorch-test-"))
    private.chmod(0o711)  # a throwaway PostgreSQL runs as another user and needs to traverse
    saved = (tempfile.tempdir, os.environ.get("TMPDIR"))
    tempfile.tempdir = str(private)
    os.environ["TMPDIR"] = str(private)
    try:
        yield private
    finally:
        tempfile.tempdir = saved[0]
        if saved[1] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[1]
        left = sorted(p.name for p in private.iterdir())
        shutil.rmtree(private, ignore_errors=True)
        if left:
            pytest.fail(f"tests left {len(left)} entries in the temp directory: {left[:10]}")
