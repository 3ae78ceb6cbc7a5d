"""Fixtures for the attestation tests: the real vectors, loaded once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

SGX_AT = 1752919277
TDX_AT = 1752919234
TDX_OUTDATED_AT = 1774003274
SNP_AT = 1752919277


@dataclass(frozen=True)
class Vec:
    quote: bytes
    extra: bytes  # collateral JSON path bytes (DCAP) or VCEK DER (SNP)
    path: Path


@pytest.fixture(scope="session")
def dcap_dir(vectors: Path) -> Path:
    return vectors / "intel-dcap"


@pytest.fixture(scope="session")
def snp_dir(vectors: Path) -> Path:
    return vectors / "amd-snp"
