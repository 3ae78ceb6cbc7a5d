"""Report-data binding: tie evidence to one nonce, one ephemeral public key and one audience.

``report_data = SHA-512(lp("sealtorch/v1") || lp(role) || lp(nonce) || lp(kem_id) ||
lp(public_key) || lp(audience))`` where ``lp(x)`` is a 4-byte big-endian length then ``x``; the
length prefixes make the encoding unambiguous (no two field splits give the same bytes).

The ``serve`` role (an inference server attesting itself to its *clients*) has its own field
list, after the same label and its role name, so it can never collide with ``remote``/``local``:
``lp("sealtorch/v1") || lp("serve") || lp(nonce) || lp(kem_id) || lp(hpke_public_key) ||
lp(receipt_public_key) || lp(tls_public_key) || lp(name) || lp(model_id) || lp(key_version) ||
lp(header_digest) || lp(policy_version) || lp(factory) || lp(tenant) || lp(server_key_id)``
(integers as 8-byte big-endian; ``tls_public_key`` is the DER SubjectPublicKeyInfo of the TLS
certificate when TLS terminates inside the TEE, and empty when it does not).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sealtorch.errors import BindingError
from sealtorch.ids import MODEL_ID_RULE, is_model_id

if TYPE_CHECKING:
    from sealtorch.attestation.claims import Claims

LABEL = b"sealtorch/v1"
ROLES = ("remote", "local")
KEM_X25519_SHA256 = 0x0020
KEM_IDS = (KEM_X25519_SHA256,)
NONCE_LEN = 32
PUBLIC_KEY_LEN = {KEM_X25519_SHA256: 32}
AUDIENCE_LEN = 32


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def encode(role: str, nonce: bytes, kem_id: int, public_key: bytes, audience: bytes) -> bytes:
    """The length-prefixed encoding that is hashed (validated; exposed for tests)."""
    if role not in ROLES:
        raise BindingError(f"binding role must be one of {', '.join(ROLES)}")
    if not isinstance(nonce, bytes | bytearray) or len(nonce) != NONCE_LEN:
        raise BindingError(f"binding nonce must be {NONCE_LEN} bytes")
    if kem_id not in KEM_IDS:
        raise BindingError("binding KEM id is not supported (only 0x0020, X25519-HKDF-SHA256)")
    if not isinstance(public_key, bytes | bytearray) or len(public_key) != PUBLIC_KEY_LEN[kem_id]:
        raise BindingError(f"binding public key must be {PUBLIC_KEY_LEN[kem_id]} bytes")
    if not isinstance(audience, bytes | bytearray) or len(audience) != AUDIENCE_LEN:
        raise BindingError(f"binding audience must be a {AUDIENCE_LEN}-byte digest")
    return b"".join(
        (
            _lp(LABEL),
            _lp(role.encode("ascii")),
            _lp(bytes(nonce)),
            _lp(kem_id.to_bytes(2, "big")),
            _lp(bytes(public_key)),
            _lp(bytes(audience)),
        )
    )


def report_data(role: str, nonce: bytes, kem_id: int, public_key: bytes, audience: bytes) -> bytes:
    """The 64-byte report data a requester asks its attester for."""
    return hashlib.sha512(encode(role, nonce, kem_id, public_key, audience)).digest()


def check(
    claims: Claims | bytes,
    *,
    role: str,
    nonce: bytes,
    kem_id: int,
    public_key: bytes,
    audience: bytes,
) -> None:
    """Recompute the binding and compare it with the evidence's report data in constant time.

    Accepts verified :class:`Claims` (or their raw 64-byte report data); raises
    :class:`BindingError` when they differ.
    """
    got = claims if isinstance(claims, bytes | bytearray) else claims.report_data
    expected = report_data(role, nonce, kem_id, public_key, audience)
    if len(got) != len(expected) or not hmac.compare_digest(bytes(got), expected):
        raise BindingError(
            "evidence report data does not bind this nonce, role, public key and audience; "
            "request a fresh nonce and attest again"
        )


# --- the ``serve`` role: an inference server attests itself to its clients ---------------------
SERVE_ROLE = "serve"
RECEIPT_KEY_LEN = 32  # raw Ed25519 public key
MAX_TLS_PUBLIC_KEY = 2048  # DER SubjectPublicKeyInfo (RSA-8192 fits)
DIGEST_LEN = 32
MAX_NAME_LEN = 64
MAX_FACTORY_LEN = 200
MAX_TENANT_LEN = 64
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_FACTORY_RE = re.compile(rf"{_IDENT}(\.{_IDENT})*:{_IDENT}")
_U64 = 2**64


@dataclass(frozen=True)
class ServedIdentity:
    """What an inference server serves, as bound into its evidence for clients.

    ``name`` is the model's name in the inference API; ``model_id``, ``key_version`` and
    ``header_digest`` (SHA-256 of the sealed file's header) name the sealed weights that were
    decrypted; ``policy_version``, ``tenant`` (the owner's tenant on its key server) and
    ``server_key_id`` (SHA-256 of that key server's release-signing key) come from the signed
    grant the key was released under; ``factory`` built the module.
    """

    name: str
    model_id: str
    key_version: int
    header_digest: bytes
    policy_version: int
    factory: str
    tenant: str
    server_key_id: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise BindingError("served name must be 1-64 characters of letters, digits, '-_.'")
        if not is_model_id(self.model_id):
            raise BindingError(f"served model id is not a valid model id ({MODEL_ID_RULE})")
        for what, v, lo in (("key_version", self.key_version, 1),
                            ("policy_version", self.policy_version, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v < _U64:
                raise BindingError(f"served {what} must be an integer >= {lo}")
        if not isinstance(self.header_digest, bytes) or len(self.header_digest) != DIGEST_LEN:
            raise BindingError(f"served header digest must be {DIGEST_LEN} bytes (SHA-256)")
        if not isinstance(self.factory, str) or not _FACTORY_RE.fullmatch(self.factory) or (
                len(self.factory) > MAX_FACTORY_LEN):
            raise BindingError("served factory must look like 'package.module:function'")
        if not isinstance(self.tenant, str) or not 0 < len(self.tenant) <= MAX_TENANT_LEN or (
                not self.tenant.isprintable()):
            raise BindingError(f"served tenant must be 1-{MAX_TENANT_LEN} printable characters")
        if not isinstance(self.server_key_id, bytes) or len(self.server_key_id) != DIGEST_LEN:
            raise BindingError(f"served server key id must be {DIGEST_LEN} bytes (SHA-256)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (digests as lowercase hex)."""
        return {"name": self.name, "model_id": self.model_id, "key_version": self.key_version,
                "header_digest": self.header_digest.hex(),
                "policy_version": self.policy_version, "factory": self.factory,
                "tenant": self.tenant, "server_key_id": self.server_key_id.hex()}

    @classmethod
    def from_dict(cls, obj: object) -> ServedIdentity:
        """Parse :meth:`to_dict`'s form strictly (exact fields, lowercase hex digests)."""
        if not isinstance(obj, dict) or set(obj) != set(_IDENTITY_FIELDS):
            raise BindingError("served identity must have exactly the fields "
                               f"{', '.join(_IDENTITY_FIELDS)}")
        kw = dict(obj)
        for k in ("header_digest", "server_key_id"):
            v = kw[k]
            if not isinstance(v, str) or not re.fullmatch(r"[0-9a-f]{64}", v):
                raise BindingError(f"served identity {k} must be 64 lowercase hex digits")
            kw[k] = bytes.fromhex(v)
        return cls(**kw)

    def encode(self) -> bytes:
        """The identity's fields, each length-prefixed (part of :func:`serve_encode`)."""
        return b"".join((
            _lp(self.name.encode("ascii")),
            _lp(self.model_id.encode("ascii")),
            _lp(self.key_version.to_bytes(8, "big")),
            _lp(self.header_digest),
            _lp(self.policy_version.to_bytes(8, "big")),
            _lp(self.factory.encode("ascii")),
            _lp(self.tenant.encode("utf-8")),
            _lp(self.server_key_id),
        ))


_IDENTITY_FIELDS = ("name", "model_id", "key_version", "header_digest", "policy_version",
                    "factory", "tenant", "server_key_id")


def serve_encode(*, nonce: bytes, kem_id: int, hpke_public_key: bytes,
                 receipt_public_key: bytes, tls_public_key: bytes,
                 identity: ServedIdentity) -> bytes:
    """The length-prefixed encoding of the ``serve`` role that is hashed (validated)."""
    if not isinstance(nonce, bytes | bytearray) or len(nonce) != NONCE_LEN:
        raise BindingError(f"binding nonce must be {NONCE_LEN} bytes")
    if kem_id not in KEM_IDS:
        raise BindingError("binding KEM id is not supported (only 0x0020, X25519-HKDF-SHA256)")
    if not isinstance(hpke_public_key, bytes | bytearray) or (
            len(hpke_public_key) != PUBLIC_KEY_LEN[kem_id]):
        raise BindingError(f"binding HPKE public key must be {PUBLIC_KEY_LEN[kem_id]} bytes")
    if not isinstance(receipt_public_key, bytes | bytearray) or (
            len(receipt_public_key) != RECEIPT_KEY_LEN):
        raise BindingError(f"binding receipt key must be {RECEIPT_KEY_LEN} bytes (Ed25519)")
    if not isinstance(tls_public_key, bytes | bytearray) or (
            len(tls_public_key) > MAX_TLS_PUBLIC_KEY):
        raise BindingError(f"binding TLS public key must be at most {MAX_TLS_PUBLIC_KEY} bytes")
    if not isinstance(identity, ServedIdentity):
        raise BindingError("binding identity must be a ServedIdentity")
    return b"".join((
        _lp(LABEL),
        _lp(SERVE_ROLE.encode("ascii")),
        _lp(bytes(nonce)),
        _lp(kem_id.to_bytes(2, "big")),
        _lp(bytes(hpke_public_key)),
        _lp(bytes(receipt_public_key)),
        _lp(bytes(tls_public_key)),
        identity.encode(),
    ))


def serve_report_data(*, nonce: bytes, kem_id: int, hpke_public_key: bytes,
                      receipt_public_key: bytes, tls_public_key: bytes,
                      identity: ServedIdentity) -> bytes:
    """The 64-byte report data an inference server asks its attester for."""
    return hashlib.sha512(serve_encode(
        nonce=nonce, kem_id=kem_id, hpke_public_key=hpke_public_key,
        receipt_public_key=receipt_public_key, tls_public_key=tls_public_key,
        identity=identity)).digest()


def check_serve(claims: Claims | bytes, *, nonce: bytes, kem_id: int, hpke_public_key: bytes,
                receipt_public_key: bytes, tls_public_key: bytes,
                identity: ServedIdentity) -> None:
    """Recompute the ``serve`` binding and compare it in constant time (raises
    :class:`BindingError`)."""
    got = claims if isinstance(claims, bytes | bytearray) else claims.report_data
    expected = serve_report_data(
        nonce=nonce, kem_id=kem_id, hpke_public_key=hpke_public_key,
        receipt_public_key=receipt_public_key, tls_public_key=tls_public_key, identity=identity)
    if len(got) != len(expected) or not hmac.compare_digest(bytes(got), expected):
        raise BindingError(
            "the server's evidence does not bind this nonce, its HPKE and receipt keys, its TLS "
            "key and the served model identity as presented; refusing it (swapped evidence or "
            "substituted keys); attest again"
        )
