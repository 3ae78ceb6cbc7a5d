"""`sealtorch seal MODEL_DIR -o SEALED_DIR` and `sealtorch verify SEALED_DIR`, run as a real
subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from sealtorch.hf import from_pretrained


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sealtorch", *args], capture_output=True,
                          text=True)


def test_seal_and_verify_a_directory(tmp_path, llama_dir, hf_key):
    out = tmp_path / "sealed"
    r = run("seal", str(llama_dir), "-o", str(out), "--key-file", str(hf_key),
            "--public-config", "--public", "generation_config.json")
    assert r.returncode == 0, r.stderr
    assert "weight shard(s)" in r.stdout
    assert "readable: config.json, generation_config.json" in r.stdout
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "model.safetensors.index.json.sealed").is_file()
    r = run("verify", str(out), "--key-file", str(hf_key), "--json")
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout)
    assert counts["ok"] and counts["shards"] >= 3 and counts["files"] == 3
    model = from_pretrained(out, key=hf_key)
    assert model.model.embed_tokens.weight.dtype is torch.bfloat16
    (out / "stray.txt").write_text("x")
    r = run("verify", str(out), "--key-file", str(hf_key))
    assert r.returncode != 0 and "sealed_dir_invalid" in r.stderr and "not part of this" \
        in r.stderr


def test_directory_options_refused(tmp_path, llama_dir, hf_key):
    r = run("seal", str(llama_dir), "-o", str(tmp_path / "s"), "--key-file", str(hf_key),
            "--public-index")
    assert r.returncode != 0 and "apply to a single file only" in r.stderr
    assert not (tmp_path / "s").exists()
    weights = next(llama_dir.glob("*.safetensors"))
    r = run("seal", str(weights), "-o", str(tmp_path / "f"), "--key-file", str(hf_key),
            "--public-config")
    assert r.returncode != 0 and "model directory only" in r.stderr


def test_sealing_a_directory_reports_progress_over_all_shards(tmp_path, llama_dir, hf_key):
    """`sealtorch seal MODEL_DIR` (and `verify`) show one byte bar for the whole model: the
    callback counts every shard's weight bytes once, never goes back, and ends at the total it
    announced."""
    from safetensors import safe_open

    from sealtorch.hf import seal_pretrained

    calls: list[tuple[int, int]] = []
    seal_pretrained(llama_dir, tmp_path / "sealed", hf_key,
                    progress=lambda done, total: calls.append((done, total)))
    weights = 0
    for shard in llama_dir.glob("model-*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            weights += sum(f.get_tensor(k).nbytes for k in f.keys())
    dones = [d for d, _ in calls]
    assert {t for _, t in calls} == {weights} and dones == sorted(dones)
    assert dones[-1] == weights
    # `sealtorch verify SEALED_DIR` counts the same bytes as they authenticate
    from sealtorch.hf import SealedDir

    calls.clear()
    with SealedDir(tmp_path / "sealed", key=hf_key) as sd:
        sd.verify_all(threads=2, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (weights, weights) and {t for _, t in calls} == {weights}
