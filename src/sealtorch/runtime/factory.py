"""Model factories: ``package.module:function`` strings checked against the policy allow-list.

A host can pass any ``--factory`` on the command line, and the command line of an SGX enclave is
not always measured; so the factory is compared with the allow-list carried in the model's
*signed* policy **before** its module is imported (importing runs code).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Sequence
from typing import Any

from sealtorch.errors import FactoryError

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
FACTORY_RE = re.compile(rf"{_IDENT}(\.{_IDENT})*:{_IDENT}")
MAX_FACTORY_LEN = 200


def validate_factory(spec: object) -> str:
    """Return ``spec`` if it looks like ``package.module:function``; raise otherwise."""
    if not isinstance(spec, str) or len(spec) > MAX_FACTORY_LEN or not FACTORY_RE.fullmatch(spec):
        raise FactoryError(
            "the factory must look like 'package.module:function' (letters, digits, '_' "
            f"and '.', at most {MAX_FACTORY_LEN} characters)"
        )
    return spec


def check_allowed(spec: str, allowed: Sequence[str]) -> None:
    """Refuse ``spec`` unless it is exactly one of the policy's ``factories``."""
    validate_factory(spec)
    if spec not in tuple(allowed):
        if not allowed:
            raise FactoryError(
                "the model's policy allows no factory for `sealtorch serve`; the model owner "
                "must add it to the policy's 'factories' list"
            )
        names = ", ".join(sorted(allowed))
        raise FactoryError(
            "the factory is not on the model policy's 'factories' allow-list; pass one of "
            f"them to --factory ({names}) or ask the model owner to add it"
        )


def resolve(spec: str, allowed: Sequence[str]) -> Any:
    """Check ``spec`` against ``allowed``, then import it and return the callable."""
    check_allowed(spec, allowed)
    module_name, func_name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise FactoryError(f"cannot import the factory's module ({type(e).__name__})") from e
    func = getattr(module, func_name, None)
    if not callable(func):
        raise FactoryError("the factory's module has no callable of that name")
    return func


def check_kind(func: Any, *, directory: bool) -> None:
    """Refuse a factory of the other kind than the sealed input: a directory factory takes the
    sealed directory and a ``key_provider`` keyword, a file factory takes no argument."""
    try:
        takes_dir = "key_provider" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        takes_dir = False
    if takes_dir and not directory:
        raise FactoryError("the factory builds a model from a sealed directory (`sealtorch seal "
                           "MODEL_DIR`), but the sealed model given is a file")
    if directory and not takes_dir:
        raise FactoryError("the sealed model given is a directory, but the factory builds a "
                           "module for a sealed file; pass a directory factory such as "
                           "sealtorch.hf.embedding:sentence_embedding")
