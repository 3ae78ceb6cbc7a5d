"""Integrity of the authoritative rows: what each row's MAC covers, how rows are written and
read back, and the digest that seals the whole set.

A row's MAC is HMAC-SHA256 under the row-MAC key (``keyring.py``) over the table name, the
primary key, every content column and ``row_seq``, canonically encoded: a row cannot be edited,
moved to another key, or made up without the KEK. A row restored from an older copy still has a
valid MAC; what catches it is the *state digest* (SHA-256 over every valid row's table, key and
MAC), which each admin change recomputes and seals into ``server_state`` under the same key,
together with the state sequence that ``watermark.py`` keeps outside the database.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, and_, delete, insert, select, update
from sqlalchemy.engine import Connection

from sealtorch.keyserver import schema
from sealtorch.keyserver.keyring import Keyring
from sealtorch.protocol.canonical import canonical_json

_ROW_TAG = b"sealtorch-row/v1\x00"
_DIGEST_TAG = b"sealtorch-state-digest/v1\x00"


def _norm(v: Any) -> Any:
    """A column value as canonical JSON can carry it, the same after a database round trip."""
    if isinstance(v, bytes | bytearray | memoryview):
        return "b:" + bytes(v).hex()
    if isinstance(v, bool):
        return int(v)
    return v


@dataclass(frozen=True)
class Spec:
    """One authoritative table: its primary key and the content columns its MAC covers."""

    table: Table
    pk: tuple[str, ...]
    content: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.table.name

    def key(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(values[c] for c in self.pk)

    def mac_input(self, values: Mapping[str, Any], row_seq: int) -> bytes:
        return _ROW_TAG + canonical_json([
            self.name, [_norm(values[c]) for c in self.pk],
            [_norm(values[c]) for c in self.content], int(row_seq)])

    def describe(self, values: Mapping[str, Any]) -> str:
        """How a log line names a row: table and primary key (never content)."""
        return f"{self.name}[{', '.join(str(values.get(c)) for c in self.pk)}]"


TENANTS = Spec(schema.tenants, ("name",), ("created",))
TOKENS = Spec(schema.tokens, ("token_id",), ("tenant", "token_hash", "expires", "revoked",
                                              "created"))
MODELS = Spec(schema.models, ("model_id",), ("tenant", "state", "created"))
KEY_VERSIONS = Spec(schema.key_versions, ("model_id", "key_version"),
                    ("wrapped", "state", "created"))
POLICIES = Spec(schema.policies, ("model_id",), ("version", "policy", "updated"))
APPROVALS = Spec(schema.cache_approvals, ("tenant", "cache_id"), ("state", "updated"))
SIM_PLATFORMS = Spec(schema.sim_platforms, ("key",), ("tenant", "created"))
EXPORTS = Spec(schema.key_exports, ("model_id", "key_version"), ("wrapped", "created"))

#: every table an authorization decision reads; a new one must be added here
AUTHORITATIVE: tuple[Spec, ...] = (TENANTS, TOKENS, MODELS, KEY_VERSIONS, POLICIES, APPROVALS,
                                   SIM_PLATFORMS, EXPORTS)


@dataclass(frozen=True)
class Loaded:
    """The rows of one table that passed their MAC, and the names of those that did not."""

    spec: Spec
    rows: tuple[dict[str, Any], ...]
    failed: tuple[str, ...]


def load(conn: Connection, spec: Spec, keyring: Keyring) -> Loaded:
    """Read every row of ``spec``'s table and check each MAC (constant time). A row that fails
    is left out (treated as absent) and named in ``failed`` for the tamper log."""
    ok: list[dict[str, Any]] = []
    bad: list[str] = []
    for r in conn.execute(select(spec.table)):
        values = dict(r._mapping)
        if keyring.row.check(spec.mac_input(values, values["row_seq"]), bytes(values["mac"])):
            ok.append(values)
        else:
            bad.append(spec.describe(values))
    return Loaded(spec, tuple(ok), tuple(bad))


def digest(loaded: Iterable[Loaded]) -> str:
    """Hex SHA-256 over every valid row's table, primary key and MAC, in a fixed order."""
    items = sorted(
        (lt.spec.name, canonical_json([_norm(v) for v in lt.spec.key(r)]).decode(),
         bytes(r["mac"]).hex())
        for lt in loaded for r in lt.rows)
    return hashlib.sha256(_DIGEST_TAG + canonical_json(items)).hexdigest()


def put(conn: Connection, spec: Spec, values: Mapping[str, Any], row_seq: int,
        keyring: Keyring) -> None:
    """Insert or replace one row, stamped with ``row_seq`` and its MAC."""
    full = {**values, "row_seq": row_seq,
            "mac": keyring.row(spec.mac_input(values, row_seq))}
    where = and_(*(spec.table.c[c] == values[c] for c in spec.pk))
    if not conn.execute(update(spec.table).where(where).values(**full)).rowcount:
        conn.execute(insert(spec.table).values(**full))


def remove(conn: Connection, spec: Spec, key: Mapping[str, Any]) -> int:
    """Delete one row by primary key; returns how many rows went."""
    where = and_(*(spec.table.c[c] == key[c] for c in spec.pk))
    return int(conn.execute(delete(spec.table).where(where)).rowcount)
