"""Key server configuration: a TOML file in the data dir, overridable by environment variables
(``SEALTORCH_KS_<FIELD>``). Strict defaults: loopback listeners, sim off, manual cache approval."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sealtorch._net import is_loopback_host
from sealtorch.errors import ConfigError

CONFIG_NAME = "config.toml"
#: upper bound of ``keepalive_seconds``: an idle connection costs memory until it times out
KEEPALIVE_MAX = 600
ENV_PREFIX = "SEALTORCH_KS_"


@dataclass
class ServerConfig:
    """Everything ``dkeyserver serve`` needs; paths are relative to ``data_dir``."""

    data_dir: Path
    db: str = ""
    release_host: str = "127.0.0.1"
    release_port: int = 8443
    admin_host: str = "127.0.0.1"
    admin_port: int = 8444
    tls_cert: str = "tls/server.crt"
    tls_key: str = "tls/server.key"
    ca_cert: str = "tls/ca.crt"
    signing_key: str = "signing.key"
    kek: str = "file"
    kek_file: str = "kek.bin"
    pkcs11_module: str = "/usr/lib/softhsm/libsofthsm2.so"
    pkcs11_token: str = "sealtorch"  # noqa: S105 - a token label, not a secret
    pkcs11_pin_env: str = "SEALTORCH_PKCS11_PIN"
    sim: bool = False
    auto_approve: bool = False
    nonce_ttl: int = 120
    lease_seconds: int = 300
    rate_per_client: float = 500.0
    rate_per_token: float = 50.0
    workers: int = 1
    collateral_dir: str = "collateral"
    #: the verified state is checked against every row at least this often (rows edited in
    #: place are caught then); any change of the state sequence reloads it at once
    state_recheck_seconds: float = 60.0
    #: an idle keep-alive connection is closed after this long; longer than a cache's 30 s
    #: status poll, so that polls reuse their connection instead of a new TLS handshake each
    #: (every idle connection holds a socket and its TLS buffers: bounded by KEEPALIVE_MAX)
    keepalive_seconds: int = 75
    extra: dict[str, Any] = field(default_factory=dict)

    def path(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.data_dir / p

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{self.data_dir / 'keyserver.db'}"

    def validate(self) -> None:
        if self.kek not in ("file", "pkcs11"):
            raise ConfigError("kek must be 'file' or 'pkcs11'")
        if self.sim and not is_loopback_host(self.release_host):
            raise ConfigError(
                "sim attestation is enabled but the release listener is not loopback-only; "
                "sim protects nothing: bind 127.0.0.1 or turn sim off"
            )
        if not 1 <= self.nonce_ttl <= 3600:
            raise ConfigError("nonce_ttl must be between 1 and 3600 seconds")
        if not 1 <= self.lease_seconds <= 30 * 86400:
            raise ConfigError("lease_seconds must be between 1 second and 30 days")
        if not 1 <= self.workers <= 64:
            raise ConfigError("workers must be between 1 and 64")
        if not 0 <= self.state_recheck_seconds <= 3600:
            raise ConfigError("state_recheck_seconds must be between 0 and 3600")
        if not 1 <= self.keepalive_seconds <= KEEPALIVE_MAX:
            raise ConfigError(f"keepalive_seconds must be between 1 and {KEEPALIVE_MAX} "
                              "(idle connections hold memory until they time out)")

    def to_toml(self) -> str:
        lines = []
        for f in fields(self):
            if f.name in ("data_dir", "extra"):
                continue
            v = getattr(self, f.name)
            if isinstance(v, bool):
                lines.append(f"{f.name} = {'true' if v else 'false'}")
            elif isinstance(v, int | float):
                lines.append(f"{f.name} = {v}")
            else:
                esc = str(v).replace("\\", "\\\\").replace('"', '\\"')
                lines.append(f'{f.name} = "{esc}"')
        return "\n".join(lines) + "\n"


def _coerce(name: str, typ: Any, raw: Any) -> Any:
    t = typ if isinstance(typ, type) else {"bool": bool, "int": int, "float": float}.get(
        str(typ), str)
    try:
        if t is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if t is int:
            return int(raw)
        if t is float:
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config field {name!r} has the wrong type") from e


def load_config(data_dir: str | os.PathLike[str], **overrides: Any) -> ServerConfig:
    """Read ``data_dir/config.toml``, then ``SEALTORCH_KS_*`` environment, then ``overrides``."""
    d = Path(data_dir).resolve()
    values: dict[str, Any] = {}
    cfg_path = d / CONFIG_NAME
    if cfg_path.is_file():
        try:
            values.update(tomllib.loads(cfg_path.read_text()))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{cfg_path} is not valid TOML") from e
    known = {f.name: f.type for f in fields(ServerConfig) if f.name not in ("data_dir", "extra")}
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(f"{cfg_path}: unknown settings {sorted(unknown)}")
    for name in known:
        env = os.environ.get(ENV_PREFIX + name.upper())
        if env is not None:
            values[name] = env
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = ServerConfig(data_dir=d, **{k: _coerce(k, known[k], v) for k, v in values.items()})
    cfg.validate()
    return cfg
