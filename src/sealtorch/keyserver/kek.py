"""KEK providers: wrap and unwrap secrets at rest with AES-256-GCM under a caller's AAD, with
a key the database never sees. What gets wrapped, under which AAD, is ``keyring.py``'s business.

``file``: a 32-byte KEK in a 0600 file; HKDF-SHA256 derives the wrapping key from it.
``pkcs11``: an AES-256 key generated inside a PKCS#11 token (SoftHSM2 in tests),
non-extractable, so the KEK never leaves the token.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealtorch._secret import Secret
from sealtorch.errors import ConfigError, TamperError

_WRAP_VERSION = b"\x01"
_NONCE_LEN = 12
KEK_FILE_MODE = 0o600


class KekProvider(Protocol):
    """What the store needs from a KEK."""

    name: str

    def wrap(self, key: Secret, aad: bytes) -> bytes: ...

    def unwrap(self, blob: bytes, aad: bytes) -> Secret: ...

    def close(self) -> None: ...


def _tamper() -> TamperError:
    return TamperError(
        "a wrapped key does not open with the KEK and its tenant/model/version AAD: the database "
        "row was swapped or edited (or the KEK changed); restore it from a trusted backup"
    )


class FileKek:
    """A 32-byte KEK held in a 0600 file; the wrapping key is HKDF-derived from it."""

    name = "file"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        try:
            st = p.stat()
        except FileNotFoundError as e:
            raise ConfigError(f"KEK file {p} does not exist; run 'dkeyserver init'") from e
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise ConfigError(f"KEK file {p} is readable by group/others; chmod 600 it")
        raw = bytearray(p.read_bytes())
        if len(raw) != 32:
            Secret.take(raw).wipe()
            raise ConfigError(f"KEK file {p} must hold exactly 32 raw bytes")
        with Secret.take(raw) as kek:
            self._wrap = AESGCM(self._derive(kek, b"wrap"))

    @staticmethod
    def _derive(kek: Secret, label: bytes) -> bytes:
        return HKDF(hashes.SHA256(), 32, salt=None, info=b"sealtorch-kek/v1 " + label).derive(
            bytes(kek)
        )

    @staticmethod
    def create(path: str | os.PathLike[str]) -> None:
        """Write a fresh random KEK file with mode 0600 (refuses to overwrite)."""
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEK_FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))

    def wrap(self, key: Secret, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE_LEN)
        return _WRAP_VERSION + nonce + self._wrap.encrypt(nonce, bytes(key), aad)

    def unwrap(self, blob: bytes, aad: bytes) -> Secret:
        if len(blob) < 1 + _NONCE_LEN + 16 or blob[:1] != _WRAP_VERSION:
            raise _tamper()
        try:
            return Secret(self._wrap.decrypt(blob[1:13], blob[13:], aad))
        except InvalidTag as e:
            raise _tamper() from e

    def close(self) -> None:
        """Nothing to wipe by hand: the derived key lives only inside the AES-GCM context."""


class Pkcs11Kek:
    """KEK inside a PKCS#11 token: AES-256-GCM wrapping done by the token."""

    name = "pkcs11"
    WRAP_LABEL = "sealtorch-kek-wrap"

    def __init__(self, module: str, token_label: str, pin: str, *, create: bool = False) -> None:
        import pkcs11
        from pkcs11 import Attribute, KeyType, ObjectClass

        try:
            lib = pkcs11.lib(module)
            token = lib.get_token(token_label=token_label)
            self._session = token.open(user_pin=pin, rw=True)
        except Exception as e:  # python-pkcs11 raises many distinct types
            raise ConfigError(
                f"cannot open PKCS#11 token {token_label!r} with module {module} "
                f"({type(e).__name__}); check the module path, token label and PIN"
            ) from e
        self._lock = threading.Lock()
        tmpl = {Attribute.EXTRACTABLE: False, Attribute.SENSITIVE: True, Attribute.TOKEN: True}

        def get_or_create(label: str, kt: KeyType, extra: dict[Any, Any]) -> Any:
            try:
                return self._session.get_key(ObjectClass.SECRET_KEY, kt, label=label)
            except pkcs11.NoSuchKey:
                if not create:
                    raise ConfigError(
                        f"PKCS#11 token has no key {label!r}; run 'dkeyserver init'"
                    ) from None
                return self._session.generate_key(
                    kt, 256, label=label, store=True, template={**tmpl, **extra}
                )

        self._wrap_key = get_or_create(self.WRAP_LABEL, KeyType.AES,
                                       {Attribute.ENCRYPT: True, Attribute.DECRYPT: True})

    def wrap(self, key: Secret, aad: bytes) -> bytes:
        from pkcs11 import Mechanism
        from pkcs11.mechanisms import GCMParams

        nonce = os.urandom(_NONCE_LEN)
        with self._lock:
            ct = self._wrap_key.encrypt(
                bytes(key), mechanism=Mechanism.AES_GCM,
                mechanism_param=GCMParams(nonce, aad, 128))
        return _WRAP_VERSION + nonce + bytes(ct)

    def unwrap(self, blob: bytes, aad: bytes) -> Secret:
        from pkcs11 import Mechanism, PKCS11Error
        from pkcs11.mechanisms import GCMParams

        if len(blob) < 1 + _NONCE_LEN + 16 or blob[:1] != _WRAP_VERSION:
            raise _tamper()
        try:
            with self._lock:
                pt = self._wrap_key.decrypt(
                    blob[13:], mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(blob[1:13], aad, 128))
        except PKCS11Error as e:
            raise _tamper() from e
        return Secret(pt)

    def close(self) -> None:
        try:
            self._session.close()
        except Exception:  # noqa: S110 - best effort on shutdown
            pass
