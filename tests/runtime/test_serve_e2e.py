"""`sealtorch serve` as a real process behind a real dkeycache and dkeyserver (sim TEE)."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from tests.runtime.conftest import (
    FACTORY,
    MAX_BATCH,
    SERVE_THREADS,
    Sealed,
    client_policy,
    free_port,
    infer_body,
    output_tensor,
    reference,
    sample,
    stop_process,
    wait_ready,
)
from tests.runtime.oip import kserve_rest, triton_http, triton_http_default

from sealtorch.client import AttestedClient
from sealtorch.runtime.world import LocalDeployment

SHAPE = "3,64,64"


def _serve(dep: LocalDeployment, sealed: Path, *, factory: str = FACTORY,
           config: str = "runtime.toml", port: int = 0,
           extra: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-I", "-m", "sealtorch", "serve", str(sealed), "--factory", factory,
         "--keycache", dep.socket, "--config", str(dep.workdir / config), "--attester", "sim",
         "--port", str(port), "--max-batch", str(MAX_BATCH), "--input-shape", SHAPE,
         "--name", "resnet50", "--rate", "1000", "--threads", str(SERVE_THREADS), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dep.env,
        start_new_session=True)


def test_serve_through_the_cache(deployment: LocalDeployment, sealed_resnet: Sealed) -> None:
    port = free_port()
    p = _serve(deployment, sealed_resnet.path, port=port, extra=("--unsafe-allow-plaintext",))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(p, url)

        good = {i: sample(1 + i % MAX_BATCH, seed=300 + i) for i in range(12)}
        bad = [b"[", b'{"inputs": 5}',
               json.dumps(infer_body(sample(1, 9, (3, 65, 64)))).encode(),
               json.dumps({"inputs": [{**infer_body(sample(1, 9))["inputs"][0],
                                       "datatype": "FP64"}]}).encode()]

        def send(body: bytes) -> httpx.Response:
            with httpx.Client(timeout=120) as c:
                return c.post(url + "/v2/models/resnet50/infer", content=body,
                              headers={"content-type": "application/json"})

        with ThreadPoolExecutor(max_workers=8) as pool:
            gf = {i: pool.submit(send, json.dumps(infer_body(x)).encode())
                  for i, x in good.items()}
            bf = [pool.submit(send, b) for b in bad]
            big = pool.submit(send, b" " * (65536 + MAX_BATCH * 3 * 64 * 64 * 32 + 10))
            answers = {i: f.result() for i, f in gf.items()}
            bad_answers = [f.result() for f in bf]
        assert [r.status_code for r in bad_answers] == [400, 400, 400, 400]
        assert big.result().status_code == 413
        for i, x in good.items():
            assert answers[i].status_code == 200, answers[i].text
            got = output_tensor(answers[i].json())
            assert torch.equal(got, reference(sealed_resnet.plain, x)), i
        # clients nobody here wrote: tritonclient (JSON, binary tensor data, and its
        # defaults) and KServe's REST client (JSON and binary)
        queries = {
            "triton json": lambda x: triton_http(url, "resnet50", x, binary=False),
            "triton binary": lambda x: triton_http(url, "resnet50", x, binary=True),
            "triton defaults": lambda x: triton_http_default(url, "resnet50", x),
            "kserve json": lambda x: kserve_rest(url, "resnet50", x, binary=False),
            "kserve binary": lambda x: kserve_rest(url, "resnet50", x, binary=True),
        }
        for i, (kind, query) in enumerate(queries.items()):
            x = sample(1 + i % MAX_BATCH, seed=500 + i)
            assert torch.equal(query(x), reference(sealed_resnet.plain, x)), kind
        # the same model end to end: attested, encrypted, receipted, and still bit-identical
        with AttestedClient(url, client_policy(deployment, sealed_resnet),
                            unsafe_sim=True) as c:
            for i in range(2):
                x = sample(1 + 2 * i, seed=400 + i)
                r = c.infer(infer_body(x))
                assert torch.equal(output_tensor(r.json()), reference(sealed_resnet.plain, x))
                assert r.receipt_claims.identity.model_id == sealed_resnet.key.model_id
        metrics = httpx.get(url + "/metrics").text
        assert "sealtorch_serve_batch_rows_count" in metrics
        assert 'sealtorch_serve_e2e_requests_total{outcome="ok"} 2.0' in metrics
        assert httpx.get(url + "/v2/health/live").json() == {"live": True}
    finally:
        stop_process(p)


def test_serve_refuses_a_factory_not_on_the_allow_list(deployment: LocalDeployment,
                                                       sealed_resnet: Sealed) -> None:
    p = _serve(deployment, sealed_resnet.path, factory="sealtorch.models.resnet:make_resnet50")
    err = stop_process(p) if p.wait(120) is None else p.communicate()[1]
    assert p.returncode == 2
    assert "error [factory_refused]" in err and "allow-list" in err


def test_serve_with_another_measurement_is_denied(deployment: LocalDeployment,
                                                  sealed_resnet: Sealed) -> None:
    p = _serve(deployment, sealed_resnet.path, config="other-runtime.toml")
    p.wait(120)
    err = p.communicate()[1]
    assert p.returncode == 2
    assert "key cache refused the policy" in err and "does not allow this runtime" in err
