"""sealtorch: PyTorch weights that are available but invisible outside an attested TEE.

Public API (everything else is internal)::

    sealtorch.seal(obj, path, key, ...)          # owner side: encrypt a state_dict / module / file
    sealtorch.load(path, key=..., key_provider=...) -> dict[str, torch.Tensor]
    sealtorch.load_into(module, path, ...)        # decrypt straight into a module's storage
    sealtorch.KeyProvider                         # protocol: header -> that file's key
    sealtorch.KeyCacheClient(socket_path)         # a KeyProvider backed by dkeycache

Names are imported lazily so that ``import sealtorch`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "seal": "sealtorch.format.writer",
    "load": "sealtorch.format.reader",
    "load_into": "sealtorch.format.reader",
    "KeyProvider": "sealtorch.format.keys",
    "KeyCacheClient": "sealtorch.keycache.client",
}

__all__ = ["KeyCacheClient", "KeyProvider", "__version__", "errors", "load", "load_into", "seal"]

if TYPE_CHECKING:  # pragma: no cover
    from sealtorch import errors as errors
    from sealtorch.format.keys import KeyProvider as KeyProvider
    from sealtorch.format.reader import load as load
    from sealtorch.format.reader import load_into as load_into
    from sealtorch.format.writer import seal as seal
    from sealtorch.keycache.client import KeyCacheClient as KeyCacheClient


def __getattr__(name: str) -> Any:
    import importlib

    if name == "errors":
        return importlib.import_module("sealtorch.errors")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sealtorch' has no attribute {name!r}")
