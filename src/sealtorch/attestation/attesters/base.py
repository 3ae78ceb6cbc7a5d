"""The attester interface: produce evidence over 64 bytes of caller-chosen report data."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from sealtorch.attestation.evidence import Evidence
from sealtorch.errors import AttestationError

REPORT_DATA_LEN = 64


@runtime_checkable
class Attester(Protocol):
    """Anything that can attest: ``tee`` names the backend, ``attest`` returns evidence."""

    tee: str

    def attest(self, report_data: bytes) -> Evidence:
        """Evidence whose report data is exactly ``report_data`` (64 bytes)."""
        ...


def check_report_data(report_data: bytes) -> bytes:
    """Validate the caller's report data (exactly 64 bytes)."""
    if not isinstance(report_data, bytes | bytearray) or len(report_data) != REPORT_DATA_LEN:
        raise AttestationError(f"report data must be exactly {REPORT_DATA_LEN} bytes")
    return bytes(report_data)
