"""Load generator for dkeyserver, dkeycache and ``sealtorch serve`` (asyncio + httpx + Unix socket).

    python benchmarks/loadgen.py --seconds 5 --concurrency 1,4,16 --targets keyserver,keycache,serve

Starts a real local deployment (dkeyserver over HTTPS on loopback, dkeycache on a Unix socket,
optionally ``sealtorch serve`` with a sealed ResNet-50; sim TEE), then drives each target for a
fixed time at each concurrency and reports throughput, p50/p99 latency, error rate and the
target process's RSS before/after. It then checks that nothing was lost: every key release the
clients received is in the audit log (and vice versa), the audit chain verifies, and the cache
counted exactly the file keys the runtimes received.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

MODEL = "load-resnet50"
FACTORY = "sealtorch.models.resnet:resnet50"
SHAPE = (3, 32, 32)


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` (and its children sharing the session are not included)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


@dataclass
class Step:
    """One fixed-time run at one concurrency."""

    target: str
    concurrency: int
    seconds: float
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    rss_start: float = 0.0
    rss_end: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        n_err = sum(self.errors.values())
        total = self.ok + n_err

        def pct(p: float) -> float:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else 0.0

        return {"target": self.target, "concurrency": self.concurrency,
                "seconds": self.seconds, "ok": self.ok, "errors": dict(self.errors),
                "throughput_per_s": round(self.ok / self.seconds, 1),
                "p50_ms": pct(0.50), "p99_ms": pct(0.99),
                "mean_ms": round(statistics.fmean(lat) * 1000, 2) if lat else 0.0,
                "error_rate": round(n_err / total, 4) if total else 0.0,
                "rss_start_mb": self.rss_start, "rss_end_mb": self.rss_end}


async def drive(step: Step, op: Callable[[int], Awaitable[None]], pid: int | None,
                on_half: Callable[[], None] | None = None) -> Step:
    """Run ``op`` in ``step.concurrency`` loops until the time is up; ``on_half`` fires once
    half-way (fault injection)."""
    step.rss_start = rss_mb(pid) if pid else 0.0
    end = time.monotonic() + step.seconds

    async def worker(i: int) -> None:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                await op(i)
            except Exception as e:  # every failure is counted by its kind, never hidden
                code = getattr(e, "denial", None) or getattr(e, "code", None) or type(e).__name__
                step.errors[str(code)] = step.errors.get(str(code), 0) + 1
                await asyncio.sleep(0.01)
            else:
                step.ok += 1
                step.latencies.append(time.perf_counter() - t0)

    async def half() -> None:
        await asyncio.sleep(step.seconds / 2)
        if on_half is not None:
            await asyncio.to_thread(on_half)

    await asyncio.gather(*(worker(i) for i in range(step.concurrency)), half())
    step.rss_end = rss_mb(pid) if pid else 0.0
    return step


class LoadError(Exception):
    """A request that did not produce the expected result; ``code`` is the public code."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def _code(r: Any) -> str:
    """The public error code of an HTTP answer (or ``http_<status>``)."""
    try:
        return str(r.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"http_{r.status_code}"


# --- the deployment ----------------------------------------------------------------------------
class Rig:
    """A LocalDeployment with one sealed ResNet-50, its policy, a cache and (opt.) serve."""

    def __init__(self, workdir: Path, *, serve: bool = True, cache_health_port: int = 0
                 ) -> None:
        from sealtorch.runtime.world import LocalDeployment

        self.workdir = workdir
        self.dep = LocalDeployment(workdir)
        self.dep.env["SEALTORCH_KS_RATE_PER_CLIENT"] = "1000000"
        self.want_serve = serve
        self.cache_health_port = cache_health_port
        self.serve_proc: subprocess.Popen[bytes] | None = None
        self.keyserver_proc: subprocess.Popen[bytes] | None = None
        self.cache_proc: subprocess.Popen[bytes] | None = None
        self.serve_url = ""
        self.sealed = workdir / "model.sealed"
        self.model_key = b""

    def start(self) -> Rig:
        import torch

        from sealtorch.attestation import sim
        from sealtorch.format.keyfile import generate_model_key
        from sealtorch.format.writer import seal
        from sealtorch.models.resnet import make_resnet50
        from sealtorch.runtime.config import render_runtime_config

        dep = self.dep
        dep.init_keyserver()
        cfg = dep.ks_dir / "config.toml"  # fixed ports, so a restarted server is found again
        cfg.write_text(cfg.read_text().replace("release_port = 0", f"release_port = {_free_port()}")
                       .replace("admin_port = 0", f"admin_port = {_free_port()}"))
        dep.start_keyserver()
        self.keyserver_proc = dep.procs[-1]
        platform = dep.init_sim_platform()
        mk = generate_model_key(MODEL)
        self.model_key = bytes(mk.key)
        torch.set_num_threads(1)
        seal(make_resnet50(seed=0), self.sealed, mk)
        dep.admin("POST", "/v1/admin/models", {"model_id": MODEL, "key_version": 1,
                                               "key": base64.b64encode(self.model_key).decode()})
        cache_cfg = dep.write_cache_config()
        if self.cache_health_port:
            cache_cfg += f"health_port = {self.cache_health_port}\n".encode()
            (self.workdir / "dkeycache.toml").write_bytes(cache_cfg)
            dep.cache_config = cache_cfg
        cache_meas = sim.measure("dkeycache", cache_cfg)
        self.runtime_cfg = render_runtime_config(dep.server_public_key_b64)
        (self.workdir / "runtime.toml").write_bytes(self.runtime_cfg)
        ident = {"tee": "sim", "platform_key": platform}
        self.policy_version = 1
        dep.admin("PUT", f"/v1/admin/policy/{MODEL}", {"policy": {
            "format": "sealtorch-policy/v1", "version": 1, "lease_seconds": 300,
            "max_releases_per_lease": 2**31,
            "caches": [{**ident, "measurement": cache_meas.hex()},
                       {**ident, "measurement": sim.measure("loadgen").hex()}],
            "runtimes": [{**ident, "measurement": sim.measure("serve", self.runtime_cfg).hex()},
                         {**ident, "measurement": sim.measure("runtime").hex()}],
            "factories": [FACTORY]}})
        dep.start_cache()
        self.cache_proc = dep.procs[-1]
        if self.want_serve:
            self.start_serve()
        return self

    def start_serve(self) -> None:
        import httpx

        port = _free_port()
        self.serve_proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "sealtorch", "serve", str(self.sealed), "--factory",
             FACTORY, "--keycache", self.dep.socket, "--config",
             str(self.workdir / "runtime.toml"), "--attester", "sim", "--port", str(port),
             "--max-batch", "4", "--input-shape", ",".join(map(str, SHAPE)), "--name",
             "resnet50", "--rate", "1000000", "--threads", "1",
             "--unsafe-allow-plaintext"],  # the load is plaintext OIP (docs/e2e.md)
            stdout=open(self.dep.logs / "serve.log", "ab"), stderr=subprocess.STDOUT,
            env=self.dep.env, start_new_session=True)
        self.serve_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            if self.serve_proc.poll() is not None:
                raise RuntimeError("sealtorch serve exited: "
                                   + (self.dep.logs / "serve.log").read_text()[-2000:])
            try:
                if httpx.get(self.serve_url + "/v2/health/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("sealtorch serve did not become ready")
            time.sleep(0.2)

    @property
    def keyserver_pid(self) -> int:
        assert self.keyserver_proc is not None
        return self.keyserver_proc.pid

    @property
    def cache_pid(self) -> int:
        assert self.cache_proc is not None
        return self.cache_proc.pid

    # --- faults --------------------------------------------------------------------------
    @staticmethod
    def _kill9(proc: subprocess.Popen[bytes] | None) -> None:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def kill9_keyserver(self) -> None:
        self._kill9(self.keyserver_proc)

    def restart_keyserver(self) -> None:
        self.dep.start_keyserver()
        self.keyserver_proc = self.dep.procs[-1]

    def kill9_cache(self) -> None:
        self._kill9(self.cache_proc)

    def restart_cache(self) -> None:
        self.dep.start_cache()
        self.cache_proc = self.dep.procs[-1]

    def kill9_serve(self) -> None:
        self._kill9(self.serve_proc)

    def stop(self) -> None:
        if self.serve_proc is not None and self.serve_proc.poll() is None:
            self.serve_proc.terminate()
            try:
                self.serve_proc.wait(20)
            except subprocess.TimeoutExpired:
                self.serve_proc.kill()
                self.serve_proc.wait(5)
        self.dep.stop()

    # --- audit ---------------------------------------------------------------------------
    def audit_counts(self) -> dict[str, int]:
        """Audit rows by (decision, code) from the key server's SQLite file."""
        import sqlalchemy as sa

        eng = sa.create_engine(f"sqlite:///{self.dep.ks_dir / 'keyserver.db'}")
        try:
            with eng.connect() as c:
                rows = c.execute(sa.text("SELECT decision, code, COUNT(*) FROM audit_log "
                                         "WHERE action = 'release' GROUP BY decision, code"))
                return {f"{d}:{code}": int(n) for d, code, n in rows}
        finally:
            eng.dispose()

    def chain_ok(self) -> bool:
        return bool(self.dep.admin("GET", "/v1/admin/audit/verify")["ok"])


# --- per-target operations ----------------------------------------------------------------
class KeyServerLoad:
    """challenge + release of one model by a sim-TEE cache identity; verifies every grant."""

    def __init__(self, url: str, ca_cert: Path, server_public_key: bytes, sim_key: Path,
                 model_key: bytes) -> None:
        import hashlib

        from sealtorch.attestation import sim
        from sealtorch.attestation.attesters.sim import SimAttester
        from sealtorch.protocol.grant import GrantVerifier
        from sealtorch.protocol.release_client import tls_client_context

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.att = SimAttester(sim_key, sim.measure("loadgen"), role="dkeycache")
        self.url = url
        self.model_key = model_key
        self.ctx = tls_client_context(ca_cert)
        self.audience = hashlib.sha256(server_public_key).digest()
        self.verifier = GrantVerifier(server_public_key)
        self.granted = 0
        self.client: Any = None

    @classmethod
    def for_rig(cls, rig: Rig) -> KeyServerLoad:
        from sealtorch.attestation import sim

        return cls(rig.dep.url, rig.dep.ca_cert, rig.dep.server_public_key,
                   rig.dep.sim_dir / sim.KEY_FILE, rig.model_key)

    async def op(self, i: int) -> None:
        import httpx

        from sealtorch.attestation import binding
        from sealtorch.protocol import hpke
        from sealtorch.protocol.b64 import b64d, b64e

        if self.client is None:
            self.client = httpx.AsyncClient(verify=self.ctx, timeout=60,
                                            limits=httpx.Limits(max_connections=256))
        r = await self.client.post(self.url + "/v1/challenge", json={})
        if r.status_code != 200:
            raise LoadError(_code(r))
        nonce = b64d(r.json()["nonce"], field="nonce", max_len=32, exact_len=32)
        sk, pk = hpke.generate_keypair()
        ev = self.att.attest(binding.report_data("remote", nonce, hpke.KEM_ID, pk,
                                                 self.audience))
        r = await self.client.post(self.url + "/v1/release", json={
            "evidence": ev.to_dict(), "public_key": b64e(pk), "nonce": b64e(nonce),
            "models": [MODEL], "kem_id": hpke.KEM_ID})
        if r.status_code != 200:
            raise LoadError(_code(r))
        obj = r.json()
        if not obj["grants"]:
            raise LoadError(obj["denials"][0]["code"] if obj["denials"] else "no_grant")
        for g in obj["grants"]:
            grant = self.verifier.verify(g["grant"], nonce=nonce, requester_key=pk)
            key = self.verifier.open_key(grant, b64d(g["sealed_key"], field="k",
                                                     max_len=4096), sk)
            if not key.equals(self.model_key):
                raise LoadError("wrong_key")
            key.wipe()
            self.granted += 1

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None


class KeyCacheLoad:
    """file_key of the sealed model through dkeycache on an established local session."""

    def __init__(self, rig: Rig) -> None:
        from sealtorch.format.header import read_header

        self.rig = rig
        self.header = read_header(rig.sealed)
        self.clients: dict[int, Any] = {}
        self.fetched = 0
        self._probe_fetches = 0
        self._lock = threading.Lock()

    def _client(self, i: int) -> Any:
        from sealtorch.attestation import sim
        from sealtorch.attestation.attesters.sim import SimAttester
        from sealtorch.keycache.client import KeyCacheClient

        if i not in self.clients:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                att = SimAttester(self.rig.dep.sim_dir / sim.KEY_FILE, sim.measure("runtime"),
                                  role="runtime")
            self.clients[i] = KeyCacheClient(self.rig.dep.socket,
                                             server_public_key=self.rig.dep.server_public_key,
                                             attester=att)
        return self.clients[i]

    def _fetch(self, i: int) -> None:
        key = self._client(i).file_key(self.header)
        key.wipe()
        with self._lock:
            self.fetched += 1

    async def op(self, i: int) -> None:
        await asyncio.to_thread(self._fetch, i)

    def releases_counted_by_cache(self) -> int:
        """File keys the cache counted (a session sees the leases of models it was allowed:
        this probe fetches one key per call to be allowed; its own fetches are not counted)."""
        client = self._client(10_000)
        client.file_key(self.header).wipe()
        self._probe_fetches += 1
        return sum(int(ls["releases"]) for ls in client.status()["leases"]) - self._probe_fetches

    async def close(self) -> None:
        for c in self.clients.values():
            c.close()
        self.clients.clear()


class ServeLoad:
    """One Open Inference Protocol request (batch of 1) to ``sealtorch serve``."""

    def __init__(self, rig: Rig) -> None:
        import random

        self.rig = rig
        rnd = random.Random(0)
        data = [rnd.uniform(-1, 1) for _ in range(SHAPE[0] * SHAPE[1] * SHAPE[2])]
        self.body = json.dumps({"inputs": [{"name": "input", "shape": [1, *SHAPE],
                                            "datatype": "FP32", "data": data}]}).encode()
        self.client: Any = None

    async def op(self, i: int) -> None:
        import httpx

        if self.client is None:
            self.client = httpx.AsyncClient(timeout=120)
        r = await self.client.post(self.rig.serve_url + "/v2/models/resnet50/infer",
                                   content=self.body,
                                   headers={"content-type": "application/json"})
        if r.status_code != 200:
            raise LoadError(f"http_{r.status_code}")

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None


async def run_load(rig: Rig, targets: list[str], concurrencies: list[int],
                   seconds: float) -> dict[str, Any]:
    """Drive each target at each concurrency; then check that nothing was lost."""
    out: dict[str, Any] = {"steps": []}
    before = rig.audit_counts()
    ks = KeyServerLoad.for_rig(rig)
    kc = KeyCacheLoad(rig)
    sv = ServeLoad(rig) if rig.serve_proc is not None else None
    loads: dict[str, tuple[Any, int | None]] = {"keyserver": (ks, rig.keyserver_pid),
                                                "keycache": (kc, rig.cache_pid)}
    if sv is not None and rig.serve_proc is not None:
        loads["serve"] = (sv, rig.serve_proc.pid)
    cache_before = kc.releases_counted_by_cache()
    for t in targets:
        load, pid = loads[t]
        for c in concurrencies:
            step = await drive(Step(t, c, seconds), load.op, pid)
            out["steps"].append(step.summary())
        await load.close()
    after = rig.audit_counts()
    granted_audited = after.get("release:granted", 0) - before.get("release:granted", 0)
    cache_counted = kc.releases_counted_by_cache() - cache_before
    await kc.close()
    out["nothing_lost"] = {
        "keyserver_grants_received": ks.granted, "keyserver_grants_audited": granted_audited,
        "keycache_keys_received": kc.fetched, "keycache_releases_counted": cache_counted,
        "audit_chain_ok": rig.chain_ok(),
        "ok": ks.granted == granted_audited and kc.fetched == cache_counted and rig.chain_ok(),
    }
    return out


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="time per step")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated, rising")
    ap.add_argument("--targets", default="keyserver,keycache,serve")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    targets = [t for t in a.targets.split(",") if t]
    conc = [int(c) for c in a.concurrency.split(",") if c]
    wd = a.workdir or Path(tempfile.mkdtemp(prefix="sealtorch-load-"))
    rig = Rig(wd, serve="serve" in targets)
    try:
        rig.start()
        res = asyncio.run(run_load(rig, targets, conc, a.seconds))
    finally:
        rig.stop()
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"{'target':10} {'conc':>4} {'ok/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'err%':>6} {'rss MB':>15}")
        for s in res["steps"]:
            print(f"{s['target']:10} {s['concurrency']:>4} {s['throughput_per_s']:>8} "
                  f"{s['p50_ms']:>8} {s['p99_ms']:>8} {s['error_rate'] * 100:>6.2f} "
                  f"{s['rss_start_mb']:>7}->{s['rss_end_mb']:<7}")
        print("nothing lost:", json.dumps(res["nothing_lost"]))
    return 0 if res["nothing_lost"]["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
