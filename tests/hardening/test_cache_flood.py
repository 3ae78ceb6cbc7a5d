"""A flood of denied runtimes must not blind the cache's status operation.

Any local process can make dkeycache record denials (a runtime with another measurement). The
status answer carries the recent decisions with their reasons; it has to stay within one local
frame, or ``dkeycache status`` (and health checks built on it) stop working exactly when an
attack is under way.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from tests.keycache.conftest import runtime_attester
from tests.keycache.test_cache_inprocess import Env

from sealtorch.attestation import sim
from sealtorch.errors import ReleaseDenied
from sealtorch.format import keyfile
from sealtorch.format.header import read_header
from sealtorch.format.writer import seal

from .conftest import record

warnings.filterwarnings("ignore", category=RuntimeWarning)


def test_status_survives_a_flood_of_denials(tmp_path: Path) -> None:
    sim_dir = tmp_path / "sim"
    sim.init_platform_key(sim_dir)
    fp = sim.fingerprint(sim.load_platform_key(sim_dir / sim.KEY_FILE).public_key())
    mk = keyfile.generate_model_key("tiny-model", 1)
    sd = {"w": torch.zeros(16)}
    path = tmp_path / "tiny.sealed"
    seal(sd, path, mk, chunk_size=4096)
    env = Env(sim_dir, fp, (path, mk, sd))
    try:
        # a realistic allow-list: several runtime builds, so each denial lists several reasons
        pol = dict(env.server.policy)
        extra = [{"tee": "sim", "measurement": sim.measure("runtime", b"build %d" % i).hex(),
                  "platform_key": fp} for i in range(4)]
        pol["runtimes"] = [*extra, *pol["runtimes"]]
        env.server.policy = pol
        env.cache.leases.refresh()
        header = read_header(path)
        denied = 0
        for i in range(130):
            other = runtime_attester(sim_dir, config=b"attacker build %d" % i)
            with env.client(other) as kc, pytest.raises(ReleaseDenied):
                kc.file_key(header)
            denied += 1
        with env.client() as kc:
            health = kc.health()  # must still answer within one frame
            assert health["state"] in ("ok", "degraded") and health["decisions"]["deny"] >= 130
            kc.file_key(header).wipe()  # and honest runtimes are still served
            assert kc.status()["leases"]  # a session's own status answers too
        record("attack", name="cache_status_after_denial_flood", refused=True,
               code="policy_denied", tried=denied)
    finally:
        env.close()
