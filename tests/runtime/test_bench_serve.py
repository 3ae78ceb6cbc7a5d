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
    assert res["rps_ratio"] == res["sealed"]["rps"] / res["plaintext"]["rps"]
    assert res["target_rps_ratio"] == 0.95
