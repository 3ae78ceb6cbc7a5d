"""Property tests: no input makes a parser raise anything but a sealtorch error.

Every parser that reads untrusted bytes (tests/hardening/fuzz_targets.py) gets random bytes,
byte-level mutations of a real valid document, and (for JSON documents) structural mutations
that put hostile values at every position. ``SEALTORCH_LONG=1`` raises the example budget.
"""

from __future__ import annotations

import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import LONG, record
from .fuzz_targets import TARGETS, mutate, mutate_json, run_one

EXAMPLES = 3000 if LONG else 150
warnings.filterwarnings("ignore", category=RuntimeWarning)


@st.composite
def inputs(draw: st.DrawFn, name: str) -> bytes:
    target = TARGETS[name]
    seeds = target.seeds()
    kind = draw(st.sampled_from(["random", "mutate", "json"] if target.json_input
                                else ["random", "mutate"]))
    if kind == "random" or not seeds:
        return draw(st.binary(max_size=2048))
    rnd = draw(st.randoms(use_true_random=False))
    seed = rnd.choice(seeds)
    return mutate_json(seed, rnd) if kind == "json" else mutate(seed, rnd)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_parser_raises_only_sealtorch_errors(name: str) -> None:
    runs = [0]

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=inputs(name))
    def check(data: bytes) -> None:
        runs[0] += 1
        finding = run_one(TARGETS[name], data)
        assert finding is None, (f"{name}: {type(finding).__name__}: {finding!r} "
                                 f"on input {data[:200]!r}")

    check()
    record("fuzz", engine="hypothesis", target=name, executions=runs[0], findings=0)


@pytest.mark.slow
def test_fuzz_harnesses_run_for_a_bounded_budget() -> None:
    """fuzz/run.py: every harness (atheris if installed, else the mutation loop) for a budget;
    executions and findings are printed and recorded. ``SEALTORCH_LONG=1``: 60 s per target."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    seconds = 60 if LONG else 1
    run = Path(__file__).resolve().parents[2] / "fuzz" / "run.py"
    p = subprocess.run([sys.executable, str(run), "--seconds", str(seconds), "--json"],
                       capture_output=True, text=True, timeout=len(TARGETS) * (seconds + 60))
    out = json.loads(p.stdout)
    print(json.dumps(out, indent=1))
    for t in out["targets"]:
        record("fuzz", engine=t["engine"], target=t["target"], executions=t["executions"],
               findings=t["findings"], seconds=seconds)
        assert t["executions"] > 0, t
    assert out["findings"] == 0 and p.returncode == 0, out
