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
from sealtorch.errors import AttesterUnavailableError, ConfigError

__all__ = [
    "KINDS", "Attester", "GramineAttester", "TsmAttester", "check_report_data", "detect",
    "select",
]

#: the ``--attester`` choices of every role
KINDS = ("auto", "sgx", "tdx", "snp", "sim")


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
        f"{t}); run inside an SGX enclave or a TDX/SNP guest, or pass --attester sim for "
        "development (it protects nothing)"
    )


def _initdata_unbindable(what: str) -> ConfigError:
    return ConfigError(f"the config names an initdata document, which only a TDX or SNP VM (a "
                       f"CoCo pod) can bind; {what} cannot: remove `initdata` from the config, "
                       "or run in the pod VM")


def select(kind: str, *, role: str, config_bytes: bytes = b"", initdata: str | None = None,
           gramine_dir: Path | str = gramine.DEFAULT_DIR,
           tsm_dir: Path | str = tsm.DEFAULT_DIR) -> Attester:
    """The attester a role asked for by name (``--attester``); the one place that maps names.

    ``auto`` is :func:`detect` (never sim); ``sgx``/``tdx``/``snp`` must be present here; ``sim``
    must be named explicitly and measures ``role`` with its measured config bytes. In a TDX/SNP
    VM the VM's own evidence must bind ``config_bytes`` when it binds a configuration at all
    (MRCONFIGID / HOST_DATA, :mod:`sealtorch.attestation.selfcheck`): a mismatch refuses.
    ``initdata`` (the config's ``initdata`` path) requires the binding through that CoCo
    initdata document, so only a TDX/SNP VM can satisfy it.
    """
    if kind not in KINDS:
        raise ConfigError(f"--attester must be one of {', '.join(KINDS)}")
    if initdata is not None and kind in ("sim", "sgx"):  # before looking for the TEE
        raise _initdata_unbindable(f"--attester {kind}")
    if kind == "sim":
        from sealtorch.attestation import sim
        from sealtorch.attestation.attesters.sim import SimAttester

        return SimAttester(sim.default_dir() / sim.KEY_FILE, sim.measure(role, config_bytes),
                           role=role)
    att: Attester
    if kind == "auto":
        att = detect(gramine_dir=gramine_dir, tsm_dir=tsm_dir)
    elif kind == "sgx":
        att = GramineAttester(gramine_dir)
    else:
        att = TsmAttester(tsm_dir, tee=kind)
    if att.tee == "sim" or (kind != "auto" and att.tee != kind):
        raise AttesterUnavailableError(
            f"the {kind} attester is not available here; run inside a {kind} TEE, or pass "
            "--attester auto to use the one present (or --attester sim for development)")
    if initdata is not None and att.tee not in ("tdx", "snp"):  # auto found SGX
        raise _initdata_unbindable(f"this {att.tee} TEE")
    if att.tee in ("tdx", "snp"):
        from sealtorch.attestation.initdata import load_initdata
        from sealtorch.attestation.selfcheck import check_own_config

        doc = load_initdata(initdata) if initdata is not None else None
        check_own_config(att, config_bytes, role=role, initdata=doc)
    return att
