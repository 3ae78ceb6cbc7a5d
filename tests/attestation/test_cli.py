"""The CLI end to end (subprocess): verify, measure, policy init (incl. --from-evidence), sim."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sealtorch.attestation import sim
from sealtorch.attestation.policy import PINNED_LABEL, ModelPolicy

from .conftest import SGX_AT, SNP_AT, TDX_AT, TDX_OUTDATED_AT


def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sealtorch", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def sgx_args(vectors: Path) -> list[str]:
    d = vectors / "intel-dcap"
    return [str(d / "sgx_quote"), "--tee", "sgx", "--collateral",
            str(d / "sgx_quote_collateral.json"), "--at", str(SGX_AT)]


@pytest.fixture(scope="module")
def snp_args(vectors: Path) -> list[str]:
    d = vectors / "amd-snp" / "milan-vcek"
    return [str(d / "report.bin"), "--tee", "snp", "--vcek", str(d / "vcek.der"),
            "--at", str(SNP_AT)]


def test_verify_prints_claims(sgx_args: list[str]) -> None:
    r = run("attest", "verify", *sgx_args, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["claims"]["mrenclave"].startswith("33d8736d")
    assert out["claims"]["advisory_ids"] == ["INTEL-SA-00289", "INTEL-SA-00615"]


def test_verify_failure_exit_code(vectors: Path) -> None:
    d = vectors / "intel-dcap"
    r = run("attest", "verify", d / "tdx_quote_outdated", "--tee", "tdx", "--collateral",
            d / "tdx_quote_outdated_collateral.json", "--at", TDX_OUTDATED_AT)
    assert r.returncode == 2 and "No matching TCB level found" in r.stderr
    r = run("attest", "verify", d / "tdx_quote", "--tee", "tdx", "--collateral",
            d / "tdx_quote_collateral.json", "--at", TDX_AT + 90 * 86400)
    assert r.returncode == 2 and "error [collateral]" in r.stderr


def test_sgx_vector_policy_from_evidence(tmp_path: Path, sgx_args: list[str]) -> None:
    pol = tmp_path / "sgx.toml"
    r = run("policy", "init", "-o", pol, "--from-evidence", *sgx_args)
    assert r.returncode == 0, r.stderr
    assert "development shortcut" in r.stderr
    p = ModelPolicy.load(pol)
    assert p.caches[0].name == PINNED_LABEL and dict(p.caches[0].accept_tcb) == {
        "UpToDate": ()}
    r = run("attest", "verify", *sgx_args, "--policy", pol)
    assert r.returncode == 1
    assert "policy: DENIED" in r.stdout
    assert "TCB status ConfigurationAndSWHardeningNeeded is not accepted" in r.stdout
    # naming the status with only one of the two advisories is still denied
    one = tmp_path / "one.toml"
    assert run("policy", "init", "-o", one, "--from-evidence", *sgx_args, "--accept-tcb",
               "ConfigurationAndSWHardeningNeeded=INTEL-SA-00289").returncode == 0
    r = run("attest", "verify", *sgx_args, "--policy", one)
    assert r.returncode == 1 and "advisories INTEL-SA-00615 are not accepted" in r.stdout
    both = tmp_path / "both.json"
    assert run("policy", "init", "-o", both, "--from-evidence", *sgx_args, "--accept-tcb",
               "ConfigurationAndSWHardeningNeeded=INTEL-SA-00289,INTEL-SA-00615"
               ).returncode == 0
    r = run("attest", "verify", *sgx_args, "--policy", both, "--as", "runtime")
    assert r.returncode == 0 and "policy: ALLOWED by runtimes[0]" in r.stdout


def test_snp_debug_vector_policy(tmp_path: Path, snp_args: list[str]) -> None:
    pol = tmp_path / "snp.toml"
    assert run("policy", "init", "-o", pol, "--from-evidence", *snp_args).returncode == 0
    r = run("attest", "verify", *snp_args, "--policy", pol, "--json")
    assert r.returncode == 1
    dec = json.loads(r.stdout)["decision"]
    assert dec["allowed"] is False and dec["reasons"] == [
        f"caches[0] (snp identity '{PINNED_LABEL}'): the TEE is debuggable and the identity "
        "does not allow debug"]
    dbg = tmp_path / "dbg.toml"
    assert run("policy", "init", "-o", dbg, "--from-evidence", *snp_args,
               "--allow-debug").returncode == 0
    r = run("attest", "verify", *snp_args, "--policy", dbg)
    assert r.returncode == 0 and "ALLOWED" in r.stdout
    # refuses to overwrite
    r = run("policy", "init", "-o", dbg, "--from-evidence", *snp_args)
    assert r.returncode != 0 and "--force" in r.stderr


def test_policy_init_from_expected_values(tmp_path: Path) -> None:
    out = tmp_path / "p.toml"
    r = run("policy", "init", "-o", out, "--tee", "snp", "--measurement", "ab" * 48,
            "--product", "genoa", "--min-tcb", "bootloader=3", "--min-tcb", "snp=8",
            "--min-tcb", "tee=0", "--min-tcb", "microcode=115",
            "--max-vmpl", "0", "--for", "caches", "--factory",
            "sealtorch.models.resnet:resnet50", "--lease-seconds", "600", "--version", "2")
    assert r.returncode == 0, r.stderr
    p = ModelPolicy.load(out)
    assert p.version == 2 and p.lease_seconds == 600 and p.runtimes == ()
    assert p.caches[0].min_tcb == {"bootloader": 3, "snp": 8, "tee": 0, "microcode": 115}
    assert p.factories == ("sealtorch.models.resnet:resnet50",)
    r = run("policy", "init", "-o", tmp_path / "bad.toml", "--tee", "sgx", "--mrenclave", "zz")
    assert r.returncode == 2 and "error [policy_invalid]" in r.stderr and "hex" in r.stderr


def test_sim_cli_round_trip(tmp_path: Path) -> None:
    simdir = tmp_path / "sim"
    r = run("sim", "init", "--dir", simdir)
    assert r.returncode == 0 and "protects nothing" in r.stderr
    key = simdir / sim.KEY_FILE
    assert (key.stat().st_mode & 0o777) == 0o600
    assert run("sim", "init", "--dir", simdir).returncode == 2
    cfg = tmp_path / "keycache.toml"
    cfg.write_text("[keycache]\n")
    r = run("attest", "measure", "--role", "dkeycache", "--config", cfg)
    meas = bytes.fromhex(r.stdout.strip())
    assert meas == sim.measure("dkeycache", cfg.read_bytes())
    import warnings

    from sealtorch.attestation.attesters.sim import SimAttester

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = SimAttester(key, meas).attest(bytes(64))
    evf = tmp_path / "ev.json"
    evf.write_bytes(ev.to_json())
    pub = simdir / sim.PUBLIC_FILE
    pol = tmp_path / "sim.toml"
    r = run("policy", "init", "-o", pol, "--from-evidence", evf, "--tee", "sim", "--sim-key", pub)
    assert r.returncode == 0, r.stderr
    r = run("attest", "verify", evf, "--tee", "sim", "--sim-key", pub, "--policy", pol)
    assert r.returncode == 0 and "ALLOWED" in r.stdout
    r = run("attest", "verify", evf, "--tee", "sim")
    assert r.returncode == 2 and "--sim-key" in r.stderr
