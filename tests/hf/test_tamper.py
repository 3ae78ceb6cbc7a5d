"""Every way a sealed model directory can be wrong is refused with a clear error, before any
tensor is decrypted (the manifest check) or before the model is returned (chunk tags)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sealtorch.errors import HeaderError, IntegrityError, SealedDirError, TruncatedError
from sealtorch.format import header as hdr
from sealtorch.hf import SealedDir, from_pretrained, seal_pretrained, tokenizer_from_pretrained


@pytest.fixture
def sealed(tmp_path, sealed_llama) -> Path:
    """A fresh copy of the sealed Llama for a test to damage."""
    out = tmp_path / "sealed"
    shutil.copytree(sealed_llama, out)
    return out


def shard(d: Path, k: int) -> Path:
    return sorted(d.glob("model-*.safetensors.sealed"))[k]


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def refused(d: Path, key: Path, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        SealedDir(d, key=key)
    with pytest.raises(error, match=match):
        from_pretrained(d, key=key)


def test_tampered_chunk(sealed, hf_key):
    p = shard(sealed, 1)
    h = hdr.read_header(p)
    flip(p, h.chunks_offset + 100)  # inside the first chunk's ciphertext
    with pytest.raises(IntegrityError, match=r"chunk 0 of \d+ failed authentication"):
        from_pretrained(sealed, key=hf_key)
    with SealedDir(sealed, key=hf_key) as sd, pytest.raises(IntegrityError):
        sd.verify_all()


def test_tampered_tag_of_last_chunk(sealed, hf_key):
    p = shard(sealed, 0)
    flip(p, p.stat().st_size - 1)
    with pytest.raises(IntegrityError, match="failed authentication"):
        from_pretrained(sealed, key=hf_key)


def test_tampered_header(sealed, hf_key):
    p = shard(sealed, 2)
    flip(p, 60)  # the file salt: the header no longer matches the manifest's digest
    refused(sealed, hf_key, SealedDirError, "not the one this sealing's manifest lists")


def test_missing_shard(sealed, hf_key):
    shard(sealed, 1).unlink()
    refused(sealed, hf_key, SealedDirError, r"1 file\(s\) of the sealing are missing")


def test_extra_shard(sealed, hf_key):
    shutil.copy(shard(sealed, 0), sealed / "model-00009-of-00009.safetensors.sealed")
    refused(sealed, hf_key, SealedDirError, "not part of this sealing")


def test_extra_plain_file(sealed, hf_key):
    (sealed / "model.safetensors").write_bytes(b"{}")
    refused(sealed, hf_key, SealedDirError, "not part of this sealing")


def test_swapped_shards(sealed, hf_key):
    a, b = shard(sealed, 0), shard(sealed, 1)
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    refused(sealed, hf_key, SealedDirError, "swapped, replaced or taken from another sealing")


def test_swapped_small_files(sealed, hf_key):
    a, b = sealed / "config.json.sealed", sealed / "generation_config.json.sealed"
    data = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data)
    refused(sealed, hf_key, SealedDirError, "config.json.sealed")


def test_truncated_shard(sealed, hf_key):
    p = shard(sealed, 2)
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 1000)
    refused(sealed, hf_key, TruncatedError, "shorter than its header says")


def test_shard_from_another_sealing(tmp_path, sealed, llama_dir, hf_key):
    again = tmp_path / "again"
    seal_pretrained(llama_dir, again, hf_key)  # same key, same weights, another sealing
    shutil.copy(shard(again, 1), shard(sealed, 1))
    refused(sealed, hf_key, SealedDirError, "from another sealing")


def test_manifest_from_another_sealing(tmp_path, sealed, llama_dir, hf_key):
    again = tmp_path / "again"
    seal_pretrained(llama_dir, again, hf_key)
    shutil.copy(again / "sealtorch-manifest.sealed", sealed / "sealtorch-manifest.sealed")
    refused(sealed, hf_key, SealedDirError, "the manifest is from another sealing")


def test_tampered_manifest(sealed, hf_key):
    p = sealed / "sealtorch-manifest.sealed"
    flip(p, p.stat().st_size - 20)
    refused(sealed, hf_key, IntegrityError, "index failed authentication")
    (sealed / "sealtorch-manifest.sealed").unlink()
    refused(sealed, hf_key, SealedDirError, "not a sealed model directory")


def test_a_shard_is_not_a_manifest(sealed, hf_key):
    shutil.copy(shard(sealed, 0), sealed / "sealtorch-manifest.sealed")
    refused(sealed, hf_key, SealedDirError, "not a sealed directory's manifest")


def test_tampered_public_file(tmp_path, minilm_dir, hf_key):
    out = tmp_path / "sealed"
    seal_pretrained(minilm_dir, out, hf_key, public=["tokenizer.json"])
    p = out / "tokenizer.json"
    p.write_bytes(p.read_bytes().replace(b"[UNK]", b"[UNX]", 1))
    with pytest.raises(SealedDirError, match=r"tokenizer\.json: its content is not the one"):
        tokenizer_from_pretrained(out, key=hf_key)


def test_header_garbage(sealed, hf_key):
    p = shard(sealed, 0)
    data = bytearray(p.read_bytes())
    data[10:12] = b"\xff\xff"  # header length out of range
    p.write_bytes(bytes(data))
    refused(sealed, hf_key, HeaderError, r"header length field is out of range")
