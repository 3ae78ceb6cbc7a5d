"""``sealtorch bench keyserver``: a real dkeyserver (subprocess, TLS 1.3 on loopback) and N
concurrent sim-TEE clients doing challenge + release; reports releases/s, p50/p99 latency and
errors, plus the cost of one evidence verification, one HPKE seal and one grant signature,
all measured in the same run. Durability is not relaxed: every release burns its nonce and
commits its audit entries (SQLite synchronous=FULL) before the answer."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

_SERVER = [sys.executable, "-c", "from sealtorch.keyserver.cli import main; main()"]


def _per_op(fn: Any, budget: float = 0.3) -> float:
    """Mean seconds per call of ``fn`` over a short time budget."""
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget:
        fn()
        n += 1
    return (time.perf_counter() - start) / max(n, 1)


def _micro(platform_key: Path, measurement: bytes) -> dict[str, float]:
    import os

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sealtorch.attestation import binding, sim
    from sealtorch.attestation.attesters.sim import SimAttester
    from sealtorch.attestation.verifiers import VerifierSet
    from sealtorch.protocol import hpke
    from sealtorch.protocol.grant import Grant, sign_grant
    from sealtorch.protocol.signing import key_id

    att = SimAttester(platform_key, measurement, role="dkeycache")
    vs = VerifierSet(sim_platform_keys=[sim.load_platform_key(platform_key).public_key()])
    _, pk = hpke.generate_keypair()
    ev = att.attest(binding.report_data("remote", os.urandom(32), hpke.KEM_ID, pk, b"a" * 32))
    sk = Ed25519PrivateKey.generate()
    g = Grant("t", "m", 1, os.urandom(32), pk, hpke.KEM_ID, "00" * 32, "ab" * 16,
              {"version": 1}, 1, 300, 0, 0, key_id(sk))
    return {
        "verify_evidence_us": _per_op(lambda: vs.verify(ev)) * 1e6,
        "hpke_seal_us": _per_op(lambda: hpke.seal(b"k" * 32, pk, b"info")) * 1e6,
        "grant_sign_us": _per_op(lambda: sign_grant(sk, g)) * 1e6,
    }


def _pg_database() -> tuple[str, Any]:
    import psycopg

    name = "sealtorch_bench_" + secrets.token_hex(4)
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres",
                         autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres",
                             autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", drop


async def _load(url: str, ca: Path, pub: bytes, platform_key: Path, measurement: bytes,
                concurrency: int, seconds: float) -> tuple[list[float], int]:
    import asyncio
    import base64

    import httpx

    from sealtorch.attestation import binding
    from sealtorch.attestation.attesters.sim import SimAttester
    from sealtorch.keyserver.client import tls_client_context
    from sealtorch.protocol import hpke
    from sealtorch.protocol.signing import key_id

    att = SimAttester(platform_key, measurement, role="dkeycache")
    audience = bytes.fromhex(key_id(pub))
    lat: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, verify=tls_client_context(ca), timeout=30,
                                 limits=limits) as h:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    r = await h.post("/v1/challenge", json={})
                    n = base64.b64decode(r.json()["nonce"])
                    _, pk = hpke.generate_keypair()
                    ev = att.attest(binding.report_data("remote", n, hpke.KEM_ID, pk, audience))
                    r = await h.post("/v1/release", json={
                        "evidence": ev.to_dict(), "public_key": base64.b64encode(pk).decode(),
                        "nonce": base64.b64encode(n).decode(), "models": ["bench-model"]})
                    if r.status_code != 200 or len(r.json()["grants"]) != 1:
                        errors += 1
                        continue
                except (httpx.HTTPError, ValueError, KeyError):
                    errors += 1
                    continue
                lat.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat, errors


CLIENTS_PER_PROCESS = 16  # one asyncio httpx client degrades badly beyond ~16 connections


def _client_process(args: tuple[Any, ...], q: Any) -> None:
    import asyncio
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning)
    q.put(asyncio.run(_load(*args)))


def _load_processes(url: str, ca: Path, pub: bytes, platform_key: Path, measurement: bytes,
                    concurrency: int, seconds: float) -> tuple[list[float], int]:
    """Spread ``concurrency`` clients over processes of at most 16 concurrent requests each."""
    import asyncio
    import multiprocessing as mp

    nproc = -(-concurrency // CLIENTS_PER_PROCESS)
    if nproc == 1:
        return asyncio.run(_load(url, ca, pub, platform_key, measurement, concurrency, seconds))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    shares = [concurrency // nproc + (1 if i < concurrency % nproc else 0) for i in range(nproc)]
    procs = [ctx.Process(target=_client_process,
                         args=((url, ca, pub, platform_key, measurement, c, seconds), q))
             for c in shares]
    for p in procs:
        p.start()
    results = [q.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(30)
    lat = [x for r in results for x in r[0]]
    return lat, sum(r[1] for r in results)


def run_bench(db: str, concurrency: int, seconds: float, workers: int) -> dict[str, Any]:
    """Start a server, load it, return the figures."""
    import asyncio
    import base64
    import os
    import warnings

    import httpx
    from cryptography.hazmat.primitives import serialization

    from sealtorch.attestation import sim
    from sealtorch.keyserver.client import tls_client_context

    warnings.filterwarnings("ignore", category=RuntimeWarning)
    drop = None
    with tempfile.TemporaryDirectory(prefix="sealtorch-bench-") as tmp:
        d = Path(tmp) / "ks"
        args = ["init", "--data-dir", str(d), "--release-port", "0", "--admin-port", "0",
                "--sim", "--auto-approve", "--workers", str(workers)]
        if db == "postgresql":
            url, drop = _pg_database()
            args += ["--db", url]
        subprocess.run([*_SERVER, *args], check=True, capture_output=True)
        log = open(Path(tmp) / "server.log", "wb")
        proc = subprocess.Popen([*_SERVER, "serve", "--data-dir", str(d)], stdout=log,
                                stderr=log)
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
                h.put(adm + "/v1/admin/policy/bench-model", json={"policy": {
                    "version": 1, "caches": [{"tee": "sim", "measurement": meas.hex()}]}}
                ).raise_for_status()
            pub = serialization.load_pem_public_key((d / "signing.pub").read_bytes())
            raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            asyncio.run(_load(rel, ca, raw, pk_path, meas, min(concurrency, 16), 0.5))  # warm-up
            t0 = time.perf_counter()
            lat, errors = _load_processes(rel, ca, raw, pk_path, meas, concurrency, seconds)
            elapsed = time.perf_counter() - t0
            micro = _micro(pk_path, meas)
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
            if drop:
                drop()
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    return {"db": db, "concurrency": concurrency, "workers": workers, "seconds": elapsed,
            "releases": len(lat), "releases_per_s": len(lat) / elapsed, "p50_ms": pct(0.50),
            "p99_ms": pct(0.99), "errors": errors, **micro}


@click.command("keyserver")
@click.option("--db", type=click.Choice(["sqlite", "postgresql"]), default="sqlite")
@click.option("--concurrency", type=int, default=16)
@click.option("--seconds", type=float, default=5.0)
@click.option("--workers", type=int, default=1, help="server release worker processes")
@click.option("--json", "as_json", is_flag=True)
def command(db: str, concurrency: int, seconds: float, workers: int, as_json: bool) -> None:
    """Release throughput and latency of a real dkeyserver under concurrent sim-TEE clients."""
    res = run_bench(db, concurrency, seconds, workers)
    if as_json:
        click.echo(json.dumps(res, sort_keys=True))
        return
    click.echo(f"dkeyserver ({db}, {workers} worker(s), concurrency {concurrency}): "
               f"{res['releases_per_s']:.0f} releases/s, p50 {res['p50_ms']:.1f} ms, "
               f"p99 {res['p99_ms']:.1f} ms, errors {res['errors']}")
    click.echo(f"  one evidence verification {res['verify_evidence_us']:.0f} us, one HPKE seal "
               f"{res['hpke_seal_us']:.0f} us, one grant signature {res['grant_sign_us']:.0f} us")
