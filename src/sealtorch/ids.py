"""Identifier rules shared by the sealed format, the key server, the key cache and the runtime.

One definition each, so that a model id accepted by ``sealtorch seal`` is accepted by
``dkeyserver model add``, by a grant and by ``dkeycache`` alike (and refused by all of them
alike). Callers raise their own error type with :data:`MODEL_ID_RULE` as the explanation.
"""

from __future__ import annotations

import re
from typing import TypeGuard

#: longest model id, in characters (ASCII only, so also in bytes)
MODEL_ID_MAX = 128
#: what a valid model id looks like, for error messages
MODEL_ID_RULE = (
    f"1-{MODEL_ID_MAX} characters from A-Z a-z 0-9 . _ : @ + = / -, starting with a letter or "
    "digit, with no empty, '.' or '..' path segment and no trailing '/'"
)
# printable ASCII without whitespace; ids also appear in URL paths, file names, logs and
# headers, so no "." / ".." path segments, no "//" and no trailing "/". Written without
# look-around so that the same pattern is valid in Python, in JSON Schema (ECMA-262) and in the
# key server's request models (Rust regex): it is the one definition all three use.
_C = "A-Za-z0-9._:@+=-"  # segment characters
_N = "A-Za-z0-9_:@+=-"  # segment characters other than "."
MODEL_ID_PATTERN = (
    f"^[A-Za-z0-9][{_C}]*(?:/(?:[{_N}][{_C}]*|\\.[{_N}][{_C}]*|\\.\\.[{_C}]+))*$"
)
_MODEL_ID_RE = re.compile(MODEL_ID_PATTERN)


def is_model_id(value: object) -> TypeGuard[str]:
    """True when ``value`` is a valid model id (see :data:`MODEL_ID_RULE`)."""
    return (isinstance(value, str) and len(value) <= MODEL_ID_MAX
            and _MODEL_ID_RE.fullmatch(value) is not None)
