"""The key server's tables (SQLAlchemy Core), as of the newest schema version.

Two kinds of table:

- *authoritative* tables hold what an authorization decision reads (tenants, tokens, models,
  key versions, policies, cache approvals, sim platforms, export copies). Each row carries
  ``row_seq`` (the state sequence of the admin change that wrote it) and ``mac`` (see
  ``rows.py``); ``server_state`` seals the whole set with a digest and its own MAC.
- *operational* tables are written on the release path and decide nothing on their own: cache
  enrolments, which tenants a cache asked for, consumed nonces, the audit log (keyed chain, see
  ``audit.py``) and aggregate counters of anonymous failures.

The schema of older versions, and the steps between them, live in ``migrations.py``. Unix
times are 64-bit (``BigInteger``): PostgreSQL's ``integer`` ends in 2038.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

md = MetaData()


def _integrity() -> list[Column[object]]:
    return [Column("row_seq", Integer, nullable=False, default=0),
            Column("mac", LargeBinary, nullable=False, default=b"")]


schema_migrations = Table("schema_migrations", md, Column("version", Integer, primary_key=True),
                          Column("applied_at", BigInteger, nullable=False))
server_state = Table("server_state", md, Column("id", Integer, primary_key=True),
                     Column("revocation_epoch", Integer, nullable=False),
                     Column("nonce_key", LargeBinary, nullable=False),
                     Column("audit_seq", Integer, nullable=False),
                     Column("audit_head", String(64), nullable=False),
                     Column("integrity_key", LargeBinary, nullable=False, default=b""),
                     Column("db_id", String(32), nullable=False, default=""),
                     Column("state_seq", Integer, nullable=False, default=0),
                     Column("state_digest", String(64), nullable=False, default=""),
                     Column("audit_keyed_from", Integer, nullable=False, default=1),
                     Column("mac", LargeBinary, nullable=False, default=b""))
tenants = Table("tenants", md, Column("name", String(64), primary_key=True),
                Column("created", BigInteger, nullable=False), *_integrity())
tokens = Table("tokens", md, Column("token_id", String(16), primary_key=True),
               Column("tenant", String(64), nullable=False),
               Column("token_hash", String(64), nullable=False, unique=True),
               Column("expires", BigInteger, nullable=False),
               Column("revoked", Boolean, nullable=False, default=False),
               Column("created", BigInteger, nullable=False), *_integrity())
models = Table("models", md, Column("model_id", String(128), primary_key=True),
               Column("tenant", String(64), nullable=False, index=True),
               Column("state", String(16), nullable=False),
               Column("created", BigInteger, nullable=False), *_integrity())
key_versions = Table("key_versions", md,
                     Column("model_id", String(128), primary_key=True),
                     Column("key_version", Integer, primary_key=True),
                     Column("wrapped", LargeBinary, nullable=False),
                     Column("state", String(16), nullable=False),
                     Column("created", BigInteger, nullable=False), *_integrity())
policies = Table("policies", md, Column("model_id", String(128), primary_key=True),
                 Column("version", Integer, nullable=False),
                 Column("policy", Text, nullable=False),
                 Column("mac", LargeBinary, nullable=False),
                 Column("updated", BigInteger, nullable=False),
                 Column("row_seq", Integer, nullable=False, default=0))
cache_approvals = Table("cache_approvals", md,
                        Column("tenant", String(64), primary_key=True),
                        Column("cache_id", String(32), primary_key=True),
                        Column("state", String(16), nullable=False),
                        Column("updated", BigInteger, nullable=False), *_integrity())
sim_platforms = Table("sim_platforms", md, Column("key", String(128), primary_key=True),
                      Column("tenant", String(64), nullable=False),
                      Column("created", BigInteger, nullable=False), *_integrity())
key_exports = Table("key_exports", md,
                    Column("model_id", String(128), primary_key=True),
                    Column("key_version", Integer, primary_key=True),
                    Column("wrapped", LargeBinary, nullable=False),
                    Column("created", BigInteger, nullable=False), *_integrity())

caches = Table("caches", md, Column("cache_id", String(32), primary_key=True),
               Column("tee", String(16), nullable=False),
               Column("platform_id", String(128), nullable=False),
               Column("public_key", String(64), nullable=False),
               Column("measurement", String(256), nullable=False),
               Column("first_seen", BigInteger, nullable=False),
               Column("last_seen", BigInteger, nullable=False))
cache_seen = Table("cache_seen", md, Column("tenant", String(64), primary_key=True),
                   Column("cache_id", String(32), primary_key=True),
                   Column("first_seen", BigInteger, nullable=False))
consumed_nonces = Table("consumed_nonces", md,
                        Column("nonce_hash", LargeBinary, primary_key=True),
                        Column("expires", BigInteger, nullable=False, index=True))
audit_log = Table("audit_log", md, Column("seq", Integer, primary_key=True, autoincrement=False),
                  Column("ts", BigInteger, nullable=False),
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
anon_counters = Table("anon_counters", md, Column("window", BigInteger, primary_key=True),
                      Column("code", String(32), primary_key=True),
                      Column("count", Integer, nullable=False))
