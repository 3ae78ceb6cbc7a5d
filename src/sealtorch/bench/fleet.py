"""``sealtorch bench keyserver --replicas N[,N..] --caches C``: dkeyserver at fleet scale.

N dkeyserver processes on one PostgreSQL database (loopback, TLS 1.3) serve C simulated light
caches. Each cache has its own HPKE key (so its own enrolment and cache id) and sim evidence,
re-attests at half its lease and polls its signed status on the cache's own schedule, with
time compressed by ``speedup``; it spreads its requests over the replicas and fails over with
the backoff of :mod:`sealtorch.keycache.failover`. Mid-run one replica is SIGKILLed and
restarted on its port. Reported per N: releases/s and status polls/s, p50/p99, errors,
releases that failed over, leases that lapsed, nonces accepted twice (must be 0), and the
server's CPU per release next to the crypto a release needs, measured in the same run.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealtorch.bench import crypto_cpu
from sealtorch.bench.keyserver import _SERVER, _arun, _Http, _proc_cpu, pg_database
from sealtorch.keycache import failover

MODEL = "bench-model"
#: simulated caches per load-generator process
CACHES_PER_PROCESS = 500
#: seconds the replicas' idle CPU is measured before each round
IDLE_SECONDS = 3.0


@dataclass
class Schedule:
    """A cache's schedule in simulated seconds, and how much faster than real time it runs."""

    lease_seconds: float = 300.0
    poll_interval: float = 30.0
    renew_fraction: float = 0.5
    speedup: float = 10.0
    retry_min: float = 0.05
    retry_max: float = 1.0

    @property
    def renew_every(self) -> float:
        return self.lease_seconds * self.renew_fraction / self.speedup

    @property
    def poll_every(self) -> float:
        return self.poll_interval / self.speedup

    @property
    def lease(self) -> float:
        return self.lease_seconds / self.speedup


@dataclass
class Tally:
    """What one load-generator process saw."""

    release_lat: list[float] = field(default_factory=list)
    release_done: list[float] = field(default_factory=list)  # time.perf_counter() (system-wide)
    poll_done: list[float] = field(default_factory=list)
    poll_lat: list[float] = field(default_factory=list)
    nonces: list[bytes] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    unanswered: int = 0
    failed_over: int = 0
    endpoint_failures: int = 0
    handshakes: int = 0  # TLS connections opened (a new one per request once keep-alive ends)
    resumed: int = 0  # of which resumed a TLS session (no certificate exchange)
    lapses: int = 0
    cpu: float = 0.0


class _Unavailable(Exception):
    """The replica did not answer (connection, 5xx, 429): fail over."""


class _LightCache:
    """One simulated cache: its key, its status key, its endpoint health and connection."""

    def __init__(self, n: int, rng: random.Random) -> None:
        from sealtorch.protocol import hpke

        self.sk, self.pk = hpke.generate_keypair()
        self.health = [failover.EndpointHealth() for _ in range(n)]
        self.cursor = rng.randrange(n)
        self.conns: dict[int, _Http] = {}  # one keep-alive connection per replica, as a cache
        self.cache_id: str | None = None
        self.status_key: bytes | None = None
        self.lease_end = 0.0


async def _caches(urls: list[str], ca: Path, audience: bytes, platform_key: Path,
                  measurement: bytes, count: int, seconds: float, sched: Schedule,
                  seed: int) -> Tally:
    """``count`` light caches on this process's event loop for ``seconds``."""
    from urllib.parse import urlsplit

    from sealtorch.attestation import binding
    from sealtorch.attestation.attesters.sim import SimAttester
    from sealtorch.protocol import hpke
    from sealtorch.protocol.messages import StatusRequest, status_key_info
    from sealtorch.protocol.release_client import tls_client_context

    rng = random.Random(seed)
    att = SimAttester(platform_key, measurement, role="dkeycache")
    ctx = tls_client_context(ca)
    hosts = [(urlsplit(u).hostname or "127.0.0.1", int(urlsplit(u).port or 443)) for u in urls]
    t = Tally()
    cpu0 = time.process_time()
    start = time.perf_counter()
    deadline = start + seconds

    def error(kind: str) -> bool:
        t.errors[kind] = t.errors.get(kind, 0) + 1
        return False

    async def call(c: _LightCache, path: bytes, body: bytes, at: int | None = None
                   ) -> tuple[int, int, bytes]:
        """One request to endpoint ``at`` (or the next in rotation); returns (endpoint,
        status, body) or raises :class:`_Unavailable` after marking the endpoint down."""
        if at is None:
            at = failover.choose(c.health, time.perf_counter(), c.cursor)
            c.cursor = (at + 1) % len(c.health)
        i = at
        conn = c.conns.get(i)
        if conn is None:
            conn = c.conns[i] = _Http(*hosts[i], ctx)
        elif conn.reader is not None and conn.reader.at_eof():
            await conn.close()  # the replica closed this idle keep-alive connection: reopen
            # (resuming its TLS session)
        try:
            st, data = await conn.request(b"POST", path, body)
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            st, data = 0, b""
            err: Exception | None = e
        else:
            err = None
        if err is not None or st >= 500 or st == 429:
            c.health[i] = failover.after_failure(c.health[i], time.perf_counter(),
                                                 retry_min=sched.retry_min,
                                                 retry_max=sched.retry_max,
                                                 jitter=rng.random())
            t.endpoint_failures += 1
            await conn.close()
            t.handshakes += conn.opened
            t.resumed += conn.resumed
            c.conns.pop(i, None)
            raise _Unavailable
        c.health[i] = failover.after_success(c.health[i])
        return i, st, data

    async def release(c: _LightCache) -> bool:
        i, st, data = await call(c, b"/v1/challenge", b"{}")
        if st != 200:
            return error(f"challenge_http_{st}")
        nonce = base64.b64decode(json.loads(data)["nonce"])
        ev = att.attest(binding.report_data("remote", nonce, hpke.KEM_ID, c.pk, audience))
        body = json.dumps({"evidence": ev.to_dict(), "public_key": base64.b64encode(c.pk).decode(),
                           "nonce": base64.b64encode(nonce).decode(), "models": [MODEL]},
                          separators=(",", ":")).encode()
        _, st, data = await call(c, b"/v1/release", body, at=i)  # where the nonce came from
        if st != 200:
            return error(f"release_http_{st}")
        obj = json.loads(data)
        if len(obj["grants"]) != 1:
            return error("release_without_grant")
        if c.status_key is None:
            c.cache_id = obj["cache_id"]
            sealed = base64.b64decode(obj["status_key"])
            with hpke.open(sealed, c.sk, status_key_info(obj["cache_id"], nonce)) as k:
                c.status_key = bytes(k.view())
        t.nonces.append(nonce)
        return True

    async def poll(c: _LightCache) -> bool:
        assert c.cache_id is not None and c.status_key is not None
        req = StatusRequest(os.urandom(32), c.cache_id, [MODEL]).authenticated(c.status_key)
        _, st, _ = await call(c, b"/v1/status", json.dumps(req.to_json()).encode())
        return st == 200 or error(f"status_http_{st}")

    async def run(c: _LightCache) -> None:
        now = time.perf_counter()
        next_release = now + rng.uniform(0, sched.renew_every)  # caches start spread out
        next_poll = next_release + rng.uniform(0, sched.poll_every)
        while True:
            due = min(next_release, next_poll)
            if due >= deadline:
                break
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            is_release = next_release <= next_poll or c.status_key is None
            t0 = time.perf_counter()
            moved, ok = False, False
            for _ in range(len(c.health)):  # fail over to each replica in the rotation
                try:
                    ok = await (release(c) if is_release else poll(c))
                    break
                except _Unavailable:
                    moved = True
                    if not failover.available(c.health, time.perf_counter()):
                        t.unanswered += 1  # every replica is backing off: retry later
                        break
                except (KeyError, ValueError, TypeError) as e:
                    ok = error(f"malformed_{type(e).__name__}")
                    break
            done = time.perf_counter()
            if not ok:  # the next try waits for a replica's backoff (the cache's schedule)
                soonest = min(h.retry_at for h in c.health)
                if is_release:
                    next_release = max(done + sched.retry_min, soonest)
                else:
                    next_poll = max(done + sched.poll_every, soonest)
                continue
            if is_release:
                if c.lease_end and t0 > c.lease_end:
                    t.lapses += 1
                c.lease_end = t0 + sched.lease
                t.release_lat.append(done - t0)
                t.release_done.append(done)
                t.failed_over += moved
                next_release = t0 + sched.renew_every
                next_poll = max(next_poll, done)
            else:
                t.poll_lat.append(done - t0)
                t.poll_done.append(done)
                next_poll = t0 + sched.poll_every
        for conn in c.conns.values():
            await conn.close()
            t.handshakes += conn.opened
            t.resumed += conn.resumed

    caches = [_LightCache(len(urls), rng) for _ in range(count)]
    await asyncio.gather(*(run(c) for c in caches))
    t.cpu = time.process_time() - cpu0
    return t


def _cache_process(args: tuple[Any, ...], q: Any) -> None:
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning)
    q.put(_arun(_caches(*args)))


def _run_caches(urls: list[str], ca: Path, audience: bytes, platform_key: Path,
                measurement: bytes, caches: int, seconds: float, sched: Schedule,
                ) -> tuple[Any, list[Any]]:
    """Start the load-generator processes; returns their result queue and the processes."""
    import multiprocessing as mp

    nproc = max(1, -(-caches // CACHES_PER_PROCESS))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    shares = [caches // nproc + (1 if i < caches % nproc else 0) for i in range(nproc)]
    procs = [ctx.Process(target=_cache_process, args=(
        (urls, ca, audience, platform_key, measurement, c, seconds, sched,
         secrets_seed()), q)) for c in shares]
    for p in procs:
        p.start()
    return q, procs


def secrets_seed() -> int:
    """A fresh seed for one load generator's random schedule (not security relevant)."""
    return int.from_bytes(os.urandom(8), "big")


@dataclass
class _Replica:
    data_dir: Path
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    cpu_done: float = 0.0  # CPU of processes of this replica that have exited
    cpu_start: float = 0.0  # CPU the running process spent starting (not serving)
    admin_url: str = ""
    crypto_done: crypto_cpu.Counts = field(default_factory=dict)  # likewise, crypto it counted
    crypto_start: crypto_cpu.Counts = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        from sealtorch.runtime.world import wait_keyserver

        env = dict(self.env)
        if self.port:
            env["SEALTORCH_KS_RELEASE_PORT"] = str(self.port)
        (self.data_dir / "run.json").unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([*_SERVER, "serve", "--data-dir", str(self.data_dir)],
                                         stdout=log, stderr=log, env=env)
        url, self.admin_url, _ = wait_keyserver(self.proc, self.data_dir, self.log,
                                                time.monotonic() + 120)
        self.port = int(url.rsplit(":", 1)[1])
        self.cpu_start = _proc_cpu(self.proc.pid)
        self.crypto_start = self._scrape()

    def _scrape(self) -> crypto_cpu.Counts:
        return crypto_cpu.scrape(self.admin_url, self.data_dir / "tls" / "ca.crt")

    def crypto(self) -> crypto_cpu.Counts:
        """The crypto CPU this replica counted in itself while serving (start-up excluded)."""
        now = self._scrape() if self.proc else {}
        return crypto_cpu.add(self.crypto_done, crypto_cpu.minus(now, self.crypto_start))

    def cpu(self) -> float:
        """CPU seconds this replica spent serving (start-up excluded)."""
        return self.cpu_done + (_proc_cpu(self.proc.pid) - self.cpu_start if self.proc else 0.0)

    def kill9(self) -> None:
        assert self.proc is not None
        self.crypto_done = self.crypto()  # the last scrape: what it counted until now
        self.crypto_start = {}
        self.cpu_done += _proc_cpu(self.proc.pid) - self.cpu_start
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000 if xs else float("nan")


def _machine_busy() -> float:
    """CPU seconds the cores of this machine have been busy since boot (``/proc/stat``:
    user, nice, system, irq and softirq; not idle, iowait or time a hypervisor stole);
    0.0 where it cannot be read."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        ticks = [int(f) for f in fields]
    except (OSError, ValueError):
        return 0.0
    return (sum(ticks[:7]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _usage(replicas: list[_Replica]) -> tuple[float, crypto_cpu.Counts]:
    """The replicas' process CPU and the crypto CPU they counted, so far."""
    return sum(r.cpu() for r in replicas), crypto_cpu.add(*(r.crypto() for r in replicas))


def _round(replicas: list[_Replica], ca: Path, audience: bytes, platform_key: Path,
           measurement: bytes, caches: int, seconds: float, sched: Schedule) -> dict[str, Any]:
    """One measurement over ``replicas``: the caches run, replica 0 is SIGKILLed at 40% of
    the run and restarted on its port; returns the figures."""
    urls = [r.url for r in replicas]
    idle0, i0 = sum(r.cpu() for r in replicas), time.perf_counter()
    time.sleep(IDLE_SECONDS)  # what the replicas cost doing nothing (state checks, pings)
    idle_rate = (sum(r.cpu() for r in replicas) - idle0) / (time.perf_counter() - i0)
    cpu0, crypto0 = _usage(replicas)
    busy0 = _machine_busy()
    t0 = time.perf_counter()
    q, procs = _run_caches(urls, ca, audience, platform_key, measurement, caches, seconds,
                           sched)
    # the steady window: after the caches' first renewal interval, before the kill; the
    # servers' CPU and crypto are sampled at its ends too, so that its figures leave out the
    # caches' first connections and the killed replica's restart
    w0 = t0 + min(sched.renew_every, seconds * 0.2)
    time.sleep(max(0.0, w0 - time.perf_counter()))
    cpu_w0, crypto_w0 = _usage(replicas)
    time.sleep(max(0.0, t0 + seconds * 0.4 - time.perf_counter()))
    cpu_w1, crypto_w1 = _usage(replicas)
    w1 = time.perf_counter()
    victim = replicas[0]
    victim.kill9()
    killed_at = time.perf_counter() - t0
    time.sleep(min(2.0, seconds * 0.1))
    victim.start()
    restarted_at = time.perf_counter() - t0
    tallies: list[Tally] = [q.get(timeout=seconds + 300) for _ in procs]
    for p in procs:
        p.join(30)
    elapsed = time.perf_counter() - t0
    busy = _machine_busy() - busy0
    cpu1, crypto1 = _usage(replicas)
    server_cpu = cpu1 - cpu0
    in_server = crypto_cpu.minus(crypto1, crypto0)
    client_cpu = sum(t.cpu for t in tallies)
    rel = [x for t in tallies for x in t.release_lat]
    polls = [x for t in tallies for x in t.poll_lat]
    nonces = [n for t in tallies for n in t.nonces]
    n = max(len(rel), 1)
    steady_rel = sum(w0 <= x < w1 for t in tallies for x in t.release_done)
    steady_poll = sum(w0 <= x < w1 for t in tallies for x in t.poll_done)
    steady_cpu = cpu_w1 - cpu_w0
    steady = crypto_cpu.figures(crypto_cpu.minus(crypto_w1, crypto_w0), steady_cpu,
                                steady_rel, steady_poll)
    return {
        "steady_releases_per_s": steady_rel / (w1 - w0),
        "steady_polls_per_s": steady_poll / (w1 - w0),
        "steady_releases": steady_rel, "steady_polls": steady_poll,
        "steady_server_cpu_s": steady_cpu,
        "steady_server_cpu_ms_per_release": steady_cpu / max(steady_rel, 1) * 1000,
        **{"steady_" + k: v for k, v in steady.items()},
        "replicas": len(replicas), "caches": caches, "seconds": elapsed,
        "releases": len(rel), "releases_per_s": len(rel) / elapsed,
        "polls": len(polls), "polls_per_s": len(polls) / elapsed,
        "release_p50_ms": _pct(rel, 0.5), "release_p99_ms": _pct(rel, 0.99),
        "poll_p50_ms": _pct(polls, 0.5), "poll_p99_ms": _pct(polls, 0.99),
        "errors": sum(sum(t.errors.values()) for t in tallies),
        "error_kinds": {k: sum(t.errors.get(k, 0) for t in tallies)
                        for k in sorted({k for t in tallies for k in t.errors})},
        "unanswered": sum(t.unanswered for t in tallies),
        "releases_failed_over": sum(t.failed_over for t in tallies),
        "endpoint_failures": sum(t.endpoint_failures for t in tallies),
        "tls_handshakes_per_request": sum(t.handshakes for t in tallies)
        / max(1, 2 * len(rel) + len(polls)),
        "tls_resumed_per_request": sum(t.resumed for t in tallies)
        / max(1, 2 * len(rel) + len(polls)),
        "leases_lapsed": sum(t.lapses for t in tallies),
        "nonces_accepted_twice": len(nonces) - len(set(nonces)),
        "killed_at_s": killed_at, "restarted_at_s": restarted_at,
        "server_cpu_s": server_cpu,
        "server_idle_cpu_per_s": idle_rate,
        "server_busy_cpu_s": max(0.0, server_cpu - idle_rate * elapsed),
        "server_cpu_ms_per_release": server_cpu / n * 1000,
        # a release is two requests (challenge, release), a poll one
        "server_cpu_ms_per_request": server_cpu / max(1, 2 * len(rel) + len(polls)) * 1000,
        "client_cpu_ms_per_release": client_cpu / n * 1000,
        # where the machine's CPU went (cores busy on average): the replicas, the load
        # generators, and the rest (PostgreSQL, the kernel's share, anything else running)
        "machine_cores": os.cpu_count() or 1,
        "machine_busy_cores": busy / elapsed,
        "server_cores": server_cpu / elapsed,
        "load_generator_cores": client_cpu / elapsed,
        "other_cores": max(0.0, busy - server_cpu - client_cpu) / elapsed,
        **crypto_cpu.figures(in_server, server_cpu, len(rel), len(polls)),
    }


def run_fleet(db_url: str, replica_counts: list[int], caches: int, seconds: float,
              sched: Schedule, progress: Any = None) -> dict[str, Any]:
    """Set up one database and max(N) replicas, run one round per N; returns the figures."""
    import httpx

    from sealtorch.attestation import sim
    from sealtorch.protocol.release_client import tls_client_context
    from sealtorch.protocol.signing import key_id

    say = progress or (lambda _msg: None)
    url, drop = pg_database(db_url)
    replicas: list[_Replica] = []
    try:
        with tempfile.TemporaryDirectory(prefix="sealtorch-fleet-") as tmp:
            base = Path(tmp) / "ks0"
            subprocess.run([*_SERVER, "init", "--data-dir", str(base), "--db", url,
                            "--release-port", "0", "--admin-port", "0", "--sim",
                            "--auto-approve", "--workers", "1"], check=True, capture_output=True)
            # every simulated cache connects from 127.0.0.1: lift the per-client rate limit
            env = {**os.environ, "SEALTORCH_KS_RATE_PER_CLIENT": "1000000"}
            for i in range(max(replica_counts)):
                d = base if i == 0 else Path(tmp) / f"ks{i}"
                if i:  # a replica: the same data dir contents (keys, TLS, state mark)
                    shutil.copytree(base, d, ignore=shutil.ignore_patterns("run.json"))
                replicas.append(_Replica(d, env, Path(tmp) / f"ks{i}.log"))
                replicas[-1].start()
            say(f"{len(replicas)} dkeyserver replicas up")
            ports = json.loads((base / "run.json").read_text())
            adm = f"https://127.0.0.1:{ports['admin_port']}"
            ca = base / "tls" / "ca.crt"
            tok = (base / "admin.token").read_text().strip()
            pk_path = sim.init_platform_key(Path(tmp) / "sim")
            meas = sim.measure("dkeycache")
            with httpx.Client(verify=tls_client_context(ca), timeout=30,
                              headers={"Authorization": f"Bearer {tok}"}) as h:
                h.post(adm + "/v1/admin/sim/platforms", json={
                    "public_key": (Path(tmp) / "sim" / sim.PUBLIC_FILE).read_text()}
                ).raise_for_status()
                h.post(adm + "/v1/admin/models", json={
                    "model_id": MODEL, "key": base64.b64encode(os.urandom(32)).decode()}
                ).raise_for_status()
                fp = sim.fingerprint(sim.load_platform_key(pk_path).public_key())
                h.put(adm + f"/v1/admin/policy/{MODEL}", json={"policy": {
                    "version": 1, "lease_seconds": int(sched.lease_seconds),
                    "caches": [{"tee": "sim", "measurement": meas.hex(), "platform_key": fp}]}}
                ).raise_for_status()
            from cryptography.hazmat.primitives import serialization

            pub = serialization.load_pem_public_key((base / "signing.pub").read_bytes())
            raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            audience = bytes.fromhex(key_id(raw))
            rounds = []
            for n in replica_counts:
                say(f"round: {n} replica(s), {caches} caches, {seconds:g} s")
                rounds.append(_round(replicas[:n], ca, audience, pk_path, meas, caches,
                                     seconds, sched))
            crypto = crypto_cpu.crypto_per_release(pk_path, meas)

            def over_crypto(cpu_s: float, releases: int, polls: int) -> float:
                """Server CPU over the crypto it did (releases and polls, idle figure)."""
                work_us = (releases * crypto["crypto_per_release_us"]
                           + polls * crypto["crypto_per_poll_us"])
                return cpu_s * 1e6 / max(work_us, 1.0)

            for fig in rounds:
                fig["server_cpu_over_crypto"] = over_crypto(fig["server_cpu_s"],
                                                            fig["releases"], fig["polls"])
                fig["busy_cpu_over_crypto"] = over_crypto(fig["server_busy_cpu_s"],
                                                          fig["releases"], fig["polls"])
                fig["steady_server_cpu_over_crypto"] = over_crypto(
                    fig["steady_server_cpu_s"], fig["steady_releases"], fig["steady_polls"])
            return {"rounds": rounds, "schedule": sched.__dict__, **crypto}
    finally:
        for r in replicas:
            r.stop()
        drop()


def report_fleet(res: dict[str, Any]) -> str:
    """The figures of :func:`run_fleet` as a table, one line per replica count."""
    s = res["schedule"]
    lines = [f"caches renew every {s['lease_seconds'] * s['renew_fraction']:g} s and poll "
             f"every {s['poll_interval']:g} s, {s['speedup']:g}x faster than real time; one "
             "replica SIGKILLed at 40% of each round and restarted",
             "releases/s and polls/s: over the whole round (steady: before the kill)",
             "replicas  releases/s  polls/s  release p50/p99 ms  poll p50/p99 ms  errors  "
             "unanswered  failed over  lapsed  nonces twice  server CPU ms/release (x crypto)  "
             "client CPU ms/release  TLS handshakes/request (resumed)"]
    for r in res["rounds"]:
        lines.append(
            f"{r['replicas']:>8}  {r['releases_per_s']:>4.0f} ({r['steady_releases_per_s']:.0f})  "
            f"{r['polls_per_s']:>4.0f} ({r['steady_polls_per_s']:.0f})  "
            f"{r['release_p50_ms']:>8.1f}/{r['release_p99_ms']:<9.1f}  "
            f"{r['poll_p50_ms']:>6.1f}/{r['poll_p99_ms']:<8.1f}  {r['errors']:>6}  "
            f"{r['unanswered']:>10}  {r['releases_failed_over']:>11}  {r['leases_lapsed']:>6}  "
            f"{r['nonces_accepted_twice']:>12}  {r['server_cpu_ms_per_release']:>8.2f} "
            f"({r['server_cpu_over_crypto']:.1f}x; {r['busy_cpu_over_crypto']:.1f}x net of "
            f"idle)  {r['client_cpu_ms_per_release']:>8.2f}  "
            f"{r['tls_handshakes_per_request']:.2f} ({r['tls_resumed_per_request']:.2f})")
        if r.get("server_cpu_over_crypto_in_server") is not None:
            lines.append(f"          in the servers while they served: "
                         f"{r['server_cpu_over_crypto_in_server']:.1f}x the crypto they counted "
                         f"({r['crypto_in_server_us_per_release']:.0f} us per release, "
                         f"{r.get('crypto_in_server_us_per_poll', 0.0):.0f} us per poll)")
        if r.get("steady_server_cpu_over_crypto_in_server") is not None:
            lines.append(f"          steady window only (no first connections, no restart): "
                         f"{r['steady_server_cpu_ms_per_release']:.2f} ms server CPU per "
                         f"release ({r['steady_server_cpu_over_crypto']:.1f}x crypto), "
                         f"{r['steady_server_cpu_over_crypto_in_server']:.1f}x the crypto "
                         "counted in the servers")
        lines.append(f"          CPU: {r['machine_busy_cores']:.2f} of {r['machine_cores']} "
                     f"cores busy: replicas {r['server_cores']:.2f}, load generators "
                     f"{r['load_generator_cores']:.2f}, the rest (PostgreSQL, kernel, other) "
                     f"{r['other_cores']:.2f}")
        if r["error_kinds"]:
            lines.append(f"          errors: {r['error_kinds']}")
    lines.append(f"crypto per release {res['crypto_per_release_us']:.0f} us (evidence "
                 f"{res['verify_evidence_us']:.0f}, 2 HPKE seals {2 * res['hpke_seal_us']:.0f}, "
                 f"3 signatures {3 * res['grant_sign_us']:.0f}), per poll "
                 f"{res['crypto_per_poll_us']:.0f} us; server CPU/release counts the polls' CPU "
                 "too, (x crypto) is all server CPU over all the crypto it did; net of idle: "
                 "minus what the replicas spend idle (measured before each round)")
    return "\n".join(lines)


__all__ = ["Schedule", "run_fleet"]
