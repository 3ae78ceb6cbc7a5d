"""Model key files: a 256-bit model key with its model id and key version, as 0600 JSON.

The key file is the owner's secret; it never leaves the owner's machine (the key server holds
its own copy wrapped by a KEK). Format: ``{"format": "sealtorch-key/v1", "model_id",
"key_version", "key": base64(32 bytes), "created"}``.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from sealtorch._outputs import write_all
from sealtorch._secret import Secret
from sealtorch.errors import KeyFileError
from sealtorch.ids import MODEL_ID_RULE, is_model_id

KEY_FILE_FORMAT = "sealtorch-key/v1"
MODEL_KEY_BYTES = 32
MAX_KEY_VERSION = 2**32 - 1
_MAX_KEY_FILE_BYTES = 4096


def validate_model_id(model_id: object) -> str:
    """Return ``model_id`` if it is a valid model id, else raise :class:`KeyFileError`."""
    if not is_model_id(model_id):
        raise KeyFileError(f"invalid model id: use {MODEL_ID_RULE}")
    return model_id


def validate_key_version(key_version: object) -> int:
    """Return ``key_version`` if it is an integer in 1..2**32-1, else raise."""
    if (
        not isinstance(key_version, int)
        or isinstance(key_version, bool)
        or not 1 <= key_version <= MAX_KEY_VERSION
    ):
        raise KeyFileError("invalid key version: must be an integer from 1 to 4294967295")
    return key_version


@dataclass(frozen=True)
class ModelKey:
    """A model key: the 32-byte secret that seals every file of one model id and key version."""

    model_id: str
    key_version: int
    key: Secret
    created: str

    def __post_init__(self) -> None:
        validate_model_id(self.model_id)
        validate_key_version(self.key_version)
        if not isinstance(self.key, Secret) or len(self.key) != MODEL_KEY_BYTES:
            raise KeyFileError("a model key must be a Secret of exactly 32 bytes")

    def __repr__(self) -> str:
        return (
            f"ModelKey(model_id={self.model_id!r}, key_version={self.key_version}, "
            f"key=<redacted>, created={self.created!r})"
        )

    def wipe(self) -> None:
        """Zero the key bytes (the object is unusable afterwards)."""
        self.key.wipe()


def _now() -> str:
    return (
        datetime.datetime.now(datetime.UTC)
        .replace(microsecond=0)
        .isoformat()
        .replace("+00:00", "Z")
    )


def generate_model_key(model_id: str, key_version: int = 1) -> ModelKey:
    """Make a fresh random 256-bit model key (from the OS CSPRNG)."""
    return ModelKey(
        model_id=validate_model_id(model_id),
        key_version=validate_key_version(key_version),
        key=Secret.take(bytearray(secrets.token_bytes(MODEL_KEY_BYTES))),
        created=_now(),
    )


def write_key_file(path: str | os.PathLike[str], mk: ModelKey, *, overwrite: bool = False) -> None:
    """Write ``mk`` as a key file with mode 0600; refuse to replace a file unless ``overwrite``."""
    p = Path(path)
    doc = {
        "format": KEY_FILE_FORMAT,
        "model_id": mk.model_id,
        "key_version": mk.key_version,
        "key": base64.b64encode(mk.key.view()).decode("ascii"),
        "created": mk.created,
    }
    data = bytearray(json.dumps(doc, indent=2, sort_keys=True).encode("ascii") + b"\n")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    if overwrite and p.exists():
        if p.is_symlink() or not p.is_file():
            raise KeyFileError(f"{p}: not a regular file; refusing to overwrite it")
        p.unlink()
    try:
        fd = os.open(p, flags, 0o600)
    except FileExistsError:
        raise KeyFileError(
            f"{p}: already exists; refusing to overwrite a key file (pass overwrite=True / "
            "--force if you really mean to destroy the old key)"
        ) from None
    except OSError as e:
        raise KeyFileError(f"{p}: cannot create key file ({e.strerror})") from None
    try:
        os.fchmod(fd, 0o600)
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
        from sealtorch._secret import wipe

        wipe(data)


def read_key_file(path: str | os.PathLike[str]) -> ModelKey:
    """Read and validate a key file; refuse files readable by group or others."""
    if not isinstance(path, str | os.PathLike):
        raise KeyFileError(
            f"key= takes a ModelKey, a model-key Secret or a key file path, not "
            f"{type(path).__name__}; for raw key bytes build a ModelKey with its model id "
            "(or write a key file with `sealtorch keygen`)"
        )
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise KeyFileError(f"{p}: cannot open key file ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{p}: not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"{p}: key file is accessible by group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {p}`"
            )
        if st.st_size > _MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"{p}: too large to be a sealtorch key file")
        raw = bytearray(os.read(fd, _MAX_KEY_FILE_BYTES + 1))
    finally:
        os.close(fd)
    try:
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise KeyFileError(f"{p}: not a JSON key file") from None
        if not isinstance(doc, dict) or doc.get("format") != KEY_FILE_FORMAT:
            raise KeyFileError(f"{p}: not a {KEY_FILE_FORMAT} key file")
        expected = {"format", "model_id", "key_version", "key", "created"}
        if set(doc) != expected:
            raise KeyFileError(f"{p}: key file must have exactly the fields {sorted(expected)}")
        b64 = doc["key"]
        if not isinstance(b64, str):
            raise KeyFileError(f"{p}: key must be a base64 string")
        try:
            key = bytearray(base64.b64decode(b64.encode("ascii"), validate=True))
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise KeyFileError(f"{p}: key is not valid base64") from None
        if len(key) != MODEL_KEY_BYTES:
            raise KeyFileError(f"{p}: key must be exactly 32 bytes")
        created = doc["created"]
        if not isinstance(created, str) or len(created) > 64:
            raise KeyFileError(f"{p}: created must be a short timestamp string")
        try:
            return ModelKey(
                model_id=validate_model_id(doc["model_id"]),
                key_version=validate_key_version(doc["key_version"]),
                key=Secret.take(key),
                created=created,
            )
        except KeyFileError as e:
            raise KeyFileError(f"{p}: {e}") from None
    finally:
        from sealtorch._secret import wipe

        wipe(raw)
