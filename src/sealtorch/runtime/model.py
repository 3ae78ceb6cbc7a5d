"""Build a served model: factory (allow-listed) -> module -> sealed weights decrypted into it."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sealtorch.errors import FactoryError, ServeError
from sealtorch.runtime import factory as _factory
from sealtorch.runtime.codec import TensorSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from sealtorch.format.keys import KeyProvider
    from sealtorch.runtime.codec import Value

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


def check_input_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Return the per-sample input shape if every size is positive; raise otherwise."""
    if not shape or any(d <= 0 for d in shape):
        raise ServeError("input shape must be a non-empty list of positive sizes, e.g. 3,224,224")
    return tuple(shape)


@dataclass
class ServedModel:
    """A loaded module with its signature: named inputs (datatype, per-sample shape, no batch
    dim) and output names. One input can be given as ``input_shape``/``datatype``/``input_name``;
    several as ``inputs`` (the module is called with them as positional arguments, in order)."""

    name: str
    module: torch.nn.Module
    input_shape: tuple[int, ...] = (3, 224, 224)
    datatype: str = "FP32"
    input_name: str = "input"
    output_name: str = "output"
    version: str = "1"
    sealed: bool = True
    inputs: tuple[TensorSpec, ...] = ()
    output_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_model_name(self.name)
        if not self.inputs:
            self.inputs = (TensorSpec(self.input_name, self.datatype,
                                      check_input_shape(self.input_shape)),)
        self.inputs = tuple(self.inputs)
        if len({s.name for s in self.inputs}) != len(self.inputs):
            raise ServeError("input names must be unique")
        self.output_names = tuple(self.output_names) or (self.output_name,)
        if len(set(self.output_names)) != len(self.output_names):
            raise ServeError("output names must be unique")
        self.module.eval()

    def check_values(self, values: Sequence[Value]) -> None:
        """Let the module refuse a decoded request before it is batched: a module with a
        ``check_inputs(*values)`` method raises :class:`InferenceInputError`."""
        check = getattr(self.module, "check_inputs", None)
        if callable(check):
            check(*values)

    @property
    def max_sample_bytes(self) -> int:
        """An upper bound of one sample's size in a request (JSON: 32 bytes per number)."""
        return sum(max(s.sample_bytes, s.elements * 32) for s in self.inputs)


def build_sealed(
    path: str | os.PathLike[str],
    factory: str,
    *,
    key_provider: KeyProvider,
    allowed_factories: Sequence[str],
    threads: int | None = None,
) -> torch.nn.Module:
    """Check ``factory`` against ``allowed_factories``, build the module, decrypt into it.

    The allow-list check happens before the factory's module is imported. A sealed file: the
    factory takes no argument and the weights are decrypted into what it returns. A sealed
    directory (``sealtorch seal MODEL_DIR``): the factory is called as
    ``factory(path, key_provider=..., threads=...)`` and decrypts what it needs itself (e.g.
    :func:`sealtorch.hf.embedding.sentence_embedding`).
    """
    import torch

    from sealtorch.format.reader import load_into

    func = _factory.resolve(factory, allowed_factories)
    directory = os.path.isdir(path)
    _factory.check_kind(func, directory=directory)
    module = func(path, key_provider=key_provider, threads=threads) if directory else func()
    if not isinstance(module, torch.nn.Module):
        raise FactoryError("the factory did not return a torch.nn.Module")
    if not directory:
        load_into(module, path, key_provider=key_provider, threads=threads)
    return module.eval()
