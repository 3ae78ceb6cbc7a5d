"""`sealtorch initdata` end to end (subprocess): the document, the values it prints (checked
against hashlib), the annotation, and a policy that pins the printed register value."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealtorch.attestation.claims import Claims
from sealtorch.attestation.initdata import ANNOTATION
from sealtorch.attestation.policy import Identity, check_identity
from sealtorch.format.signing import raw_public


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sealtorch", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    key = base64.b64encode(raw_public(Ed25519PrivateKey.generate().public_key())).decode()
    p = tmp_path / "sealtorch.toml"
    p.write_text(f'[keycache]\nkeyserver_url = "https://keys.example:8443"\n'
                 f'server_public_key = "{key}"\nlocal_auth = "peercred"\n'
                 f'initdata = "/run/sealtorch-initdata/cc_init_data"\n\n'
                 f'[runtime]\nserver_public_key = "{key}"\n'
                 f'initdata = "/run/sealtorch-initdata/cc_init_data"\n')
    return p


def test_writes_the_document_and_prints_the_values(tmp_path: Path, config: Path) -> None:
    rego = tmp_path / "policy.rego"
    rego.write_text("package agent_policy\ndefault CreateContainerRequest := true\n")
    out = tmp_path / "initdata.toml"
    r = run("initdata", config, "-o", out, "--entry", f"policy.rego={rego}", "--json")
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)
    raw = out.read_bytes()
    doc = tomllib.loads(raw.decode())
    assert doc["version"] == "0.1.0" and doc["algorithm"] == "sha384"
    assert doc["data"]["sealtorch.toml"].encode() == config.read_bytes()
    assert doc["data"]["policy.rego"] == rego.read_text()
    d = hashlib.sha384(raw).digest()
    assert v["digest"] == d.hex()
    assert v["mrconfigid"] == d.hex() and v["host_data"] == d[:32].hex()
    assert v["annotation"] == ANNOTATION
    assert gzip.decompress(base64.b64decode(v["annotation_value"], validate=True)) == raw

    r = run("initdata", config, "-o", out, "--algorithm", "sha256", "--force")
    assert r.returncode == 0, r.stderr
    d = hashlib.sha256(out.read_bytes()).digest()
    assert f"TDX MRCONFIGID:   {(d + bytes(16)).hex()}" in r.stdout
    assert f"SNP HOST_DATA:    {d.hex()}" in r.stdout
    assert f"pod annotation {ANNOTATION}:" in r.stdout


def test_refusals(tmp_path: Path, config: Path) -> None:
    unbound = tmp_path / "unbound.toml"
    unbound.write_text(config.read_text().replace(
        'initdata = "/run/sealtorch-initdata/cc_init_data"\n\n', "\n"))
    r = run("initdata", unbound, "-o", tmp_path / "a.toml")
    assert r.returncode == 2 and "[keycache] has no `initdata = PATH`" in r.stderr
    assert not (tmp_path / "a.toml").exists()
    r = run("initdata", config, "-o", tmp_path / "b.toml", "--entry", f"sealtorch.toml={config}")
    assert r.returncode == 2 and "given twice" in r.stderr
    r = run("initdata", config, "-o", tmp_path / "c.toml", "--entry", "../x=/etc/hostname")
    assert r.returncode == 2 and "plain file names" in r.stderr
    (tmp_path / "d.toml").write_text("")
    r = run("initdata", config, "-o", tmp_path / "d.toml")
    assert r.returncode == 2 and "--force" in r.stderr


TCB = ("bootloader", "tee", "snp", "microcode")


def _vm(host_data: bytes) -> Claims:
    return Claims(tee="snp", report_data=bytes(64), verified_at=0, debug=False,
                  measurement=b"\x11" * 48, host_data=host_data, vmpl=0, product="milan",
                  reported_tcb=dict.fromkeys(TCB, 1))


def test_the_policy_tells_this_pod_from_another_on_the_same_runtime_class(
        tmp_path: Path, config: Path) -> None:
    """Two pods on one Kata runtime class share firmware, kernel and initrd (MEASUREMENT);
    only HOST_DATA, pinned to the printed initdata value, tells them apart."""
    values = []
    for name, text in (("a", config.read_text()),
                       ("b", config.read_text().replace("keys.example", "other.example"))):
        c = tmp_path / f"{name}.cfg"
        c.write_text(text)
        r = run("initdata", c, "-o", tmp_path / f"{name}.toml", "--json")
        assert r.returncode == 0, r.stderr
        values.append(bytes.fromhex(json.loads(r.stdout)["host_data"]))
    ident = Identity.from_dict({"tee": "snp", "measurement": "11" * 48,
                                "host_data": values[0].hex(), "product": "milan",
                                "min_tcb": dict.fromkeys(TCB, 1)})
    assert check_identity(ident, _vm(values[0])) == []
    assert check_identity(ident, _vm(values[1])) == [
        f"host_data is {values[1].hex()}, the identity requires {values[0].hex()}"]
