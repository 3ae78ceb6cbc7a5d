"""The key server's persistent state, put together: the database (``db.py``), the keyring
(``keyring.py``), the verified authoritative state (``state.py``), the high-water mark
(``watermark.py``), the group-commit writer (``writer.py``) and the operational statements
(``queries.py``). Shared by replicas through the database; each process keeps its own mark.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.engine import Connection

from sealtorch.keyserver import queries
from sealtorch.keyserver.audit import Head
from sealtorch.keyserver.db import Database, DatabaseUnavailableError, db_errors
from sealtorch.keyserver.kek import KekProvider
from sealtorch.keyserver.keyring import Keyring
from sealtorch.keyserver.migrations import migrate
from sealtorch.keyserver.state import (
    AuthState,
    ServerStateRow,
    StateCache,
    read_server_state,
    write_audit_head,
)
from sealtorch.keyserver.watermark import FILE_NAME, Watermark
from sealtorch.keyserver.writer import BatchState, GroupCommitter, batch_of

T = TypeVar("T")

#: the high-water mark file is rewritten for new audit entries at most this often
MARK_INTERVAL = 1.0
#: (tenant, cache id) pairs whose cache_seen row this process remembers having written
MAX_SEEN_PAIRS = 100_000

__all__ = ["DatabaseUnavailableError", "Store", "db_errors"]


class Store:
    """All persistent state of one key server process."""

    def __init__(self, url: str, kek: KekProvider, *, data_dir: Path | None = None,
                 clock: Callable[[], float] = time.time, recheck_seconds: float = 60.0) -> None:
        self.db = Database(url)
        self.keyring = Keyring(kek)
        self.watermark = Watermark(data_dir / FILE_NAME if data_dir else None,
                                   lambda data: self.keyring.hwm(data))
        self.states = StateCache(self.db, self.keyring, self.watermark,
                                 recheck_seconds=recheck_seconds)
        self.clock = clock
        self._committer: GroupCommitter | None = None
        self._committer_lock = threading.Lock()
        self._marked = 0.0
        self._seen: set[tuple[str, str]] = set()  # (tenant, cache id) pairs committed

    @property
    def is_sqlite(self) -> bool:
        return self.db.is_sqlite

    def now(self) -> int:
        return int(self.clock())

    def open(self) -> ServerStateRow:
        """Migrate the schema, open the data keys and read the high-water mark; returns the
        server-state row (the state itself is verified on first use)."""
        migrate(self.db, self.keyring)
        with self.db.read() as conn:
            row = read_server_state(self.db, conn)
        self.keyring.open_data_keys(row.nonce_key, row.integrity_key)
        self.watermark.load()
        return row

    def close(self) -> None:
        if self._committer is not None:
            self._committer.close()
            self._committer = None
        try:
            self.watermark.persist()
        except Exception:  # noqa: S110 - best effort at shutdown; the next start reads the DB
            pass
        self.db.close()
        self.keyring.close()

    # --- state --------------------------------------------------------------------------
    def state(self) -> AuthState:
        """The verified authoritative state (outside a transaction)."""
        return self.states.current()

    def in_batch(self, conn: Connection) -> tuple[ServerStateRow, AuthState]:
        """Inside a group-commit batch: the server-state row (read and row-locked once per
        batch) and the verified state for it."""
        batch = batch_of(conn)
        if batch is None:
            raise RuntimeError("in_batch outside a group-commit batch")
        if batch.server is None:
            batch.server = read_server_state(self.db, conn, lock=True)
            batch.audit = batch.server.audit
        return batch.server, self.states.verified(conn, batch.server)

    def append_audit(self, conn: Connection, **fields: Any) -> Head:
        """Append an audit entry in the current batch: chained and MACed now, its row inserted
        with the batch's other entries and the head written back, all before COMMIT."""
        row, _ = self.in_batch(conn)
        batch = batch_of(conn)
        assert batch is not None and batch.audit is not None
        entry, batch.audit = queries.audit_row(self.keyring, batch.audit, row.audit_keyed_from,
                                               self.now(), **fields)
        batch.audit_rows.append(entry)
        return batch.audit

    def enrol_cache(self, conn: Connection, cache_id: str, tee: str, platform_id: str,
                    public_key: str, measurement: str, now: int) -> None:
        """Record (or refresh) an attested cache in the current batch: its upsert is sent with
        the batch's other enrolments just before COMMIT (nothing in a batch reads them)."""
        batch = batch_of(conn)
        if batch is None:
            raise RuntimeError("enrol_cache outside a group-commit batch")
        batch.caches.append(queries.cache_row(cache_id, tee, platform_id, public_key,
                                              measurement, now))

    def note_cache_seen(self, conn: Connection, tenant: str, cache_id: str, now: int) -> None:
        """Remember that ``cache_id`` asked for a model of ``tenant`` (the tenant's cache
        list); written once per pair by this process, not at every renewal."""
        if (tenant, cache_id) in self._seen:
            return
        queries.note_cache_seen(self.db, conn, tenant, cache_id, now)
        batch = batch_of(conn)
        if batch is not None:  # known once the batch has committed
            batch.seen.append((tenant, cache_id))

    def _before_commit(self, conn: Connection, batch: BatchState) -> None:
        queries.enrol_caches(self.db, conn, batch.caches)
        queries.insert_audit_rows(self.db, conn, batch.audit_rows)
        if batch.server is not None and batch.audit is not None \
                and batch.audit != batch.server.audit:
            write_audit_head(self.db, conn, batch.audit)

    def _committed(self, batch: BatchState) -> None:
        if batch.server is not None and batch.audit is not None:
            self.watermark.note(batch.server.db_id, batch.server.state_seq, batch.audit.seq)
        if batch.seen:
            if len(self._seen) > MAX_SEEN_PAIRS:  # bounded: forgetting costs one write
                self._seen.clear()
            self._seen.update(batch.seen)

    def _idle(self) -> None:
        now = time.monotonic()
        if now - self._marked >= MARK_INTERVAL:
            self._marked = now
            self.watermark.persist()

    def committer(self) -> GroupCommitter:
        """This store's group-commit writer (started on first use)."""
        with self._committer_lock:
            if self._committer is None:
                self._committer = GroupCommitter(self.db, before_commit=self._before_commit,
                                                 committed=self._committed, idle=self._idle)
            return self._committer

    def audit_head(self) -> Head:
        with self.db.read() as conn:
            return read_server_state(self.db, conn).audit
