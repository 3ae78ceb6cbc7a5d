"""A record of every local decision: one structured JSON log line each, plus a bounded ring.

dkeyserver audits remote releases; the cache's local decisions (which runtime got a file key,
which was refused and why) would otherwise leave no trace. Each ``connect``/``session``/
``file_key`` outcome is logged as one JSON object on the ``sealtorch.keycache.decisions`` logger
and kept in a ring of the most recent ones for ``dkeycache status``. Entries carry the decision,
public code, model id, key version, the runtime's identity claims and the refusal reasons —
never key material, headers, evidence bytes or unvalidated request fields.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

DECISION_LOGGER = "sealtorch.keycache.decisions"
RING_SIZE = 100
MAX_REASONS = 16
MAX_REASON_LEN = 300
#: bytes of recent decisions in a status answer (a local frame is at most 64 KiB)
STATUS_BUDGET = 24 * 1024

log = logging.getLogger(DECISION_LOGGER)

#: identity claims worth recording, per TEE type (public measurements, never report data)
_IDENTITY_FIELDS: dict[str, tuple[str, ...]] = {
    "sgx": ("mrenclave", "mrsigner", "isv_prod_id", "isv_svn", "debug", "tcb_status"),
    "tdx": ("mrtd", "rtmr0", "rtmr1", "rtmr2", "tee_tcb_svn", "debug", "tcb_status"),
    "snp": ("measurement", "host_data", "product", "vmpl", "debug"),
    "sim": ("measurement", "platform_key", "role", "debug"),
}


def runtime_identity(claims: Any) -> dict[str, Any] | None:
    """The identity part of verified claims, JSON-safe (bytes as hex); ``None`` without claims."""
    if claims is None:
        return None
    tee = getattr(claims, "tee", None)
    out: dict[str, Any] = {"tee": tee}
    for name in _IDENTITY_FIELDS.get(str(tee), ()):
        v = getattr(claims, name, None)
        if v is None:
            continue
        out[name] = v.hex() if isinstance(v, bytes) else v
    return out


@dataclass
class DecisionContext:
    """What one request established so far; filled in by the operation as it validates input."""

    op: str
    peer: dict[str, Any]
    runtime: dict[str, Any] | None = None
    model_id: str | None = None
    key_version: int | None = None
    reasons: list[str] = field(default_factory=list)


class DecisionLog:
    """Logs each local decision as JSON and keeps the last ``size`` of them in memory."""

    def __init__(self, size: int = RING_SIZE) -> None:
        self._ring: deque[dict[str, Any]] = deque(maxlen=size)
        self._lock = threading.Lock()
        self.allowed = 0
        self.denied = 0

    def record(self, ctx: DecisionContext, *, allowed: bool, code: str | None) -> dict[str, Any]:
        """Record one decision (``code`` is the public denial code, ``None`` when allowed)."""
        entry: dict[str, Any] = {
            "event": "local_decision",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "op": ctx.op,
            "decision": "allow" if allowed else "deny",
            "code": code,
            "model_id": ctx.model_id,
            "key_version": ctx.key_version,
            "runtime": ctx.runtime,
            "peer": ctx.peer,
            "reasons": [r[:MAX_REASON_LEN] for r in ctx.reasons[:MAX_REASONS]],
        }
        with self._lock:
            self._ring.append(entry)
            if allowed:
                self.allowed += 1
            else:
                self.denied += 1
        level = logging.INFO if allowed else logging.WARNING
        if log.isEnabledFor(level):
            log.log(level, "%s", json.dumps(entry, sort_keys=True, separators=(",", ":")))
        return entry

    def recent(self) -> list[dict[str, Any]]:
        """The most recent decisions, oldest first."""
        with self._lock:
            return [dict(e) for e in self._ring]

    def counts(self) -> dict[str, int]:
        """Decisions since start, by outcome (no identities, models or reasons)."""
        with self._lock:
            return {"allow": self.allowed, "deny": self.denied}

    def summary(self) -> dict[str, Any]:
        """Counts since start and the newest decisions that fit :data:`STATUS_BUDGET` bytes
        (what ``status`` shows: the answer must fit one local frame even after a flood of
        denials with long reasons); ``omitted`` says how many older ones were left out."""
        with self._lock:
            counts = {"allow": self.allowed, "deny": self.denied}
        entries = self.recent()
        kept: list[dict[str, Any]] = []
        used = 0
        for entry in reversed(entries):
            used += len(json.dumps(entry, sort_keys=True, separators=(",", ":")))
            if used > STATUS_BUDGET:
                break
            kept.append(entry)
        kept.reverse()
        return {"counts": counts, "recent": kept, "omitted": len(entries) - len(kept)}
