"""The results table counts what each test observed, failures included."""

from __future__ import annotations

import json

from . import report
from .conftest import _results, failure_row, record


def test_a_failed_attack_test_is_counted_as_not_refused() -> None:
    rows = [
        {"kind": "attack", "name": "mitm:a", "refused": True, "code": "grant_invalid"},
        {"kind": "attack", **{k: v for k, v in failure_row(
            "test_attacks", "test_mitm", "Failed: DID NOT RAISE <class 'GrantError'>").items()
            if k != "kind"}},
        {"kind": "fault", **{k: v for k, v in failure_row(
            "test_faults", "test_clock_jump", "assert 3 == 0").items() if k != "kind"}},
        failure_row("test_load", "test_keyserver_load", "error rate 5%"),
    ]
    table = report.table(rows)
    assert "| attacks tried / refused | 2 / 1 (2 attack kinds); NOT refused: test_mitm |" in table
    assert "| faults survived | 0 / 1: test_clock_jump |" in table
    assert "| other checks FAILED | 1: test_load::test_keyserver_load |" in table
    details = report.details(rows)
    assert "| attack | test_mitm | NOT refused (`not_refused`) |" in details
    assert "DID NOT RAISE" in rows[1]["observed"]


def test_results_go_to_this_sessions_own_file() -> None:
    path = _results[0]
    before = path.read_text().splitlines()
    record("selfcheck", name="recorder")  # a kind the table ignores
    lines = path.read_text().splitlines()
    assert lines[:-1] == before
    assert json.loads(lines[-1]) == {"kind": "selfcheck", "name": "recorder"}
