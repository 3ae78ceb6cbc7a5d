"""DCAP collateral as the key server hands it to key caches: signed by the release-signing key.

An SGX key cache verifies its local runtimes' quotes itself, inside its enclave, where the host
controls the clock and every file. So it takes its collateral from the owner's key server (what
the owner imported, signed, fetched over the attested channel's pinned key), and verifies at
the key server's signed time (``keycache/leases.py``), never from a host directory at a host
clock: a host can neither replay old collateral nor turn the clock back to make it current.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sealtorch.errors import GrantError
from sealtorch.protocol.signing import (
    KIND_COLLATERAL,
    key_id,
    sign_document,
    verify_document,
)

FORMAT: Final = "sealtorch-collateral/v1"
MAX_FILES = 64
MAX_FILE_CHARS = 256 * 1024


@dataclass(frozen=True)
class CollateralBundle:
    """The collateral documents (dcap-qvl QuoteCollateralV3 JSON) a key server holds."""

    files: tuple[str, ...]
    issued_at: int
    server_key_id: str

    def body(self) -> dict[str, Any]:
        return {"format": FORMAT, "files": list(self.files), "issued_at": self.issued_at,
                "server_key_id": self.server_key_id}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> CollateralBundle:
        files = body.get("files")
        if body.get("format") != FORMAT or not isinstance(files, list) or len(files) > MAX_FILES \
                or not all(isinstance(f, str) and len(f) <= MAX_FILE_CHARS for f in files):
            raise GrantError("collateral bundle is malformed")
        issued, kid = body.get("issued_at"), body.get("server_key_id")
        if not isinstance(issued, int) or isinstance(issued, bool) or not isinstance(kid, str):
            raise GrantError("collateral bundle is malformed")
        return cls(tuple(files), issued, kid)


def sign_bundle(signing_key: Ed25519PrivateKey, bundle: CollateralBundle) -> dict[str, Any]:
    return sign_document(signing_key, KIND_COLLATERAL, bundle.body())


def verify_bundle(pinned: Ed25519PublicKey, doc: object) -> CollateralBundle:
    """A bundle signed by the pinned key (:class:`GrantError` otherwise)."""
    bundle = CollateralBundle.from_body(verify_document(pinned, KIND_COLLATERAL, doc))
    if not hmac.compare_digest(bundle.server_key_id, key_id(pinned)):
        raise GrantError("collateral bundle names another server key id")
    return bundle
