"""Fixtures for the sealed-format tests: a model key and small state_dicts of every kind."""

from __future__ import annotations

import pytest
import torch

from sealtorch.format import keyfile
from sealtorch.format.dtypes import NAME_TO_DTYPE


@pytest.fixture
def mk() -> keyfile.ModelKey:
    return keyfile.generate_model_key("test-model", 1)


@pytest.fixture
def key_file(tmp_path, mk):
    p = tmp_path / "model.key"
    keyfile.write_key_file(p, mk)
    return p


def every_dtype_state() -> dict[str, torch.Tensor]:
    """One tensor per supported dtype, plus scalars, empty, non-contiguous and tied tensors."""
    g = torch.Generator().manual_seed(7)
    sd: dict[str, torch.Tensor] = {}
    for name, dt in NAME_TO_DTYPE.items():
        raw = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8, generator=g)
        nbytes = torch.empty((), dtype=dt).element_size()
        # random bit patterns of the right width (NaN payloads survive: we compare bytes)
        t = raw.reshape(-1)[: (raw.numel() // nbytes) * nbytes].view(dt)
        if dt is torch.bool:  # a BOOL byte is 0 or 1 (format rule R-42)
            t = (raw.reshape(-1) & 1).view(torch.bool)
        sd[f"t.{name}"] = t
    sd["scalar.f32"] = torch.tensor(3.5)
    sd["scalar.i64"] = torch.tensor(-7, dtype=torch.int64)
    sd["empty"] = torch.empty(0, 4)
    sd["empty2"] = torch.empty(2, 0, dtype=torch.float16)
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    sd["noncontig.t"] = base.t()
    sd["noncontig.slice"] = base[:, ::3]
    sd["weight"] = torch.randn(17, 9, generator=g)
    sd["tied.weight"] = sd["weight"]
    return sd


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality including dtype and shape (works for NaNs and every dtype)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ab = a.contiguous().reshape(-1).view(torch.uint8)
    bb = b.contiguous().reshape(-1).view(torch.uint8)
    return torch.equal(ab, bb)


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    return every_dtype_state()
