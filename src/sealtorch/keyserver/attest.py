"""The key server's seam to ``sealtorch.attestation``: build the verifier set, parse evidence,
check the binding, name the requesting platform, and evaluate a stored policy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealtorch.errors import EvidenceFormatError, PolicyError
from sealtorch.keyserver.config import ServerConfig


@dataclass(frozen=True)
class Identity:
    """Who is asking: TEE type, a stable platform id (survives key changes), a measurement."""

    tee: str
    platform_id: str
    measurement: str


def build_verifier(config: ServerConfig, sim_keys: list[str]) -> Any:
    """A VerifierSet with the server's collateral directory and (if enabled) sim keys."""
    from sealtorch.attestation.verifiers import VerifierSet

    collateral = config.path(config.collateral_dir)
    return VerifierSet(
        collateral=collateral if Path(collateral).is_dir() else None,
        sim_platform_keys=sim_keys if config.sim else (),
    )


def parse_evidence(obj: dict[str, Any]) -> Any:
    from sealtorch.attestation.evidence import Evidence

    try:
        return Evidence.from_dict(obj)
    except (TypeError, ValueError, KeyError) as e:
        raise EvidenceFormatError("evidence JSON is malformed") from e


def check_binding(claims: Any, *, nonce: bytes, public_key: bytes, audience: bytes) -> None:
    from sealtorch.attestation import binding

    binding.check(claims, role="remote", nonce=nonce, kem_id=binding.KEM_X25519_SHA256,
                  public_key=public_key, audience=audience)


def identity(claims: Any) -> Identity:
    """The platform id is the sim platform key, the SNP chip id, or the SGX/TDX PPID when the
    verifier exposes it (else the signer identity: see docs/keyserver.md)."""
    tee = claims.tee
    pid: str | None = None
    for name in ("platform_id", "ppid", "chip_id", "platform_key"):
        v = getattr(claims, name, None)
        if v:
            pid = v.hex() if isinstance(v, bytes) else str(v)
            break
    meas_v = (getattr(claims, "measurement", None) or getattr(claims, "mrenclave", None)
              or getattr(claims, "mrtd", None))
    meas = meas_v.hex() if isinstance(meas_v, bytes) else str(meas_v or "")
    if pid is None:
        signer = getattr(claims, "mrsigner", None) or getattr(claims, "mrtd", None) or b""
        pid = "signer:" + (signer.hex() if isinstance(signer, bytes) else str(signer))
    return Identity(tee=tee, platform_id=pid, measurement=meas)


def claims_dict(claims: Any) -> dict[str, Any]:
    d = claims.to_dict() if hasattr(claims, "to_dict") else {}
    return dict(d)


_PARSED: dict[bytes, Any] = {}


def parse_policy(doc: dict[str, Any]) -> tuple[Any, int]:
    """Validate a policy document through the attestation package; returns (policy, version).

    Parsed policies are memoised by their canonical bytes (the stored form is canonical)."""
    from sealtorch.attestation.policy import ModelPolicy
    from sealtorch.protocol.canonical import canonical_json

    ck = canonical_json(doc)
    pol = _PARSED.get(ck)
    if pol is None:
        try:
            pol = ModelPolicy.from_dict(doc)
        except PolicyError:
            raise
        except (TypeError, ValueError, KeyError) as e:
            raise PolicyError("policy document is malformed") from e
        if len(_PARSED) > 4096:
            _PARSED.clear()
        _PARSED[ck] = pol
    return pol, int(pol.version)


_BY_TEXT: dict[str, Any] = {}


def _policy(doc: dict[str, Any], text: str | None) -> Any:
    """The parsed policy, memoised by its stored canonical text when given."""
    pol = _BY_TEXT.get(text) if text is not None else None
    if pol is None:
        pol, _ = parse_policy(doc)
        if text is not None:
            if len(_BY_TEXT) > 4096:
                _BY_TEXT.clear()
            _BY_TEXT[text] = pol
    return pol


def admits_caches(doc: dict[str, Any], *, text: str | None = None) -> bool:
    """Whether the policy admits matching caches without ``cache approve``."""
    return bool(getattr(_policy(doc, text), "admit_caches", False))


def evaluate(doc: dict[str, Any], claims: Any, config: ServerConfig, *, text: str | None = None
             ) -> tuple[bool, list[str], int]:
    """(allowed, reasons, lease_seconds) of ``claims`` against the policy's cache allow-list.

    ``text`` is the stored canonical JSON of ``doc`` (already MAC-checked): parsed policies
    are memoised by it, which skips re-encoding ``doc`` on every release."""
    pol = _policy(doc, text)
    decision = pol.evaluate_cache(claims)
    lease = int(getattr(pol, "lease_seconds", None) or config.lease_seconds)
    return bool(decision.allowed), [str(r) for r in decision.reasons], lease
