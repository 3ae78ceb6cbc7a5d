"""The high-water mark: the newest database state this server has seen, kept outside the
database, so that a restored backup or a rolled-back row cannot pass for current.

A 0600 JSON file in the data dir (``state.hwm``), MACed under a key derived from the KEK,
written atomically (temporary file, fsync, rename, fsync of the directory) and only ever
raised, under a file lock shared by the worker processes of one data dir. It names the
database (its ``db_id``), the state sequence of the newest admin change, and the newest audit
sequence. Each replica keeps its own; ``dkeyserver recover`` is the only way to lower one.
"""

from __future__ import annotations

import fcntl
import hmac
import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sealtorch._outputs import write_all
from sealtorch.errors import StateRollbackError, StoreError
from sealtorch.protocol.canonical import canonical_json

FILE_NAME = "state.hwm"
FORMAT = "sealtorch-hwm/v1"
_MAX_BYTES = 4096
RECOVER_HINT = ("find out who restored or edited the database; when its content is what you "
                "want to serve, run 'dkeyserver recover --data-dir DIR' (audited)")


@dataclass(frozen=True)
class Mark:
    """What a server has seen of one database."""

    db_id: str
    state_seq: int
    audit_seq: int
    #: how many times ``dkeyserver recover`` reset this mark: a running server that finds a
    #: newer recovery in the file takes the file's mark instead of refusing
    recoveries: int = 0

    def body(self) -> dict[str, object]:
        return {"format": FORMAT, "db_id": self.db_id, "state_seq": self.state_seq,
                "audit_seq": self.audit_seq, "recoveries": self.recoveries}


class Watermark:
    """One data dir's high-water mark (``path`` None: this process's memory only)."""

    def __init__(self, path: Path | None, mac: Callable[[bytes], bytes]) -> None:
        self.path = path
        self._mac = mac
        self._lock = threading.Lock()
        self._seen: Mark | None = None
        self._written: Mark | None = None

    # --- file ---------------------------------------------------------------------------
    def _tag(self, mark: Mark) -> str:
        return self._mac(canonical_json(mark.body())).hex()

    def read(self) -> Mark | None:
        """The mark on disk (None: none yet); :class:`StoreError` if it was altered."""
        if self.path is None or not self.path.exists():
            return None
        try:
            raw = self.path.read_bytes()[:_MAX_BYTES]
            doc = json.loads(raw)
            mark = Mark(str(doc["db_id"]), int(doc["state_seq"]), int(doc["audit_seq"]),
                        int(doc.get("recoveries", 0)))
            ok = doc.get("format") == FORMAT and isinstance(doc.get("mac"), str)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreError(
                f"the high-water mark {self.path} is unreadable ({type(e).__name__}); restore "
                f"it from a backup of this data dir, or {RECOVER_HINT}") from None
        if not ok or not hmac.compare_digest(self._tag(mark), str(doc["mac"])):
            raise StoreError(
                f"the high-water mark {self.path} fails its MAC (edited, or written under "
                f"another KEK); restore it, or {RECOVER_HINT}")
        return mark

    @contextmanager
    def _locked(self) -> Iterator[None]:
        assert self.path is not None
        fd = os.open(str(self.path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, mark: Mark) -> None:
        assert self.path is not None
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = json.dumps({**mark.body(), "mac": self._tag(mark)}, sort_keys=True).encode()
        fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(str(self.path.parent), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # --- use ----------------------------------------------------------------------------
    def load(self) -> Mark | None:
        """Read the file into this process's memory (at start); returns the mark."""
        with self._lock:
            self._seen = _newest(self._seen, self.read())
            return self._seen

    def seen(self) -> Mark | None:
        """The newest mark known to this process."""
        with self._lock:
            return self._seen

    def check(self, db_id: str, state_seq: int, audit_seq: int, *,
              seen: Mark | Literal["now"] | None = "now") -> None:
        """Refuse a database that is not the one seen, or is behind what was seen (memory
        only: :meth:`load` reads the file at start, :meth:`raise_to` keeps both in step; the
        file is read again only before refusing, in case ``recover`` reset it meanwhile).

        ``seen``: the mark taken with :meth:`seen` *before* the row was read, for a row read
        without the server-state lock; a batch committing in between may note a newer mark,
        which such a row need not reach (the default compares with the mark now, right for a
        row read under the lock, when nothing can commit past it)."""
        mark = self.seen() if seen == "now" else seen
        try:
            self._check(mark, db_id, state_seq, audit_seq)
        except StateRollbackError:
            if not self._adopt_recovery():
                raise
            self._check(self.seen(), db_id, state_seq, audit_seq)

    def _adopt_recovery(self) -> bool:
        """Take the file's mark if ``recover`` reset it after this process read it."""
        with self._lock:
            disk = self.read()
            if disk is None or self._seen is None or disk.recoveries <= self._seen.recoveries:
                return False
            self._seen = self._written = disk
            return True

    @staticmethod
    def _check(mark: Mark | None, db_id: str, state_seq: int, audit_seq: int) -> None:
        if mark is None:
            return
        if mark.db_id != db_id:
            raise StateRollbackError(
                f"this server has seen database {mark.db_id}, but the configured database is "
                f"{db_id}: it was replaced; point the server at its own database, or "
                f"{RECOVER_HINT}")
        if state_seq < mark.state_seq or audit_seq < mark.audit_seq:
            raise StateRollbackError(
                f"the database is older than this server has seen (state {state_seq} < "
                f"{mark.state_seq} or audit {audit_seq} < {mark.audit_seq}): it was restored "
                f"from a backup or rolled back; {RECOVER_HINT}")

    def note(self, db_id: str, state_seq: int, audit_seq: int) -> None:
        """Remember newer state in memory (cheap; the release path calls it per batch)."""
        with self._lock:
            r = self._seen.recoveries if self._seen is not None else 0
            self._seen = _newest(self._seen, Mark(db_id, state_seq, audit_seq, r))

    def persist(self) -> None:
        """Write what memory holds to the file, if it is newer (never lowers the file; durable
        before it returns)."""
        with self._lock:
            mark = self._seen
            if self.path is None or mark is None or mark == self._written:
                return
            with self._locked():
                disk = self.read()
                if disk is not None and disk.db_id == mark.db_id:
                    mark = _newest(mark, disk)
                    assert mark is not None
                if mark != disk:
                    self._write(mark)
                self._seen = self._written = mark

    def raise_to(self, db_id: str, state_seq: int, audit_seq: int) -> None:
        """:meth:`note` then :meth:`persist` (admin changes, recovery, start-up)."""
        self.note(db_id, state_seq, audit_seq)
        self.persist()

    def reset(self, mark: Mark) -> None:
        """Set the mark exactly (``dkeyserver recover`` only)."""
        with self._lock:
            if self.path is not None:
                with self._locked():
                    self._write(mark)
            self._seen = self._written = mark


def _newest(a: Mark | None, b: Mark | None) -> Mark | None:
    """The later of two marks of one database (a newer recovery wins outright); of two
    databases, ``b`` (the file at load, the database actually in use when noting)."""
    if a is None or b is None:
        return a or b
    if a.db_id != b.db_id or a.recoveries != b.recoveries:
        return b if a.db_id != b.db_id or b.recoveries > a.recoveries else a
    return Mark(a.db_id, max(a.state_seq, b.state_seq), max(a.audit_seq, b.audit_seq),
                a.recoveries)
