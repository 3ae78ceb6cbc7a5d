"""The server's replay guard for end-to-end requests: a time window plus a bounded memory.

Each request carries a random 16-byte nonce and the client's time in milliseconds, both inside
the encryption. The guard accepts a request once: when its time lies within ``window_ms`` of the
server's clock and its nonce is not remembered. Memory is bounded: a nonce is forgotten when its
time leaves the window, or (oldest first) when ``capacity`` is reached; forgetting raises a
*floor*, and a request whose time is not above the floor is refused. So a request can never be
accepted twice, whatever the server's clock does (the host controls it): the clock only decides
how long an honest request stays acceptable. A restarted server has a new HPKE key, so requests
to an earlier process do not open at all.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable

from sealtorch.errors import ReplayError

DEFAULT_WINDOW_MS = 120_000
DEFAULT_CAPACITY = 200_000


class ReplayGuard:
    """Accept each (nonce, time) once; see the module docstring. ``clock`` returns unix seconds."""

    def __init__(self, *, window_ms: int = DEFAULT_WINDOW_MS, capacity: int = DEFAULT_CAPACITY,
                 clock: Callable[[], float] = time.time) -> None:
        if window_ms <= 0 or capacity <= 0:
            raise ValueError("replay window and capacity must be positive")
        self.window_ms = int(window_ms)
        self.capacity = int(capacity)
        self._clock = clock
        self._seen: set[bytes] = set()
        self._heap: list[tuple[int, bytes]] = []
        self._floor = -1
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    @property
    def floor_ms(self) -> int:
        """Requests at or below this time are refused (-1: nothing forgotten yet)."""
        return self._floor

    def _forget_through(self, t: int) -> None:
        """Forget every nonce with time <= ``t`` and raise the floor to ``t``."""
        self._floor = max(self._floor, t)
        while self._heap and self._heap[0][0] <= self._floor:
            _, n = heapq.heappop(self._heap)
            self._seen.discard(n)

    def check(self, nonce: bytes, timestamp_ms: int) -> None:
        """Record the request or raise :class:`ReplayError` saying why it is refused."""
        now = int(self._clock() * 1000)
        with self._lock:
            if self._heap and self._heap[0][0] < now - self.window_ms:
                self._forget_through(now - self.window_ms - 1)
            if timestamp_ms > now + self.window_ms:
                raise ReplayError("the request's time is ahead of the server's clock by more "
                                  "than the replay window; check the client's clock")
            if timestamp_ms < now - self.window_ms:
                raise ReplayError("the request is older than the replay window (or the "
                                  "client's clock is behind); send a new request")
            if timestamp_ms <= self._floor:
                raise ReplayError("the request is older than requests the server no longer "
                                  "remembers, so it could be a replay; send a new request")
            if nonce in self._seen:
                raise ReplayError("this request was already received (a replay); refusing it")
            if len(self._seen) >= self.capacity:
                self._forget_through(self._heap[0][0])
                if timestamp_ms <= self._floor:
                    raise ReplayError("the server's replay memory is full and this request is "
                                      "among the oldest; send a new request")
            self._seen.add(nonce)
            heapq.heappush(self._heap, (timestamp_ms, nonce))
