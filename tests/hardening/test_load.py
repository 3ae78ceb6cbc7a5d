"""Load: dkeyserver, dkeycache and ``sealtorch serve`` driven at rising concurrency for a fixed
time (benchmarks/loadgen.py), then the books are checked: every grant a client received is in the
audit log and vice versa, the chain verifies, and the cache counted every file key it handed out.

Bounded by default (2 s per step, concurrency 1/4/16); ``SEALTORCH_LONG=1`` runs 20 s steps up to
64 concurrent clients. No timing thresholds: only correctness and zero errors are asserted.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest

from .conftest import LONG, record

ROOT = Path(__file__).resolve().parents[2]
warnings.filterwarnings("ignore", category=RuntimeWarning)


def loadgen() -> ModuleType:
    """benchmarks/loadgen.py as a module (benchmarks/ is not a package)."""
    if "sealtorch_loadgen" in sys.modules:
        return sys.modules["sealtorch_loadgen"]
    spec = importlib.util.spec_from_file_location("sealtorch_loadgen",
                                                  ROOT / "benchmarks" / "loadgen.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sealtorch_loadgen"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_load_rising_concurrency_nothing_lost(tmp_path: Path) -> None:
    lg = loadgen()
    rig = lg.Rig(tmp_path, serve=True).start()
    seconds = 20.0 if LONG else 2.0
    conc = [1, 4, 16, 64] if LONG else [1, 4, 16]
    try:
        res = asyncio.run(lg.run_load(rig, ["keyserver", "keycache", "serve"], conc, seconds))
    finally:
        rig.stop()
    for s in res["steps"]:
        assert s["ok"] > 0 and s["errors"] == {}, s
        record("load", **{k: v for k, v in s.items() if k != "errors"})
    books = res["nothing_lost"]
    record("load_books", **books)
    assert books["ok"], books
    assert books["keyserver_grants_received"] == books["keyserver_grants_audited"] > 0
    assert books["keycache_keys_received"] == books["keycache_releases_counted"] > 0
