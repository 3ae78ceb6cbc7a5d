"""The KServe v2 app on a real loopback server: outputs, batching, bad requests, limits."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from tests.runtime.conftest import (
    FACTORY,
    SMALL_SHAPE,
    Sealed,
    infer_body,
    output_tensor,
    sample,
)

from sealtorch.format.keys import KeyFileProvider
from sealtorch.runtime.app import ServeOptions, build_app
from sealtorch.runtime.batcher import Batcher, reference_forward
from sealtorch.runtime.localserver import LocalServer
from sealtorch.runtime.model import ServedModel, build_sealed

MAX_BATCH = 4


@pytest.fixture(scope="module")
def sealed_module(sealed_resnet: Sealed) -> torch.nn.Module:
    return build_sealed(sealed_resnet.path, FACTORY,
                        key_provider=KeyFileProvider(sealed_resnet.key),
                        allowed_factories=[FACTORY])


@pytest.fixture(scope="module")
def server(sealed_module: torch.nn.Module):
    model = ServedModel("resnet50", sealed_module, input_shape=SMALL_SHAPE)
    opts = ServeOptions(max_batch=MAX_BATCH, rate_per_second=1000, rate_burst=1000)
    with LocalServer(build_app(model, opts)) as srv:
        yield srv


def test_health_and_metadata(server: LocalServer) -> None:
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True}
        assert c.get("/v2/models/resnet50/ready").json() == {"name": "resnet50", "ready": True}
        meta = c.get("/v2/models/resnet50").json()
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32",
                                   "shape": [-1, *SMALL_SHAPE]}]
        assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 1000]}]
        assert c.get("/v2").json()["name"] == "sealtorch"
        assert c.get("/v2/models/other").status_code == 404
        assert c.get("/v2/models/resnet50/versions/1/ready").status_code == 200
        assert c.get("/v2/models/resnet50/versions/2/ready").status_code == 404


def test_concurrent_requests_match_plaintext_bit_for_bit(
    server: LocalServer, sealed_resnet: Sealed
) -> None:
    """Concurrent good and bad requests; every good answer equals the plaintext model's."""
    good = {i: sample(1 + i % 3, seed=100 + i) for i in range(10)}
    bad_bodies = [
        b"{not json",
        json.dumps(infer_body(sample(1, 1, (3, 32, 32)))).encode(),            # wrong shape
        json.dumps({"inputs": [{**infer_body(sample(1, 2))["inputs"][0],
                                "datatype": "INT64"}]}).encode(),               # wrong dtype
        json.dumps(infer_body(sample(MAX_BATCH + 1, 3))).encode(),              # batch too big
        json.dumps(infer_body(sample(1, 4), name="x")).encode(),                # wrong name
    ]

    def send_good(i: int) -> tuple[int, torch.Tensor]:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            r = c.post("/v2/models/resnet50/infer", json=infer_body(good[i], rid=f"r{i}"))
            assert r.status_code == 200, r.text
            assert r.json()["id"] == f"r{i}"
            return i, output_tensor(r.json())

    def send_bad(body: bytes) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            return c.post("/v2/models/resnet50/infer", content=body,
                          headers={"content-type": "application/json"})

    with ThreadPoolExecutor(max_workers=8) as pool:
        good_f = [pool.submit(send_good, i) for i in good]
        bad_f = [pool.submit(send_bad, b) for b in bad_bodies]
        results = dict(f.result() for f in good_f)
        bad = [f.result() for f in bad_f]
    assert [r.status_code for r in bad] == [400] * len(bad_bodies)
    messages = [r.json()["error"] for r in bad]
    assert "not valid JSON" in messages[0]
    assert "wrong shape" in messages[1]
    assert "wrong datatype" in messages[2]
    assert "batch size" in messages[3]
    assert "input name" in messages[4]
    for i, x in good.items():
        expected = reference_forward(sealed_resnet.plain, x, MAX_BATCH)
        assert torch.equal(results[i], expected), f"request {i} differs from plaintext"


def test_bad_requests_get_4xx_and_server_keeps_serving(server: LocalServer,
                                                       sealed_resnet: Sealed) -> None:
    url = "/v2/models/resnet50/infer"
    with httpx.Client(base_url=server.url, timeout=120) as c:
        r = c.post(url, content=b"x" * (65536 + MAX_BATCH * 3 * 64 * 64 * 32 + 1),
                   headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert "larger than" in r.json()["error"]
        r = c.post(url, content=b"{}", headers={"content-type": "text/plain"})
        assert r.status_code == 415
        body = infer_body(sample(1, 5))
        body["inputs"][0]["data"][7] = "1.0"
        r = c.post(url, json=body)
        assert r.status_code == 400 and "only numbers" in r.json()["error"]
        assert "1.0" not in r.json()["error"]
        r = c.post(url, content=b'{"inputs": [{"name": "input", "shape": [1, 3, 64, 64], '
                                b'"datatype": "FP32", "data": [NaN]}]}',
                   headers={"content-type": "application/json"})
        assert r.status_code == 400 and "finite" in r.json()["error"]
        body = infer_body(sample(1, 6))
        body["inputs"][0]["data"] = body["inputs"][0]["data"][:-1]
        r = c.post(url, json=body)
        assert r.status_code == 400 and "number of values" in r.json()["error"]
        body = infer_body(sample(1, 6))
        body["inputs"][0]["data"][0] = 1e300
        r = c.post(url, json=body)
        assert r.status_code == 400 and "out of range" in r.json()["error"]
        r = c.post(url, json={"inputs": [], "extra": 1})
        assert r.status_code == 400
        r = c.post(url, json=[1, 2])
        assert r.status_code == 400
        r = c.post("/v2/models/nope/infer", json=infer_body(sample(1, 7)))
        assert r.status_code == 404
        # nested data of the right shape is accepted, and the server still answers correctly
        x = sample(2, 8)
        nested = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                              "data": x.tolist()}]}
        r = c.post(url, json=nested)
        assert r.status_code == 200, r.text
        assert torch.equal(output_tensor(r.json()),
                           reference_forward(sealed_resnet.plain, x, MAX_BATCH))
        metrics = c.get("/metrics").text
        assert 'sealtorch_serve_requests_total{endpoint="infer",status="400"}' in metrics
        assert 'sealtorch_serve_requests_total{endpoint="infer",status="413"}' in metrics
        assert "sealtorch_serve_batch_rows_count" in metrics


def test_rate_limit_per_client(sealed_module: torch.nn.Module) -> None:
    model = ServedModel("resnet50", sealed_module, input_shape=SMALL_SHAPE)
    opts = ServeOptions(max_batch=2, rate_per_second=0.001, rate_burst=2)
    with LocalServer(build_app(model, opts)) as srv, httpx.Client(base_url=srv.url,
                                                                  timeout=120) as c:
        codes = [c.post("/v2/models/resnet50/infer", content=b"{}").status_code
                 for _ in range(3)]
        assert codes == [400, 400, 429]
        r = c.post("/v2/models/resnet50/infer", content=b"{}")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert c.get("/v2/health/live").status_code == 200


def test_batching_is_invisible_in_outputs(sealed_module: torch.nn.Module,
                                          sealed_resnet: Sealed) -> None:
    """Requests submitted together run in one forward pass and get the reference answer."""
    model = ServedModel("resnet50", sealed_module, input_shape=SMALL_SHAPE)
    rows: list[int] = []
    xs = [sample(n, seed=200 + n) for n in (1, 2, 1, 3)]

    async def run() -> list[torch.Tensor]:
        b = Batcher(model, max_batch=4, on_batch=rows.append)
        await b.start()
        try:
            return list(await asyncio.gather(*(b.submit(x) for x in xs)))
        finally:
            await b.stop()

    outs = asyncio.run(run())
    assert rows == [4, 3]  # 1+2+1 fill the first pass; 3 rows did not fit and went next
    for x, y in zip(xs, outs, strict=True):
        assert torch.equal(y, reference_forward(sealed_resnet.plain, x, 4))


def test_unknown_endpoints_and_methods_get_json_errors(server: LocalServer) -> None:
    with httpx.Client(base_url=server.url) as c:
        r = c.get("/v2/nothing/here")
        assert r.status_code == 404 and r.json() == {"error": "no such endpoint"}
        r = c.get("/v2/models/resnet50/infer")
        assert r.status_code == 405 and "method not allowed" in r.json()["error"]


def test_queue_bound_and_model_failure(sealed_module: torch.nn.Module) -> None:
    from sealtorch.errors import OverloadedError, ServeError

    model = ServedModel("resnet50", sealed_module, input_shape=SMALL_SHAPE)

    async def overload() -> list[object]:
        b = Batcher(model, max_batch=1, max_queue_rows=2)
        await b.start()
        try:
            return list(await asyncio.gather(*(b.submit(sample(1, i)) for i in range(3)),
                                             return_exceptions=True))
        finally:
            await b.stop()

    results = asyncio.run(overload())
    assert isinstance(results[2], OverloadedError)
    assert all(isinstance(r, torch.Tensor) for r in results[:2])

    class Flaky(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 2:  # the warm-up passes, the first real batch fails
                raise RuntimeError("boom")
            return x.flatten(1)[:, :3]

    flaky = ServedModel("flaky", Flaky(), input_shape=(2,))
    with LocalServer(build_app(flaky, ServeOptions(max_batch=2))) as srv, \
            httpx.Client(base_url=srv.url) as c:
        body = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32",
                            "data": [1.0, 2.0]}]}
        r = c.post("/v2/models/flaky/infer", json=body)
        assert r.status_code == 500 and "boom" not in r.text
        r = c.post("/v2/models/flaky/infer", json=body)
        assert r.status_code == 200
        assert r.json()["outputs"][0]["data"] == [1.0, 2.0]
        assert r.json()["outputs"][0]["shape"] == [1, 2]
    assert issubclass(OverloadedError, ServeError)
