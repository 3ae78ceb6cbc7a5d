"""``AttestedClient``: verify the inference server first, then send only encrypted requests.

    policy = ClientPolicy.load("client-policy.toml")
    with AttestedClient("https://infer.example", policy) as client:
        result = client.infer({"inputs": [...]})      # attests on first use
        result.json()["outputs"], result.receipt     # the answer and its signed receipt

The client fetches ``/v2/attestation`` with a fresh nonce, verifies the evidence and the served
identity against its policy (:func:`~sealtorch.client.verify.verify_attestation`), pins the
attested HPKE and receipt keys for the session, and refuses to send anything otherwise. Each
request is encapsulated to the pinned key; each answer must open with the request's secret and
carry a receipt signed by the pinned receipt key over this request and this response.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sealtorch._net import is_loopback_url
from sealtorch.client.policy import ClientPolicy
from sealtorch.client.verify import VerifiedServer, check_receipt_time, verify_attestation
from sealtorch.e2e import ohttp
from sealtorch.e2e.document import MAX_JSON, AttestationDocument, encode_nonce
from sealtorch.e2e.receipt import ReceiptClaims, check_receipt, verify_receipt
from sealtorch.errors import (
    ConfigError,
    EncapsulationError,
    ServerRefusedError,
    ServiceUnavailableError,
)

MAX_RESPONSE = 256 * 1024 * 1024
_MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class InferResult:
    """A verified answer: the model's status and body, and the receipt that signs both."""

    status: int
    body: bytes = field(repr=False)
    receipt: bytes = field(repr=False)
    receipt_claims: ReceiptClaims

    def json(self) -> Any:
        """The OIP response body, parsed."""
        return json.loads(self.body)


def _refusal(r: Any, what: str) -> ServerRefusedError:
    try:
        doc = r.json()
        msg = str(doc.get("error", ""))[:300]
        code = str(doc.get("code", "")) or f"http_{r.status_code}"
    except (ValueError, AttributeError):
        msg, code = "", f"http_{r.status_code}"
    if not msg.isprintable():
        msg = ""
    return ServerRefusedError(f"the server refused {what} (HTTP {r.status_code}, {code})"
                              + (f": {msg}" if msg else ""), code[:32])


class AttestedClient:
    """An end-to-end session with one inference server (see the module docstring).

    ``model`` names the served model to attest (``None``: the server's only model);
    ``unsafe_sim`` accepts sim evidence (protects nothing; loopback URLs only); ``verify`` is
    httpx's TLS setting for ``https`` URLs; ``clock`` gives unix seconds (request times and the
    receipt time check).
    """

    def __init__(self, url: str, policy: ClientPolicy, *, model: str | None = None,
                 unsafe_sim: bool = False, timeout: float = 120.0, verify: Any = True,
                 clock: Callable[[], float] = time.time) -> None:
        import httpx

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
            raise ConfigError("the server URL must be http(s)://HOST[:PORT][/PREFIX]")
        if model is not None and not _MODEL_NAME.fullmatch(model):
            raise ConfigError("the model name must be 1-64 characters of letters, digits, "
                              "'-', '_' and '.'")
        if unsafe_sim and not is_loopback_url(url):
            raise ConfigError("sim evidence is accepted only from loopback URLs (127.0.0.1, "
                              "::1, localhost): sim protects nothing")
        self.url = url.rstrip("/")
        self.policy = policy
        self.model = model
        self.unsafe_sim = unsafe_sim
        self._verifiers = policy.verifier_set(unsafe_sim=unsafe_sim)
        self._clock = clock
        self._http = httpx.Client(timeout=timeout, verify=verify, follow_redirects=False)
        self.server: VerifiedServer | None = None

    def __repr__(self) -> str:
        return f"AttestedClient({self.url!r}, attested={'yes' if self.server else 'no'})"

    def close(self) -> None:
        """Close the HTTP connection pool and forget the pinned keys."""
        self._http.close()
        self.server = None

    def __enter__(self) -> AttestedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, path: str, **kw: Any) -> Any:
        import httpx

        try:
            return self._http.get(self.url + path, **kw)
        except httpx.HTTPError as e:
            raise ServiceUnavailableError(f"cannot reach the inference server at {self.url} "
                                          f"({type(e).__name__})") from None

    def fetch_attestation(self, nonce: bytes) -> AttestationDocument:
        """GET the attestation document for ``nonce`` (parsed, not verified)."""
        path = (f"/v2/models/{self.model}/attestation" if self.model else "/v2/attestation")
        r = self._get(path, params={"nonce": encode_nonce(nonce)})
        if r.status_code != 200:
            raise _refusal(r, "to attest")
        if len(r.content) > MAX_JSON:
            raise EncapsulationError("the attestation document is too large")
        return AttestationDocument.from_json(r.content)

    def attest(self) -> VerifiedServer:
        """Fetch fresh evidence, verify it against the policy and pin the keys."""
        import os

        self.server = None
        nonce = os.urandom(32)
        doc = self.fetch_attestation(nonce)
        verified = verify_attestation(doc, nonce=nonce, policy=self.policy,
                                      verifiers=self._verifiers)
        if self.model is not None and verified.identity.name != self.model:
            raise EncapsulationError("the server attested another model name than the one "
                                     "requested; refusing it")
        self.server = verified
        return verified

    def infer(self, request: bytes | dict[str, Any]) -> InferResult:
        """Send one OIP inference request end to end; return the verified answer.

        Raises :class:`ServerRefusedError` when the server or the model refused the request
        (after the refusal itself was verified, when it came encrypted). When the server could
        not open the request (``bad_encapsulation``: it restarted with new keys, or the request
        was altered on the way) the client attests again, with a fresh nonce and every check,
        and resends once.
        """
        body = request if isinstance(request, bytes) else json.dumps(request).encode()
        attested_now = self.server is None
        try:
            return self._infer(body)
        except ServerRefusedError as e:
            if e.refusal != "bad_encapsulation" or attested_now:
                raise
        self.attest()
        return self._infer(body)

    def _infer(self, body: bytes) -> InferResult:
        import httpx

        server = self.server or self.attest()
        name = server.identity.name
        path = f"/v2/models/{name}/infer"
        data, ctx = ohttp.encapsulate_request(  # the OIP path is bound, not a URL prefix
            server.key_config, method="POST", path=path, model=name, body=body,
            timestamp_ms=int(self._clock() * 1000))
        try:
            try:
                r = self._http.post(self.url + path, content=data, headers={
                    "content-type": ohttp.MEDIA_REQUEST, "accept": ohttp.MEDIA_RESPONSE})
            except httpx.HTTPError as e:
                raise ServiceUnavailableError(f"cannot reach the inference server at "
                                              f"{self.url} ({type(e).__name__})") from None
            if r.status_code != 200:
                raise _refusal(r, "the request")
            ctype = r.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != ohttp.MEDIA_RESPONSE:
                raise EncapsulationError(
                    f"the answer is not an encrypted response ({ohttp.MEDIA_RESPONSE}); "
                    "refusing it: the encryption layer was stripped on the way, or this is not "
                    "the attested server")
            if len(r.content) > MAX_RESPONSE:
                raise EncapsulationError("the encrypted response is too large")
            inner = ohttp.decapsulate_response(ctx, r.content)
        finally:
            ctx.wipe()
        claims = verify_receipt(inner.receipt, server.receipt_key)
        check_receipt(claims, nonce=ctx.nonce, identity=server.identity,
                      target=f"POST {path}", hpke_key_digest=server.hpke_key_digest,
                      request_digest=hashlib.sha256(body).digest(),
                      response_digest=hashlib.sha256(inner.body).digest())
        check_receipt_time(claims, now=self._clock(),
                           max_skew=self.policy.verifier.max_receipt_skew_seconds)
        if claims.status != inner.status:
            raise EncapsulationError("the receipt names another status than the response")
        result = InferResult(inner.status, inner.body, inner.receipt, claims)
        if not 200 <= inner.status < 300:
            try:
                msg = str(result.json().get("error", ""))[:300]
            except (ValueError, AttributeError):
                msg = ""
            raise ServerRefusedError(f"the model refused the request (HTTP {inner.status})"
                                     + (f": {msg}" if msg.isprintable() and msg else ""),
                                     f"http_{inner.status}")
        return result
