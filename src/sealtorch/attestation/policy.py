"""Release policies: per model, which key caches and which runtimes may receive its key.

A :class:`ModelPolicy` holds two allow-lists of :class:`Identity` (any one must match), the
factory allow-list of ``sealtorch serve``, and lease limits. It is read from TOML (owners) or
JSON (APIs), always with the same structure, and its canonical form is
``canonical_json(policy.to_dict())``. Strict defaults: debug denied, ``Revoked`` always denied,
TCB status ``UpToDate`` only unless another status is named with the advisories it accepts, a
TEE type (including ``sim``) only if an identity names it. :func:`evaluate` explains a denial
with one reason per failed check per identity.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sealtorch.attestation.claims import TCB_STATUSES, Claims
from sealtorch.errors import PolicyDenied, PolicyError
from sealtorch.protocol.canonical import canonical_json

FORMAT = "sealtorch-policy/v1"
MAX_POLICY_BYTES = 64 * 1024

MAX_IDENTITIES = 64
TEES = ("sgx", "tdx", "snp", "sim")
SNP_PRODUCTS = ("milan", "genoa", "turin")
TCB_COMPONENTS = ("bootloader", "tee", "snp", "microcode", "fmc")
#: the REPORTED_TCB components of each SNP product: an identity's min_tcb must name them all
SNP_TCB_COMPONENTS: dict[str, tuple[str, ...]] = {
    "milan": ("bootloader", "tee", "snp", "microcode"),
    "genoa": ("bootloader", "tee", "snp", "microcode"),
    "turin": ("fmc", "bootloader", "tee", "snp", "microcode"),
}
#: SGX ATTRIBUTES bits a workload enclave never needs (byte 0): PROVISIONKEY, EINITTOKENKEY
SGX_PROVISION_BITS = 0x30
#: TD_ATTRIBUTES bits a production TD may have without naming them: SEPT_VE_DISABLE (28), PKS
#: (30), KL (31); DEBUG (0), PERFMON (63) and every reserved bit are denied by default
TDX_DEFAULT_ATTRIBUTES = (1 << 28) | (1 << 30) | (1 << 31)
FACTORY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")
ADVISORY_RE = re.compile(r"^[A-Z]+-[A-Z]+-\d+$")
MAX_LEASE_SECONDS = 7 * 24 * 3600

#: hex fields and their byte length, per TEE type
_HEX: dict[str, dict[str, int]] = {
    "sgx": {"mrenclave": 32, "mrsigner": 32, "isv_ext_prod_id": 16, "isv_family_id": 16,
            "config_id": 64},
    "tdx": {"mrtd": 48, "rtmr1": 48, "rtmr2": 48, "rtmr3": 48, "mrconfigid": 48,
            "min_tee_tcb_svn": 16, "td_attributes": 8, "xfam": 8},
    "snp": {"measurement": 48, "host_data": 32},
    "sim": {"measurement": 32, "platform_key": 32},
}
_INT: dict[str, tuple[str, ...]] = {
    "sgx": ("isv_prod_id", "min_isv_svn", "min_config_svn"),
    "tdx": (),
    "snp": ("max_vmpl",),
    "sim": (),
}
_COMMON = ("tee", "name", "allow_debug")
_EXTRA: dict[str, tuple[str, ...]] = {
    "sgx": ("accept_tcb", "allow_provision_key"),
    "tdx": ("accept_tcb", "rtmr0"),
    "snp": ("min_tcb", "product", "allow_migration_agent"),
    "sim": (),
}
DEFAULT_ACCEPT_TCB: dict[str, tuple[str, ...]] = {"UpToDate": ()}
_FLAGS = ("allow_debug", "allow_migration_agent", "allow_provision_key")


def read_policy_file(path: Path, what: str) -> bytes:
    """The bytes of a policy file, refused with a clear error if unreadable or over the size cap."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PolicyError(f"cannot read {what} {path}: {e.strerror}") from None
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(f"{what} {path} is larger than {MAX_POLICY_BYTES} bytes")
    return data


def _hex(value: object, n: int, where: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(rf"[0-9a-fA-F]{{{2 * n}}}", value):
        raise PolicyError(f"{where}: expected {n} bytes as {2 * n} hex digits")
    return value.lower()


def _int(value: object, where: str, lo: int = 0, hi: int = 2**64 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise PolicyError(f"{where}: expected an integer in [{lo}, {hi}]")
    return value


@dataclass(frozen=True)
class Identity:
    """One allowed TEE identity: a tee type and the claims it must have.

    Only fields of the identity's tee type may be set. Unset value fields are not checked;
    ``accept_tcb`` maps each accepted TCB status to the advisory ids accepted with it.
    """

    tee: str
    name: str | None = None
    allow_debug: bool = False
    accept_tcb: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: dict(DEFAULT_ACCEPT_TCB), hash=False
    )
    # sgx
    mrenclave: str | None = None
    mrsigner: str | None = None
    isv_prod_id: int | None = None
    min_isv_svn: int | None = None
    isv_ext_prod_id: str | None = None  # KSS, 16 bytes hex
    isv_family_id: str | None = None  # KSS, 16 bytes hex
    config_id: str | None = None  # KSS, 64 bytes hex
    min_config_svn: int | None = None  # KSS
    allow_provision_key: bool = False  # PROVISIONKEY/EINITTOKENKEY attributes
    # tdx
    mrtd: str | None = None
    rtmr0: tuple[str, ...] | None = None  # allowed RTMR0 values
    rtmr1: str | None = None
    rtmr2: str | None = None
    rtmr3: str | None = None
    mrconfigid: str | None = None
    min_tee_tcb_svn: str | None = None  # 16 bytes hex, compared component by component
    td_attributes: str | None = None  # 8 bytes hex, exact (unset: only default-safe bits)
    xfam: str | None = None  # 8 bytes hex, exact
    # snp (measurement shared with sim)
    measurement: str | None = None
    host_data: str | None = None
    min_tcb: Mapping[str, int] | None = field(default=None, hash=False)
    max_vmpl: int | None = None  # None means 0
    product: str | None = None
    allow_migration_agent: bool = False
    # sim
    platform_key: str | None = None

    @property
    def label(self) -> str:
        """How reasons name this identity."""
        return f"{self.tee} identity {self.name!r}" if self.name else f"{self.tee} identity"

    @classmethod
    def from_dict(cls, obj: object, where: str = "identity") -> Identity:
        """Parse and validate one identity (unknown or other-TEE fields are errors)."""
        if not isinstance(obj, dict):
            raise PolicyError(f"{where}: expected a table/object")
        tee = obj.get("tee")
        if tee not in TEES:
            raise PolicyError(f"{where}: tee must be one of {', '.join(TEES)}")
        allowed = set(_COMMON) | set(_HEX[tee]) | set(_INT[tee]) | set(_EXTRA[tee])
        extra = set(obj) - allowed
        if extra:
            raise PolicyError(
                f"{where}: fields {', '.join(sorted(extra))} are not valid for tee {tee!r}"
            )
        kw: dict[str, Any] = {"tee": tee}
        if "name" in obj:
            if not isinstance(obj["name"], str) or not 0 < len(obj["name"]) <= 128:
                raise PolicyError(f"{where}.name: expected a string of 1..128 characters")
            kw["name"] = obj["name"]
        for k in ("allow_debug", "allow_migration_agent", "allow_provision_key"):
            if k in obj:
                if not isinstance(obj[k], bool):
                    raise PolicyError(f"{where}.{k}: expected true or false")
                kw[k] = obj[k]
        for k, n in _HEX[tee].items():
            if k in obj:
                kw[k] = _hex(obj[k], n, f"{where}.{k}")
        for k in _INT[tee]:
            if k in obj:
                kw[k] = _int(obj[k], f"{where}.{k}", 0, 3 if k == "max_vmpl" else 0xFFFF)
        if "accept_tcb" in obj:
            kw["accept_tcb"] = _accept_tcb(obj["accept_tcb"], f"{where}.accept_tcb")
        if "rtmr0" in obj:
            v = obj["rtmr0"]
            if not isinstance(v, list) or not v:
                raise PolicyError(f"{where}.rtmr0: expected a non-empty list of allowed values")
            kw["rtmr0"] = tuple(sorted({_hex(x, 48, f"{where}.rtmr0") for x in v}))
        if "min_tcb" in obj:
            v = obj["min_tcb"]
            if not isinstance(v, dict) or not v or set(v) - set(TCB_COMPONENTS):
                raise PolicyError(
                    f"{where}.min_tcb: expected a table with keys from {', '.join(TCB_COMPONENTS)}"
                )
            kw["min_tcb"] = {k: _int(x, f"{where}.min_tcb.{k}", 0, 255) for k, x in v.items()}
        if "product" in obj:
            if obj["product"] not in SNP_PRODUCTS:
                raise PolicyError(f"{where}.product: expected one of {', '.join(SNP_PRODUCTS)}")
            kw["product"] = obj["product"]
        ident = cls(**kw)
        ident._require(where)
        return ident

    def _require(self, where: str) -> None:
        if self.tee == "sgx" and not (self.mrenclave or self.mrsigner):
            raise PolicyError(f"{where}: an sgx identity needs mrenclave and/or mrsigner")
        if self.tee == "sgx" and self.mrsigner and not self.mrenclave:
            if self.isv_prod_id is None or self.min_isv_svn is None:
                raise PolicyError(
                    f"{where}: an sgx identity by mrsigner also needs isv_prod_id and min_isv_svn"
                )
        if self.tee == "tdx" and not self.mrtd:
            raise PolicyError(f"{where}: a tdx identity needs mrtd")
        if self.tee in ("snp", "sim") and not self.measurement:
            raise PolicyError(f"{where}: a {self.tee} identity needs measurement")
        if self.tee == "snp":
            if self.product is None:
                raise PolicyError(
                    f"{where}: an snp identity needs product (one of {', '.join(SNP_PRODUCTS)}): "
                    "the TCB floor and the root key depend on it")
            need = SNP_TCB_COMPONENTS[self.product]
            missing = [c for c in need if c not in (self.min_tcb or {})]
            if missing:
                raise PolicyError(
                    f"{where}: an snp identity on {self.product} needs min_tcb for "
                    f"{', '.join(need)}; add {', '.join(missing)} (the lowest firmware you "
                    "accept; 'sealtorch policy init --from-evidence' fills them in)")
            extra = set(self.min_tcb or {}) - set(need)
            if extra:
                raise PolicyError(f"{where}: {self.product} has no TCB component "
                                  f"{', '.join(sorted(extra))}")
        if self.tee == "sim" and not self.platform_key:
            raise PolicyError(
                f"{where}: a sim identity needs platform_key (the fingerprint of a sim platform "
                "key its tenant registered: 'sealtorch sim init' prints it)")

    def to_dict(self) -> dict[str, Any]:
        """Plain form with only the fields that are set (defaults omitted)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "accept_tcb":
                if self.tee in ("sgx", "tdx"):
                    out["accept_tcb"] = {k: list(a) for k, a in sorted(v.items())}
                continue
            if v is None or (f.name in _FLAGS and not v):
                continue
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Mapping):
                v = dict(sorted(v.items()))
            out[f.name] = v
        return out


def _accept_tcb(v: object, where: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(v, dict) or not v:
        raise PolicyError(f"{where}: expected a table of status = [advisory ids]")
    out: dict[str, tuple[str, ...]] = {}
    for status, advs in v.items():
        if status == "Revoked":
            raise PolicyError(f"{where}: TCB status Revoked can never be accepted")
        if status not in TCB_STATUSES:
            raise PolicyError(f"{where}: unknown TCB status; known: {', '.join(TCB_STATUSES)}")
        if not isinstance(advs, list) or not all(
            isinstance(a, str) and ADVISORY_RE.match(a) for a in advs
        ):
            raise PolicyError(
                f"{where}.{status}: expected a list of advisory ids like INTEL-SA-00615"
            )
        out[status] = tuple(sorted(set(advs)))
    return out


@dataclass(frozen=True)
class ModelPolicy:
    """One model's release policy (versioned; higher versions supersede lower ones)."""

    version: int
    caches: tuple[Identity, ...]
    runtimes: tuple[Identity, ...] = ()
    factories: tuple[str, ...] = ()
    lease_seconds: int = 3600
    max_releases_per_lease: int = 1000
    #: dkeyserver admits a cache whose evidence matches ``caches`` without ``cache approve``
    #: (``cache revoke`` still keeps it out); off by default
    admit_caches: bool = False

    def __post_init__(self) -> None:
        for name in ("caches", "runtimes", "factories"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for ident in (*self.caches, *self.runtimes):
            if not isinstance(ident, Identity):
                raise PolicyError("caches and runtimes must hold Identity objects")
        _int(self.version, "version", 1, 2**53)
        _int(self.lease_seconds, "lease_seconds", 1, MAX_LEASE_SECONDS)
        _int(self.max_releases_per_lease, "max_releases_per_lease", 1, 2**31)
        if not isinstance(self.admit_caches, bool):
            raise PolicyError("admit_caches: expected true or false")
        if len(self.caches) + len(self.runtimes) > MAX_IDENTITIES:
            raise PolicyError(f"a policy may name at most {MAX_IDENTITIES} identities")
        for f in self.factories:
            if not isinstance(f, str) or not FACTORY_RE.match(f):
                raise PolicyError("factories: each entry must look like 'package.module:function'")

    @classmethod
    def from_dict(cls, obj: object) -> ModelPolicy:
        """Parse the JSON/TOML structure strictly."""
        if not isinstance(obj, dict):
            raise PolicyError("a policy must be a table/object")
        allowed = {"format", "version", "caches", "runtimes", "factories", "lease_seconds",
                   "max_releases_per_lease", "admit_caches"}
        extra = set(obj) - allowed
        if extra:
            raise PolicyError(f"unknown policy fields: {', '.join(sorted(extra))}")
        if obj.get("format", FORMAT) != FORMAT:
            raise PolicyError(f"policy format must be {FORMAT!r}")
        if "version" not in obj:
            raise PolicyError("a policy needs a version (integer >= 1)")

        def idents(key: str) -> tuple[Identity, ...]:
            v = obj.get(key, [])
            if not isinstance(v, list):
                raise PolicyError(f"{key}: expected a list of identities")
            return tuple(Identity.from_dict(x, f"{key}[{i}]") for i, x in enumerate(v))

        factories = obj.get("factories", [])
        if not isinstance(factories, list):
            raise PolicyError("factories: expected a list of 'module:function' strings")
        kw: dict[str, Any] = {
            "version": obj["version"],
            "caches": idents("caches"),
            "runtimes": idents("runtimes"),
            "factories": tuple(factories),
        }
        for k in ("lease_seconds", "max_releases_per_lease"):
            if k in obj:
                kw[k] = obj[k]
        if "admit_caches" in obj:
            if not isinstance(obj["admit_caches"], bool):
                raise PolicyError("admit_caches: expected true or false")
            kw["admit_caches"] = obj["admit_caches"]
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """The structure written to TOML/JSON; its canonical JSON is what gets signed/MACed."""
        return {
            "format": FORMAT,
            "version": self.version,
            "lease_seconds": self.lease_seconds,
            "max_releases_per_lease": self.max_releases_per_lease,
            "factories": list(self.factories),
            "caches": [i.to_dict() for i in self.caches],
            "runtimes": [i.to_dict() for i in self.runtimes],
            # only when set, so policies without it keep their canonical bytes
            **({"admit_caches": True} if self.admit_caches else {}),
        }

    def canonical(self) -> bytes:
        """``canonical_json(self.to_dict())``."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_json(cls, raw: bytes | str) -> ModelPolicy:
        """Parse JSON text."""
        if len(raw) > MAX_POLICY_BYTES:
            raise PolicyError(f"policy larger than {MAX_POLICY_BYTES} bytes")
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise PolicyError("policy is not valid JSON") from e
        return cls.from_dict(obj)

    @classmethod
    def from_toml(cls, text: str) -> ModelPolicy:
        """Parse TOML text."""
        if len(text) > MAX_POLICY_BYTES:
            raise PolicyError(f"policy larger than {MAX_POLICY_BYTES} bytes")
        try:
            obj = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise PolicyError(f"policy is not valid TOML ({e})") from None
        return cls.from_dict(obj)

    @classmethod
    def load(cls, path: str | Path) -> ModelPolicy:
        """Read a ``.json`` file as JSON, anything else as TOML."""
        p = Path(path)
        data = read_policy_file(p, "policy")
        if p.suffix.lower() == ".json":
            return cls.from_json(data)
        try:
            return cls.from_toml(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise PolicyError(f"policy {p} is not UTF-8 text") from None

    def to_toml(self) -> str:
        """TOML text of :meth:`to_dict` (round-trips through :meth:`from_toml`)."""
        d = self.to_dict()
        lines = [f"{k} = {_toml_value(d[k])}" for k in
                 ("format", "version", "lease_seconds", "max_releases_per_lease", "factories")]
        for kind in ("caches", "runtimes"):
            for ident in d[kind]:
                lines += ["", f"[[{kind}]]"]
                subs = {k: v for k, v in ident.items() if isinstance(v, dict)}
                for k, v in ident.items():
                    if k not in subs:
                        lines.append(f"{k} = {_toml_value(v)}")
                for k, v in subs.items():
                    lines.append(f"[{kind}.{k}]")
                    lines += [f"{_toml_key(sk)} = {_toml_value(sv)}" for sk, sv in v.items()]
        return "\n".join(lines) + "\n"

    def evaluate_cache(self, claims: Claims) -> Decision:
        """May a key cache with these claims receive the model key?"""
        return evaluate(self.caches, claims, what="caches")

    def evaluate_runtime(self, claims: Claims) -> Decision:
        """May a cache hand the key to a runtime with these claims?"""
        return evaluate(self.runtimes, claims, what="runtimes")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=True)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise PolicyError("cannot write this value as TOML")


@dataclass(frozen=True)
class Decision:
    """The result of :func:`evaluate`: ``matched`` is the identity that allowed the claims."""

    allowed: bool
    matched: Identity | None
    reasons: tuple[str, ...]
    matched_index: int | None = None

    def __bool__(self) -> bool:
        return self.allowed

    def raise_if_denied(self) -> None:
        """Raise :class:`PolicyDenied` carrying the reasons when the decision is a denial."""
        if not self.allowed:
            raise PolicyDenied("the evidence is not allowed by the policy", list(self.reasons))


def _b(v: bytes | None) -> str:
    return v.hex() if v is not None else "(absent)"


def check_identity(ident: Identity, claims: Claims) -> list[str]:
    """Every failed check of one identity against ``claims`` (empty list: it matches)."""
    if ident.tee != claims.tee:
        return [f"tee is {claims.tee}, the identity requires {ident.tee}"]
    r: list[str] = []
    if claims.debug and not ident.allow_debug:
        r.append("the TEE is debuggable and the identity does not allow debug")
    if claims.tee in ("sgx", "tdx"):
        status = claims.tcb_status
        if status == "Revoked":
            r.append("TCB status Revoked is always denied")
        elif status is None or status not in ident.accept_tcb:
            r.append(
                f"TCB status {status} is not accepted "
                f"(accepted: {', '.join(sorted(ident.accept_tcb))})"
            )
        else:
            extra = sorted(set(claims.advisory_ids) - set(ident.accept_tcb[status]))
            if extra:
                r.append(f"advisories {', '.join(extra)} are not accepted with TCB status {status}")

    def eq(name: str, want: str | None, got: bytes | None) -> None:
        if want is not None and (got is None or got.hex() != want):
            r.append(f"{name} is {_b(got)}, the identity requires {want}")

    def at_least(name: str, want: int | None, got: int | None) -> None:
        if want is not None and (got is None or got < want):
            r.append(f"{name} is {got}, the identity requires at least {want}")

    if claims.tee == "sgx":
        eq("mrenclave", ident.mrenclave, claims.mrenclave)
        eq("mrsigner", ident.mrsigner, claims.mrsigner)
        if ident.isv_prod_id is not None and claims.isv_prod_id != ident.isv_prod_id:
            r.append(f"isv_prod_id is {claims.isv_prod_id}, the identity requires "
                     f"{ident.isv_prod_id}")
        at_least("isv_svn", ident.min_isv_svn, claims.isv_svn)
        for n in ("isv_ext_prod_id", "isv_family_id", "config_id"):
            eq(n, getattr(ident, n), getattr(claims, n))
        at_least("config_svn", ident.min_config_svn, claims.config_svn)
        attrs = claims.attributes or b""
        if attrs and attrs[0] & SGX_PROVISION_BITS and not ident.allow_provision_key:
            r.append("the enclave may use PROVISIONKEY/EINITTOKENKEY, which no workload "
                     "enclave needs, and the identity does not allow it")
    elif claims.tee == "tdx":
        eq("mrtd", ident.mrtd, claims.mrtd)
        for n in ("rtmr1", "rtmr2", "rtmr3", "mrconfigid"):
            eq(n, getattr(ident, n), getattr(claims, n))
        eq("xfam", ident.xfam, claims.xfam)
        if ident.td_attributes is not None:
            eq("td_attributes", ident.td_attributes, claims.td_attributes)
        else:
            td_bits = int.from_bytes(claims.td_attributes or bytes(8), "little")
            odd = td_bits & ~TDX_DEFAULT_ATTRIBUTES & ~1  # DEBUG is reported on its own above
            if odd:
                r.append(f"td_attributes {td_bits:#018x} set bits a production TD does not have "
                         f"({odd:#x}); name the exact td_attributes to allow them")
        if ident.rtmr0 is not None and (
            claims.rtmr0 is None or claims.rtmr0.hex() not in ident.rtmr0
        ):
            r.append(f"rtmr0 is {_b(claims.rtmr0)}, not one of the identity's allowed values")
        if ident.min_tee_tcb_svn is not None:
            want = bytes.fromhex(ident.min_tee_tcb_svn)
            got = claims.tee_tcb_svn or b""
            if len(got) != len(want) or any(g < w for g, w in zip(got, want, strict=True)):
                r.append(f"tee_tcb_svn is {_b(claims.tee_tcb_svn)}, the identity requires at "
                         f"least {ident.min_tee_tcb_svn} in every component")
    elif claims.tee == "snp":
        eq("measurement", ident.measurement, claims.measurement)
        eq("host_data", ident.host_data, claims.host_data)
        if ident.product is not None and claims.product != ident.product:
            r.append(f"product is {claims.product}, the identity requires {ident.product}")
        max_vmpl = 0 if ident.max_vmpl is None else ident.max_vmpl
        if claims.vmpl is None or claims.vmpl > max_vmpl:
            r.append(f"vmpl is {claims.vmpl}, the identity allows at most {max_vmpl}")
        if claims.migration_agent and not ident.allow_migration_agent:
            r.append("a migration agent is allowed by the guest policy and the identity "
                     "does not allow it")
        for comp, min_v in (ident.min_tcb or {}).items():
            at_least(f"reported_tcb.{comp}", min_v, (claims.reported_tcb or {}).get(comp))
    elif claims.tee == "sim":
        eq("measurement", ident.measurement, claims.measurement)
        if ident.platform_key is not None and claims.platform_key != ident.platform_key:
            r.append(f"platform_key is {claims.platform_key}, the identity requires "
                     f"{ident.platform_key}")
    return r


def evaluate(identities: Sequence[Identity], claims: Claims, *, what: str = "identities"
             ) -> Decision:
    """Allow when any identity matches; otherwise deny with one reason per failed check.

    Reasons read ``"<what>[i] (<label>): <check>"``; they are for audit logs and admins, never
    for unauthenticated callers.
    """
    if not identities:
        return Decision(False, None, (f"{what}: the policy names no identity",))
    reasons: list[str] = []
    for i, ident in enumerate(identities):
        failed = check_identity(ident, claims)
        if not failed:
            return Decision(True, ident, (), i)
        reasons += [f"{what}[{i}] ({ident.label}): {f}" for f in failed]
    return Decision(False, None, tuple(reasons))


PINNED_LABEL = "pinned from evidence (development shortcut)"


def identity_from_claims(claims: Claims, *, name: str = PINNED_LABEL) -> Identity:
    """An identity that pins these verified claims with the strict defaults.

    A development shortcut: production policies start from measurements computed offline. The
    identity never inherits leniency from the evidence (debug, non-UpToDate TCB stay denied).
    """
    d: dict[str, Any] = {"tee": claims.tee, "name": name}

    def hx(v: bytes | None) -> str | None:
        return v.hex() if v is not None else None

    if claims.tee == "sgx":
        d.update(mrenclave=hx(claims.mrenclave), mrsigner=hx(claims.mrsigner),
                 isv_prod_id=claims.isv_prod_id, min_isv_svn=claims.isv_svn,
                 isv_ext_prod_id=hx(claims.isv_ext_prod_id),
                 isv_family_id=hx(claims.isv_family_id), config_id=hx(claims.config_id),
                 min_config_svn=claims.config_svn)
    elif claims.tee == "tdx":
        d.update(mrtd=hx(claims.mrtd), rtmr0=[hx(claims.rtmr0)], rtmr1=hx(claims.rtmr1),
                 rtmr2=hx(claims.rtmr2), mrconfigid=hx(claims.mrconfigid),
                 min_tee_tcb_svn=hx(claims.tee_tcb_svn), td_attributes=hx(claims.td_attributes),
                 xfam=hx(claims.xfam))
    elif claims.tee == "snp":
        d.update(measurement=hx(claims.measurement), host_data=hx(claims.host_data),
                 product=claims.product, max_vmpl=claims.vmpl,
                 min_tcb=dict(claims.reported_tcb or {}))
    else:
        d.update(measurement=hx(claims.measurement), platform_key=claims.platform_key)
    return Identity.from_dict({k: v for k, v in d.items() if v is not None and v != {}},
                              "pinned identity")
