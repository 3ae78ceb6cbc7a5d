"""`sealtorch bench keyserver --replicas` runs end to end on PostgreSQL: replicas, simulated
caches, a replica SIGKILLed and restarted, and the figures it reports."""

from __future__ import annotations

import json
import subprocess
import sys

from tests import pgserver


def test_bench_fleet_two_replicas_json(pg_server: pgserver.PgServer) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sealtorch", "bench", "keyserver", "--db",
         pg_server.url("postgres"), "--replicas", "2", "--caches", "40", "--seconds", "12",
         "--speedup", "50", "--json"],
        capture_output=True, text=True, timeout=400, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    (fig,) = r["rounds"]
    assert fig["replicas"] == 2 and fig["caches"] == 40
    assert fig["releases"] >= 40  # every cache attested at least once
    assert fig["polls"] > 0 and fig["errors"] == 0, fig["error_kinds"]
    assert fig["nonces_accepted_twice"] == 0
    assert fig["releases_failed_over"] + fig["endpoint_failures"] >= 1  # the kill was seen
    assert 0 < fig["restarted_at_s"] - fig["killed_at_s"]
    assert fig["server_cpu_s"] > 0 and fig["server_cpu_over_crypto"] > 0
    assert 0 < fig["server_cpu_ms_per_request"] < fig["server_cpu_ms_per_release"]
    assert 0 < fig["tls_handshakes_per_request"] and fig["tls_resumed_per_request"] >= 0
    assert r["crypto_per_release_us"] > r["verify_evidence_us"] > 0


def test_bench_fleet_refuses_sqlite_and_bad_counts() -> None:
    for args, msg in ((["--replicas", "2"], "PostgreSQL"),
                      (["--db", "postgresql+psycopg://x@127.0.0.1:1/p", "--replicas", "0"],
                       "replica counts"),
                      (["--db", "mysql://x"], "postgresql")):
        p = subprocess.run([sys.executable, "-m", "sealtorch", "bench", "keyserver", *args],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and msg in p.stderr, p.stderr
