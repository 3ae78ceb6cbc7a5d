"""Operations plumbing: Prometheus metrics, JSON log lines and token-bucket rate limits."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from contextvars import ContextVar
from typing import ParamSpec, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()
RELEASES = Counter("dkeyserver_releases_total", "Keys released (grants issued, per model)",
                   registry=REGISTRY)
DENIALS = Counter("dkeyserver_denials_total", "Denials by public code", ["code"],
                  registry=REGISTRY)
REQUESTS = Counter("dkeyserver_requests_total", "HTTP requests by route and status",
                   ["route", "status"], registry=REGISTRY)
LATENCY = Histogram("dkeyserver_request_seconds", "Request latency by route", ["route"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                    registry=REGISTRY)
COMMIT_BATCH = Histogram("dkeyserver_commit_batch_size",
                         "Write operations committed together by the group-commit writer",
                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=REGISTRY)
COMMIT_SECONDS = Histogram("dkeyserver_commit_seconds",
                           "Duration of one group-commit transaction (statements + COMMIT)",
                           buckets=(0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064,
                                    0.128, 0.256), registry=REGISTRY)
AUDIT_SEQ = Gauge("dkeyserver_audit_seq", "Last audit sequence number", registry=REGISTRY)
CRYPTO_CPU = Counter("dkeyserver_crypto_cpu_seconds",
                     "Thread CPU seconds spent in crypto operations, by operation and by the "
                     "release-listener route that needed them (other: admin and start-up)",
                     ["op", "route"], registry=REGISTRY)
#: the crypto operations counted by :func:`crypto`: evidence verification, HPKE seals, the
#: check of a release's X25519 key (not low-order: one key agreement), Ed25519-signed
#: documents (with their canonical encoding), HMAC-SHA256 tags
CRYPTO_OPS = ("verify_evidence", "hpke_seal", "hpke_key_check", "sign", "hmac")
#: where crypto is counted: the release listener's routes, the group-commit writer (the
#: batches of nonce burns and release decisions), and everything else
CRYPTO_ROUTES = ("challenge", "release", "status", "writer", "other")
#: every series, made at import (a scrape sees them all from the start, and counting one is
#: a dict lookup, not a ``labels()`` call)
_CRYPTO_SERIES = {(op, route): CRYPTO_CPU.labels(op, route)
                  for op in CRYPTO_OPS for route in CRYPTO_ROUTES}
_ROUTE: ContextVar[str] = ContextVar("dkeyserver_route", default="other")
P = ParamSpec("P")
R = TypeVar("R")


def set_route(route: str) -> None:
    """Name the route whose crypto this context counts (a context variable: it follows a
    request into its worker threads; the group-commit writer thread names its own)."""
    _ROUTE.set(route if route in CRYPTO_ROUTES else "other")


def crypto(op: str, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Call ``fn`` and count the calling thread's CPU time in it as crypto ``op`` (one of
    :data:`CRYPTO_OPS`): CPU spent serving, measured where it is spent, so that it compares
    like for like with the process's CPU. Counted calls never nest."""
    t0 = time.thread_time()
    try:
        return fn(*args, **kwargs)
    finally:
        spent = time.thread_time() - t0  # before the series lookup, which is not crypto
        _CRYPTO_SERIES[op, _ROUTE.get()].inc(spent)


_LOG_ENCODER = json.JSONEncoder(sort_keys=True)  # = json.dumps(sort_keys=True), built once


class JsonFormatter(logging.Formatter):
    """One JSON object per line; messages are ours (never request input or key material)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            out.update(extra)
        if record.exc_info and record.exc_info[1] is not None:
            # the exception's type and where it was raised (its message could quote input
            # or statement parameters, so it is left out)
            exc = record.exc_info[1]
            out["exc_type"] = type(exc).__name__
            frames = traceback.extract_tb(exc.__traceback__)
            if frames:
                f = frames[-1]
                out["exc_where"] = f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}"
        return _LOG_ENCODER.encode(out)


def setup_logging(level: int = logging.INFO) -> None:
    """JSON lines on stderr for the whole process (a server: the process is ours). The log
    lines carry none of the caller's file, line, thread or process, so they are not looked up
    per record (the logging HOWTO's "Optimization": a stack walk per release otherwise)."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


class RateLimiter:
    """Token buckets per key (client address or token id): ``rate`` per second, burst 2x.

    At most ``max_keys`` buckets are kept; when a new key arrives at the limit, the least
    recently seen one is evicted (never all at once, so a flood of new addresses cannot reset
    everyone's bucket). An evicted key starts again with a full burst, which is the cost of a
    hard memory bound. (The ``limits`` package was considered: its memory storage bounds keys
    by expiry, not by count.)"""

    def __init__(self, rate: float, max_keys: int = 10000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(1.0, rate * 2)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_keys
        self._clock = clock

    def allow(self, key: str) -> bool:
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if len(self._buckets) >= self._max:
                self._buckets.popitem(last=False)  # the least recently seen key
            allowed = tokens >= 1
            self._buckets[key] = (tokens - 1 if allowed else tokens, now)
            return allowed

    def __len__(self) -> int:
        return len(self._buckets)
