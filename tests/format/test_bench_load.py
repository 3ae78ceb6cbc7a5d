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
              "raw_aes_decrypt_into", "raw_aes_decrypt_into_thp", "raw_aes_decrypt_into_fresh",
              "raw_aes_decrypt_file"}
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
    # the fixed per-load overhead, over raw AES from a kept mapping and with the file mapped
    assert r["fixed_overhead_ms"] == pytest.approx(
        (t["sealed_load_into"] - t["raw_aes_decrypt_into"]) * 1e3, abs=2e-3)
    assert r["fixed_overhead_file_ms"] == pytest.approx(
        (t["sealed_load_into"] - t["raw_aes_decrypt_file"]) * 1e3, abs=2e-3)
    assert r["sealed_over_raw_aes_file"] == pytest.approx(
        t["raw_aes_decrypt_file"] / t["sealed_load_into"], rel=1e-3)
    # sealtorch.load against load_into and against its floor, raw AES into new memory
    assert r["load_over_load_into"] == pytest.approx(
        t["sealed_load"] / t["sealed_load_into"], rel=1e-3)
    assert r["load_over_raw_aes_fresh"] == pytest.approx(
        t["sealed_load"] / t["raw_aes_decrypt_into_fresh"], rel=1e-3)
    assert r["fresh_over_preallocated"] == pytest.approx(
        t["raw_aes_decrypt_into_fresh"] / t["raw_aes_decrypt_into"], rel=1e-3)
    assert r["cpus"] == 1  # the CPUs this process may run on, not the machine's count
    assert isinstance(r["loadavg_start"], float) and isinstance(r["loadavg_end"], float)
    assert r["aead_releases_gil"] is True


def test_bench_load_peers_sharded_json():
    """The sharded case with every peer, each load in a worker process: medians, ratios to
    plain safetensors, peak RSS, weights checked bit for bit."""
    out = subprocess.run(
        [sys.executable, "-m", "sealtorch", "bench", "load", "--model", "sharded",
         "--size-mb", "8", "--shards", "2", "--repeat", "2", "--peers", "--json"],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    r = json.loads(out)
    assert r["model"] == "sharded" and r["shards"] == 2 and r["bytes"] >= 8 << 20
    assert r["peers_unavailable"] == {}
    assert isinstance(r["loadavg_start"], float) and isinstance(r["loadavg_end"], float)
    variants = r["variants"]
    assert set(variants) == {"plain_safetensors", "sealed_load_into", "sealed_load",
                             "cryptotensors", "tensorizer", "kserve_jwe"}
    assert variants["plain_safetensors"]["ratio_to_plain"] == 1.0
    into = variants["sealed_load_into"]
    for raw in (r["raw_aes"], r["raw_aes_file"]):  # file mapped before the clock / in the load
        assert 0 < raw["min_ms"] <= raw["median_ms"] <= raw["max_ms"]
        assert raw["fixed_overhead_ms"] == pytest.approx(into["median_ms"] - raw["median_ms"],
                                                         abs=0.02)
        assert isinstance(raw["paired_fixed_overhead_ms"], float)
        assert raw["sealed_over_raw_aes"] == pytest.approx(
            raw["median_ms"] / into["median_ms"], rel=0.01)
        assert raw["load_over_load_into"] == pytest.approx(
            variants["sealed_load"]["median_ms"] / into["median_ms"], rel=0.01)
    for v in variants.values():
        assert v["bit_identical"] is True
        assert 0 < v["min_ms"] <= v["median_ms"] <= v["max_ms"]
        assert v["peak_rss_bytes"] > r["bytes"]  # the ready model itself is resident
        assert v["ratio_to_plain"] == pytest.approx(
            v["median_ms"] / variants["plain_safetensors"]["median_ms"], rel=0.01)
