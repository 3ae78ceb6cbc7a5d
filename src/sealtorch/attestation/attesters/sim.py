"""The sim attester: signs a measurement and report data with a local platform key (INSECURE)."""

from __future__ import annotations

import logging
from pathlib import Path

from sealtorch.attestation import sim
from sealtorch.attestation.attesters.base import check_report_data
from sealtorch.attestation.evidence import Evidence
from sealtorch.errors import AttestationError

log = logging.getLogger("sealtorch.attestation.sim")

WARNING = (
    "sealtorch sim TEE in use: this process is NOT protected by any hardware; model keys it "
    "receives are readable by the host. Use sim for development and CI only."
)


class SimAttester:
    """Software attester for development; warns loudly whenever it is created."""

    tee = "sim"

    def __init__(
        self, platform_key_path: Path | str, measurement: bytes, *, role: str | None = None
    ) -> None:
        log.warning(WARNING)
        if not isinstance(measurement, bytes) or len(measurement) != sim.MEASUREMENT_LEN:
            raise AttestationError(
                f"sim measurement must be {sim.MEASUREMENT_LEN} bytes (use sim.measure())"
            )
        if role is not None and not sim.ROLE_RE.match(role):
            raise AttestationError("sim role must match [a-z][a-z0-9_-]{0,31}")
        self._key = sim.load_platform_key(platform_key_path)
        self.measurement = measurement
        self.role = role

    def attest(self, report_data: bytes) -> Evidence:
        """Sign ``signature || body`` over the measurement and ``report_data``."""
        rd = check_report_data(report_data)
        body = sim.make_body(self.measurement, rd, self._key.public_key(), self.role)
        return Evidence(tee="sim", quote=self._key.sign(body) + body)
