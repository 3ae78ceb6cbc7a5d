"""The sim verifier: accepts sim evidence only from platform keys registered with it."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sealtorch.attestation import sim
from sealtorch.attestation.claims import Claims
from sealtorch.attestation.evidence import Evidence
from sealtorch.errors import AttestationError

log = logging.getLogger("sealtorch.attestation.sim")


class SimVerifier:
    """Verifies sim evidence against an explicit set of registered platform keys."""

    def __init__(self, platform_keys: Iterable[Ed25519PublicKey | bytes | str | Path]) -> None:
        keys = [sim.load_platform_public_key(k) for k in platform_keys]
        if not keys:
            raise AttestationError("a sim verifier needs at least one registered platform key")
        self._keys = {sim.raw_public(k): k for k in keys}
        msg = "sim attestation verifier enabled: sim evidence proves nothing about hardware"
        log.warning(msg)

    @property
    def fingerprints(self) -> list[str]:
        """Fingerprints of the registered platform keys."""
        return sorted(sim.fingerprint(k) for k in self._keys.values())

    def verify(self, evidence: Evidence, *, now: int | None = None) -> Claims:
        """Check the signature and registration; return sim claims."""
        body = sim.parse_and_verify(evidence.quote, self._keys)
        return Claims(
            tee="sim",
            report_data=body["report_data"],
            verified_at=int(time.time()) if now is None else int(now),
            debug=False,
            measurement=body["measurement"],
            platform_key=sim.fingerprint(body["platform_key"]),
            role=body["role"] or None,
        )
