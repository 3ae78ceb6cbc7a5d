"""A client's policy: which inference servers may receive its inputs.

TOML (or JSON, with the same structure)::

    format = "sealtorch-client-policy/v1"

    [[runtimes]]                 # allowed server identities (as in model policies), any one
    tee = "sgx"
    mrenclave = "..."

    [[models]]                   # which models the client expects, any one
    model_id = "resnet50"
    key_versions = [2]           # optional: only these key versions
    min_policy_version = 3       # optional (default 1)
    factories = ["sealtorch.models.resnet:resnet50"]   # optional
    header_digests = ["..."]     # optional: the sealed files' header SHA-256

    [[owners]]                   # whose key server released the model key, any one
    server_key = "<base64 raw Ed25519 release-signing key of the owner's dkeyserver, or PEM>"
    tenants = ["acme"]           # optional

    [verifier]                   # how evidence is verified (paths relative to this file)
    collateral = "collateral/"   # DCAP collateral file or directory
    pccs_url = "https://..."     # or fetched from a PCCS
    vcek_dir = "vcek/"           # SNP VCEK/VLEK store
    sim_platform_keys = ["..."]  # used only with --unsafe-sim, on loopback URLs
    max_receipt_skew_seconds = 300

:func:`evaluate` is the decision: pure, over verified claims and the served identity, with one
reason per failed check.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealtorch.attestation.binding import ServedIdentity
from sealtorch.attestation.claims import Claims
from sealtorch.attestation.policy import Decision, Identity, read_policy_file
from sealtorch.attestation.policy import evaluate as evaluate_identities
from sealtorch.errors import PolicyError, ProtocolError
from sealtorch.ids import MODEL_ID_RULE, is_model_id
from sealtorch.protocol.signing import key_id, load_public_key

FORMAT = "sealtorch-client-policy/v1"
MAX_ENTRIES = 64
_FACTORY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")
_HEX32 = re.compile(r"[0-9a-fA-F]{64}")


def _list(obj: dict[str, Any], key: str, where: str) -> list[Any]:
    v = obj.get(key, [])
    if not isinstance(v, list) or len(v) > MAX_ENTRIES:
        raise PolicyError(f"{where}.{key}: expected a list of at most {MAX_ENTRIES} entries")
    return v


def _ints(obj: dict[str, Any], key: str, where: str) -> tuple[int, ...]:
    out = []
    for v in _list(obj, key, where):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v < 2**63:
            raise PolicyError(f"{where}.{key}: expected integers >= 1")
        out.append(v)
    return tuple(sorted(set(out)))


@dataclass(frozen=True)
class ExpectedModel:
    """One model the client expects; unset lists are not checked."""

    model_id: str
    key_versions: tuple[int, ...] = ()
    min_policy_version: int = 1
    factories: tuple[str, ...] = ()
    header_digests: tuple[bytes, ...] = ()

    @classmethod
    def from_dict(cls, obj: object, where: str) -> ExpectedModel:
        """Parse one ``[[models]]`` entry."""
        allowed = {"model_id", "key_versions", "min_policy_version", "factories",
                   "header_digests"}
        if not isinstance(obj, dict) or set(obj) - allowed or "model_id" not in obj:
            raise PolicyError(f"{where}: expected model_id and optional "
                              f"{', '.join(sorted(allowed - {'model_id'}))}")
        if not is_model_id(obj["model_id"]):
            raise PolicyError(f"{where}.model_id: not a valid model id ({MODEL_ID_RULE})")
        mpv = obj.get("min_policy_version", 1)
        if isinstance(mpv, bool) or not isinstance(mpv, int) or not 1 <= mpv < 2**63:
            raise PolicyError(f"{where}.min_policy_version: expected an integer >= 1")
        factories = _list(obj, "factories", where)
        if not all(isinstance(f, str) and _FACTORY_RE.match(f) for f in factories):
            raise PolicyError(f"{where}.factories: each entry must look like "
                              "'package.module:function'")
        digests = _list(obj, "header_digests", where)
        if not all(isinstance(d, str) and _HEX32.fullmatch(d) for d in digests):
            raise PolicyError(f"{where}.header_digests: expected SHA-256 digests as 64 hex "
                              "digits")
        return cls(model_id=obj["model_id"], key_versions=_ints(obj, "key_versions", where),
                   min_policy_version=mpv, factories=tuple(factories),
                   header_digests=tuple(bytes.fromhex(d) for d in digests))

    def check(self, identity: ServedIdentity) -> list[str]:
        """Every failed check of this entry against ``identity``."""
        r: list[str] = []
        if self.key_versions and identity.key_version not in self.key_versions:
            r.append(f"key version {identity.key_version} is not one of "
                     f"{list(self.key_versions)}")
        if identity.policy_version < self.min_policy_version:
            r.append(f"policy version {identity.policy_version} is lower than "
                     f"{self.min_policy_version}")
        if self.factories and identity.factory not in self.factories:
            r.append(f"factory {identity.factory} is not one of {list(self.factories)}")
        if self.header_digests and identity.header_digest not in self.header_digests:
            r.append(f"sealed header digest {identity.header_digest.hex()} is not one of the "
                     "expected ones")
        return r


@dataclass(frozen=True)
class Owner:
    """A model owner: the key server whose release-signing key released the model key."""

    server_key_id: bytes
    tenants: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, obj: object, where: str) -> Owner:
        """Parse one ``[[owners]]`` entry (``server_key`` or ``server_key_id``)."""
        allowed = {"server_key", "server_key_id", "tenants"}
        if not isinstance(obj, dict) or set(obj) - allowed or (
                ("server_key" in obj) == ("server_key_id" in obj)):
            raise PolicyError(f"{where}: expected server_key (or server_key_id) and optional "
                              "tenants")
        if "server_key" in obj:
            try:
                kid = bytes.fromhex(key_id(load_public_key(obj["server_key"])))
            except (ProtocolError, ValueError, TypeError):
                raise PolicyError(f"{where}.server_key: expected an Ed25519 public key (base64 "
                                  "of the raw 32 bytes, or PEM)") from None
        else:
            v = obj["server_key_id"]
            if not isinstance(v, str) or not _HEX32.fullmatch(v):
                raise PolicyError(f"{where}.server_key_id: expected 64 hex digits (SHA-256 "
                                  "of the raw key)")
            kid = bytes.fromhex(v)
        tenants = _list(obj, "tenants", where)
        if not all(isinstance(t, str) and 0 < len(t) <= 64 for t in tenants):
            raise PolicyError(f"{where}.tenants: expected names of 1-64 characters")
        return cls(kid, tuple(tenants))

    def check(self, identity: ServedIdentity) -> list[str]:
        """Every failed check of this owner against ``identity``."""
        if identity.server_key_id != self.server_key_id:
            return [f"the key was released by key server {identity.server_key_id.hex()[:16]}..., "
                    f"not {self.server_key_id.hex()[:16]}..."]
        if self.tenants and identity.tenant not in self.tenants:
            return [f"tenant {identity.tenant!r} is not one of {list(self.tenants)}"]
        return []


@dataclass(frozen=True)
class VerifierSettings:
    """Where evidence verification gets its collateral (paths already resolved)."""

    collateral: Path | None = None
    pccs_url: str | None = None
    vcek_dir: Path | None = None
    sim_platform_keys: tuple[str, ...] = ()
    max_receipt_skew_seconds: int = 300


@dataclass(frozen=True)
class ClientPolicy:
    """What a client requires of a server before it sends anything."""

    runtimes: tuple[Identity, ...]
    models: tuple[ExpectedModel, ...]
    owners: tuple[Owner, ...]
    verifier: VerifierSettings = field(default_factory=VerifierSettings)

    def __post_init__(self) -> None:
        if not self.runtimes or not self.models or not self.owners:
            raise PolicyError("a client policy must name at least one runtime identity, one "
                              "model and one owner (strict default: trust nothing)")

    @classmethod
    def from_dict(cls, obj: object, *, base: Path | None = None) -> ClientPolicy:
        """Parse the TOML/JSON structure strictly; relative paths are taken from ``base``."""
        if not isinstance(obj, dict):
            raise PolicyError("a client policy must be a table/object")
        extra = set(obj) - {"format", "runtimes", "models", "owners", "verifier"}
        if extra:
            raise PolicyError(f"unknown client policy fields: {', '.join(sorted(extra))}")
        if obj.get("format") != FORMAT:
            raise PolicyError(f"client policy format must be {FORMAT!r}")
        runtimes = tuple(Identity.from_dict(x, f"runtimes[{i}]")
                         for i, x in enumerate(_list(obj, "runtimes", "policy")))
        models = tuple(ExpectedModel.from_dict(x, f"models[{i}]")
                       for i, x in enumerate(_list(obj, "models", "policy")))
        owners = tuple(Owner.from_dict(x, f"owners[{i}]")
                       for i, x in enumerate(_list(obj, "owners", "policy")))
        return cls(runtimes, models, owners, _verifier(obj.get("verifier", {}), base))

    @classmethod
    def load(cls, path: str | Path) -> ClientPolicy:
        """Read a ``.json`` file as JSON, anything else as TOML."""
        p = Path(path)
        data = read_policy_file(p, "client policy")
        try:
            obj = json.loads(data) if p.suffix.lower() == ".json" else tomllib.loads(
                data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise PolicyError(f"client policy {p} is not valid UTF-8 JSON") from None
        except tomllib.TOMLDecodeError as e:
            raise PolicyError(f"client policy {p} is not valid TOML ({e})") from None
        return cls.from_dict(obj, base=p.parent)

    def verifier_set(self, *, unsafe_sim: bool = False) -> Any:
        """The :class:`VerifierSet` this policy describes; sim only when ``unsafe_sim``."""
        from sealtorch.attestation.verifiers import VerifierSet

        v = self.verifier
        tees = ("sgx", "tdx", "snp", "sim") if unsafe_sim else ("sgx", "tdx", "snp")
        return VerifierSet(collateral=v.collateral, pccs_url=v.pccs_url, vcek_dir=v.vcek_dir,
                           sim_platform_keys=v.sim_platform_keys if unsafe_sim else (),
                           tees=tees)


def _verifier(obj: object, base: Path | None) -> VerifierSettings:
    allowed = {"collateral", "pccs_url", "vcek_dir", "sim_platform_keys",
               "max_receipt_skew_seconds"}
    if not isinstance(obj, dict) or set(obj) - allowed:
        raise PolicyError(f"verifier: expected a table with keys from {', '.join(sorted(allowed))}")

    def path(key: str) -> Path | None:
        v = obj.get(key)
        if v is None:
            return None
        if not isinstance(v, str) or not v:
            raise PolicyError(f"verifier.{key}: expected a path")
        p = Path(v).expanduser()
        return p if p.is_absolute() or base is None else base / p

    pccs = obj.get("pccs_url")
    if pccs is not None and (not isinstance(pccs, str) or not pccs.startswith("https://")):
        raise PolicyError("verifier.pccs_url: expected an https:// URL")
    keys = obj.get("sim_platform_keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        raise PolicyError("verifier.sim_platform_keys: expected a list of keys (hex, base64, "
                          "PEM or a path)")
    resolved = tuple(str(base / k) if base is not None and not k.strip().startswith("-----")
                     and (base / k).is_file() else k for k in keys)
    skew = obj.get("max_receipt_skew_seconds", 300)
    if isinstance(skew, bool) or not isinstance(skew, int) or not 1 <= skew <= 86400:
        raise PolicyError("verifier.max_receipt_skew_seconds: expected 1-86400")
    return VerifierSettings(path("collateral"), pccs, path("vcek_dir"), resolved, skew)


def evaluate(policy: ClientPolicy, claims: Claims, identity: ServedIdentity) -> Decision:
    """May this client send inputs to a server with these verified claims serving ``identity``?

    Allowed when a runtime identity matches the claims, an expected model entry matches the
    identity, and an owner matches; otherwise every failed check is a reason.
    """
    runtime = evaluate_identities(policy.runtimes, claims, what="runtimes")
    reasons = list(runtime.reasons)
    reasons += _first_match(
        [(i, m) for i, m in enumerate(policy.models) if m.model_id == identity.model_id],
        identity, "models", f"model {identity.model_id!r} is not one this policy expects "
        f"({', '.join(sorted({m.model_id for m in policy.models}))})")
    reasons += _first_match(list(enumerate(policy.owners)), identity, "owners", "")
    if reasons:
        return Decision(False, None, tuple(reasons))
    return Decision(True, runtime.matched, (), runtime.matched_index)


def _first_match(entries: Sequence[tuple[int, ExpectedModel | Owner]],
                 identity: ServedIdentity, what: str, none: str) -> list[str]:
    """No reason when an entry matches; else every failed check, named by the entry's index."""
    if not entries:
        return [f"{what}: {none}"]
    reasons: list[str] = []
    for i, entry in entries:
        failed = entry.check(identity)
        if not failed:
            return []
        reasons += [f"{what}[{i}]: {f}" for f in failed]
    return reasons
