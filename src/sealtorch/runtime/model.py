"""Build a served model: factory (allow-listed) -> module -> sealed weights decrypted into it."""

from __future__ import annotations

import math
import os
import re
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
#: longest model name in the API (it appears in URL paths)
NAME_MAX = 64
_NAME_RE = re.compile(rf"[A-Za-z0-9._-]{{1,{NAME_MAX}}}")


def check_model_name(name: str) -> str:
    """Return ``name`` if it can be a model name in the API's URLs; raise otherwise."""
    if not _NAME_RE.fullmatch(name):
        raise ServeError(f"model name must be 1-{NAME_MAX} characters of letters, digits, "
                         "'-_.'; pass another --name")
    return name


def default_model_name(model_id: str) -> str:
    """The API name of a model id when ``--name`` is not given: every character a URL path
    segment cannot hold becomes '-' (``acme/resnet50`` -> ``acme-resnet50``), at most
    :data:`NAME_MAX` characters."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", model_id)[:NAME_MAX].strip(".") or "model"
    return check_model_name(name)


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


def check_input_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Return the per-sample input shape if every size is positive; raise otherwise."""
    if not shape or any(d <= 0 for d in shape):
        raise ServeError("input shape must be a non-empty list of positive sizes, e.g. 3,224,224")
    return tuple(shape)


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
        check_model_name(self.name)
        check_input_shape(self.input_shape)
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
