"""Both in-TEE roles bind their config through CoCo initdata when it names the document:
dkeycache (``make_attester``) and the runtime (``loading.prepare``, shared by ``sealtorch
serve`` and the KServe predictor), on a SNP VM played by a temporary configfs-tsm tree."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tests.attestation.test_attesters import SNP_HOST_DATA, FakeTsm

from sealtorch.attestation import attesters
from sealtorch.attestation.initdata import encode_annotation, parse_initdata, render_initdata
from sealtorch.errors import ConfigError
from sealtorch.format.keyfile import generate_model_key
from sealtorch.format.signing import raw_public
from sealtorch.format.writer import seal
from sealtorch.keycache.config import parse_config
from sealtorch.keycache.service import make_attester
from sealtorch.runtime import loading
from sealtorch.runtime.config import parse_runtime_config

FACTORY = "sealtorch.models.resnet:resnet50"


@dataclass
class Pod:
    config: bytes  # the measured config (both tables)
    cfg: Path  # where the roles read it
    idfile: Path  # the initdata file (annotation form), the config's `initdata`
    sealed: Path
    host_data: list[bytes] = field(default_factory=list)  # the VM's register (settable)


@pytest.fixture
def pod(tmp_path: Path, vectors: Path, monkeypatch: pytest.MonkeyPatch) -> Pod:
    """A pod: its config (both tables), its initdata file (annotation form), and a SNP VM
    whose HOST_DATA the test sets."""
    key = base64.b64encode(raw_public(Ed25519PrivateKey.generate().public_key())).decode()
    idfile = tmp_path / "cc_init_data"
    config = (f'[keycache]\nkeyserver_url = "https://keys.example:8443"\n'
              f'server_public_key = "{key}"\ninitdata = "{idfile}"\n\n'
              f'[runtime]\nserver_public_key = "{key}"\ninitdata = "{idfile}"\n').encode()
    cfg = tmp_path / "sealtorch.toml"
    cfg.write_bytes(config)
    doc = parse_initdata(render_initdata({"sealtorch.toml": config.decode()}))
    idfile.write_text(encode_annotation(doc.raw) + "\n")
    template = (vectors / "amd-snp" / "milan-vcek" / "report.bin").read_bytes()
    sealed = tmp_path / "m.sealed"
    seal({"w": torch.zeros(4)}, sealed, generate_model_key("acme/m"))
    p = Pod(config, cfg, idfile, sealed, [doc.register("snp")])

    def vm(_dir: object, tee: str) -> FakeTsm:
        report = bytearray(template)
        report[SNP_HOST_DATA] = p.host_data[0]
        d = tmp_path / f"tsm{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        return FakeTsm(d, "sev_guest", bytes(report))

    monkeypatch.setattr(attesters, "TsmAttester", vm)
    return p


def test_dkeycache_binds_through_initdata(pod: Pod, caplog: pytest.LogCaptureFixture) -> None:
    config = parse_config(pod.config)
    assert config.initdata == str(pod.idfile)
    with caplog.at_level("INFO", logger="sealtorch.attestation"):
        assert make_attester("snp", config).tee == "snp"
    assert "binds the pod's initdata document" in caplog.text
    pod.host_data[0] = bytes(32)
    with pytest.raises(ConfigError, match="is zero"):
        make_attester("snp", config)


def test_the_runtime_binds_through_initdata(pod: Pod) -> None:
    src = loading.prepare(pod.sealed, FACTORY, pod.cfg, "snp")
    assert src.config.initdata == str(pod.idfile) and src.attester.tee == "snp"
    # the file the runtime runs with differs from the document's entry (a comment added)
    pod.cfg.write_bytes(pod.config + b"# edited\n")
    with pytest.raises(ConfigError, match="not byte-identical"):
        loading.prepare(pod.sealed, FACTORY, pod.cfg, "snp")
    # the document was swapped for another pod's: the register no longer matches
    pod.cfg.write_bytes(pod.config)
    other = render_initdata({"sealtorch.toml": pod.config.decode(), "aa.toml": "x\n"})
    pod.idfile.write_bytes(other)
    with pytest.raises(ConfigError, match="launched with another initdata"):
        loading.prepare(pod.sealed, FACTORY, pod.cfg, "snp")


@pytest.mark.parametrize("value", ['"relative/path"', "3", '""'])
def test_a_bad_initdata_field_is_a_config_error(value: str) -> None:
    key = base64.b64encode(raw_public(Ed25519PrivateKey.generate().public_key())).decode()
    with pytest.raises(ConfigError, match="initdata must be the absolute path"):
        parse_runtime_config(f'[runtime]\nserver_public_key = "{key}"\ninitdata = {value}\n'
                             .encode())
    with pytest.raises(ConfigError, match="initdata must be the absolute path"):
        parse_config(f'[keycache]\nkeyserver_url = "https://k.example"\nserver_public_key = '
                     f'"{key}"\ninitdata = {value}\n'.encode())
