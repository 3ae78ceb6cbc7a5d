"""The client session and the middleware against an in-process server (tiny model, sim TEE):
receipts the client must refuse, clocks, endpoint errors and limits."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import httpx
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealtorch.client import AttestedClient
from sealtorch.e2e import ohttp
from sealtorch.e2e.document import encode_nonce
from sealtorch.e2e.receipt import ReceiptSigner
from sealtorch.errors import AttestationError, ConfigError, ReceiptError, ServerRefusedError
from sealtorch.runtime.app import ServeOptions, build_app
from sealtorch.runtime.attested import E2EMiddleware, Gateway
from sealtorch.runtime.localserver import LocalServer
from sealtorch.runtime.model import ServedModel

from .conftest import IDENTITY, SimPlatform, make_policy

BODY = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                    "data": [1.0, -2.0, 3.0, -4.0]}]}


@dataclass
class Server:
    url: str
    gateway: Gateway
    app: Any


class FailingAttester:
    tee = "sim"

    def attest(self, report_data: bytes) -> Any:
        raise AttestationError("the TEE is gone")


@pytest.fixture(scope="module")
def server(platform: SimPlatform) -> Iterator[Server]:
    app = build_app(ServedModel("tiny", torch.nn.PReLU(), input_shape=(4,)),
                    ServeOptions(max_batch=2, rate_per_second=0))
    gw = Gateway(platform.attester(), [IDENTITY])
    e2e = E2EMiddleware(app, gw, registry=app.state.metrics.registry, attest_rate=1000,
                        attest_burst=1000, max_request_bytes=64 * 1024)
    with LocalServer(e2e) as srv:
        yield Server(srv.url, gw, e2e)


def client(server: Server, platform: SimPlatform, **kw: Any) -> AttestedClient:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return AttestedClient(server.url, make_policy(platform), unsafe_sim=True, **kw)


def test_round_trip_and_receipt(server: Server, platform: SimPlatform) -> None:
    with client(server, platform) as c:
        r = c.infer(BODY)
        assert r.json()["outputs"][0]["data"] == [1.0, -0.5, 3.0, -1.0]
        assert r.receipt_claims.status == 200 and r.receipt_claims.identity == IDENTITY
        # several requests on one attested session, each with its own receipt
        ids = {c.infer(BODY).receipt_claims.receipt_id for _ in range(3)}
        assert len(ids) == 3
        # a model error comes back encrypted and receipted, then raised
        with pytest.raises(ServerRefusedError, match="HTTP 400"):
            c.infer({"inputs": []})
    metrics = httpx.get(server.url + "/metrics").text
    assert 'sealtorch_serve_e2e_requests_total{outcome="ok"}' in metrics
    assert 'sealtorch_serve_attestations_total{outcome="ok"}' in metrics


def test_a_receipt_not_signed_by_the_attested_key_is_refused(server: Server,
                                                             platform: SimPlatform) -> None:
    with client(server, platform) as c:
        c.attest()
        real = server.gateway._signer
        server.gateway._signer = ReceiptSigner(Ed25519PrivateKey.generate())
        try:
            with pytest.raises(ReceiptError, match="not signed with EdDSA by the attested"):
                c.infer(BODY)
        finally:
            server.gateway._signer = real
        assert c.infer(BODY).status == 200


def test_a_receipt_for_something_else_is_refused(server: Server,
                                                 platform: SimPlatform) -> None:
    real_seal = server.gateway.seal

    def lying_seal(opened: Any, *, status: int, body: bytes) -> bytes:
        # a server (or a confused one) that signs another identity than it attested
        return real_seal(replace(opened, identity=replace(IDENTITY, key_version=7)),
                         status=status, body=body)

    with client(server, platform) as c:
        c.attest()
        server.gateway.seal = lying_seal  # type: ignore[method-assign]
        try:
            with pytest.raises(ReceiptError, match="another served model identity"):
                c.infer(BODY)
        finally:
            del server.gateway.seal


def test_a_restarted_server_is_attested_again(server: Server, platform: SimPlatform) -> None:
    with client(server, platform) as c:
        first = c.attest()
        old = server.app.gateway
        server.app.gateway = Gateway(platform.attester(), [IDENTITY])  # new keys, as at start
        try:
            assert c.infer(BODY).status == 200
            assert c.server is not None and c.server.receipt_key != first.receipt_key
            assert c.server.key_config == server.app.gateway.key_config
        finally:
            server.app.gateway = old


def test_clock_skew_is_refused_on_both_sides(server: Server, platform: SimPlatform) -> None:
    with client(server, platform, clock=lambda: time.time() + 3600) as c:
        with pytest.raises(ServerRefusedError) as e:
            c.infer(BODY)
        assert e.value.refusal == "replay" and "ahead of the server's clock" in str(e.value)
    # the server's receipt time against a client clock an hour behind (window 120 s on the
    # server: the request itself is still fresh when sent with a real time)
    times = iter([time.time(), time.time() - 3600])
    with client(server, platform, clock=lambda: next(times)) as c:
        with pytest.raises(ReceiptError, match="more than 300 s away"):
            c.infer(BODY)


def test_attestation_endpoint_errors(server: Server, platform: SimPlatform) -> None:
    url = server.url
    n = encode_nonce(os.urandom(32))
    assert httpx.get(url + "/v2/attestation", params={"nonce": n}).status_code == 200
    assert httpx.get(url + "/v2/models/tiny/attestation", params={"nonce": n}).status_code == 200
    assert httpx.get(url + "/v2/models/tiny/versions/1/attestation",
                     params={"nonce": n}).status_code == 200
    for params in ({}, {"nonce": "short"}, {"nonce": n, "x": "1"}, {"nonce": n + "="}):
        r = httpx.get(url + "/v2/attestation", params=params)
        assert r.status_code == 400 and r.json()["code"] == "bad_nonce", params
    r = httpx.get(url + f"/v2/attestation?nonce={n}&nonce={n}")
    assert r.status_code == 400
    assert httpx.get(url + "/v2/models/other/attestation",
                     params={"nonce": n}).status_code == 404
    assert httpx.post(url + "/v2/attestation", params={"nonce": n}).status_code == 405


def test_attester_failure_and_rate_limit(platform: SimPlatform) -> None:
    app = build_app(ServedModel("tiny", torch.nn.PReLU(), input_shape=(4,)),
                    ServeOptions(max_batch=1, rate_per_second=0))
    gw = Gateway(FailingAttester(), [IDENTITY])
    with LocalServer(E2EMiddleware(app, gw, attest_rate=0.001, attest_burst=2)) as srv:
        n = encode_nonce(os.urandom(32))
        answers = [httpx.get(srv.url + "/v2/attestation", params={"nonce": n})
                   for _ in range(3)]
        assert [a.status_code for a in answers] == [503, 503, 429]
        assert answers[0].json()["code"] == "attestation_failed"
        assert "the TEE is gone" not in answers[0].text
        assert answers[2].headers["retry-after"]


def test_request_limits_and_garbage(server: Server, platform: SimPlatform) -> None:
    headers = {"content-type": ohttp.MEDIA_REQUEST}
    url = server.url + "/v2/models/tiny/infer"
    r = httpx.post(url, content=b"\x00" * (64 * 1024 + 1), headers=headers)
    assert r.status_code == 413 and r.json()["code"] == "too_large"
    r = httpx.post(url, content=b"garbage", headers=headers)
    assert r.status_code == 400 and r.json()["code"] == "bad_encapsulation"
    r = httpx.post(server.url + "/v2/models/other/infer", content=b"garbage", headers=headers)
    assert r.status_code == 404
    # a well-formed request for a key this server does not have
    with client(server, platform) as c:
        doc = c.attest().document
    from sealtorch.protocol import hpke

    _, pk = hpke.generate_keypair()
    data, _ = ohttp.encapsulate_request(ohttp.KeyConfig(doc.key_config.key_id, pk),
                                        method="POST", path="/v2/models/tiny/infer",
                                        model="tiny", body=b"{}",
                                        timestamp_ms=int(time.time() * 1000))
    r = httpx.post(url, content=data, headers=headers)
    assert r.status_code == 400 and "does not open" in r.json()["error"]


def test_client_settings_are_checked(platform: SimPlatform) -> None:
    pol = make_policy(platform)
    for url in ("ftp://127.0.0.1", "http://", "http://127.0.0.1/?x=1"):
        with pytest.raises(ConfigError):
            AttestedClient(url, pol)
    with pytest.raises(ConfigError, match="loopback"):
        AttestedClient("http://192.0.2.1:8080", pol, unsafe_sim=True)
    for name in ("a/b", "x?y", "", "m" * 65):
        with pytest.raises(ConfigError, match="model name"):
            AttestedClient("http://127.0.0.1:1", pol, model=name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for url in ("http://localhost:1", "http://[::1]:1", "http://127.0.0.2:1"):
            AttestedClient(url, pol, unsafe_sim=True).close()


def test_unreachable_server(platform: SimPlatform) -> None:
    import socket

    from sealtorch.errors import ServiceUnavailableError
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        c = AttestedClient(f"http://127.0.0.1:{port}", make_policy(platform), unsafe_sim=True)
    with c, pytest.raises(ServiceUnavailableError, match="cannot reach"):
        c.attest()
