"""The owner CLI, run as a real subprocess: keygen, seal, inspect, verify, unseal, errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import torch
from safetensors.torch import load_file


def run(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sealtorch", *args], capture_output=True, text=True, cwd=cwd
    )


def test_owner_workflow(tmp_path):
    sd = {"w": torch.randn(300, 7), "b": torch.arange(5, dtype=torch.int16)}
    torch.save(sd, tmp_path / "m.pt")
    r = run("keygen", "--model-id", "acme/m", "-o", "k.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "k.json").st_mode) == 0o600
    r = run("keygen", "--model-id", "acme/m", "-o", "k.json", cwd=tmp_path)
    assert r.returncode == 2 and "refusing to overwrite" in r.stderr
    r = run("keygen", "--signing", "-o", "owner.pem", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pub = r.stdout.strip().split()[-1]
    r = run(
        "seal", "m.pt", "-o", "m.sealed", "--key-file", "k.json", "--chunk-size", "1KiB",
        "--sign-key", "owner.pem", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "signed" in r.stdout
    r = run("inspect", "m.sealed", "--json", cwd=tmp_path)
    info = json.loads(r.stdout)
    assert info["header"]["model_id"] == "acme/m" and "index" not in info
    assert info["header"]["chunk_size"] == 1024 and info["signer_unverified"] == pub
    r = run("inspect", "m.sealed", "--key-file", "k.json", cwd=tmp_path)
    assert r.returncode == 0 and "w  F32[300, 7]" in r.stdout
    r = run("verify", "m.sealed", "--key-file", "k.json", "--signer", pub, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stderr
    r = run("unseal", "m.sealed", "--key-file", "k.json", "-o", "p.safetensors", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    back = load_file(str(tmp_path / "p.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def test_cli_errors_are_one_line(tmp_path):
    torch.save({"w": torch.randn(600)}, tmp_path / "m.pt")
    assert run("keygen", "--model-id", "m", "-o", "k.json", cwd=tmp_path).returncode == 0
    assert run("keygen", "--model-id", "m", "-o", "k2.json", cwd=tmp_path).returncode == 0
    r = run("seal", "m.pt", "-o", "m.sealed", "--key-file", "k.json", "--chunk-size", "512",
            cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = run("verify", "m.sealed", "--key-file", "k2.json", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error [wrong_key]")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    data = bytearray((tmp_path / "m.sealed").read_bytes())
    data[-30] ^= 1
    (tmp_path / "m.sealed").write_bytes(bytes(data))
    r = run("verify", "m.sealed", "--key-file", "k.json", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error [integrity]"), r.stderr
    r = run("inspect", "m.pt", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error [not_sealed]")
    for cmd in ("keygen", "seal", "inspect", "verify", "unseal"):
        r = run(cmd, "--help")
        assert r.returncode == 0 and "Usage" in r.stdout
