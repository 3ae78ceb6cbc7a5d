"""What a lease is and what the lease manager talks to: the :class:`Lease` of one model key
version, the :class:`Upstream` protocol (dkeyserver, one server or a replica set), and the
parsing of what a grant carries signed (the policy, the cache's own claims)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sealtorch._secret import Secret
from sealtorch.errors import GrantError, SealtorchError
from sealtorch.protocol.grant import Grant


class Upstream(Protocol):
    """What the lease manager needs from dkeyserver (a :class:`KeyServerClient`)."""

    @property
    def audience(self) -> bytes: ...

    def challenge(self) -> bytes: ...

    def release(
        self,
        evidence: Any,
        public_key: bytes,
        nonce: bytes,
        models: list[str] | None = None,
        *,
        private_key: X25519PrivateKey | None = None,
    ) -> Any: ...

    def status(self, cache_id: str, models: list[str] | None = None) -> Any: ...

    def collateral(self) -> tuple[str, ...]: ...


#: makes the remote evidence for a nonce: ``(nonce, public_key, audience) -> Evidence``
EvidenceFn = Callable[[bytes, bytes, bytes], Any]


@dataclass
class Lease:
    """One model key version held in memory under a verified grant."""

    grant: Grant
    document: dict[str, Any]
    key: Secret = field(repr=False)
    expires: float
    renew_at: float
    max_releases: int | None
    policy: Any = None  # the parsed ModelPolicy of the grant
    grant_digest: bytes = b""
    releases: int = 0

    @property
    def model_id(self) -> str:
        return self.grant.model_id

    @property
    def key_version(self) -> int:
        return self.grant.key_version


def parse_claims(doc: dict[str, Any]) -> Any:
    """The :class:`Claims` the key server signed about this cache (:class:`GrantError` if
    they do not parse)."""
    from sealtorch.attestation.claims import Claims

    try:
        return Claims.from_dict(doc)
    except (SealtorchError, TypeError, ValueError) as e:
        raise GrantError("the claims the key server signed do not parse") from e


def parse_policy(doc: dict[str, Any]) -> Any:
    """The :class:`ModelPolicy` signed into a grant (:class:`GrantError` if malformed)."""
    from sealtorch.attestation.policy import ModelPolicy

    try:
        return ModelPolicy.from_dict(doc)
    except (SealtorchError, TypeError, ValueError, KeyError) as e:
        raise GrantError("the policy signed into a grant is malformed") from e
