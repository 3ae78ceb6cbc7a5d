"""Key files, header parsing and key derivation."""

from __future__ import annotations

import json
import os
import stat

import pytest

from sealtorch._secret import Secret
from sealtorch.errors import (
    HeaderError,
    KeyFileError,
    KeyMismatchError,
    NotASealedFileError,
    TruncatedError,
    UnsupportedVersionError,
    WrongKeyError,
)
from sealtorch.format import header as hdr
from sealtorch.format import keyfile, keys


def _header(mk: keyfile.ModelKey, *, total: int = 1000, chunk: int = 256) -> hdr.Header:
    salt = os.urandom(32)
    fk = keys._derive_file_key(
        mk.key, salt=salt, model_id=mk.model_id, key_version=mk.key_version, chunk_size=chunk
    )
    fkeys = keys.expand_file_key(fk)
    pre = hdr.encode_header_fields(
        flags=0,
        chunk_size=chunk,
        key_version=mk.key_version,
        chunk_count=hdr.chunk_count_for(total, chunk),
        total_length=total,
        index_length=64,
        file_salt=salt,
        key_commitment=fkeys.commitment,
        model_id=mk.model_id,
    )
    return hdr.parse_header(pre + keys.header_mac(fkeys.header_mac_key, pre))


def test_key_file_round_trip_and_mode(tmp_path):
    mk = keyfile.generate_model_key("acme/resnet-50", 3)
    p = tmp_path / "k.json"
    keyfile.write_key_file(p, mk)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    back = keyfile.read_key_file(p)
    assert (back.model_id, back.key_version) == ("acme/resnet-50", 3)
    assert back.key.equals(mk.key)
    assert "redacted" in repr(back) and back.key.view().hex() not in repr(back)
    doc = json.loads(p.read_text())
    assert doc["format"] == "sealtorch-key/v1" and set(doc) == {
        "format",
        "model_id",
        "key_version",
        "key",
        "created",
    }
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        keyfile.write_key_file(p, mk)
    keyfile.write_key_file(p, keyfile.generate_model_key("x"), overwrite=True)
    assert keyfile.read_key_file(p).model_id == "x"


def test_key_file_rejects_unsafe_and_malformed(tmp_path):
    p = tmp_path / "k.json"
    keyfile.write_key_file(p, keyfile.generate_model_key("m"))
    os.chmod(p, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        keyfile.read_key_file(p)
    good = json.loads(p.read_text())
    for bad in (
        {**good, "key": "!!notbase64"},
        {**good, "key": "AAAA"},
        {**good, "model_id": "bad id with spaces"},
        {**good, "key_version": 0},
        {**good, "format": "other"},
        {**good, "extra": 1},
    ):
        q = tmp_path / "bad.json"
        q.write_text(json.dumps(bad))
        os.chmod(q, 0o600)
        with pytest.raises(KeyFileError) as ei:
            keyfile.read_key_file(q)
        assert good["key"] not in str(ei.value)
        q.unlink()
    with pytest.raises(KeyFileError):
        keyfile.read_key_file(tmp_path / "missing.json")


def test_header_and_key_checks():
    mk = keyfile.generate_model_key("m1", 2)
    h = _header(mk)
    assert h.chunk_count == 4 and h.chunk_plain_length(3) == 1000 - 3 * 256
    assert hdr.parse_header(h.raw) == h
    fk = keys.KeyFileProvider(mk).file_key(h)
    keys.check_file_key(fk, h).wipe()
    # wrong key: commitment mismatch
    other = keyfile.ModelKey("m1", 2, Secret(os.urandom(32)), "now")
    with pytest.raises(WrongKeyError):
        keys.check_file_key(keys.derive_file_key(other, h), h)
    # ids that do not match the header
    with pytest.raises(KeyMismatchError):
        keys.derive_file_key(keyfile.ModelKey("m2", 2, mk.key, "now"), h)
    with pytest.raises(KeyMismatchError):
        keys.derive_file_key(keyfile.ModelKey("m1", 1, mk.key, "now"), h)
    # every header byte is covered: flipping any field byte breaks MAC or parse
    for i in range(12, len(h.raw)):
        raw = bytearray(h.raw)
        raw[i] ^= 0x01
        with pytest.raises((HeaderError, WrongKeyError, UnsupportedVersionError)):
            h2 = hdr.parse_header(bytes(raw))
            keys.check_file_key(keys.derive_file_key(mk.key, h2), h2)


def test_header_magic_version_truncation():
    mk = keyfile.generate_model_key("m1")
    h = _header(mk)
    with pytest.raises(NotASealedFileError):
        hdr.parse_header(b"PK\x03\x04" + h.raw[4:])
    raw = bytearray(h.raw)
    raw[9] = 2
    with pytest.raises(UnsupportedVersionError):
        hdr.parse_header(bytes(raw))
    with pytest.raises(HeaderError, match="truncated"):
        hdr.parse_header(h.raw[:-1])
    with pytest.raises(TruncatedError, match="R-2"):
        hdr.parse_header(h.raw[:10])
