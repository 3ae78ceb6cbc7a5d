"""``attesters.select``: the one map from ``--attester`` names to attesters (cache, serve)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sealtorch.attestation import attesters, sim
from sealtorch.errors import AttesterUnavailableError, ConfigError
from sealtorch.keycache.config import parse_config
from sealtorch.keycache.service import make_attester


def test_sim_measures_role_and_config(sim_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEALTORCH_SIM_DIR", str(sim_dir))
    att = attesters.select("sim", role="serve", config_bytes=b"[runtime]\n")
    assert att.tee == "sim"
    assert att.measurement == sim.measure("serve", b"[runtime]\n")  # type: ignore[attr-defined]
    assert att.role == "serve"  # type: ignore[attr-defined]


def test_cache_uses_select_with_its_config(sim_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEALTORCH_SIM_DIR", str(sim_dir))
    raw = (b'[keycache]\nkeyserver_url = "https://127.0.0.1:1"\n'
           b'server_public_key = "3NhxErI841MACe0L8k/hGms7lmx8MyYzCOWiKLeNAUE="\n')
    att = make_attester("sim", parse_config(raw))
    assert att.measurement == sim.measure("dkeycache", raw)
    assert att.role == "dkeycache"


def test_unknown_kind_refused() -> None:
    with pytest.raises(ConfigError, match="--attester must be one of"):
        attesters.select("nitro", role="serve")


@pytest.mark.parametrize("kind", ["auto", "sgx", "tdx", "snp"])
def test_hardware_kinds_need_their_interface(kind: str) -> None:
    """No Gramine/configfs-tsm here: each hardware kind refuses; auto never picks sim."""
    if Path("/dev/attestation").exists() or Path("/sys/kernel/config/tsm/report").exists():
        pytest.skip("this host offers a real TEE interface")
    with pytest.raises(AttesterUnavailableError):
        attesters.select(kind, role="dkeycache")
