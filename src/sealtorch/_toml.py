"""Strict reading of a measured configuration file: the role's TOML table, known fields only.

Both in-TEE roles (dkeycache, table ``[keycache]``; ``sealtorch serve``, table ``[runtime]``)
read such a file; its exact bytes are part of their measurement, so anything unexpected is an
error rather than ignored. One file may hold both tables, so that in a confidential VM one
launch value (TDX MRCONFIGID, SNP HOST_DATA) binds both roles' configuration. Both also pin the
dkeyserver release-signing key, checked here by one rule.
"""

from __future__ import annotations

import tomllib
from typing import Any

from sealtorch.errors import ConfigError

#: the tables a measured configuration file may hold (each read by its own role)
ROLE_TABLES = frozenset({"keycache", "runtime"})


def load_table(raw: bytes, *, table: str, allowed: set[str], max_bytes: int, what: str
               ) -> dict[str, Any]:
    """Return the ``[table]`` of ``raw``; refuse oversize, non-UTF-8/TOML, tables other than the
    roles' and unknown fields (named in the error only by the allowed set, never by the input)."""
    if len(raw) > max_bytes:
        raise ConfigError(f"{what} larger than {max_bytes} bytes")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{what} is not valid UTF-8 TOML ({type(e).__name__})") from e
    body = doc.get(table)
    if not isinstance(body, dict) or set(doc) - ROLE_TABLES:
        raise ConfigError(f"{what} must contain a [{table}] table and no table other than "
                          f"{', '.join(f'[{t}]' for t in sorted(ROLE_TABLES))}")
    if set(body) - allowed:
        raise ConfigError(f"unknown {what} field(s); allowed: {sorted(allowed)}")
    return body


def pinned_server_key(body: dict[str, Any]) -> str:
    """Return the required ``server_public_key`` of ``body`` after checking it loads as an
    Ed25519 public key (raw base64 or PEM), so a bad pin fails at start-up, not at first grant."""
    from sealtorch.protocol.signing import load_public_key  # cryptography: load only when used

    spk = body.get("server_public_key")
    if not isinstance(spk, str):
        raise ConfigError("server_public_key (the pinned release-signing key) is required")
    try:
        load_public_key(spk)
    except Exception as e:
        raise ConfigError(
            "server_public_key must be a raw Ed25519 key in base64 or a PEM public key"
        ) from e
    return spk


def initdata_path(body: dict[str, Any]) -> str | None:
    """The optional ``initdata`` field of a role's table: the absolute path where the pod's
    CoCo initdata document (or its annotation value) is mounted. When set, the role starts
    only if the VM's launch register binds that document and this config is its
    ``sealtorch.toml`` entry (:mod:`sealtorch.attestation.selfcheck`)."""
    path = body.get("initdata")
    if path is None:
        return None
    if not isinstance(path, str) or not path.startswith("/") or len(path) > 4096:
        raise ConfigError("initdata must be the absolute path of the pod's initdata document "
                          "(e.g. a downward-API file of its cc_init_data annotation)")
    return path
