"""SharedRead: status polls share a state read, and none is answered from a read that began
before it arrived (a revocation committed before a poll is always in its answer)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from sealtorch.keyserver.shared_read import SharedRead


class _Db:
    """A 'database' whose state a test changes, and whose reads wait for the test."""

    def __init__(self) -> None:
        self.state = 0
        self.gates: list[asyncio.Event] = []
        self.fail: Exception | None = None

    def read(self) -> int:
        if self.fail is not None:
            raise self.fail
        return self.state

    async def run(self, read: Callable[[], int]) -> int:
        seen = read()  # what the database holds when the read begins ...
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()  # ... is answered when the test opens the gate
        return seen


async def _until(cond: Callable[[], bool]) -> None:
    while not cond():
        await asyncio.sleep(0)


async def _answer(db: _Db, n: int) -> None:
    """Wait until read ``n`` (counted from 1) has begun, then let it answer."""
    await _until(lambda: len(db.gates) == n)
    db.gates[n - 1].set()


def test_polls_arriving_during_a_read_share_the_next_one() -> None:
    async def main() -> None:
        db = _Db()
        sr = SharedRead(db.read, db.run)
        first = asyncio.create_task(sr.get())
        await _until(lambda: len(db.gates) == 1)  # read 1 has begun
        db.state = 1  # a revocation commits while read 1 is in flight ...
        later = [asyncio.create_task(sr.get()) for _ in range(5)]  # ... then 5 polls arrive
        db.gates[0].set()
        assert await first == 0  # read 1 may not have seen the change: only for its caller
        await _answer(db, 2)
        assert await asyncio.gather(*later) == [1] * 5  # one read, after all of them arrived
        assert sr.reads == 2
        db.state = 2
        nxt = asyncio.create_task(sr.get())  # nothing in flight: a read of its own
        await _answer(db, 3)
        assert await nxt == 2 and sr.reads == 3

    asyncio.run(main())


def test_a_failed_read_fails_its_waiters_only() -> None:
    async def main() -> None:
        db = _Db()
        sr = SharedRead(db.read, db.run)
        db.fail = RuntimeError("database gone")
        waiters = [asyncio.create_task(sr.get()) for _ in range(3)]
        for w in waiters:
            with pytest.raises(RuntimeError, match="database gone"):
                await w
        db.fail = None
        db.state = 7
        again = asyncio.create_task(sr.get())
        await _answer(db, 1)
        assert await again == 7 and sr.reads == 2

    asyncio.run(main())


def test_a_caller_that_goes_away_does_not_cancel_the_others_read() -> None:
    async def main() -> None:
        db = _Db()
        sr = SharedRead(db.read, db.run)
        db.state = 3
        gone, stays = asyncio.create_task(sr.get()), asyncio.create_task(sr.get())
        await _until(lambda: len(db.gates) == 1)
        gone.cancel()  # while the read is in flight
        await asyncio.sleep(0)
        db.gates[0].set()
        assert await stays == 3
        assert gone.cancelled()

    asyncio.run(main())
