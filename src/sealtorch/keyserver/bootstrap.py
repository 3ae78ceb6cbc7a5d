"""``dkeyserver init`` and the start-up of a configured server: data dir, keys, KEK, store."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealtorch.errors import ConfigError, KeyFileError
from sealtorch.keyserver.config import CONFIG_NAME, ServerConfig, load_config
from sealtorch.keyserver.kek import FileKek, KekProvider, Pkcs11Kek
from sealtorch.keyserver.store import Store
from sealtorch.keyserver.tlsutil import make_loopback_tls

TOKEN_FILE = "admin.token"  # noqa: S105 - a file name
SIGNING_PUB = "signing.pub"


def _write_secret_file(path: Path, data: bytes) -> None:
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def open_kek(cfg: ServerConfig, *, create: bool = False) -> KekProvider:
    if cfg.kek == "file":
        p = cfg.path(cfg.kek_file)
        if create and not p.exists():
            FileKek.create(p)
        return FileKek(p)
    pin = os.environ.get(cfg.pkcs11_pin_env)
    if not pin:
        raise ConfigError(f"PKCS#11 PIN not set: export it in ${cfg.pkcs11_pin_env}")
    return Pkcs11Kek(cfg.pkcs11_module, cfg.pkcs11_token, pin, create=create)


def load_signing_key(cfg: ServerConfig) -> Ed25519PrivateKey:
    p = cfg.path(cfg.signing_key)
    try:
        st = p.stat()
    except FileNotFoundError as e:
        raise ConfigError(f"release-signing key {p} missing; run 'dkeyserver init'") from e
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise KeyFileError(f"release-signing key {p} is readable by group/others; chmod 600")
    key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{p} is not an Ed25519 private key")
    return key


def init_data_dir(data_dir: str | os.PathLike[str], *, tenant: str = "default",
                  token_ttl: int = 90 * 86400, **settings: object) -> ServerConfig:
    """Create config, TLS CA+cert, signing key, KEK, schema, first tenant and its token file."""
    d = Path(data_dir).resolve()
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (d / CONFIG_NAME).exists():
        raise ConfigError(f"{d} is already initialised (config.toml exists)")
    cfg = ServerConfig(data_dir=d, **{k: v for k, v in settings.items()  # type: ignore[arg-type]
                                       if v is not None})
    cfg.validate()
    if cfg.sim:
        warnings.warn("sim attestation enabled: it protects nothing (development only)",
                      RuntimeWarning, stacklevel=2)
    (d / CONFIG_NAME).write_text(cfg.to_toml())
    if not cfg.path(cfg.tls_cert).exists():
        make_loopback_tls(cfg.path(cfg.tls_cert).parent,
                          [cfg.release_host, cfg.admin_host])
    sk = Ed25519PrivateKey.generate()
    _write_secret_file(cfg.path(cfg.signing_key), sk.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (d / SIGNING_PUB).write_bytes(sk.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    kek = open_kek(cfg, create=True)
    store = Store(cfg.db_url, kek)
    try:
        store.migrate()
        with store.tx() as conn:
            store.add_tenant(conn, tenant)
            _, token = store.create_token(conn, tenant, token_ttl)
            store.append_audit(conn, actor="init", action="init", decision="admin", code="ok",
                               tenant=tenant, details={"tenant": tenant})
        _write_secret_file(d / TOKEN_FILE, (token + "\n").encode("ascii"))
    finally:
        store.close()
        kek.close()
    return load_config(d)


def open_store(cfg: ServerConfig) -> tuple[Store, KekProvider]:
    kek = open_kek(cfg)
    store = Store(cfg.db_url, kek)
    store.migrate()
    return store, kek
