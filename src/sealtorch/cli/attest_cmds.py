"""``sealtorch attest verify|measure``, ``sealtorch policy init``, ``sealtorch sim init``.

Offline tools for owners and developers: verify evidence (optionally at an explicit time) and
explain a policy decision, print this installation's sim measurement, write a policy from
expected values (or, as a labelled development shortcut, from evidence), create a sim platform
key. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from sealtorch.attestation.claims import Claims
    from sealtorch.attestation.evidence import Evidence

TEE_CHOICE = click.Choice(["sgx", "tdx", "snp", "sim"])
#: roles a sim measurement is taken for (what dkeycache and `sealtorch serve` measure)
MEASURED_ROLES = ("dkeycache", "serve")
MAX_EVIDENCE_FILE = 128 * 1024


def _read_evidence(path: Path, tee: str, vcek: Path | None) -> Evidence:
    """Evidence from a sealtorch evidence JSON file or a raw quote/report file."""
    from sealtorch.attestation.evidence import FORMAT, Evidence
    from sealtorch.errors import EvidenceFormatError

    try:
        if path.stat().st_size > MAX_EVIDENCE_FILE:
            raise EvidenceFormatError(f"{path} is larger than {MAX_EVIDENCE_FILE} bytes")
        raw = path.read_bytes()
    except OSError as e:
        raise EvidenceFormatError(f"cannot read evidence {path}: {e.strerror}") from None
    ev: Evidence
    if raw[:1] == b"{" and FORMAT.encode() in raw:
        ev = Evidence.from_json(raw)
        if ev.tee != tee:
            raise EvidenceFormatError(f"{path} holds {ev.tee} evidence, not {tee}")
    else:
        ev = Evidence(tee=tee, quote=raw)
    if vcek is not None:
        if tee != "snp":
            raise EvidenceFormatError("--vcek applies to snp evidence only")
        try:
            ev = Evidence(tee=tee, quote=ev.quote, certs=vcek.read_bytes())
        except OSError as e:
            raise EvidenceFormatError(f"cannot read VCEK {vcek}: {e.strerror}") from None
    return ev


def _verify(
    evidence: Path,
    tee: str,
    collateral: Path | None,
    vcek: Path | None,
    vcek_dir: Path | None,
    sim_keys: tuple[str, ...],
    at: int | None,
) -> Claims:
    from sealtorch.attestation.verifiers import VerifierSet

    if tee == "sim" and not sim_keys:
        raise click.UsageError("sim evidence needs --sim-key (the registered platform key)")
    vs = VerifierSet(collateral=collateral if tee in ("sgx", "tdx") else None,
                     vcek_dir=vcek_dir, sim_platform_keys=list(sim_keys))
    return vs.verify(_read_evidence(evidence, tee, vcek), now=at)


def _evidence_options(f: Any) -> Any:
    f = click.option("--at", "at", type=int, default=None,
                     help="Verify at this UNIX time instead of now (offline use only).")(f)
    f = click.option("--sim-key", "sim_keys", multiple=True,
                     help="Registered sim platform public key (path, PEM, hex); repeatable.")(f)
    f = click.option("--vcek-dir", type=click.Path(path_type=Path, file_okay=False),
                     help="Offline VCEK store (<chip_id hex>.der).")(f)
    f = click.option("--vcek", type=click.Path(path_type=Path, dir_okay=False, exists=True),
                     help="SNP: the VCEK/VLEK certificate (DER or PEM).")(f)
    f = click.option("--collateral", type=click.Path(path_type=Path, exists=True),
                     help="SGX/TDX: DCAP collateral JSON file or <FMSPC>-<ca>.json directory.")(f)
    f = click.option("--tee", required=True, type=TEE_CHOICE, help="TEE type of the evidence.")(f)
    return f


@click.group("attest")
def attest() -> None:
    """Verify attestation evidence and print sim measurements."""


@attest.command("verify")
@click.argument("evidence", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@_evidence_options
@click.option("--policy", "policy_path", type=click.Path(path_type=Path, dir_okay=False,
                                                          exists=True),
              help="Evaluate the claims against this policy (TOML or JSON).")
@click.option("--as", "as_", type=click.Choice(["cache", "runtime"]), default="cache",
              show_default=True, help="Which allow-list of the policy to evaluate.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def verify_cmd(evidence: Path, tee: str, collateral: Path | None, vcek: Path | None,
               vcek_dir: Path | None, sim_keys: tuple[str, ...], at: int | None,
               policy_path: Path | None, as_: str, as_json: bool) -> None:
    """Verify EVIDENCE (raw quote/report or evidence JSON); exit 0 only if it verifies and the
    policy, if given, allows it."""
    from sealtorch.attestation.policy import ModelPolicy

    claims = _verify(evidence, tee, collateral, vcek, vcek_dir, sim_keys, at)
    out: dict[str, Any] = {"verified": True, "claims": claims.to_dict()}
    allowed = True
    if policy_path is not None:
        pol = ModelPolicy.load(policy_path)
        d = pol.evaluate_cache(claims) if as_ == "cache" else pol.evaluate_runtime(claims)
        allowed = d.allowed
        out["decision"] = {
            "allowed": d.allowed,
            "matched": None if d.matched is None else d.matched.to_dict(),
            "matched_index": d.matched_index,
            "reasons": list(d.reasons),
        }
    if as_json:
        click.echo(json.dumps(out, indent=2, sort_keys=True))
    else:
        click.echo(f"verified: {tee} evidence")
        for k, v in out["claims"].items():
            click.echo(f"  {k}: {v}")
        if "decision" in out:
            dec = out["decision"]
            if dec["allowed"]:
                click.echo(f"policy: ALLOWED by {as_}s[{dec['matched_index']}]")
            else:
                click.echo("policy: DENIED")
                for r in dec["reasons"]:
                    click.echo(f"  - {r}")
    if not allowed:
        sys.exit(1)


@attest.command("measure")
@click.option("--role", default="dkeycache", show_default=True,
              type=click.Choice(MEASURED_ROLES),
              help="Role being measured: dkeycache (the key cache) or serve (the runtime).")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False,
                                                          exists=True),
              help="The role's measured configuration file.")
@click.option("--package-root", type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="Measure this package tree instead of the installed one.")
def measure_cmd(role: str, config_path: Path | None, package_root: Path | None) -> None:
    """Print the sim measurement (hex) of this installation for ROLE and its config."""
    from sealtorch.attestation import sim

    config = config_path.read_bytes() if config_path is not None else b""
    click.echo(sim.measure(role, config, package_root=package_root).hex())


@click.group("policy")
def policy() -> None:
    """Write release policies."""


def _kv_list(values: tuple[str, ...], what: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for v in values:
        status, _, advs = v.partition("=")
        if not status:
            raise click.BadParameter(f"{what}: expected STATUS=ADVISORY,ADVISORY")
        out[status] = [a for a in advs.split(",") if a]
    return out


def _overrides(items: tuple[str, ...], option: str) -> dict[str, Any]:
    """``FIELD=VALUE`` items of ``--cache``/``--runtime`` as identity fields (integers for
    numeric fields, a list for ``rtmr0``); the policy parser validates names and values."""
    out: dict[str, Any] = {}
    for item in items:
        k, sep, v = item.partition("=")
        k = k.strip().replace("-", "_")
        if not sep or not k or not v:
            raise click.BadParameter("expected FIELD=VALUE, e.g. measurement=<hex>",
                                     param_hint=option)
        if k == "rtmr0":
            out.setdefault("rtmr0", []).append(v)
        elif k in _INT_FIELDS:
            try:
                out[k] = int(v, 0)
            except ValueError:
                raise click.BadParameter(f"{k} takes an integer", param_hint=option) from None
        else:
            out[k] = v
    return out


_INT_FIELDS = ("isv_prod_id", "min_isv_svn", "max_vmpl")
_ROLE_HELP = ("FIELD=VALUE: an identity for the {} allow-list, made of the identity the other "
              "options describe with this field changed (e.g. measurement=<hex>, "
              "mrenclave=<hex>, name=<label>); repeatable. With --cache or --runtime both "
              "lists get an identity.")


@policy.command("init")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Policy file to write (.toml, or .json for JSON).")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.option("--version", "version", type=click.IntRange(1), default=1, show_default=True,
              help="Policy version (raise it with each change; caches refuse older ones).")
@click.option("--for", "for_", type=click.Choice(["caches", "runtimes", "both"]),
              default="both", show_default=True,
              help="Which allow-list(s) get the identity (without --cache/--runtime).")
@click.option("--cache", "cache_fields", multiple=True, metavar="FIELD=VALUE",
              help=_ROLE_HELP.format("key caches'"))
@click.option("--runtime", "runtime_fields", multiple=True, metavar="FIELD=VALUE",
              help=_ROLE_HELP.format("runtimes'"))
@click.option("--lease-seconds", type=click.IntRange(1), default=3600, show_default=True,
              help="How long a cache may hold a released key before it must attest again.")
@click.option("--max-releases-per-lease", type=click.IntRange(1), default=1000,
              show_default=True, help="File keys a cache may hand out per lease.")
@click.option("--factory", "factories", multiple=True,
              help="Model factory 'module:function' `sealtorch serve` may use; repeatable.")
@click.option("--from-evidence", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="DEVELOPMENT SHORTCUT: pin the identity of this verified evidence.")
@click.option("--tee", type=TEE_CHOICE, required=True, help="TEE type of the identity.")
@click.option("--collateral", type=click.Path(path_type=Path, exists=True),
              help="--from-evidence, SGX/TDX: DCAP collateral JSON file or directory.")
@click.option("--vcek", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="--from-evidence, SNP: the VCEK/VLEK certificate.")
@click.option("--vcek-dir", type=click.Path(path_type=Path, file_okay=False),
              help="--from-evidence, SNP: offline VCEK store.")
@click.option("--sim-key", "sim_keys", multiple=True,
              help="--from-evidence, sim: registered platform public key; repeatable.")
@click.option("--at", type=int, default=None,
              help="--from-evidence: verify at this UNIX time (offline use only).")
@click.option("--name", help="Label of the identity.")
@click.option("--allow-debug", is_flag=True, help="Allow debuggable TEEs (never in production).")
@click.option("--accept-tcb", multiple=True,
              help="STATUS=ADV1,ADV2: accept this TCB status with these advisories; repeatable.")
@click.option("--mrenclave", help="SGX: required MRENCLAVE (hex).")
@click.option("--mrsigner", help="SGX: required MRSIGNER (hex).")
@click.option("--isv-prod-id", type=int, help="SGX: required ISVPRODID.")
@click.option("--min-isv-svn", type=int, help="SGX: minimum ISVSVN.")
@click.option("--mrtd", help="TDX: required MRTD (hex).")
@click.option("--rtmr0", multiple=True, help="TDX: an allowed RTMR0 value; repeatable.")
@click.option("--rtmr1", help="TDX: required RTMR1 (hex).")
@click.option("--rtmr2", help="TDX: required RTMR2 (hex).")
@click.option("--rtmr3", help="TDX: required RTMR3 (hex).")
@click.option("--mrconfigid", help="TDX: required MRCONFIGID (hex).")
@click.option("--min-tee-tcb-svn", help="TDX: minimum TEE TCB SVN (16 bytes hex).")
@click.option("--measurement", help="SNP/sim: required MEASUREMENT (hex; sim: from "
              "`sealtorch attest measure`).")
@click.option("--host-data", help="SNP: required HOST_DATA (hex).")
@click.option("--product", type=click.Choice(["milan", "genoa", "turin"]),
              help="SNP: required processor product.")
@click.option("--max-vmpl", type=int, help="SNP: highest VMPL allowed (default 0).")
@click.option("--min-tcb", multiple=True, help="SNP: COMPONENT=N (bootloader, tee, snp, "
              "microcode, fmc); repeatable.")
@click.option("--platform-key", help="sim: the platform's public key file, or its fingerprint "
              "(hex), both printed by `sealtorch sim init`.")
def policy_init(output: Path, force: bool, version: int, for_: str,
                cache_fields: tuple[str, ...], runtime_fields: tuple[str, ...],
                lease_seconds: int, max_releases_per_lease: int, factories: tuple[str, ...],
                from_evidence: Path | None, tee: str, collateral: Path | None,
                vcek: Path | None, vcek_dir: Path | None, sim_keys: tuple[str, ...],
                at: int | None, name: str | None, allow_debug: bool,
                accept_tcb: tuple[str, ...], min_tcb: tuple[str, ...], rtmr0: tuple[str, ...],
                **values: Any) -> None:
    """Write a policy from expected values (or, dev only, from evidence): one identity for
    the caches and/or runtimes allow-list, or one for each with --cache/--runtime."""
    from sealtorch._outputs import output_file, write_file
    from sealtorch.attestation.policy import Identity, ModelPolicy, identity_from_claims
    from sealtorch.errors import PolicyError

    output_file(output, overwrite=force)
    if values.get("platform_key") and Path(values["platform_key"]).is_file():
        from sealtorch.attestation import sim

        values["platform_key"] = sim.fingerprint(sim.load_platform_public_key(
            Path(values["platform_key"])))
    if from_evidence is not None:
        if any(v is not None for v in values.values()) or rtmr0 or min_tcb:
            raise click.UsageError("--from-evidence cannot be combined with expected values")
        claims = _verify(from_evidence, tee, collateral, vcek, vcek_dir, sim_keys, at)
        ident = identity_from_claims(claims)
        click.echo("WARNING: identity pinned from evidence the host sent: a development "
                   "shortcut; production policies start from measurements computed offline",
                   err=True)
        d = ident.to_dict()
    else:
        d = {"tee": tee, **{k: v for k, v in values.items() if v is not None}}
        if rtmr0:
            d["rtmr0"] = list(rtmr0)
        if min_tcb:
            tcb: dict[str, int] = {}
            for item in min_tcb:
                k, _, v = item.partition("=")
                try:
                    tcb[k] = int(v, 0)
                except ValueError:
                    raise PolicyError("--min-tcb: expected COMPONENT=NUMBER") from None
            d["min_tcb"] = tcb
        if name:
            d["name"] = name
    if allow_debug:
        d["allow_debug"] = True
    if accept_tcb:
        d["accept_tcb"] = {"UpToDate": [], **_kv_list(accept_tcb, "--accept-tcb")}
    caches: tuple[Identity, ...]
    runtimes: tuple[Identity, ...]
    if cache_fields or runtime_fields:
        if for_ != "both":
            raise click.UsageError("--for cannot be combined with --cache/--runtime")
        caches = (Identity.from_dict({**d, **_overrides(cache_fields, "--cache")},
                                     "cache identity"),)
        runtimes = (Identity.from_dict({**d, **_overrides(runtime_fields, "--runtime")},
                                       "runtime identity"),)
    else:
        ident = Identity.from_dict(d, "identity")
        caches = (ident,) if for_ in ("caches", "both") else ()
        runtimes = (ident,) if for_ in ("runtimes", "both") else ()
    pol = ModelPolicy(
        version=version,
        caches=caches,
        runtimes=runtimes,
        factories=tuple(factories),
        lease_seconds=lease_seconds,
        max_releases_per_lease=max_releases_per_lease,
    )
    text = pol.canonical().decode() + "\n" if output.suffix == ".json" else pol.to_toml()
    write_file(output, text.encode(), overwrite=force)
    click.echo(f"wrote {output}")


@click.group("sim")
def sim_group() -> None:
    """The sim software TEE (development and CI only; protects nothing)."""


@sim_group.command("init")
@click.option("--dir", "directory", type=click.Path(path_type=Path, file_okay=False),
              help="Where to keep the platform key (default $SEALTORCH_SIM_DIR or "
              "~/.sealtorch/sim).")
@click.option("--force", is_flag=True, help="Replace an existing platform key.")
def sim_init(directory: Path | None, force: bool) -> None:
    """Create a sim platform key (0600) and print its public key and fingerprint."""
    from sealtorch.attestation import sim

    path = sim.init_platform_key(directory, overwrite=force)
    pub = sim.load_platform_key(path).public_key()
    click.echo("WARNING: sim attestation protects nothing; use it for development only.",
               err=True)
    click.echo(f"platform key: {path}")
    click.echo(f"public key:   {path.parent / sim.PUBLIC_FILE}")
    click.echo(f"public hex:   {sim.raw_public(pub).hex()}")
    click.echo(f"fingerprint:  {sim.fingerprint(pub)}")


@sim_group.command("fingerprint")
@click.argument("public_key", type=click.Path(path_type=Path, dir_okay=False, exists=True))
def sim_fingerprint(public_key: Path) -> None:
    """Print the fingerprint (hex) of a sim platform's PUBLIC_KEY file: what a policy's
    ``platform_key`` names."""
    from sealtorch.attestation import sim

    click.echo(sim.fingerprint(sim.load_platform_public_key(public_key)))


COMMANDS: list[click.Command] = [attest, policy, sim_group]
