"""``sealtorch bench keycache``: local key fetch latency and throughput of dkeycache.

A real cache (lease manager, Unix socket server, sim local attestation, HPKE sealing, file-key
derivation and commitment check) runs in a child process; its upstream is an in-process signer
that issues real signed grants, because the key server is not on the measured path of a local
fetch (``sealtorch bench keyserver`` covers it). Runtimes are real :class:`KeyCacheClient`s that
verify every relayed grant. Reports session set-up time, fetch p50/p99 on an established
session and requests/s with 1 and 16 concurrent clients, over the Unix socket or (``--transport
tcp``) the loopback TCP listener that SGX deployments use between enclaves.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import click

MODEL = "bench-model"


class _SigningUpstream:
    """Issues real signed grants and status documents in-process (benchmark harness only)."""

    def __init__(self, signing_key: Any, model_key: bytes, policy: dict[str, Any]) -> None:
        from sealtorch.protocol.grant import GrantVerifier

        self._sk = signing_key
        self._model_key = model_key
        self._policy = policy
        self.verifier = GrantVerifier(signing_key.public_key())

    @property
    def audience(self) -> bytes:
        return bytes.fromhex(self.verifier.server_key_id)

    def challenge(self) -> bytes:
        return os.urandom(32)

    def release(self, evidence: Any, public_key: bytes, nonce: bytes,
                models: list[str] | None = None, *, private_key: Any = None) -> Any:
        from sealtorch.protocol import hpke
        from sealtorch.protocol.grant import AuditHead, Grant, sign_audit_head, sign_grant
        from sealtorch.protocol.release_client import ReleasedKey, ReleaseResult

        sid = self.verifier.server_key_id
        g = Grant("bench", MODEL, 1, nonce, public_key, hpke.KEM_ID, evidence.digest().hex(),
                  "b" * 32, self._policy, self._policy["version"],
                  self._policy["lease_seconds"], 0, int(time.time()), sid)
        doc = sign_grant(self._sk, g)
        sealed = hpke.seal(self._model_key, public_key, g.digest())
        grant = self.verifier.verify(doc, nonce=nonce, requester_key=public_key)
        key = self.verifier.open_key(grant, sealed, private_key)
        head = sign_audit_head(self._sk, AuditHead(1, "00" * 32, int(time.time()), sid))
        return ReleaseResult([ReleasedKey(grant, doc, sealed, key)], {},
                             self.verifier.verify_audit_head(head), head, "b" * 32, "approved")

    def status(self, cache_id: str, models: list[str] | None = None) -> Any:
        from sealtorch.protocol.grant import ModelStatus, Status, sign_status

        nonce = os.urandom(32)
        st = Status(nonce, cache_id, 0, "approved",
                    {m: ModelStatus("active", (1,), self._policy["version"])
                     for m in models or []}, int(time.time()), self.verifier.server_key_id)
        return self.verifier.verify_status(sign_status(self._sk, st), nonce=nonce,
                                           cache_id=cache_id)


def _cache_child(work: str, sock: str, signing_key_raw: bytes, model_key: bytes,
                 policy: dict[str, Any], cfg: bytes, ready: Any, stop: Any,
                 tcp_port: Any) -> None:
    """Child process: run a real cache until ``stop`` is set."""
    warnings.simplefilter("ignore", RuntimeWarning)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sealtorch.attestation import sim
    from sealtorch.attestation.attesters.sim import SimAttester
    from sealtorch.keycache.config import parse_config
    from sealtorch.keycache.service import start_cache

    os.environ["SEALTORCH_SIM_DIR"] = work
    config = parse_config(cfg)
    up = _SigningUpstream(Ed25519PrivateKey.from_private_bytes(signing_key_raw), model_key,
                          policy)
    att = SimAttester(Path(work) / sim.KEY_FILE, sim.measure("dkeycache", cfg), role="dkeycache")
    cache = start_cache(config, att, upstream=up, socket_path=sock)
    if cache.server.tcp_address is not None:
        tcp_port.value = cache.server.tcp_address.port
    ready.set()
    stop.wait()
    cache.stop()


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def run(fetches: int = 2000, sessions: int = 20, concurrency: int = 16,
        transport: str = "unix") -> dict[str, Any]:
    """Run the benchmark and return its figures (milliseconds and requests/s).

    ``transport`` is ``unix`` (the socket) or ``tcp`` (the cache's loopback TCP listener).
    """
    if transport not in ("unix", "tcp"):
        raise ValueError("transport must be 'unix' or 'tcp'")
    import multiprocessing as mp

    import torch
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sealtorch.attestation import sim
    from sealtorch.attestation.attesters.sim import SimAttester
    from sealtorch.attestation.policy import ModelPolicy
    from sealtorch.format import keyfile
    from sealtorch.format.writer import seal
    from sealtorch.keycache.client import KeyCacheClient
    from sealtorch.protocol.b64 import b64e

    warnings.simplefilter("ignore", RuntimeWarning)
    work = tempfile.mkdtemp(prefix="kcbench-")  # short: the cache's Unix socket lives here
    sim.init_platform_key(work)
    sock = os.path.join(work, "kc.sock")
    sk = Ed25519PrivateKey.generate()
    pub = b64e(sk.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw))
    cfg = (f'[keycache]\nkeyserver_url = "https://127.0.0.1:1"\nserver_public_key = "{pub}"\n'
           f'socket = "{sock}"\npoll_interval = 3600\n'
           + ('tcp_listen = "127.0.0.1:0"\n' if transport == "tcp" else "")).encode()
    fp = sim.fingerprint(sim.load_platform_key(Path(work) / sim.KEY_FILE).public_key())
    rt = SimAttester(Path(work) / sim.KEY_FILE, sim.measure("runtime"), role="runtime")
    ident = {"tee": "sim", "platform_key": fp}
    policy = ModelPolicy.from_dict({
        "version": 1, "lease_seconds": 3600, "max_releases_per_lease": 2**31,
        "caches": [dict(ident, measurement=sim.measure("dkeycache", cfg).hex())],
        "runtimes": [dict(ident, measurement=rt.measurement.hex())],
    }).to_dict()
    mk = keyfile.generate_model_key(MODEL, 1)
    header = seal({"w": torch.zeros(16)}, Path(work) / "m.sealed", mk)

    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    tcp_port = ctx.Value("i", 0)
    raw_sk = sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                              serialization.NoEncryption())
    child = ctx.Process(target=_cache_child, args=(work, sock, raw_sk, bytes(mk.key), policy,
                                                   cfg, ready, stop, tcp_port), daemon=True)
    child.start()
    try:
        if not ready.wait(120):
            raise RuntimeError("benchmark cache did not start")
        address = sock if transport == "unix" else f"tcp://127.0.0.1:{tcp_port.value}"

        def client() -> KeyCacheClient:
            return KeyCacheClient(address, server_public_key=pub, attester=rt)

        setup: list[float] = []
        for _ in range(sessions):
            c = client()
            t0 = time.perf_counter()
            c.connect()
            setup.append((time.perf_counter() - t0) * 1e3)
            c.close()

        def fetch_loop(n: int, out: list[float]) -> None:
            with client() as c:
                c.file_key(header).wipe()  # session established before timing
                for _ in range(n):
                    t0 = time.perf_counter()
                    c.file_key(header).wipe()
                    out.append((time.perf_counter() - t0) * 1e3)

        one: list[float] = []
        t0 = time.perf_counter()
        fetch_loop(fetches, one)
        rps1 = fetches / (time.perf_counter() - t0)

        per = max(1, fetches // concurrency)
        many: list[list[float]] = [[] for _ in range(concurrency)]
        threads = [threading.Thread(target=fetch_loop, args=(per, many[i]))
                   for i in range(concurrency)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rps16 = per * concurrency / (time.perf_counter() - t0)
        flat = [x for xs in many for x in xs]
    finally:
        stop.set()
        child.join(15)
        shutil.rmtree(work, ignore_errors=True)  # platform key, sealed file, socket
    return {
        "fetches": fetches,
        "transport": transport,
        "session_setup_ms": round(statistics.median(setup), 3),
        "fetch_p50_ms": round(_pct(one, 0.50), 3),
        "fetch_p99_ms": round(_pct(one, 0.99), 3),
        "requests_per_s_1": round(rps1, 1),
        "concurrency": concurrency,
        "fetch_p50_ms_concurrent": round(_pct(flat, 0.50), 3),
        "fetch_p99_ms_concurrent": round(_pct(flat, 0.99), 3),
        "requests_per_s_concurrent": round(rps16, 1),
        "target_fetch_p50_ms": 2.0,
        "meets_target": _pct(one, 0.50) < 2.0,
    }


@click.command("keycache")
@click.option("--fetches", default=2000, show_default=True, help="fetches per measurement")
@click.option("--sessions", default=20, show_default=True, help="session set-ups to time")
@click.option("--concurrency", default=16, show_default=True, help="concurrent clients")
@click.option("--transport", default="unix", show_default=True,
              type=click.Choice(["unix", "tcp"]),
              help="Unix socket, or the loopback TCP listener (tcp_listen, for SGX)")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def command(fetches: int, sessions: int, concurrency: int, transport: str,
            as_json: bool) -> None:
    """Key fetch p50/p99 and requests/s through dkeycache (1 and N clients), session set-up."""
    res = run(fetches=fetches, sessions=sessions, concurrency=concurrency, transport=transport)
    if as_json:
        click.echo(json.dumps(res, sort_keys=True))
        return
    click.echo(f"transport           {transport}")
    click.echo(f"session set-up      {res['session_setup_ms']:.2f} ms (median)")
    click.echo(f"fetch, 1 client     p50 {res['fetch_p50_ms']:.3f} ms  p99 "
               f"{res['fetch_p99_ms']:.3f} ms  {res['requests_per_s_1']:.0f} req/s")
    click.echo(f"fetch, {concurrency} clients   p50 {res['fetch_p50_ms_concurrent']:.3f} ms  "
               f"p99 {res['fetch_p99_ms_concurrent']:.3f} ms  "
               f"{res['requests_per_s_concurrent']:.0f} req/s")
    click.echo(f"target p50 < 2 ms: {'met' if res['meets_target'] else 'NOT met'}")
