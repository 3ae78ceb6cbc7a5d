"""Gramine and configfs-tsm attesters against temporary directory trees that behave like them."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from sealtorch.attestation.attesters import GramineAttester, TsmAttester, detect
from sealtorch.attestation.evidence import Evidence
from sealtorch.attestation.verifiers import VerifierSet
from sealtorch.errors import AttestationError, AttesterUnavailableError

from .conftest import SGX_AT

HELLO = b"Hello, world!".ljust(64, b"\0")


def gramine_tree(tmp_path: Path, quote: bytes, kind: str = "dcap") -> Path:
    root = tmp_path / "attestation"
    root.mkdir()
    (root / "attestation_type").write_text(kind + "\n")
    (root / "user_report_data").write_bytes(bytes(64))
    (root / "quote").write_bytes(quote)
    return root


def test_gramine_produces_verifiable_quote(tmp_path: Path, dcap_dir: Path) -> None:
    quote = (dcap_dir / "sgx_quote").read_bytes()
    root = gramine_tree(tmp_path, quote)
    att = detect(gramine_dir=root, tsm_dir=tmp_path / "no-tsm")
    assert isinstance(att, GramineAttester) and att.tee == "sgx"
    ev = att.attest(HELLO)
    assert (root / "user_report_data").read_bytes() == HELLO
    assert ev == Evidence("sgx", quote)
    vs = VerifierSet(collateral=dcap_dir / "sgx_quote_collateral.json")
    assert vs.verify(ev, now=SGX_AT).report_data == HELLO


def test_gramine_rechecks_report_data(tmp_path: Path, dcap_dir: Path) -> None:
    att = GramineAttester(gramine_tree(tmp_path, (dcap_dir / "sgx_quote").read_bytes()))
    with pytest.raises(AttestationError, match="does not carry our report data"):
        att.attest(b"\x01" * 64)
    with pytest.raises(AttestationError, match="64 bytes"):
        att.attest(b"short")


def test_gramine_attestation_type_none_is_an_error(tmp_path: Path) -> None:
    root = gramine_tree(tmp_path, b"", kind="none")
    with pytest.raises(AttesterUnavailableError, match="attestation_type is 'none'"):
        GramineAttester(root)
    with pytest.raises(AttesterUnavailableError, match="'none'"):
        detect(gramine_dir=root, tsm_dir=tmp_path / "x")
    (root / "attestation_type").write_text("epid")
    with pytest.raises(AttesterUnavailableError, match="only DCAP"):
        GramineAttester(root)


def test_gramine_short_quote(tmp_path: Path) -> None:
    att = GramineAttester(gramine_tree(tmp_path, b"\x03\x00" * 10))
    with pytest.raises(AttestationError, match="impossible length"):
        att.attest(HELLO)


class FakeTsm(TsmAttester):
    """Plays the kernel's part on a temp tree: creating an entry populates its attributes and
    a write to inblob bumps ``generation`` and produces ``outblob`` carrying the data."""

    def __init__(self, root: Path, provider: str, template: bytes, *, aux: bytes | None = None,
                 extra_writes: int = 0, rd_at: slice = slice(0x50, 0x90)) -> None:
        self.provider, self.template, self.aux = provider, template, aux
        self.extra_writes, self.rd_at = extra_writes, rd_at
        self.created: list[Path] = []
        super().__init__(root)

    def _create(self, entry: Path) -> None:
        super()._create(entry)
        self.created.append(entry)
        (entry / "generation").write_text("0\n")
        (entry / "provider").write_text(self.provider + "\n")
        (entry / "outblob").write_bytes(b"")
        if self.aux is not None:
            (entry / "auxblob").write_bytes(self.aux)

    def _write_inblob(self, entry: Path, data: bytes) -> None:
        super()._write_inblob(entry, data)
        gen = int((entry / "generation").read_text()) + 1 + self.extra_writes
        (entry / "generation").write_text(f"{gen}\n")
        out = bytearray(self.template)
        out[self.rd_at] = data
        (entry / "outblob").write_bytes(bytes(out))

    def _remove(self, entry: Path) -> None:
        shutil.rmtree(entry)


def test_tsm_snp_with_auxblob(tmp_path: Path, snp_dir: Path) -> None:
    rep = (snp_dir / "milan-vcek/report.bin").read_bytes()
    att = FakeTsm(tmp_path, "sev_guest", rep, aux=b"certtable")
    assert att.tee == "snp"
    rd = bytes([1, 2, 3, 4, 5]) + bytes(59)
    ev = att.attest(rd)
    assert ev.tee == "snp" and ev.quote == rep and ev.certs == b"certtable"
    assert list(tmp_path.iterdir()) == []  # every entry removed


def test_tsm_tdx(tmp_path: Path, dcap_dir: Path) -> None:
    q = (dcap_dir / "tdx_quote").read_bytes()
    att = FakeTsm(tmp_path, "tdx_guest", q, rd_at=slice(568, 632))
    rd = q[568:632]
    ev = att.attest(rd)
    assert ev == Evidence("tdx", q)


def test_tsm_generation_change_mid_request_is_rejected(tmp_path: Path, snp_dir: Path) -> None:
    rep = (snp_dir / "milan-vcek/report.bin").read_bytes()
    att = FakeTsm(tmp_path, "sev_guest", rep, extra_writes=1)
    with pytest.raises(AttestationError, match="generation changed"):
        att.attest(bytes(64))
    assert list(tmp_path.iterdir()) == []


def test_tsm_report_data_rechecked(tmp_path: Path, snp_dir: Path) -> None:
    rep = (snp_dir / "milan-vcek/report.bin").read_bytes()
    att = FakeTsm(tmp_path, "sev_guest", rep, rd_at=slice(0x90, 0xD0))  # kernel "misplaces" it
    with pytest.raises(AttestationError, match="does not carry our report data"):
        att.attest(b"\x07" * 64)


def test_tsm_unknown_provider_and_missing(tmp_path: Path) -> None:
    with pytest.raises(AttesterUnavailableError, match="provider"):
        FakeTsm(tmp_path, "xen_guest", b"")
    with pytest.raises(AttesterUnavailableError, match="configfs-tsm not available"):
        TsmAttester(tmp_path / "missing")


def test_detect_prefers_hardware_and_explains(tmp_path: Path) -> None:
    tsm_root = tmp_path / "tsm"
    tsm_root.mkdir()
    # a bare directory is not a working configfs-tsm: detect reports that clearly
    with pytest.raises(AttesterUnavailableError):
        detect(gramine_dir=tmp_path / "none", tsm_dir=tsm_root)
    with pytest.raises(AttesterUnavailableError, match="pass --attester sim"):
        detect(gramine_dir=tmp_path / "none", tsm_dir=tmp_path / "none2")


TDX_MRCONFIGID = slice(232, 280)  # 48-byte quote header, then the TD report's MRCONFIGID
SNP_HOST_DATA = slice(0xC0, 0xE0)


def vm_factory(tmp_path: Path, dcap_dir: Path, snp_dir: Path,
               tee: str) -> Callable[[bytes], FakeTsm]:
    """A maker of fake TDX/SNP VMs (configfs-tsm trees) whose MRCONFIGID / HOST_DATA holds the
    value it is given; evidence from the real vectors with that field replaced."""
    if tee == "tdx":
        template, field, rd_at, provider = ((dcap_dir / "tdx_quote").read_bytes(),
                                            TDX_MRCONFIGID, slice(568, 632), "tdx_guest")
    else:
        template, field, rd_at, provider = ((snp_dir / "milan-vcek/report.bin").read_bytes(),
                                            SNP_HOST_DATA, slice(0x50, 0x90), "sev_guest")

    def vm(value: bytes) -> FakeTsm:
        t = bytearray(template)
        t[field] = value
        d = tmp_path / f"tsm-{value[:4].hex()}-{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        return FakeTsm(d, provider, bytes(t), rd_at=rd_at)

    return vm


@pytest.mark.parametrize("tee", ["tdx", "snp"])
def test_a_vm_checks_its_own_configuration_binding(tmp_path: Path, dcap_dir: Path,
                                                  snp_dir: Path, tee: str) -> None:
    """MRCONFIGID (TDX) / HOST_DATA (SNP) must be the digest of the measured config the role
    was given; zero means the platform binds none (allowed, logged)."""
    from sealtorch.attestation.selfcheck import check_own_config, config_digest
    from sealtorch.errors import ConfigError

    config = b"[keycache]\nkeyserver_url = 'https://owner.example:8443'\n"
    vm = vm_factory(tmp_path, dcap_dir, snp_dir, tee)
    field = TDX_MRCONFIGID if tee == "tdx" else SNP_HOST_DATA
    width = field.stop - field.start
    assert not check_own_config(vm(bytes(width)), config, role="dkeycache").bound
    assert check_own_config(vm(config_digest(tee, config)), config, role="dkeycache").bound
    with pytest.raises(ConfigError, match="launched for another configuration"):
        check_own_config(vm(config_digest(tee, b"another config")), config, role="serve")
