"""The wire models: what the OpenAPI document says is what the parsers accept."""

from __future__ import annotations

import base64
import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealtorch.errors import ProtocolError
from sealtorch.protocol.messages import ReleaseRequest, StatusRequest
from sealtorch.protocol.wire import ReleaseBody, b64_pattern, parse

KEY = base64.b64encode(os.urandom(32)).decode()
MARKER = "ZZmarkerZZ"


def release(**over: object) -> dict[str, object]:
    body: dict[str, object] = {"evidence": {}, "public_key": KEY, "nonce": KEY}
    body.update(over)
    return body


@given(st.binary(min_size=0, max_size=40), st.integers(min_value=0, max_value=40))
@settings(max_examples=300, deadline=None)
def test_b64_pattern_is_exactly_canonical_base64_of_n_bytes(raw: bytes, n: int) -> None:
    text = base64.b64encode(raw).decode()
    assert (re.fullmatch(b64_pattern(n), text) is not None) == (len(raw) == n)


def test_non_canonical_and_newline_terminated_base64_are_refused() -> None:
    canonical = base64.b64encode(b"\x00" * 31 + b"\x01").decode()  # ends in 'E='
    assert canonical.endswith("E=")
    for bad in (canonical[:-2] + "F=", canonical + "\n", canonical.rstrip("=")):
        with pytest.raises(ProtocolError, match="public_key"):
            ReleaseRequest.from_json(release(public_key=bad))


@pytest.mark.parametrize(("body", "where"), [
    (release(nonce=MARKER), "nonce: expected the nonce from POST /v1/challenge"),
    (release(models=[MARKER, MARKER]), "models: duplicate model id"),
    (release(models=["ok", "a/../" + MARKER]), "models[1]: expected"),
    (release(models=[f"m{i}" for i in range(33)]), "at most 32"),
    (release(kem_id=True), "kem_id: expected HPKE KEM id"),
    (release(evidence=[MARKER]), "evidence: expected the attestation evidence"),
    (release(**{MARKER: 1}), "release request: unexpected field (allowed: evidence, kem_id"),
    ({"evidence": {}, "nonce": KEY}, "public_key: missing"),
])
def test_errors_name_the_field_and_never_echo_input(body: dict[str, object], where: str) -> None:
    with pytest.raises(ProtocolError) as e:
        ReleaseRequest.from_json(body)
    assert where in str(e.value)
    assert MARKER not in str(e.value)


def test_strict_types_no_coercion() -> None:
    with pytest.raises(ProtocolError, match="kem_id"):
        parse(ReleaseBody, release(kem_id="32"), "release request")
    with pytest.raises(ProtocolError, match="cache_id"):
        StatusRequest.from_json({"nonce": KEY, "cache_id": "A" * 32, "mac": KEY})


def test_a_low_order_point_is_refused_after_the_schema_accepts_it() -> None:
    zero = base64.b64encode(bytes(32)).decode()
    parse(ReleaseBody, release(public_key=zero), "release request")  # the shape is fine
    with pytest.raises(ProtocolError):
        ReleaseRequest.from_json(release(public_key=zero))


def test_low_order_points_are_refused_by_the_key_agreement_every_time() -> None:
    """Non-zero low-order points (u = 1, u = p - 1, and u = p, a non-canonical zero) pass the
    all-zero test and are refused by agreeing a secret with them, on every check (the probe
    key is made once per process and reused); a real key still loads in between."""
    from cryptography.hazmat.primitives import serialization

    from sealtorch.protocol import hpke

    p = 2**255 - 19
    weak = [u.to_bytes(32, "little") for u in (1, p - 1, p)]
    _, good = hpke.generate_keypair()
    for _ in range(3):
        for raw in weak:
            with pytest.raises(ProtocolError, match="low-order"):
                hpke.load_public_key(raw)
        assert hpke.load_public_key(good).public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw) == good
    assert hpke._probe_key() is hpke._probe_key()
