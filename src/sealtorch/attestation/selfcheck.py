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

In a Confidential Containers pod the register holds the digest of the pod's *initdata*
document instead (:mod:`sealtorch.attestation.initdata`). A role whose config names that
document (``initdata = PATH``) is bound through it: the register must be the document's
digest, and the config the role runs with must be byte-identical to the document's
``sealtorch.toml`` entry; anything else refuses to start.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass

from sealtorch.attestation.attesters.base import Attester
from sealtorch.attestation.evidence import Evidence
from sealtorch.attestation.initdata import ANNOTATION, CONFIG_ENTRY, InitData
from sealtorch.errors import ConfigError, EvidenceFormatError

log = logging.getLogger("sealtorch.attestation")

FIELDS = {"tdx": "mrconfigid", "snp": "host_data"}


@dataclass(frozen=True)
class ConfigBinding:
    """What the VM's evidence says about its configuration."""

    tee: str
    field: str
    bound: bool  # the platform carries a (nonzero) value, and it binds this config
    via: str = "config"  # what the value is the digest of: "config" or "initdata"

    def describe(self) -> str:
        if self.bound and self.via == "initdata":
            return (f"{self.field} binds the pod's initdata document, whose {CONFIG_ENTRY} "
                    "entry is this measured configuration")
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


def decide_binding(tee: str, register: bytes, config: bytes,
                   initdata: InitData | None = None) -> ConfigBinding:
    """The one rule: does ``register`` (MRCONFIGID / HOST_DATA) bind ``config``?

    Without ``initdata``: zero means unbound (allowed, logged), the config's digest means
    bound, anything else refuses. With ``initdata`` (the config asked for it): ``config``
    must be byte-identical to its ``sealtorch.toml`` entry and the register must be its
    digest; zero or any other value refuses (fail closed)."""
    if tee not in FIELDS:
        raise ConfigError(f"no configuration binding for tee {tee!r}")
    name = FIELDS[tee]
    if initdata is not None:
        if not hmac.compare_digest(initdata.entry(CONFIG_ENTRY), config):
            raise ConfigError(
                f"the measured configuration is not byte-identical to the initdata "
                f"document's {CONFIG_ENTRY!r} entry: regenerate the document with "
                "`sealtorch initdata` from this exact file (and redeploy the pod with its "
                "annotation), or run with the configuration the document holds")
        expected = initdata.register(tee)
        if not any(register):
            raise ConfigError(
                f"the config names an initdata document but this VM's {name} is zero: the "
                f"runtime did not bind initdata; launch the pod with the document in the "
                f"{ANNOTATION} annotation on a runtime class that supports initdata")
        if not hmac.compare_digest(register, expected):
            raise ConfigError(
                f"this VM's {name} is not the digest of the initdata document it was given: "
                "the pod was launched with another initdata; mount the document of this "
                f"pod's {ANNOTATION} annotation, or redeploy with this document's annotation "
                f"(expected {name} {expected.hex()})")
        return ConfigBinding(tee, name, True, via="initdata")
    if not any(register):
        return ConfigBinding(tee, name, False)
    if not hmac.compare_digest(register, config_digest(tee, config)):
        raise ConfigError(
            f"this VM's {name} is not the digest of the measured configuration it was given: "
            "the VM was launched for another configuration; start it with this config's digest "
            f"({config_digest(tee, config).hex()}) or give it the config it was "
            "launched for (in a CoCo pod: set `initdata` in the config, see docs/kserve.md)")
    return ConfigBinding(tee, name, True)


def check_config_binding(evidence: Evidence, config: bytes,
                         initdata: InitData | None = None) -> ConfigBinding:
    """Read the VM's MRCONFIGID / HOST_DATA from its own evidence and apply
    :func:`decide_binding`; a refusal is a :class:`ConfigError` (refuse to start)."""
    if evidence.tee not in FIELDS:
        raise ConfigError(f"no configuration binding for tee {evidence.tee!r}")
    return decide_binding(evidence.tee, _field(evidence), config, initdata)


def check_own_config(attester: Attester, config: bytes, *, role: str,
                     initdata: InitData | None = None) -> ConfigBinding:
    """Ask this VM's attester for its own evidence and check its configuration binding
    (refuses a mismatch, logs whether the platform binds the configuration at all)."""
    binding = check_config_binding(attester.attest(os.urandom(64)), config, initdata)
    log.log(logging.INFO if binding.bound else logging.WARNING, "%s: %s", role,
            binding.describe())
    return binding
