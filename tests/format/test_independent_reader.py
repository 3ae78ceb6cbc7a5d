"""Read a sealed file using only docs/format.md and `cryptography` primitives.

Nothing from sealtorch.format is imported by the reader below: if this passes, the format
document is complete and matches the implementation.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

import sealtorch

NP = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
      "I8": "i1", "U8": "u1", "BOOL": "?", "U16": "<u2", "U32": "<u4", "U64": "<u8"}  # fmt: skip


def independent_read(data: bytes, model_key: bytes) -> dict[str, np.ndarray]:
    assert data[:8] == b"SEALTRCH"
    version, hlen, cipher, flags = struct.unpack(">HHHH", data[8:16])
    assert (version, cipher) == (1, 1)
    chunk_size, key_version, n, total, ilen = struct.unpack(">IIQQQ", data[16:48])
    salt, commitment = data[48:80], data[80:112]
    (mlen,) = struct.unpack(">H", data[112:114])
    model_id = data[114 : 114 + mlen]
    header = data[:hlen]
    assert hlen == 146 + mlen
    info = (
        b"sealtorch/v1 file key"
        + struct.pack(">HHII", version, cipher, chunk_size, key_version)
        + struct.pack(">H", mlen)
        + model_id
    )
    fk = HKDF(hashes.SHA256(), 32, salt, info).derive(model_key)

    def expand(label: bytes) -> bytes:
        return HKDFExpand(hashes.SHA256(), 32, label).derive(fk)

    assert hmac.compare_digest(expand(b"sealtorch/v1 key commitment"), commitment)
    mac = hmac.new(expand(b"sealtorch/v1 header mac key"), header[:-32], "sha256").digest()
    assert hmac.compare_digest(mac, header[-32:])
    hd = hashlib.sha256(header).digest()
    index_key = expand(b"sealtorch/v1 index key")
    section = data[hlen : hlen + ilen]
    if flags & 1:
        body = section[:-32]
        tag = hmac.new(index_key, hd + body, "sha256").digest()
        assert hmac.compare_digest(tag, section[-32:])
    else:
        body = AESGCM(index_key).decrypt(section[:12], section[12:], hd)
    index = json.loads(body)
    assert index["format"] == "sealtorch-index/v1"
    chunk_key = AESGCM(expand(b"sealtorch/v1 chunk key"))
    stream = bytearray()
    pos = hlen + ilen
    tags = b""
    for i in range(n):
        plen = chunk_size if i < n - 1 else total - (n - 1) * chunk_size
        ct = data[pos : pos + plen + 16]
        tags += ct[-16:]
        nonce = struct.pack(">Q", i) + bytes(4)
        aad = hd + struct.pack(">QB", i, 1 if i == n - 1 else 0)
        stream += chunk_key.decrypt(nonce, ct, aad)
        pos += plen + 16
    if flags & 2:
        pub, sig = data[pos : pos + 32], data[pos + 32 : pos + 96]
        msg = (
            b"sealtorch/v1 signature\x00"
            + hd
            + hashlib.sha256(section).digest()
            + hashlib.sha256(tags).digest()
        )
        Ed25519PublicKey.from_public_bytes(pub).verify(sig, msg)
        pos += 96
    assert pos == len(data) and len(stream) == total
    out: dict[str, np.ndarray] = {}
    for t in index["tensors"]:
        if "alias_of" in t:
            out[t["name"]] = out[t["alias_of"]]
            continue
        dt = np.dtype(NP[t["dtype"]])
        count = int(np.prod(t["shape"]))
        arr = np.frombuffer(bytes(stream), dtype=dt, count=count, offset=t["offset"])
        out[t["name"]] = arr.reshape(t["shape"])
    return out


@pytest.mark.parametrize("public_index,signed", [(False, False), (True, True)])
def test_independent_reader(tmp_path, mk, public_index, signed):
    g = torch.Generator().manual_seed(3)
    sd = {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "bn.num_batches_tracked": torch.tensor(5),
        "emb": torch.randint(-100, 100, (33, 5), dtype=torch.int16, generator=g),
        "mask": torch.rand(17, generator=g) > 0.5,
        "half": torch.randn(7, generator=g).half(),
        "empty": torch.empty(0, 3),
    }
    sd["head"] = sd["emb"]
    path = tmp_path / "m.sealed"
    sealtorch.seal(
        sd,
        path,
        mk,
        chunk_size=300,
        public_index=public_index,
        sign_key=Ed25519PrivateKey.generate() if signed else None,
        metadata={"origin": "doc-test"},
    )
    out = independent_read(path.read_bytes(), bytes(mk.key.view()))
    assert list(out) == list(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(out[k], v.numpy(), err_msg=k)
        assert out[k].shape == tuple(v.shape)
