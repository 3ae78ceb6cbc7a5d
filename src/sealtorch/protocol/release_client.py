"""``KeyServerClient``: the typed client of dkeyserver's release API (used by dkeycache).

Everything the server returns is checked against the pinned release-signing key, and never
believed when it comes from older server state than already seen; TLS (1.3 only, pinned CA)
protects the transport, but key confidentiality and grant integrity never depend on it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sealtorch._secret import Secret
from sealtorch.errors import (
    GrantError,
    ProtocolError,
    ReleaseDenied,
    ServiceUnavailableError,
)
from sealtorch.protocol import hpke
from sealtorch.protocol.b64 import b64d, b64e
from sealtorch.protocol.grant import NONCE_LEN, AuditHead, Grant, GrantVerifier, Status
from sealtorch.protocol.messages import (
    STATUS_KEY_LEN,
    ReleaseRequest,
    StatusRequest,
    status_key_info,
)
from sealtorch.protocol.tls import tls_client_context

_MAX_RESPONSE = 4 * 1024 * 1024


@dataclass
class ReleasedKey:
    """One granted model key version: the verified grant, its signed document and the key."""

    grant: Grant
    document: dict[str, Any]
    sealed_key: bytes
    key: Secret | None = field(default=None, repr=False)


@dataclass
class ReleaseResult:
    """The verified answer to a release: grants (keys opened if a private key was given),
    public denial codes per model, the signed audit head, the cache's enrolment state, and the
    server state sequence the answer was decided at."""

    grants: list[ReleasedKey]
    denials: dict[str, str]
    audit_head: AuditHead
    audit_head_document: dict[str, Any]
    cache_id: str
    cache_state: str
    state_seq: int = 0
    #: what the server verified about this cache's evidence (signed, for this request; the
    #: ``Claims.to_dict()`` form, typed by the caller)
    claims: dict[str, Any] | None = None


class KeyServerClient:
    """Client of ``POST /v1/challenge``, ``/v1/release`` and ``/v1/status``."""

    def __init__(
        self,
        url: str,
        ca_cert: str | os.PathLike[str] | None,
        pinned_signing_key: Ed25519PublicKey | bytes | str,
        *,
        timeout: float = 30.0,
        verifier: GrantVerifier | None = None,
        status_keys: dict[str, Secret] | None = None,
        server_name: str | None = None,
    ) -> None:
        """``verifier`` and ``status_keys`` may be shared by the clients of several replicas
        (one pinned key, one rollback watermark, one status key per cache id);
        ``server_name`` is the TLS name and Host when ``url`` names one resolved address."""
        if not url.startswith("https://"):
            raise ProtocolError("key server URL must be https:// (TLS 1.3)")
        self.url = url.rstrip("/")
        self.verifier = verifier or GrantVerifier(pinned_signing_key)
        if ca_cert is not None and not Path(ca_cert).is_file():
            raise ProtocolError("CA certificate file for the key server does not exist")
        self._tls = tls_client_context(ca_cert)
        self._last_tls: Any = None
        #: TLS connections this client opened, and how many of them resumed a session
        self.tls_connections = 0
        self.tls_resumed = 0
        port = httpx.URL(self.url).port
        host = f"{server_name}:{port}" if server_name and port else server_name
        self._http = httpx.Client(base_url=self.url, verify=self._tls, timeout=timeout,
                                  headers={"Host": host} if host else None)
        self._extensions = {"sni_hostname": server_name} if server_name else None
        self._status_keys: dict[str, Secret] = {} if status_keys is None else status_keys

    @property
    def audience(self) -> bytes:
        """32-byte SHA-256 of the pinned server key: the audience bound into report data."""
        return bytes.fromhex(self.verifier.server_key_id)

    def close(self) -> None:
        self._http.close()
        for k in self._status_keys.values():
            k.wipe()
        self._status_keys.clear()

    def __enter__(self) -> KeyServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            r = self._http.post(path, json=body, extensions=self._extensions)
        except httpx.HTTPError as e:
            raise ServiceUnavailableError(
                f"key server at {self.url} unreachable ({type(e).__name__})"
            ) from e
        stream = r.extensions.get("network_stream")
        tls = stream.get_extra_info("ssl_object") if stream is not None else None
        if tls is not None and tls is not self._last_tls:  # a new connection's first answer
            self._last_tls = tls
            self.tls_connections += 1
            self.tls_resumed += bool(tls.session_reused)
            self._tls.remember(tls)  # resume its session on the next connection
        if r.status_code >= 500 or r.status_code == 429:
            raise ServiceUnavailableError(
                f"key server answered HTTP {r.status_code} on {path}; retry later"
            )
        if len(r.content) > _MAX_RESPONSE:
            raise ProtocolError("key server response is too large")
        try:
            obj = r.json()
        except ValueError as e:
            raise ProtocolError(f"key server answered non-JSON on {path}") from e
        if not isinstance(obj, dict):
            raise ProtocolError(f"key server answered a non-object on {path}")
        return r.status_code, obj

    @staticmethod
    def _raise_error(status: int, obj: dict[str, Any], path: str) -> None:
        err = obj.get("error")
        code = err.get("code") if isinstance(err, dict) else None
        code = code if isinstance(code, str) and len(code) <= 32 else "denied"
        if status == 403:
            raise ReleaseDenied(f"key server denied the request on {path}: {code}", code)
        raise ProtocolError(f"key server rejected the request on {path}: HTTP {status} {code}")

    def challenge(self) -> bytes:
        """Get a fresh one-time 32-byte nonce."""
        status, obj = self._post("/v1/challenge", {})
        if status != 200:
            self._raise_error(status, obj, "/v1/challenge")
        return b64d(obj.get("nonce"), field="nonce", max_len=NONCE_LEN, exact_len=NONCE_LEN)

    def release(
        self,
        evidence: Any,
        public_key: bytes,
        nonce: bytes,
        models: list[str] | None = None,
        *,
        private_key: X25519PrivateKey | None = None,
    ) -> ReleaseResult:
        """Ask for the keys of ``models`` (``None``: every model this cache is entitled to).

        ``evidence`` is an ``Evidence`` (``to_dict()``/``to_json()``) or its JSON object. Every
        grant is verified against the pinned key, the nonce and ``public_key``; with
        ``private_key`` the sealed keys are opened too. A whole-request denial raises
        :class:`ReleaseDenied` with the public code in ``.denial``.
        """
        ev = evidence
        if hasattr(ev, "to_dict"):
            ev = ev.to_dict()
        elif hasattr(ev, "to_json"):
            ev = ev.to_json()
        if isinstance(ev, str | bytes):
            import json

            ev = json.loads(ev)
        req = ReleaseRequest(evidence=ev, public_key=public_key, nonce=nonce, models=models)
        status, obj = self._post("/v1/release", req.to_json())
        if status != 200:
            self._raise_error(status, obj, "/v1/release")
        return self._parse_release(obj, nonce, public_key, private_key)

    def _parse_release(
        self,
        obj: dict[str, Any],
        nonce: bytes,
        public_key: bytes,
        private_key: X25519PrivateKey | None,
    ) -> ReleaseResult:
        head_doc = obj.get("audit_head")
        head = self.verifier.verify_audit_head(head_doc)
        raw_grants = obj.get("grants")
        raw_denials = obj.get("denials")
        if not isinstance(raw_grants, list) or not isinstance(raw_denials, list):
            raise ProtocolError("release response lacks grants/denials lists")
        grants: list[ReleasedKey] = []
        for item in raw_grants:
            if not isinstance(item, dict):
                raise ProtocolError("release response grant entry is not an object")
            doc = item.get("grant")
            g = self.verifier.verify(doc, nonce=nonce, requester_key=public_key)
            sealed = b64d(item.get("sealed_key"), field="sealed_key", max_len=hpke.MAX_SEALED_LEN)
            key = self.verifier.open_key(g, sealed, private_key) if private_key else None
            assert isinstance(doc, dict)
            grants.append(ReleasedKey(grant=g, document=doc, sealed_key=sealed, key=key))
        denials: dict[str, str] = {}
        for d in raw_denials:
            if not isinstance(d, dict) or not isinstance(d.get("model_id"), str):
                raise ProtocolError("release response denial entry is malformed")
            denials[d["model_id"]] = str(d.get("code", "denied"))[:32]
        cid, cstate = obj.get("cache_id"), obj.get("cache_state")
        if not isinstance(cid, str) or not isinstance(cstate, str):
            raise ProtocolError("release response lacks cache_id/cache_state")
        for rk in grants:
            if rk.grant.cache_id != cid:
                raise GrantError("grant names another cache id than the response")
        seq = obj.get("state_seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0 or any(
                rk.grant.state_seq != seq for rk in grants):
            raise ProtocolError("release response state_seq is missing or differs from its grants")
        self.verifier.check_state_seq(seq)
        claims = self.verifier.verify_claims(obj.get("claims"), nonce=nonce,
                                             requester_key=public_key, cache_id=cid).claims
        if private_key is not None:
            sealed_sk = b64d(obj.get("status_key"), field="status_key",
                             max_len=hpke.MAX_SEALED_LEN)
            sk = hpke.open(sealed_sk, private_key, status_key_info(cid, nonce))
            if len(sk) != STATUS_KEY_LEN:
                sk.wipe()
                raise ProtocolError("release response carried a status key of the wrong length")
            old = self._status_keys.pop(cid, None)
            if old is not None:
                old.wipe()
            self._status_keys[cid] = sk
        return ReleaseResult(grants, denials, head, head_doc, cid, cstate,  # type: ignore[arg-type]
                             seq, claims)

    def collateral(self) -> tuple[str, ...]:
        """The DCAP collateral documents the key server holds, signed by the pinned key."""
        from sealtorch.protocol.collateral import verify_bundle

        status, obj = self._post("/v1/collateral", {})
        if status != 200:
            self._raise_error(status, obj, "/v1/collateral")
        return verify_bundle(self.verifier.pinned_key, obj.get("collateral")).files

    def status(self, cache_id: str, models: list[str] | None = None) -> Status:
        """Poll revocation state with a fresh random nonce, authenticated with the status key
        the last release to ``cache_id`` delivered; returns the verified status."""
        key = self._status_keys.get(cache_id)
        if key is None:
            raise ProtocolError(
                "no status key for this cache: attest (release with the private key) first")
        nonce = os.urandom(NONCE_LEN)
        req = StatusRequest(nonce=nonce, cache_id=cache_id, models=models).authenticated(
            key.view())
        status, obj = self._post("/v1/status", req.to_json())
        if status != 200:
            self._raise_error(status, obj, "/v1/status")
        return self.verifier.verify_status(obj.get("status"), nonce=nonce, cache_id=cache_id)


def evidence_digest(evidence_json: dict[str, Any]) -> str:
    """Fallback digest of an evidence JSON object (hex SHA-256 of its canonical form)."""
    from sealtorch.protocol.canonical import canonical_json

    return hashlib.sha256(canonical_json(evidence_json)).hexdigest()


__all__ = ["KeyServerClient", "ReleaseResult", "ReleasedKey", "b64e", "tls_client_context"]
