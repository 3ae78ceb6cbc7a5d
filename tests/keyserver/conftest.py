"""Fixtures: a fresh SoftHSM2 token, a sim key cache (PostgreSQL: tests/conftest.py)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import pg_admin_conn as _pg_admin_conn  # noqa: F401 (used by tests)
from tests.conftest import pg_url, require_service  # noqa: F401 (pg_url: a fixture)

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


@pytest.fixture
def softhsm_env(tmp_path: Path) -> dict[str, str]:
    """A fresh SoftHSM2 token 'sealtorch' in a temp SOFTHSM2_CONF; returns the env to pass."""
    if not (shutil.which("softhsm2-util") and Path(SOFTHSM_MODULE).exists()):
        require_service("SoftHSM2")
    d = tmp_path / "softhsm"
    (d / "tokens").mkdir(parents=True)
    conf = d / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {d / 'tokens'}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    pin = secrets.token_hex(8)
    env = {"SOFTHSM2_CONF": str(conf), "SEALTORCH_PKCS11_PIN": pin}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "sealtorch",
                    "--pin", pin, "--so-pin", secrets.token_hex(8)],
                   check=True, capture_output=True, env={**os.environ, **env})
    return env


@pytest.fixture(params=["sqlite-file", "postgresql-file", "sqlite-pkcs11", "postgresql-pkcs11"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Keyword arguments for ``start_keyserver`` for each database x KEK combination."""
    db, kek = request.param.split("-")
    kw: dict[str, Any] = {"kek": kek}
    if db == "postgresql":
        kw["db_url"] = request.getfixturevalue("pg_url")
    if kek == "pkcs11":
        kw["pkcs11_env"] = request.getfixturevalue("softhsm_env")
    return kw


@dataclass
class SimCache:
    """A sim-TEE key cache: a platform key, a measurement and a fresh HPKE key per request."""

    platform_key: Path
    measurement: bytes

    def attester(self) -> Any:
        from sealtorch.attestation.attesters.sim import SimAttester

        return SimAttester(self.platform_key, self.measurement, role="dkeycache")

    def request(self, client: Any, *, nonce: bytes | None = None,
                audience: bytes | None = None, bind_key: bytes | None = None
                ) -> tuple[Any, Any, bytes, bytes]:
        """(evidence, private key, public key, nonce) for one release request."""
        from sealtorch.attestation import binding
        from sealtorch.protocol import hpke

        n = nonce if nonce is not None else client.challenge()
        sk, pk = hpke.generate_keypair()
        rd = binding.report_data("remote", n, hpke.KEM_ID, bind_key or pk,
                                 audience or client.audience)
        return self.attester().attest(rd), sk, pk, n
