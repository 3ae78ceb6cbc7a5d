"""The sim software TEE: platform key, code measurement and the signed evidence body.

sim protects nothing. It exists so that development and CI can run the whole attested key flow
without TEE hardware, and it is fenced in: a verifier trusts only platform keys registered with
it, attester detection never picks it, and every process that uses it warns. Evidence is
``signature(64 bytes) || body`` where ``body`` is canonical JSON naming the measurement, the
report data, the platform public key and the role, signed with the platform's Ed25519 key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sealtorch.errors import (
    AttestationError,
    EvidenceFormatError,
    KeyFileError,
    VerificationError,
)
from sealtorch.protocol.canonical import canonical_json

BODY_FORMAT = "sealtorch-sim/v1"
MEASURE_LABEL = b"sealtorch-sim-measure/v1"
KEY_FILE = "platform_key.pem"
PUBLIC_FILE = "platform_key.pub"
SIG_LEN = 64
MEASUREMENT_LEN = 32
MAX_BODY = 4096
ROLE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
#: fixed arguments each known role runs with; part of its measurement
ROLE_ARGS: dict[str, tuple[str, ...]] = {
    "dkeycache": ("python", "-I", "-m", "sealtorch.keycache"),
    "serve": ("python", "-I", "-m", "sealtorch", "serve"),
    "demo": ("python", "-I", "-m", "sealtorch", "demo"),
    "runtime": ("python", "-I", "-m", "sealtorch"),
}


def default_dir() -> Path:
    """``$SEALTORCH_SIM_DIR`` or ``~/.sealtorch/sim``."""
    env = os.environ.get("SEALTORCH_SIM_DIR")
    return Path(env) if env else Path.home() / ".sealtorch" / "sim"


def init_platform_key(directory: Path | str | None = None, *, overwrite: bool = False) -> Path:
    """Create a sim platform key (Ed25519, 0600 PEM) and its public key; return the key path.

    Refuses to replace an existing key unless ``overwrite`` is set.
    """
    from sealtorch._outputs import output_dir, staged, write_all, write_file

    d = output_dir(Path(directory) if directory is not None else default_dir(), mode=0o700)
    key_path = d / KEY_FILE
    if key_path.exists() and not overwrite:
        raise KeyFileError(
            f"a sim platform key already exists at {key_path}; pass --force (overwrite=True) "
            "to replace it"
        )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # the public key first: a write cut short leaves no private key, so a retry needs no --force
    write_file(d / PUBLIC_FILE, pub, overwrite=True)
    with staged(key_path, overwrite=True) as (fd, _):  # mode 0600; existence checked above
        write_all(fd, pem)
    return key_path


def load_platform_key(path: Path | str) -> Ed25519PrivateKey:
    """Read a sim platform private key; refuses files readable by group or others."""
    p = Path(path)
    try:
        st = p.stat()
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(f"sim platform key {p} is accessible by others; chmod 600 it")
        data = p.read_bytes()
    except OSError as e:
        raise KeyFileError(f"cannot read sim platform key {p}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{p} is not a PEM Ed25519 private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{p} is not an Ed25519 private key")
    return key


#: the text forms of a sim platform public key: 64 hex characters, canonical base64 of the 32
#: raw bytes, or the one-line PEM of its SubjectPublicKeyInfo (whose DER prefix for Ed25519 is
#: fixed, so the pattern pins the whole document). The admin API accepts exactly these.
_B64_32 = "[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]="
PLATFORM_PUBLIC_KEY_PATTERN = (
    f"^(?:[0-9a-fA-F]{{64}}|{_B64_32}|-----BEGIN PUBLIC KEY-----\\r?\\nMCowBQYDK2VwAyEA"
    f"{_B64_32}\\r?\\n-----END PUBLIC KEY-----(?:\\r?\\n)?)$"
)
_PLATFORM_PUBLIC_KEY_RE = re.compile(PLATFORM_PUBLIC_KEY_PATTERN)


def platform_public_key_from_text(text: str) -> Ed25519PublicKey:
    """A sim platform public key from one of its text forms (never a file path: this is what
    the admin API calls with request input)."""
    if _PLATFORM_PUBLIC_KEY_RE.fullmatch(text) is None:
        raise KeyFileError("sim platform key must be 64 hex characters, base64 of 32 bytes or "
                           "an Ed25519 public key PEM")
    if text.startswith("-----BEGIN"):
        return _pem_public(text.encode("ascii"), "sim platform key")
    raw = bytes.fromhex(text) if len(text) == 64 else base64.b64decode(text, validate=True)
    return Ed25519PublicKey.from_public_bytes(raw)


def load_platform_public_key(value: Ed25519PublicKey | bytes | str | Path) -> Ed25519PublicKey:
    """A registered sim platform public key from a key object, 32 raw bytes, one of the text
    forms of :func:`platform_public_key_from_text`, or a path to a ``.pub`` PEM (or the
    private key file). For the CLI: it reads files."""
    if isinstance(value, Ed25519PublicKey):
        return value
    if isinstance(value, bytes) and len(value) == 32:
        return Ed25519PublicKey.from_public_bytes(value)
    if isinstance(value, str):
        s = value.strip()
        if _PLATFORM_PUBLIC_KEY_RE.fullmatch(s) is not None:
            return platform_public_key_from_text(s)
        value = Path(s).expanduser()
    if isinstance(value, Path):
        try:
            data = value.read_bytes()
        except OSError as e:
            raise KeyFileError(f"cannot read sim platform key {value}: {e.strerror}") from None
        if b"PRIVATE KEY" in data:
            return load_platform_key(value).public_key()
        return _pem_public(data, str(value))
    raise KeyFileError("sim platform key must be a path, PEM, hex or base64 Ed25519 public key")


def _pem_public(data: bytes, where: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise KeyFileError(f"{where}: not a PEM Ed25519 public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{where}: not an Ed25519 public key")
    return key


def raw_public(key: Ed25519PublicKey) -> bytes:
    """32 raw bytes of an Ed25519 public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key: Ed25519PublicKey) -> str:
    """SHA-256 (hex) of the raw public key: how policies name a sim platform."""
    return hashlib.sha256(raw_public(key)).hexdigest()


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def installed_package_root() -> Path:
    """Directory of the installed ``sealtorch`` package."""
    import sealtorch

    return Path(sealtorch.__file__).resolve().parent


def measure(role: str, config: bytes = b"", *, package_root: Path | str | None = None) -> bytes:
    """SHA-256 over the package's files, the role, its fixed arguments and the measured config.

    Every file under the package root (sorted relative POSIX paths, ``__pycache__`` and ``.pyc``
    excluded) contributes its path and contents, length-prefixed, so changed code or changed
    configuration gives a different measurement.
    """
    if not isinstance(role, str) or not ROLE_RE.match(role):
        raise AttestationError("sim role must match [a-z][a-z0-9_-]{0,31}")
    if not isinstance(config, bytes | bytearray):
        raise AttestationError("sim measured config must be bytes")
    root = Path(package_root) if package_root is not None else installed_package_root()
    if not root.is_dir():
        raise AttestationError(f"sim measurement: package root {root} is not a directory")
    files: list[tuple[str, Path]] = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if "__pycache__" in rel.parts or p.suffix == ".pyc" or not p.is_file():
            continue
        files.append((rel.as_posix(), p))
    files.sort(key=lambda t: t[0].encode("utf-8"))
    h = hashlib.sha256()
    h.update(_lp(MEASURE_LABEL))
    h.update(len(files).to_bytes(8, "big"))
    for rel_s, p in files:
        h.update(_lp(rel_s.encode("utf-8")))
        h.update(_lp(p.read_bytes()))
    h.update(_lp(role.encode("ascii")))
    args = ROLE_ARGS.get(role, ())
    h.update(len(args).to_bytes(8, "big"))
    for a in args:
        h.update(_lp(a.encode("utf-8")))
    h.update(_lp(bytes(config)))
    return h.digest()


def make_body(
    measurement: bytes, report_data: bytes, platform_key: Ed25519PublicKey, role: str | None
) -> bytes:
    """The canonical JSON body a sim platform signs."""
    return canonical_json(
        {
            "format": BODY_FORMAT,
            "measurement": measurement.hex(),
            "report_data": report_data.hex(),
            "platform_key": raw_public(platform_key).hex(),
            "role": role or "",
        }
    )


def parse_and_verify(quote: bytes, registered: dict[bytes, Ed25519PublicKey]) -> dict[str, Any]:
    """Check a sim quote's signature against the registered platform keys; return its body."""
    if len(quote) <= SIG_LEN or len(quote) > SIG_LEN + MAX_BODY:
        raise EvidenceFormatError("sim evidence has the wrong length")
    sig, body = quote[:SIG_LEN], quote[SIG_LEN:]
    try:
        obj = json.loads(body.decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise EvidenceFormatError("sim evidence body is not ASCII JSON") from None
    if not isinstance(obj, dict) or set(obj) != {
        "format", "measurement", "report_data", "platform_key", "role",
    }:
        raise EvidenceFormatError("sim evidence body has the wrong fields")
    if obj["format"] != BODY_FORMAT or canonical_json(obj) != body:
        raise EvidenceFormatError("sim evidence body is not canonical sealtorch-sim/v1 JSON")
    try:
        pk = bytes.fromhex(obj["platform_key"])
        meas = bytes.fromhex(obj["measurement"])
        rd = bytes.fromhex(obj["report_data"])
    except (TypeError, ValueError):
        raise EvidenceFormatError("sim evidence body has a malformed hex field") from None
    if len(pk) != 32 or len(meas) != MEASUREMENT_LEN or len(rd) != 64:
        raise EvidenceFormatError("sim evidence body has a field of the wrong length")
    if not isinstance(obj["role"], str) or (obj["role"] and not ROLE_RE.match(obj["role"])):
        raise EvidenceFormatError("sim evidence body has a malformed role")
    key = registered.get(pk)
    if key is None:
        raise VerificationError(
            "sim evidence is signed by a platform key that is not registered with this "
            "verifier; register its public key (sealtorch sim init prints it)"
        )
    try:
        key.verify(sig, body)
    except InvalidSignature:
        raise VerificationError("sim evidence signature does not verify") from None
    return {"measurement": meas, "report_data": rd, "platform_key": key, "role": obj["role"]}
