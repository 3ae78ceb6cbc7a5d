"""Every use of the KEK, in one place.

The KEK (a file or a PKCS#11 token, ``kek.py``) wraps two kinds of secret that the database
stores: model keys (and their one-time export copies), each under an AAD naming tenant, model
and key version, and two *data keys* made at ``dkeyserver init``:

- the nonce key (HMAC tags of the stateless release nonces);
- the integrity key, from which HKDF derives the row-MAC key (every row an authorization
  decision reads, and the server-state row), the audit-chain key, the per-cache status keys
  and the high-water-mark key.

The data keys are unwrapped once at start and stay in this process only as keyed HMAC
contexts. Unwrapped model keys are cached by their exact wrapped blob and AAD, and evicted when
a version is retired or a model revoked.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealtorch._secret import Secret
from sealtorch.errors import TamperError
from sealtorch.keyserver import ops
from sealtorch.keyserver.kek import KekProvider
from sealtorch.protocol.canonical import canonical_json

NONCE_KEY_AAD = b"sealtorch-nonce-key/v1"
INTEGRITY_KEY_AAD = b"sealtorch-integrity-key/v1"
_MODEL_AAD = b"sealtorch-kek/v1\x00"
_EXPORT_AAD = b"sealtorch-kek-export/v1\x00"
_DERIVE_INFO = b"sealtorch-integrity/v1 "
DATA_KEY_LEN = 32


@dataclass(frozen=True)
class KeyRef:
    """Which model key a wrapped blob holds: its tenant, model id and key version."""

    tenant: str
    model_id: str
    key_version: int

    def aad(self, purpose: bytes = _MODEL_AAD) -> bytes:
        """The unambiguous AAD that pins a wrapped key to its purpose, tenant, model, version."""
        return purpose + canonical_json([self.tenant, self.model_id, self.key_version])


class _Mac:
    """HMAC-SHA256 under one derived key, kept only inside a keyed context."""

    __slots__ = ("_base",)

    def __init__(self, key: bytearray) -> None:
        """Key the context, then wipe ``key`` (the context keeps its own copy)."""
        self._base = hmac.new(key, digestmod=hashlib.sha256)
        Secret.take(key).wipe()

    def __call__(self, data: bytes) -> bytes:
        return ops.crypto("hmac", self._tag, data)

    def _tag(self, data: bytes) -> bytes:
        h = self._base.copy()
        h.update(data)
        return h.digest()

    def check(self, data: bytes, tag: bytes) -> bool:
        """Constant-time check of ``tag`` over ``data``."""
        return hmac.compare_digest(self(data), tag)


class Keyring:
    """The KEK and the keys it protects (see the module docstring)."""

    def __init__(self, kek: KekProvider) -> None:
        self.kek = kek
        self._cache: dict[tuple[str, int, bytes], Secret] = {}
        self._lock = threading.Lock()
        self._nonce: _Mac | None = None
        self._row: _Mac | None = None
        self._audit: _Mac | None = None
        self._status: _Mac | None = None
        self._hwm: _Mac | None = None

    @property
    def name(self) -> str:
        return self.kek.name

    # --- data keys ----------------------------------------------------------------------
    def new_data_key(self, aad: bytes) -> bytes:
        """A fresh random data key, wrapped by the KEK under ``aad`` (for ``server_state``)."""
        with Secret(os.urandom(DATA_KEY_LEN)) as k:
            return self.kek.wrap(k, aad)

    def open_data_keys(self, wrapped_nonce: bytes, wrapped_integrity: bytes) -> None:
        """Unwrap the nonce and integrity keys (the first use of the KEK at start-up, so a KEK
        that opens nothing is reported here as such) and derive the integrity sub-keys."""
        try:
            nonce = self.kek.unwrap(bytes(wrapped_nonce), NONCE_KEY_AAD)
            root = self.kek.unwrap(bytes(wrapped_integrity), INTEGRITY_KEY_AAD)
        except TamperError:
            raise TamperError(
                f"the {self.kek.name} KEK does not open this server's own data keys: the KEK is "
                "corrupted or is not the one this database was created with (or the database "
                "was replaced); restore the KEK that belongs to this database"
            ) from None
        with nonce, root:
            self._nonce = _Mac(bytearray(nonce.view()))
            self._row, self._audit = _Mac(_derive(root, "row")), _Mac(_derive(root, "audit"))
            self._status, self._hwm = _Mac(_derive(root, "status")), _Mac(_derive(root, "hwm"))

    def _need(self, mac: _Mac | None) -> _Mac:
        if mac is None:
            raise RuntimeError("keyring data keys are not open (call open_data_keys first)")
        return mac

    # --- MACs ---------------------------------------------------------------------------
    def nonce_tag(self, data: bytes) -> bytes:
        return self._need(self._nonce)(data)

    @property
    def row(self) -> _Mac:
        """MACs of authoritative rows and of the server-state row."""
        return self._need(self._row)

    @property
    def audit(self) -> _Mac:
        """MACs of the audit chain's entries."""
        return self._need(self._audit)

    @property
    def hwm(self) -> _Mac:
        """MAC of this server's high-water-mark file."""
        return self._need(self._hwm)

    def status_key(self, cache_id: str) -> Secret:
        """The key with which the cache ``cache_id`` authenticates its status polls; sealed
        to the cache's attested key in every release answer, never stored."""
        return Secret(self._need(self._status)(b"sealtorch-status-key/v1\x00" + cache_id.encode()))

    # --- model keys ---------------------------------------------------------------------
    def wrap_model_key(self, key: Secret, ref: KeyRef) -> bytes:
        return self.kek.wrap(key, ref.aad())

    def model_key(self, blob: bytes, ref: KeyRef) -> Secret:
        """The unwrapped model key (cached by exact blob); :class:`TamperError` if the blob
        does not open under its AAD (swapped between rows, edited, another KEK's)."""
        ck = (ref.model_id, ref.key_version, bytes(blob))
        with self._lock:
            s = self._cache.get(ck)
        if s is None:
            s = self.kek.unwrap(bytes(blob), ref.aad())
            with self._lock:
                self._cache[ck] = s
        return s

    def wrap_export_copy(self, key: Secret, ref: KeyRef) -> bytes:
        """A second wrapping of a server-generated key, under its own AAD: the one-time copy
        ``model export`` opens and deletes. It cannot be made without the KEK."""
        return self.kek.wrap(key, ref.aad(_EXPORT_AAD))

    def open_export_copy(self, blob: bytes, ref: KeyRef) -> Secret:
        return self.kek.unwrap(bytes(blob), ref.aad(_EXPORT_AAD))

    def evict(self, model_id: str, key_version: int | None = None) -> None:
        """Wipe cached plaintext keys of a model (one version or all): retire and revoke."""
        with self._lock:
            gone = [k for k in self._cache
                    if k[0] == model_id and (key_version is None or k[1] == key_version)]
            for k in gone:
                self._cache.pop(k).wipe()

    def close(self) -> None:
        with self._lock:
            for s in self._cache.values():
                s.wipe()
            self._cache.clear()
        self._nonce = self._row = self._audit = self._status = self._hwm = None


def _derive(root: Secret, label: str) -> bytearray:
    return bytearray(HKDF(hashes.SHA256(), DATA_KEY_LEN, salt=None,
                          info=_DERIVE_INFO + label.encode()).derive(root.view()))
