"""Real attestation vectors through the key server, collateral import/health, and operations
(rate limits, JSON logs without key material, no core dumps, graceful shutdown)."""

from __future__ import annotations

import base64
import json
import os
import signal
import warnings
from pathlib import Path

import httpx
import pytest
from tests.servers import keyserver_cli, start_keyserver

from sealtorch.attestation.evidence import Evidence
from sealtorch.errors import ReleaseDenied
from sealtorch.protocol import hpke
from sealtorch.protocol.release_client import tls_client_context

warnings.filterwarnings("ignore", category=RuntimeWarning)
TRUSTEE_MEAS = ("a1f3930413247bb38cfc171579ea3c12d5fe4901f0c792f63fd75d98f1ef827c"
                "23500644e0e692e6be917f9050d3d38c")


def test_real_vectors_policy_test_release_and_collateral(tmp_path: Path, vectors: Path) -> None:
    ks = start_keyserver(tmp_path, sim=False, auto_approve=True)
    try:
        # collateral import (server-side directory) and its expiry in /readyz
        keyserver_cli("collateral", "import", "--data-dir", str(ks.data_dir),
                      str(vectors / "intel-dcap" / "sgx_quote_collateral.json"), env=ks.env)
        with httpx.Client(verify=tls_client_context(ks.ca_cert_path)) as h:
            ready = h.get(ks.url + "/readyz").json()
        assert ready["collateral"]["files"] == 1
        assert ready["collateral"]["next_update"].startswith("2025-07-19")
        assert ready["collateral"]["expired"] is True

        ks.add_model("snp-m", os.urandom(32))
        policy = {"version": 1, "caches": [{"tee": "snp", "measurement": TRUSTEE_MEAS,
                                            "product": "milan", "max_vmpl": 3, "min_tcb": {
                                                "bootloader": 3, "tee": 0, "snp": 8,
                                                "microcode": 115}}]}
        ks.set_policy("snp-m", policy)
        d = vectors / "amd-snp"
        good = Evidence("snp", (d / "trustee-vcek" / "test-report.bin").read_bytes(),
                        (d / "trustee-vcek" / "test-vcek.der").read_bytes())
        out = ks.admin("POST", "/v1/admin/policy-test/snp-m", {"evidence": good.to_dict()})
        assert out["allowed"] is True, out
        debug = Evidence("snp", (d / "milan-vcek" / "report.bin").read_bytes(),
                         (d / "milan-vcek" / "vcek.der").read_bytes())
        out = ks.admin("POST", "/v1/admin/policy-test/snp-m", {"evidence": debug.to_dict()})
        assert out["allowed"] is False and any("debug" in r for r in out["reasons"])
        bad_vcek = Evidence("snp", good.quote,
                            (d / "trustee-vcek" / "test-vcek-invalid-new.der").read_bytes())
        out = ks.admin("POST", "/v1/admin/policy-test/snp-m", {"evidence": bad_vcek.to_dict()})
        assert out["allowed"] is False and "evidence rejected" in out["reasons"][0]

        # genuine evidence that does not bind this request's nonce/key/audience is refused
        with ks.client() as client:
            n = client.challenge()
            _, pk = hpke.generate_keypair()
            with pytest.raises(ReleaseDenied) as ei:
                client.release(good, pk, n, ["snp-m"])
            assert ei.value.denial == "evidence_invalid"
            sgx = Evidence("sgx", (vectors / "intel-dcap" / "sgx_quote").read_bytes())
            n = client.challenge()
            with pytest.raises(ReleaseDenied) as ei:
                client.release(sgx, pk, n, ["snp-m"])
            assert ei.value.denial == "evidence_invalid"
        # anonymous refusals are counted, not audited; the log says why
        lines = [json.loads(ln) for ln in ks.log_path.read_text().splitlines()
                 if ln.startswith("{")]
        reasons = [ln["reason"] for ln in lines if ln.get("code") == "evidence_invalid"]
        assert "binding" in reasons[0]
        assert "collateral" in reasons[1]  # verified at the server's clock: collateral expired
    finally:
        ks.stop()


def test_operations(tmp_path: Path) -> None:
    ks = start_keyserver(tmp_path, sim=True, auto_approve=True)
    key = os.urandom(32)
    try:
        ks.add_model("ops-m", key)
        # no core dumps for the key-holding process
        limits = Path(f"/proc/{ks.process.pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"]
        # rate limit per client
        ks.stop()
        ks = ks.restart(SEALTORCH_KS_RATE_PER_CLIENT="2")
        codes = []
        with httpx.Client(verify=tls_client_context(ks.ca_cert_path)) as h:
            for _ in range(12):
                codes.append(h.post(ks.url + "/v1/challenge", json={}).status_code)
        assert 429 in codes and codes[0] == 200
    finally:
        rc = ks.stop(signal.SIGTERM)
    assert rc == 0  # graceful shutdown
    lines = [ln for ln in ks.log_path.read_text().splitlines() if ln.startswith("{")]
    assert lines and all(isinstance(json.loads(ln), dict) for ln in lines)
    text = ks.log_path.read_text()
    assert base64.b64encode(key).decode() not in text and key.hex() not in text
