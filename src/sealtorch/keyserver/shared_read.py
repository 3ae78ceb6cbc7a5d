"""One read of the authoritative state shared by the status polls waiting for it.

A status poll must be answered from state read *after* the poll arrived: a revocation that
any replica committed before the poll is in its answer. Under load many polls arrive while a
read is in flight. None of them may use that read (it may have begun before they arrived), so
each waits for the next one, which begins only after all of them arrived: one database round
trip and one thread hop serve them all, with the freshness of a read of their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedRead(Generic[T]):
    """Coalesces concurrent calls of a blocking read on one event loop (see the module
    docstring). ``run`` runs the read off the loop (e.g. ``asyncio.to_thread``)."""

    def __init__(self, read: Callable[[], T],
                 run: Callable[[Callable[[], T]], Awaitable[T]]) -> None:
        self._read = read
        self._run = run
        self._next: asyncio.Future[T] | None = None  # the read not begun yet, and its waiters
        self._reader: asyncio.Task[None] | None = None
        self.reads = 0  # reads begun

    async def get(self) -> T:
        """The result of a read that began after this call; a failed read raises its error
        to every call that waited for it."""
        loop = asyncio.get_running_loop()
        fut = self._next
        if fut is None:
            fut = self._next = loop.create_future()
        if self._reader is None:
            self._reader = loop.create_task(self._reads())
        # a caller that goes away (client disconnected) must not cancel the others' read
        return await asyncio.shield(fut)

    async def _reads(self) -> None:
        try:
            while (fut := self._next) is not None:
                self._next = None  # callers from now on wait for the next read
                self.reads += 1
                try:
                    result = await self._run(self._read)
                except asyncio.CancelledError:
                    fut.cancel()
                    raise
                except Exception as e:  # handed to every waiter of this read
                    fut.set_exception(e)
                    fut.exception()  # retrieved here: no warning if every waiter went away
                else:
                    fut.set_result(result)
        finally:
            self._reader = None
            if self._next is not None:  # cancelled (shutdown) with callers still waiting
                self._next.cancel()
                self._next = None


__all__ = ["SharedRead"]
