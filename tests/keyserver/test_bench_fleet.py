"""`sealtorch bench keyserver --replicas` runs end to end on PostgreSQL: replicas, simulated
caches, a replica SIGKILLed and restarted, and the figures it reports."""

from __future__ import annotations

import json
import subprocess
import sys

from tests import pgserver

_OPS = ("verify_evidence", "hpke_seal", "hpke_key_check", "sign", "hmac")


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
    # the crypto the replicas counted in themselves, the killed one's too
    ratio = fig["server_cpu_over_crypto_in_server"]
    assert 0 < ratio <= fig["server_cpu_over_crypto_in_server_idle_ops"]  # fewer ops: higher
    assert set(fig["crypto_in_server_us_per_release_by_op"]) == set(_OPS)
    assert all(v > 0 for v in fig["crypto_in_server_us_per_release_by_op"].values())
    poll = fig["crypto_in_server_us_per_poll_by_op"]
    assert poll["hmac"] > 0 and poll["sign"] > 0 and poll["verify_evidence"] == 0
    # the steady window (before the kill) is part of the round, sampled at its own ends
    assert 0 < fig["steady_server_cpu_s"] < fig["server_cpu_s"]
    assert 0 < fig["steady_polls"] < fig["polls"] and fig["steady_releases"] <= fig["releases"]
    assert fig["steady_server_cpu_over_crypto_in_server"] > 0
    assert fig["steady_crypto_in_server_us_per_poll_by_op"]["sign"] > 0
    assert fig["steady_server_cpu_over_crypto"] > 0
    # where the machine's CPU went
    assert 0 < fig["server_cores"] <= fig["machine_busy_cores"] <= fig["machine_cores"] + 0.1
    assert fig["load_generator_cores"] > 0 and fig["other_cores"] >= 0


def test_bench_release_only_json() -> None:
    """The release-only bench reports the server's CPU over the crypto it counted in itself,
    next to the crypto timed in an idle process, for releases and for status polls."""
    out = subprocess.run(
        [sys.executable, "-m", "sealtorch", "bench", "keyserver", "--concurrency", "4",
         "--seconds", "2", "--json"], capture_output=True, text=True, timeout=300,
        check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["releases"] > 0 and r["errors"] == 0
    assert r["server_cpu_over_crypto"] > 0 and r["server_cpu_over_crypto_in_server"] > 0
    by_op = r["crypto_in_server_us_per_release_by_op"]
    assert set(by_op) == set(_OPS) and all(v > 0 for v in by_op.values())
    assert r["crypto_in_server_us_per_release"] > by_op["verify_evidence"]
    # then status polls alone, each connection enrolled as a cache by one release
    assert r["polls"] > 0 and r["poll_errors"] == 0
    assert r["server_cpu_ms_per_poll"] > 0 and r["crypto_in_server_us_per_poll"] > 0
    assert r["poll_server_cpu_over_crypto_in_server"] > 1


def test_bench_fleet_refuses_sqlite_and_bad_counts() -> None:
    for args, msg in ((["--replicas", "2"], "PostgreSQL"),
                      (["--db", "postgresql+psycopg://x@127.0.0.1:1/p", "--replicas", "0"],
                       "replica counts"),
                      (["--db", "mysql://x"], "postgresql")):
        p = subprocess.run([sys.executable, "-m", "sealtorch", "bench", "keyserver", *args],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and msg in p.stderr, p.stderr
