"""Fixtures for key cache tests: a sim platform, sealed files, policies and a running cache."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from sealtorch.attestation import sim
from sealtorch.attestation.attesters.sim import SimAttester
from sealtorch.format import keyfile
from sealtorch.format.writer import seal

MODEL = "tiny-model"


@pytest.fixture(autouse=True)
def _quiet_sim() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


@pytest.fixture(scope="session")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("kc-sim")
    sim.init_platform_key(d)
    return d


@pytest.fixture(scope="session")
def platform_fp(sim_dir: Path) -> str:
    return sim.fingerprint(sim.load_platform_key(sim_dir / sim.KEY_FILE).public_key())


def runtime_attester(sim_dir: Path, config: bytes = b"") -> SimAttester:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return SimAttester(sim_dir / sim.KEY_FILE, sim.measure("runtime", config), role="runtime")


def make_policy(cache_meas: bytes, runtime_meas: bytes, platform_fp: str, *,
                version: int = 1, lease_seconds: int = 60, max_releases: int = 1000
                ) -> dict[str, Any]:
    from sealtorch.attestation.policy import ModelPolicy

    return ModelPolicy.from_dict({
        "version": version,
        "lease_seconds": lease_seconds,
        "max_releases_per_lease": max_releases,
        "factories": ["sealtorch.models.resnet:resnet50"],
        "caches": [{"tee": "sim", "measurement": cache_meas.hex(), "platform_key": platform_fp}],
        "runtimes": [{"tee": "sim", "measurement": runtime_meas.hex(),
                      "platform_key": platform_fp}],
    }).to_dict()


@pytest.fixture(scope="session")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, keyfile.ModelKey, dict]:
    d = tmp_path_factory.mktemp("sealed")
    mk = keyfile.generate_model_key(MODEL, 1)
    g = torch.Generator().manual_seed(1)
    sd = {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)}
    path = d / "tiny.sealed"
    seal(sd, path, mk, chunk_size=4096)
    return path, mk, sd


def short_socket(name: str = "kc.sock") -> str:
    """Unix socket paths are limited to ~100 characters: a short temp dir (its owner removes
    it with :func:`remove_socket_dir`)."""
    d = tempfile.mkdtemp(prefix="kc-")
    os.chmod(d, 0o700)
    return os.path.join(d, name)


def remove_socket_dir(sock: str) -> None:
    """Remove the directory :func:`short_socket` made."""
    shutil.rmtree(os.path.dirname(sock), ignore_errors=True)
