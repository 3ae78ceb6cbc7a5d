"""Strict reading of a measured configuration file: one TOML table, known fields only.

Both in-TEE roles (dkeycache and ``sealtorch serve``) read such a file; its exact bytes are part
of their measurement, so anything unexpected is an error rather than ignored.
"""

from __future__ import annotations

import tomllib
from typing import Any

from sealtorch.errors import ConfigError


def load_table(raw: bytes, *, table: str, allowed: set[str], max_bytes: int, what: str
               ) -> dict[str, Any]:
    """Return the ``[table]`` of ``raw``; refuse oversize, non-UTF-8/TOML, other tables and
    unknown fields (named in the error only by the allowed set, never by the input)."""
    if len(raw) > max_bytes:
        raise ConfigError(f"{what} larger than {max_bytes} bytes")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{what} is not valid UTF-8 TOML ({type(e).__name__})") from e
    body = doc.get(table)
    if not isinstance(body, dict) or set(doc) != {table}:
        raise ConfigError(f"{what} must contain exactly one [{table}] table")
    if set(body) - allowed:
        raise ConfigError(f"unknown {what} field(s); allowed: {sorted(allowed)}")
    return body
