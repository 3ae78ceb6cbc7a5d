"""The KServe predictor (`python -m sealtorch.kserve`) as a real process behind a real dkeycache
and dkeyserver (sim TEE), queried with tritonclient (HTTP and gRPC), KServe's own REST client
and sealtorch's attested client."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest
import torch
from tests.runtime.conftest import (
    FACTORY,
    MAX_BATCH,
    SMALL_SHAPE,
    Sealed,
    client_policy,
    free_port,
    infer_body,
    output_tensor,
    reference,
    sample,
    serving,
    start_kserve,
    stop_process,
    wait_ready,
)
from tests.runtime.oip import kserve_rest, triton_grpc, triton_http, triton_http_default

from sealtorch.client import AttestedClient
from sealtorch.runtime.world import LocalDeployment

MAX_BODY = 65536 + MAX_BATCH * 3 * 64 * 64 * 32


def _predictor(dep: LocalDeployment, sealed: Sealed, *, http: int = 0, grpc: int = 0,
               factory: str = FACTORY, config: str = "runtime.toml",
               extra: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    return start_kserve(dep, "resnet50", sealed.path, factory, http=http, grpc=grpc,
                        config=config, extra=extra,
                        signature=("--input_shape", ",".join(map(str, SMALL_SHAPE))))


@pytest.fixture(scope="module")
def predictor(deployment: LocalDeployment, sealed_resnet: Sealed):
    http, grpc = free_port(), free_port()
    p = _predictor(deployment, sealed_resnet, http=http, grpc=grpc,
                   extra=("--unsafe_allow_plaintext",))
    with serving(p, http, grpc) as addresses:
        yield addresses


def test_clients_nobody_here_wrote_get_the_plaintext_models_outputs(
        predictor: tuple[str, str], sealed_resnet: Sealed) -> None:
    url, grpc = predictor
    queries = {
        "tritonclient http json": lambda x: triton_http(url, "resnet50", x, binary=False),
        "tritonclient http binary": lambda x: triton_http(url, "resnet50", x, binary=True),
        "tritonclient http defaults": lambda x: triton_http_default(url, "resnet50", x),
        "tritonclient grpc": lambda x: triton_grpc(grpc, "resnet50", x),
        "kserve rest json": lambda x: kserve_rest(url, "resnet50", x, binary=False),
        "kserve rest binary": lambda x: kserve_rest(url, "resnet50", x, binary=True),
    }
    for i, (what, query) in enumerate(queries.items()):
        x = sample(1 + i % MAX_BATCH, seed=600 + i)
        assert torch.equal(query(x), reference(sealed_resnet.plain, x)), what


def test_metadata_and_health(predictor: tuple[str, str]) -> None:
    import tritonclient.http as th

    url, _ = predictor
    with th.InferenceServerClient(url.removeprefix("http://")) as c:
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("resnet50")
        meta = c.get_model_metadata("resnet50")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32",
                               "shape": [-1, *SMALL_SHAPE]}]


def test_bad_requests_get_kserve_4xx(predictor: tuple[str, str], sealed_resnet: Sealed) -> None:
    url, _ = predictor
    infer = url + "/v2/models/resnet50/infer"
    good = infer_body(sample(1, 700))
    with httpx.Client(timeout=120) as c:
        def post(body: object, path: str = infer) -> httpx.Response:
            return c.post(path, content=json.dumps(body).encode(),
                          headers={"content-type": "application/json"})

        r = post(infer_body(sample(1, 701, (3, 65, 64))))
        assert r.status_code == 400 and "wrong shape" in r.json()["error"]
        r = post({"inputs": [{**good["inputs"][0], "datatype": "FP64"}]})
        assert r.status_code == 400 and "wrong datatype" in r.json()["error"]
        r = post(infer_body(sample(MAX_BATCH + 1, 702)))
        assert r.status_code == 400 and "batch size" in r.json()["error"]
        r = post(infer_body(sample(1, 703), name="pixels"))
        assert r.status_code == 400 and "'input'" in r.json()["error"]
        r = post(good, url + "/v2/models/nope/infer")
        assert r.status_code == 404 and "nope" in r.json()["error"]
        # binary tensor data whose size does not match its shape
        head = json.dumps({"inputs": [{"name": "input", "shape": [1, *SMALL_SHAPE],
                                       "datatype": "FP32",
                                       "parameters": {"binary_data_size": 12}}]}).encode()
        r = c.post(infer, content=head + bytes(12),
                   headers={"Inference-Header-Content-Length": str(len(head)),
                            "content-type": "application/octet-stream"})
        assert r.status_code == 400 and "wrong size" in r.json()["error"]
        r = c.post(infer, content=b" " * (MAX_BODY + 1),
                   headers={"content-type": "application/json"})
        assert r.status_code == 413 and "larger than" in r.json()["error"]
        # the server keeps serving
        x = sample(2, 704)
        r = post(infer_body(x))
        assert r.status_code == 200, r.text
        assert torch.equal(output_tensor(r.json()), reference(sealed_resnet.plain, x))


def test_end_to_end_through_kserve(predictor: tuple[str, str], deployment: LocalDeployment,
                                   sealed_resnet: Sealed) -> None:
    """sealtorch's attested client verifies the predictor's evidence and gets a receipt."""
    url, _ = predictor
    with AttestedClient(url, client_policy(deployment, sealed_resnet), unsafe_sim=True) as c:
        x = sample(2, 800)
        r = c.infer(infer_body(x))
        assert torch.equal(output_tensor(r.json()), reference(sealed_resnet.plain, x))
        assert r.receipt_claims.identity.model_id == sealed_resnet.key.model_id


def test_a_factory_not_on_the_allow_list_never_gets_the_key(
        deployment: LocalDeployment, sealed_resnet: Sealed) -> None:
    p = _predictor(deployment, sealed_resnet, factory="sealtorch.models.resnet:make_resnet50")
    p.wait(180)
    err = p.communicate()[1]
    assert p.returncode == 2, err
    assert "error [factory_refused]" in err and "allow-list" in err


def test_a_runtime_not_in_the_policy_never_gets_the_key(deployment: LocalDeployment,
                                                        sealed_resnet: Sealed) -> None:
    p = _predictor(deployment, sealed_resnet, config="other-runtime.toml")
    p.wait(180)
    err = p.communicate()[1]
    assert p.returncode == 2, err
    assert "key cache refused the policy" in err and "does not allow this runtime" in err


def test_plaintext_is_refused_by_default(deployment: LocalDeployment,
                                         sealed_resnet: Sealed) -> None:
    http = free_port()
    p = _predictor(deployment, sealed_resnet, http=http)
    url = f"http://127.0.0.1:{http}"
    try:
        wait_ready(p, url)
        r = httpx.post(url + "/v2/models/resnet50/infer", json=infer_body(sample(1, 900)),
                       timeout=60)
        assert r.status_code == 415 and r.json()["code"] == "plaintext_refused"
    finally:
        err = stop_process(p)
    assert "gRPC is off" in err
