"""`sealtorch bench serve --json` runs both servers and reports comparable figures."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_serve_json() -> None:
    p = subprocess.run([sys.executable, "-m", "sealtorch", "bench", "serve", "--json",
                        "--requests", "4", "--rounds", "1", "--image", "32", "--concurrency",
                        "2", "--max-batch", "2"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["bit_identical"] is True
    for side in ("plaintext", "sealed"):
        assert res[side]["requests"] == 4.0
        assert res[side]["rps"] > 0 and res[side]["p99_ms"] >= res[side]["p50_ms"] > 0
    # the ratios are computed from the rounds the same run measured (one pair here)
    (p_round,), (s_round,) = res["all_rounds"]["plaintext"], res["all_rounds"]["sealed"]
    assert p_round == res["plaintext"] and s_round == res["sealed"]
    assert res["rps_ratio"] == s_round["rps"] / p_round["rps"]
    assert res["p99_ratio"] == s_round["p99_ms"] / p_round["p99_ms"]
    assert res["input_shape"] == [3, 32, 32] and res["max_batch"] == 2


def test_bench_serve_e2e_json() -> None:
    p = subprocess.run([sys.executable, "-m", "sealtorch", "bench", "serve", "--e2e", "--json",
                        "--requests", "4", "--rounds", "1", "--image", "32", "--concurrency",
                        "2", "--max-batch", "2"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["mode"] == "e2e" and res["bit_identical"] is True
    for side in ("plaintext", "e2e"):
        assert res[side]["requests"] == 4.0
        assert res[side]["rps"] > 0 and res[side]["p99_ms"] >= res[side]["p50_ms"] > 0
    assert res["rps_ratio"] == res["e2e"]["rps"] / res["plaintext"]["rps"]
    assert res["added_latency_ms"] == res["e2e"]["p50_ms"] - res["plaintext"]["p50_ms"]
    assert res["cpu_ratio"] == (res["plaintext"]["cpu_ms_per_request"]
                                / res["e2e"]["cpu_ms_per_request"])
    steps = res["crypto_ms"]
    assert set(steps) == {"client_encapsulate", "server_open", "server_seal_and_sign",
                          "client_open", "client_verify_receipt", "total"}
    assert all(v > 0 for v in steps.values())


def test_bench_serve_kserve_json() -> None:
    """KServe sealed vs plaintext on one KServe server, and vs `sealtorch serve`, one run."""
    p = subprocess.run([sys.executable, "-m", "sealtorch", "bench", "serve", "--engine",
                        "kserve", "--json", "--requests", "4", "--rounds", "1", "--image", "32",
                        "--concurrency", "2", "--max-batch", "2"], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["engine"] == "kserve" and res["bit_identical"] is True
    sides = ("kserve_plaintext", "kserve_sealed", "serve_sealed")
    for side in sides:
        assert res[side]["requests"] == 4.0
        assert res[side]["rps"] > 0 and res[side]["p99_ms"] >= res[side]["p50_ms"] > 0
        assert res["all_rounds"][side] == [res[side]]
    assert res["rps_ratio"] == res["kserve_sealed"]["rps"] / res["kserve_plaintext"]["rps"]
    assert res["kserve_vs_serve_rps_ratio"] == (res["kserve_sealed"]["rps"]
                                                / res["serve_sealed"]["rps"])
    cpu = {side: res[side]["server_cpu_ms_per_request"] for side in sides}
    assert all(v > 0 for v in cpu.values())  # each server worked for its own rounds
    assert res["cpu_ratio"] == cpu["kserve_plaintext"] / cpu["kserve_sealed"]
    assert res["kserve_vs_serve_cpu_ratio"] == cpu["serve_sealed"] / cpu["kserve_sealed"]


def test_bench_serve_kserve_refuses_e2e() -> None:
    p = subprocess.run([sys.executable, "-m", "sealtorch", "bench", "serve", "--engine",
                        "kserve", "--e2e"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "leave out --engine kserve" in p.stderr
