"""Time the host cannot fake (SGX: the enclave's clock comes from the host): a lease never
outlives the key server's signed time, local evidence is verified at that time, and the DCAP
collateral comes signed from the key server, not from a host directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sealtorch.attestation import binding
from sealtorch.attestation.evidence import Evidence
from sealtorch.attestation.verifiers import VerifierSet
from sealtorch.attestation.verifiers.dcap import CollateralSource
from sealtorch.errors import BindingError, CollateralError, ConfigError, LeaseExpiredError
from sealtorch.keycache.config import parse_config
from sealtorch.keycache.leases import LeaseManager
from sealtorch.keycache.localauth import EvidenceAuth
from sealtorch.keycache.service import _SgxVerifiers
from sealtorch.protocol import hpke
from sealtorch.protocol.release_client import KeyServerClient

from .conftest import MODEL, make_policy
from .rogue import RogueKeyServer

SGX_AT = 1752919277  # inside the SGX vector's collateral window (2025-07)


@pytest.fixture
def rogue(sim_dir: Path, platform_fp: str) -> Any:
    from sealtorch.attestation import sim
    from sealtorch.attestation.attesters.sim import SimAttester

    server = RogueKeyServer({MODEL: b"k" * 32}, {}, lease_seconds=60)
    att = SimAttester(sim_dir / sim.KEY_FILE, sim.measure("dkeycache"), role="dkeycache")
    server.policy = make_policy(att.measurement, att.measurement, platform_fp, lease_seconds=60)
    yield server, att
    server.close()


def _manager(server: RogueKeyServer, att: Any, clock: list[float]) -> LeaseManager:
    client = KeyServerClient(server.url, server.ca_cert, server.public_key_b64)

    def evidence(nonce: bytes, public_key: bytes, audience: bytes) -> Any:
        return att.attest(binding.report_data("remote", nonce, hpke.KEM_ID, public_key,
                                              audience))

    return LeaseManager(client, evidence, models=[MODEL], poll_interval=30,
                        clock=lambda: clock[0])


@pytest.mark.parametrize("host_clock", ["frozen", "jumped back"])
def test_a_lease_never_outlives_the_servers_signed_time(rogue: Any, host_clock: str) -> None:
    server, att = rogue
    clock = [1000.0]
    lm = _manager(server, att, clock)
    lm.step()  # attests: a 60 s lease
    lm.acquire(MODEL, 1)
    # the host freezes this process's clock (or turns it back) while the key server's signed
    # time goes on: the lease is over when a signed answer says so, whatever the local clock
    if host_clock == "jumped back":
        clock[0] -= 10_000.0
    server.clock_offset = 59
    lm.poll()
    lm.acquire(MODEL, 1)  # 59 s after issue: still inside the lease
    server.clock_offset = 61
    lm.poll()
    with pytest.raises(LeaseExpiredError):
        lm.acquire(MODEL, 1)
    assert lm.snapshot()["leases"] == [] and lm.snapshot()["denied"][MODEL] == "lease_expired"


def test_local_evidence_is_verified_at_the_servers_time(vectors: Path) -> None:
    d = vectors / "intel-dcap"
    ev = Evidence("sgx", (d / "sgx_quote").read_bytes()).to_dict()
    docs = ((d / "sgx_quote_collateral.json").read_text(),)
    vs = VerifierSet(collateral=CollateralSource(documents=docs), tees=("sgx",))

    def session(now: float | None) -> None:
        EvidenceAuth(vs, now=lambda: now).authenticate(
            ev, nonce=b"n" * 32, public_key=b"k" * 32, audience=b"a" * 32, peer=None)

    # at the key server's time (now) the old collateral a host could replay has expired ...
    with pytest.raises(CollateralError):
        session(1796600000.0)
    # ... at the vector's own time it verifies (and then fails its binding, as it should)
    with pytest.raises(BindingError):
        session(float(SGX_AT))
    from sealtorch.errors import ReleaseDenied

    with pytest.raises(ReleaseDenied) as ei:  # no signed time yet: no local session at all
        session(None)
    assert ei.value.denial == "not_ready"


def test_collateral_comes_signed_from_the_key_server(rogue: Any, vectors: Path) -> None:
    server, att = rogue
    text = (vectors / "intel-dcap" / "sgx_quote_collateral.json").read_text()
    server.collateral = (text,)
    clock = [1000.0]
    lm = _manager(server, att, clock)
    lm.fetch_collateral = True
    verifiers = _SgxVerifiers(lm, None)
    with pytest.raises(CollateralError, match="no DCAP collateral"):
        verifiers()  # nothing fetched yet
    lm.step()
    assert lm.collateral == (text,)
    ev = Evidence("sgx", (vectors / "intel-dcap" / "sgx_quote").read_bytes())
    assert verifiers().verify(ev, now=SGX_AT).mrenclave is not None
    # a bundle not signed by the pinned key is refused
    other = RogueKeyServer({}, {})
    try:
        forged = KeyServerClient(other.url, other.ca_cert, server.public_key_b64)
        from sealtorch.errors import GrantError

        with pytest.raises(GrantError):
            forged.collateral()
    finally:
        other.close()


def test_a_collateral_directory_on_the_host_is_refused() -> None:
    raw = ('[keycache]\nkeyserver_url = "https://127.0.0.1:8443"\n'
           'server_public_key = "' + "A" * 43 + '="\ncollateral = "/var/host/collateral"\n')
    with pytest.raises(ConfigError, match="takes the DCAP collateral its key server signed"):
        parse_config(raw.encode())
