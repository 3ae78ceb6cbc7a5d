"""Verifiers: turn evidence into :class:`~sealtorch.attestation.claims.Claims` or refuse it.

:class:`VerifierSet` dispatches on ``evidence.tee``: SGX/TDX quotes go to DCAP (dcap-qvl),
SNP reports to the AMD chain verifier, sim evidence to the sim verifier, which exists only if
platform keys were registered. Services verify at their own clock; ``now`` is for offline use.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from sealtorch.attestation.claims import Claims
from sealtorch.attestation.evidence import TEES, Evidence
from sealtorch.errors import AttestationError, VerificationError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from sealtorch.attestation.verifiers.dcap import CollateralSource
    from sealtorch.attestation.verifiers.sim import SimVerifier

__all__ = ["VerifierSet"]


class VerifierSet:
    """All verifiers a trusted party uses, configured once.

    ``collateral``: DCAP collateral JSON file or directory (see :mod:`.dcap`); ``pccs_url``:
    fetch collateral from a PCCS when no offline collateral matches; ``vcek_dir``: offline
    VCEK/VLEK store for SNP evidence without certificates; ``sim_platform_keys``: registered sim
    platform keys (sim evidence is refused when empty); ``tees``: the TEE types accepted at all.
    """

    def __init__(
        self,
        *,
        collateral: str | Path | CollateralSource | None = None,
        pccs_url: str | None = None,
        vcek_dir: str | Path | None = None,
        sim_platform_keys: Iterable[Ed25519PublicKey | bytes | str | Path] = (),
        tees: Iterable[str] | None = None,
    ) -> None:
        self.tees = tuple(tees) if tees is not None else ("sgx", "tdx", "snp", "sim")
        for t in self.tees:
            if t not in TEES:
                raise AttestationError(f"unknown tee type in verifier set; known: {TEES}")
        self._collateral_arg = collateral
        self._pccs_url = pccs_url
        self._vcek_dir = Path(vcek_dir) if vcek_dir is not None else None
        keys = list(sim_platform_keys)
        self._sim: SimVerifier | None = None
        if keys and "sim" in self.tees:
            from sealtorch.attestation.verifiers.sim import SimVerifier

            self._sim = SimVerifier(keys)

    @property
    def sim_enabled(self) -> bool:
        """True when sim evidence can be accepted (platform keys registered)."""
        return self._sim is not None

    def verify(self, evidence: Evidence, *, now: int | None = None) -> Claims:
        """Verify ``evidence`` at ``now`` (unix seconds; default: this machine's clock)."""
        if not isinstance(evidence, Evidence):
            raise AttestationError("verify() needs an Evidence object")
        if evidence.tee not in self.tees:
            raise VerificationError(f"{evidence.tee} evidence is not accepted by this verifier")
        t = int(time.time()) if now is None else int(now)
        if evidence.tee == "sim":
            if self._sim is None:
                raise VerificationError(
                    "sim evidence refused: no sim platform keys are registered with this verifier"
                )
            return self._sim.verify(evidence, now=t)
        if evidence.tee in ("sgx", "tdx"):
            from sealtorch.attestation.verifiers import dcap

            source = dcap.as_source(self._collateral_arg, pccs_url=self._pccs_url)
            return dcap.verify(evidence, source, now=t)
        from sealtorch.attestation.verifiers import snp

        return snp.verify(evidence, now=t, vcek_dir=self._vcek_dir)
