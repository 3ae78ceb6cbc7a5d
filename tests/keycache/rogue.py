"""A small, real HTTPS key server for cache tests that need a server to misbehave on purpose.

It speaks dkeyserver's release API (challenge, release, status) with real TLS 1.3, real Ed25519
signatures and real HPKE, but lets a test sign with the wrong key, roll a policy version back,
forge a status document, or go down. The honest path is tested against the real dkeyserver.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealtorch.keyserver.tlsutil import make_loopback_tls
from sealtorch.protocol import hpke
from sealtorch.protocol.b64 import b64d, b64e
from sealtorch.protocol.collateral import CollateralBundle, sign_bundle
from sealtorch.protocol.grant import (
    AuditHead,
    ClaimsDocument,
    Grant,
    ModelStatus,
    Status,
    sign_audit_head,
    sign_claims,
    sign_grant,
    sign_status,
)
from sealtorch.protocol.messages import StatusRequest, status_key_info
from sealtorch.protocol.signing import key_id

CACHE_ID = "0" * 31 + "1"


class RogueKeyServer:
    """Knobs: ``grant_key`` / ``status_key`` (sign with another key), ``policy_version``,
    ``state_seq``, ``revoked`` (model ids), ``lease_seconds``, ``up`` (False answers 503)."""

    def __init__(self, models: dict[str, bytes], policy: dict[str, Any],
                 lease_seconds: int = 60) -> None:
        self.signing_key = Ed25519PrivateKey.generate()
        self.grant_key = self.signing_key
        self.status_key = self.signing_key
        self.models = models
        self.policy = policy
        self.policy_version = 1
        self.state_seq = 1
        # its clock stands still at start-up unless a test moves it: times it signs must not
        # cross a second boundary on their own while a test compares them to a grant's
        self.clock_start = int(time.time())
        self.clock_offset = 0  # seconds added to the times it signs
        self.collateral: tuple[str, ...] = ()  # the DCAP collateral it signs for caches
        #: what it signs as the cache's verified claims (a test may give a TDX VM's)
        self.cache_claims: dict[str, Any] = {"tee": "sim", "report_data": "00" * 64,
                                             "verified_at": 0, "debug": False}
        self.poll_key = os.urandom(32)  # the status key it seals into every release answer
        self.status_policy_version: int | None = None
        self.revoked: set[str] = set()
        self.lease_seconds = lease_seconds
        self.up = True
        self.releases = 0
        self.statuses = 0
        self.cache_state = "approved"  # "pending": answer as dkeyserver does before approval
        self._dir = Path(tempfile.mkdtemp(prefix="rogue-tls-"))
        make_loopback_tls(self._dir / "tls")
        self.ca_cert = str(self._dir / "tls" / "ca.crt")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(self._dir / "tls" / "server.crt", self._dir / "tls" / "server.key")
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(n) or b"{}")
                if not owner.up:
                    return self._send(503, {"error": {"code": "unavailable"}})
                if self.path == "/v1/challenge":
                    return self._send(200, {"nonce": b64e(os.urandom(32))})
                if self.path == "/v1/release":
                    return self._send(200, owner._release(body))
                if self.path == "/v1/status":
                    return self._send(200, owner._status(body))
                if self.path == "/v1/collateral":
                    return self._send(200, {"collateral": sign_bundle(
                        owner.signing_key, CollateralBundle(owner.collateral, owner._now(),
                                                            owner.server_key_id))})
                return self._send(404, {"error": {"code": "not_found"}})

            def _send(self, code: int, obj: dict[str, Any]) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True)
        self._httpd.daemon_threads = True
        self.url = f"https://127.0.0.1:{self._httpd.server_address[1]}"
        self._t = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._t.start()

    @property
    def public_key_b64(self) -> str:
        from sealtorch.protocol.signing import raw_public_key

        return b64e(raw_public_key(self.signing_key))

    @property
    def server_key_id(self) -> str:
        return key_id(self.signing_key)

    def _now(self) -> int:
        return self.clock_start + self.clock_offset

    def _head(self) -> dict[str, Any]:
        return sign_audit_head(self.signing_key, AuditHead(1, "00" * 32, self._now(),
                                                           self.server_key_id))

    def _release(self, body: dict[str, Any]) -> dict[str, Any]:
        self.releases += 1
        nonce = b64d(body["nonce"], field="nonce", max_len=32)
        pk = b64d(body["public_key"], field="pk", max_len=32)
        grants, denials = [], []
        # as dkeyserver: no grant before approval
        for mid in (body.get("models") or sorted(self.models)
                    if self.cache_state == "approved" else []):
            if mid in self.revoked:
                denials.append({"model_id": mid, "code": "revoked"})
                continue
            g = Grant(tenant="t1", model_id=mid, key_version=1, nonce=nonce, requester_key=pk,
                      kem_id=hpke.KEM_ID, evidence_digest="00" * 32, cache_id=CACHE_ID,
                      policy=self.policy, policy_version=self.policy_version,
                      lease_seconds=self.lease_seconds, revocation_epoch=0,
                      issued_at=self._now(), server_key_id=self.server_key_id,
                      state_seq=self.state_seq)
            sealed = hpke.seal(self.models[mid], pk, g.digest())
            grants.append({"grant": sign_grant(self.grant_key, g), "sealed_key": b64e(sealed)})
        return {"grants": grants, "denials": denials, "audit_head": self._head(),
                "cache_id": CACHE_ID, "cache_state": self.cache_state,
                "state_seq": self.state_seq,
                "claims": sign_claims(self.signing_key, ClaimsDocument(
                    nonce, pk, CACHE_ID, self.cache_claims, self._now(),
                    self.server_key_id)),
                "status_key": b64e(hpke.seal(self.poll_key, pk,
                                             status_key_info(CACHE_ID, nonce)))}

    def _status(self, body: dict[str, Any]) -> dict[str, Any]:
        self.statuses += 1
        nonce = b64d(body["nonce"], field="nonce", max_len=32)
        pv = self.status_policy_version or self.policy_version
        models = {
            m: ModelStatus("revoked", (), pv) if m in self.revoked
            else ModelStatus("active", (1,), pv)
            for m in (body.get("models") or [])
        }
        assert StatusRequest.from_json(body).check_mac(self.poll_key), "unauthenticated poll"
        st = Status(nonce=nonce, cache_id=body["cache_id"], revocation_epoch=0,
                    cache_state=self.cache_state, models=models, issued_at=self._now(),
                    server_key_id=self.server_key_id, state_seq=self.state_seq)
        return {"status": sign_status(self.status_key, st)}

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        shutil.rmtree(self._dir, ignore_errors=True)  # its TLS private key
