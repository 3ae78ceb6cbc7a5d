"""Every kind of damage raises its specific error, and a failed load leaves no plaintext."""

from __future__ import annotations

import os

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealtorch._secret import Secret
from sealtorch.errors import (
    HeaderError,
    InputError,
    IntegrityError,
    KeyMismatchError,
    NotASealedFileError,
    SignatureError,
    TrailingDataError,
    TruncatedError,
    UnsupportedVersionError,
    WrongKeyError,
)
from sealtorch.format import chunks, keyfile, owner, reader, writer
from sealtorch.format.header import read_header
from sealtorch.format.signing import raw_public

CS = 512


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {f"w{i}": torch.randn(100 + 37 * i, generator=g) for i in range(6)}


@pytest.fixture
def sealed(tmp_path, mk):
    path = tmp_path / "m.sealed"
    writer.seal(_state(), path, mk, chunk_size=CS)
    return path


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_wrong_key_is_not_tampering(sealed, mk):
    other = keyfile.generate_model_key(mk.model_id, mk.key_version)
    with pytest.raises(WrongKeyError) as ei:
        reader.load(sealed, key=other)
    assert other.key.view().hex() not in str(ei.value)
    assert mk.key.view().hex() not in str(ei.value)


def test_model_id_and_key_version_mismatch(sealed, mk):
    with pytest.raises(KeyMismatchError, match="another model id"):
        reader.load(sealed, key=keyfile.ModelKey("other-model", 1, mk.key, "x"))
    with pytest.raises(KeyMismatchError, match="key version"):
        reader.load(sealed, key=keyfile.ModelKey(mk.model_id, 2, mk.key, "x"))


def test_flipped_byte_in_header(sealed, mk):
    h = read_header(sealed)
    for off in range(0, h.header_length, 3):
        data = sealed.read_bytes()
        _flip(sealed, off)
        with pytest.raises(
            (
                HeaderError,
                WrongKeyError,
                KeyMismatchError,
                UnsupportedVersionError,
                NotASealedFileError,
            )
        ):
            reader.load(sealed, key=mk)
        sealed.write_bytes(data)
    # a field that does not enter key derivation is caught by the MAC specifically
    _flip(sealed, 15)  # flags low byte: sets an unknown flag -> refused
    with pytest.raises(UnsupportedVersionError):
        reader.load(sealed, key=mk)


def test_header_mac_covers_fields(tmp_path, mk):
    path = tmp_path / "p.sealed"
    writer.seal(_state(), path, mk, chunk_size=CS)
    h = read_header(path)
    _flip(path, h.header_length - 1)  # the MAC itself
    with pytest.raises(HeaderError, match="MAC"):
        reader.load(path, key=mk)


@pytest.mark.parametrize("public_index", [False, True])
def test_flipped_byte_in_index(tmp_path, mk, public_index):
    path = tmp_path / "i.sealed"
    writer.seal(_state(), path, mk, chunk_size=CS, public_index=public_index)
    h = read_header(path)
    for off in (h.header_length, h.header_length + h.index_length // 2, h.chunks_offset - 1):
        data = path.read_bytes()
        _flip(path, off)
        with pytest.raises(IntegrityError, match="index"):
            reader.load(path, key=mk)
        path.write_bytes(data)


def test_flipped_byte_in_every_chunk_and_tag(sealed, mk):
    h = read_header(sealed)
    for i in range(h.chunk_count):
        for rel in (0, h.chunk_plain_length(i) // 2, h.chunk_plain_length(i) + 5):
            data = sealed.read_bytes()
            _flip(sealed, h.chunk_offset(i) + rel)
            with pytest.raises(IntegrityError, match=f"chunk {i} of"):
                reader.load(sealed, key=mk, threads=1)
            sealed.write_bytes(data)


def test_truncated_and_appended(sealed, mk):
    data = sealed.read_bytes()
    for cut in (1, 16, CS + 16, len(data) - 20, len(data) - 200):
        sealed.write_bytes(data[:-cut])
        with pytest.raises((TruncatedError, HeaderError)):
            reader.load(sealed, key=mk)
    sealed.write_bytes(data[:12])
    with pytest.raises(TruncatedError):
        reader.load(sealed, key=mk)
    sealed.write_bytes(data + b"\x00")
    with pytest.raises(TrailingDataError):
        reader.load(sealed, key=mk)
    sealed.write_bytes(b"")
    with pytest.raises(NotASealedFileError):
        reader.load(sealed, key=mk)


def test_reordered_chunks(sealed, mk):
    h = read_header(sealed)
    data = bytearray(sealed.read_bytes())
    n = CS + 16
    a, b = h.chunk_offset(0), h.chunk_offset(1)
    data[a : a + n], data[b : b + n] = data[b : b + n], data[a : a + n]
    sealed.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        reader.load(sealed, key=mk)


def test_chunk_spliced_from_another_file(tmp_path, sealed, mk):
    other = tmp_path / "other.sealed"
    writer.seal(_state(), other, mk, chunk_size=CS)  # same key, same layout, new salt
    h = read_header(sealed)
    data = bytearray(sealed.read_bytes())
    donor = other.read_bytes()
    off = h.chunk_offset(1)
    data[off : off + CS + 16] = donor[off : off + CS + 16]
    sealed.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="chunk 1 of"):
        reader.load(sealed, key=mk)


def test_unknown_version(sealed, mk):
    _flip(sealed, 9)
    with pytest.raises(UnsupportedVersionError, match="upgrade"):
        reader.load(sealed, key=mk)


def test_not_a_sealed_file(tmp_path, mk):
    p = tmp_path / "x.safetensors"
    p.write_bytes(os.urandom(300))
    with pytest.raises(NotASealedFileError):
        reader.load(p, key=mk)


def test_failed_load_into_zeroes_written_parameters(tmp_path, mk):
    src = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(6)])
    path = tmp_path / "m.sealed"
    writer.seal(src, path, mk, chunk_size=1024)
    h = read_header(path)
    _flip(path, h.chunk_offset(h.chunk_count - 1) + 3)  # last chunk: earlier ones decrypt fine
    for threads in (1, 2):
        dst = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(6)])
        with pytest.raises(IntegrityError):
            reader.load_into(dst, path, key=mk, threads=threads)
        for name, t in dst.state_dict().items():
            assert not t.any(), f"{name} still holds data after a failed load"


def test_failed_load_returns_nothing_and_zeroes(sealed, mk, monkeypatch):
    h = read_header(sealed)
    _flip(sealed, h.chunk_offset(h.chunk_count - 1))
    captured = []
    orig = chunks._Region.zero

    def spy(self):
        orig(self)
        captured.append(self.arr)

    monkeypatch.setattr(chunks._Region, "zero", spy)
    with pytest.raises(IntegrityError):
        reader.load(sealed, key=mk)
    assert captured and all(not any(a) for a in captured)


def test_owner_signature(tmp_path, mk):
    sk = Ed25519PrivateKey.generate()
    path = tmp_path / "s.sealed"
    writer.seal(_state(), path, mk, chunk_size=CS, sign_key=sk)
    pub = raw_public(sk.public_key())
    assert reader.load(path, key=mk, signer=pub)
    assert owner.verify(path, key=mk)["signer"] == pub.hex()
    assert owner.inspect(path)["signer_unverified"] == pub.hex()
    with pytest.raises(SignatureError, match="another key"):
        reader.load(path, key=mk, signer=raw_public(Ed25519PrivateKey.generate().public_key()))
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(SignatureError, match="does not verify"):
        reader.load(path, key=mk)
    unsigned = tmp_path / "u.sealed"
    writer.seal(_state(), unsigned, mk)
    with pytest.raises(SignatureError, match="no owner signature"):
        reader.load(unsigned, key=mk, signer=pub)
    # stripping the signature trailer is caught (the header's flag is MACed)
    path.write_bytes(data[:-96])
    with pytest.raises(TruncatedError):
        reader.load(path, key=mk)


def test_key_provider_gets_public_header(sealed, mk):
    from sealtorch.format.keys import KeyFileProvider, KeyProvider

    seen = []

    class Provider:
        def file_key(self, header):
            seen.append(header.model_id)
            return KeyFileProvider(mk).file_key(header)

    assert isinstance(Provider(), KeyProvider)
    out = reader.load(sealed, key_provider=Provider())
    assert seen == [mk.model_id] and len(out) == 6

    class Bad:
        def file_key(self, header):
            return Secret(os.urandom(32))

    with pytest.raises(WrongKeyError):
        reader.load(sealed, key_provider=Bad())
    with pytest.raises(InputError, match="exactly one"):
        reader.load(sealed)
