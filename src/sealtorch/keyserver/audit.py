"""The audit log: a chain of entries, each keyed to the one before it, and its verification.

Every entry's ``hash`` is HMAC-SHA256 under the audit key (derived from the KEK, see
``keyring.py``) over the entry's fields, its sequence number and the previous entry's ``hash``:
without the KEK nobody can edit, insert, reorder or re-chain entries. Deleting the newest
entries (truncation) is caught against a signed head held outside the database (every release
answer carries one; ``dkeyserver audit head`` prints one) and against the high-water mark.

Entries written before the chain was keyed (schema version 1) carry unkeyed SHA-256 hashes;
they verify as such, up to the first keyed entry, which names the legacy head it continues.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sealtorch.protocol.canonical import canonical_json

GENESIS = "00" * 32
ENTRY_FIELDS = ("seq", "ts", "tenant", "actor", "action", "model_id", "cache_id", "decision",
                "code", "details", "prev_hash")
_LEGACY_TAG = b"sealtorch-audit/v1\x00"
_KEYED_TAG = b"sealtorch-audit/v2\x00"

Mac = Callable[[bytes], bytes]


def _body(entry: dict[str, Any]) -> bytes:
    return canonical_json({k: entry[k] for k in ENTRY_FIELDS})


def legacy_hash(entry: dict[str, Any]) -> str:
    """Hex SHA-256 of a schema-1 entry (unkeyed)."""
    return hashlib.sha256(_LEGACY_TAG + _body(entry)).hexdigest()


def entry_mac(mac: Mac, entry: dict[str, Any]) -> str:
    """Hex HMAC of an entry under the audit key."""
    return mac(_KEYED_TAG + _body(entry)).hex()


def expected_hash(entry: dict[str, Any], mac: Mac, keyed_from: int) -> str:
    """What an entry's ``hash`` must be: keyed from ``keyed_from`` on, legacy before it."""
    return entry_mac(mac, entry) if entry["seq"] >= keyed_from else legacy_hash(entry)


@dataclass(frozen=True)
class Head:
    """The newest entry of the chain: its sequence number and hash."""

    seq: int
    hash: str


def verify_chain(rows: Iterable[dict[str, Any]], *, mac: Mac, keyed_from: int = 1,
                 head: Head | None = None) -> list[str]:
    """Every problem of the chain, each naming its entry and its kind (empty: intact).

    Kinds: ``edited`` (content does not match its MAC), ``reordered`` (an entry that is
    intact but sits at another place than the one it was written at), ``deleted`` (a gap),
    ``inserted`` (an entry that links to nothing), ``truncated`` (the signed ``head`` is
    missing or differs: newer entries were removed or rewritten).
    """
    entries = list(rows)
    by_hash = {str(r["hash"]): r for r in entries}
    problems: list[str] = []
    prev = GENESIS
    expected_seq = 1
    seen_head = False
    for r in entries:
        seq = int(r["seq"])
        if seq > expected_seq:
            problems.append(f"seq {expected_seq}-{seq - 1}: deleted (the chain skips them)")
        elif seq < expected_seq:
            problems.append(f"seq {seq}: reordered (appears after seq {expected_seq - 1})")
        intact = hmac.compare_digest(expected_hash(r, mac, keyed_from), str(r["hash"]))
        if not intact:
            moved = _original_seq(r, by_hash, mac, keyed_from)
            if moved is not None:
                problems.append(f"seq {seq}: reordered (written as seq {moved})")
            else:
                problems.append(f"seq {seq}: edited (content does not match its MAC)")
        elif not hmac.compare_digest(str(r["prev_hash"]), prev):
            if str(r["prev_hash"]) in by_hash or seq > expected_seq:
                pass  # a gap or a move, named above
            else:
                problems.append(f"seq {seq}: inserted (links to no entry of the chain)")
        if head is not None and seq == head.seq:
            seen_head = True
            if not hmac.compare_digest(str(r["hash"]), head.hash):
                problems.append(f"seq {seq}: truncated and rewritten (differs from the "
                                "signed head)")
        prev = str(r["hash"])
        expected_seq = max(expected_seq, seq + 1)
    if head is not None and head.seq > 0 and not seen_head:
        problems.append(f"truncated: the signed head at seq {head.seq} is missing (the log "
                        f"ends at seq {expected_seq - 1})")
    return problems


def _original_seq(r: dict[str, Any], by_hash: dict[str, dict[str, Any]], mac: Mac,
                  keyed_from: int) -> int | None:
    """If ``r`` is an intact entry moved to another seq, the seq it was written at: one after
    the entry its ``prev_hash`` names (or 1 after the genesis)."""
    before = by_hash.get(str(r["prev_hash"]))
    seq = 1 if str(r["prev_hash"]) == GENESIS else (
        int(before["seq"]) + 1 if before is not None else None)
    if seq is None or seq == int(r["seq"]):
        return None
    moved = {**r, "seq": seq}
    if hmac.compare_digest(expected_hash(moved, mac, keyed_from), str(r["hash"])):
        return seq
    return None


def new_entry(seq: int, prev: str, ts: int, *, actor: str, action: str, decision: str,
              code: str, tenant: str | None = None, model_id: str | None = None,
              cache_id: str | None = None, details: Any = None) -> dict[str, Any]:
    """The fields of entry ``seq`` (without its hash)."""
    return {"seq": seq, "ts": ts, "tenant": tenant, "actor": actor[:128], "action": action,
            "model_id": model_id, "cache_id": cache_id, "decision": decision, "code": code,
            "details": canonical_json(details if details is not None else {}).decode(),
            "prev_hash": prev}


def last_head(rows: Sequence[dict[str, Any]]) -> Head:
    return Head(int(rows[-1]["seq"]), str(rows[-1]["hash"])) if rows else Head(0, GENESIS)
