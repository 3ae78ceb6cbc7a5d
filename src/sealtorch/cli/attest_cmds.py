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
@click.option("--role", default="dkeycache", show_default=True, help="Role being measured.")
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


@policy.command("init")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Policy file to write (.toml, or .json for JSON).")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.option("--version", "version", type=int, default=1, show_default=True)
@click.option("--for", "for_", type=click.Choice(["caches", "runtimes", "both"]),
              default="both", show_default=True, help="Which allow-list(s) get the identity.")
@click.option("--lease-seconds", type=int, default=3600, show_default=True)
@click.option("--max-releases-per-lease", type=int, default=1000, show_default=True)
@click.option("--factory", "factories", multiple=True, help="Allowed 'module:function'.")
@click.option("--from-evidence", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="DEVELOPMENT SHORTCUT: pin the identity of this verified evidence.")
@click.option("--tee", type=TEE_CHOICE, required=True)
@click.option("--collateral", type=click.Path(path_type=Path, exists=True))
@click.option("--vcek", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--vcek-dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--sim-key", "sim_keys", multiple=True)
@click.option("--at", type=int, default=None)
@click.option("--name", help="Label of the identity.")
@click.option("--allow-debug", is_flag=True, help="Allow debuggable TEEs (never in production).")
@click.option("--accept-tcb", multiple=True,
              help="STATUS=ADV1,ADV2: accept this TCB status with these advisories; repeatable.")
@click.option("--mrenclave")
@click.option("--mrsigner")
@click.option("--isv-prod-id", type=int)
@click.option("--min-isv-svn", type=int)
@click.option("--mrtd")
@click.option("--rtmr0", multiple=True, help="An allowed RTMR0 value; repeatable.")
@click.option("--rtmr1")
@click.option("--rtmr2")
@click.option("--rtmr3")
@click.option("--mrconfigid")
@click.option("--min-tee-tcb-svn")
@click.option("--measurement")
@click.option("--host-data")
@click.option("--product", type=click.Choice(["milan", "genoa", "turin"]))
@click.option("--max-vmpl", type=int)
@click.option("--min-tcb", multiple=True, help="COMPONENT=N (bootloader, tee, snp, microcode, "
              "fmc); repeatable.")
@click.option("--platform-key", help="sim: platform key fingerprint (hex).")
def policy_init(output: Path, force: bool, version: int, for_: str, lease_seconds: int,
                max_releases_per_lease: int, factories: tuple[str, ...],
                from_evidence: Path | None, tee: str, collateral: Path | None,
                vcek: Path | None, vcek_dir: Path | None, sim_keys: tuple[str, ...],
                at: int | None, name: str | None, allow_debug: bool,
                accept_tcb: tuple[str, ...], min_tcb: tuple[str, ...], rtmr0: tuple[str, ...],
                **values: Any) -> None:
    """Write a policy with one identity, from expected values or (dev only) from evidence."""
    from sealtorch.attestation.policy import Identity, ModelPolicy, identity_from_claims
    from sealtorch.errors import PolicyError

    if output.exists() and not force:
        raise click.UsageError(f"{output} exists; pass --force to overwrite it")
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
    ident = Identity.from_dict(d, "identity")
    idents = (ident,)
    pol = ModelPolicy(
        version=version,
        caches=idents if for_ in ("caches", "both") else (),
        runtimes=idents if for_ in ("runtimes", "both") else (),
        factories=tuple(factories),
        lease_seconds=lease_seconds,
        max_releases_per_lease=max_releases_per_lease,
    )
    text = pol.canonical().decode() + "\n" if output.suffix == ".json" else pol.to_toml()
    output.write_text(text)
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


COMMANDS: list[click.Command] = [attest, policy, sim_group]
