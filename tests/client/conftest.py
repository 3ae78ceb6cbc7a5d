"""Shared pieces of the client tests: a sim platform, a served identity, client policies."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sealtorch.attestation import sim
from sealtorch.attestation.attesters.sim import SimAttester
from sealtorch.attestation.binding import ServedIdentity
from sealtorch.client.policy import FORMAT, ClientPolicy

IDENTITY = ServedIdentity(
    name="tiny", model_id="tiny-model", key_version=1, header_digest=bytes(range(32)),
    policy_version=2, factory="torch.nn:PReLU", tenant="acme", server_key_id=b"\x07" * 32)


@dataclass
class SimPlatform:
    dir: Path
    key: Path
    public: Path
    measurement: bytes

    @property
    def fingerprint(self) -> str:
        return sim.fingerprint(sim.load_platform_public_key(self.public))

    def attester(self, measurement: bytes | None = None) -> SimAttester:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return SimAttester(self.key, measurement or self.measurement, role="serve")


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory) -> SimPlatform:
    d = tmp_path_factory.mktemp("sim-platform")
    key = sim.init_platform_key(d)
    return SimPlatform(d, key, d / sim.PUBLIC_FILE, b"\x42" * 32)


def policy_dict(platform: SimPlatform, *, measurement: bytes | None = None,
                identity: ServedIdentity = IDENTITY, **model: Any) -> dict[str, Any]:
    """A client policy admitting ``platform``'s sim runtime and ``identity``'s model/owner."""
    return {
        "format": FORMAT,
        "runtimes": [{"tee": "sim", "name": "sim-serve", "platform_key": platform.fingerprint,
                      "measurement": (measurement or platform.measurement).hex()}],
        "models": [{"model_id": identity.model_id, **model}],
        "owners": [{"server_key_id": identity.server_key_id.hex()}],
        "verifier": {"sim_platform_keys": [str(platform.public)]},
    }


def make_policy(platform: SimPlatform, **kw: Any) -> ClientPolicy:
    return ClientPolicy.from_dict(policy_dict(platform, **kw))


@pytest.fixture(scope="session")
def dcap_dir(vectors: Path) -> Path:
    return vectors / "intel-dcap"


@pytest.fixture(scope="session")
def snp_dir(vectors: Path) -> Path:
    return vectors / "amd-snp"
