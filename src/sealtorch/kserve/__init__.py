"""Serve sealed models on KServe: :class:`SealedModel` (a ``kserve.Model``) and
``python -m sealtorch.kserve`` (``kserve.ModelServer``, REST and gRPC). Needs the ``kserve``
extra (``pip install 'sealtorch[kserve]'``).

``kserve`` is imported on first use of :class:`SealedModel`, not here: importing it parses
``sys.argv``, which ``python -m sealtorch.kserve`` must sort out first.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SealedModel"]


def __getattr__(name: str) -> Any:
    if name == "SealedModel":
        from sealtorch.kserve.model import SealedModel

        return SealedModel
    raise AttributeError(name)
