"""The runtime's measured configuration is strict."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sealtorch.errors import ConfigError
from sealtorch.runtime.config import (
    load_runtime_config,
    parse_runtime_config,
    render_runtime_config,
)

KEY = base64.b64encode(Ed25519PrivateKey.generate().public_key().public_bytes(
    Encoding.Raw, PublicFormat.Raw)).decode()


def test_round_trip(tmp_path: Path) -> None:
    raw = render_runtime_config(KEY)
    (tmp_path / "r.toml").write_bytes(raw)
    cfg = load_runtime_config(tmp_path / "r.toml")
    assert cfg.server_public_key == KEY and cfg.raw == raw


@pytest.mark.parametrize("raw,msg", [
    (b"not toml [", "not valid UTF-8 TOML"),
    (b"\xff\xfe", "not valid UTF-8 TOML"),
    (b"[other]\nx = 1\n", "a [runtime] table and no table other than"),
    (b"[runtime]\n", "server_public_key"),
    (b'[runtime]\nserver_public_key = "abc"\n', "raw Ed25519 key"),
    (f'[runtime]\nserver_public_key = "{KEY}"\nurl = "x"\n'.encode(), "unknown runtime config"),
    (b"x" * 20000, "larger than"),
])
def test_bad_configs(raw: bytes, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        parse_runtime_config(raw)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read runtime config"):
        load_runtime_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="base64"):
        render_runtime_config('a"b')


def test_one_file_can_hold_both_roles_tables(tmp_path: Path) -> None:
    """In a confidential VM one launch value binds one file: both roles read their table."""
    from sealtorch.keycache.config import parse_config

    raw = (f'[runtime]\nserver_public_key = "{KEY}"\n\n[keycache]\n'
           f'keyserver_url = "https://127.0.0.1:8443"\nserver_public_key = "{KEY}"\n').encode()
    (tmp_path / "sealtorch.toml").write_bytes(raw)
    assert load_runtime_config(tmp_path / "sealtorch.toml").server_public_key == KEY
    assert parse_config(raw).keyserver_url == "https://127.0.0.1:8443"
