"""Sealed Hugging Face checkpoints (docs/huggingface.md).

    sealtorch.hf.seal_pretrained(MODEL_DIR, SEALED_DIR, key)      # owner side
    sealtorch.hf.from_pretrained(SEALED_DIR, key=... | key_provider=...)  # a transformers model
    sealtorch.hf.tokenizer_from_pretrained(SEALED_DIR, key=... | key_provider=...)
    sealtorch.hf.SealedDir(SEALED_DIR, key=...)                   # the checked directory

Names are imported lazily: sealing needs no ``transformers``; loading needs the ``hf`` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_LAZY = {
    "seal_pretrained": "sealtorch.hf.seal",
    "from_pretrained": "sealtorch.hf.pretrained",
    "tokenizer_from_pretrained": "sealtorch.hf.pretrained",
    "SealedDir": "sealtorch.hf.sealed_dir",
}

__all__ = ["SealedDir", "from_pretrained", "seal_pretrained", "tokenizer_from_pretrained"]

if TYPE_CHECKING:  # pragma: no cover
    from sealtorch.hf.pretrained import from_pretrained as from_pretrained
    from sealtorch.hf.pretrained import tokenizer_from_pretrained as tokenizer_from_pretrained
    from sealtorch.hf.seal import seal_pretrained as seal_pretrained
    from sealtorch.hf.sealed_dir import SealedDir as SealedDir


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sealtorch.hf' has no attribute {name!r}")
