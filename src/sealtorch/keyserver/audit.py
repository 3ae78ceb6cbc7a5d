"""The hash chain of the audit log: how an entry is hashed and how a chain is verified."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Any

from sealtorch.protocol.canonical import canonical_json

GENESIS = "00" * 32
ENTRY_FIELDS = ("seq", "ts", "tenant", "actor", "action", "model_id", "cache_id", "decision",
                "code", "details", "prev_hash")


def entry_hash(entry: dict[str, Any]) -> str:
    """Hex SHA-256 over the domain tag and the canonical JSON of the entry's fields."""
    body = {k: entry[k] for k in ENTRY_FIELDS}
    return hashlib.sha256(b"sealtorch-audit/v1\x00" + canonical_json(body)).hexdigest()


def verify_chain(
    rows: Iterable[dict[str, Any]], *, head_seq: int | None = None, head_hash: str | None = None
) -> list[str]:
    """Return a list of problems (empty if the chain is intact).

    Names every edited row (hash mismatch), broken link (deleted/reordered row) and sequence gap;
    with a signed head, also a truncated tail or a head that is not in the chain.
    """
    problems: list[str] = []
    prev = GENESIS
    expected_seq = 1
    seen_head = False
    for r in rows:
        if r["seq"] != expected_seq:
            problems.append(
                f"seq {r['seq']}: expected seq {expected_seq} (row deleted or reordered)"
            )
        if not hmac.compare_digest(r["prev_hash"], prev):
            problems.append(f"seq {r['seq']}: prev_hash does not link to the previous row")
        if not hmac.compare_digest(entry_hash(r), r["hash"]):
            problems.append(f"seq {r['seq']}: content does not match its hash (row edited)")
        if head_seq is not None and r["seq"] == head_seq:
            seen_head = True
            if head_hash is not None and not hmac.compare_digest(r["hash"], head_hash):
                problems.append(f"seq {r['seq']}: differs from the signed head")
        prev = r["hash"]
        expected_seq = r["seq"] + 1
    if head_seq is not None and not seen_head:
        problems.append(
            f"signed head seq {head_seq} is missing: the log was truncated (last seq "
            f"{expected_seq - 1})"
        )
    return problems
