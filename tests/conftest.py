"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VECTORS = SHARED / "attestation-vectors"


@pytest.fixture(scope="session")
def vectors() -> Path:
    """The real attestation vectors in ../shared (required; CI lays them beside the clone)."""
    if not VECTORS.is_dir():
        pytest.fail(f"attestation vectors not found at {VECTORS}")
    return VECTORS


def require_service(what: str) -> None:
    """Skip locally when a service is missing, but fail in CI (SEALTORCH_REQUIRE_SERVICES=1)."""
    if os.environ.get("SEALTORCH_REQUIRE_SERVICES") == "1" or os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI but not available")
    pytest.skip(f"{what} not available")
