"""sim TEE: platform key, measurement, attester -> verifier -> policy round trip."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from sealtorch.attestation import binding, sim
from sealtorch.attestation.attesters import detect
from sealtorch.attestation.attesters.sim import SimAttester
from sealtorch.attestation.evidence import Evidence
from sealtorch.attestation.policy import ModelPolicy
from sealtorch.attestation.verifiers import VerifierSet
from sealtorch.errors import (
    AttestationError,
    AttesterUnavailableError,
    BindingError,
    EvidenceFormatError,
    KeyFileError,
    VerificationError,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
NONCE = os.urandom(32)
PK = os.urandom(32)
AUD = os.urandom(32)


@pytest.fixture()
def platform(tmp_path: Path) -> Path:
    return sim.init_platform_key(tmp_path / "sim")


def test_init_writes_0600_key_and_refuses_overwrite(platform: Path) -> None:
    assert stat.S_IMODE(platform.stat().st_mode) == 0o600
    assert (platform.parent / sim.PUBLIC_FILE).is_file()
    with pytest.raises(KeyFileError, match="already exists"):
        sim.init_platform_key(platform.parent)
    first = platform.read_bytes()
    sim.init_platform_key(platform.parent, overwrite=True)
    assert platform.read_bytes() != first


def test_default_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEALTORCH_SIM_DIR", str(tmp_path / "x"))
    assert sim.default_dir() == tmp_path / "x"


def test_group_readable_key_is_refused(platform: Path) -> None:
    os.chmod(platform, 0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        sim.load_platform_key(platform)


def test_attester_warns_loudly(platform: Path, caplog: pytest.LogCaptureFixture) -> None:
    SimAttester(platform, sim.measure("dkeycache"))
    # one WARNING log record (printed even where logging is not configured), not also a
    # Python warning: a CLI would otherwise print the same message twice
    assert [r.levelname for r in caplog.records if "NOT protected" in r.getMessage()] == [
        "WARNING"]


def test_round_trip_attester_verifier_policy(platform: Path) -> None:
    meas = sim.measure("dkeycache", b"[keycache]\n")
    att = SimAttester(platform, meas, role="dkeycache")
    rd = binding.report_data("remote", NONCE, 0x20, PK, AUD)
    ev = Evidence.from_json(att.attest(rd).to_json())
    pub = platform.parent / sim.PUBLIC_FILE
    vs = VerifierSet(sim_platform_keys=[pub])
    claims = vs.verify(ev)
    assert claims.tee == "sim" and claims.measurement == meas and claims.report_data == rd
    assert claims.role == "dkeycache" and claims.tcb_status is None and not claims.debug
    key = sim.load_platform_public_key(pub)
    assert claims.platform_key == sim.fingerprint(key)
    binding.check(claims, role="remote", nonce=NONCE, kem_id=0x20, public_key=PK, audience=AUD)
    with pytest.raises(BindingError):
        binding.check(claims, role="local", nonce=NONCE, kem_id=0x20, public_key=PK,
                      audience=AUD)
    pol = ModelPolicy.from_dict({"version": 1, "caches": [
        {"tee": "sim", "measurement": meas.hex(), "platform_key": claims.platform_key}]})
    d = pol.evaluate_cache(claims)
    assert d.allowed and d.matched == pol.caches[0] and d.matched_index == 0
    # the same claims are not a runtime: no runtime identity named
    assert not pol.evaluate_runtime(claims).allowed


def test_changed_code_changes_measurement_and_is_denied(tmp_path: Path, platform: Path) -> None:
    root = tmp_path / "pkg"
    shutil.copytree(sim.installed_package_root(), root,
                    ignore=shutil.ignore_patterns("__pycache__"))
    m1 = sim.measure("dkeycache", b"cfg", package_root=root)
    assert m1 == sim.measure("dkeycache", b"cfg", package_root=root)
    assert m1 == sim.measure("dkeycache", b"cfg")  # the copy measures like the install
    (root / "__pycache__").mkdir(exist_ok=True)
    (root / "__pycache__" / "x.pyc").write_bytes(b"junk")
    assert sim.measure("dkeycache", b"cfg", package_root=root) == m1
    assert sim.measure("dkeycache", b"cfg2", package_root=root) != m1
    assert sim.measure("serve", b"cfg", package_root=root) != m1
    target = root / "attestation" / "binding.py"
    target.write_text(target.read_text() + "\n# changed\n")
    m2 = sim.measure("dkeycache", b"cfg", package_root=root)
    assert m2 != m1
    (root / "attestation" / "binding.py").rename(root / "attestation" / "binding2.py")
    assert sim.measure("dkeycache", b"cfg", package_root=root) not in (m1, m2)

    fp = sim.fingerprint(sim.load_platform_key(platform).public_key())
    pol = ModelPolicy.from_dict({"version": 1, "caches": [
        {"tee": "sim", "measurement": m1.hex(), "platform_key": fp}]})
    vs = VerifierSet(sim_platform_keys=[platform])
    ev = SimAttester(platform, m2).attest(bytes(64))
    d = pol.evaluate_cache(vs.verify(ev))
    assert not d.allowed and d.matched is None
    assert len(d.reasons) == 1 and "measurement is " + m2.hex() in d.reasons[0]


def test_unregistered_platform_key_is_refused(tmp_path: Path, platform: Path) -> None:
    other = sim.init_platform_key(tmp_path / "other")
    ev = SimAttester(other, sim.measure("serve")).attest(bytes(64))
    with pytest.raises(VerificationError, match="not registered"):
        VerifierSet(sim_platform_keys=[platform]).verify(ev)
    with pytest.raises(VerificationError, match="no sim platform keys"):
        VerifierSet().verify(ev)
    with pytest.raises(VerificationError, match="not accepted"):
        VerifierSet(sim_platform_keys=[other], tees=["sgx"]).verify(ev)


def test_forged_or_malformed_sim_evidence(platform: Path) -> None:
    vs = VerifierSet(sim_platform_keys=[sim.load_platform_key(platform).public_key()])
    ev = SimAttester(platform, sim.measure("serve")).attest(bytes(64))
    q = ev.quote
    for pos in range(0, len(q), 7):
        bad = bytearray(q)
        bad[pos] ^= 0x01
        with pytest.raises((VerificationError, EvidenceFormatError)):
            vs.verify(Evidence("sim", bytes(bad)))
    with pytest.raises(EvidenceFormatError):
        vs.verify(Evidence("sim", q[:64]))
    # a re-serialized (non-canonical) body is refused even before the signature
    body = q[64:].replace(b'{"format"', b'{ "format"')
    with pytest.raises(EvidenceFormatError, match="canonical"):
        vs.verify(Evidence("sim", q[:64] + body))


def test_bad_measurement_inputs(platform: Path) -> None:
    with pytest.raises(AttestationError, match="role"):
        sim.measure("Bad Role")
    with pytest.raises(AttestationError, match="32 bytes"):
        SimAttester(platform, b"short")
    with pytest.raises(AttestationError, match="64 bytes"):
        SimAttester(platform, sim.measure("serve")).attest(b"x")


def test_detect_never_picks_sim(tmp_path: Path) -> None:
    with pytest.raises(AttesterUnavailableError, match="no TEE"):
        detect(gramine_dir=tmp_path / "none", tsm_dir=tmp_path / "none2")


def test_a_sim_identity_must_name_its_platform_key() -> None:
    from sealtorch.errors import PolicyError

    with pytest.raises(PolicyError, match="platform_key"):
        ModelPolicy.from_dict({"version": 1, "caches": [
            {"tee": "sim", "measurement": "00" * 32}]})
