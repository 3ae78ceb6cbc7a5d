"""`sealtorch serve` as a real process behind a real dkeycache and dkeyserver (sim TEE)."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from tests.runtime.conftest import FACTORY, Sealed, infer_body, output_tensor, sample
from tests.runtime.oip import triton_http, triton_http_default

from sealtorch.attestation import sim
from sealtorch.client import AttestedClient, ClientPolicy
from sealtorch.runtime.batcher import reference_forward
from sealtorch.runtime.config import render_runtime_config
from sealtorch.runtime.world import LocalDeployment

MAX_BATCH = 4
SHAPE = "3,64,64"


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, sealed_resnet: Sealed):
    wd = tmp_path_factory.mktemp("deploy")
    dep = LocalDeployment(wd)
    try:
        dep.init_keyserver()
        dep.start_keyserver()
        platform = dep.init_sim_platform()
        model_id = sealed_resnet.key.model_id
        dep.admin("POST", "/v1/admin/models", {
            "model_id": model_id, "key_version": 1,
            "key": base64.b64encode(bytes(sealed_resnet.key.key)).decode()})
        cache_meas = sim.measure("dkeycache", dep.write_cache_config())
        runtime_cfg = render_runtime_config(dep.server_public_key_b64)
        (wd / "runtime.toml").write_bytes(runtime_cfg)
        (wd / "other-runtime.toml").write_bytes(runtime_cfg + b"# another build\n")
        ident = {"tee": "sim", "platform_key": platform}
        dep.admin("PUT", f"/v1/admin/policy/{model_id}", {"policy": {
            "format": "sealtorch-policy/v1", "version": 1, "lease_seconds": 300,
            "caches": [{**ident, "measurement": cache_meas.hex()}],
            "runtimes": [{**ident, "measurement": sim.measure("serve", runtime_cfg).hex()}],
            "factories": [FACTORY]}})
        dep.start_cache()
        yield dep
    finally:
        dep.stop()


SERVE_THREADS = 2  # CPU kernels' rounding depends on the thread count: pin it on both sides


def _reference(plain: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The plaintext model's output computed with the server's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(SERVE_THREADS)
    try:
        return reference_forward(plain, x, MAX_BATCH)
    finally:
        torch.set_num_threads(before)


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


def _stop(p: subprocess.Popen[str]) -> str:
    if p.poll() is None:
        p.terminate()
    try:
        _, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate(timeout=10)
    return err


def _client_policy(dep: LocalDeployment, sealed: Sealed) -> ClientPolicy:
    """A client policy admitting exactly this deployment's sim serve and sealed model."""
    return ClientPolicy.from_dict({
        "format": "sealtorch-client-policy/v1",
        "runtimes": [{"tee": "sim", "measurement": sim.measure(
            "serve", (dep.workdir / "runtime.toml").read_bytes()).hex(),
                      "platform_key": sim.fingerprint(sim.load_platform_public_key(
                          dep.sim_dir / sim.PUBLIC_FILE))}],
        "models": [{"model_id": sealed.key.model_id, "key_versions": [1],
                    "factories": [FACTORY]}],
        "owners": [{"server_key": dep.server_public_key_b64}],
        "verifier": {"sim_platform_keys": [str(dep.sim_dir / sim.PUBLIC_FILE)]}})


def test_serve_through_the_cache(deployment: LocalDeployment, sealed_resnet: Sealed) -> None:
    port = _free_port()
    p = _serve(deployment, sealed_resnet.path, port=port, extra=("--unsafe-allow-plaintext",))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert p.poll() is None, _stop(p)
            try:
                if httpx.get(url + "/v2/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "sealtorch serve did not become ready"
            time.sleep(0.1)

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
            assert torch.equal(got, _reference(sealed_resnet.plain, x)), i
        # tritonclient (a client nobody here wrote): JSON, binary tensor data, and its defaults
        for i, kind in enumerate(("json", "binary", "default")):
            x = sample(1 + i, seed=500 + i)
            got = (triton_http_default(url, "resnet50", x) if kind == "default"
                   else triton_http(url, "resnet50", x, binary=kind == "binary"))
            assert torch.equal(got, _reference(sealed_resnet.plain, x)), kind
        # the same model end to end: attested, encrypted, receipted, and still bit-identical
        with AttestedClient(url, _client_policy(deployment, sealed_resnet),
                            unsafe_sim=True) as c:
            for i in range(2):
                x = sample(1 + 2 * i, seed=400 + i)
                r = c.infer(infer_body(x))
                assert torch.equal(output_tensor(r.json()), _reference(sealed_resnet.plain, x))
                assert r.receipt_claims.identity.model_id == sealed_resnet.key.model_id
        metrics = httpx.get(url + "/metrics").text
        assert "sealtorch_serve_batch_rows_count" in metrics
        assert 'sealtorch_serve_e2e_requests_total{outcome="ok"} 2.0' in metrics
        assert httpx.get(url + "/v2/health/live").json() == {"live": True}
    finally:
        _stop(p)


def test_serve_refuses_a_factory_not_on_the_allow_list(deployment: LocalDeployment,
                                                       sealed_resnet: Sealed) -> None:
    p = _serve(deployment, sealed_resnet.path, factory="sealtorch.models.resnet:make_resnet50")
    err = _stop(p) if p.wait(120) is None else p.communicate()[1]
    assert p.returncode == 2
    assert "error [factory_refused]" in err and "allow-list" in err


def test_serve_with_another_measurement_is_denied(deployment: LocalDeployment,
                                                  sealed_resnet: Sealed) -> None:
    p = _serve(deployment, sealed_resnet.path, config="other-runtime.toml")
    p.wait(120)
    err = p.communicate()[1]
    assert p.returncode == 2
    assert "key cache refused the policy" in err and "does not allow this runtime" in err
