"""The key server's operational statements: what the release path writes (nonce burns, cache
enrolments, audit entries) and what admins list. None of these rows decides a release on its
own; those live in ``state.py``.

The release hot path uses plain DBAPI statements (one round trip each, no SQLAlchemy compile).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from sealtorch.keyserver import audit as chain
from sealtorch.keyserver.audit import Head
from sealtorch.keyserver.db import Database
from sealtorch.keyserver.keyring import Keyring
from sealtorch.keyserver.schema import audit_log, cache_seen, caches

_AUDIT_INTO = ("INSERT INTO audit_log (seq, ts, tenant, actor, action, model_id, cache_id,"
               " decision, code, details, prev_hash, hash)")
_INSERT_AUDIT = _AUDIT_INTO + " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
#: rows per multi-row INSERT (bounds the statement texts a driver prepares, and parameters)
ROWS_PER_STATEMENT = 64


def _insert_rows(db: Database, conn: Connection, into: str, rows: list[tuple[Any, ...]],
                 tail: str = "") -> None:
    """Insert ``rows`` with multi-row ``VALUES`` statements of at most
    :data:`ROWS_PER_STATEMENT` rows: one statement per chunk, where ``executemany`` costs the
    driver about three times the CPU per row."""
    if not rows:
        return
    group = "(" + ", ".join("?" * len(rows[0])) + ")"
    cur = db.cursor(conn)
    for i in range(0, len(rows), ROWS_PER_STATEMENT):
        chunk = rows[i:i + ROWS_PER_STATEMENT]
        cur.execute(db.sql(f"{into} VALUES {', '.join([group] * len(chunk))}{tail}"),
                    [v for r in chunk for v in r])


def audit_row(keyring: Keyring, head: Head, keyed_from: int, ts: int, **fields: Any
              ) -> tuple[tuple[Any, ...], Head]:
    """The next entry after ``head``, chained and MACed: its audit_log row and the new head."""
    entry = chain.new_entry(head.seq + 1, head.hash, ts, **fields)
    entry["hash"] = (chain.entry_mac(keyring.audit, entry) if entry["seq"] >= keyed_from
                     else chain.legacy_hash(entry))
    row = tuple(entry[k] for k in (*chain.ENTRY_FIELDS[:10], "prev_hash", "hash"))
    return row, Head(int(entry["seq"]), str(entry["hash"]))


def insert_audit_rows(db: Database, conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    """Insert audit_log rows in ``conn``'s transaction, together (a group commit's entries:
    one statement, one round trip, per :data:`ROWS_PER_STATEMENT` entries)."""
    _insert_rows(db, conn, _AUDIT_INTO, rows)


def append_audit(db: Database, conn: Connection, keyring: Keyring, head: Head, keyed_from: int,
                 ts: int, **fields: Any) -> Head:
    """Append one entry after ``head`` in ``conn``'s transaction; returns the new head."""
    row, new = audit_row(keyring, head, keyed_from, ts, **fields)
    db.cursor(conn).execute(db.sql(_INSERT_AUDIT), row)
    return new


_ENROL_INTO = ("INSERT INTO caches (cache_id, tee, platform_id, public_key, measurement,"
               " first_seen, last_seen)")
_ENROL_TAIL = (" ON CONFLICT (cache_id) DO UPDATE SET public_key = excluded.public_key,"
               " measurement = excluded.measurement, last_seen = excluded.last_seen")


def cache_row(cache_id: str, tee: str, platform_id: str, public_key: str, measurement: str,
              now: int) -> tuple[Any, ...]:
    """The parameters of one attested cache's enrolment (:func:`enrol_caches`)."""
    return (cache_id, tee, platform_id[:128], public_key, measurement[:256], now, now)


def enrol_caches(db: Database, conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    """Record (or refresh: key, measurement, last seen) attested caches in ``conn``'s
    transaction, together (a group commit's enrolments). A cache enrolled twice is one row,
    as two upserts in order would leave it: the first sighting, the last key and time (one
    upsert statement may not touch a row twice)."""
    merged: dict[str, tuple[Any, ...]] = {}
    for r in rows:
        first = merged.get(r[0])
        merged[r[0]] = r if first is None else (*r[:5], first[5], r[6])
    _insert_rows(db, conn, _ENROL_INTO, list(merged.values()), _ENROL_TAIL)


def note_cache_seen(db: Database, conn: Connection, tenant: str, cache_id: str, now: int
                    ) -> None:
    """Remember that ``cache_id`` asked for a model of ``tenant`` (so the tenant lists it)."""
    db.cursor(conn).execute(db.sql(
        "INSERT INTO cache_seen (tenant, cache_id, first_seen) VALUES (?, ?, ?)"
        " ON CONFLICT DO NOTHING"), (tenant, cache_id, now))


def count_in(db: Database, conn: Connection, code: str, now: int) -> None:
    """Count an anonymous failure (malformed request, forged or reused nonce, evidence that
    does not verify, an unauthenticated status poll) in an hourly aggregate row, in
    ``conn``'s transaction: never one row each, so an unauthenticated caller cannot grow the
    database."""
    db.cursor(conn).execute(db.sql(
        'INSERT INTO anon_counters ("window", code, count) VALUES (?, ?, 1)'
        ' ON CONFLICT ("window", code) DO UPDATE SET count = anon_counters.count + 1'),
        (now // 3600 * 3600, code))


def audit_rows(db: Database, *, tenant: str | None = None, after: int = 0,
               limit: int | None = None, newest: bool = False) -> list[dict[str, Any]]:
    """Audit entries after ``after`` in chain order; ``newest``: the last ``limit`` of them."""
    q = select(audit_log).where(audit_log.c.seq > after)
    if tenant is not None:
        q = q.where(audit_log.c.tenant == tenant)
    q = q.order_by(audit_log.c.seq.desc() if newest else audit_log.c.seq)
    if limit is not None:
        q = q.limit(limit)
    with db.read() as conn:
        out = [dict(r._mapping) for r in conn.execute(q)]
    return out[::-1] if newest else out


def cache_rows(db: Database, cache_ids: set[str] | None = None) -> list[dict[str, Any]]:
    """Enrolled caches (all, or those named), oldest first."""
    q = select(caches).order_by(caches.c.first_seen)
    with db.read() as conn:
        return [dict(r._mapping) for r in conn.execute(q)
                if cache_ids is None or r.cache_id in cache_ids]


def caches_seen_by(db: Database, tenant: str) -> set[str]:
    """Cache ids that asked for a model of ``tenant``."""
    with db.read() as conn:
        return {str(r[0]) for r in conn.execute(
            select(cache_seen.c.cache_id).where(cache_seen.c.tenant == tenant))}
