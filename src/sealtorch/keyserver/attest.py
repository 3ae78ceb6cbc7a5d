"""The key server's seam to ``sealtorch.attestation``: build the verifier set, parse evidence,
check the binding, and name the requesting cache."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealtorch.attestation.claims import Claims
from sealtorch.attestation.evidence import Evidence
from sealtorch.errors import EvidenceFormatError
from sealtorch.keyserver.config import ServerConfig

_CACHE_ID_TAG = b"sealtorch-cache/v1\x00"


@dataclass(frozen=True)
class CacheIdentity:
    """Who is asking. ``platform_id`` names the hardware when the evidence does (SGX/TDX: the
    PCK certificate's PPID; SNP: a chip id that is not masked; sim: the platform key); when it
    does not, the cache is named by the key it enrolled with (``key:<sha256>``), so that hosts
    never share one id. ``cache_id`` is derived from the TEE type and ``platform_id``."""

    cache_id: str
    tee: str
    platform_id: str
    measurement: str

    @property
    def by_key(self) -> bool:
        """Named by its enrolled key (no platform id): a restart with a new key is a new cache."""
        return self.platform_id.startswith("key:")


def build_verifier(config: ServerConfig, sim_keys: Iterable[str]) -> Any:
    """A VerifierSet with the server's collateral directory and (if enabled) sim keys."""
    from sealtorch.attestation.verifiers import VerifierSet

    collateral = config.path(config.collateral_dir)
    return VerifierSet(
        collateral=collateral if Path(collateral).is_dir() else None,
        sim_platform_keys=list(sim_keys) if config.sim else (),
    )


def parse_evidence(obj: dict[str, Any]) -> Evidence:
    try:
        return Evidence.from_dict(obj)
    except (TypeError, ValueError, KeyError) as e:
        raise EvidenceFormatError("evidence JSON is malformed") from e


def check_binding(claims: Claims, *, nonce: bytes, public_key: bytes, audience: bytes) -> None:
    from sealtorch.attestation import binding

    binding.check(claims, role="remote", nonce=nonce, kem_id=binding.KEM_X25519_SHA256,
                  public_key=public_key, audience=audience)


def _platform_id(claims: Claims) -> str | None:
    if claims.tee in ("sgx", "tdx"):
        v: bytes | str | None = claims.ppid
    elif claims.tee == "snp":
        v = claims.chip_id  # all zero under VLEK signing or MASK_CHIP_ID
    else:
        v = claims.platform_key
    if isinstance(v, bytes):
        return v.hex() if any(v) else None
    return v or None


def cache_identity(claims: Claims, public_key: bytes) -> CacheIdentity:
    """The identity of the cache that produced ``claims`` and enrolled ``public_key``."""
    pid = _platform_id(claims)
    if pid is None:
        pid = "key:" + hashlib.sha256(b"sealtorch-cache-key/v1\x00" + public_key).hexdigest()
    meas = claims.measurement or claims.mrenclave or claims.mrtd
    cache_id = hashlib.sha256(
        _CACHE_ID_TAG + claims.tee.encode() + b"\x00" + pid.encode()).hexdigest()[:32]
    return CacheIdentity(cache_id, claims.tee, pid, meas.hex() if meas else "")
