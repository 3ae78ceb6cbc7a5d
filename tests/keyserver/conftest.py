"""Fixtures: a throwaway PostgreSQL database, a fresh SoftHSM2 token, a sim key cache."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import require_service

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def _pg_admin_conn() -> Any:
    import psycopg

    return psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres",
                           autocommit=True, connect_timeout=3)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh database ``sealtorch_<random>`` on 127.0.0.1:5432, dropped afterwards."""
    try:
        conn = _pg_admin_conn()
    except Exception:
        require_service("PostgreSQL on 127.0.0.1:5432")
        raise
    name = "sealtorch_" + secrets.token_hex(6)
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with _pg_admin_conn() as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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
