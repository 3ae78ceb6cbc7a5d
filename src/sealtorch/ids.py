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
# headers, so no "." / ".." path segments, no "//" and no trailing "/"
_MODEL_ID_RE = re.compile(
    r"(?!.*(?:/\.{1,2}(?:/|\Z)|//|/\Z))[A-Za-z0-9][A-Za-z0-9._:@+=/-]{0,"
    + str(MODEL_ID_MAX - 1) + r"}\Z"
)


def is_model_id(value: object) -> TypeGuard[str]:
    """True when ``value`` is a valid model id (see :data:`MODEL_ID_RULE`)."""
    return isinstance(value, str) and _MODEL_ID_RE.match(value) is not None
