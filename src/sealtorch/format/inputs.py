"""Turn what an owner wants to seal (a module, a state_dict, a .pt or .safetensors file) into
an ordered set of CPU tensors, with tied tensors found so they are stored once."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sealtorch.errors import InputError
from sealtorch.format.dtypes import dtype_name


@dataclass
class Collected:
    """Tensors to store, aliases (name -> stored name), metadata, and all names in order."""

    tensors: dict[str, torch.Tensor]
    aliases: dict[str, str]
    metadata: dict[str, str]
    order: list[str]


def _load_file(path: Path) -> tuple[Mapping[str, Any], dict[str, str]]:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            return load_file(str(path)), meta
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(
                f"{path}: not a readable safetensors file ({type(e).__name__})"
            ) from None
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
            raise InputError(
                f"{path}: cannot be loaded with torch.load(weights_only=True) "
                f"({type(e).__name__}); save a plain state_dict of tensors"
            ) from None
        if not isinstance(obj, Mapping):
            raise InputError(f"{path}: the file holds a {type(obj).__name__}, not a state_dict")
        return obj, {}
    raise InputError(f"{path}: unsupported input type; use .pt, .pth, .bin or .safetensors")


def collect(obj: Any) -> Collected:
    """Normalize ``obj`` to :class:`Collected`; :class:`InputError` for anything else."""
    metadata: dict[str, str] = {}
    if isinstance(obj, str | os.PathLike):
        obj, metadata = _load_file(Path(obj))
    elif isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise InputError(
            f"cannot seal a {type(obj).__name__}: pass an nn.Module, a state_dict or a file path"
        )
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, t in obj.items():
        if not isinstance(name, str) or not name:
            raise InputError("state_dict keys must be non-empty strings")
        if not isinstance(t, torch.Tensor):
            raise InputError(
                f"state_dict entry {name!r} is a {type(t).__name__}, not a tensor; seal only "
                "tensors (put other data in metadata)"
            )
        if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
            raise InputError(f"tensor {name!r} is sparse, quantized or on meta; cannot seal it")
        dtype_name(t.dtype)
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        key = (
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
        )
        if t.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t
    return Collected(tensors, aliases, metadata, [*obj.keys()])
