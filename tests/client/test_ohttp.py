"""Request and response encapsulation (RFC 9458 layout, HPKE from cryptography)."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from sealtorch.e2e import ohttp
from sealtorch.errors import EncapsulationError
from sealtorch.protocol import hpke

BODY = b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1,2,3,4]}]}'
PATH = "/v2/models/tiny/infer"


@pytest.fixture()
def keys() -> tuple[object, ohttp.KeyConfig]:
    sk, pk = hpke.generate_keypair()
    return sk, ohttp.KeyConfig(key_id=7, public_key=pk)


def _request(config: ohttp.KeyConfig, **kw: object) -> tuple[bytes, ohttp.RequestContext]:
    args: dict[str, object] = {"method": "POST", "path": PATH, "model": "tiny", "body": BODY,
                               "timestamp_ms": 1_700_000_000_000}
    args.update(kw)
    return ohttp.encapsulate_request(config, **args)  # type: ignore[arg-type]


def test_key_config_is_rfc9458_encoding(keys) -> None:
    _, config = keys
    raw = config.encode()
    # Key Identifier (8) | KEM ID (16) | Public Key | Symmetric Algorithms Length (16) | KDF | AEAD
    assert raw == bytes([7]) + b"\x00\x20" + config.public_key + b"\x00\x04\x00\x01\x00\x02"
    assert ohttp.KeyConfig.decode(raw) == config
    with pytest.raises(EncapsulationError, match="suite"):
        ohttp.KeyConfig.decode(raw[:-1] + b"\x01")  # AES-128-GCM is not ours
    with pytest.raises(EncapsulationError, match="length"):
        ohttp.KeyConfig.decode(raw + b"\x00")
    with pytest.raises(EncapsulationError, match="exactly one suite"):
        ohttp.KeyConfig.decode(raw[:35] + b"\x00\x08" + raw[37:])


def test_request_layout_is_hdr_enc_ct_opened_by_cryptography_hpke(keys) -> None:
    sk, config = keys
    data, ctx = _request(config)
    assert data[:7] == struct.pack(">BHHH", 7, 0x20, 1, 2)
    assert data[7:39] == ctx.enc
    # the body after hdr is RFC 9180 SealBase output, opened by cryptography's own HPKE
    info = ohttp.request_info(data[:7], "POST", PATH, "tiny")
    inner = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM).decrypt(data[7:], sk, info=info)
    assert inner[0] == 1 and inner[1:17] == ctx.nonce and inner[-len(BODY):] == BODY
    opened, enc = ohttp.decapsulate_request(data, sk, config, method="POST", path=PATH,
                                            model="tiny")
    assert enc == ctx.enc and opened.body == BODY and opened.nonce == ctx.nonce
    assert opened.timestamp_ms == 1_700_000_000_000
    assert opened.response_secret.equals(ctx.response_secret)
    # every request is fresh: new ephemeral key, nonce and response secret
    data2, ctx2 = _request(config)
    assert data2[7:39] != data[7:39] and ctx2.nonce != ctx.nonce


@pytest.mark.parametrize("where", [0, 3, 7, 20, 39, 60, -1])
def test_any_modified_byte_is_refused(keys, where: int) -> None:
    sk, config = keys
    data, _ = _request(config)
    bad = bytearray(data)
    bad[where] ^= 0x01
    with pytest.raises(EncapsulationError):
        ohttp.decapsulate_request(bytes(bad), sk, config, method="POST", path=PATH, model="tiny")


@pytest.mark.parametrize("kw", [{"method": "PUT"}, {"path": "/v2/models/other/infer"},
                                {"model": "other"},
                                {"path": "/v2/models/tiny/versions/2/infer"}])
def test_associated_data_is_bound(keys, kw: dict[str, str]) -> None:
    sk, config = keys
    data, _ = _request(config)
    args = {"method": "POST", "path": PATH, "model": "tiny", **kw}
    with pytest.raises(EncapsulationError, match="another endpoint"):
        ohttp.decapsulate_request(data, sk, config, **args)


def test_wrong_key_truncation_and_suite(keys) -> None:
    sk, config = keys
    data, _ = _request(config)
    other_sk, _ = hpke.generate_keypair()
    with pytest.raises(EncapsulationError, match="does not open"):
        ohttp.decapsulate_request(data, other_sk, config, method="POST", path=PATH,
                                  model="tiny")
    with pytest.raises(EncapsulationError, match="another key id"):
        ohttp.decapsulate_request(data, sk, ohttp.KeyConfig(8, config.public_key),
                                  method="POST", path=PATH, model="tiny")
    with pytest.raises(EncapsulationError, match="too short"):
        ohttp.decapsulate_request(data[:60], sk, config, method="POST", path=PATH, model="tiny")
    with pytest.raises(EncapsulationError, match="another HPKE suite"):
        ohttp.decapsulate_request(data[:6] + b"\x01" + data[7:], sk, config, method="POST",
                                  path=PATH, model="tiny")
    with pytest.raises(EncapsulationError, match="printable ASCII"):
        _request(config, path="/v2/models/tïny/infer")


def test_response_roundtrip_and_binding_to_its_request(keys) -> None:
    sk, config = keys
    data, ctx = _request(config)
    opened, enc = ohttp.decapsulate_request(data, sk, config, method="POST", path=PATH,
                                            model="tiny")
    res = ohttp.encapsulate_response(opened.response_secret, enc, status=200, body=b'{"ok":1}',
                                     receipt=b"RCPT")
    assert len(res) == 32 + 16 + 7 + 4 + 8
    inner = ohttp.decapsulate_response(ctx, res)
    assert (inner.status, inner.receipt, inner.body) == (200, b"RCPT", b'{"ok":1}')
    # another request's context cannot open it, and any modified byte is refused
    _, ctx2 = _request(config)
    with pytest.raises(EncapsulationError, match="modified in transit or answers another"):
        ohttp.decapsulate_response(ctx2, res)
    for where in (0, 31, 32, len(res) - 1):
        bad = bytearray(res)
        bad[where] ^= 0x80
        with pytest.raises(EncapsulationError):
            ohttp.decapsulate_response(ctx, bytes(bad))
    with pytest.raises(EncapsulationError, match="too short"):
        ohttp.decapsulate_response(ctx, res[:40])


def test_response_key_schedule_is_rfc9458(keys) -> None:
    """aead key/nonce = HKDF-Expand(HKDF-Extract(enc || response_nonce, secret), "key"/"nonce")."""
    import hashlib
    import hmac

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    _, config = keys
    _, ctx = _request(config)
    secret = bytes(ctx.response_secret)
    res = ohttp.encapsulate_response(ctx.response_secret, ctx.enc, status=201, body=b"x",
                                     receipt=b"")
    prk = hmac.new(ctx.enc + res[:32], secret, hashlib.sha256).digest()
    key = hmac.new(prk, b"key\x01", hashlib.sha256).digest()
    nonce = hmac.new(prk, b"nonce\x01", hashlib.sha256).digest()[:12]
    inner = AESGCM(key).decrypt(nonce, res[32:], None)
    assert inner == b"\x01\x00\xc9\x00\x00\x00\x00x"


def test_request_context_wipes_its_secret(keys) -> None:
    _, config = keys
    _, ctx = _request(config)
    assert "response_secret" not in repr(ctx) and not ctx.response_secret.wiped
    ctx.wipe()
    assert ctx.response_secret.wiped
