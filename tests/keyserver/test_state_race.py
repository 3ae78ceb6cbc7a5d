"""A reader of the verified state races the group-commit writer: the writer commits audit
entries (releases) and notes the newer audit sequence between the reader's unlocked read of
the server-state row and its high-water-mark check. That is not a rollback and must not be
refused as one (it was, under load: 503 state_rollback)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sealtorch.keyserver import state as state_mod
from sealtorch.keyserver.bootstrap import init_data_dir, open_store
from sealtorch.keyserver.store import Store


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    db = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    with pytest.warns(RuntimeWarning):
        cfg = init_data_dir(tmp_path / "ks", sim=True, db=db)
    s, _ = open_store(cfg)
    try:
        yield s
    finally:
        s.close()


def _release_batch(store: Store) -> int:
    """What a release does to the audit chain, committed by the group-commit writer."""
    def op(conn: Any) -> int:
        return store.append_audit(conn, actor="cache:test", action="release", decision="deny",
                                  code="denied", details={}).seq

    return store.committer().run(op)


def test_a_batch_committing_between_read_and_check_is_not_a_rollback(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store.state()
    before = store.audit_head().seq
    real = state_mod.read_server_state_now
    raced: list[int] = []

    def racing(db: Any) -> Any:  # the unlocked read of a reader outside any transaction
        row = real(db)
        if not raced:
            raced.append(_release_batch(store))  # commits, then notes the newer mark
        return row

    monkeypatch.setattr(state_mod, "read_server_state_now", racing)
    st = store.state()  # the row read is one audit entry behind what the process has noted
    assert raced == [before + 1] and store.watermark.seen().audit_seq == before + 1
    assert st.seq == store.state().seq
    assert store.audit_head().seq == before + 1


def test_a_row_older_than_the_mark_taken_before_the_read_is_still_refused(
        store: Store) -> None:
    from sealtorch.errors import StateRollbackError

    store.state()
    seen = store.watermark.seen()
    assert seen is not None
    with pytest.raises(StateRollbackError, match="older than this server has seen"):
        store.watermark.check(seen.db_id, seen.state_seq, seen.audit_seq - 1, seen=seen)
