"""Policy: strict parsing, TOML/JSON equivalence, canonical form, strict defaults, reasons."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sealtorch.attestation.claims import Claims
from sealtorch.attestation.policy import Identity, ModelPolicy, evaluate
from sealtorch.errors import PolicyError
from sealtorch.protocol.canonical import canonical_json

MRE = "33" * 32
MRS = "81" * 32

EXAMPLE_TOML = f"""
format = "sealtorch-policy/v1"
version = 3
lease_seconds = 600
max_releases_per_lease = 50
factories = ["sealtorch.models.resnet:resnet50"]

[[caches]]
tee = "sgx"
name = "dkeycache 1.0"
mrenclave = "{MRE}"
[caches.accept_tcb]
UpToDate = []
ConfigurationAndSWHardeningNeeded = ["INTEL-SA-00615", "INTEL-SA-00289"]

[[caches]]
tee = "snp"
measurement = "{'ab' * 48}"
max_vmpl = 0
product = "genoa"
[caches.min_tcb]
bootloader = 3
tee = 0
snp = 8
microcode = 115

[[runtimes]]
tee = "tdx"
mrtd = "{'91' * 48}"
rtmr0 = ["{'00' * 48}", "{'01' * 48}"]
min_tee_tcb_svn = "{'00' * 16}"
"""


def sgx_claims(**kw: object) -> Claims:
    base: dict[str, object] = dict(
        tee="sgx", report_data=bytes(64), verified_at=1, debug=False, tcb_status="UpToDate",
        mrenclave=bytes.fromhex(MRE), mrsigner=bytes.fromhex(MRS), isv_prod_id=0, isv_svn=0,
    )
    base.update(kw)
    return Claims(**base)  # type: ignore[arg-type]


def test_toml_json_round_trip_and_canonical(tmp_path: Path) -> None:
    pol = ModelPolicy.from_toml(EXAMPLE_TOML)
    assert pol.version == 3 and pol.lease_seconds == 600 and len(pol.caches) == 2
    assert pol.caches[0].accept_tcb["ConfigurationAndSWHardeningNeeded"] == (
        "INTEL-SA-00289", "INTEL-SA-00615")
    assert ModelPolicy.from_toml(pol.to_toml()) == pol
    assert ModelPolicy.from_json(json.dumps(pol.to_dict())) == pol
    assert pol.canonical() == canonical_json(pol.to_dict())
    (tmp_path / "p.toml").write_text(pol.to_toml())
    (tmp_path / "p.json").write_bytes(pol.canonical())
    assert ModelPolicy.load(tmp_path / "p.toml") == ModelPolicy.load(tmp_path / "p.json") == pol


@pytest.mark.parametrize(
    "obj,msg",
    [
        ({"caches": []}, "version"),
        ({"version": 0, "caches": []}, "version"),
        ({"version": 1, "caches": [], "allow_all": True}, "unknown policy fields"),
        ({"version": 1, "caches": [{"tee": "sgx"}]}, "mrenclave"),
        ({"version": 1, "caches": [{"tee": "sgx", "mrsigner": MRS}]}, "isv_prod_id"),
        ({"version": 1, "caches": [{"tee": "sgx", "mrenclave": "zz"}]}, "hex"),
        ({"version": 1, "caches": [{"tee": "sgx", "mrenclave": MRE, "mrtd": "00"}]},
         "not valid for tee"),
        ({"version": 1, "caches": [{"tee": "sgx", "mrenclave": MRE,
                                    "accept_tcb": {"Revoked": []}}]}, "Revoked"),
        ({"version": 1, "caches": [{"tee": "sgx", "mrenclave": MRE,
                                    "accept_tcb": {"Whatever": []}}]}, "unknown TCB status"),
        ({"version": 1, "caches": [{"tee": "sgx", "mrenclave": MRE, "allow_debug": "yes"}]},
         "true or false"),
        ({"version": 1, "caches": [{"tee": "snp", "measurement": "ab" * 48,
                                    "product": "naples"}]}, "product"),
        ({"version": 1, "caches": [{"tee": "snp", "measurement": "ab" * 48,
                                    "min_tcb": {"ucode": 1}}]}, "min_tcb"),
        ({"version": 1, "caches": [{"tee": "xen"}]}, "tee must be"),
        ({"version": 1, "caches": [], "factories": ["os.system; rm"]}, "factories"),
        ({"version": 1, "caches": [], "lease_seconds": 0}, "lease_seconds"),
    ],
)
def test_rejects_bad_policies(obj: dict, msg: str) -> None:
    with pytest.raises(PolicyError, match=msg):
        ModelPolicy.from_dict(obj)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="TOML"):
        ModelPolicy.from_toml("version = ")
    with pytest.raises(PolicyError, match="JSON"):
        ModelPolicy.from_json("{")
    with pytest.raises(PolicyError, match="cannot read"):
        ModelPolicy.load(tmp_path / "missing.toml")


def test_strict_defaults() -> None:
    ident = Identity.from_dict({"tee": "sgx", "mrenclave": MRE})
    assert evaluate([ident], sgx_claims()).allowed
    d = evaluate([ident], sgx_claims(debug=True))
    assert not d.allowed and d.reasons == (
        "identities[0] (sgx identity): the TEE is debuggable and the identity does not allow "
        "debug",)
    d = evaluate([ident], sgx_claims(tcb_status="SWHardeningNeeded", advisory_ids=("INTEL-SA-1",)))
    assert not d.allowed and "TCB status SWHardeningNeeded is not accepted" in d.reasons[0]
    d = evaluate([ident], sgx_claims(tcb_status="Revoked"))
    assert not d.allowed and "Revoked is always denied" in d.reasons[0]
    d = evaluate([ident], sgx_claims(tcb_status="UpToDate", advisory_ids=("INTEL-SA-00001",)))
    assert not d.allowed and "advisories INTEL-SA-00001 are not accepted" in d.reasons[0]
    sim = Claims(tee="sim", report_data=bytes(64), verified_at=1, debug=False,
                 measurement=bytes(32))
    d = evaluate([ident], sim)
    assert not d.allowed and d.reasons == (
        "identities[0] (sgx identity): tee is sim, the identity requires sgx",)
    assert not evaluate([], sgx_claims()).allowed


def test_one_reason_per_failed_check_per_identity() -> None:
    a = Identity.from_dict({"tee": "sgx", "name": "a", "mrenclave": "00" * 32,
                            "mrsigner": "11" * 32, "isv_prod_id": 2, "min_isv_svn": 5})
    b = Identity.from_dict({"tee": "tdx", "mrtd": "00" * 48})
    d = evaluate([a, b], sgx_claims(debug=True), what="caches")
    assert not d.allowed and d.matched is None
    assert [r.split(": ", 1)[0] for r in d.reasons] == ["caches[0] (sgx identity 'a')"] * 5 + [
        "caches[1] (tdx identity)"]
    text = "\n".join(d.reasons)
    for word in ("debuggable", "mrenclave is " + MRE, "mrsigner", "isv_prod_id is 0",
                 "isv_svn is 0, the identity requires at least 5", "tee is sgx"):
        assert word in text


def test_second_identity_matches() -> None:
    a = Identity.from_dict({"tee": "sgx", "mrenclave": "00" * 32})
    b = Identity.from_dict({"tee": "sgx", "mrsigner": MRS, "isv_prod_id": 0, "min_isv_svn": 0})
    d = evaluate([a, b], sgx_claims())
    assert d.allowed and d.matched is b and d.matched_index == 1 and d.reasons == ()


def tdx_claims(**kw: object) -> Claims:
    base: dict[str, object] = dict(
        tee="tdx", report_data=bytes(64), verified_at=1, debug=False, tcb_status="UpToDate",
        mrtd=bytes.fromhex("91" * 48), rtmr0=bytes(48), rtmr1=bytes(48), rtmr2=bytes(48),
        rtmr3=bytes(48), tee_tcb_svn=bytes([3, 1] + [0] * 14),
    )
    base.update(kw)
    return Claims(**base)  # type: ignore[arg-type]


def test_tdx_checks() -> None:
    pol = ModelPolicy.from_toml(EXAMPLE_TOML)
    assert pol.evaluate_runtime(tdx_claims()).allowed
    d = pol.evaluate_runtime(tdx_claims(rtmr0=b"\x02" * 48))
    assert not d.allowed and "rtmr0" in d.reasons[0]
    ident = Identity.from_dict({"tee": "tdx", "mrtd": "91" * 48, "rtmr1": "00" * 48,
                                "min_tee_tcb_svn": "04" + "00" * 15})
    d = evaluate([ident], tdx_claims(rtmr1=b"\x01" * 48))
    assert len(d.reasons) == 2 and "tee_tcb_svn" in d.reasons[1]


def snp_claims(**kw: object) -> Claims:
    base: dict[str, object] = dict(
        tee="snp", report_data=bytes(64), verified_at=1, debug=False, product="genoa",
        measurement=bytes.fromhex("ab" * 48), vmpl=0, migration_agent=False,
        reported_tcb={"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115},
    )
    base.update(kw)
    return Claims(**base)  # type: ignore[arg-type]


def test_snp_checks() -> None:
    pol = ModelPolicy.from_toml(EXAMPLE_TOML)
    assert pol.evaluate_cache(snp_claims()).matched_index == 1
    d = pol.evaluate_cache(snp_claims(vmpl=1, product="milan", migration_agent=True,
                                      reported_tcb={"bootloader": 2, "snp": 8}))
    snp_reasons = [r for r in d.reasons if r.startswith("caches[1]")]
    assert len(snp_reasons) == 6  # product, vmpl, migration agent, 3 TCB components
    assert any("reported_tcb.bootloader is 2" in r for r in snp_reasons)


def test_raise_if_denied() -> None:
    from sealtorch.errors import PolicyDenied

    ident = Identity.from_dict({"tee": "sgx", "mrenclave": MRE})
    evaluate([ident], sgx_claims()).raise_if_denied()
    with pytest.raises(PolicyDenied) as ei:
        evaluate([ident], sgx_claims(debug=True)).raise_if_denied()
    assert len(ei.value.reasons) == 1 and "debuggable" in ei.value.reasons[0]
