"""Loopback TCP listener (same attested local protocol) and the local decision record."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import sealtorch
from sealtorch.errors import ConfigError, ReleaseDenied
from sealtorch.format.header import read_header
from sealtorch.keycache.address import TcpAddress, parse_endpoint, parse_tcp
from sealtorch.keycache.client import KeyCacheClient
from sealtorch.keycache.config import parse_config
from sealtorch.keycache.decisions import DECISION_LOGGER
from sealtorch.keycache.localauth import PeerCredAuth

from .conftest import MODEL, runtime_attester
from .test_cache_inprocess import Env
from .test_e2e import World, _status

BASE = (
    '[keycache]\nkeyserver_url = "https://127.0.0.1:1"\n'
    'server_public_key = "3NhxErI841MACe0L8k/hGms7lmx8MyYzCOWiKLeNAUE="\n'
)


# --- configuration -----------------------------------------------------------------------
@pytest.mark.parametrize("value", ["127.0.0.1:7001", "[::1]:7001", "127.0.0.2:1", "127.0.0.1:0"])
def test_loopback_tcp_listen_accepted(value: str) -> None:
    cfg = parse_config((BASE + f'tcp_listen = "{value}"\n').encode())
    assert isinstance(cfg.tcp_listen, TcpAddress)
    assert cfg.tcp_listen.port == int(value.rsplit(":", 1)[1])


def test_tcp_listen_off_by_default() -> None:
    assert parse_config(BASE.encode()).tcp_listen is None
    assert parse_config((BASE + 'tcp_listen = ""\n').encode()).tcp_listen is None


@pytest.mark.parametrize("value", [
    "0.0.0.0:7001", "10.1.2.3:7001", "[::]:7001", "192.168.0.1:7001", "[2001:db8::1]:7001",
])
def test_non_loopback_tcp_listen_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="loopback") as ei:
        parse_config((BASE + f'tcp_listen = "{value}"\n').encode())
    assert value not in str(ei.value) and "7001" not in str(ei.value)  # no echo of the input


@pytest.mark.parametrize("value", [
    "localhost:7001", "127.0.0.1", "127.0.0.1:70000", "127.0.0.1:-1", "::1:7001", "7001",
    "127.0.0.1:7001 ", "tcp://127.0.0.1:7001",
])
def test_malformed_tcp_listen_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="tcp_listen must"):
        parse_config((BASE + f'tcp_listen = "{value}"\n').encode())


def test_tcp_listen_wrong_type_refused() -> None:
    with pytest.raises(ConfigError, match="tcp_listen must"):
        parse_config((BASE + "tcp_listen = 7001\n").encode())


def test_peercred_cannot_be_combined_with_tcp() -> None:
    with pytest.raises(ConfigError, match="peercred"):
        parse_config((BASE + 'local_auth = "peercred"\ntcp_listen = "127.0.0.1:7001"\n').encode())


def test_peercred_authenticator_refused_with_tcp_at_start(sim_dir, platform_fp, sealed) -> None:
    """``local_auth = "auto"`` resolving to peercred (a TDX/SNP cache) cannot open TCP."""
    import os

    with pytest.raises(ConfigError, match="evidence-based"):
        Env(sim_dir, platform_fp, sealed, local_auth=PeerCredAuth("tdx", {os.getuid()}),
            tcp_listen='"127.0.0.1:0"')


def test_client_address_forms() -> None:
    assert parse_endpoint("/run/x.sock") == "/run/x.sock"
    assert parse_endpoint("tcp://127.0.0.1:7001") == TcpAddress("127.0.0.1", 7001)
    assert str(parse_tcp("[::1]:7", what="x")) == "tcp://[::1]:7"
    for bad in ("tcp://10.0.0.1:7001", "tcp://localhost:7001", "tcp://127.0.0.1:0"):
        with pytest.raises(ConfigError):
            KeyCacheClient(bad, server_public_key="3NhxErI841MACe0L8k/hGms7lmx8MyYzCOWiKLeNAUE=")


# --- in-process cache with a TCP listener ---------------------------------------------------
@pytest.fixture
def tcp_env(sim_dir, platform_fp, sealed):
    e = Env(sim_dir, platform_fp, sealed, tcp_listen='"127.0.0.1:0"')
    yield e
    e.close()


def _tcp_client(env: Env, attester: Any) -> KeyCacheClient:
    return KeyCacheClient(str(env.cache.server.tcp_address),
                          server_public_key=env.server.public_key_b64, attester=attester)


def test_tcp_load_deny_and_decisions(tcp_env: Env, caplog: pytest.LogCaptureFixture) -> None:
    env = tcp_env
    addr = env.cache.server.tcp_address
    assert addr is not None and addr.host == "127.0.0.1" and addr.port > 0
    caplog.set_level(logging.INFO, logger=DECISION_LOGGER)
    with _tcp_client(env, env.rt_att) as kc:
        out = sealtorch.load(env.path, key_provider=kc)
        assert all(out[k].equal(env.sd[k]) for k in out)
        assert kc.auth_mode == "evidence"
    other = runtime_attester(env.sim_dir, config=b"other build")
    with _tcp_client(env, other) as kc, pytest.raises(ReleaseDenied) as ei:
        kc.file_key(read_header(env.path))
    assert ei.value.denial == "policy_denied"
    # the Unix socket keeps working next to TCP
    with env.client() as kc:
        assert len(kc.file_key(read_header(env.path))) == 32
        assert kc.health()["decisions"] == {"allow": 5, "deny": 1}

    recent = env.cache.server.decisions.recent()
    assert [(d["op"], d["decision"], d["peer"]["transport"]) for d in recent] == [
        ("session", "allow", "tcp"), ("file_key", "allow", "tcp"),
        ("session", "allow", "tcp"), ("file_key", "deny", "tcp"),
        ("session", "allow", "unix"), ("file_key", "allow", "unix"),
    ]
    good, deny = recent[1], recent[3]
    assert good["model_id"] == MODEL and good["key_version"] == 1 and good["code"] is None
    assert good["runtime"]["measurement"] == env.rt_att.measurement.hex()
    assert good["runtime"]["tee"] == "sim" and good["runtime"]["role"] == "runtime"
    assert deny["code"] == "policy_denied" and deny["model_id"] == MODEL
    assert deny["runtime"]["measurement"] == other.measurement.hex()
    assert deny["reasons"] and all(r.startswith("runtimes[0]") for r in deny["reasons"])
    assert any("measurement" in r for r in deny["reasons"])

    # one bare JSON object per decision in the log, with no key material
    lines = [r.getMessage() for r in caplog.records if r.name == DECISION_LOGGER]
    logged = [json.loads(line) for line in lines]
    assert [d["decision"] for d in logged] == ["allow", "allow", "allow", "deny", "allow", "allow"]
    text = "\n".join(lines)
    key = bytes(env.mk.key)
    import base64

    assert key.hex() not in text and base64.b64encode(key).decode() not in text
    # denials by code and decisions by outcome in the metrics
    metrics = env.cache.server.metrics.render().decode()
    assert 'dkeycache_denials_total{code="policy_denied"} 1.0' in metrics
    assert 'dkeycache_local_decisions_total{decision="deny",op="file_key"} 1.0' in metrics
    assert 'dkeycache_local_decisions_total{decision="allow",op="file_key"} 2.0' in metrics


def test_session_denial_recorded_without_runtime(tcp_env: Env, tmp_path: Path) -> None:
    from sealtorch.attestation import sim
    from sealtorch.attestation.attesters.sim import SimAttester

    sim.init_platform_key(tmp_path)
    rogue = SimAttester(tmp_path / sim.KEY_FILE, tcp_env.rt_att.measurement, role="runtime")
    with _tcp_client(tcp_env, rogue) as kc, pytest.raises(ReleaseDenied) as ei:
        kc.connect()
    assert ei.value.denial == "evidence_invalid"
    d = tcp_env.cache.server.decisions.recent()[-1]
    assert (d["op"], d["decision"], d["code"]) == ("session", "deny", "evidence_invalid")
    assert d["runtime"] is None and d["model_id"] is None and d["reasons"]


def test_decision_ring_is_bounded() -> None:
    from sealtorch.keycache.decisions import DecisionContext, DecisionLog

    dl = DecisionLog(size=3)
    for i in range(5):
        dl.record(DecisionContext("file_key", {"transport": "tcp"}, key_version=i),
                  allowed=i % 2 == 0, code=None if i % 2 == 0 else "policy_denied")
    assert [d["key_version"] for d in dl.recent()] == [2, 3, 4]
    assert dl.summary()["counts"] == {"allow": 3, "deny": 2}


# --- real processes ------------------------------------------------------------------------
def test_real_processes_over_tcp(tmp_path: Path, sealed: Any) -> None:
    world = World(tmp_path, sealed, extra_cfg='tcp_listen = "127.0.0.1:0"\n')
    try:
        cache = world.start_cache()
        tcp = world.ready["tcp"]
        assert tcp.startswith("tcp://127.0.0.1:") and not tcp.endswith(":0")
        good = world.runtime(address=tcp)
        bad = world.runtime("another build", address=tcp)
        assert good.ask("load") == {"ok": True, "digest": world.digest}
        assert bad.ask("load") == {"ok": False, "code": "policy_denied"}
        st = _status(tcp)  # dkeycache status over TCP too: state and counts only
        assert st["state"] == "ok" and st["decisions"]["deny"] == 1
        assert "policy_denied" not in json.dumps(st) and MODEL not in json.dumps(st)
        human = subprocess.run([sys.executable, "-m", "sealtorch.keycache", "status", "--socket",
                                world.sock], capture_output=True, text=True, timeout=60)
        assert human.returncode == 0 and "1 denied" in human.stdout
    finally:
        world.close()
    # the cache's stderr carries one bare JSON line per decision
    lines = [json.loads(x) for x in (tmp_path / "cache.log").read_text().splitlines()
             if x.startswith('{"code"')]
    assert {(d["op"], d["decision"]) for d in lines} >= {("file_key", "allow"),
                                                         ("file_key", "deny")}
    denied = [d for d in lines if d["decision"] == "deny"]  # the reasons are in the log
    assert [(d["op"], d["code"], d["peer"]["transport"]) for d in denied] == [
        ("file_key", "policy_denied", "tcp")]
    assert denied[0]["reasons"]
    assert cache.p.returncode is not None


def test_real_cache_refuses_non_loopback_listener(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE + 'tcp_listen = "0.0.0.0:7001"\n')
    p = subprocess.run([sys.executable, "-I", "-m", "sealtorch.keycache", "serve", "--config",
                        str(cfg), "--attester", "sim"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2
    assert "config_invalid" in p.stderr and "loopback" in p.stderr
    assert "ready" not in p.stdout


def test_poll_interval_defaults_to_30_seconds() -> None:
    """Revocation reaches a cache within poll_interval; the documented default is 30 s."""
    from sealtorch.keycache.config import CacheConfig

    assert parse_config(BASE.encode()).poll_interval == 30.0 == CacheConfig.poll_interval
