"""Group commit: one writer thread runs the write operations of concurrent requests in one
transaction per batch, and answers each only after that transaction has committed.

Each batch also carries a :class:`BatchState`: the server-state row, read (and on PostgreSQL
row-locked) once per batch, and the audit head it extends, written back once before COMMIT.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.engine import Connection

from sealtorch.errors import StoreError
from sealtorch.keyserver import ops
from sealtorch.keyserver.db import Database, DatabaseUnavailableError

if TYPE_CHECKING:
    from sealtorch.keyserver.audit import Head
    from sealtorch.keyserver.state import ServerStateRow

T = TypeVar("T")
log = logging.getLogger("sealtorch.keyserver")

#: key in ``Connection.info`` under which a group-commit batch keeps its per-batch state
_BATCH = "sealtorch_batch"


class BatchState:
    """What one group-commit transaction caches: the server-state row (read once, under the
    row lock), the audit head it is extending, the audit rows it appended and the caches it
    enrolled (all written once, just before COMMIT), and the writes to remember once it has
    committed."""

    __slots__ = ("audit", "audit_rows", "caches", "seen", "server")

    def __init__(self) -> None:
        self.server: ServerStateRow | None = None
        self.audit: Head | None = None
        self.audit_rows: list[tuple[Any, ...]] = []
        self.caches: list[tuple[Any, ...]] = []
        self.seen: list[tuple[str, str]] = []


def batch_of(conn: Connection) -> BatchState | None:
    """The batch state of a group-commit transaction (None outside one)."""
    state: BatchState | None = conn.info.get(_BATCH)
    return state


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

    def __init__(self, db: Database, *, before_commit: Callable[[Connection, BatchState], None],
                 committed: Callable[[BatchState], None],
                 idle: Callable[[], None] | None = None) -> None:
        self._db = db
        self._before_commit = before_commit
        self._committed = committed
        self._idle = idle
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
        ops.set_route("writer")  # the batches' crypto (state and audit MACs) is counted apart
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
            if self._idle is not None:  # off the answer path: waiters are awake
                try:
                    self._idle()
                except Exception:  # the writer must keep running
                    log.exception("writer idle hook failed")
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
        if (self._conn is not None and not self._db.is_sqlite
                and now - self._last_used > self.IDLE_PING_SECONDS):
            try:
                self._conn.exec_driver_sql("SELECT 1")
                self._conn.rollback()
            except Exception:
                self._drop_connection()
        self._last_used = now
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            with self._db.errors():
                self._conn = self._db.engine.connect()
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
        with self._db.tx_on(self._connection()) as conn:
            state = BatchState()
            conn.info[_BATCH] = state
            try:
                results = [op(conn) for op, _, _ in ops]
                self._before_commit(conn, state)
            finally:
                conn.info.pop(_BATCH, None)
        self._committed(state)
        return results

    def _run_batch(self, batch: list[_Item]) -> None:

        live = [it for it in batch if it[1].set_running_or_notify_cancel()]
        if not live:
            return
        started = time.perf_counter()
        try:
            results = self._transaction(live)
            ops.COMMIT_BATCH.observe(len(live))
            ops.COMMIT_SECONDS.observe(time.perf_counter() - started)
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
