"""The runtime's measured configuration (TOML ``[runtime]`` table).

It pins the dkeyserver release-signing public key that ``sealtorch serve`` trusts for the grants
the key cache relays. The file is part of the TEE measurement (a Gramine trusted file, TDX
MRCONFIGID, SNP HOST_DATA, sim: ``sim.measure("serve", raw)``), so a host cannot swap the key.

Example::

    [runtime]
    server_public_key = "<base64 raw Ed25519 key, or PEM>"
    initdata = "/run/sealtorch-initdata/cc_init_data"  # optional: CoCo pod, docs/kserve.md
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from sealtorch._toml import initdata_path, load_table, pinned_server_key
from sealtorch.errors import ConfigError

MAX_CONFIG_BYTES = 16 * 1024
_ALLOWED = {"server_public_key", "initdata"}


@dataclass(frozen=True)
class RuntimeConfig:
    """Parsed runtime configuration; ``raw`` is the exact file bytes (what is measured)."""

    server_public_key: str
    initdata: str | None = None  # CoCo: bound through this initdata document
    raw: bytes = field(default=b"", repr=False)


def parse_runtime_config(raw: bytes) -> RuntimeConfig:
    """Parse and validate runtime configuration bytes (unknown fields are errors)."""
    rt = load_table(raw, table="runtime", allowed=_ALLOWED, max_bytes=MAX_CONFIG_BYTES,
                    what="runtime config")
    return RuntimeConfig(server_public_key=pinned_server_key(rt), initdata=initdata_path(rt),
                         raw=bytes(raw))


def load_runtime_config(path: str | os.PathLike[str]) -> RuntimeConfig:
    """Read and parse the runtime configuration file at ``path``."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read runtime config {p} ({e.strerror})") from e
    return parse_runtime_config(raw)


def render_runtime_config(server_public_key: str) -> bytes:
    """The canonical text of a runtime config pinning ``server_public_key``."""
    if "\n" in server_public_key.strip() or '"' in server_public_key:
        raise ConfigError("pass the server key as base64 of the raw 32 bytes")
    return f'[runtime]\nserver_public_key = "{server_public_key.strip()}"\n'.encode()
