"""Evidence JSON: strict fields, strict base64, size limits, stable digest."""

from __future__ import annotations

import base64
import json

import pytest

from sealtorch.attestation.evidence import MAX_QUOTE, Evidence
from sealtorch.errors import EvidenceFormatError


def test_round_trip_and_digest() -> None:
    ev = Evidence("snp", b"\x01" * 1184, b"certs")
    again = Evidence.from_json(ev.to_json())
    assert again == ev
    assert again.digest() == ev.digest() and len(ev.digest()) == 32
    assert Evidence("snp", b"\x01" * 1184, None).digest() != ev.digest()


@pytest.mark.parametrize(
    "obj,msg",
    [
        ([], "JSON object"),
        ({"tee": "sgx"}, "fields"),
        ({"tee": "sgx", "quote": "AA==", "extra": 1}, "fields"),
        ({"tee": "xen", "quote": "AA=="}, "tee"),
        ({"tee": "sgx", "quote": "AA==", "format": "v0"}, "format"),
        ({"tee": "sgx", "quote": "AA"}, "base64"),
        ({"tee": "sgx", "quote": "A-=="}, "base64"),
        ({"tee": "sgx", "quote": "AB=="}, "canonical"),
        ({"tee": "sgx", "quote": ""}, "non-empty"),
        ({"tee": "sgx", "quote": 5}, "base64"),
        ({"tee": "sgx", "quote": base64.b64encode(b"x" * (MAX_QUOTE + 1)).decode()}, "limit"),
    ],
)
def test_rejects_malformed(obj: object, msg: str) -> None:
    with pytest.raises(EvidenceFormatError, match=msg):
        Evidence.from_json(json.dumps(obj))


def test_rejects_non_json_and_oversize() -> None:
    with pytest.raises(EvidenceFormatError, match="JSON"):
        Evidence.from_json(b"\xff{")
    with pytest.raises(EvidenceFormatError, match="larger"):
        Evidence.from_json(b" " * 70000)
