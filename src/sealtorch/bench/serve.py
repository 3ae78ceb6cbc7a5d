"""`sealtorch bench serve`: the inference server on a sealed ResNet-50 against the same server on
the plaintext model, in one run.

Both servers are the same code (:func:`sealtorch.runtime.app.build_app`) on loopback; the only
difference is where the weights came from: decrypted from a sealed file through the loader (with
a local key provider; the key path does not affect inference) or the plaintext module itself.
Concurrent clients send pre-encoded KServe v2 JSON requests; rounds alternate plaintext/sealed
(and which goes first) in adjacent pairs, so each pair sees the same machine load.
``rps_ratio`` is the median over pairs of sealed / plaintext requests per second (target
>= 0.95; robust to load from other processes); each side's median round is reported too.

``--e2e`` compares, on one sealed-model server behind the end-to-end middleware (sim TEE,
plaintext also allowed for the baseline), plaintext requests with attested, encrypted and
receipted ones sent by :class:`sealtorch.client.AttestedClient` (one attested session per
client thread, set up before timing): ``rps_ratio`` is e2e / plaintext requests per second and
``added_latency_ms`` the median over pairs of the p50 difference; ``crypto_ms`` is the
per-request cost of each end-to-end step measured alone on the same body. Each round also
reports the process CPU time per request (server and clients share this process), and
``cpu_ratio`` is plaintext / e2e CPU per request: what requests/s would be on a CPU-bound
server, and much less disturbed than wall time when other processes load the machine.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click

FACTORY = "sealtorch.models.resnet:resnet50"
Sender = Callable[[], Any]


def _plain_sender(url: str, body: bytes) -> Sender:
    """A sender posting ``body`` as plaintext JSON (one connection per sender)."""
    import httpx

    c = httpx.Client(timeout=300)

    def send() -> Any:
        r = c.post(url, content=body, headers={"content-type": "application/json"})
        if r.status_code != 200:
            raise click.ClickException(f"bench request failed: HTTP {r.status_code}")
        return r.json()["outputs"][0]["data"]

    send.close = c.close  # type: ignore[attr-defined]
    return send


def _e2e_sender(client: Any, body: bytes) -> Sender:
    """A sender of end-to-end requests on an attested client session."""
    def send() -> Any:
        return client.infer(body).json()["outputs"][0]["data"]

    return send


def _round(senders: Sequence[Sender], requests: int) -> dict[str, float]:
    """``requests`` requests spread over the senders, one thread each."""
    latencies: list[float] = []
    concurrency = len(senders)

    def worker(i: int) -> None:
        for _ in range(requests // concurrency + (1 if i < requests % concurrency else 0)):
            t = time.perf_counter()
            senders[i]()
            latencies.append(time.perf_counter() - t)

    t0, c0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    lat = sorted(latencies)
    p99 = lat[max(0, math.ceil(0.99 * len(lat)) - 1)]  # nearest-rank percentile
    return {"rps": len(lat) / wall, "p50_ms": statistics.median(lat) * 1000,
            "p99_ms": p99 * 1000, "requests": float(len(lat)),
            "cpu_ms_per_request": cpu * 1000 / len(lat)}


def resnet50_pair() -> tuple[Any, Any]:
    """The plaintext ResNet-50 (seed 0) and the same weights through seal + ``build_sealed``:
    what every serving benchmark compares."""
    from sealtorch.format.keyfile import generate_model_key
    from sealtorch.format.keys import KeyFileProvider
    from sealtorch.format.writer import seal
    from sealtorch.models.resnet import make_resnet50
    from sealtorch.runtime.model import build_sealed

    plain = make_resnet50(seed=0)
    with tempfile.TemporaryDirectory(prefix="sealtorch-bench-serve-") as d:
        key = generate_model_key("bench-resnet50")
        path = Path(d) / "resnet50.sealed"
        seal(plain, path, key)
        sealed = build_sealed(path, FACTORY, key_provider=KeyFileProvider(key),
                              allowed_factories=[FACTORY])
    return plain, sealed


def run_bench(*, requests: int, concurrency: int, max_batch: int, rounds: int,
              image: int, threads: int | None, e2e: bool = False) -> dict[str, Any]:
    """Run both servers (or, with ``e2e``, both kinds of request) and return the figures."""
    import torch

    from sealtorch.runtime.app import ServeOptions, build_app
    from sealtorch.runtime.localserver import LocalServer
    from sealtorch.runtime.model import ServedModel

    if threads:
        torch.set_num_threads(threads)
    plain, sealed = resnet50_pair()
    shape = (3, image, image)
    x = torch.randn((1, *shape), generator=torch.Generator().manual_seed(7))
    body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]}).encode()
    opts = ServeOptions(max_batch=max_batch, rate_per_second=0)
    if e2e:
        return _run_e2e(sealed, shape, body, opts, requests=requests, concurrency=concurrency,
                        rounds=rounds)
    servers = {
        "plaintext": LocalServer(build_app(ServedModel("resnet50", plain, input_shape=shape,
                                                       sealed=False), opts)),
        "sealed": LocalServer(build_app(ServedModel("resnet50", sealed, input_shape=shape),
                                        opts)),
    }
    results: dict[str, list[dict[str, float]]] = {"plaintext": [], "sealed": []}
    outputs: dict[str, Any] = {}
    senders: dict[str, list[Sender]] = {}
    try:
        for srv in servers.values():
            srv.start()
        for name, srv in servers.items():  # warm-up + the answer used for the identity check
            senders[name] = [_plain_sender(f"{srv.url}/v2/models/resnet50/infer", body)
                             for _ in range(concurrency)]
            outputs[name] = senders[name][0]()
        _alternate(senders, results, requests, rounds)
    finally:
        for ss in senders.values():
            for snd in ss:
                snd.close()  # type: ignore[attr-defined]
        for srv in servers.values():
            srv.stop()
    pairs = list(zip(results["plaintext"], results["sealed"], strict=True))
    return {
        "model": "resnet50", "input_shape": list(shape), "max_batch": max_batch,
        "concurrency": concurrency, "requests_per_round": requests, "rounds": rounds,
        "torch_threads": torch.get_num_threads(),
        "plaintext": _median_round(results["plaintext"]),
        "sealed": _median_round(results["sealed"]),
        "all_rounds": results,
        "rps_ratio": statistics.median(s["rps"] / p["rps"] for p, s in pairs),
        "p99_ratio": statistics.median(s["p99_ms"] / p["p99_ms"] for p, s in pairs),
        "target_rps_ratio": 0.95,
        "bit_identical": outputs["sealed"] == outputs["plaintext"],
    }


def _median_round(rs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rs) for k in rs[0]}


def _alternate(senders: dict[str, list[Sender]], results: dict[str, list[dict[str, float]]],
               requests: int, rounds: int) -> None:
    """Rounds of both sides in adjacent pairs, alternating which goes first (cancels drift),
    after one untimed round per side with one request per sender (the first forward passes on
    new threads are several times slower than the rest)."""
    a, b = list(senders)
    for name in (a, b):
        _round(senders[name], len(senders[name]))
    for i in range(rounds):
        for name in ((a, b) if i % 2 == 0 else (b, a)):
            results[name].append(_round(senders[name], requests))


def _run_e2e(module: Any, shape: tuple[int, ...], body: bytes, opts: Any, *, requests: int,
             concurrency: int, rounds: int) -> dict[str, Any]:
    """Plaintext vs end-to-end requests on one sealed-model server (see module docstring)."""
    import warnings

    import torch

    from sealtorch.attestation import sim
    from sealtorch.attestation.attesters.sim import SimAttester
    from sealtorch.attestation.binding import ServedIdentity
    from sealtorch.client import AttestedClient, ClientPolicy
    from sealtorch.runtime.app import build_app
    from sealtorch.runtime.attested import E2EMiddleware, Gateway
    from sealtorch.runtime.localserver import LocalServer
    from sealtorch.runtime.model import ServedModel

    identity = ServedIdentity(name="resnet50", model_id="bench-resnet50", key_version=1,
                              header_digest=bytes(32), policy_version=1, factory=FACTORY,
                              tenant="bench", server_key_id=bytes(32))
    results: dict[str, list[dict[str, float]]] = {"plaintext": [], "e2e": []}
    senders: dict[str, list[Sender]] = {}
    clients: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="sealtorch-bench-e2e-") as d, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # sim: said once in the output
        measurement = sim.measure("serve", b"bench")
        key_path = sim.init_platform_key(d)
        attester = SimAttester(key_path, measurement, role="serve")
        policy = ClientPolicy.from_dict({
            "format": "sealtorch-client-policy/v1",
            "runtimes": [{"tee": "sim", "measurement": measurement.hex(),
                          "platform_key": sim.fingerprint(
                              sim.load_platform_key(key_path).public_key())}],
            "models": [{"model_id": identity.model_id}],
            "owners": [{"server_key_id": identity.server_key_id.hex()}],
            "verifier": {"sim_platform_keys": [str(Path(d) / sim.PUBLIC_FILE)]}})
        app = build_app(ServedModel("resnet50", module, input_shape=shape), opts)
        gateway = Gateway(attester, [identity])
        srv = LocalServer(E2EMiddleware(app, gateway, allow_plaintext=True,
                                        max_request_bytes=app.state.max_body + 4096))
        try:
            srv.start()
            url = f"{srv.url}/v2/models/resnet50/infer"
            senders["plaintext"] = [_plain_sender(url, body) for _ in range(concurrency)]
            for _ in range(concurrency):
                c = AttestedClient(srv.url, policy, unsafe_sim=True, timeout=300)
                c.attest()
                clients.append(c)
            senders["e2e"] = [_e2e_sender(c, body) for c in clients]
            outputs = {name: ss[0]() for name, ss in senders.items()}  # warm-up
            _alternate(senders, results, requests, rounds)
            crypto = _crypto_costs(gateway, clients[0], body, clients[0].infer(body).body)
        finally:
            for snd in senders.get("plaintext", []):
                snd.close()  # type: ignore[attr-defined]
            for c in clients:
                c.close()
            srv.stop()
    pairs = list(zip(results["plaintext"], results["e2e"], strict=True))
    return {
        "model": "resnet50", "mode": "e2e", "tee": "sim", "input_shape": list(shape),
        "max_batch": opts.max_batch, "concurrency": concurrency,
        "requests_per_round": requests, "rounds": rounds,
        "torch_threads": torch.get_num_threads(), "request_bytes": len(body),
        "plaintext": _median_round(results["plaintext"]),
        "e2e": _median_round(results["e2e"]),
        "all_rounds": results,
        "rps_ratio": statistics.median(e["rps"] / p["rps"] for p, e in pairs),
        "p99_ratio": statistics.median(e["p99_ms"] / p["p99_ms"] for p, e in pairs),
        "added_latency_ms": statistics.median(e["p50_ms"] - p["p50_ms"] for p, e in pairs),
        "cpu_ratio": statistics.median(p["cpu_ms_per_request"] / e["cpu_ms_per_request"]
                                       for p, e in pairs),
        "crypto_ms": crypto,
        "target_rps_ratio": 0.95,
        "bit_identical": outputs["e2e"] == outputs["plaintext"],
    }


def _crypto_costs(gateway: Any, client: Any, body: bytes, answer: bytes, n: int = 30
                  ) -> dict[str, float]:
    """Median milliseconds of each end-to-end step on a request ``body`` and its ``answer``,
    measured alone (no HTTP, no inference)."""
    import hashlib

    from sealtorch.e2e import ohttp
    from sealtorch.e2e.receipt import check_receipt, verify_receipt

    server = client.server
    path = "/v2/models/resnet50/infer"
    steps: dict[str, list[float]] = {k: [] for k in (
        "client_encapsulate", "server_open", "server_seal_and_sign", "client_open",
        "client_verify_receipt")}
    for _ in range(n):
        t = [time.perf_counter()]
        data, ctx = ohttp.encapsulate_request(server.key_config, method="POST", path=path,
                                              model="resnet50", body=body,
                                              timestamp_ms=int(time.time() * 1000))
        t.append(time.perf_counter())
        opened = gateway.open(data, method="POST", path=path, name="resnet50")
        t.append(time.perf_counter())
        res = gateway.seal(opened, status=200, body=answer)
        t.append(time.perf_counter())
        inner = ohttp.decapsulate_response(ctx, res)
        t.append(time.perf_counter())
        claims = verify_receipt(inner.receipt, server.receipt_key)
        check_receipt(claims, nonce=ctx.nonce, identity=server.identity, target=f"POST {path}",
                      hpke_key_digest=server.hpke_key_digest,
                      request_digest=hashlib.sha256(body).digest(),
                      response_digest=hashlib.sha256(inner.body).digest())
        t.append(time.perf_counter())
        ctx.wipe()
        for name, a, b in zip(steps, t, t[1:], strict=False):
            steps[name].append((b - a) * 1000)
    out = {k: statistics.median(v) for k, v in steps.items()}
    out["total"] = sum(out.values())
    return out


@click.command("serve")
@click.option("--requests", default=24, show_default=True, type=click.IntRange(1),
              help="requests per round and side")
@click.option("--concurrency", default=8, show_default=True, type=click.IntRange(1, 256),
              help="concurrent clients")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="rows per forward pass of the server")
@click.option("--rounds", default=6, show_default=True, type=click.IntRange(1, 50),
              help="pairs of rounds (plaintext + sealed)")
@click.option("--image", default=224, show_default=True, type=click.IntRange(32, 1024),
              help="input height and width")
@click.option("--threads", default=None, type=click.IntRange(1, 1024), help="torch threads")
@click.option("--e2e", is_flag=True,
              help="compare end-to-end (attested, encrypted, receipted) requests with "
                   "plaintext ones on the sealed model (sim TEE)")
@click.option("--engine", default="sealtorch", show_default=True,
              type=click.Choice(["sealtorch", "kserve"]),
              help="kserve: the KServe predictor, sealed vs plaintext on one KServe server, "
                   "and vs `sealtorch serve` on the same sealed model (needs the kserve extra)")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def command(requests: int, concurrency: int, max_batch: int, rounds: int, image: int,
            threads: int | None, e2e: bool, engine: str, as_json: bool) -> None:
    """Inference server: sealed ResNet-50 vs plaintext, or end-to-end vs plaintext requests,
    or (--engine kserve) the KServe predictor (requests/s, p99), same run."""
    if engine == "kserve":
        if e2e:
            raise click.UsageError("--e2e measures `sealtorch serve`; leave out --engine kserve")
        from sealtorch.bench.serve_kserve import print_kserve, run_kserve_bench

        res = run_kserve_bench(requests=requests, concurrency=concurrency,
                               max_batch=max_batch, rounds=rounds, image=image, threads=threads)
        if as_json:
            click.echo(json.dumps(res, sort_keys=True))
        else:
            print_kserve(res)
        return
    res = run_bench(requests=requests, concurrency=concurrency, max_batch=max_batch,
                    rounds=rounds, image=image, threads=threads, e2e=e2e)
    if as_json:
        click.echo(json.dumps(res, sort_keys=True))
        return
    if e2e:
        _print_e2e(res)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"sealtorch serve: ResNet-50 {res['input_shape']}, max batch "
                    f"{max_batch}, {concurrency} clients, median of {rounds} round pairs")
    for col in ("server", "requests/s", "p50 ms", "p99 ms"):
        t.add_column(col, justify="right" if col != "server" else "left")
    for name in ("plaintext", "sealed"):
        r = res[name]
        t.add_row(name, f"{r['rps']:.2f}", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}")
    console = Console(highlight=False)
    console.print(t)
    ok = res["rps_ratio"] >= res["target_rps_ratio"]
    console.print(f"sealed/plaintext requests/s: {res['rps_ratio']:.3f} (target >= 0.95: "
                  f"{'met' if ok else 'NOT met'}); p99 ratio {res['p99_ratio']:.3f}; outputs "
                  f"{'bit-identical' if res['bit_identical'] else 'DIFFERENT'}")


def _print_e2e(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"sealtorch serve end to end: ResNet-50 {res['input_shape']}, max batch "
                    f"{res['max_batch']}, {res['concurrency']} clients, median of "
                    f"{res['rounds']} round pairs (sim TEE)")
    for col in ("requests", "requests/s", "p50 ms", "p99 ms"):
        t.add_column(col, justify="right" if col != "requests" else "left")
    for name in ("plaintext", "e2e"):
        r = res[name]
        t.add_row(name, f"{r['rps']:.2f}", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}")
    console = Console(highlight=False)
    console.print(t)
    ok = res["rps_ratio"] >= res["target_rps_ratio"]
    crypto = ", ".join(f"{k} {v:.2f}" for k, v in res["crypto_ms"].items())
    console.print(f"e2e/plaintext requests/s: {res['rps_ratio']:.3f} (target >= 0.95: "
                  f"{'met' if ok else 'NOT met'}); CPU per request plaintext/e2e "
                  f"{res['cpu_ratio']:.3f}; added p50 latency "
                  f"{res['added_latency_ms']:.1f} ms; crypto per request (ms): {crypto}; "
                  f"outputs {'bit-identical' if res['bit_identical'] else 'DIFFERENT'}")
