"""Canonical JSON: the one byte encoding that sealtorch signs, MACs and hashes.

Keys sorted, no whitespace, ASCII only, no NaN/Infinity, and only JSON-native types, so two
implementations that agree on the value agree on the bytes.
"""

from __future__ import annotations

import json
from typing import Any


def canonical_json(obj: Any) -> bytes:
    """Encode ``obj`` canonically (sorted keys, compact separators, ASCII, no NaN)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")
