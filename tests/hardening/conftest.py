"""Shared fixtures of the hardening suite: a real dkeyserver with one sim cache and one model,
helpers to read its audit log, and a results recorder that docs/security.md's table is built from.

Long runs are behind ``SEALTORCH_LONG=1``; the defaults keep the whole folder within minutes.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from tests.keyserver.conftest import SimCache, softhsm_env  # noqa: F401 (fixtures)
from tests.servers import RunningKeyServer, sim_policy, start_keyserver

from sealtorch.attestation import sim

warnings.filterwarnings("ignore", category=RuntimeWarning)

LONG = os.environ.get("SEALTORCH_LONG") == "1"
MEAS = sim.measure("dkeycache")
MODEL = "hard-m1"
RESULTS_ENV = "SEALTORCH_HARDENING_RESULTS"
#: this session's results file (set by the ``_results_file`` fixture): a fresh file per run
_results: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def _results_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh results file for this test session: ``$SEALTORCH_HARDENING_RESULTS`` (truncated
    now) or ``hardening-results.jsonl`` in pytest's own base temp directory."""
    env = os.environ.get(RESULTS_ENV)
    path = Path(env) if env else tmp_path_factory.getbasetemp() / "hardening-results.jsonl"
    path.write_text("")
    _results[:] = [path]
    return path


def record(kind: str, **fields: Any) -> None:
    """Append one result line (attack, fuzz, load, fault, secrets) to this session's file."""
    if not _results:
        raise RuntimeError("record() outside a hardening test session")
    with _results[0].open("a") as f:
        f.write(json.dumps({"kind": kind, **fields}, sort_keys=True) + "\n")


def failure_row(module: str, test: str, observed: str) -> dict[str, Any]:
    """The result of a hardening test that failed, as seen: an attack that was not refused, a
    fault not survived, or another check that did not hold (report.py counts them)."""
    observed = " ".join(observed.split())[:300]
    if module == "test_attacks" or module == "test_cache_flood":
        return {"kind": "attack", "name": test, "refused": False, "code": "not_refused",
                "observed": observed}
    if module == "test_faults":
        return {"kind": "fault", "name": test, "survived": False, "observed": observed}
    return {"kind": "failure", "name": f"{module}::{test}", "observed": observed}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Record every failed hardening test too: a results table must not count only what held."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and _results:
        observed = str(call.excinfo.value) if call.excinfo is not None else report.longreprtext
        row = failure_row(Path(str(item.fspath)).stem, item.name, observed)
        record(row.pop("kind"), **row)


def is_root() -> bool:
    return os.geteuid() == 0


@dataclass
class World:
    """A running key server, one approved sim cache and one model with a policy."""

    ks: RunningKeyServer
    cache: SimCache
    model_key: bytes

    def engine(self) -> sa.Engine:
        return sa.create_engine(f"sqlite:///{self.ks.data_dir / 'keyserver.db'}")

    def audit_since(self, seq: int) -> list[dict[str, Any]]:
        eng = self.engine()
        try:
            with eng.connect() as c:
                return [dict(r._mapping) for r in c.execute(sa.text(
                    "SELECT * FROM audit_log WHERE seq > :s ORDER BY seq"), {"s": seq})]
        finally:
            eng.dispose()

    def head(self) -> int:
        eng = self.engine()
        try:
            with eng.connect() as c:
                return int(c.execute(sa.text("SELECT audit_seq FROM server_state")).scalar_one())
        finally:
            eng.dispose()

    def anon_counts(self) -> dict[str, int]:
        eng = self.engine()
        try:
            with eng.connect() as c:
                return {k: int(v) for k, v in c.execute(sa.text(
                    "SELECT code, SUM(count) FROM anon_counters GROUP BY code")).all()}
        finally:
            eng.dispose()

    def release_ok(self) -> Any:
        """One honest release (proves the service keeps serving everyone else)."""
        with self.ks.client() as client:
            ev, sk, pk, n = self.cache.request(client)
            res = client.release(ev, pk, n, [MODEL], private_key=sk)
        assert len(res.grants) == 1 and res.grants[0].key.equals(self.model_key)
        return res

    def chain_ok(self) -> bool:
        return bool(self.ks.admin("GET", "/v1/admin/audit/verify")["ok"])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("hard")
    ks = start_keyserver(tmp, sim=True, auto_approve=True)
    try:
        key = os.urandom(32)
        ks.add_model(MODEL, key)
        cache = SimCache(ks.sim_platform(), MEAS)
        ks.set_policy(MODEL, sim_policy(MEAS, cache.platform_key))
        yield World(ks, cache, key)
    finally:
        ks.stop()
