"""The client's trust decisions: is this attestation document acceptable, is this receipt?

Both are plain functions over typed inputs (the verifier set does the signature and chain
checks; time is an argument), used by :class:`~sealtorch.client.session.AttestedClient` and
by ``sealtorch receipt verify``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Any

from sealtorch.attestation import binding
from sealtorch.attestation.binding import ServedIdentity
from sealtorch.attestation.claims import Claims
from sealtorch.attestation.policy import Decision
from sealtorch.client.policy import ClientPolicy, evaluate
from sealtorch.e2e.document import AttestationDocument
from sealtorch.e2e.ohttp import KeyConfig
from sealtorch.e2e.receipt import ReceiptClaims, check_receipt, verify_receipt
from sealtorch.errors import BindingError, ReceiptError, VerificationError


@dataclass(frozen=True)
class VerifiedServer:
    """An attestation document that passed every check: the keys a client may pin."""

    document: AttestationDocument
    claims: Claims
    decision: Decision

    @property
    def identity(self) -> ServedIdentity:
        """What the server serves."""
        return self.document.identity

    @property
    def key_config(self) -> KeyConfig:
        """The attested HPKE key configuration."""
        return self.document.key_config

    @property
    def receipt_key(self) -> bytes:
        """The attested receipt key (raw Ed25519)."""
        return self.document.receipt_key

    @property
    def hpke_key_digest(self) -> bytes:
        """SHA-256 of the attested HPKE public key (as receipts name it)."""
        return hashlib.sha256(self.document.key_config.public_key).digest()


def verify_attestation(document: AttestationDocument, *, nonce: bytes | None,
                       policy: ClientPolicy, verifiers: Any, now: int | None = None
                       ) -> VerifiedServer:
    """Check a server's attestation document; raise saying why it is refused.

    In order: the document answers this client's ``nonce`` (``None`` only offline, where
    freshness was established when the document was fetched); the evidence verifies
    (``verifiers``, at ``now``); its report data binds the nonce, both keys, the TLS key and
    the served identity; the client's policy allows the claims and the identity.
    """
    if nonce is not None and not hmac.compare_digest(document.nonce, nonce):
        raise BindingError("the attestation document answers another nonce than this client's "
                           "(a replayed or stale answer); refusing it")
    if document.evidence.tee == "sim" and not verifiers.sim_enabled:
        raise VerificationError(
            "the server presents sim evidence, which protects nothing; refusing it (allow sim "
            "explicitly, for development on loopback only: --unsafe-sim / unsafe_sim=True, with "
            "the sim platform key in the policy's [verifier] sim_platform_keys)")
    claims = verifiers.verify(document.evidence, now=now)
    binding.check_serve(claims, nonce=document.nonce, kem_id=document.key_config.kem_id,
                        hpke_public_key=document.key_config.public_key,
                        receipt_public_key=document.receipt_key,
                        tls_public_key=document.tls_public_key, identity=document.identity)
    decision = evaluate(policy, claims, document.identity)
    decision.raise_if_denied()
    return VerifiedServer(document, claims, decision)


def check_receipt_time(claims: ReceiptClaims, *, now: float, max_skew: int) -> None:
    """Refuse a receipt whose time is more than ``max_skew`` seconds from ``now``."""
    if abs(claims.issued_at - now) > max_skew:
        raise ReceiptError(f"the receipt's time is more than {max_skew} s away from this "
                           "client's clock")


def verify_receipt_offline(receipt: bytes, server: VerifiedServer, *,
                           request: bytes | None = None, response: bytes | None = None
                           ) -> ReceiptClaims:
    """Check a saved receipt against a verified attestation document (and, if given, the
    request and response bodies it should name)."""
    claims = verify_receipt(receipt, server.receipt_key)
    name = re.escape(server.identity.name)
    if not re.fullmatch(rf"POST /v2/models/{name}(/versions/[^/]{{1,64}})?/infer", claims.target):
        raise ReceiptError("the receipt names another endpoint than the attested model's "
                           "inference endpoint")
    check_receipt(claims, nonce=None, identity=server.identity, target=None,
                  hpke_key_digest=server.hpke_key_digest,
                  request_digest=None if request is None else hashlib.sha256(request).digest(),
                  response_digest=None if response is None else hashlib.sha256(
                      response).digest())
    return claims
