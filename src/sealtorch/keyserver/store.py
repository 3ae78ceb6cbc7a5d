"""The key server's database (SQLAlchemy 2 Core): schema, versioned migrations and operations.

SQLite (WAL, synchronous=FULL, BEGIN IMMEDIATE) by default, PostgreSQL for replicas. Migrations
are a short ordered list applied inside one transaction and recorded in ``schema_migrations``
(no alembic: one more dependency and code generation for a handful of tables; upgrades still
keep data because each step is an additive statement). Key material is stored only wrapped by
the KEK, policies only with a KEK MAC; the audit chain is appended in the caller's transaction.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import (
    Boolean,
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from sealtorch._secret import Secret
from sealtorch.errors import AuthError, ConfigError, StoreError, TamperError
from sealtorch.keyserver import audit as audit_chain
from sealtorch.keyserver.kek import KekProvider, verify_mac, wrap_aad
from sealtorch.protocol.canonical import canonical_json

md = MetaData()
schema_migrations = Table("schema_migrations", md, Column("version", Integer, primary_key=True),
                          Column("applied_at", Integer, nullable=False))
server_state = Table("server_state", md, Column("id", Integer, primary_key=True),
                     Column("revocation_epoch", Integer, nullable=False),
                     Column("nonce_key", LargeBinary, nullable=False),
                     Column("audit_seq", Integer, nullable=False),
                     Column("audit_head", String(64), nullable=False))
tenants = Table("tenants", md, Column("name", String(64), primary_key=True),
                Column("created", Integer, nullable=False))
tokens = Table("tokens", md, Column("token_id", String(16), primary_key=True),
               Column("tenant", String(64), nullable=False),
               Column("token_hash", String(64), nullable=False, unique=True),
               Column("expires", Integer, nullable=False),
               Column("revoked", Boolean, nullable=False, default=False),
               Column("created", Integer, nullable=False))
models = Table("models", md, Column("model_id", String(128), primary_key=True),
               Column("tenant", String(64), nullable=False, index=True),
               Column("state", String(16), nullable=False),
               Column("created", Integer, nullable=False))
key_versions = Table("key_versions", md,
                     Column("model_id", String(128), primary_key=True),
                     Column("key_version", Integer, primary_key=True),
                     Column("wrapped", LargeBinary, nullable=False),
                     Column("state", String(16), nullable=False),
                     Column("exportable", Boolean, nullable=False),
                     Column("created", Integer, nullable=False))
policies = Table("policies", md, Column("model_id", String(128), primary_key=True),
                 Column("version", Integer, nullable=False),
                 Column("policy", Text, nullable=False),
                 Column("mac", LargeBinary, nullable=False),
                 Column("updated", Integer, nullable=False))
caches = Table("caches", md, Column("cache_id", String(32), primary_key=True),
               Column("tee", String(16), nullable=False),
               Column("platform_id", String(128), nullable=False),
               Column("public_key", String(64), nullable=False),
               Column("measurement", String(256), nullable=False),
               Column("first_seen", Integer, nullable=False),
               Column("last_seen", Integer, nullable=False))
cache_approvals = Table("cache_approvals", md,
                        Column("tenant", String(64), primary_key=True),
                        Column("cache_id", String(32), primary_key=True),
                        Column("state", String(16), nullable=False),
                        Column("updated", Integer, nullable=False))
sim_platforms = Table("sim_platforms", md, Column("key", String(128), primary_key=True),
                      Column("tenant", String(64), nullable=False),
                      Column("created", Integer, nullable=False))
consumed_nonces = Table("consumed_nonces", md,
                        Column("nonce_hash", LargeBinary, primary_key=True),
                        Column("expires", Integer, nullable=False, index=True))
audit_log = Table("audit_log", md, Column("seq", Integer, primary_key=True, autoincrement=False),
                  Column("ts", Integer, nullable=False),
                  Column("tenant", String(64), nullable=True),
                  Column("actor", String(128), nullable=False),
                  Column("action", String(32), nullable=False),
                  Column("model_id", String(128), nullable=True),
                  Column("cache_id", String(32), nullable=True),
                  Column("decision", String(16), nullable=False),
                  Column("code", String(32), nullable=False),
                  Column("details", Text, nullable=False),
                  Column("prev_hash", String(64), nullable=False),
                  Column("hash", String(64), nullable=False))
anon_counters = Table("anon_counters", md, Column("window", Integer, primary_key=True),
                      Column("code", String(32), primary_key=True),
                      Column("count", Integer, nullable=False))

_V1_TABLES = [server_state, tenants, tokens, models, key_versions, policies, caches,
              cache_approvals, sim_platforms, consumed_nonces, audit_log, anon_counters]


def _migration_1(conn: Connection) -> None:
    md.create_all(conn, tables=_V1_TABLES)


#: ordered, append-only: never edit a released step, add a new one
MIGRATIONS: list[tuple[int, Any]] = [(1, _migration_1)]
SCHEMA_VERSION = MIGRATIONS[-1][0]

TOKEN_PREFIX = "stk_"  # noqa: S105 - a public prefix, not a secret

T = TypeVar("T")

#: key in ``Connection.info`` under which a group-commit batch keeps its per-batch state
_BATCH = "sealtorch_batch"


_STATE_SQLITE = "SELECT audit_seq, audit_head, revocation_epoch FROM server_state WHERE id = 1"
_STATE_PG = _STATE_SQLITE + " FOR UPDATE"


class _BatchState:
    """What one group-commit transaction caches: the audit head it is extending (written back
    once, just before COMMIT) and the revocation epoch (read once, under the row lock)."""

    __slots__ = ("audit", "epoch")

    def __init__(self) -> None:
        self.audit: tuple[int, str] | None = None
        self.epoch: int | None = None


def _now() -> int:
    return int(time.time())


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


@contextmanager
def db_errors() -> Iterator[None]:
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
        raise DatabaseUnavailableError(
            f"database unavailable ({type(orig).__name__}); retry later") from e


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


class Store:
    """All persistent state of one key server (shared by replicas through the database)."""

    def __init__(self, url: str, kek: KekProvider) -> None:
        self.url = url
        self.kek = kek
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
        self._lock_fd: int | None = None
        db_path = self.engine.url.database if self.is_sqlite else None
        if db_path and db_path != ":memory:":
            # and across worker processes: a kernel file lock wakes the next writer at once
            self._lock_fd = os.open(db_path + ".writelock", os.O_RDWR | os.O_CREAT, 0o600)
        self._key_cache: dict[tuple[bytes, bytes], Secret] = {}
        self._policy_ok: dict[bytes, bool] = {}
        self._lock = threading.Lock()
        self._committer: GroupCommitter | None = None

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

    def close(self) -> None:
        if self._committer is not None:
            self._committer.close()
            self._committer = None
        self.engine.dispose()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        for s in self._key_cache.values():
            s.wipe()
        self._key_cache.clear()

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

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        """One transaction; a connection-level failure inside it (also of a plain DBAPI
        statement) raises :class:`DatabaseUnavailableError`. Retried by callers only where
        documented."""
        with db_errors():
            if self._write_lock is not None:
                with self._write_lock, self._file_lock(), self.engine.begin() as conn:
                    yield conn
            else:
                with self.engine.begin() as conn:
                    yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A pooled connection for reads outside a write transaction; connection-level
        failures raise :class:`DatabaseUnavailableError`."""
        with db_errors(), self.engine.connect() as conn:
            yield conn

    @contextmanager
    def tx_on(self, conn: Connection) -> Iterator[Connection]:
        """One transaction on a connection the caller keeps open (the group-commit writer's:
        no pool checkout, checkin or pre-ping round trip per batch), under the same lock."""
        with db_errors():
            if self._write_lock is not None:
                with self._write_lock, self._file_lock(), conn.begin():
                    yield conn
            else:
                with conn.begin():
                    yield conn

    # --- schema ---------------------------------------------------------------------------
    def migrate(self) -> int:
        """Apply pending migrations; returns the schema version."""
        with db_errors(), self.engine.begin() as conn:
            md.create_all(conn, tables=[schema_migrations])
            if not self.is_sqlite:
                conn.exec_driver_sql("LOCK TABLE schema_migrations IN EXCLUSIVE MODE")
            done = {r[0] for r in conn.execute(select(schema_migrations.c.version))}
            for version, step in MIGRATIONS:
                if version not in done:
                    step(conn)
                    conn.execute(insert(schema_migrations).values(version=version,
                                                                  applied_at=_now()))
            if conn.execute(select(server_state.c.id)).first() is None:
                with Secret(os.urandom(32)) as nk:
                    wrapped = self.kek.wrap(nk, b"sealtorch-nonce-key/v1")
                conn.execute(insert(server_state).values(
                    id=1, revocation_epoch=0, nonce_key=wrapped, audit_seq=0,
                    audit_head=audit_chain.GENESIS))
        return SCHEMA_VERSION

    def schema_version(self) -> int:
        with self.read() as conn:
            v = conn.execute(select(func.max(schema_migrations.c.version))).scalar()
        return int(v or 0)

    def nonce_key(self) -> Secret:
        """The server's nonce key, unwrapped at start-up: the first use of the KEK, so a KEK
        that opens nothing (corrupted, replaced, another server's) is reported here as such."""
        with self.read() as conn:
            blob = conn.execute(select(server_state.c.nonce_key)).scalar_one()
        try:
            return self.kek.unwrap(blob, b"sealtorch-nonce-key/v1")
        except TamperError:
            raise TamperError(
                f"the {self.kek.name} KEK does not open this server's own nonce key: the KEK is "
                "corrupted or is not the one this database was created with (or the database "
                "was replaced); restore the KEK that belongs to this database"
            ) from None

    # --- tenants and tokens -----------------------------------------------------------------
    def add_tenant(self, conn: Connection, name: str) -> None:
        try:
            with conn.begin_nested():
                conn.execute(insert(tenants).values(name=name, created=_now()))
        except IntegrityError as e:
            raise StoreError(f"tenant {name!r} already exists") from e

    def create_token(self, conn: Connection, tenant: str, ttl_seconds: int) -> tuple[str, str]:
        """A new 256-bit token for ``tenant``; returns (token_id, token). Only the hash is kept."""
        if conn.execute(select(tenants.c.name).where(tenants.c.name == tenant)).first() is None:
            raise StoreError(f"tenant {tenant!r} does not exist")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        tid = secrets.token_hex(8)
        conn.execute(insert(tokens).values(
            token_id=tid, tenant=tenant, token_hash=token_hash(token),
            expires=_now() + ttl_seconds, revoked=False, created=_now()))
        return tid, token

    def revoke_token(self, conn: Connection, tenant: str, token_id: str) -> bool:
        r = conn.execute(update(tokens).where(tokens.c.tenant == tenant,
                                              tokens.c.token_id == token_id).values(revoked=True))
        return bool(r.rowcount)

    def authenticate(self, token: str) -> tuple[str, str]:
        """Return (tenant, token_id) of a valid token, else raise :class:`AuthError`."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 100:
            raise AuthError("admin token is malformed; read it from the token file")
        with self.read() as conn:
            row = conn.execute(select(tokens).where(tokens.c.token_hash == token_hash(token))
                               ).first()
        if row is None:
            raise AuthError("admin token is unknown")
        if row.revoked:
            raise AuthError("admin token was revoked; ask for a new one")
        if row.expires <= _now():
            raise AuthError("admin token has expired; create a new one")
        return row.tenant, row.token_id

    # --- models and keys --------------------------------------------------------------------
    def _model(self, conn: Connection, tenant: str | None, model_id: str) -> Any:
        row = conn.execute(select(models).where(models.c.model_id == model_id)).first()
        if row is None or (tenant is not None and row.tenant != tenant):
            raise StoreError("model not found for this tenant")
        return row

    def add_model(self, conn: Connection, tenant: str, model_id: str, key: Secret,
                  key_version: int = 1, *, exportable: bool = False) -> None:
        if len(key) != 32:
            raise StoreError("model keys are 32 bytes")
        existing = conn.execute(select(models).where(models.c.model_id == model_id)).first()
        if existing is not None and existing.tenant != tenant:
            raise StoreError("this model id is taken by another tenant; choose another id")
        if existing is None:
            conn.execute(insert(models).values(model_id=model_id, tenant=tenant, state="active",
                                               created=_now()))
        try:
            with conn.begin_nested():
                conn.execute(insert(key_versions).values(
                    model_id=model_id, key_version=key_version,
                    wrapped=self.kek.wrap(key, wrap_aad(tenant, model_id, key_version)),
                    state="active", exportable=exportable, created=_now()))
        except IntegrityError as e:
            raise StoreError("the model already has this key version; rotate instead") from e

    def next_key_version(self, conn: Connection, model_id: str) -> int:
        v = conn.execute(select(func.max(key_versions.c.key_version)).where(
            key_versions.c.model_id == model_id)).scalar()
        return int(v or 0) + 1

    def export_key(self, conn: Connection, tenant: str, model_id: str, key_version: int
                   ) -> Secret:
        """Return a server-generated key once (then it is no longer exportable)."""
        self._model(conn, tenant, model_id)
        row = conn.execute(select(key_versions).where(
            key_versions.c.model_id == model_id, key_versions.c.key_version == key_version)
        ).first()
        if row is None or not row.exportable:
            raise StoreError("this key version does not exist or was already exported once")
        conn.execute(update(key_versions).where(
            key_versions.c.model_id == model_id, key_versions.c.key_version == key_version
        ).values(exportable=False))
        return self.kek.unwrap(row.wrapped, wrap_aad(tenant, model_id, key_version))

    def set_version_state(self, conn: Connection, tenant: str, model_id: str, key_version: int,
                          state: str) -> None:
        self._model(conn, tenant, model_id)
        r = conn.execute(update(key_versions).where(
            key_versions.c.model_id == model_id, key_versions.c.key_version == key_version
        ).values(state=state))
        if not r.rowcount:
            raise StoreError("the model has no such key version (not found)")
        self.bump_epoch(conn)

    def set_model_state(self, conn: Connection, tenant: str, model_id: str, state: str) -> None:
        self._model(conn, tenant, model_id)
        conn.execute(update(models).where(models.c.model_id == model_id).values(state=state))
        self.bump_epoch(conn)

    def list_models(self, conn: Connection, tenant: str) -> list[dict[str, Any]]:
        out = []
        for m in conn.execute(select(models).where(models.c.tenant == tenant)
                              .order_by(models.c.model_id)):
            vers = conn.execute(select(key_versions.c.key_version, key_versions.c.state).where(
                key_versions.c.model_id == m.model_id).order_by(key_versions.c.key_version))
            pol = conn.execute(select(policies.c.version).where(
                policies.c.model_id == m.model_id)).scalar()
            out.append({"model_id": m.model_id, "state": m.state,
                        "key_versions": [{"key_version": v.key_version, "state": v.state}
                                         for v in vers],
                        "policy_version": pol})
        return out

    def model_info(self, conn: Connection, model_id: str) -> Any:
        return conn.execute(select(models).where(models.c.model_id == model_id)).first()

    def active_keys(self, conn: Connection, tenant: str, model_id: str
                    ) -> list[tuple[int, Secret]]:
        """Unwrapped active key versions (cached in memory by exact wrapped blob + AAD)."""
        rows = conn.execute(select(key_versions.c.key_version, key_versions.c.wrapped).where(
            key_versions.c.model_id == model_id, key_versions.c.state == "active"
        ).order_by(key_versions.c.key_version)).all()
        return self._unwrap_rows(tenant, model_id, rows)

    def all_model_ids(self, conn: Connection) -> list[str]:
        return [r[0] for r in conn.execute(select(models.c.model_id).order_by(models.c.model_id))]

    # --- policies ---------------------------------------------------------------------------
    def _policy_mac_input(self, tenant: str, model_id: str, version: int, text: str) -> bytes:
        return b"sealtorch-policy/v1\x00" + canonical_json([tenant, model_id, version, text])

    def set_policy(self, conn: Connection, tenant: str, model_id: str, policy: dict[str, Any],
                   version: int) -> None:
        self._model(conn, tenant, model_id)
        text = canonical_json(policy).decode("ascii")
        cur = conn.execute(select(policies.c.version).where(policies.c.model_id == model_id)
                           ).scalar()
        if cur is not None and version <= cur:
            raise StoreError(f"policy version must increase (current {cur}); bump 'version'")
        mac = self.kek.mac(self._policy_mac_input(tenant, model_id, version, text))
        values = {"version": version, "policy": text, "mac": mac, "updated": _now()}
        if cur is None:
            conn.execute(insert(policies).values(model_id=model_id, **values))
        else:
            conn.execute(update(policies).where(policies.c.model_id == model_id).values(**values))

    def get_policy(self, conn: Connection, tenant: str, model_id: str
                   ) -> tuple[dict[str, Any], int] | None:
        """The model's policy and version, after checking its KEK MAC (TamperError if edited)."""
        row = conn.execute(select(policies).where(policies.c.model_id == model_id)).first()
        if row is None:
            return None
        data = self._policy_mac_input(tenant, model_id, row.version, row.policy)
        ck = hashlib.sha256(data + bytes(row.mac)).digest()
        if not self._policy_ok.get(ck):
            if not verify_mac(self.kek, data, bytes(row.mac)):
                raise TamperError(
                    f"policy row of model {model_id!r} fails its KEK MAC (edited in the database);"
                    " set the policy again through the admin API"
                )
            self._policy_ok[ck] = True
        return json.loads(row.policy), int(row.version)

    # --- caches -----------------------------------------------------------------------------
    def enrol_cache(self, conn: Connection, cache_id: str, tee: str, platform_id: str,
                    public_key: str, measurement: str) -> None:
        now = _now()
        r = conn.execute(update(caches).where(caches.c.cache_id == cache_id).values(
            public_key=public_key, measurement=measurement[:256], last_seen=now))
        if not r.rowcount:
            try:
                with conn.begin_nested():
                    conn.execute(insert(caches).values(
                        cache_id=cache_id, tee=tee, platform_id=platform_id[:128],
                        public_key=public_key, measurement=measurement[:256], first_seen=now,
                        last_seen=now))
            except IntegrityError:
                pass  # enrolled concurrently by another replica

    def approval(self, conn: Connection, tenant: str, cache_id: str) -> str | None:
        return conn.execute(select(cache_approvals.c.state).where(
            cache_approvals.c.tenant == tenant, cache_approvals.c.cache_id == cache_id)).scalar()

    def set_approval(self, conn: Connection, tenant: str, cache_id: str, state: str) -> None:
        if conn.execute(select(caches.c.cache_id).where(caches.c.cache_id == cache_id)
                        ).first() is None:
            raise StoreError("cache not found: it has not enrolled yet")
        r = conn.execute(update(cache_approvals).where(
            cache_approvals.c.tenant == tenant, cache_approvals.c.cache_id == cache_id
        ).values(state=state, updated=_now()))
        if not r.rowcount:
            conn.execute(insert(cache_approvals).values(tenant=tenant, cache_id=cache_id,
                                                        state=state, updated=_now()))
        if state == "revoked":
            self.bump_epoch(conn)

    def list_caches(self, conn: Connection, tenant: str) -> list[dict[str, Any]]:
        out = []
        for c in conn.execute(select(caches).order_by(caches.c.first_seen)):
            out.append({"cache_id": c.cache_id, "tee": c.tee, "platform_id": c.platform_id,
                        "measurement": c.measurement, "first_seen": c.first_seen,
                        "last_seen": c.last_seen,
                        "state": self.approval(conn, tenant, c.cache_id) or "pending"})
        return out

    # --- sim platforms ----------------------------------------------------------------------
    def add_sim_platform(self, conn: Connection, tenant: str, key_text: str) -> None:
        try:
            with conn.begin_nested():
                conn.execute(insert(sim_platforms).values(key=key_text, tenant=tenant,
                                                          created=_now()))
        except IntegrityError:
            pass

    def sim_platforms(self) -> list[str]:
        with self.read() as conn:
            return [r[0] for r in conn.execute(select(sim_platforms.c.key))]

    # --- nonces, epoch ----------------------------------------------------------------------
    def burn_nonce(self, nonce: bytes, expires: int) -> bool:
        """Record ``nonce`` as used in its own committed transaction; False if it was used
        before (by any replica sharing the database)."""
        try:
            with self.tx() as conn:
                conn.execute(insert(consumed_nonces).values(
                    nonce_hash=hashlib.sha256(nonce).digest(), expires=expires))
            return True
        except IntegrityError:
            return False

    def purge_nonces(self) -> None:
        with self.tx() as conn:
            conn.execute(consumed_nonces.delete().where(consumed_nonces.c.expires < _now() - 60))

    def bump_epoch(self, conn: Connection) -> None:
        conn.execute(update(server_state).where(server_state.c.id == 1).values(
            revocation_epoch=server_state.c.revocation_epoch + 1))

    def epoch(self, conn: Connection) -> int:
        return int(conn.execute(select(server_state.c.revocation_epoch)).scalar_one())

    # --- audit ------------------------------------------------------------------------------
    def append_audit(self, conn: Connection, *, actor: str, action: str, decision: str,
                     code: str, tenant: str | None = None, model_id: str | None = None,
                     cache_id: str | None = None, details: Any = None) -> tuple[int, str]:
        """Append one chained entry in ``conn``'s transaction; returns the new (seq, hash).

        Inside a group-commit batch the head is kept in memory and written back once before the
        batch commits (same transaction, so the chain and its head stay atomic)."""
        batch: _BatchState | None = conn.info.get(_BATCH)
        if batch is not None and batch.audit is not None:
            seq, prev = batch.audit
        else:
            seq, prev = self._lock_state(conn, batch)
        new_seq = seq + 1
        entry: dict[str, Any] = {
            "seq": new_seq, "ts": _now(), "tenant": tenant, "actor": actor[:128],
            "action": action, "model_id": model_id, "cache_id": cache_id,
            "decision": decision, "code": code,
            "details": canonical_json(details if details is not None else {}).decode(),
            "prev_hash": prev}
        new_hash = audit_chain.entry_hash(entry)
        entry["hash"] = new_hash
        cur = self._cursor(conn)
        cur.execute(self._sql(
            "INSERT INTO audit_log (seq, ts, tenant, actor, action, model_id, cache_id, decision,"
            " code, details, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
            (entry["seq"], entry["ts"], tenant, entry["actor"], action, model_id, cache_id,
             decision, code, entry["details"], prev, entry["hash"]))
        if batch is not None:
            batch.audit = (new_seq, new_hash)
        else:
            self._write_audit_head(conn, new_seq, new_hash)
        return new_seq, new_hash

    # --- raw DBAPI helpers for the release hot path ------------------------------------------
    def _sql(self, text: str) -> str:
        """``?`` placeholders for sqlite3, ``%s`` for psycopg (our SQL has no literal ``?``)."""
        return text if self.is_sqlite else text.replace("?", "%s")

    @staticmethod
    def _cursor(conn: Connection) -> Any:
        """A DBAPI cursor on ``conn``'s connection, inside its current transaction."""
        return conn.connection.driver_connection.cursor()  # type: ignore[union-attr]

    def _lock_state(self, conn: Connection, batch: _BatchState | None) -> tuple[int, str]:
        """Read (and on PostgreSQL row-lock) the server state; fills the batch caches."""
        cur = self._cursor(conn)
        cur.execute(_STATE_SQLITE if self.is_sqlite else _STATE_PG)
        seq, head, epoch = cur.fetchone()
        if batch is not None:
            batch.audit = (int(seq), str(head))
            batch.epoch = int(epoch)
        return int(seq), str(head)

    def _write_audit_head(self, conn: Connection, seq: int, head: str) -> None:
        self._cursor(conn).execute(self._sql(
            "UPDATE server_state SET audit_seq = ?, audit_head = ? WHERE id = 1"), (seq, head))

    def epoch_locked(self, conn: Connection) -> int:
        """The revocation epoch, read under the server-state row lock (once per batch)."""
        batch: _BatchState | None = conn.info.get(_BATCH)
        if batch is not None and batch.epoch is not None:
            return batch.epoch
        if batch is not None:
            self._lock_state(conn, batch)
            assert batch.epoch is not None
            return batch.epoch
        return self.epoch(conn)

    def burn_nonce_in(self, conn: Connection, nonce: bytes, expires: int) -> bool:
        """Record ``nonce`` as used in ``conn``'s transaction; False if it was used before."""
        cur = self._cursor(conn)
        cur.execute(self._sql("INSERT INTO consumed_nonces (nonce_hash, expires) VALUES (?, ?)"
                              " ON CONFLICT DO NOTHING"),
                    (hashlib.sha256(nonce).digest(), expires))
        return cur.rowcount == 1

    def enrol_cache_raw(self, conn: Connection, cache_id: str, tee: str, platform_id: str,
                        public_key: str, measurement: str) -> None:
        """:meth:`enrol_cache` in at most two plain statements (release hot path)."""
        now = _now()
        cur = self._cursor(conn)
        cur.execute(self._sql("UPDATE caches SET public_key = ?, measurement = ?, last_seen = ?"
                              " WHERE cache_id = ?"),
                    (public_key, measurement[:256], now, cache_id))
        if cur.rowcount == 0:
            cur.execute(self._sql(
                "INSERT INTO caches (cache_id, tee, platform_id, public_key, measurement,"
                " first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"),
                (cache_id, tee, platform_id[:128], public_key, measurement[:256], now, now))

    def release_row(self, conn: Connection, model_id: str, cache_id: str) -> tuple[Any, ...] | None:
        """One query for everything a release decision reads about a model:
        (tenant, model state, this cache's approval by the tenant, policy version, policy text,
        policy MAC), or None for an unknown model."""
        cur = self._cursor(conn)
        cur.execute(self._sql(
            "SELECT m.tenant, m.state, a.state, p.version, p.policy, p.mac FROM models m"
            " LEFT JOIN cache_approvals a ON a.tenant = m.tenant AND a.cache_id = ?"
            " LEFT JOIN policies p ON p.model_id = m.model_id WHERE m.model_id = ?"),
            (cache_id, model_id))
        row = cur.fetchone()
        return tuple(row) if row is not None else None

    def checked_policy(self, tenant: str, model_id: str, version: int, text: str, mac: bytes
                       ) -> dict[str, Any]:
        """The stored policy document after its KEK MAC check (TamperError if edited).

        Verified (text, MAC) pairs are remembered by a digest of the exact bytes, so only a
        changed row is checked again."""
        data = self._policy_mac_input(tenant, model_id, int(version), text)
        ck = hashlib.sha256(data + bytes(mac)).digest()
        if not self._policy_ok.get(ck):
            if not verify_mac(self.kek, data, bytes(mac)):
                raise TamperError(
                    f"policy row of model {model_id!r} fails its KEK MAC (edited in the database);"
                    " set the policy again through the admin API"
                )
            self._policy_ok[ck] = True
        doc: dict[str, Any] = json.loads(text)
        return doc

    def active_keys_raw(self, conn: Connection, tenant: str, model_id: str
                        ) -> list[tuple[int, Secret]]:
        """:meth:`active_keys` with one plain statement (release hot path)."""
        cur = self._cursor(conn)
        cur.execute(self._sql("SELECT key_version, wrapped FROM key_versions WHERE model_id = ?"
                              " AND state = 'active' ORDER BY key_version"), (model_id,))
        return self._unwrap_rows(tenant, model_id, cur.fetchall())

    def _unwrap_rows(self, tenant: str, model_id: str, rows: Any) -> list[tuple[int, Secret]]:
        out = []
        for kv, blob in rows:
            aad = wrap_aad(tenant, model_id, int(kv))
            ck = (bytes(blob), aad)
            with self._lock:
                s = self._key_cache.get(ck)
            if s is None:
                s = self.kek.unwrap(bytes(blob), aad)
                with self._lock:
                    self._key_cache[ck] = s
            out.append((int(kv), s))
        return out

    def cache_states(self, conn: Connection, cache_id: str) -> set[str]:
        """Every tenant's approval state of ``cache_id``."""
        cur = self._cursor(conn)
        cur.execute(self._sql("SELECT state FROM cache_approvals WHERE cache_id = ?"),
                    (cache_id,))
        return {str(r[0]) for r in cur.fetchall()}

    def committer(self) -> GroupCommitter:
        """This store's group-commit writer (started on first use)."""
        with self._lock:
            if self._committer is None:
                self._committer = GroupCommitter(self)
            return self._committer

    def audit_head(self) -> tuple[int, str]:
        with self.read() as conn:
            r = conn.execute(select(server_state.c.audit_seq, server_state.c.audit_head)).one()
        return int(r[0]), str(r[1])

    def audit_rows(self, *, tenant: str | None = None, after: int = 0, limit: int | None = None
                   ) -> list[dict[str, Any]]:
        q = select(audit_log).where(audit_log.c.seq > after).order_by(audit_log.c.seq)
        if tenant is not None:
            q = q.where(audit_log.c.tenant == tenant)
        if limit is not None:
            q = q.limit(limit)
        with self.read() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def count_anonymous(self, code: str) -> None:
        """Count a malformed anonymous request in an hourly aggregate row (not one row each)."""
        window = _now() // 3600 * 3600
        with self.tx() as conn:
            r = conn.execute(update(anon_counters).where(
                anon_counters.c.window == window, anon_counters.c.code == code
            ).values(count=anon_counters.c.count + 1))
            if not r.rowcount:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(anon_counters).values(window=window, code=code,
                                                                  count=1))
                except IntegrityError:
                    pass


class GroupCommitter:
    """Group commit: one writer thread runs the queued write operations of concurrent requests
    in a single transaction per batch and resolves each request's future only after that
    transaction has committed.

    Durability is unchanged (every nonce burn and audit entry is committed, SQLite
    ``synchronous=FULL``, before its answer is released); what is shared is the transaction
    overhead and the fsync. An operation is a callable taking the batch's connection; it must
    not keep side effects outside the database, because if one operation raises, the batch is
    rolled back and every operation is re-run alone in its own transaction (so one failure
    never fails or commits on behalf of its neighbours). Event-loop waiters of one batch are
    woken together, with one cross-thread call per loop instead of one per request."""

    MAX_BATCH = 256

    def __init__(self, store: Store) -> None:
        self._store = store
        self._q: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="dkeyserver-writer",
                                        daemon=True)
        self._closed = False
        self._conn: Connection | None = None
        self._last_used = 0.0
        self._thread.start()

    def _put(self, op: Callable[[Connection], Any], waiter: Any = None) -> Future[Any]:
        fut: Future[Any] = Future()
        if self._closed:
            fut.set_exception(StoreError("the key server is shutting down; retry later"))
        else:
            self._q.put((op, fut, waiter))
        return fut

    def submit(self, op: Callable[[Connection], T]) -> Future[T]:
        """Queue ``op``; the future resolves after the batch holding it committed."""
        return self._put(op)

    def run(self, op: Callable[[Connection], T]) -> T:
        """Run ``op`` in the next batch and wait for its committed result."""
        return self.submit(op).result()

    async def run_async(self, op: Callable[[Connection], T]) -> T:
        """Run ``op`` in the next batch; resumes the calling task after the commit."""
        import asyncio

        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        fut = self._put(op, (loop, waiter))
        if fut.done():  # refused at once (shutting down)
            return fut.result()
        await waiter
        return fut.result()

    def close(self) -> None:
        """Finish the queued operations, then stop the writer thread."""
        if not self._closed:
            self._closed = True
            self._q.put(None)
            self._thread.join(30)

    def _loop(self) -> None:
        try:
            self._serve()
        finally:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _serve(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            batch = [item]
            stop = False
            while len(batch) < self.MAX_BATCH:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._run_batch(batch)
            self._wake(batch)
            if stop:
                return

    @staticmethod
    def _wake(batch: list[_Item]) -> None:
        """Wake every event-loop waiter of ``batch``: one thread-safe call per loop."""
        by_loop: dict[Any, list[Any]] = {}
        for _, _, waiter in batch:
            if waiter is not None:
                by_loop.setdefault(waiter[0], []).append(waiter[1])
        for loop, waiters in by_loop.items():
            try:
                loop.call_soon_threadsafe(_release_waiters, waiters)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass

    #: a PostgreSQL connection idle for longer than this is pinged before it is used again
    IDLE_PING_SECONDS = 1.0

    def _connection(self) -> Connection:
        """The writer's own connection, (re)opened when missing or after a database error;
        on PostgreSQL pinged after an idle spell (a restarted server is noticed before a
        batch is run on a dead connection, as the pool's pre-ping would)."""
        now = time.monotonic()
        if (self._conn is not None and not self._store.is_sqlite
                and now - self._last_used > self.IDLE_PING_SECONDS):
            try:
                self._conn.exec_driver_sql("SELECT 1")
                self._conn.rollback()
            except Exception:
                self._drop_connection()
        self._last_used = now
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            with db_errors():
                self._conn = self._store.engine.connect()
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.invalidate()
                self._conn.close()
            except Exception:  # noqa: S110 - already broken; a new one is opened next batch
                pass
            self._conn = None

    def _transaction(self, ops: list[_Item]) -> list[Any]:
        store = self._store
        with store.tx_on(self._connection()) as conn:
            state = _BatchState()
            conn.info[_BATCH] = state
            try:
                results = [op(conn) for op, _, _ in ops]
                if state.audit is not None:
                    store._write_audit_head(conn, *state.audit)
            finally:
                conn.info.pop(_BATCH, None)
        return results

    def _run_batch(self, batch: list[_Item]) -> None:
        from sealtorch.keyserver import ops as _ops

        live = [it for it in batch if it[1].set_running_or_notify_cancel()]
        if not live:
            return
        started = time.perf_counter()
        try:
            results = self._transaction(live)
            _ops.COMMIT_BATCH.observe(len(live))
            _ops.COMMIT_SECONDS.observe(time.perf_counter() - started)
        except DatabaseUnavailableError as e:  # the database failed: nobody's writes committed
            self._drop_connection()
            for it in live:
                it[1].set_exception(e)
            return
        except Exception as e:
            if len(live) == 1:
                live[0][1].set_exception(e)
                return
            for it in live:  # isolate the failing operation
                try:
                    it[1].set_result(self._transaction([it])[0])
                except Exception as e1:
                    if isinstance(e1, DatabaseUnavailableError):
                        self._drop_connection()
                    it[1].set_exception(e1)
            return
        for it, r in zip(live, results, strict=True):
            it[1].set_result(r)


#: a queued write: the operation, its result future, and (loop, asyncio future) to wake
_Item = tuple[Callable[[Connection], Any], Future[Any], Any]


def _release_waiters(waiters: list[Any]) -> None:
    for w in waiters:
        if not w.done():
            w.set_result(None)
