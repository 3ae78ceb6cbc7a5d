"""Run the sealtorch fuzz harnesses for a fixed time: ``python fuzz/run.py --seconds N [target]``.

Each target (tests/hardening/fuzz_targets.py: every parser that reads untrusted bytes) runs in
its own process under atheris (coverage-guided libFuzzer, seeded with real valid documents) when
atheris is installed (``pip install sealtorch[fuzz]``), otherwise under a seeded mutation loop
(``--engine mutate``). A finding is any exception other than a ``sealtorch.errors`` error; it is
printed with the input that caused it and makes the exit status 1. The summary line of each
target gives executions and findings; ``--json`` prints them as one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]


INSTRUMENTED = [
    "sealtorch.format.header", "sealtorch.format.index", "sealtorch.attestation.evidence",
    "sealtorch.attestation.policy", "sealtorch.attestation.verifiers.snp",
    "sealtorch.attestation.verifiers.dcap", "sealtorch.protocol.b64",
    "sealtorch.protocol.grant", "sealtorch.protocol.signing", "sealtorch.protocol.messages",
    "sealtorch.protocol.local", "sealtorch.keycache.config",
]


def _targets() -> dict[str, object]:
    from tests.hardening.fuzz_targets import TARGETS

    return TARGETS  # type: ignore[return-value]


def _have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def child_atheris(name: str, seconds: int) -> None:
    """Inside a child process: fuzz one target with atheris until the time is up."""
    import importlib

    import atheris

    with atheris.instrument_imports(include=["sealtorch"]):  # not torch: far too slow
        for mod in INSTRUMENTED:
            importlib.import_module(mod)
    from tests.hardening.fuzz_targets import TARGETS, run_one

    warnings.simplefilter("ignore")
    target = TARGETS[name]
    seeds = target.seeds()
    corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    for i, s in enumerate(seeds):
        (corpus / f"seed{i}").write_bytes(s)

    def one(data: bytes) -> None:
        finding = run_one(target, data)
        if finding is not None:
            raise finding

    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", "-max_len=65536",
                   "-print_final_stats=1", str(corpus)], one)
    atheris.Fuzz()


def run_mutate(name: str, seconds: float, seed: int) -> dict[str, object]:
    """Fallback engine: random bytes and mutations of the seeds, for ``seconds``."""
    from tests.hardening.fuzz_targets import TARGETS, mutate, mutate_json, run_one

    warnings.simplefilter("ignore")
    target = TARGETS[name]
    seeds = target.seeds() or [b""]
    rnd = random.Random(seed)
    end = time.monotonic() + seconds
    runs, findings, examples = 0, 0, []
    while time.monotonic() < end:
        r = rnd.random()
        if r < 0.15:
            data = rnd.randbytes(rnd.randint(0, 512))
        elif r < 0.5 and target.json_input:
            data = mutate_json(rnd.choice(seeds), rnd)
        else:
            data = mutate(rnd.choice(seeds), rnd)
        runs += 1
        finding = run_one(target, data)
        if finding is not None:
            findings += 1
            if len(examples) < 3:
                examples.append(f"{type(finding).__name__}: {finding} input={data[:120]!r}")
    return {"target": name, "engine": "mutate", "executions": runs, "findings": findings,
            "examples": examples}


def run_atheris(name: str, seconds: int) -> dict[str, object]:
    """Spawn a child running atheris on one target; parse libFuzzer's final stats."""
    p = subprocess.run([sys.executable, __file__, "--child", name, "--seconds", str(seconds)],
                       capture_output=True, text=True, timeout=seconds + 120)
    out = p.stderr + p.stdout
    m = re.findall(r"stat::number_of_executed_units:\s*(\d+)", out) or re.findall(
        r"Done (\d+) runs", out)
    runs = int(m[-1]) if m else 0
    crashed = p.returncode != 0
    examples = []
    if crashed:
        tail = [ln for ln in out.splitlines() if "Error" in ln or "Exception" in ln][-3:]
        examples = tail or [out[-500:]]
    return {"target": name, "engine": "atheris", "executions": runs,
            "findings": 1 if crashed else 0, "examples": examples}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="*", help="targets to run (default: all)")
    ap.add_argument("--seconds", type=int, default=10, help="time per target")
    ap.add_argument("--engine", choices=["auto", "atheris", "mutate"], default="auto")
    ap.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child_atheris(a.child, a.seconds)
        return 0
    targets = _targets()
    if a.list:
        print("\n".join(sorted(targets)))
        return 0
    names = a.targets or sorted(targets)
    unknown = [n for n in names if n not in targets]
    if unknown:
        print(f"unknown target(s): {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    engine = a.engine
    if engine == "auto":
        engine = "atheris" if _have_atheris() else "mutate"
    if engine == "atheris" and not _have_atheris():
        print("atheris is not installed (pip install 'sealtorch[fuzz]')", file=sys.stderr)
        return 2
    results = []
    for n in names:
        res = run_atheris(n, a.seconds) if engine == "atheris" else run_mutate(
            n, a.seconds, a.seed)
        results.append(res)
        if not a.json:
            print(f"{n:16} {res['engine']:8} executions={res['executions']:>9} "
                  f"findings={res['findings']}", flush=True)
            for ex in res["examples"]:  # type: ignore[attr-defined]
                print(f"    {ex}")
    total = sum(int(r["executions"]) for r in results)  # type: ignore[call-overload]
    found = sum(int(r["findings"]) for r in results)  # type: ignore[call-overload]
    if a.json:
        print(json.dumps({"targets": results, "executions": total, "findings": found,
                          "seconds_per_target": a.seconds, "seed": a.seed}, indent=1))
    else:
        print(f"total executions={total} findings={found} seed={a.seed}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
