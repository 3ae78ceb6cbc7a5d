"""Who may take a key from dkeycache: local evidence (SGX, sim) or same-VM peer credentials.

On SGX every enclave has its own MRENCLAVE, so a runtime proves itself with evidence bound
(role ``local``) to the cache's nonce, its session key and the cache's audience, verified by the
same verifiers the key server uses, and the model's ``runtimes`` allow-list is evaluated on its
claims. In a TDX/SNP confidential VM every process shares the VM's identity; there the check
is the kernel's ``SO_PEERCRED`` uid on the same-VM socket, and the model's ``runtimes``
allow-list is evaluated on the VM's own claims as the key server verified them (signed into
every release answer), so a runtime identity pinning MRTD/RTMRs/MEASUREMENT really constrains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sealtorch.attestation.claims import Claims
from sealtorch.errors import ConfigError, ReleaseDenied
from sealtorch.keycache.server import PeerCred
from sealtorch.protocol import hpke
from sealtorch.protocol.grant import Grant


def policy_from_grant(grant: Grant) -> Any:
    """The :class:`ModelPolicy` carried (signed) in a grant."""
    from sealtorch.keycache.lease import parse_policy

    return parse_policy(grant.policy)


class EvidenceAuth:
    """Local evidence verified with a :class:`VerifierSet` (SGX and sim), at the key server's
    signed time (``now``), never at the host's clock: old collateral replayed at an old time
    does not pass. ``verifiers`` is a VerifierSet, or a callable giving the current one (an SGX
    cache rebuilds it from the collateral its key server signed)."""

    mode = "evidence"

    def __init__(self, verifiers: Any, *, now: Callable[[], float | None]) -> None:
        self._verifiers = verifiers
        self._now = now

    def authenticate(
        self, evidence: object, *, nonce: bytes, public_key: bytes, audience: bytes,
        peer: PeerCred | None,
    ) -> Any:
        from sealtorch.attestation import binding
        from sealtorch.attestation.evidence import Evidence

        now = self._now()
        if now is None:
            raise ReleaseDenied(
                "the key cache has no signed time from its key server yet (it has not attested "
                "successfully); retry once it has", "not_ready")
        ev = Evidence.from_dict(evidence)
        verifiers = self._verifiers() if callable(self._verifiers) else self._verifiers
        claims = verifiers.verify(ev, now=int(now))
        binding.check(claims, role="local", nonce=nonce, kem_id=hpke.KEM_ID,
                      public_key=public_key, audience=audience)
        return claims

    def check_runtime(self, policy: Any, claims: Any) -> tuple[str | None, tuple[str, ...]]:
        from sealtorch.attestation.policy import evaluate

        decision = evaluate(policy.runtimes, claims, what="runtimes")
        return (None, ()) if decision.allowed else ("policy_denied", decision.reasons)


class PeerCredAuth:
    """Same-VM peers by uid (TDX/SNP), judged by the VM's own server-verified claims."""

    mode = "peercred"

    def __init__(self, tee: str, allowed_uids: set[int],
                 own_claims: Callable[[], Claims | None] = lambda: None) -> None:
        if tee not in ("tdx", "snp"):
            raise ConfigError(
                "peer-credential local auth is only sound in a TDX/SNP VM (one identity per "
                "VM); use local_auth = \"evidence\" for SGX and sim"
            )
        self._tee = tee
        self._uids = allowed_uids
        self._own = own_claims

    def authenticate(
        self, evidence: object, *, nonce: bytes, public_key: bytes, audience: bytes,
        peer: PeerCred | None,
    ) -> Any:
        if peer is None or peer.uid not in self._uids:
            raise ReleaseDenied("this user may not use the key cache", "uid_not_allowed")
        return None

    def check_runtime(self, policy: Any, claims: Any) -> tuple[str | None, tuple[str, ...]]:
        """Every process of this VM is the VM: the ``runtimes`` allow-list must admit the VM's
        own claims (as the key server verified them)."""
        from sealtorch.attestation.policy import evaluate

        own = self._own()
        if own is None or own.tee != self._tee:
            return "not_attested", ("the cache holds no server-verified claims of its own VM "
                                    "yet (it has not attested successfully)",)
        decision = evaluate(policy.runtimes, own, what="runtimes")
        return (None, ()) if decision.allowed else ("policy_denied", decision.reasons)
