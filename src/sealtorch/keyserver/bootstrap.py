"""``dkeyserver init`` and the start-up of a configured server: data dir, keys, KEK, store.

``init`` builds the whole data dir in a temporary directory and moves it into place only when
everything (TLS, signing key, KEK, database state, first tenant and token) succeeded, so a
failed init leaves nothing behind and can simply be retried. A new target is renamed into
place in one step; an existing empty target (say, a mount point) is filled entry by entry with
``config.toml`` last, so it never looks initialised before it is.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
import warnings
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealtorch._outputs import write_private
from sealtorch.errors import ConfigError, KeyFileError
from sealtorch.keyserver.admin import add_tenant
from sealtorch.keyserver.config import CONFIG_NAME, ServerConfig, load_config
from sealtorch.keyserver.kek import FileKek, KekProvider, Pkcs11Kek
from sealtorch.keyserver.migrations import migrate
from sealtorch.keyserver.store import Store
from sealtorch.keyserver.tlsutil import make_loopback_tls

TOKEN_FILE = "admin.token"  # noqa: S105 - a file name
SIGNING_PUB = "signing.pub"


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


def _check_target(d: Path) -> None:
    if d.exists() and not d.is_dir():
        raise ConfigError(f"{d} exists and is not a directory; choose another --data-dir")
    if (d / CONFIG_NAME).exists():
        raise ConfigError(f"{d} is already initialised (config.toml exists)")
    if d.is_dir() and any(d.iterdir()):
        raise ConfigError(f"{d} is not empty; give 'dkeyserver init' a new or empty directory")
    for parent in d.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{parent} is a file, so {d} cannot be created; choose "
                                  "another --data-dir")
            break


def init_data_dir(data_dir: str | os.PathLike[str], *, tenant: str = "default",
                  token_ttl: int = 90 * 86400, **settings: object) -> ServerConfig:
    """Create config, TLS CA+cert, signing key, KEK, schema, first tenant and its token file,
    atomically (see the module docstring)."""
    target = Path(data_dir).resolve()
    _check_target(target)
    existing = target.is_dir()
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # in the target itself when it exists (same filesystem, also for a mount point)
    tmp = (target if existing else target.parent) / f".{target.name}.init-{os.urandom(4).hex()}"
    tmp.mkdir(mode=0o700)
    moved: list[Path] = []
    try:
        _init_in(tmp, target, tenant=tenant, token_ttl=token_ttl, **settings)
        if not existing:
            os.replace(tmp, target)
        else:
            entries = sorted(tmp.iterdir(), key=lambda e: e.name == CONFIG_NAME)
            for e in entries:
                os.replace(e, target / e.name)
                moved.append(target / e.name)
            tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for m in moved:
            shutil.rmtree(m, ignore_errors=True) if m.is_dir() else m.unlink(missing_ok=True)
        raise
    return load_config(target)


def _init_in(d: Path, final: Path, *, tenant: str, token_ttl: int, **settings: object) -> None:
    cfg = ServerConfig(data_dir=d, **{k: v for k, v in settings.items()  # type: ignore[arg-type]
                                      if v is not None})
    cfg.validate()
    if cfg.sim:
        warnings.warn("sim attestation enabled: it protects nothing (development only)",
                      RuntimeWarning, stacklevel=3)
    (d / CONFIG_NAME).write_text(cfg.to_toml())
    if not cfg.path(cfg.tls_cert).exists():
        make_loopback_tls(cfg.path(cfg.tls_cert).parent, [cfg.release_host, cfg.admin_host])
    sk = Ed25519PrivateKey.generate()
    write_private(cfg.path(cfg.signing_key), sk.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (d / SIGNING_PUB).write_bytes(sk.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    kek = open_kek(cfg, create=True)
    store = Store(cfg.db_url, kek, data_dir=d)
    try:
        migrate(store.db, store.keyring)
        with store.states.change(int(time.time()), create=True) as ch:
            ch.audit(actor="init", action="init", decision="admin", code="ok", tenant=tenant,
                     details={"tenant": tenant, "data_dir": str(final)})
            _, token = add_tenant(ch, tenant, token_ttl, actor="init")
        write_private(d / TOKEN_FILE, (token + "\n").encode("ascii"))
    finally:
        store.close()
        kek.close()


def open_store(cfg: ServerConfig) -> tuple[Store, KekProvider]:
    """The store of a configured server: migrated, data keys open, high-water mark read."""
    kek = open_kek(cfg)
    store = Store(cfg.db_url, kek, data_dir=cfg.data_dir,
                  recheck_seconds=cfg.state_recheck_seconds)
    try:
        store.open()
    except BaseException:
        store.close()
        kek.close()
        raise
    return store, kek
