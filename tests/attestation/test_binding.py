"""Report-data binding: deterministic, unambiguous, constant-time checked."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealtorch.attestation import binding
from sealtorch.attestation.claims import Claims
from sealtorch.errors import BindingError

NONCE = bytes(range(32))
PK = bytes(range(32, 64))
AUD = bytes(range(64, 96))


def test_report_data_is_64_bytes_and_deterministic() -> None:
    a = binding.report_data("remote", NONCE, binding.KEM_X25519_SHA256, PK, AUD)
    b = binding.report_data("remote", NONCE, binding.KEM_X25519_SHA256, PK, AUD)
    assert len(a) == 64 and a == b


@pytest.mark.parametrize("field", ["role", "nonce", "pk", "aud"])
def test_every_field_changes_the_binding(field: str) -> None:
    base = binding.report_data("remote", NONCE, 0x20, PK, AUD)
    args = {"role": "remote", "nonce": NONCE, "pk": PK, "aud": AUD}
    args[field] = "local" if field == "role" else bytes(32 - 1) + b"\x01"
    other = binding.report_data(args["role"], args["nonce"], 0x20, args["pk"], args["aud"])
    assert other != base


def test_length_prefixing_makes_field_splits_unambiguous() -> None:
    # the same concatenated bytes split differently between fields never encode the same
    blob = os.urandom(96)
    seen: dict[bytes, tuple[int, int]] = {}
    for i, j in itertools.combinations(range(97), 2):
        parts = (blob[:i], blob[i:j], blob[j:])
        enc = b"".join(binding._lp(p) for p in parts)
        assert enc not in seen, (i, j, seen.get(enc))
        seen[enc] = (i, j)
    # and the full encoding embeds each field with its length
    enc = binding.encode("local", NONCE, 0x20, PK, AUD)
    assert enc.startswith(len(b"sealtorch/v1").to_bytes(4, "big") + b"sealtorch/v1")
    assert (5).to_bytes(4, "big") + b"local" in enc


def _claims(rd: bytes) -> Claims:
    return Claims(tee="sim", report_data=rd, verified_at=0, debug=False)


def test_check_accepts_matching_and_rejects_each_mismatch() -> None:
    rd = binding.report_data("local", NONCE, 0x20, PK, AUD)
    binding.check(_claims(rd), role="local", nonce=NONCE, kem_id=0x20, public_key=PK,
                  audience=AUD)
    binding.check(rd, role="local", nonce=NONCE, kem_id=0x20, public_key=PK, audience=AUD)
    for kw in (
        {"role": "remote"},
        {"nonce": os.urandom(32)},
        {"public_key": os.urandom(32)},
        {"audience": os.urandom(32)},
    ):
        args = {"role": "local", "nonce": NONCE, "kem_id": 0x20, "public_key": PK,
                "audience": AUD, **kw}
        with pytest.raises(BindingError, match="does not bind"):
            binding.check(_claims(rd), **args)


@pytest.mark.parametrize(
    "args,msg",
    [
        (("admin", NONCE, 0x20, PK, AUD), "role"),
        (("remote", NONCE[:31], 0x20, PK, AUD), "nonce"),
        (("remote", NONCE, 0x21, PK, AUD), "KEM"),
        (("remote", NONCE, 0x20, PK + b"x", AUD), "public key"),
        (("remote", NONCE, 0x20, PK, AUD[:16]), "audience"),
    ],
)
def test_bad_inputs_are_specific_errors(args: tuple, msg: str) -> None:
    with pytest.raises(BindingError, match=msg):
        binding.report_data(*args)

_fields = st.tuples(st.sampled_from(["remote", "local"]), st.binary(min_size=32, max_size=32),
                    st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))


@settings(max_examples=200, deadline=None)
@given(_fields, _fields)
def test_distinct_inputs_give_distinct_encodings(a: tuple, b: tuple) -> None:
    ea = binding.encode(a[0], a[1], 0x20, a[2], a[3])
    eb = binding.encode(b[0], b[1], 0x20, b[2], b[3])
    assert (ea == eb) == (a == b)
