"""Tensor dtypes a sealed file can hold: exactly the ones safetensors knows, with its names."""

from __future__ import annotations

import torch

from sealtorch.errors import IndexError_, InputError

_CANDIDATES: list[tuple[str, str]] = [
    ("F64", "float64"),
    ("F32", "float32"),
    ("F16", "float16"),
    ("BF16", "bfloat16"),
    ("I64", "int64"),
    ("I32", "int32"),
    ("I16", "int16"),
    ("I8", "int8"),
    ("U64", "uint64"),
    ("U32", "uint32"),
    ("U16", "uint16"),
    ("U8", "uint8"),
    ("BOOL", "bool"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("C64", "complex64"),
]

#: safetensors-style name -> torch dtype (only those this torch build has)
NAME_TO_DTYPE: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in _CANDIDATES if hasattr(torch, attr)
}
DTYPE_TO_NAME: dict[torch.dtype, str] = {v: k for k, v in NAME_TO_DTYPE.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The file name of a torch dtype; :class:`InputError` for dtypes the format cannot hold."""
    try:
        return DTYPE_TO_NAME[dtype]
    except KeyError:
        raise InputError(
            f"dtype {dtype} cannot be sealed; supported: {', '.join(sorted(NAME_TO_DTYPE))}"
        ) from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a file dtype name; :class:`IndexError_` if unknown."""
    try:
        return NAME_TO_DTYPE[name]
    except (KeyError, TypeError):
        raise IndexError_(
            "the tensor index names a dtype this torch build cannot represent; upgrade torch "
            "or sealtorch"
        ) from None


_ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for name, dt in NAME_TO_DTYPE.items()}


def itemsize(name: str) -> int:
    """Bytes per element of a file dtype name."""
    try:
        return _ITEMSIZE[name]
    except (KeyError, TypeError):
        torch_dtype(name)  # raises the specific error
        raise
