"""`sealtorch bench load --json` runs end to end and reports medians, ranges, ratios and load."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def test_bench_load_json_small_synthetic():
    one_cpu = {min(os.sched_getaffinity(0))}
    out = subprocess.run(
        [sys.executable, "-m", "sealtorch", "bench", "load", "--model", "synthetic",
         "--size-mb", "6", "--threads", "2", "--repeat", "3", "--json"],
        capture_output=True, text=True, timeout=240, check=True,
        preexec_fn=lambda: os.sched_setaffinity(0, one_cpu),  # what the report must show
    ).stdout
    r = json.loads(out)
    phases = {"plain_safetensors", "plain_torch_load", "sealed_load_into", "sealed_load",
              "raw_aes_decrypt_into", "raw_aes_decrypt_into_thp"}
    assert set(r["times_s"]) == phases == set(r["times_min_s"]) == set(r["times_max_s"])
    for k in phases:
        assert 0 < r["times_min_s"][k] <= r["times_s"][k] <= r["times_max_s"][k]
    assert r["threads"] == 2 and r["repeat"] == 3 and r["bytes"] >= 6 << 20
    t = r["times_s"]
    ratio_plain = t["sealed_load_into"] / t["plain_safetensors"]
    ratio_aes = t["raw_aes_decrypt_into"] / t["sealed_load_into"]
    assert r["sealed_over_plain"] == pytest.approx(ratio_plain, rel=1e-3)
    assert r["sealed_over_raw_aes"] == pytest.approx(ratio_aes, rel=1e-3)
    assert set(r["paired_ratios"]) == {"sealed_over_plain", "sealed_over_raw_aes"}
    assert r["cpus"] == 1  # the CPUs this process may run on, not the machine's count
    assert isinstance(r["loadavg_start"], float) and isinstance(r["loadavg_end"], float)
    assert r["aead_releases_gil"] is True
