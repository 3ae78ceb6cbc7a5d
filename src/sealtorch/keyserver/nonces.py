"""Release nonces: issued, checked, burned and purged here, nowhere else.

A nonce is 32 bytes: its expiry (8, big-endian unix seconds), 8 random bytes, and the first 16
bytes of an HMAC-SHA256 tag under the server's nonce key over both. Checking needs no database;
*burning* it (recording its hash as used) happens in the database, committed, before the
evidence bound to it is verified, so it answers at most one release on any replica. The clock
and the randomness are injected, so tests need no sleeps.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.engine import Connection

from sealtorch.keyserver.db import Database

NONCE_LEN = 32
_TAG = b"sealtorch-nonce/v1\x00"
#: burned nonces are kept this long after their expiry (their MAC check refuses them after)
PURGE_GRACE = 60


@dataclass(frozen=True)
class NonceCheck:
    """The verdict on a nonce's own tag and expiry (before the database is asked)."""

    valid: bool
    reason: str
    expires: int


class NonceBook:
    """Issue and check stateless nonces; burn and purge them in the database."""

    def __init__(self, tag: Callable[[bytes], bytes], ttl: int, *,
                 clock: Callable[[], float] = time.time,
                 rand: Callable[[int], bytes] = os.urandom) -> None:
        self._tag = tag
        self.ttl = ttl
        self._clock = clock
        self._rand = rand

    def _mac(self, head: bytes) -> bytes:
        return self._tag(_TAG + head)[:16]

    def issue(self) -> bytes:
        """A fresh nonce valid for ``ttl`` seconds."""
        head = struct.pack(">Q", int(self._clock()) + self.ttl) + self._rand(8)
        return head + self._mac(head)

    def check(self, nonce: bytes) -> NonceCheck:
        """Was ``nonce`` issued by this server (any replica) and is it unexpired?"""
        if len(nonce) != NONCE_LEN:
            return NonceCheck(False, "nonce has the wrong length", 0)
        head, tag = nonce[:16], nonce[16:]
        if not hmac.compare_digest(self._mac(head), tag):
            return NonceCheck(False, "nonce was not issued by this server", 0)
        expires = struct.unpack(">Q", head[:8])[0]
        if expires < self._clock():
            return NonceCheck(False, "nonce expired", expires)
        return NonceCheck(True, "", expires)

    @staticmethod
    def burn(db: Database, conn: Connection, nonce: bytes, expires: int) -> bool:
        """Record ``nonce`` as used in ``conn``'s transaction; False if it was used before (by
        any replica sharing the database)."""
        cur = db.cursor(conn)
        cur.execute(db.sql("INSERT INTO consumed_nonces (nonce_hash, expires) VALUES (?, ?)"
                           " ON CONFLICT DO NOTHING"), (hashlib.sha256(nonce).digest(), expires))
        return bool(cur.rowcount == 1)

    def purge(self, db: Database) -> None:
        """Forget burned nonces that expired more than :data:`PURGE_GRACE` seconds ago."""
        with db.tx() as conn:
            db.cursor(conn).execute(db.sql("DELETE FROM consumed_nonces WHERE expires < ?"),
                                    (int(self._clock()) - PURGE_GRACE,))
