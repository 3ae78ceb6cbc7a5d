"""End to end between an inference client and an attested inference server.

What both sides agree on, with no I/O: :mod:`.ohttp` (Oblivious-HTTP-style encapsulation of
Open Inference Protocol requests and responses, RFC 9458 layout, HPKE from ``cryptography``),
:mod:`.document` (the attestation document a server answers ``GET /v2/attestation`` with),
:mod:`.receipt` (COSE_Sign1 inference receipts over an EAT-style claims set) and :mod:`.replay`
(the server's bounded replay guard). The server side is :mod:`sealtorch.runtime.attested`; the
client is :mod:`sealtorch.client`. The protocol is described in docs/e2e.md.
"""
