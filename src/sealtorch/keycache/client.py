"""``KeyCacheClient``: the runtime side of the local session with dkeycache.

It is a :class:`~sealtorch.format.keys.KeyProvider`: ``file_key(header)`` returns the file key
of exactly the file being opened. It keeps one session (one connection, one ephemeral HPKE key)
for all later fetches and re-establishes it if the cache restarts. Every answer is checked on
this side too: the relayed grant must verify with the pinned dkeyserver key, be issued to the
cache this runtime attested to, match the file's model id and key version, and never carry a
lower policy version than one already seen.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sealtorch._secret import Secret
from sealtorch.errors import (
    AttesterUnavailableError,
    GrantError,
    LeaseExpiredError,
    ProtocolError,
    ReleaseDenied,
    RevokedError,
    ServiceUnavailableError,
)
from sealtorch.format.header import Header
from sealtorch.format.keys import check_file_key
from sealtorch.keycache.address import connect as connect_endpoint
from sealtorch.keycache.address import parse_endpoint
from sealtorch.protocol import hpke
from sealtorch.protocol.b64 import b64d, b64e
from sealtorch.protocol.grant import NONCE_LEN, Grant
from sealtorch.protocol.local import (
    CHALLENGE_LEN,
    LOCAL_PROTOCOL,
    cache_audience,
    call,
    challenge_info,
    file_key_info,
    verify_relayed_grant,
)
from sealtorch.protocol.signing import key_id, load_public_key

_PROTOCOL_CODES = frozenset({"protocol_error", "header_invalid", "not_sealed",
                             "unsupported_version", "format_error"})


def _raise_for(answer: dict[str, Any], what: str) -> None:
    """Turn a cache error answer into the matching sealtorch exception."""
    err = answer.get("error")
    code = err.get("code") if isinstance(err, dict) else None
    msg = err.get("message") if isinstance(err, dict) else None
    code = code if isinstance(code, str) and 0 < len(code) <= 32 else "denied"
    text = msg if isinstance(msg, str) and msg.isprintable() else code
    text = f"key cache refused {what}: {text[:300]}"
    if code == "revoked":
        raise RevokedError(text)
    if code == "lease_expired":
        raise LeaseExpiredError(text)
    if code in _PROTOCOL_CODES:
        raise ProtocolError(text)
    raise ReleaseDenied(text, code)


class KeyCacheClient:
    """A :class:`KeyProvider` backed by dkeycache over its Unix socket or loopback TCP.

    ``socket_path`` is the cache's Unix socket path, or ``tcp://127.0.0.1:PORT`` for a cache
    with ``tcp_listen`` (SGX: Gramine's Unix sockets do not cross enclaves); only loopback
    addresses are accepted.

    ``server_public_key`` is the pinned dkeyserver release-signing key (from the runtime's own
    measured configuration); ``attester`` produces the runtime's local evidence (needed on SGX
    and sim; on TDX/SNP the cache checks the socket peer instead and it may stay ``None``).
    """

    def __init__(
        self,
        socket_path: str,
        *,
        server_public_key: Ed25519PublicKey | bytes | str,
        attester: Any = None,
        timeout: float = 10.0,
    ) -> None:
        self.socket_path = socket_path
        self._endpoint = parse_endpoint(socket_path)
        self._pub = load_public_key(server_public_key)
        self._server_key_id = key_id(self._pub)
        self._attester = attester
        self._timeout = timeout
        self._lock = threading.RLock()
        self._sock: socket.socket | None = None
        self._sk: Any = None
        self._nonce: bytes | None = None
        self._cache_key: bytes | None = None
        self._seen_policy: dict[str, int] = {}
        self.auth_mode: str | None = None

    def __repr__(self) -> str:
        return f"KeyCacheClient({self.socket_path!r}, session={'yes' if self._sock else 'no'})"

    # --- connection and session ----------------------------------------------------------
    def _connect(self) -> socket.socket:
        return connect_endpoint(self._endpoint, self._timeout)

    def connect(self) -> None:
        """Open the session now (otherwise the first fetch does it)."""
        with self._lock:
            if self._sock is None:
                self._open_session()

    def _open_session(self) -> None:
        from sealtorch.attestation import binding

        sock = self._connect()
        try:
            hello = call(sock, {"op": "hello"}, timeout=self._timeout)
            if not hello.get("ok"):
                _raise_for(hello, "the session")
            if hello.get("protocol") != LOCAL_PROTOCOL:
                raise ProtocolError("key cache speaks another local protocol version")
            if not hmac.compare_digest(str(hello.get("server_key_id", "")),
                                       self._server_key_id):
                raise GrantError(
                    "the key cache trusts another key server than this runtime's pinned key; "
                    "check both measured configurations"
                )
            nonce = b64d(hello.get("nonce"), field="nonce", max_len=NONCE_LEN,
                         exact_len=NONCE_LEN)
            cache_key = b64d(hello.get("cache_key"), field="cache_key",
                             max_len=hpke.PUBLIC_KEY_LEN, exact_len=hpke.PUBLIC_KEY_LEN)
            mode = hello.get("auth")
            sk, pk = hpke.generate_keypair()
            evidence: Any = None
            if mode == "evidence":
                if self._attester is None:
                    raise AttesterUnavailableError(
                        "this key cache needs local attestation evidence; pass an attester "
                        "(sealtorch.attestation.attesters.detect()) to KeyCacheClient"
                    )
                rd = binding.report_data("local", nonce, hpke.KEM_ID, pk,
                                         cache_audience(cache_key))
                evidence = self._attester.attest(rd).to_dict()
            elif mode != "peercred":
                raise ProtocolError("key cache announced an unknown local authentication mode")
            ans = call(sock, {"op": "session", "public_key": b64e(pk), "evidence": evidence},
                       timeout=self._timeout)
            if not ans.get("ok"):
                _raise_for(ans, "the session")
        except BaseException:
            sock.close()
            raise
        self._sock, self._sk, self._nonce, self._cache_key = sock, sk, nonce, cache_key
        self.auth_mode = mode

    def close(self) -> None:
        """Close the session (the cache forgets it)."""
        with self._lock:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.close()
            self._sock = self._sk = self._nonce = self._cache_key = None

    def __enter__(self) -> KeyCacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, make: Callable[[], dict[str, Any]], what: str) -> dict[str, Any]:
        """Send ``make()`` on the session, re-opening it once if the cache went away meanwhile
        (the request is rebuilt then, since it may be bound to the session)."""
        with self._lock:
            for attempt in (0, 1):
                if self._sock is None:
                    self._open_session()
                assert self._sock is not None
                req = make()
                try:
                    ans = call(self._sock, req, timeout=self._timeout)
                except ServiceUnavailableError:
                    self.close()
                    if attempt:
                        raise
                    continue
                if not ans.get("ok"):
                    err = ans.get("error")
                    if isinstance(err, dict) and err.get("code") == "no_session" and not attempt:
                        self.close()
                        continue
                    _raise_for(ans, what)
                return ans
        raise ServiceUnavailableError("key cache session could not be established")

    # --- verification --------------------------------------------------------------------
    def _verify_grant(self, doc: object, model_id: str) -> Grant:
        assert self._cache_key is not None
        return verify_relayed_grant(self._pub, doc, cache_key=self._cache_key,
                                    model_id=model_id, seen_policy=self._seen_policy)

    # --- KeyProvider ---------------------------------------------------------------------
    def file_key(self, header: Header) -> Secret:
        """The file key of the sealed file with ``header`` (checked against its commitment).

        Each request carries a fresh secret sealed to the cache key this runtime attested to;
        the answer only opens if the cache opened it, i.e. holds the key the grant names.
        """
        challenges: list[Secret] = []

        def make() -> dict[str, Any]:
            assert self._cache_key is not None and self._nonce is not None
            r = Secret(os.urandom(CHALLENGE_LEN))
            challenges.append(r)
            sealed_r = hpke.seal(r, self._cache_key, challenge_info(header.digest(), self._nonce))
            return {"op": "file_key", "model_id": header.model_id, "header": b64e(header.raw),
                    "challenge": b64e(sealed_r)}

        try:
            with self._lock:
                ans = self._request(make, f"the key of model {header.model_id!r}")
                grant = self._verify_grant(ans.get("grant"), header.model_id)
                if grant.key_version != header.key_version:
                    raise GrantError(
                        "the relayed grant is for another key version than the file"
                    )
                sealed = b64d(ans.get("sealed_key"), field="sealed_key",
                              max_len=hpke.MAX_SEALED_LEN)
                assert self._nonce is not None
                try:
                    key = hpke.open(sealed, self._sk,
                                    file_key_info(grant.digest(), header.digest(), self._nonce,
                                                  challenges[-1]))
                except ProtocolError as e:
                    raise ProtocolError(
                        "the key cache did not prove possession of the key its grant was "
                        "issued to (its answer does not open with this request's challenge); "
                        "refusing it: this is not the cache this runtime attested to, or the "
                        "answer was altered"
                    ) from e
        finally:
            for r in challenges:
                r.wipe()
        if len(key) != 32:
            key.wipe()
            raise ProtocolError("key cache returned a file key of the wrong length")
        try:
            check_file_key(key, header).wipe()
        except BaseException:
            key.wipe()
            raise
        return key

    def grant(self, model_id: str) -> Grant:
        """The verified grant of ``model_id`` as relayed by the cache."""
        with self._lock:
            ans = self._request(lambda: {"op": "policy", "model_id": model_id},
                                f"the policy of model {model_id!r}")
            return self._verify_grant(ans.get("grant"), model_id)

    def policy(self, model_id: str) -> Any:
        """The model's :class:`~sealtorch.attestation.policy.ModelPolicy`, from its signed grant."""
        from sealtorch.keycache.localauth import policy_from_grant

        return policy_from_grant(self.grant(model_id))

    def status(self) -> dict[str, Any]:
        """The cache's health snapshot (no session needed)."""
        sock = self._connect()
        try:
            ans = call(sock, {"op": "status"}, timeout=self._timeout)
        finally:
            sock.close()
        if not ans.get("ok") or not isinstance(ans.get("health"), dict):
            _raise_for(ans, "status")
        return ans["health"]
