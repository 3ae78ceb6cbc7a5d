"""The ``serve`` role of the report-data binding: every field bound, unambiguous, strict."""

from __future__ import annotations

from dataclasses import replace

import pytest

from sealtorch.attestation import binding
from sealtorch.attestation.binding import ServedIdentity
from sealtorch.attestation.claims import Claims
from sealtorch.errors import BindingError

from .conftest import IDENTITY

ARGS = dict(nonce=bytes(range(32)), kem_id=0x20, hpke_public_key=b"\x11" * 32,
            receipt_public_key=b"\x22" * 32, tls_public_key=b"", identity=IDENTITY)


def test_serve_report_data_is_64_bytes_deterministic_and_domain_separated() -> None:
    rd = binding.serve_report_data(**ARGS)
    assert len(rd) == 64 and rd == binding.serve_report_data(**ARGS)
    enc = binding.serve_encode(**ARGS)
    assert enc.startswith(binding._lp(b"sealtorch/v1") + binding._lp(b"serve"))
    # another role over the same nonce and key never gives these bytes
    for role in binding.ROLES:
        assert binding.report_data(role, ARGS["nonce"], 0x20, ARGS["hpke_public_key"],
                                   b"\x22" * 32) != rd


@pytest.mark.parametrize("change", [
    {"nonce": bytes(31) + b"\x01"}, {"hpke_public_key": b"\x12" * 32},
    {"receipt_public_key": b"\x23" * 32}, {"tls_public_key": b"\x30\x2a"},
    {"identity": replace(IDENTITY, name="tiny2")},
    {"identity": replace(IDENTITY, model_id="tiny-model2")},
    {"identity": replace(IDENTITY, key_version=2)},
    {"identity": replace(IDENTITY, header_digest=b"\x01" * 32)},
    {"identity": replace(IDENTITY, policy_version=3)},
    {"identity": replace(IDENTITY, factory="torch.nn:Identity")},
    {"identity": replace(IDENTITY, tenant="acme2")},
    {"identity": replace(IDENTITY, server_key_id=b"\x08" * 32)},
])
def test_every_field_is_bound(change: dict[str, object]) -> None:
    base = binding.serve_report_data(**ARGS)
    assert binding.serve_report_data(**{**ARGS, **change}) != base
    with pytest.raises(BindingError, match="does not bind"):
        binding.check_serve(base, **{**ARGS, **change})


def test_moving_characters_between_fields_changes_the_encoding() -> None:
    a = replace(IDENTITY, name="ab", model_id="cd")
    b = replace(IDENTITY, name="abc", model_id="d")
    assert binding.serve_encode(**{**ARGS, "identity": a}) != binding.serve_encode(
        **{**ARGS, "identity": b})


def test_check_serve_accepts_claims_and_raw_bytes() -> None:
    rd = binding.serve_report_data(**ARGS)
    binding.check_serve(rd, **ARGS)
    binding.check_serve(Claims(tee="sim", report_data=rd, verified_at=0, debug=False), **ARGS)


@pytest.mark.parametrize("change,text", [
    ({"nonce": b"\x00" * 16}, "nonce must be 32"),
    ({"kem_id": 0x10}, "KEM id"),
    ({"hpke_public_key": b"\x00" * 31}, "HPKE public key"),
    ({"receipt_public_key": b"\x00" * 33}, "receipt key"),
    ({"tls_public_key": b"\x00" * 4096}, "TLS public key"),
    ({"identity": object()}, "ServedIdentity"),
])
def test_serve_encode_validates(change: dict[str, object], text: str) -> None:
    with pytest.raises(BindingError, match=text):
        binding.serve_encode(**{**ARGS, **change})


@pytest.mark.parametrize("field,value", [
    ("name", "has space"), ("name", ""), ("model_id", "../x"), ("key_version", 0),
    ("key_version", True), ("header_digest", b"\x00"), ("policy_version", -1),
    ("factory", "not a factory"), ("tenant", ""), ("tenant", "a\nb"),
    ("server_key_id", "ab" * 32),
])
def test_identity_is_validated(field: str, value: object) -> None:
    with pytest.raises(BindingError):
        replace(IDENTITY, **{field: value})


def test_identity_dict_roundtrip_is_strict() -> None:
    d = IDENTITY.to_dict()
    assert ServedIdentity.from_dict(d) == IDENTITY
    for bad in ({**d, "extra": 1}, {k: v for k, v in d.items() if k != "tenant"},
                {**d, "header_digest": d["header_digest"].upper()}, [d]):
        with pytest.raises(BindingError):
            ServedIdentity.from_dict(bad)
