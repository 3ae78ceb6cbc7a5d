"""Arbitrary bytes where the protocol expects its messages: only the documented errors."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from sealtorch.e2e import ohttp
from sealtorch.e2e.document import AttestationDocument
from sealtorch.e2e.receipt import verify_receipt
from sealtorch.errors import EncapsulationError, EvidenceFormatError, ReceiptError
from sealtorch.protocol import hpke

SK, PK = hpke.generate_keypair()
CONFIG = ohttp.KeyConfig(3, PK)
_, CTX = ohttp.encapsulate_request(CONFIG, method="POST", path="/v2/models/m/infer", model="m",
                                   body=b"{}", timestamp_ms=0)
REQUEST_PREFIX = CONFIG.header()


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400), st.booleans())
def test_garbage_requests(data: bytes, with_header: bool) -> None:
    try:
        ohttp.decapsulate_request((REQUEST_PREFIX if with_header else b"") + data, SK, CONFIG,
                                  method="POST", path="/v2/models/m/infer", model="m")
    except EncapsulationError:
        return
    raise AssertionError("garbage opened as a request")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_responses(data: bytes) -> None:
    try:
        ohttp.decapsulate_response(CTX, data)
    except EncapsulationError:
        return
    raise AssertionError("garbage opened as a response")


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.sampled_from([b"\xd2\x84", b"\xd2\x84\x40\xa0"])))
def test_garbage_receipts(data: bytes) -> None:
    try:
        verify_receipt(data, b"\x01" * 32)
    except ReceiptError:
        return
    raise AssertionError("garbage verified as a receipt")


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(
                               st.text(max_size=10), c, max_size=4), max_leaves=20)


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())))
def test_garbage_attestation_documents(data: bytes) -> None:
    try:
        AttestationDocument.from_json(data)
    except EvidenceFormatError:
        return
    raise AssertionError("garbage parsed as an attestation document")
