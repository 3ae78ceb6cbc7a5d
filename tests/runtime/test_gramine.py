"""`sealtorch gramine manifest`: the template parses as TOML and fixes what must be measured."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

import sealtorch


def _manifest(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    out = tmp_path / "m.toml"
    p = subprocess.run([sys.executable, "-m", "sealtorch", "gramine", "manifest", "-o",
                        str(out), *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    text = out.read_text()
    return tomllib.loads(text), text


def _keys(d: Any, prefix: str = "") -> list[str]:
    if isinstance(d, dict):
        return [k for key, v in d.items() for k in [prefix + key, *_keys(v, prefix + key + ".")]]
    if isinstance(d, list):
        return [k for v in d for k in _keys(v, prefix)]
    return []


def _common(m: dict[str, Any], text: str, config: str) -> None:
    assert not [k for k in _keys(m) if "insecure__" in k]
    assert "insecure__" not in text.replace("insecure__* options", "")
    assert m["loader"]["argv"][:2] == ["python3", "-I"]
    env = m["loader"]["env"]
    assert all(isinstance(v, str) for v in env.values())  # literal values, no passthrough
    assert m["sgx"]["debug"] is False
    assert m["sgx"]["file_check_policy"] == "strict"
    assert m["sgx"]["remote_attestation"] == "dcap"
    trusted = m["sgx"]["trusted_files"]
    python = os.path.realpath(sys.executable)
    assert f"file:{python}" in trusted
    assert m["libos"]["entrypoint"] == python
    pkg = str(Path(sealtorch.__file__).resolve().parent)
    assert any(pkg == t[len("file:"):].rstrip("/") or pkg.startswith(t[len("file:"):])
               for t in trusted)
    assert f"file:{config}" in trusted
    assert "file:{{ gramine.libos }}" in trusted


def test_serve_manifest(tmp_path: Path) -> None:
    cfg = tmp_path / "runtime.toml"
    cfg.write_text('[runtime]\nserver_public_key = "'
                   + "A" * 43 + '="\n')
    m, text = _manifest(tmp_path, "--role", "serve", "--config", str(cfg), "--model",
                        "/models/r50.sealed", "--port", "9000")
    _common(m, text, str(cfg))
    argv = m["loader"]["argv"]
    assert argv[2:5] == ["-m", "sealtorch", "serve"]
    assert argv[argv.index("--config") + 1] == str(cfg)
    assert argv[argv.index("--factory") + 1] == "sealtorch.models.resnet:resnet50"
    assert argv[argv.index("--attester") + 1] == "sgx"
    assert argv[argv.index("--port") + 1] == "9000"
    assert int(m["sgx"]["enclave_size"].rstrip("G")) >= 8  # PyTorch + ResNet-50 weights
    assert m["sgx"]["max_threads"] >= 32
    assert m["sgx"]["allowed_files"] == ["file:/models/r50.sealed"]
    assert m["loader"]["env"]["OMP_NUM_THREADS"] == "8"


def test_keycache_manifest_trusts_its_config_and_ca(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    cfg = tmp_path / "dkeycache.toml"
    cfg.write_text("[keycache]\n"
                   'keyserver_url = "https://keys.example:8443"\n'
                   f'server_public_key = "{"A" * 43}="\n'
                   f'ca_cert = "{ca}"\n'
                   'socket = "/run/sealtorch/kc.sock"\n')
    m, text = _manifest(tmp_path, "--role", "keycache", "--config", str(cfg))
    _common(m, text, str(cfg))
    assert m["loader"]["argv"] == ["python3", "-I", "-m", "sealtorch.keycache", "serve",
                                   "--config", str(cfg), "--attester", "sgx"]
    assert f"file:{ca}" in m["sgx"]["trusted_files"]
    assert "allowed_files" not in m["sgx"]


@pytest.mark.parametrize("args,msg", [
    (["--role", "serve", "--factory", "os:system;x"], "package.module:function"),
    (["--role", "serve", "--enclave-size", "lots"], "enclave-size"),
])
def test_bad_options_are_refused(tmp_path: Path, args: list[str], msg: str) -> None:
    p = subprocess.run([sys.executable, "-m", "sealtorch", "gramine", "manifest", "-o",
                        str(tmp_path / "m.toml"), *args], capture_output=True, text=True)
    assert p.returncode == 2 and msg in p.stderr
    assert not (tmp_path / "m.toml").exists()


def test_invalid_config_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "runtime.toml"
    cfg.write_text("[runtime]\nserver_public_key = \"x\"\nextra = 1\n")
    p = subprocess.run([sys.executable, "-m", "sealtorch", "gramine", "manifest", "-o",
                        str(tmp_path / "m.toml"), "--role", "serve", "--config", str(cfg)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "config_invalid" in p.stderr


def test_roles_get_distinct_isvprodids(tmp_path: Path) -> None:
    """An MRSIGNER policy must be able to tell the key cache from the runtime."""
    from sealtorch.runtime.gramine import ManifestOptions, render_manifest

    ids = {role: tomllib.loads(render_manifest(ManifestOptions(role=role)))["sgx"]["isvprodid"]
           for role in ("keycache", "serve")}
    assert ids == {"keycache": 1, "serve": 2}
    custom = render_manifest(ManifestOptions(role="serve", isvprodid=7))
    assert tomllib.loads(custom)["sgx"]["isvprodid"] == 7
