"""``dkeyserver recover``: the one, audited way back to service after the database was
restored from a backup, rolled back, or edited without the KEK.

:func:`inspect` says what is wrong without changing anything. :func:`recover` accepts the
database as it now is (optionally dropping rows that fail their MAC), seals it under a state
sequence above everything this server has seen, bumps the revocation epoch (every cache checks
its leases at its next poll), records what it accepted in the audit log, and resets this data
dir's high-water mark. Edited audit entries stay as they are: ``audit verify`` keeps naming them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sealtorch.errors import StoreError
from sealtorch.keyserver import queries, rows
from sealtorch.keyserver.admin import verify_audit
from sealtorch.keyserver.state import read_server_state, write_server_state
from sealtorch.keyserver.store import Store
from sealtorch.keyserver.watermark import Mark


@dataclass(frozen=True)
class Report:
    """What ``recover`` would accept."""

    db_id: str
    state_seq: int
    audit_seq: int
    server_state_ok: bool
    invalid_rows: tuple[str, ...]
    digest_ok: bool
    mark: Mark | None
    audit_problems: tuple[str, ...]

    @property
    def healthy(self) -> bool:
        m = self.mark
        behind = m is not None and (m.db_id != self.db_id or self.state_seq < m.state_seq
                                    or self.audit_seq < m.audit_seq)
        return (self.server_state_ok and not self.invalid_rows and self.digest_ok
                and not behind and not self.audit_problems)

    def to_dict(self) -> dict[str, Any]:
        m = self.mark
        return {"healthy": self.healthy, "db_id": self.db_id, "state_seq": self.state_seq,
                "audit_seq": self.audit_seq, "server_state_mac_ok": self.server_state_ok,
                "invalid_rows": list(self.invalid_rows), "digest_ok": self.digest_ok,
                "high_water_mark": None if m is None else {
                    "db_id": m.db_id, "state_seq": m.state_seq, "audit_seq": m.audit_seq},
                "audit_problems": list(self.audit_problems)}


def inspect(store: Store) -> Report:
    """Check everything ``dkeyserver serve`` checks, and say what fails (changes nothing)."""
    with store.db.read() as conn:
        row = read_server_state(store.db, conn)
        loaded = [rows.load(conn, spec, store.keyring) for spec in rows.AUTHORITATIVE]
    problems, _ = verify_audit(store, None)
    return Report(
        db_id=row.db_id, state_seq=row.state_seq, audit_seq=row.audit_seq,
        server_state_ok=store.keyring.row.check(row.mac_input(), row.mac),
        invalid_rows=tuple(n for lt in loaded for n in lt.failed),
        digest_ok=rows.digest(loaded) == row.state_digest,
        mark=store.watermark.seen(),
        audit_problems=tuple(p for p in problems if not p.startswith("truncated: this server")))


def recover(store: Store, *, reason: str, drop_invalid_rows: bool = False,
            reseal_server_state: bool = False) -> dict[str, Any]:
    """Accept the database as it is (see the module docstring); returns what was done."""
    before = inspect(store)
    if not before.server_state_ok and not reseal_server_state:
        raise StoreError(
            "the server_state row fails its MAC: its revocation epoch, state sequence or audit "
            "settings were edited without the KEK; restore that row from a backup, or run "
            "recover again with --reseal-server-state to accept it as it is")
    now = store.now()
    dropped: list[str] = []
    with store.db.tx() as conn:
        row = read_server_state(store.db, conn, lock=True)
        for spec in rows.AUTHORITATIVE:
            lt = rows.load(conn, spec, store.keyring)
            if lt.failed and not drop_invalid_rows:
                raise StoreError(
                    f"{len(lt.failed)} row(s) of {spec.name} fail their MAC ("
                    f"{', '.join(lt.failed[:5])}); they were forged or edited without the KEK: "
                    "look at them, then run recover again with --drop-invalid-rows")
            if lt.failed:
                valid = {spec.describe(r) for r in lt.rows}
                for r in conn.execute(spec.table.select()):
                    values = dict(r._mapping)
                    if spec.describe(values) not in valid:
                        rows.remove(conn, spec, values)
                        dropped.append(spec.describe(values))
        mark = store.watermark.seen()
        seq = max(row.state_seq, mark.state_seq if mark is not None else 0) + 1
        loaded = [rows.load(conn, spec, store.keyring) for spec in rows.AUTHORITATIVE]
        head = queries.append_audit(
            store.db, conn, store.keyring, row.audit, row.audit_keyed_from, now,
            actor="local:recover", action="recover", decision="admin", code="ok",
            details={"reason": reason[:500], "accepted_state_seq": row.state_seq,
                     "new_state_seq": seq, "dropped_rows": dropped,
                     "seen": before.to_dict()["high_water_mark"],
                     "audit_problems": list(before.audit_problems)[:50]})
        new = replace(row, state_seq=seq, revocation_epoch=row.revocation_epoch + 1,
                      state_digest=rows.digest(loaded), audit_seq=head.seq,
                      audit_head=head.hash).sealed(store.keyring)
        write_server_state(store.db, conn, new)
    store.watermark.reset(Mark(new.db_id, new.state_seq, new.audit_seq,
                               (mark.recoveries if mark is not None else 0) + 1))
    store.states.forget()
    return {"recovered": True, "state_seq": new.state_seq, "audit_seq": new.audit_seq,
            "dropped_rows": dropped, "before": before.to_dict()}
