"""Fixtures of the runtime tests: one sealed ResNet-50 (fixed seed) per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sealtorch.format.keyfile import ModelKey, generate_model_key
from sealtorch.format.writer import seal
from sealtorch.models.resnet import make_resnet50

FACTORY = "sealtorch.models.resnet:resnet50"
SMALL_SHAPE = (3, 64, 64)  # ResNet-50 pools adaptively; small inputs keep the tests cheap


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
