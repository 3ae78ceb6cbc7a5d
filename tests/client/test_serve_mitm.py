"""A real `sealtorch serve` (sim TEE, real dkeyserver + dkeycache, a tiny sealed model) with a
man in the middle on loopback: every attack below is refused by the client or the server, with
a reason, and the proxy never sees the input or the output.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from tests.runtime.conftest import wait_ready

from sealtorch.attestation import sim
from sealtorch.client import AttestedClient, ClientPolicy
from sealtorch.client.policy import FORMAT
from sealtorch.e2e import ohttp
from sealtorch.e2e.document import AttestationDocument, encode_nonce
from sealtorch.errors import (
    BindingError,
    EncapsulationError,
    PolicyDenied,
    ServerRefusedError,
)
from sealtorch.format.keyfile import generate_model_key
from sealtorch.format.writer import seal
from sealtorch.runtime.config import render_runtime_config
from sealtorch.runtime.world import LocalDeployment

from .proxy import Exchange, MitmProxy

FACTORY = "torch.nn:PReLU"
WEIGHTS = {"tiny-a": 0.1, "tiny-b": 0.3}
# distinctive values: their text must never show up in what the proxy captured
X = [-1.2345678, 3.1415926, -2.7182817, 1.6180339]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class World:
    dep: LocalDeployment
    urls: dict[str, str]
    runtime_cfg: bytes
    platform: str  # the sim platform key's fingerprint

    def policy(self, *, models: list[dict[str, Any]] | None = None,
               measurement: bytes | None = None) -> ClientPolicy:
        meas = measurement or sim.measure("serve", self.runtime_cfg)
        return ClientPolicy.from_dict({
            "format": FORMAT,
            "runtimes": [{"tee": "sim", "name": "tiny-serve", "measurement": meas.hex(),
                          "platform_key": self.platform}],
            "models": models or [{"model_id": "tiny-a", "key_versions": [1],
                                  "factories": [FACTORY]}],
            "owners": [{"server_key": self.dep.server_public_key_b64}],
            "verifier": {"sim_platform_keys": [str(self.dep.sim_dir / sim.PUBLIC_FILE)]}})

    def client(self, url: str, policy: ClientPolicy | None = None, **kw: Any) -> AttestedClient:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return AttestedClient(url, policy or self.policy(), unsafe_sim=True, **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    wd = tmp_path_factory.mktemp("e2e")
    dep = LocalDeployment(wd)
    procs: list[subprocess.Popen[str]] = []
    try:
        dep.init_keyserver()
        dep.start_keyserver()
        platform = dep.init_sim_platform()
        cache_meas = sim.measure("dkeycache", dep.write_cache_config())
        runtime_cfg = render_runtime_config(dep.server_public_key_b64)
        (wd / "runtime.toml").write_bytes(runtime_cfg)
        ident = {"tee": "sim", "platform_key": platform}
        urls = {}
        for name, w in WEIGHTS.items():
            key = generate_model_key(name)
            m = torch.nn.PReLU()
            with torch.no_grad():
                m.weight.fill_(w)
            seal(m, wd / f"{name}.sealed", key)
            dep.admin("POST", "/v1/admin/models", {
                "model_id": name, "key_version": 1,
                "key": base64.b64encode(bytes(key.key)).decode()})
            dep.admin("PUT", f"/v1/admin/policy/{name}", {"policy": {
                "format": "sealtorch-policy/v1", "version": 1, "lease_seconds": 300,
                "caches": [{**ident, "measurement": cache_meas.hex()}],
                "runtimes": [{**ident, "measurement": sim.measure("serve", runtime_cfg).hex()}],
                "factories": [FACTORY]}})
        dep.start_cache()
        for name in WEIGHTS:
            port = _free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-I", "-m", "sealtorch", "serve", str(wd / f"{name}.sealed"),
                 "--factory", FACTORY, "--keycache", dep.socket, "--config",
                 str(wd / "runtime.toml"), "--attester", "sim", "--port", str(port),
                 "--max-batch", "2", "--input-shape", "4", "--name", name, "--rate", "1000",
                 "--threads", "1"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dep.env,
                start_new_session=True))
            urls[name] = f"http://127.0.0.1:{port}"
        for p, url in zip(procs, urls.values(), strict=True):
            wait_ready(p, url, timeout=120)
        yield World(dep, urls, runtime_cfg, platform)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
            try:
                p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate(timeout=10)
        dep.stop()


@pytest.fixture()
def proxy(world: World) -> Iterator[MitmProxy]:
    p = MitmProxy(world.urls["tiny-a"])
    yield p
    p.close()


def request_body(x: list[float] = X) -> dict[str, Any]:
    return {"id": "req-1", "inputs": [{"name": "input", "shape": [1, len(x)],
                                       "datatype": "FP32", "data": x}]}


def prelu(x: list[float], w: float) -> list[float]:
    m = torch.nn.PReLU()
    with torch.no_grad():
        m.weight.fill_(w)
        return m(torch.tensor([x], dtype=torch.float32)).reshape(-1).tolist()


# --- the honest path ---------------------------------------------------------------------------
def test_the_proxy_sees_neither_input_nor_output(world: World, proxy: MitmProxy) -> None:
    body = json.dumps(request_body()).encode()
    with world.client(proxy.url) as c:
        server = c.attest()
        result = c.infer(body)
    out = result.json()["outputs"][0]["data"]
    assert out == prelu(X, WEIGHTS["tiny-a"])  # the sealed weight, decrypted in the TEE
    assert result.receipt_claims.identity == server.identity
    assert server.identity.model_id == "tiny-a" and server.identity.factory == FACTORY
    # what the proxy captured: sizes and timing, nothing else
    assert len(proxy.posts()) == 1 and len(proxy.captured) > len(body)
    secrets = [body, result.body, b"req-1", *(json.dumps(v).encode() for v in X + out),
               torch.tensor(X, dtype=torch.float32).numpy().tobytes(),
               torch.tensor(out, dtype=torch.float32).numpy().tobytes()]
    for s in secrets:
        assert s not in proxy.captured, s[:40]
    # and the proxy saw encrypted media only on the inference path
    q, r = proxy.posts()[0]
    assert q.headers["content-type"] == ohttp.MEDIA_REQUEST
    assert r.headers["content-type"] == ohttp.MEDIA_RESPONSE


def test_the_server_refuses_plaintext_inference(world: World) -> None:
    r = httpx.post(world.urls["tiny-a"] + "/v2/models/tiny-a/infer", json=request_body())
    assert r.status_code == 415 and r.json()["code"] == "plaintext_refused"
    # the rest of the OIP API stays as it was
    assert httpx.get(world.urls["tiny-a"] + "/v2/models/tiny-a").json()["name"] == "tiny-a"


# --- attestation attacks -----------------------------------------------------------------------
def _swap_doc(edit: Any) -> Any:
    def on_response(q: Exchange, r: Exchange) -> Exchange:
        if "/attestation" in q.path and r.status == 200:
            doc = AttestationDocument.from_json(r.body)
            r.body = json.dumps(edit(doc).to_dict()).encode()
        return r
    return on_response


def _fresh_doc(url: str) -> AttestationDocument:
    r = httpx.get(url + "/v2/attestation", params={"nonce": encode_nonce(os.urandom(32))})
    return AttestationDocument.from_json(r.content)


def test_swapped_evidence_is_refused(world: World, proxy: MitmProxy) -> None:
    from dataclasses import replace

    for other in (_fresh_doc(world.urls["tiny-a"]), _fresh_doc(world.urls["tiny-b"])):
        proxy.on_response = _swap_doc(lambda d, o=other: replace(d, evidence=o.evidence))
        with world.client(proxy.url) as c, pytest.raises(BindingError, match="does not bind"):
            c.infer(request_body())
    assert proxy.posts() == []  # nothing was sent


def test_evidence_for_another_model_is_refused(world: World, proxy: MitmProxy) -> None:
    # the proxy relays the client's fresh nonce to another (genuine, attested) server
    def to_b(q: Exchange) -> Exchange:
        q.upstream = world.urls["tiny-b"]
        q.path = q.path.replace("/v2/models/tiny-a/attestation", "/v2/attestation")
        return q

    proxy.on_request = to_b
    with world.client(proxy.url) as c, pytest.raises(PolicyDenied) as e:
        c.attest()
    assert "models: model 'tiny-b' is not one this policy expects (tiny-a)" in e.value.reasons
    # a client that accepts both models still refuses another model than the one it named
    both = world.policy(models=[{"model_id": "tiny-a"}, {"model_id": "tiny-b"}])
    with world.client(proxy.url, both, model="tiny-a") as c, pytest.raises(
            EncapsulationError, match="another model name"):
        c.attest()
    # and relabelling tiny-b's identity as tiny-a breaks the binding
    from dataclasses import replace

    proxy.on_response = _swap_doc(lambda d: replace(d, identity=replace(
        d.identity, name="tiny-a", model_id="tiny-a")))
    with world.client(proxy.url) as c, pytest.raises(BindingError, match="does not bind"):
        c.attest()
    assert proxy.posts() == []


def test_evidence_for_another_key_version_or_runtime_is_refused(world: World) -> None:
    policy = world.policy(models=[{"model_id": "tiny-a", "key_versions": [2]}])
    with world.client(world.urls["tiny-a"], policy) as c, pytest.raises(PolicyDenied) as e:
        c.infer(request_body())
    assert e.value.reasons == ["models[0]: key version 1 is not one of [2]"]
    rogue = world.policy(measurement=b"\x01" * 32)
    with world.client(world.urls["tiny-a"], rogue) as c, pytest.raises(PolicyDenied) as e:
        c.attest()
    assert any("measurement is" in r for r in e.value.reasons)


def test_a_replayed_attestation_is_refused(world: World, proxy: MitmProxy) -> None:
    recorded: list[bytes] = []

    def record_then_replay(q: Exchange, r: Exchange) -> Exchange:
        if "/attestation" in q.path:
            if recorded:
                r.body = recorded[0]  # an old answer, for an old nonce
            else:
                recorded.append(r.body)
        return r

    proxy.on_response = record_then_replay
    with world.client(proxy.url) as c:
        c.attest()  # the first session records a genuine answer
    with world.client(proxy.url) as c, pytest.raises(BindingError, match="another nonce"):
        c.attest()


def test_a_substituted_hpke_key_is_refused(world: World, proxy: MitmProxy) -> None:
    from dataclasses import replace

    from sealtorch.protocol import hpke

    _, pk = hpke.generate_keypair()
    proxy.on_response = _swap_doc(lambda d: replace(d, key_config=ohttp.KeyConfig(
        d.key_config.key_id, pk)))
    with world.client(proxy.url) as c, pytest.raises(BindingError, match="does not bind"):
        c.infer(request_body())
    assert proxy.posts() == []  # the client never encrypted anything to the proxy's key


# --- request and response attacks -------------------------------------------------------------
def test_a_modified_request_is_refused(world: World, proxy: MitmProxy) -> None:
    def flip(q: Exchange) -> Exchange:
        if q.method == "POST":
            b = bytearray(q.body)
            b[len(b) // 2] ^= 0x01
            q.body = bytes(b)
        return q

    proxy.on_request = flip
    with world.client(proxy.url) as c, pytest.raises(ServerRefusedError) as e:
        c.infer(request_body())
    assert e.value.refusal == "bad_encapsulation" and "does not open" in str(e.value)
    # on an established session the client attests again and resends once, then gives up
    with world.client(proxy.url) as c:
        c.attest()
        before = len(proxy.posts())
        with pytest.raises(ServerRefusedError, match="does not open"):
            c.infer(request_body())
        assert len(proxy.posts()) == before + 2


def test_a_replayed_or_redirected_request_is_refused(world: World, proxy: MitmProxy) -> None:
    with world.client(proxy.url) as c:
        c.infer(request_body())
    q, _ = proxy.posts()[0]
    headers = {"content-type": ohttp.MEDIA_REQUEST}
    url = world.urls["tiny-a"]
    replay = httpx.post(url + q.path, content=q.body, headers=headers)
    assert replay.status_code == 409 and replay.json()["code"] == "replay"
    assert "already received" in replay.json()["error"]
    moved = httpx.post(url + "/v2/models/tiny-a/versions/1/infer", content=q.body,
                       headers=headers)
    assert moved.status_code == 400 and moved.json()["code"] == "bad_encapsulation"
    other = httpx.post(world.urls["tiny-b"] + "/v2/models/tiny-b/infer", content=q.body,
                       headers=headers)
    assert other.status_code == 400 and other.json()["code"] == "bad_encapsulation"


def test_a_modified_response_is_refused(world: World, proxy: MitmProxy) -> None:
    def flip(q: Exchange, r: Exchange) -> Exchange:
        if q.method == "POST":
            b = bytearray(r.body)
            b[-5] ^= 0x01
            r.body = bytes(b)
        return r

    proxy.on_response = flip
    with world.client(proxy.url) as c, pytest.raises(EncapsulationError,
                                                     match="modified in transit"):
        c.infer(request_body())


def test_a_stripped_encryption_layer_is_refused(world: World, proxy: MitmProxy) -> None:
    fake = {"model_name": "tiny-a", "model_version": "1",
            "outputs": [{"name": "output", "datatype": "FP32", "shape": [1, 4],
                         "data": [0.0, 0.0, 0.0, 0.0]}]}

    def strip(q: Exchange, r: Exchange) -> Exchange:
        if q.method == "POST":
            r.body = json.dumps(fake).encode()
            r.headers["content-type"] = "application/json"
        return r

    proxy.on_response = strip
    with world.client(proxy.url) as c, pytest.raises(EncapsulationError,
                                                     match="encryption layer was stripped"):
        c.infer(request_body())

    def relabel(q: Exchange, r: Exchange) -> Exchange:  # ciphertext with a plaintext label
        if q.method == "POST":
            r.headers["content-type"] = "application/json"
        return r

    proxy.on_response = relabel
    with world.client(proxy.url) as c, pytest.raises(EncapsulationError, match="stripped"):
        c.infer(request_body())

    def downgrade(q: Exchange) -> Exchange:  # the request re-labelled as plaintext
        if q.method == "POST":
            q.headers["content-type"] = "application/json"
        return q

    proxy.on_response = None
    proxy.on_request = downgrade
    with world.client(proxy.url) as c, pytest.raises(ServerRefusedError) as e:
        c.infer(request_body())
    assert e.value.refusal == "plaintext_refused"


# --- receipts and the command line -------------------------------------------------------------
def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sealtorch", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_cli_infer_then_receipt_verify_and_forged_receipts(world: World, proxy: MitmProxy,
                                                           tmp_path: Path) -> None:
    pol = world.policy()
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({
        "format": FORMAT,
        "runtimes": [r.to_dict() for r in pol.runtimes],
        "models": [{"model_id": "tiny-a", "key_versions": [1]}],
        "owners": [{"server_key": world.dep.server_public_key_b64}],
        "verifier": {"sim_platform_keys": [str(world.dep.sim_dir / sim.PUBLIC_FILE)]}}))
    (tmp_path / "in.json").write_text(json.dumps(request_body()))
    files = {k: tmp_path / k for k in ("out.json", "receipt.cbor", "evidence.json")}
    p = _cli("client", "infer", proxy.url, "--policy", str(policy_file), "--input",
             str(tmp_path / "in.json"), "--output", str(files["out.json"]), "--receipt",
             str(files["receipt.cbor"]), "--evidence", str(files["evidence.json"]),
             "--unsafe-sim")
    assert p.returncode == 0, p.stderr
    assert json.loads(files["out.json"].read_text())["outputs"][0]["data"] == prelu(
        X, WEIGHTS["tiny-a"])
    assert files["out.json"].stat().st_mode & 0o777 == 0o600  # the decrypted answer
    assert "verified: sim server serving tiny-a key version 1" in p.stderr
    verify = ["receipt", "verify", str(files["receipt.cbor"]), "--evidence",
              str(files["evidence.json"]), "--policy", str(policy_file), "--unsafe-sim"]
    ok = _cli(*verify, "--request", str(tmp_path / "in.json"), "--response",
              str(files["out.json"]))
    assert ok.returncode == 0, ok.stderr
    shown = json.loads(ok.stdout)
    assert shown["valid"] is True and shown["identity"]["model_id"] == "tiny-a"
    # the response on stdout is exactly the bytes the receipt covers
    p = _cli("client", "infer", proxy.url, "--policy", str(policy_file), "--input",
             str(tmp_path / "in.json"), "--receipt", str(tmp_path / "r2.cbor"), "--unsafe-sim")
    assert p.returncode == 0, p.stderr
    (tmp_path / "stdout.json").write_text(p.stdout)
    ok = _cli("receipt", "verify", str(tmp_path / "r2.cbor"), "--evidence",
              str(files["evidence.json"]), "--policy", str(policy_file), "--unsafe-sim",
              "--response", str(tmp_path / "stdout.json"))
    assert ok.returncode == 0, ok.stderr
    # a receipt for other bytes than these
    (tmp_path / "other.json").write_text(json.dumps(request_body([1.0, 2.0, 3.0, 4.0])))
    bad = _cli(*verify, "--request", str(tmp_path / "other.json"))
    assert bad.returncode == 2 and "receipt_invalid" in bad.stderr
    assert "request digest" in bad.stderr
    # a forged receipt: the same claims signed by a key that is not the attested one
    import cbor2
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sealtorch.e2e.receipt import ReceiptClaims, ReceiptSigner

    claims = ReceiptClaims.from_cbor_map(cbor2.loads(cbor2.loads(
        files["receipt.cbor"].read_bytes()).value[2]))
    forged = tmp_path / "forged.cbor"
    forged.write_bytes(ReceiptSigner(Ed25519PrivateKey.generate()).sign(claims))
    bad = _cli(*[forged.as_posix() if a == str(files["receipt.cbor"]) else a for a in verify])
    assert bad.returncode == 2 and "receipt_invalid" in bad.stderr
    assert "not signed with EdDSA by the attested receipt key" in bad.stderr
    # evidence of another server: its receipt key is not the one that signed
    other_doc = tmp_path / "other-evidence.json"
    other_doc.write_bytes(_fresh_doc(world.urls["tiny-b"]).to_json())
    bad = _cli(*[str(other_doc) if a == str(files["evidence.json"]) else a for a in verify])
    assert bad.returncode == 2, bad.stderr
    # without --unsafe-sim the sim evidence itself is refused
    bad = _cli(*verify[:-1])
    assert bad.returncode == 2 and "sim evidence, which protects nothing" in bad.stderr


def test_cli_refuses_with_the_policy_reasons(world: World, tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({
        "format": FORMAT,
        "runtimes": [{"tee": "sim", "measurement": "01" * 32, "platform_key": world.platform}],
        "models": [{"model_id": "tiny-a"}],
        "owners": [{"server_key": world.dep.server_public_key_b64}],
        "verifier": {"sim_platform_keys": [str(world.dep.sim_dir / sim.PUBLIC_FILE)]}}))
    (tmp_path / "in.json").write_text(json.dumps(request_body()))
    p = _cli("client", "infer", world.urls["tiny-a"], "--policy", str(policy_file), "--input",
             str(tmp_path / "in.json"), "--unsafe-sim")
    assert p.returncode == 2 and "error [policy_denied]" in p.stderr
    assert "runtimes[0] (sim identity): measurement is" in p.stderr
    assert p.stdout == ""
    # sim is for loopback only
    p = _cli("client", "infer", "http://10.0.0.1:8080", "--policy", str(policy_file),
             "--input", str(tmp_path / "in.json"), "--unsafe-sim")
    assert p.returncode == 2 and "loopback" in p.stderr
