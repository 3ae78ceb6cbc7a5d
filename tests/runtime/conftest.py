"""Fixtures of the runtime tests: one sealed ResNet-50 (fixed seed) per session; a key server
and key cache deployment (real processes, sim TEE) per module that asks for one."""

from __future__ import annotations

import base64
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from sealtorch.attestation import sim
from sealtorch.client import ClientPolicy
from sealtorch.format.keyfile import ModelKey, generate_model_key
from sealtorch.format.writer import seal
from sealtorch.models.resnet import make_resnet50
from sealtorch.runtime.batcher import reference_forward
from sealtorch.runtime.config import render_runtime_config
from sealtorch.runtime.world import LocalDeployment

FACTORY = "sealtorch.models.resnet:resnet50"
SMALL_SHAPE = (3, 64, 64)  # ResNet-50 pools adaptively; small inputs keep the tests cheap
MAX_BATCH = 4  # of the servers started as processes


@dataclass
class Sealed:
    path: Path
    key: ModelKey
    plain: torch.nn.Module


@pytest.fixture(scope="session")
def sealed_resnet(tmp_path_factory: pytest.TempPathFactory) -> Sealed:
    d = tmp_path_factory.mktemp("sealed")
    key = generate_model_key("resnet50-test")
    plain = make_resnet50(seed=0)
    path = d / "resnet50.sealed"
    seal(plain, path, key)
    return Sealed(path, key, plain)


def sample(n: int, seed: int, shape: tuple[int, ...] = SMALL_SHAPE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g)


def infer_body(x: torch.Tensor, name: str = "input", rid: str | None = None) -> dict:
    body: dict = {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                              "data": x.reshape(-1).tolist()}]}
    if rid is not None:
        body["id"] = rid
    return body


def output_tensor(answer: dict) -> torch.Tensor:
    out = answer["outputs"][0]
    assert out["datatype"] == "FP32"
    return torch.tensor(out["data"], dtype=torch.float32).reshape(out["shape"])


def stop_process(p: subprocess.Popen[str]) -> str:
    """Stop a server started by a test; return its stderr."""
    if p.poll() is None:
        p.terminate()
    try:
        _, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate(timeout=10)
    return err


def wait_ready(p: subprocess.Popen[str], url: str, timeout: float = 180) -> None:
    """Wait until the server at ``url`` answers ``/v2/health/ready`` (fail if it exits)."""
    deadline = time.monotonic() + timeout
    while True:
        assert p.poll() is None, stop_process(p)
        try:
            if httpx.get(url + "/v2/health/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.1)


def start_kserve(dep: LocalDeployment, name: str, sealed: Path, factory: str, *,
                 signature: tuple[str, ...], http: int = 0, grpc: int = 0,
                 config: str = "runtime.toml", extra: tuple[str, ...] = ()
                 ) -> subprocess.Popen[str]:
    """Start ``python -m sealtorch.kserve`` on ``dep``'s key cache (sim attester); ``signature``
    is the model's input/output flags."""
    return subprocess.Popen(
        [sys.executable, "-I", "-m", "sealtorch.kserve", "--model_name", name,
         "--sealed", str(sealed), "--factory", factory, "--keycache", dep.socket,
         "--config", str(dep.workdir / config), "--attester", "sim",
         "--http_port", str(http or free_port()), "--grpc_port", str(grpc or free_port()),
         *signature, "--max_batch", str(MAX_BATCH), "--threads", str(SERVE_THREADS),
         "--enable_latency_logging", "false", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dep.env,
        start_new_session=True)


@contextlib.contextmanager
def serving(p: subprocess.Popen[str], http: int, grpc: int) -> Iterator[tuple[str, str]]:
    """Wait until the predictor ``p`` is ready, yield its HTTP URL and gRPC address, stop it
    (its stderr is printed: shown when a test fails)."""
    url = f"http://127.0.0.1:{http}"
    try:
        wait_ready(p, url)
        yield url, f"127.0.0.1:{grpc}"
    finally:
        print(stop_process(p)[-5000:])


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@contextlib.contextmanager
def start_deployment(wd: Path, key: ModelKey, factories: list[str]
                     ) -> Iterator[LocalDeployment]:
    """A key server holding ``key`` with a policy allowing ``factories`` and this runtime
    (``runtime.toml``; ``other-runtime.toml`` is another build), and a key cache."""
    dep = LocalDeployment(wd)
    try:
        dep.init_keyserver()
        dep.start_keyserver()
        platform = dep.init_sim_platform()
        model_id = key.model_id
        dep.admin("POST", "/v1/admin/models", {
            "model_id": model_id, "key_version": key.key_version,
            "key": base64.b64encode(bytes(key.key)).decode()})
        cache_meas = sim.measure("dkeycache", dep.write_cache_config())
        runtime_cfg = render_runtime_config(dep.server_public_key_b64)
        (wd / "runtime.toml").write_bytes(runtime_cfg)
        (wd / "other-runtime.toml").write_bytes(runtime_cfg + b"# another build\n")
        ident = {"tee": "sim", "platform_key": platform}
        dep.admin("PUT", f"/v1/admin/policy/{model_id}", {"policy": {
            "format": "sealtorch-policy/v1", "version": 1, "lease_seconds": 300,
            "caches": [{**ident, "measurement": cache_meas.hex()}],
            "runtimes": [{**ident, "measurement": sim.measure("serve", runtime_cfg).hex()}],
            "factories": factories}})
        dep.start_cache()
        yield dep
    finally:
        dep.stop()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, sealed_resnet: Sealed):
    with start_deployment(tmp_path_factory.mktemp("deploy"), sealed_resnet.key,
                          [FACTORY]) as dep:
        yield dep


SERVE_THREADS = 2  # CPU kernels' rounding depends on the thread count: pin it on both sides


def reference(plain: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The plaintext model's output computed with the server's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(SERVE_THREADS)
    try:
        return reference_forward(plain, x, MAX_BATCH)
    finally:
        torch.set_num_threads(before)


def client_policy(dep: LocalDeployment, sealed: Sealed | None = None, *,
                  model_id: str | None = None, factory: str = FACTORY) -> ClientPolicy:
    """A client policy admitting exactly this deployment's sim serve and sealed model (or
    ``model_id`` built by ``factory``)."""
    return ClientPolicy.from_dict({
        "format": "sealtorch-client-policy/v1",
        "runtimes": [{"tee": "sim", "measurement": sim.measure(
            "serve", (dep.workdir / "runtime.toml").read_bytes()).hex(),
                      "platform_key": sim.fingerprint(sim.load_platform_public_key(
                          dep.sim_dir / sim.PUBLIC_FILE))}],
        "models": [{"model_id": model_id or (sealed.key.model_id if sealed else ""),
                    "key_versions": [1], "factories": [factory]}],
        "owners": [{"server_key": dep.server_public_key_b64}],
        "verifier": {"sim_platform_keys": [str(dep.sim_dir / sim.PUBLIC_FILE)]}})


