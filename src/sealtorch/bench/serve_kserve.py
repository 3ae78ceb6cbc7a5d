"""`sealtorch bench serve --engine kserve`: the KServe predictor on a sealed ResNet-50 against
the plaintext model on the same KServe server, and against `sealtorch serve` on the same sealed
model, in one run.

Two server processes (so neither shares the GIL with the clients or with each other): KServe's
model server (:class:`sealtorch.kserve.model.OIPModel`) serving ``plaintext`` and ``sealed``
(weights decrypted from a sealed file with a local key provider; the key path does not affect
inference), and `sealtorch serve`'s app (uvicorn) serving the same sealed model. Both take the
same torch threads and max batch. Concurrent clients send the same pre-encoded JSON request;
rounds rotate through the three sides (and which goes first), so each group of rounds sees the
same machine load. ``rps_ratio`` is the median over groups of KServe sealed / plaintext
requests per second (target >= 0.95); ``kserve_vs_serve_rps_ratio`` KServe sealed /
`sealtorch serve` sealed. Each round also records its server process's CPU time per request:
``cpu_ratio`` (KServe plaintext / sealed) and ``kserve_vs_serve_cpu_ratio`` (`sealtorch serve`
/ KServe) are what requests/s would be on a CPU-bound server, and much less disturbed than wall
time when other processes load the machine.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIDES = ("kserve_plaintext", "kserve_sealed", "serve_sealed")
_ENV = "SEALTORCH_BENCH_SERVER"
_CPU = "server_cpu_ms_per_request"


def server_main() -> None:
    """A benchmark server process (settings in ``$SEALTORCH_BENCH_SERVER``)."""
    import torch

    cfg = json.loads(os.environ[_ENV])
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    from sealtorch.bench.serve import resnet50_pair

    plain, sealed = resnet50_pair()
    shape = (3, cfg["image"], cfg["image"])
    if cfg["engine"] == "serve":
        import uvicorn

        from sealtorch.runtime.app import ServeOptions, build_app
        from sealtorch.runtime.model import ServedModel

        app = build_app(ServedModel("sealed", sealed, input_shape=shape),
                        ServeOptions(max_batch=cfg["max_batch"], rate_per_second=0))
        uvicorn.run(app, host="127.0.0.1", port=cfg["port"], log_level="warning")
        return
    sys.argv = [sys.argv[0]]  # kserve parses sys.argv when imported
    from kserve import ModelServer

    from sealtorch.kserve.model import OIPModel
    from sealtorch.runtime.codec import TensorSpec

    models = []
    for name, module in (("plaintext", plain), ("sealed", sealed)):
        m = OIPModel(name, inputs=[TensorSpec("input", "FP32", shape)],
                     max_batch=cfg["max_batch"])
        m.serve(module, sealed=name == "sealed")
        models.append(m)
    ModelServer(http_port=cfg["port"], enable_grpc=False, workers=1,
                enable_latency_logging=False).start(models)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(engine: str, *, image: int, max_batch: int, threads: int | None,
           log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = dict(os.environ, **{_ENV: json.dumps({"engine": engine, "port": port, "image": image,
                                                "max_batch": max_batch, "threads": threads})})
    with open(log, "wb") as f:
        p = subprocess.Popen([sys.executable, "-c", "from sealtorch.bench.serve_kserve import "
                              "server_main; server_main()"], stdout=f, stderr=f, env=env,
                             stdin=subprocess.DEVNULL)
    return p, f"http://127.0.0.1:{port}"


def _wait(p: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 300) -> None:
    import httpx

    from sealtorch.runtime.world import check_starting

    deadline = time.monotonic() + timeout
    while True:
        check_starting(p, f"the benchmark server at {url}", log, deadline)
        try:
            if httpx.get(url + "/v2/health/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rotate(senders: dict[str, Any], pids: dict[str, int],
            results: dict[str, list[dict[str, float]]], requests: int, rounds: int) -> None:
    """One untimed round per side, then ``rounds`` groups of one round per side, the order
    rotating from group to group (cancels drift). Each round also records the CPU time its
    server process spent per request (one side runs at a time, so it is that side's)."""
    from sealtorch.bench.serve import _round

    names = list(senders)
    for name in names:
        _round(senders[name], len(senders[name]))
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            c0 = _cpu_seconds(pids[name])
            r = _round(senders[name], requests)
            r["server_cpu_ms_per_request"] = (_cpu_seconds(pids[name]) - c0) * 1000 / requests
            results[name].append(r)


def run_kserve_bench(*, requests: int, concurrency: int, max_batch: int, rounds: int,
                     image: int, threads: int | None) -> dict[str, Any]:
    """Start both servers, run the rounds, return the figures."""
    import torch

    from sealtorch.bench.serve import _median_round, _plain_sender

    x = torch.randn((1, 3, image, image), generator=torch.Generator().manual_seed(7))
    body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]}).encode()
    results: dict[str, list[dict[str, float]]] = {s: [] for s in SIDES}
    senders: dict[str, list[Any]] = {}
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="sealtorch-bench-kserve-") as d:
        try:
            servers = {}
            for engine in ("kserve", "serve"):
                log = Path(d) / f"{engine}.log"
                p, url = _start(engine, image=image, max_batch=max_batch, threads=threads,
                                log=log)
                procs.append(p)
                servers[engine] = (p, url, log)
            for p, url, log in servers.values():
                _wait(p, url, log)
            urls = {"kserve_plaintext": f"{servers['kserve'][1]}/v2/models/plaintext/infer",
                    "kserve_sealed": f"{servers['kserve'][1]}/v2/models/sealed/infer",
                    "serve_sealed": f"{servers['serve'][1]}/v2/models/sealed/infer"}
            for side, url in urls.items():
                senders[side] = [_plain_sender(url, body) for _ in range(concurrency)]
            outputs = {side: ss[0]() for side, ss in senders.items()}
            pids = {side: servers[side.split("_")[0]][0].pid for side in SIDES}
            _rotate(senders, pids, results, requests, rounds)
        finally:
            for ss in senders.values():
                for snd in ss:
                    snd.close()
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
    groups = list(zip(*(results[s] for s in SIDES), strict=True))
    return {
        "engine": "kserve", "model": "resnet50", "input_shape": [3, image, image],
        "max_batch": max_batch, "concurrency": concurrency, "requests_per_round": requests,
        "rounds": rounds, "torch_threads": threads or torch.get_num_threads(),
        **{s: _median_round(results[s]) for s in SIDES},
        "all_rounds": results,
        "rps_ratio": statistics.median(ks["rps"] / kp["rps"] for kp, ks, _ in groups),
        "p99_ratio": statistics.median(ks["p99_ms"] / kp["p99_ms"] for kp, ks, _ in groups),
        "kserve_vs_serve_rps_ratio": statistics.median(ks["rps"] / ss["rps"]
                                                       for _, ks, ss in groups),
        "kserve_vs_serve_p50_ratio": statistics.median(ks["p50_ms"] / ss["p50_ms"]
                                                       for _, ks, ss in groups),
        "cpu_ratio": statistics.median(kp[_CPU] / ks[_CPU] for kp, ks, _ in groups),
        "kserve_vs_serve_cpu_ratio": statistics.median(ss[_CPU] / ks[_CPU]
                                                       for _, ks, ss in groups),
        "target_rps_ratio": 0.95,
        "bit_identical": outputs["kserve_sealed"] == outputs["kserve_plaintext"]
        == outputs["serve_sealed"],
    }


def print_kserve(res: dict[str, Any]) -> None:
    """The table and the ratios, for people."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"KServe predictor vs sealtorch serve: ResNet-50 {res['input_shape']}, max "
                    f"batch {res['max_batch']}, {res['concurrency']} clients, median of "
                    f"{res['rounds']} round groups")
    for col in ("server", "requests/s", "p50 ms", "p99 ms", "server CPU ms/request"):
        t.add_column(col, justify="right" if col != "server" else "left")
    for side in SIDES:
        r = res[side]
        t.add_row(side.replace("_", " "), f"{r['rps']:.2f}", f"{r['p50_ms']:.0f}",
                  f"{r['p99_ms']:.0f}", f"{r[_CPU]:.0f}")
    console = Console(highlight=False)
    console.print(t)
    ok = res["rps_ratio"] >= res["target_rps_ratio"]
    console.print(f"KServe sealed/plaintext requests/s: {res['rps_ratio']:.3f} (target >= 0.95: "
                  f"{'met' if ok else 'NOT met'}); KServe/sealtorch serve requests/s (sealed): "
                  f"{res['kserve_vs_serve_rps_ratio']:.3f}; server CPU per request, KServe "
                  f"plaintext/sealed {res['cpu_ratio']:.3f}, sealtorch serve/KServe "
                  f"{res['kserve_vs_serve_cpu_ratio']:.3f}; outputs "
                  f"{'bit-identical' if res['bit_identical'] else 'DIFFERENT'}")
