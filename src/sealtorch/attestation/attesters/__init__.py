"""Attesters: produce evidence over caller-chosen report data.

:func:`detect` picks the hardware interface this machine offers (Gramine SGX, then
configfs-tsm TDX/SNP) and never picks sim: sim must be chosen explicitly.
"""

from __future__ import annotations

from pathlib import Path

from sealtorch.attestation.attesters import gramine, tsm
from sealtorch.attestation.attesters.base import Attester, check_report_data
from sealtorch.attestation.attesters.gramine import GramineAttester
from sealtorch.attestation.attesters.tsm import TsmAttester
from sealtorch.errors import AttesterUnavailableError

__all__ = ["Attester", "GramineAttester", "TsmAttester", "check_report_data", "detect"]


def detect(
    *, gramine_dir: Path | str = gramine.DEFAULT_DIR, tsm_dir: Path | str = tsm.DEFAULT_DIR
) -> Attester:
    """The hardware attester available here; raises when there is none (never returns sim)."""
    g = Path(gramine_dir)
    if (g / "attestation_type").exists():
        return GramineAttester(g)
    t = Path(tsm_dir)
    if t.is_dir():
        return TsmAttester(t)
    raise AttesterUnavailableError(
        f"no TEE attestation interface found (looked for Gramine at {g} and configfs-tsm at "
        f"{t}); run inside an SGX enclave or a TDX/SNP guest, or choose the sim attester "
        "explicitly for development"
    )
