"""The key server's connection to its database: engine, transactions, locks, and the one
mapping of connection-level failures to :class:`DatabaseUnavailableError`.

SQLite (WAL, synchronous=FULL, BEGIN IMMEDIATE) by default, PostgreSQL for replicas. Nothing
here knows what the tables mean.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from sealtorch.errors import ConfigError, StoreError


class DatabaseUnavailableError(StoreError):
    """The database could not be reached or dropped the connection mid-request (restart,
    failover, full disk): nothing was decided or released; the request may be retried."""

    code = "unavailable"


def _dbapi_connection_errors() -> tuple[type[BaseException], ...]:
    """The PEP 249 connection-level error classes of the drivers we use directly (the release
    hot path runs plain DBAPI statements, whose errors SQLAlchemy never sees)."""
    out: list[type[BaseException]] = [sqlite3.OperationalError, sqlite3.InterfaceError]
    try:
        import psycopg
    except ImportError:  # pragma: no cover - PostgreSQL support not installed
        pass
    else:
        out += [psycopg.OperationalError, psycopg.InterfaceError]
    return tuple(out)


_DBAPI_CONNECTION_ERRORS = _dbapi_connection_errors()


def is_connection_error(e: BaseException) -> bool:
    """True when ``e`` says the database (not the request) failed: it is unreachable, dropped
    the connection, shut down, or cannot write (PEP 249 OperationalError/InterfaceError, a
    pool timeout, or any error after which SQLAlchemy invalidated the connection)."""
    if isinstance(e, sa_exc.DBAPIError):
        return bool(e.connection_invalidated) or isinstance(
            e, sa_exc.OperationalError | sa_exc.InterfaceError)
    return isinstance(e, (sa_exc.DisconnectionError, sa_exc.TimeoutError,
                          *_DBAPI_CONNECTION_ERRORS))


def _describe(url: str) -> str:
    """The database named in an error: host and database, never a password."""
    from sqlalchemy.engine import make_url

    try:
        u = make_url(url)
    except Exception:
        return "the configured database"
    if u.get_backend_name() == "sqlite":
        return f"SQLite database {u.database}"
    return f"PostgreSQL database {u.database!r} at {u.host or 'localhost'}:{u.port or 5432}"


@contextmanager
def db_errors(url: str | None = None) -> Iterator[None]:
    """Turn connection-level database failures raised inside into
    :class:`DatabaseUnavailableError`, naming the driver error's type only (its message can
    quote statement parameters); everything else passes through unchanged."""
    try:
        yield
    except DatabaseUnavailableError:
        raise
    except Exception as e:
        if not is_connection_error(e):
            raise
        orig = e.orig if isinstance(e, sa_exc.DBAPIError) and e.orig is not None else e
        where = f" ({_describe(url)})" if url else ""
        raise DatabaseUnavailableError(
            f"database unavailable{where}: {type(orig).__name__}; check that it runs and "
            "exists, then retry") from e


class Database:
    """One engine plus the write serialisation SQLite needs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"future": True}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        else:
            kwargs.update(pool_size=20, max_overflow=20, pool_pre_ping=True)
        try:
            self.engine: Engine = create_engine(url, **kwargs)
        except (SQLAlchemyError, ImportError, ValueError) as e:
            raise ConfigError(f"database URL is not usable ({type(e).__name__})") from e
        if self.is_sqlite:
            self._sqlite_setup()
        # SQLite has one writer: queue this process's write transactions on a lock instead of
        # letting threads spin in SQLite's busy handler (which sleeps up to 100 ms per retry)
        self._write_lock = threading.Lock() if self.is_sqlite else None
        self._readers: list[Any] = []  # list.append/pop are atomic: no lock needed
        self._lock_fd: int | None = None
        db_path = self.engine.url.database if self.is_sqlite else None
        if db_path and db_path != ":memory:":
            # and across worker processes: a kernel file lock wakes the next writer at once
            try:
                self._lock_fd = os.open(db_path + ".writelock", os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as e:
                raise ConfigError(
                    f"cannot open the SQLite database at {db_path} ({e.strerror}); check the "
                    "data directory") from None

    def _sqlite_setup(self) -> None:
        @event.listens_for(self.engine, "connect")
        def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # durability: fsync on every commit
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(self.engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    #: idle autocommit connections kept for :meth:`read_one` (more are opened when needed)
    READERS_KEPT = 8

    def read_one(self, sql: str) -> tuple[Any, ...] | None:
        """The first row of one read-only statement, executed now. On PostgreSQL it runs on an
        autocommit connection of this process's own (one round trip; a pooled read costs four:
        the pre-ping, BEGIN, the statement and the ROLLBACK at check-in); a dead connection
        (database restarted) is dropped and the statement retried once on a new one."""
        if self.is_sqlite:
            with self.read() as conn:
                cur = self.cursor(conn)
                cur.execute(sql)
                return tuple(r) if (r := cur.fetchone()) is not None else None
        with self.errors():
            for attempt in (0, 1):
                try:
                    raw = self._readers.pop()
                except IndexError:
                    cargs, cparams = self.engine.dialect.create_connect_args(self.engine.url)
                    raw = self.engine.dialect.dbapi.connect(*cargs, **cparams)  # type: ignore[union-attr]
                    raw.autocommit = True
                try:
                    with raw.cursor() as cur:
                        cur.execute(sql)
                        row = cur.fetchone()
                except Exception as e:
                    raw.close()
                    if attempt or not is_connection_error(e):
                        raise
                    continue
                if len(self._readers) < self.READERS_KEPT:
                    self._readers.append(raw)
                else:
                    raw.close()
                return tuple(row) if row is not None else None
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        while self._readers:
            self._readers.pop().close()
        self.engine.dispose()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        if self._lock_fd is None:
            yield
            return
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def errors(self) -> Any:
        """:func:`db_errors` naming this database."""
        return db_errors(self.url)

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        """One write transaction (SQLite: BEGIN IMMEDIATE under this process's write lock);
        a connection-level failure inside it raises :class:`DatabaseUnavailableError`."""
        with self.errors():
            if self._write_lock is not None:
                with self._write_lock, self._file_lock(), self.engine.begin() as conn:
                    yield conn
            else:
                with self.engine.begin() as conn:
                    yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A pooled connection for reads outside a write transaction."""
        with self.errors(), self.engine.connect() as conn:
            yield conn

    @contextmanager
    def tx_on(self, conn: Connection) -> Iterator[Connection]:
        """One transaction on a connection the caller keeps open (the group-commit writer's:
        no pool checkout, checkin or pre-ping round trip per batch), under the same lock."""
        with self.errors():
            if self._write_lock is not None:
                with self._write_lock, self._file_lock(), conn.begin():
                    yield conn
            else:
                with conn.begin():
                    yield conn

    # --- plain DBAPI statements (hot paths) ------------------------------------------------
    def sql(self, text: str) -> str:
        """``?`` placeholders for sqlite3, ``%s`` for psycopg (our SQL has no literal ``?``)."""
        return text if self.is_sqlite else text.replace("?", "%s")

    @staticmethod
    def cursor(conn: Connection) -> Any:
        """A DBAPI cursor on ``conn``'s connection, inside its current transaction."""
        return conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
