"""Schema versions and the steps between them (no alembic: one more dependency and code
generation for a handful of tables). Steps are an ordered, append-only list, applied in one
transaction and recorded in ``schema_migrations``; a released step is never edited.

- 1: the first schema.
- 2: state integrity. Row MACs and ``row_seq`` on every authoritative table, the sealed state
  digest and sequence in ``server_state``, the integrity key, a keyed audit chain from here on,
  one-time export copies (``key_exports``, replacing ``key_versions.exportable``), and
  ``cache_seen``. Upgrading MACs the rows *as they are*: run it on a database you trust.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from sqlalchemy import (
    Boolean,
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    insert,
    select,
)
from sqlalchemy.engine import Connection

from sealtorch.keyserver import rows, schema
from sealtorch.keyserver.audit import Head
from sealtorch.keyserver.db import Database
from sealtorch.keyserver.keyring import INTEGRITY_KEY_AAD, KeyRef, Keyring

Step = Callable[[Connection, Database, Keyring], None]


def _v1_tables(m: MetaData) -> list[Table]:
    """Schema 1, frozen as released (never import the current tables here)."""
    return [
        Table("server_state", m, Column("id", Integer, primary_key=True),
              Column("revocation_epoch", Integer, nullable=False),
              Column("nonce_key", LargeBinary, nullable=False),
              Column("audit_seq", Integer, nullable=False),
              Column("audit_head", String(64), nullable=False)),
        Table("tenants", m, Column("name", String(64), primary_key=True),
              Column("created", Integer, nullable=False)),
        Table("tokens", m, Column("token_id", String(16), primary_key=True),
              Column("tenant", String(64), nullable=False),
              Column("token_hash", String(64), nullable=False, unique=True),
              Column("expires", Integer, nullable=False),
              Column("revoked", Boolean, nullable=False, default=False),
              Column("created", Integer, nullable=False)),
        Table("models", m, Column("model_id", String(128), primary_key=True),
              Column("tenant", String(64), nullable=False, index=True),
              Column("state", String(16), nullable=False),
              Column("created", Integer, nullable=False)),
        Table("key_versions", m, Column("model_id", String(128), primary_key=True),
              Column("key_version", Integer, primary_key=True),
              Column("wrapped", LargeBinary, nullable=False),
              Column("state", String(16), nullable=False),
              Column("exportable", Boolean, nullable=False),
              Column("created", Integer, nullable=False)),
        Table("policies", m, Column("model_id", String(128), primary_key=True),
              Column("version", Integer, nullable=False),
              Column("policy", Text, nullable=False),
              Column("mac", LargeBinary, nullable=False),
              Column("updated", Integer, nullable=False)),
        Table("caches", m, Column("cache_id", String(32), primary_key=True),
              Column("tee", String(16), nullable=False),
              Column("platform_id", String(128), nullable=False),
              Column("public_key", String(64), nullable=False),
              Column("measurement", String(256), nullable=False),
              Column("first_seen", Integer, nullable=False),
              Column("last_seen", Integer, nullable=False)),
        Table("cache_approvals", m, Column("tenant", String(64), primary_key=True),
              Column("cache_id", String(32), primary_key=True),
              Column("state", String(16), nullable=False),
              Column("updated", Integer, nullable=False)),
        Table("sim_platforms", m, Column("key", String(128), primary_key=True),
              Column("tenant", String(64), nullable=False),
              Column("created", Integer, nullable=False)),
        Table("consumed_nonces", m, Column("nonce_hash", LargeBinary, primary_key=True),
              Column("expires", Integer, nullable=False, index=True)),
        Table("audit_log", m, Column("seq", Integer, primary_key=True, autoincrement=False),
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
              Column("hash", String(64), nullable=False)),
        Table("anon_counters", m, Column("window", Integer, primary_key=True),
              Column("code", String(32), primary_key=True),
              Column("count", Integer, nullable=False)),
    ]


def _step_1(conn: Connection, db: Database, keyring: Keyring) -> None:
    m = MetaData()
    m.create_all(conn, tables=_v1_tables(m))


_TIME_COLUMNS_V1 = {
    "tenants": ("created",), "tokens": ("expires", "created"), "models": ("created",),
    "key_versions": ("created",), "policies": ("updated",), "caches": ("first_seen", "last_seen"),
    "cache_approvals": ("updated",), "sim_platforms": ("created",),
    "consumed_nonces": ("expires",), "audit_log": ("ts",), "anon_counters": ("window",),
    "schema_migrations": ("applied_at",),
}


def _step_2(conn: Connection, db: Database, keyring: Keyring) -> None:
    blob = "BLOB NOT NULL DEFAULT X''" if db.is_sqlite else "BYTEA NOT NULL DEFAULT ''::bytea"
    add = [("server_state", "integrity_key", blob),
           ("server_state", "db_id", "VARCHAR(32) NOT NULL DEFAULT ''"),
           ("server_state", "state_seq", "INTEGER NOT NULL DEFAULT 0"),
           ("server_state", "state_digest", "VARCHAR(64) NOT NULL DEFAULT ''"),
           ("server_state", "audit_keyed_from", "INTEGER NOT NULL DEFAULT 1"),
           ("server_state", "mac", blob),
           ("policies", "row_seq", "INTEGER NOT NULL DEFAULT 0")]
    for t in ("tenants", "tokens", "models", "key_versions", "cache_approvals", "sim_platforms"):
        add += [(t, "row_seq", "INTEGER NOT NULL DEFAULT 0"), (t, "mac", blob)]
    for table, col, ddl in add:
        conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {col} {ddl}")
    if not db.is_sqlite:  # Unix times past 2038 (SQLite integers are 64-bit already)
        for table, cols in _TIME_COLUMNS_V1.items():
            for col in cols:
                conn.exec_driver_sql(
                    f'ALTER TABLE {table} ALTER COLUMN "{col}" TYPE BIGINT')
    schema.md.create_all(conn, tables=[schema.key_exports, schema.cache_seen])
    exportable = [(r[0], int(r[1]), bytes(r[2])) for r in conn.exec_driver_sql(
        "SELECT model_id, key_version, wrapped FROM key_versions WHERE exportable")]
    conn.exec_driver_sql("ALTER TABLE key_versions DROP COLUMN exportable")
    old = conn.exec_driver_sql(
        "SELECT nonce_key, audit_seq, audit_head FROM server_state WHERE id = 1").first()
    if old is None:
        return  # a new database: ``create_server_state`` seals it
    # an existing database: a new integrity key, then every row MACed as it stands
    now = int(time.time())
    integrity = keyring.new_data_key(INTEGRITY_KEY_AAD)
    keyring.open_data_keys(bytes(old[0]), integrity)
    tenant_of = {str(r[0]): str(r[1]) for r in conn.exec_driver_sql(
        "SELECT model_id, tenant FROM models")}
    for mid, kv, wrapped in exportable:
        ref = KeyRef(tenant_of[mid], mid, kv)
        with keyring.model_key(wrapped, ref) as key:
            conn.execute(insert(schema.key_exports).values(
                model_id=mid, key_version=kv, wrapped=keyring.wrap_export_copy(key, ref),
                created=now, row_seq=0, mac=b""))
        keyring.evict(mid, kv)
    for spec in rows.AUTHORITATIVE:
        for r in list(conn.execute(select(spec.table))):
            rows.put(conn, spec, dict(r._mapping), 1, keyring)
    from sealtorch.keyserver.queries import append_audit
    from sealtorch.keyserver.state import ServerStateRow, write_server_state

    legacy = Head(int(old[1]), str(old[2]))
    head = append_audit(db, conn, keyring, legacy, legacy.seq + 1, now, actor="migration",
                        action="schema_upgrade", decision="admin", code="ok",
                        details={"from": 1, "to": 2, "legacy_audit_head": legacy.hash})
    conn.exec_driver_sql(db.sql("UPDATE server_state SET integrity_key = ?"), (integrity,))
    loaded = [rows.load(conn, spec, keyring) for spec in rows.AUTHORITATIVE]
    epoch = int(conn.exec_driver_sql("SELECT revocation_epoch FROM server_state").scalar_one())
    new = ServerStateRow(os.urandom(16).hex(), 1, rows.digest(loaded), epoch, head.seq,
                         head.hash, legacy.seq + 1, bytes(old[0]), integrity, b"")
    write_server_state(db, conn, new.sealed(keyring))


#: ordered, append-only: never edit a released step, add a new one
MIGRATIONS: list[tuple[int, Step]] = [(1, _step_1), (2, _step_2)]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def migrate(db: Database, keyring: Keyring) -> int:
    """Apply pending steps in one transaction; returns the schema version."""
    with db.errors(), db.engine.begin() as conn:
        schema.md.create_all(conn, tables=[schema.schema_migrations])
        if not db.is_sqlite:
            conn.exec_driver_sql("LOCK TABLE schema_migrations IN EXCLUSIVE MODE")
        done = {r[0] for r in conn.execute(select(schema.schema_migrations.c.version))}
        for version, step in MIGRATIONS:
            if version not in done:
                step(conn, db, keyring)
                conn.execute(insert(schema.schema_migrations).values(
                    version=version, applied_at=int(time.time())))
    return SCHEMA_VERSION


def schema_version(db: Database) -> int:
    from sqlalchemy import func

    with db.read() as conn:
        v = conn.execute(select(func.max(schema.schema_migrations.c.version))).scalar()
    return int(v or 0)
