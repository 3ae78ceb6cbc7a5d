"""A client that verifies the inference server before it sends anything.

- :class:`AttestedClient` — attest (fresh nonce, the project's verifiers, the client's own
  policy), pin the HPKE and receipt keys, send encrypted requests, verify each receipt;
- :class:`ClientPolicy` — which runtimes, models and owners the client accepts;
- :func:`verify_attestation` / :func:`verify_receipt_offline` — the same checks, offline.

See docs/e2e.md for the protocol and ``sealtorch client infer`` / ``sealtorch receipt verify``.
"""

from sealtorch.client.policy import ClientPolicy, evaluate
from sealtorch.client.session import AttestedClient, InferResult
from sealtorch.client.verify import VerifiedServer, verify_attestation, verify_receipt_offline

__all__ = ["AttestedClient", "ClientPolicy", "InferResult", "VerifiedServer", "evaluate",
           "verify_attestation", "verify_receipt_offline"]
