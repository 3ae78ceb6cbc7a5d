"""`sealtorch serve` checks everything that can fail without the key (name, input shape,
factory syntax, the listening port) before it asks the key cache: each case is run against a
key cache socket that does not exist, so reaching the cache would fail differently."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealtorch.attestation import sim
from sealtorch.errors import ServeError
from sealtorch.format.keyfile import generate_model_key
from sealtorch.format.signing import raw_public
from sealtorch.format.writer import seal
from sealtorch.runtime.config import render_runtime_config
from sealtorch.runtime.model import check_model_name, default_model_name

FACTORY = "sealtorch.models.resnet:resnet50"
ASKING = "asking the key cache"


@pytest.mark.parametrize(("model_id", "name"), [
    ("acme/resnet50", "acme-resnet50"),
    ("acme/resnet50@v1", "acme-resnet50-v1"),
    ("resnet50", "resnet50"),
    ("a:b+c=d", "a-b-c-d"),
    ("x" * 128, "x" * 64),
])
def test_default_name_is_derived_from_the_model_id(model_id: str, name: str) -> None:
    assert default_model_name(model_id) == name
    assert check_model_name(name) == name


@pytest.mark.parametrize("bad", ["", "a/b", "x" * 65, "a b", "é"])
def test_bad_names_are_refused(bad: str) -> None:
    with pytest.raises(ServeError, match="pass another --name"):
        check_model_name(bad)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("serve-checks")
    sealed = d / "acme.sealed"
    seal({"w": torch.zeros(4)}, sealed, generate_model_key("acme/resnet50"))
    pub = raw_public(Ed25519PrivateKey.generate().public_key())
    config = d / "runtime.toml"
    config.write_bytes(render_runtime_config(base64.b64encode(pub).decode()))
    sim.init_platform_key(d / "sim")
    return {"dir": d, "sealed": sealed, "config": config, "sim": d / "sim"}


def _serve(setup: dict[str, Path], *extra: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-I", "-m", "sealtorch", "serve", str(setup["sealed"]),
            "--factory", FACTORY, "--keycache", str(setup["dir"] / "no-cache.sock"),
            "--config", str(setup["config"]), "--attester", "sim", "--port", "0", *extra]
    p = subprocess.run(args, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "SEALTORCH_SIM_DIR": str(setup["sim"])})
    assert "Traceback" not in p.stderr, p.stderr
    return p


def test_default_name_passes_and_the_cache_is_asked_last(setup: dict[str, Path]) -> None:
    p = _serve(setup)
    assert p.returncode == 2
    assert "as 'acme-resnet50'" in p.stderr and ASKING in p.stderr
    assert "error [unavailable]" in p.stderr  # only now: the socket does not exist


def test_bad_name_is_refused_before_the_cache(setup: dict[str, Path]) -> None:
    p = _serve(setup, "--name", "acme/resnet50")
    assert p.returncode == 2 and ASKING not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error [serve_error]: model name must")


def test_port_in_use_is_refused_before_the_cache(setup: dict[str, Path]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        p = _serve(setup, "--port", str(port))
    assert p.returncode == 2 and ASKING not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error [serve_error]: cannot listen on 127.0.0.1:{port}")
    assert "pass another --port" in last


def test_factory_syntax_is_refused_before_the_cache(setup: dict[str, Path]) -> None:
    p = _serve(setup, "--factory", "not a factory")
    assert p.returncode == 2 and ASKING not in p.stderr
    assert "error [factory_refused]: the factory must look like" in p.stderr


def test_input_shape_is_refused_before_the_cache(setup: dict[str, Path]) -> None:
    p = _serve(setup, "--input-shape", "3,0,224")
    assert p.returncode == 2 and ASKING not in p.stderr
    assert "sizes must be positive" in p.stderr


def test_a_directory_that_is_not_sealed_is_refused_before_the_cache(
        setup: dict[str, Path], tmp_path: Path) -> None:
    p = _serve({**setup, "sealed": tmp_path}, "--factory",
               "sealtorch.hf.embedding:sentence_embedding")
    assert p.returncode == 2 and ASKING not in p.stderr
    assert "not a sealed model directory" in p.stderr and "sealtorch seal" in p.stderr
