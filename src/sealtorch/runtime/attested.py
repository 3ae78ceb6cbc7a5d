"""Attested, end-to-end encrypted inference for any ASGI app (``sealtorch serve``, KServe).

:class:`Gateway` holds what the server proves and uses: an HPKE key pair and an Ed25519 receipt
key generated in this process (inside the TEE) at start, the attester, and the identities of the
models served. :class:`E2EMiddleware` wraps an Open Inference Protocol app:

- ``GET /v2/attestation?nonce=`` and ``GET /v2/models/{name}/attestation?nonce=`` answer a fresh
  :class:`~sealtorch.e2e.document.AttestationDocument` (evidence over the nonce, both keys and
  the served identity);
- ``POST /v2/models/{name}[/versions/{v}]/infer`` with ``Content-Type: message/ohttp-req`` is
  opened (HPKE, replay guard), passed to the app as plain JSON, and its answer returned as
  ``message/ohttp-res`` with a signed receipt inside;
- a plaintext inference request is refused (415) unless ``allow_plaintext`` (``sealtorch serve
  --unsafe-allow-plaintext``); every other path goes to the app unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealtorch.attestation import binding
from sealtorch.attestation.binding import ServedIdentity
from sealtorch.e2e import ohttp
from sealtorch.e2e.document import AttestationDocument, decode_nonce
from sealtorch.e2e.receipt import ReceiptClaims, ReceiptSigner, new_receipt_id
from sealtorch.e2e.replay import ReplayGuard
from sealtorch.errors import (
    AttestationError,
    EncapsulationError,
    ProtocolError,
    ReplayError,
    ServeError,
)
from sealtorch.protocol import hpke
from sealtorch.runtime.asgi import (
    ASGIApp,
    BodyRefused,
    Message,
    Receive,
    Scope,
    Send,
    check_content_length,
    header,
    read_body,
    send_body,
    send_json,
)
from sealtorch.runtime.ratelimit import RateLimiter

log = logging.getLogger("sealtorch.serve")


_NAME = r"(?P<name>[A-Za-z0-9_.-]{1,64})"
ATTEST_RE = re.compile(rf"/v2(?:/models/{_NAME}(?:/versions/[^/]{{1,64}})?)?/attestation")
INFER_RE = re.compile(rf"/v2/models/{_NAME}(?:/versions/[^/]{{1,64}})?/infer")
MAX_RESPONSE_BYTES = 256 * 1024 * 1024
#: ASGI scope key: answer in JSON only (no binary tensor data, whose length is a header)
JSON_ONLY = "sealtorch.json_only"
_BODY_HEADERS = (b"content-type", b"content-length", b"inference-header-content-length",
                 b"content-encoding", b"transfer-encoding")


@dataclass
class Opened:
    """One opened request: what the response and its receipt need."""

    inner: ohttp.InnerRequest
    enc: bytes
    identity: ServedIdentity
    target: str
    request_digest: bytes = field(repr=False)


class Gateway:
    """The end-to-end state of one server (keys born here; nothing is read from disk)."""

    def __init__(self, attester: Any, identities: Sequence[ServedIdentity], *,
                 tls_public_key: bytes = b"", replay: ReplayGuard | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if not identities:
            raise ServeError("an attested server needs the identity of at least one model")
        self.attester = attester
        self.identities = {i.name: i for i in identities}
        if len(self.identities) != len(identities):
            raise ServeError("served model names must be unique")
        self.tls_public_key = bytes(tls_public_key)
        self._hpke_sk, pk = hpke.generate_keypair()
        self.key_config = ohttp.KeyConfig(key_id=hashlib.sha256(pk).digest()[0], public_key=pk)
        self.hpke_key_digest = hashlib.sha256(pk).digest()
        self._signer = ReceiptSigner(Ed25519PrivateKey.generate())
        self.receipt_key = self._signer.public_key
        self.replay = replay or ReplayGuard(clock=clock)
        self._clock = clock

    def __repr__(self) -> str:
        return f"Gateway(models={sorted(self.identities)}, key_id={self.key_config.key_id})"

    def identity(self, name: str | None) -> ServedIdentity:
        """The identity of model ``name`` (``None``: the only model); raises ``KeyError``."""
        if name is None:
            if len(self.identities) != 1:
                raise KeyError("several models are served; name one")
            return next(iter(self.identities.values()))
        return self.identities[name]

    def attest(self, nonce: bytes, name: str | None = None) -> AttestationDocument:
        """Fresh evidence binding ``nonce``, both keys and the identity of ``name``."""
        identity = self.identity(name)
        evidence = self.attester.attest(binding.serve_report_data(
            nonce=nonce, kem_id=self.key_config.kem_id,
            hpke_public_key=self.key_config.public_key, receipt_public_key=self.receipt_key,
            tls_public_key=self.tls_public_key, identity=identity))
        return AttestationDocument(
            nonce=nonce, evidence=evidence, key_config=self.key_config,
            receipt_key=self.receipt_key, tls_public_key=self.tls_public_key,
            identity=identity)

    def open(self, data: bytes, *, method: str, path: str, name: str) -> Opened:
        """Decapsulate a request to model ``name`` and check it against the replay guard."""
        identity = self.identities[name]
        inner, enc = ohttp.decapsulate_request(data, self._hpke_sk, self.key_config,
                                               method=method, path=path, model=name)
        try:
            self.replay.check(inner.nonce, inner.timestamp_ms)
        except ReplayError:
            inner.response_secret.wipe()
            raise
        return Opened(inner, enc, identity, f"{method} {path}",
                      hashlib.sha256(inner.body).digest())

    def seal(self, opened: Opened, *, status: int, body: bytes) -> bytes:
        """Sign the receipt and encapsulate the response to ``opened``'s secret."""
        claims = ReceiptClaims(
            issued_at=int(self._clock()), receipt_id=new_receipt_id(),
            nonce=opened.inner.nonce, identity=opened.identity, target=opened.target,
            hpke_key_digest=self.hpke_key_digest, request_digest=opened.request_digest,
            response_digest=hashlib.sha256(body).digest(), status=status)
        try:
            return ohttp.encapsulate_response(opened.inner.response_secret, opened.enc,
                                              status=status, body=body,
                                              receipt=self._signer.sign(claims))
        finally:
            opened.inner.response_secret.wipe()


class _Metrics:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter

        self.requests = Counter("sealtorch_serve_e2e_requests", "End-to-end inference requests "
                                "by outcome", ["outcome"], registry=registry)
        self.attestations = Counter("sealtorch_serve_attestations", "Attestation requests by "
                                    "outcome", ["outcome"], registry=registry)


class E2EMiddleware:
    """ASGI middleware adding attestation and end-to-end encryption to an OIP app.

    ``max_request_bytes`` bounds an encapsulated request; ``attest_rate``/``attest_burst`` limit
    attestation requests per client (each one asks the TEE for evidence); ``registry`` is a
    Prometheus registry to count outcomes in (optional).
    """

    def __init__(self, app: ASGIApp, gateway: Gateway, *, allow_plaintext: bool = False,
                 max_request_bytes: int = 64 * 1024 * 1024, attest_rate: float = 10.0,
                 attest_burst: int = 20, registry: Any = None) -> None:
        self.app = app
        self.gateway = gateway
        self.allow_plaintext = allow_plaintext
        self.max_request_bytes = max_request_bytes
        self._attest_limiter = RateLimiter(attest_rate, attest_burst)
        self._metrics = _Metrics(registry) if registry is not None else None
        if allow_plaintext:
            log.warning("plaintext inference is allowed (--unsafe-allow-plaintext): the host "
                        "and any proxy can read those inputs and outputs")

    def _count(self, kind: str, outcome: str) -> None:
        if self._metrics is not None:
            getattr(self._metrics, kind).labels(outcome).inc()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if (m := ATTEST_RE.fullmatch(path)) is not None:
            await self._attestation(scope, send, m.group("name"))
            return
        if method == "POST" and (m := INFER_RE.fullmatch(path)) is not None:
            ctype = header(scope, b"content-type").split(";")[0].strip().lower()
            if ctype == ohttp.MEDIA_REQUEST:
                await self._e2e(scope, receive, send, m.group("name"))
                return
            if not self.allow_plaintext:
                self._count("requests", "plaintext_refused")
                await send_json(send, 415, {
                    "error": "this server accepts only end-to-end encrypted inference requests "
                             f"(Content-Type: {ohttp.MEDIA_REQUEST}); use sealtorch.client or "
                             "`sealtorch client infer`", "code": "plaintext_refused"})
                return
        await self.app(scope, receive, send)

    async def _attestation(self, scope: Scope, send: Send, name: str | None) -> None:
        import anyio

        if scope["method"] != "GET":
            await send_json(send, 405, {"error": "method not allowed on this endpoint"})
            return
        client = scope["client"][0] if scope.get("client") else "unknown"
        if not self._attest_limiter.allow(client):
            self._count("attestations", "rate_limited")
            await send_json(send, 429, {"error": "attestation rate limit exceeded; slow down"},
                             {"retry-after": str(self._attest_limiter.retry_after())})
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"),
                         keep_blank_values=True, max_num_fields=4)
        try:
            if set(query) != {"nonce"} or len(query["nonce"]) != 1:
                raise ProtocolError("the query must be exactly ?nonce=<32 bytes base64url>")
            nonce = decode_nonce(query["nonce"][0])
        except (ProtocolError, ValueError) as e:
            self._count("attestations", "bad_request")
            await send_json(send, 400, {"error": str(e), "code": "bad_nonce"})
            return
        try:
            self.gateway.identity(name)
        except KeyError:
            self._count("attestations", "unknown_model")
            await send_json(send, 404, {"error": "unknown model name (or several models are "
                                                  "served: use /v2/models/NAME/attestation)"})
            return
        try:
            doc = await anyio.to_thread.run_sync(self.gateway.attest, nonce, name)
        except AttestationError as e:
            log.error("attestation failed: %s", e)
            self._count("attestations", "failed")
            await send_json(send, 503, {"error": "the TEE could not produce evidence; see the "
                                                  "server log", "code": e.code})
            return
        self._count("attestations", "ok")
        await send_body(send, 200, doc.to_json(), "application/json")

    async def _e2e(self, scope: Scope, receive: Receive, send: Send, name: str) -> None:
        import anyio

        if name not in self.gateway.identities:
            await self.app(scope, receive, send)  # the app answers 404 for unknown models
            return
        try:
            check_content_length(header(scope, b"content-length"), self.max_request_bytes)
            data = await read_body(receive, self.max_request_bytes)
            opened = await anyio.to_thread.run_sync(lambda: self.gateway.open(
                data, method=scope["method"], path=scope["path"], name=name))
        except BodyRefused as e:
            self._count("requests", e.code)
            await send_json(send, e.status, {"error": e.message, "code": e.code})
            return
        except (EncapsulationError, ReplayError) as e:
            log.info("end-to-end request refused: %s", e.code)
            self._count("requests", e.code)
            await send_json(send, 409 if isinstance(e, ReplayError) else 400,
                             {"error": str(e), "code": e.code})
            return
        status, body = await self._call_app(scope, receive, opened.inner.body)
        response = await anyio.to_thread.run_sync(
            lambda: self.gateway.seal(opened, status=status, body=body))
        self._count("requests", "ok")
        await send_body(send, 200, response, ohttp.MEDIA_RESPONSE)

    async def _call_app(self, scope: Scope, receive: Receive, body: bytes) -> tuple[int, bytes]:
        """Run the app on the plaintext request; return its status and body."""
        inner_scope = dict(scope)
        # the host's headers must not change how the decrypted body is read: the inner
        # request is plain JSON whatever the outer one says (no binary data header)
        inner_scope["headers"] = [(k, v) for k, v in scope["headers"]
                                  if k.lower() not in _BODY_HEADERS] + [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii"))]
        inner_scope[JSON_ONLY] = True  # the encapsulated answer carries a body, no headers
        delivered = False
        status = 500
        chunks: list[bytes] = []
        size = 0

        async def inner_receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def inner_send(message: Message) -> None:
            nonlocal status, size
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                chunk = bytes(message.get("body", b""))
                size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    raise ServeError("the inference response is too large to encrypt")
                chunks.append(chunk)

        try:
            await self.app(inner_scope, inner_receive, inner_send)
        except Exception as e:  # the app failed: the client gets an encrypted 500
            log.error("inference app failed under an end-to-end request: %s", type(e).__name__)
            return 500, b'{"error":"inference failed; see the server log"}'
        return status, b"".join(chunks)
