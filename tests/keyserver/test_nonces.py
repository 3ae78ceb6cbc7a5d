"""Release nonces: issue and check with an injected clock and randomness (no sleeps), and the
burn that lets each nonce answer at most one release."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from pathlib import Path

from sealtorch.keyserver.bootstrap import init_data_dir, open_store
from sealtorch.keyserver.nonces import NONCE_LEN, PURGE_GRACE, NonceBook


def _tag(data: bytes) -> bytes:
    return hmac.new(b"k" * 32, data, hashlib.sha256).digest()


def test_issue_and_check_with_an_injected_clock() -> None:
    now = [1_000_000.0]
    book = NonceBook(_tag, ttl=120, clock=lambda: now[0], rand=lambda n: b"r" * n)
    n = book.issue()
    assert len(n) == NONCE_LEN and struct.unpack(">Q", n[:8])[0] == 1_000_120
    assert book.check(n).valid and book.check(n).expires == 1_000_120
    now[0] += 120
    assert book.check(n).valid  # valid up to and including its expiry second
    now[0] += 1
    verdict = book.check(n)
    assert not verdict.valid and verdict.reason == "nonce expired"


def test_a_nonce_from_elsewhere_is_refused() -> None:
    book = NonceBook(_tag, ttl=120, clock=lambda: 5.0)
    other = NonceBook(lambda d: hmac.new(b"x" * 32, d, hashlib.sha256).digest(), ttl=120,
                      clock=lambda: 5.0)
    assert book.check(other.issue()).reason == "nonce was not issued by this server"
    forged = bytearray(book.issue())
    forged[0:8] = struct.pack(">Q", 2**40)  # a later expiry breaks the tag
    assert not book.check(bytes(forged)).valid
    assert book.check(b"short").reason == "nonce has the wrong length"
    assert book.check(os.urandom(NONCE_LEN)).reason == "nonce was not issued by this server"


def test_burn_once_and_purge(tmp_path: Path) -> None:
    store, kek = open_store(init_data_dir(tmp_path / "ks"))
    try:
        now = [1_000_000.0]
        book = NonceBook(store.keyring.nonce_tag, ttl=60, clock=lambda: now[0])
        n = book.issue()
        exp = book.check(n).expires
        with store.db.tx() as conn:
            assert NonceBook.burn(store.db, conn, n, exp) is True
            assert NonceBook.burn(store.db, conn, n, exp) is False
        now[0] = exp + PURGE_GRACE  # not yet past the grace: kept
        book.purge(store.db)
        with store.db.tx() as conn:
            assert NonceBook.burn(store.db, conn, n, exp) is False
        now[0] = exp + PURGE_GRACE + 1  # forgotten; its own expiry refuses it from now on
        book.purge(store.db)
        assert not book.check(n).valid
        with store.db.tx() as conn:
            assert NonceBook.burn(store.db, conn, n, exp) is True
    finally:
        store.close()
        kek.close()
