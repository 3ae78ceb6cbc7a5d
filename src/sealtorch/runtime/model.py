"""Build a served model: factory (allow-listed) -> module -> sealed weights decrypted into it."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sealtorch.errors import FactoryError, ServeError
from sealtorch.runtime import factory as _factory

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from sealtorch.format.keys import KeyProvider

#: KServe v2 datatype names of the tensor dtypes the JSON API carries
DATATYPES = ("FP32", "FP64", "INT64", "INT32")


def torch_dtype(datatype: str) -> torch.dtype:
    """The torch dtype of a KServe v2 datatype name."""
    import torch

    table = {"FP32": torch.float32, "FP64": torch.float64, "INT64": torch.int64,
             "INT32": torch.int32}
    if datatype not in table:
        raise ServeError(f"datatype must be one of {', '.join(DATATYPES)}")
    return table[datatype]


def datatype_of(dtype: torch.dtype) -> str:
    """The KServe v2 datatype name of a torch dtype (only those the JSON API carries)."""
    import torch

    table = {torch.float32: "FP32", torch.float64: "FP64", torch.int64: "INT64",
             torch.int32: "INT32"}
    if dtype not in table:
        raise ServeError("the model's output dtype cannot be carried as JSON (FP32/FP64/INT)")
    return table[dtype]


@dataclass
class ServedModel:
    """A loaded module with its tensor signature (per-sample input shape, no batch dim)."""

    name: str
    module: torch.nn.Module
    input_shape: tuple[int, ...] = (3, 224, 224)
    datatype: str = "FP32"
    input_name: str = "input"
    output_name: str = "output"
    version: str = "1"
    sealed: bool = True

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 64 or not all(
            c.isalnum() or c in "-_." for c in self.name
        ):
            raise ServeError("model name must be 1-64 characters of letters, digits, '-_.'")
        if not self.input_shape or any(d <= 0 for d in self.input_shape):
            raise ServeError("input shape must be a non-empty list of positive sizes")
        torch_dtype(self.datatype)
        self.module.eval()

    @property
    def sample_elements(self) -> int:
        """Number of values in one sample."""
        return math.prod(self.input_shape)


def build_sealed(
    path: str | os.PathLike[str],
    factory: str,
    *,
    key_provider: KeyProvider,
    allowed_factories: Sequence[str],
    threads: int | None = None,
) -> torch.nn.Module:
    """Check ``factory`` against ``allowed_factories``, build the module, decrypt into it.

    The allow-list check happens before the factory's module is imported.
    """
    import torch

    from sealtorch.format.reader import load_into

    func = _factory.resolve(factory, allowed_factories)
    module = func()
    if not isinstance(module, torch.nn.Module):
        raise FactoryError("the factory did not return a torch.nn.Module")
    load_into(module, path, key_provider=key_provider, threads=threads)
    return module.eval()
