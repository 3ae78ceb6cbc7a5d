"""``sealtorch bench keyserver``: a real dkeyserver (subprocess, TLS 1.3 on loopback) and N
concurrent sim-TEE clients doing challenge + release; reports releases/s, p50/p99 latency and
errors, plus the cost of one evidence verification, one HPKE seal and one grant signature,
all measured in the same run. Durability is not relaxed: every release burns its nonce and
commits its audit entries (SQLite synchronous=FULL) before the answer.

The load generator is a raw HTTP/1.1 keep-alive client over TLS (asyncio streams on uvloop,
one process per 64 connections), so that it takes little of the CPU it shares with the
server; its CPU per release is reported next to the server's (from /proc), and the release
rate is also given as a ratio of the server's bare HTTPS request rate (``GET /healthz`` at the
same concurrency: no database, no crypto), a release being two requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from sealtorch.bench import crypto_cpu

_SERVER = [sys.executable, "-c", "from sealtorch.keyserver.cli import main; main()"]


class _Http:
    """A minimal HTTP/1.1 keep-alive client over one TLS connection (asyncio streams): the load
    generator must cost the shared CPU as little as possible, so it pre-serialises requests
    and parses only the status line and Content-Length of each answer. Like a real cache, it
    resumes its last TLS session when it reconnects (``ctx`` a ``ResumingContext``)."""

    def __init__(self, host: str, port: int, ctx: Any) -> None:
        self.host, self.port, self.ctx = host, port, ctx
        self.reader: Any = None
        self.writer: Any = None
        self.session: Any = None  # the last session ticket this connection got
        self.opened = 0  # connections opened (TLS handshakes)
        self.resumed = 0  # of which resumed a session (no certificate exchange)
        self._fresh = False

    async def _open(self) -> None:
        import asyncio

        from sealtorch.protocol.tls import offering

        with offering(self.session):
            self.reader, self.writer = await asyncio.open_connection(
                self.host, self.port, ssl=self.ctx, server_hostname=self.host)
        self.opened += 1
        self._fresh = True

    async def request(self, method: bytes, path: bytes, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            await self._open()
        self.writer.write(b"%s %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
                          b"content-length: %d\r\n\r\n%s" % (method, path, self.host.encode(),
                                                             len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, close = 0, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
            elif name == b"transfer-encoding":
                raise ValueError("chunked answers are not expected from dkeyserver")
        data = await self.reader.readexactly(length)
        if self._fresh:  # TLS 1.3 tickets come after the handshake: read them with the answer
            self._fresh = False
            so = self.writer.get_extra_info("ssl_object")
            if so is not None:
                self.resumed += bool(so.session_reused)
                sess = so.session
                if sess is not None and sess.has_ticket:
                    self.session = sess
        if close:
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.reader = None


async def _load(url: str, ca: Path, pub: bytes, platform_key: Path, measurement: bytes,
                concurrency: int, seconds: float, mode: str = "release"
                ) -> tuple[list[float], int, float]:
    """``concurrency`` keep-alive connections each looping challenge + release (``mode``
    ``release``), ``GET /healthz`` (``mode`` ``ceiling``: the bare HTTPS request rate) or,
    after one release that enrols it as a cache, signed status polls (``mode`` ``status``)
    for ``seconds``; returns (latencies, errors, client CPU seconds)."""
    import asyncio
    import base64
    import json as _json
    from urllib.parse import urlsplit

    from sealtorch.attestation import binding
    from sealtorch.attestation.attesters.sim import SimAttester
    from sealtorch.protocol import hpke
    from sealtorch.protocol.messages import StatusRequest, status_key_info
    from sealtorch.protocol.release_client import tls_client_context
    from sealtorch.protocol.signing import key_id

    att = SimAttester(platform_key, measurement, role="dkeycache")
    audience = bytes.fromhex(key_id(pub))
    ctx = tls_client_context(ca)
    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", int(u.port or 443)
    lat: list[float] = []
    errors = 0
    cpu0 = time.process_time()
    deadline = time.perf_counter() + seconds

    async def release(h: _Http) -> tuple[bytes, Any, Any] | None:
        """One challenge + release; (nonce, private key, answer) or None."""
        st, data = await h.request(b"POST", b"/v1/challenge", b"{}")
        n = base64.b64decode(_json.loads(data)["nonce"])
        sk, pk = hpke.generate_keypair()
        ev = att.attest(binding.report_data("remote", n, hpke.KEM_ID, pk, audience))
        body = _json.dumps({
            "evidence": ev.to_dict(), "public_key": base64.b64encode(pk).decode(),
            "nonce": base64.b64encode(n).decode(), "models": ["bench-model"]},
            separators=(",", ":")).encode()
        st, data = await h.request(b"POST", b"/v1/release", body)
        answer = _json.loads(data) if st == 200 else None
        return (n, sk, answer) if answer is not None and len(answer["grants"]) == 1 else None

    async def enrolled(h: _Http) -> tuple[str, bytes]:
        """This connection's cache: its id and status key, from one release."""
        for _ in range(10):
            if (got := await release(h)) is not None:
                break
        else:
            raise click.ClickException("the bench's caches could not enrol: the key server "
                                       "refused 10 releases in a row")
        n, sk, answer = got
        sealed = base64.b64decode(answer["status_key"])
        with hpke.open(sealed, sk, status_key_info(answer["cache_id"], n)) as k:
            return answer["cache_id"], bytes(k.view())

    async def worker() -> None:
        nonlocal errors
        h = _Http(host, port, ctx)
        cache = await enrolled(h) if mode == "status" else None
        try:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    if mode == "ceiling":
                        st, _ = await h.request(b"GET", b"/healthz")
                        if st != 200:
                            errors += 1
                            continue
                        lat.append(time.perf_counter() - t0)
                        continue
                    if cache is not None:
                        req = StatusRequest(os.urandom(32), cache[0], ["bench-model"])
                        body = _json.dumps(req.authenticated(cache[1]).to_json()).encode()
                        st, _ = await h.request(b"POST", b"/v1/status", body)
                        if st != 200:
                            errors += 1
                            continue
                    elif await release(h) is None:
                        errors += 1
                        continue
                except (OSError, ValueError, KeyError, asyncio.IncompleteReadError):
                    errors += 1
                    await h.close()
                    continue
                lat.append(time.perf_counter() - t0)
        finally:
            await h.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat, errors, time.process_time() - cpu0


def _arun(coro: Any) -> Any:
    """Run ``coro`` on uvloop when available (cheaper client), else asyncio."""
    import asyncio

    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


#: concurrent connections per load-generator process (the raw client is cheap; fewer
#: processes leave more of the shared cores to the server)
CLIENTS_PER_PROCESS = 64


def _client_process(args: tuple[Any, ...], q: Any) -> None:
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning)
    q.put(_arun(_load(*args)))


def _load_processes(url: str, ca: Path, pub: bytes, platform_key: Path, measurement: bytes,
                    concurrency: int, seconds: float, mode: str = "release"
                    ) -> tuple[list[float], int, float]:
    """Spread ``concurrency`` clients over processes of at most
    :data:`CLIENTS_PER_PROCESS` connections each; returns (latencies, errors, client CPU s)."""
    import multiprocessing as mp

    nproc = -(-concurrency // CLIENTS_PER_PROCESS)
    if nproc == 1:
        return _arun(_load(url, ca, pub, platform_key, measurement, concurrency, seconds,
                           mode))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    shares = [concurrency // nproc + (1 if i < concurrency % nproc else 0) for i in range(nproc)]
    procs = [ctx.Process(target=_client_process,
                         args=((url, ca, pub, platform_key, measurement, c, seconds, mode), q))
             for c in shares]
    for p in procs:
        p.start()
    results = [q.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(30)
    lat = [x for r in results for x in r[0]]
    return lat, sum(r[1] for r in results), sum(r[2] for r in results)


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its child processes (server workers), from
    /proc; 0.0 where /proc is not available."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    try:
        for t in Path(f"/proc/{pid}/task").iterdir():
            kids = (t / "children").read_text().split()
            pids.extend(int(k) for k in kids)
    except OSError:
        pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return total


def pg_database(admin_url: str) -> tuple[str, Any]:
    """A fresh database on the server of ``admin_url`` (a PostgreSQL URL); returns its
    SQLAlchemy URL and a function that drops it."""
    import secrets

    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(admin_url)
    conninfo = u.set(drivername="postgresql").render_as_string(hide_password=False)
    name = "sealtorch_bench_" + secrets.token_hex(4)
    with psycopg.connect(conninfo, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(conninfo, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return u.set(drivername="postgresql+psycopg", database=name).render_as_string(
        hide_password=False), drop


def run_bench(db: str, concurrency: int, seconds: float, workers: int) -> dict[str, Any]:
    """Start a server, load it, return the figures."""
    import base64
    import warnings

    import httpx
    from cryptography.hazmat.primitives import serialization

    from sealtorch.attestation import sim
    from sealtorch.protocol.release_client import tls_client_context

    warnings.filterwarnings("ignore", category=RuntimeWarning)
    drop = None
    with tempfile.TemporaryDirectory(prefix="sealtorch-bench-") as tmp:
        d = Path(tmp) / "ks"
        args = ["init", "--data-dir", str(d), "--release-port", "0", "--admin-port", "0",
                "--sim", "--auto-approve", "--workers", str(workers)]
        if db != "sqlite":
            url, drop = pg_database(db)
            args += ["--db", url]
        subprocess.run([*_SERVER, *args], check=True, capture_output=True)
        log = open(Path(tmp) / "server.log", "wb")
        # every simulated cache connects from 127.0.0.1: lift the per-client rate limit (500
        # requests/s per address by default) so that it measures the server, not the limiter
        env = {**os.environ, "SEALTORCH_KS_RATE_PER_CLIENT": "1000000"}
        proc = subprocess.Popen([*_SERVER, "serve", "--data-dir", str(d)], stdout=log,
                                stderr=log, env=env)
        try:
            while not (d / "run.json").exists():
                if proc.poll() is not None:
                    raise click.ClickException("dkeyserver failed to start")
                time.sleep(0.05)
            ports = json.loads((d / "run.json").read_text())
            rel = f"https://127.0.0.1:{ports['release_port']}"
            adm = f"https://127.0.0.1:{ports['admin_port']}"
            ca = d / "tls" / "ca.crt"
            ctx = tls_client_context(ca)
            tok = (d / "admin.token").read_text().strip()
            hdr = {"Authorization": f"Bearer {tok}"}
            for _ in range(200):
                try:
                    if httpx.get(rel + "/readyz", verify=ctx).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.05)
            pk_path = sim.init_platform_key(Path(tmp) / "sim")
            meas = sim.measure("dkeycache")
            with httpx.Client(verify=ctx, headers=hdr) as h:
                h.post(adm + "/v1/admin/sim/platforms",
                       json={"public_key": (Path(tmp) / "sim" / sim.PUBLIC_FILE).read_text()}
                       ).raise_for_status()
                h.post(adm + "/v1/admin/models", json={
                    "model_id": "bench-model", "key": base64.b64encode(os.urandom(32)).decode()}
                ).raise_for_status()
                fp = sim.fingerprint(sim.load_platform_key(pk_path).public_key())
                h.put(adm + "/v1/admin/policy/bench-model", json={"policy": {
                    "version": 1, "caches": [{"tee": "sim", "measurement": meas.hex(),
                                              "platform_key": fp}]}}
                ).raise_for_status()
            pub = serialization.load_pem_public_key((d / "signing.pub").read_bytes())
            raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            _arun(_load(rel, ca, raw, pk_path, meas, min(concurrency, 16), 0.5))  # warm-up
            # the server's bare HTTPS ceiling (GET /healthz, no database, no crypto) at the
            # same concurrency: a release costs two requests, so half of it is the bound
            c0 = time.perf_counter()
            clat, _, _ = _load_processes(rel, ca, raw, pk_path, meas, concurrency,
                                         min(2.0, seconds), "ceiling")
            ceiling = len(clat) / (time.perf_counter() - c0)

            def phase(mode: str, secs: float) -> tuple[list[float], int, float, float, float,
                                                       crypto_cpu.Counts | None]:
                """One load phase: (latencies, errors, client CPU, seconds, server CPU, the
                crypto the server counted in itself: one process only, with more workers
                /metrics shows only the first)."""
                k0 = crypto_cpu.scrape(adm, ca) if workers == 1 else None
                s_cpu0 = _proc_cpu(proc.pid)
                t0 = time.perf_counter()
                lat, errors, client_cpu = _load_processes(rel, ca, raw, pk_path, meas,
                                                          concurrency, secs, mode)
                elapsed = time.perf_counter() - t0
                server_cpu = _proc_cpu(proc.pid) - s_cpu0
                counted = (crypto_cpu.minus(crypto_cpu.scrape(adm, ca), k0)
                           if k0 is not None else None)
                return lat, errors, client_cpu, elapsed, server_cpu, counted

            lat, errors, client_cpu, elapsed, server_cpu, in_server = phase("release", seconds)
            # status polls alone, at the same concurrency (each connection first enrols
            # as a cache with one release)
            plat, perrors, _, poll_elapsed, poll_cpu, poll_crypto = phase("status",
                                                                          min(3.0, seconds))
            micro = crypto_cpu.micro(pk_path, meas)
            idle_crypto = crypto_cpu.crypto_per_release(pk_path, meas)["crypto_per_release_us"]
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
            if drop:
                drop()
    lat.sort()
    plat.sort()

    def pct(p: float, xs: list[float] = lat) -> float:
        return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000 if xs else float("nan")

    n = max(len(lat), 1)
    rate = len(lat) / elapsed
    polls: dict[str, Any] = {
        "polls": len(plat), "polls_per_s": len(plat) / poll_elapsed,
        "poll_p50_ms": pct(0.50, plat), "poll_p99_ms": pct(0.99, plat), "poll_errors": perrors,
        "server_cpu_ms_per_poll": poll_cpu / max(len(plat), 1) * 1000}
    if poll_crypto is not None:
        counted = crypto_cpu.total(poll_crypto, routes=["status"])
        polls["crypto_in_server_us_per_poll"] = counted * 1e6 / max(len(plat), 1)
        if counted:
            polls["poll_server_cpu_over_crypto_in_server"] = poll_cpu / counted
    return {"db": "sqlite" if db == "sqlite" else "postgresql", "concurrency": concurrency,
            "workers": workers, "seconds": elapsed,
            "releases": len(lat), "releases_per_s": rate, "p50_ms": pct(0.50),
            "p99_ms": pct(0.99), "errors": errors,
            "server_cpu_ms_per_release": server_cpu / n * 1000,
            "client_cpu_ms_per_release": client_cpu / n * 1000,
            "http_ceiling_requests_per_s": ceiling,
            "ratio_to_http_ceiling": rate / (ceiling / 2) if ceiling else float("nan"),
            "crypto_cpu_us_per_release": idle_crypto,
            "server_cpu_over_crypto": server_cpu / n * 1e6 / idle_crypto,
            **crypto_cpu.figures(in_server, server_cpu, len(lat)),
            **polls, **micro}


def _counts(value: str | None) -> list[int] | None:
    """``--replicas 1,2,4`` -> [1, 2, 4]."""
    if value is None:
        return None
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        out = []
    if not out or not all(1 <= n <= 16 for n in out):
        raise click.BadParameter("give replica counts from 1 to 16, comma separated (1,2,4)",
                                 param_hint="--replicas")
    return out


@click.command("keyserver")
@click.option("--db", default="sqlite", show_default=True,
              help="sqlite, or a PostgreSQL URL of a role that may create databases "
                   "(postgresql+psycopg://USER@HOST:PORT/postgres): the bench creates and drops "
                   "a database of its own there")
@click.option("--replicas", default=None, metavar="N[,N..]",
              help="fleet mode: N dkeyserver replicas on the PostgreSQL of --db, one round "
                   "per N, one replica SIGKILLed and restarted mid-run")
@click.option("--caches", type=click.IntRange(1, 100_000), default=2000, show_default=True,
              help="fleet mode: simulated light caches")
@click.option("--speedup", type=click.FloatRange(1, 10_000), default=10.0, show_default=True,
              help="fleet mode: time compression of the caches' schedules (a 300 s lease "
                   "renewed at half and a 30 s status poll); past the servers' capacity every "
                   "cache is always behind and latency is the number of caches over the rate")
@click.option("--concurrency", type=int, default=16, show_default=True,
              help="concurrent release requests")
@click.option("--seconds", type=float, default=None,
              help="duration of each measurement [default: 5; fleet mode: 60 per round]")
@click.option("--workers", type=int, default=1, help="server release worker processes")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def command(db: str, replicas: str | None, caches: int, speedup: float, concurrency: int,
            seconds: float | None, workers: int, as_json: bool) -> None:
    """Release throughput and latency of a real dkeyserver under concurrent sim-TEE clients
    (with --replicas: several replicas on PostgreSQL under a fleet of simulated caches)."""
    counts = _counts(replicas)
    seconds = seconds if seconds is not None else (60.0 if counts else 5.0)
    pg = db.startswith(("postgresql://", "postgresql+psycopg://"))
    if not pg and db != "sqlite":
        raise click.BadParameter("give sqlite or a postgresql+psycopg://USER@HOST:PORT/DB URL",
                                 param_hint="--db")
    if counts is not None:
        if not pg:
            raise click.BadParameter("replicas share one PostgreSQL database: give its server "
                                     "as a postgresql+psycopg:// URL", param_hint="--db")
        from sealtorch.bench.fleet import Schedule, report_fleet, run_fleet

        fleet = run_fleet(db, counts, caches, seconds, Schedule(speedup=speedup),
                          progress=None if as_json else click.echo)
        click.echo(json.dumps(fleet, sort_keys=True) if as_json else report_fleet(fleet))
        return
    res = run_bench(db, concurrency, seconds, workers)
    if as_json:
        click.echo(json.dumps(res, sort_keys=True))
        return
    click.echo(f"dkeyserver ({res['db']}, {workers} worker(s), concurrency {concurrency}): "
               f"{res['releases_per_s']:.0f} releases/s, p50 {res['p50_ms']:.1f} ms, "
               f"p99 {res['p99_ms']:.1f} ms, errors {res['errors']}")
    click.echo(f"  CPU per release: server {res['server_cpu_ms_per_release']:.2f} ms, load "
               f"generator {res['client_cpu_ms_per_release']:.2f} ms; bare HTTPS ceiling "
               f"{res['http_ceiling_requests_per_s']:.0f} requests/s (a release is 2 requests): "
               f"releases at {res['ratio_to_http_ceiling']:.2f}x of that ceiling")
    click.echo(f"  server CPU per release {res['server_cpu_over_crypto']:.1f}x the crypto a "
               f"release needs ({res['crypto_cpu_us_per_release']:.0f} us of CPU: one evidence "
               "verification, two HPKE seals, three signatures)")
    click.echo(f"  one evidence verification {res['verify_evidence_us']:.0f} us, one HPKE seal "
               f"{res['hpke_seal_us']:.0f} us, one grant signature {res['grant_sign_us']:.0f} us"
               " (timed in an idle process after the load)")
    if res["server_cpu_over_crypto_in_server"] is not None:
        by_op = ", ".join(f"{op} {us:.0f}" for op, us in
                          res["crypto_in_server_us_per_release_by_op"].items())
        click.echo(f"  in the server while it served: "
                   f"{res['server_cpu_over_crypto_in_server']:.1f}x the crypto it counted "
                   f"({res['crypto_in_server_us_per_release']:.0f} us per release: {by_op}); "
                   f"{res['server_cpu_over_crypto_in_server_idle_ops']:.1f}x without the HMACs")
    ratio = res.get("poll_server_cpu_over_crypto_in_server")
    click.echo(f"  status polls alone: {res['polls_per_s']:.0f} polls/s, p50 "
               f"{res['poll_p50_ms']:.1f} ms, p99 {res['poll_p99_ms']:.1f} ms, errors "
               f"{res['poll_errors']}, server CPU {res['server_cpu_ms_per_poll']:.2f} ms per poll"
               + (f" ({ratio:.1f}x the crypto it counted)" if ratio else ""))
