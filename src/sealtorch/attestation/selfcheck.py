"""A confidential VM's own evidence can name the configuration it was launched with: TDX
MRCONFIGID (48 bytes) and SNP HOST_DATA (32 bytes) are set by whoever launches the VM and
measured into every report. A role (dkeycache, ``sealtorch serve``) checks at start that this
value is the digest of the measured configuration it is about to use, so a host cannot launch
an approved image with another configuration (another key server, another pinned key).

Binding: ``MRCONFIGID = SHA-384(config bytes)`` on TDX, ``HOST_DATA = SHA-256(config bytes)``
on SNP. An all-zero value means the platform (or the launcher) binds no configuration: the
check then says so, and the policy must pin the configuration by other means (docs/
confidential-vms.md). The VM's own evidence comes from its own kernel (configfs-tsm), so it is
parsed here, not verified: the key server verifies it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass

from sealtorch.attestation.attesters.base import Attester
from sealtorch.attestation.evidence import Evidence
from sealtorch.errors import ConfigError, EvidenceFormatError

log = logging.getLogger("sealtorch.attestation")

FIELDS = {"tdx": "mrconfigid", "snp": "host_data"}


@dataclass(frozen=True)
class ConfigBinding:
    """What the VM's evidence says about its configuration."""

    tee: str
    field: str
    bound: bool  # the platform carries a (nonzero) value, and it is this config's digest

    def describe(self) -> str:
        if self.bound:
            return f"{self.field} binds this measured configuration"
        return (f"{self.field} is zero: the platform binds no configuration; pin it in the "
                "policy by other means (see docs/confidential-vms.md)")


def config_digest(tee: str, config: bytes) -> bytes:
    """The value MRCONFIGID (TDX) or HOST_DATA (SNP) must hold for ``config``."""
    if tee == "tdx":
        return hashlib.sha384(config).digest()
    if tee == "snp":
        return hashlib.sha256(config).digest()
    raise ConfigError(f"no configuration binding for tee {tee!r}")


def _field(evidence: Evidence) -> bytes:
    if evidence.tee == "tdx":
        import dcap_qvl

        try:
            return bytes(dcap_qvl.parse_quote(evidence.quote).report.mr_config_id)
        except (ValueError, RuntimeError, AttributeError) as e:
            raise EvidenceFormatError("this VM's own TDX quote does not parse") from e
    from sealtorch.attestation.verifiers.snp import parse_report

    return parse_report(evidence.quote).host_data


def check_config_binding(evidence: Evidence, config: bytes) -> ConfigBinding:
    """Compare the VM's MRCONFIGID / HOST_DATA with the digest of ``config``; a nonzero value
    that differs is a :class:`ConfigError` (refuse to start)."""
    if evidence.tee not in FIELDS:
        raise ConfigError(f"no configuration binding for tee {evidence.tee!r}")
    got = _field(evidence)
    name = FIELDS[evidence.tee]
    if not any(got):
        return ConfigBinding(evidence.tee, name, False)
    if not hmac.compare_digest(got, config_digest(evidence.tee, config)):
        raise ConfigError(
            f"this VM's {name} is not the digest of the measured configuration it was given: "
            "the VM was launched for another configuration; start it with this config's digest "
            f"({config_digest(evidence.tee, config).hex()}) or give it the config it was "
            "launched for")
    return ConfigBinding(evidence.tee, name, True)


def check_own_config(attester: Attester, config: bytes, *, role: str) -> ConfigBinding:
    """Ask this VM's attester for its own evidence and check its configuration binding
    (refuses a mismatch, logs whether the platform binds the configuration at all)."""
    binding = check_config_binding(attester.attest(os.urandom(64)), config)
    log.log(logging.INFO if binding.bound else logging.WARNING, "%s: %s", role,
            binding.describe())
    return binding
