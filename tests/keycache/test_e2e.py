"""End to end with real processes: dkeyserver, dkeycache and runtimes (sim TEE), short intervals."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tests.servers import start_keyserver

from sealtorch.attestation import sim

from .conftest import MODEL, remove_socket_dir, short_socket

HERE = Path(__file__).resolve().parent
LEASE = 4


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Proc:
    """A line-oriented subprocess (JSON answers on stdout)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=open(log, "ab"), env=env, text=True)

    def read(self, timeout: float = 60) -> dict[str, Any]:
        import select

        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            raise AssertionError(f"no answer; log:\n{self.log.read_text()[-3000:]}")
        line = self.p.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise AssertionError(f"process exited; log:\n{self.log.read_text()[-3000:]}")
        return json.loads(line)

    def ask(self, cmd: str) -> dict[str, Any]:
        assert self.p.stdin is not None
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.read()

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)


def _status(sock: str) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-m", "sealtorch.keycache", "status", "--socket", sock,
                        "--json"], capture_output=True, text=True, timeout=60)
    if p.returncode not in (0, 1):
        return {"state": "unreachable", "stderr": p.stderr}
    return json.loads(p.stdout)


def _wait_status(sock: str, pred: Any, timeout: float = 30) -> dict[str, Any]:
    end = time.monotonic() + timeout
    st: dict[str, Any] = {}
    while time.monotonic() < end:
        st = _status(sock)
        if pred(st):
            return st
        time.sleep(0.2)
    raise AssertionError(f"cache status never matched: {st}")


class World:
    def __init__(self, tmp: Path, sealed: Any, extra_cfg: str = "") -> None:
        self.tmp = tmp
        self.path, self.mk, sd = sealed
        h = hashlib.sha256()
        for k in sorted(sd):
            h.update(k.encode() + sd[k].numpy().tobytes())
        self.digest = h.hexdigest()
        self.port = _free_port()
        self.ks = start_keyserver(tmp, sim=True, auto_approve=True,
                                  init_args=["--release-port", str(self.port)])
        self.sim_dir = tmp / "sim"
        self.ks.sim_platform(self.sim_dir)
        self.env = dict(os.environ, SEALTORCH_SIM_DIR=str(self.sim_dir))
        self.sock = short_socket()
        pub = base64.b64encode(self.ks.signing_public_key).decode()
        self.pub = pub
        cfg = (
            "[keycache]\n"
            f'keyserver_url = "{self.ks.url}"\n'
            f'server_public_key = "{pub}"\n'
            f'ca_cert = "{self.ks.ca_cert_path}"\n'
            f'socket = "{self.sock}"\n'
            "poll_interval = 0.5\nretry_min = 0.1\nretry_max = 0.5\nrequest_timeout = 5\n"
            + extra_cfg
        ).encode()
        self.cfg = tmp / "dkeycache.toml"
        self.cfg.write_bytes(cfg)
        platform = sim.fingerprint(sim.load_platform_key(self.sim_dir / sim.KEY_FILE)
                                   .public_key())
        cache_meas = sim.measure("dkeycache", cfg)
        rt_meas = sim.measure("runtime", b"")
        self.ks.add_model(MODEL, bytes(self.mk.key))
        self.ks.set_policy(MODEL, {
            "format": "sealtorch-policy/v1", "version": 1, "lease_seconds": LEASE,
            "caches": [{"tee": "sim", "measurement": cache_meas.hex(), "platform_key": platform}],
            "runtimes": [{"tee": "sim", "measurement": rt_meas.hex(), "platform_key": platform}],
        })
        self.procs: list[Proc] = []

    def start_cache(self) -> Proc:
        p = Proc([sys.executable, "-I", "-m", "sealtorch.keycache", "serve", "--config",
                  str(self.cfg), "--attester", "sim"], self.env, self.tmp / "cache.log")
        ready = p.read()
        assert ready["event"] == "ready" and ready["tee"] == "sim"
        self.ready = ready
        self.procs.append(p)
        return p

    def runtime(self, measure_config: str = "", address: str | None = None) -> Proc:
        p = Proc([sys.executable, str(HERE / "runtime_proc.py"), address or self.sock, self.pub,
                  str(self.path), measure_config], self.env, self.tmp / "runtime.log")
        assert p.read()["ready"]
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            p.stop()
        self.ks.stop()
        remove_socket_dir(self.sock)


@pytest.fixture
def world(tmp_path: Path, sealed: Any):
    w = World(tmp_path, sealed)
    yield w
    w.close()


def test_load_deny_outage_restart(world: World) -> None:
    world.start_cache()
    good, bad = world.runtime(), world.runtime("another build")
    # a runtime loads the sealed model through the cache
    assert good.ask("load") == {"ok": True, "digest": world.digest}
    # a runtime with a different measurement is denied
    assert bad.ask("load") == {"ok": False, "code": "policy_denied"}
    # stopping dkeyserver: the cache serves its unexpired lease, reports degraded ...
    world.ks.stop()
    st = _wait_status(world.sock, lambda s: s["state"] == "degraded", timeout=10)
    assert st["upstream"] == "unreachable"
    first = good.ask("load")
    # ... and denies once the lease has expired (it never serves an expired lease)
    _wait_status(world.sock, lambda s: s["leases"] == 0, timeout=LEASE + 10)
    assert first == {"ok": True, "digest": world.digest}
    assert good.ask("load") == {"ok": False, "code": "lease_expired"}
    # restarting dkeyserver restores service without restarting the cache
    world.ks = world.ks.restart()
    _wait_status(world.sock, lambda s: s["state"] == "ok" and s["leases"] > 0, timeout=20)
    assert good.ask("load") == {"ok": True, "digest": world.digest}


def test_killed_cache_restart_and_revocation(world: World) -> None:
    cache = world.start_cache()
    good = world.runtime()
    assert good.ask("load")["ok"]
    before = world.ks.admin("GET", "/v1/admin/audit/verify")
    # a killed cache loses nothing on the server side; a restarted one attests again
    cache.p.send_signal(signal.SIGKILL)
    cache.p.wait(10)
    models = world.ks.admin("GET", "/v1/admin/models")
    assert MODEL in json.dumps(models)
    world.start_cache()
    st = _wait_status(world.sock, lambda s: s["state"] == "ok" and s["leases"] > 0, timeout=20)
    assert st["refreshes"] >= 1
    after = world.ks.admin("GET", "/v1/admin/audit/verify")
    assert json.dumps(after) != json.dumps(before)  # the new enrolment/release was audited
    assert good.ask("load") == {"ok": True, "digest": world.digest}  # session re-established
    # revoking the model on dkeyserver makes the cache deny within the poll interval
    world.ks.admin("POST", f"/v1/admin/model-revoke/{MODEL}", {})
    st = _wait_status(world.sock, lambda s: s["models_denied"] == 1, timeout=10)
    assert st["leases"] == 0
    assert good.ask("load") == {"ok": False, "code": "revoked"}
