"""Turn a hardening results file (JSON lines written by the suite) into docs/security.md's table.

    SEALTORCH_HARDENING_RESULTS=results.jsonl python -m pytest tests/hardening
    python tests/hardening/report.py results.jsonl

The suite writes a fresh file per run (the variable's file is truncated at the start; without
it, ``hardening-results.jsonl`` in pytest's base temp directory). A test that fails is recorded
too: an attack as NOT refused, a fault as FAILED, any other check as a failure.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(rows: list[dict[str, Any]]) -> str:
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by[r["kind"]].append(r)
    attacks = by["attack"]
    tried = sum(int(a.get("tried", 1)) for a in attacks)
    refused = sum(int(a.get("tried", 1)) for a in attacks if a["refused"])
    open_ = [a["name"] for a in attacks if not a["refused"]]
    fuzz = by["fuzz"]
    fx = sum(int(f["executions"]) for f in fuzz)
    ff = sum(int(f["findings"]) for f in fuzz)
    engines = sorted({f["engine"] for f in fuzz})
    targets = sorted({f["target"] for f in fuzz})
    load = by["load"]
    books = by["load_books"]
    faults = by["fault"]
    secrets = by["secrets"]
    not_refused = "; NOT refused: " + ", ".join(open_) if open_ else ""
    out = ["| measure | result |", "|---|---|",
           f"| attacks tried / refused | {tried} / {refused} "
           f"({len(attacks)} attack kinds){not_refused} |",
           f"| fuzz executions / findings | {fx:,} / {ff} ({len(targets)} parsers; "
           f"{', '.join(engines)}) |"]
    for t in ("keyserver", "keycache", "serve"):
        steps = [s for s in load if s["target"] == t]
        if steps:
            top = max(steps, key=lambda s: s["concurrency"])
            best = max(s["throughput_per_s"] for s in steps)
            errs = max(s["error_rate"] for s in steps)
            conc = ", ".join(str(s["concurrency"]) for s in steps)
            out.append(f"| load held: {t} | concurrency {conc}: "
                       f"up to {best}/s, p50/p99 {top['p50_ms']}/{top['p99_ms']} ms at "
                       f"{top['concurrency']}, error rate {errs:.2%}, RSS "
                       f"{steps[0]['rss_start_mb']}->{steps[-1]['rss_end_mb']} MB |")
    for b in books:
        out.append(f"| books (load) | {b['keyserver_grants_received']} grants received = "
                   f"{b['keyserver_grants_audited']} audited; {b['keycache_keys_received']} file "
                   f"keys = {b['keycache_releases_counted']} counted by the cache; chain "
                   f"{'verifies' if b['audit_chain_ok'] else 'BROKEN'} |")
    survived = [f for f in faults if f["survived"]]
    out.append(f"| faults survived | {len(survived)} / {len(faults)}: "
               f"{'; '.join(f['name'] for f in faults)} |")
    for s in secrets:
        out.append(f"| secrets hygiene | {s['secrets']} secrets x {s['forms']} encodings searched "
                   f"in {s['places']} logs/bodies/metrics/files: {s['leaks']} found |")
    lost = sum(int(f.get("data_lost", 0)) for f in faults)
    out.append(f"| data lost | {lost} |")
    failures = by["failure"]
    if failures:
        out.append(f"| other checks FAILED | {len(failures)}: "
                   f"{'; '.join(f['name'] for f in failures)} |")
    return "\n".join(out)


def details(rows: list[dict[str, Any]]) -> str:
    out = ["| kind | name | outcome |", "|---|---|---|"]
    for r in rows:
        if r["kind"] == "attack":
            out.append(f"| attack | {r['name']} | {'refused' if r['refused'] else 'NOT refused'}"
                       f" (`{r['code']}`){' x' + str(r['tried']) if 'tried' in r else ''} |")
        elif r["kind"] == "fault":
            extra = {k: v for k, v in r.items() if k not in ("kind", "name", "survived")}
            if isinstance(extra.get("outcomes"), dict):  # drop temp paths from log lines
                extra["outcomes"] = {k: v for k, v in extra["outcomes"].items()
                                     if not k.endswith("_log")}
            out.append(f"| fault | {r['name']} | {'survived' if r['survived'] else 'FAILED'}: "
                       f"{json.dumps(extra, sort_keys=True)[:400]} |")
        elif r["kind"] == "failure":
            out.append(f"| check | {r['name']} | FAILED: {r['observed']} |")
    return "\n".join(out)


if __name__ == "__main__":
    rows = load(Path(sys.argv[1]))
    print(table(rows))
    print()
    print(details(rows))
