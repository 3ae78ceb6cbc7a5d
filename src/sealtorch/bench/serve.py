"""`sealtorch bench serve`: the inference server on a sealed ResNet-50 against the same server on
the plaintext model, in one run.

Both servers are the same code (:func:`sealtorch.runtime.app.build_app`) on loopback; the only
difference is where the weights came from: decrypted from a sealed file through the loader (with
a local key provider; the key path does not affect inference) or the plaintext module itself.
Concurrent clients send pre-encoded KServe v2 JSON requests; rounds alternate plaintext/sealed
(and which goes first) in adjacent pairs, so each pair sees the same machine load.
``rps_ratio`` is the median over pairs of sealed / plaintext requests per second (target
>= 0.95; robust to load from other processes); each side's median round is reported too.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click

FACTORY = "sealtorch.models.resnet:resnet50"


def _round(url: str, body: bytes, requests: int, concurrency: int) -> dict[str, float]:
    import httpx

    latencies: list[float] = []

    def worker(n: int) -> None:
        with httpx.Client(timeout=300) as c:
            for _ in range(n):
                t = time.perf_counter()
                r = c.post(url, content=body, headers={"content-type": "application/json"})
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200:
                    raise click.ClickException(f"bench request failed: HTTP {r.status_code}")

    per = [requests // concurrency + (1 if i < requests % concurrency else 0)
           for i in range(concurrency)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(worker, per))
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    p99 = lat[max(0, math.ceil(0.99 * len(lat)) - 1)]  # nearest-rank percentile
    return {"rps": len(lat) / wall, "p50_ms": statistics.median(lat) * 1000,
            "p99_ms": p99 * 1000, "requests": float(len(lat))}


def run_bench(*, requests: int, concurrency: int, max_batch: int, rounds: int,
              image: int, threads: int | None) -> dict[str, Any]:
    """Run both servers and return the figures (see module docstring)."""
    import httpx
    import torch

    from sealtorch.format.keyfile import generate_model_key
    from sealtorch.format.keys import KeyFileProvider
    from sealtorch.format.writer import seal
    from sealtorch.models.resnet import make_resnet50
    from sealtorch.runtime.app import ServeOptions, build_app
    from sealtorch.runtime.localserver import LocalServer
    from sealtorch.runtime.model import ServedModel, build_sealed

    if threads:
        torch.set_num_threads(threads)
    plain = make_resnet50(seed=0)
    shape = (3, image, image)
    with tempfile.TemporaryDirectory(prefix="sealtorch-bench-serve-") as d:
        key = generate_model_key("bench-resnet50")
        path = Path(d) / "resnet50.sealed"
        seal(plain, path, key)
        sealed = build_sealed(path, FACTORY, key_provider=KeyFileProvider(key),
                              allowed_factories=[FACTORY])
    x = torch.randn((1, *shape), generator=torch.Generator().manual_seed(7))
    body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]}).encode()
    opts = ServeOptions(max_batch=max_batch, rate_per_second=0)
    servers = {
        "plaintext": LocalServer(build_app(ServedModel("resnet50", plain, input_shape=shape,
                                                       sealed=False), opts)),
        "sealed": LocalServer(build_app(ServedModel("resnet50", sealed, input_shape=shape),
                                        opts)),
    }
    results: dict[str, list[dict[str, float]]] = {"plaintext": [], "sealed": []}
    outputs: dict[str, Any] = {}
    try:
        for srv in servers.values():
            srv.start()
        for name, srv in servers.items():  # warm-up + the answer used for the identity check
            r = httpx.post(f"{srv.url}/v2/models/resnet50/infer", content=body, timeout=300,
                           headers={"content-type": "application/json"})
            outputs[name] = r.json()["outputs"][0]["data"]
        for i in range(rounds):  # alternate which side goes first, to cancel drift
            for name in (("plaintext", "sealed") if i % 2 == 0 else ("sealed", "plaintext")):
                url = f"{servers[name].url}/v2/models/resnet50/infer"
                results[name].append(_round(url, body, requests, concurrency))
    finally:
        for srv in servers.values():
            srv.stop()
    def median_round(rs: list[dict[str, float]]) -> dict[str, float]:
        return {k: statistics.median(r[k] for r in rs) for k in rs[0]}

    pairs = list(zip(results["plaintext"], results["sealed"], strict=True))
    return {
        "model": "resnet50", "input_shape": list(shape), "max_batch": max_batch,
        "concurrency": concurrency, "requests_per_round": requests, "rounds": rounds,
        "torch_threads": torch.get_num_threads(),
        "plaintext": median_round(results["plaintext"]),
        "sealed": median_round(results["sealed"]),
        "all_rounds": results,
        "rps_ratio": statistics.median(s["rps"] / p["rps"] for p, s in pairs),
        "p99_ratio": statistics.median(s["p99_ms"] / p["p99_ms"] for p, s in pairs),
        "target_rps_ratio": 0.95,
        "bit_identical": outputs["sealed"] == outputs["plaintext"],
    }


@click.command("serve")
@click.option("--requests", default=24, show_default=True, type=click.IntRange(1),
              help="requests per round and side")
@click.option("--concurrency", default=8, show_default=True, type=click.IntRange(1, 256))
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 1024))
@click.option("--rounds", default=6, show_default=True, type=click.IntRange(1, 50),
              help="pairs of rounds (plaintext + sealed)")
@click.option("--image", default=224, show_default=True, type=click.IntRange(32, 1024),
              help="input height and width")
@click.option("--threads", default=None, type=click.IntRange(1, 1024), help="torch threads")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def command(requests: int, concurrency: int, max_batch: int, rounds: int, image: int,
            threads: int | None, as_json: bool) -> None:
    """Inference server: sealed ResNet-50 vs plaintext (requests/s, p99), same run."""
    res = run_bench(requests=requests, concurrency=concurrency, max_batch=max_batch,
                    rounds=rounds, image=image, threads=threads)
    if as_json:
        click.echo(json.dumps(res, sort_keys=True))
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
