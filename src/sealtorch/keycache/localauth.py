"""Who may take a key from dkeycache: local evidence (SGX, sim) or same-VM peer credentials.

On SGX every enclave has its own MRENCLAVE, so a runtime proves itself with evidence bound
(role ``local``) to the cache's nonce, its session key and the cache's audience, verified by the
same verifiers the key server uses, and the model's ``runtimes`` allow-list is evaluated on its
claims. In a TDX/SNP confidential VM every process shares the VM's identity, which dkeyserver
already checked against the ``caches`` list; there the check is the kernel's ``SO_PEERCRED``
uid on the same-VM socket, and the policy must name a runtime identity of that TEE type.
"""

from __future__ import annotations

from typing import Any

from sealtorch.errors import ConfigError, ReleaseDenied
from sealtorch.keycache.server import PeerCred
from sealtorch.protocol import hpke
from sealtorch.protocol.grant import Grant


def policy_from_grant(grant: Grant) -> Any:
    """The :class:`ModelPolicy` carried (signed) in a grant."""
    from sealtorch.keycache.leases import parse_policy

    return parse_policy(grant.policy)


class EvidenceAuth:
    """Local evidence verified with a :class:`VerifierSet` (SGX and sim)."""

    mode = "evidence"

    def __init__(self, verifiers: Any) -> None:
        self._verifiers = verifiers

    def authenticate(
        self, evidence: object, *, nonce: bytes, public_key: bytes, audience: bytes,
        peer: PeerCred | None,
    ) -> Any:
        from sealtorch.attestation import binding
        from sealtorch.attestation.evidence import Evidence

        ev = Evidence.from_dict(evidence)
        claims = self._verifiers.verify(ev)
        binding.check(claims, role="local", nonce=nonce, kem_id=hpke.KEM_ID,
                      public_key=public_key, audience=audience)
        return claims

    def check_runtime(self, policy: Any, claims: Any) -> tuple[str | None, tuple[str, ...]]:
        from sealtorch.attestation.policy import evaluate

        decision = evaluate(policy.runtimes, claims, what="runtimes")
        return (None, ()) if decision.allowed else ("policy_denied", decision.reasons)


class PeerCredAuth:
    """Same-VM peers by uid (TDX/SNP): the VM's identity was attested to the key server."""

    mode = "peercred"

    def __init__(self, tee: str, allowed_uids: set[int]) -> None:
        if tee not in ("tdx", "snp"):
            raise ConfigError(
                "peer-credential local auth is only sound in a TDX/SNP VM (one identity per "
                "VM); use local_auth = \"evidence\" for SGX and sim"
            )
        self._tee = tee
        self._uids = allowed_uids

    def authenticate(
        self, evidence: object, *, nonce: bytes, public_key: bytes, audience: bytes,
        peer: PeerCred | None,
    ) -> Any:
        if peer is None or peer.uid not in self._uids:
            raise ReleaseDenied("this user may not use the key cache", "uid_not_allowed")
        return None

    def check_runtime(self, policy: Any, claims: Any) -> tuple[str | None, tuple[str, ...]]:
        tees = {i.tee for i in policy.runtimes}
        if self._tee in tees:
            return None, ()
        return "policy_denied", (f"runtimes: no identity of this VM's TEE type {self._tee}",)
