"""The key server's authoritative state: a verified, typed snapshot of every row an
authorization decision reads, and the one way to change it (:class:`Change`).

A snapshot is built only from rows whose MAC verifies, whose set matches the digest sealed in
the ``server_state`` row (itself MACed), and whose state sequence is not behind the high-water
mark. Any failure refuses the whole state (:class:`StateTamperedError`,
:class:`StateRollbackError`) until an operator runs ``dkeyserver recover``: a row that merely
went missing could otherwise re-admit a revoked cache. Snapshots are cached per state sequence,
so a release reads one row (``server_state``) and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy.engine import Connection

from sealtorch.attestation.policy import ModelPolicy
from sealtorch.errors import SealtorchError, StateTamperedError, StoreError
from sealtorch.keyserver import rows
from sealtorch.keyserver.audit import GENESIS, Head
from sealtorch.keyserver.db import Database
from sealtorch.keyserver.keyring import INTEGRITY_KEY_AAD, NONCE_KEY_AAD, Keyring
from sealtorch.keyserver.watermark import RECOVER_HINT, Watermark
from sealtorch.protocol.canonical import canonical_json

log = logging.getLogger("sealtorch.keyserver")
_STATE_TAG = b"sealtorch-server-state/v1\x00"
_COLS = ("db_id, state_seq, state_digest, revocation_epoch, audit_seq, audit_head, "
         "audit_keyed_from, nonce_key, integrity_key, mac")


@dataclass(frozen=True)
class ServerStateRow:
    """The ``server_state`` row: the sealed summary of the authoritative state, the audit
    chain's head pointer, and the wrapped data keys."""

    db_id: str
    state_seq: int
    state_digest: str
    revocation_epoch: int
    audit_seq: int
    audit_head: str
    audit_keyed_from: int
    nonce_key: bytes = field(repr=False)
    integrity_key: bytes = field(repr=False)
    mac: bytes = field(repr=False)

    def mac_input(self) -> bytes:
        """What the row's MAC covers (not the audit head: every release moves it; the chain
        protects itself)."""
        return _STATE_TAG + canonical_json([
            self.db_id, self.state_seq, self.state_digest, self.revocation_epoch,
            self.audit_keyed_from, hashlib.sha256(self.nonce_key).hexdigest(),
            hashlib.sha256(self.integrity_key).hexdigest()])

    def sealed(self, keyring: Keyring) -> ServerStateRow:
        return replace(self, mac=keyring.row(self.mac_input()))

    @property
    def audit(self) -> Head:
        return Head(self.audit_seq, self.audit_head)


def read_server_state(db: Database, conn: Connection, *, lock: bool = False) -> ServerStateRow:
    """The server-state row; ``lock``: row-locked for this transaction on PostgreSQL (SQLite
    write transactions already hold the database lock)."""
    cur = db.cursor(conn)
    cur.execute(f"SELECT {_COLS} FROM server_state WHERE id = 1"  # noqa: S608 - constant
                + (" FOR UPDATE" if lock and not db.is_sqlite else ""))
    return _row(cur.fetchone())


def read_server_state_now(db: Database) -> ServerStateRow:
    """The server-state row as committed now, outside any transaction: one statement, run
    after the caller asked, so as fresh as any read (see :meth:`Database.read_one`)."""
    return _row(db.read_one(f"SELECT {_COLS} FROM server_state WHERE id = 1"))  # noqa: S608


def _row(r: Any) -> ServerStateRow:
    """A fetched server-state row; none at all means the database was emptied or replaced."""
    if r is None:
        raise StateTamperedError(
            "the server_state row is missing: the database was emptied or replaced; "
            + RECOVER_HINT)
    return ServerStateRow(str(r[0]), int(r[1]), str(r[2]), int(r[3]), int(r[4]), str(r[5]),
                          int(r[6]), bytes(r[7]), bytes(r[8]), bytes(r[9]))


def write_server_state(db: Database, conn: Connection, row: ServerStateRow) -> None:
    cur = db.cursor(conn)
    cur.execute(db.sql(
        "UPDATE server_state SET db_id = ?, state_seq = ?, state_digest = ?, revocation_epoch = ?,"
        " audit_seq = ?, audit_head = ?, audit_keyed_from = ?, mac = ? WHERE id = 1"),
        (row.db_id, row.state_seq, row.state_digest, row.revocation_epoch, row.audit_seq,
         row.audit_head, row.audit_keyed_from, row.mac))


def write_audit_head(db: Database, conn: Connection, head: Head) -> None:
    db.cursor(conn).execute(db.sql(
        "UPDATE server_state SET audit_seq = ?, audit_head = ? WHERE id = 1"),
        (head.seq, head.hash))


def create_server_state(db: Database, conn: Connection, keyring: Keyring) -> ServerStateRow:
    """The first ``server_state`` row of a new database: a random database id, fresh data
    keys wrapped by the KEK, and the digest of an empty (or the current) authoritative set."""
    nonce = keyring.new_data_key(NONCE_KEY_AAD)
    integrity = keyring.new_data_key(INTEGRITY_KEY_AAD)
    keyring.open_data_keys(nonce, integrity)
    loaded = [rows.load(conn, spec, keyring) for spec in rows.AUTHORITATIVE]
    row = ServerStateRow(os.urandom(16).hex(), 0, rows.digest(loaded), 0, 0, GENESIS, 1,
                         nonce, integrity, b"").sealed(keyring)
    cur = db.cursor(conn)
    cur.execute(db.sql(
        "INSERT INTO server_state (id, db_id, state_seq, state_digest, revocation_epoch, audit_seq,"
        " audit_head, audit_keyed_from, nonce_key, integrity_key, mac)"
        " VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
        (row.db_id, row.state_seq, row.state_digest, row.revocation_epoch, row.audit_seq,
         row.audit_head, row.audit_keyed_from, row.nonce_key, row.integrity_key, row.mac))
    return row


# --- the typed snapshot ----------------------------------------------------------------------
@dataclass(frozen=True)
class Token:
    token_id: str
    tenant: str
    token_hash: str
    expires: int
    revoked: bool
    created: int


@dataclass(frozen=True)
class Model:
    model_id: str
    tenant: str
    state: str  # "active" | "revoked"
    created: int


@dataclass(frozen=True)
class KeyVersion:
    model_id: str
    key_version: int
    state: str  # "active" | "retired"
    created: int
    wrapped: bytes = field(repr=False)


@dataclass(frozen=True)
class StoredPolicy:
    """A model's current policy: its canonical text, and the parsed policy or why it is not."""

    model_id: str
    version: int
    text: str
    parsed: ModelPolicy | None
    error: str | None

    @property
    def doc(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.text)
        return out


@dataclass(frozen=True)
class AuthState:
    """Everything an authorization decision may read, verified, at one state sequence."""

    db_id: str
    seq: int
    epoch: int
    mac: bytes = field(repr=False)
    keyed_from: int = 1
    tenants: frozenset[str] = frozenset()
    tokens: Mapping[str, Token] = field(default_factory=dict)  # by token hash
    models: Mapping[str, Model] = field(default_factory=dict)
    versions: Mapping[str, tuple[KeyVersion, ...]] = field(default_factory=dict)
    policies: Mapping[str, StoredPolicy] = field(default_factory=dict)
    approvals: Mapping[tuple[str, str], str] = field(default_factory=dict)  # (tenant, cache)
    sim_keys: Mapping[str, str] = field(default_factory=dict)  # raw public key hex -> tenant
    sim_fingerprints: Mapping[str, str] = field(default_factory=dict)  # fingerprint -> tenant
    exports: Mapping[tuple[str, int], bytes] = field(default_factory=dict, repr=False)

    def active_versions(self, model_id: str) -> tuple[KeyVersion, ...]:
        return tuple(v for v in self.versions.get(model_id, ()) if v.state == "active")

    def sim_platforms_of(self, tenant: str) -> frozenset[str]:
        """Fingerprints (as sim claims carry them) of the sim platforms ``tenant`` registered."""
        return frozenset(fp for fp, t in self.sim_fingerprints.items() if t == tenant)


def _parse_policy(model_id: str, version: int, text: str) -> StoredPolicy:
    try:
        pol: ModelPolicy | None = ModelPolicy.from_dict(json.loads(text))
        err = None
    except (SealtorchError, ValueError, TypeError, KeyError) as e:
        pol, err = None, f"stored policy does not parse ({type(e).__name__})"
    return StoredPolicy(model_id, version, text, pol, err)


def _fingerprint(raw_hex: str) -> str:
    from sealtorch.attestation import sim

    return sim.fingerprint(sim.platform_public_key_from_text(raw_hex))


def build(row: ServerStateRow, loaded: list[rows.Loaded]) -> AuthState:
    """The typed snapshot of verified rows."""
    t = {lt.spec.name: lt.rows for lt in loaded}
    versions: dict[str, list[KeyVersion]] = {}
    for r in t["key_versions"]:
        versions.setdefault(r["model_id"], []).append(
            KeyVersion(r["model_id"], int(r["key_version"]), r["state"], int(r["created"]),
                       bytes(r["wrapped"])))
    return AuthState(
        db_id=row.db_id, seq=row.state_seq, epoch=row.revocation_epoch, mac=row.mac,
        keyed_from=row.audit_keyed_from,
        tenants=frozenset(r["name"] for r in t["tenants"]),
        tokens={r["token_hash"]: Token(r["token_id"], r["tenant"], r["token_hash"],
                                       int(r["expires"]), bool(r["revoked"]), int(r["created"]))
                for r in t["tokens"]},
        models={r["model_id"]: Model(r["model_id"], r["tenant"], r["state"], int(r["created"]))
                for r in t["models"]},
        versions={m: tuple(sorted(v, key=lambda x: x.key_version)) for m, v in versions.items()},
        policies={r["model_id"]: _parse_policy(r["model_id"], int(r["version"]), r["policy"])
                  for r in t["policies"]},
        approvals={(r["tenant"], r["cache_id"]): r["state"] for r in t["cache_approvals"]},
        sim_keys={r["key"]: r["tenant"] for r in t["sim_platforms"]},
        sim_fingerprints={_fingerprint(r["key"]): r["tenant"] for r in t["sim_platforms"]},
        exports={(r["model_id"], int(r["key_version"])): bytes(r["wrapped"])
                 for r in t["key_exports"]},
    )


class StateCache:
    """The verified snapshot of this process, reloaded when the state sequence moves."""

    def __init__(self, db: Database, keyring: Keyring, watermark: Watermark, *,
                 recheck_seconds: float = 60.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self.keyring = keyring
        self.watermark = watermark
        self.recheck_seconds = recheck_seconds
        self._monotonic = monotonic
        self._state: AuthState | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def _fresh(self, row: ServerStateRow) -> AuthState | None:
        """The cached snapshot if ``row`` is still its row and it was checked against the
        database recently enough (rows edited in place are caught at the next full check)."""
        st = self._state
        if (st is not None and row.state_seq == st.seq and row.db_id == st.db_id
                and row.mac == st.mac
                and self._monotonic() - self._checked < self.recheck_seconds):
            return st
        return None

    def verified(self, conn: Connection, row: ServerStateRow, *, full: bool = False
                 ) -> AuthState:
        """The snapshot for ``row``, read on ``conn`` (which holds the server-state row lock
        whenever a full check is due). Refuses tampered state and state older than this
        server has seen. ``full``: check every row now (admin changes always do, so that a
        change never seals a row someone rolled back)."""
        st = None if full else self._fresh(row)
        if st is not None:
            self.watermark.check(row.db_id, row.state_seq, row.audit_seq)
            return st
        if not self.keyring.row.check(row.mac_input(), row.mac):
            raise StateTamperedError(
                f"the server_state row fails its MAC (edited in the database); {RECOVER_HINT}")
        self.watermark.check(row.db_id, row.state_seq, row.audit_seq)
        loaded = [rows.load(conn, spec, self.keyring) for spec in rows.AUTHORITATIVE]
        failed = [name for lt in loaded for name in lt.failed]
        if failed:
            log.error("tamper detected: rows fail their MAC", extra={"fields": {
                "rows": failed[:50]}})
            raise StateTamperedError(
                f"{len(failed)} row(s) fail their MAC (edited or forged in the database): "
                f"{', '.join(failed[:5])}; {RECOVER_HINT}")
        if rows.digest(loaded) != row.state_digest:
            log.error("tamper detected: authoritative rows do not match the sealed digest",
                      extra={"fields": {"state_seq": row.state_seq}})
            raise StateTamperedError(
                "the authoritative rows do not match the digest sealed by the last admin change "
                f"(state {row.state_seq}): a row was rolled back to an older copy, deleted or "
                f"re-inserted; {RECOVER_HINT}")
        st = build(row, loaded)
        with self._lock:
            if self._state is None or self._state.seq <= st.seq:
                self._state = st
                self._checked = self._monotonic()
        self.watermark.note(row.db_id, row.state_seq, row.audit_seq)
        return st

    def current(self) -> AuthState:
        """The verified snapshot for a reader outside any transaction (one read of the
        server-state row when nothing changed; a locked reload when something did)."""
        seen = self.watermark.seen()  # before the read: see Watermark.check
        row = read_server_state_now(self.db)
        st = self._fresh(row)
        if st is not None:
            self.watermark.check(row.db_id, row.state_seq, row.audit_seq, seen=seen)
            return st
        with self.db.tx() as conn:
            return self.verified(conn, read_server_state(self.db, conn, lock=True))

    def forget(self) -> None:
        """Drop the cached snapshot (after ``recover``)."""
        with self._lock:
            self._state = None

    @contextmanager
    def change(self, now: int, *, create: bool = False) -> Iterator[Change]:
        """One admin change in one transaction: check the current state, apply the caller's
        writes under the next state sequence, re-seal the digest, commit, then raise the
        high-water mark and evict what the change retired. ``create``: the first change of
        a new database, which also makes its ``server_state`` row (refused if one exists)."""
        with self.db.tx() as conn:
            if create:
                cur = self.db.cursor(conn)
                cur.execute("SELECT COUNT(*) FROM server_state")
                if cur.fetchone()[0]:
                    raise StoreError(
                        "this database already holds a key server's state; give 'dkeyserver "
                        "init' an empty database (or start the existing server)")
                row = create_server_state(self.db, conn, self.keyring)
            else:
                row = read_server_state(self.db, conn, lock=True)
            before = self.verified(conn, row, full=True)
            ch = Change(self.db, conn, self.keyring, before, row, now)
            yield ch
            loaded = [rows.load(conn, spec, self.keyring) for spec in rows.AUTHORITATIVE]
            new = replace(row, state_seq=ch.seq, revocation_epoch=ch.epoch,
                          state_digest=rows.digest(loaded), audit_seq=ch.head.seq,
                          audit_head=ch.head.hash).sealed(self.keyring)
            write_server_state(self.db, conn, new)
            st = build(new, loaded)
        with self._lock:
            self._state = st
            self._checked = self._monotonic()
        self.watermark.raise_to(new.db_id, new.state_seq, new.audit_seq)
        for model_id, kv in ch.evictions:
            self.keyring.evict(model_id, kv)


class Change:
    """The writes of one admin change (see :meth:`StateCache.change`)."""

    def __init__(self, db: Database, conn: Connection, keyring: Keyring, before: AuthState,
                 row: ServerStateRow, now: int) -> None:
        self.db = db
        self.conn = conn
        self.keyring = keyring
        self.state = before
        self.seq = before.seq + 1
        self.epoch = before.epoch
        self.head = row.audit
        self.keyed_from = row.audit_keyed_from
        self.now = now
        self.evictions: list[tuple[str, int | None]] = []

    def put(self, spec: rows.Spec, values: Mapping[str, Any]) -> None:
        rows.put(self.conn, spec, values, self.seq, self.keyring)

    def remove(self, spec: rows.Spec, key: Mapping[str, Any]) -> int:
        return rows.remove(self.conn, spec, key)

    def bump_epoch(self) -> None:
        """A revocation: caches renew or drop their leases at their next status poll."""
        self.epoch = self.state.epoch + 1

    def evict(self, model_id: str, key_version: int | None = None) -> None:
        """Wipe cached plaintext keys of the model after commit (retire, revoke)."""
        self.evictions.append((model_id, key_version))

    def audit(self, **entry: Any) -> None:
        """Append an audit entry in this change's transaction."""
        from sealtorch.keyserver.queries import append_audit

        self.head = append_audit(self.db, self.conn, self.keyring, self.head, self.keyed_from,
                                 self.now, **entry)
