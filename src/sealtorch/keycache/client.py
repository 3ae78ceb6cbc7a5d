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
    MAX_FRAME,
    cache_audience,
    call,
    challenge_info,
    file_key_info,
    grant_info,
    model_context,
    open_grant,
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

    def _challenged(self, what: str, context: bytes, make: Callable[[bytes], dict[str, Any]]
                    ) -> tuple[dict[str, Any], Secret]:
        """Send ``make(sealed challenge)`` on the session with a fresh secret sealed to the
        cache key for ``context``; returns the answer and the secret it must be bound to."""
        challenges: list[Secret] = []

        def build() -> dict[str, Any]:
            assert self._cache_key is not None and self._nonce is not None
            r = Secret(os.urandom(CHALLENGE_LEN))
            challenges.append(r)
            return make(hpke.seal(r, self._cache_key, challenge_info(context, self._nonce)))

        try:
            ans = self._request(build, what)
        except BaseException:
            for r in challenges:
                r.wipe()
            raise
        for r in challenges[:-1]:
            r.wipe()
        return ans, challenges[-1]

    def _open_grant(self, ans: dict[str, Any], context: bytes, challenge: Secret,
                    model_id: str) -> Grant:
        """The relayed grant of an answer: sealed to this session for this request."""
        sealed = b64d(ans.get("sealed_grant"), field="sealed_grant", max_len=MAX_FRAME)
        assert self._nonce is not None
        try:
            doc = open_grant(sealed, self._sk, grant_info(context, self._nonce, challenge))
        except ProtocolError as e:
            raise ProtocolError(
                "the relayed grant does not open for this request (replayed, altered, or not "
                "from the cache this runtime attested to); refusing it"
            ) from e
        return self._verify_grant(doc, model_id)

    # --- KeyProvider ---------------------------------------------------------------------
    def file_key(self, header: Header) -> Secret:
        """The file key of the sealed file with ``header`` (checked against its commitment)."""
        return self.file_key_and_grant(header)[0]

    def file_key_and_grant(self, header: Header) -> tuple[Secret, Grant]:
        """The file key of ``header`` and the grant it was released under, both from one fresh
        answer: the request carries a secret sealed to the cache key this runtime attested to,
        and the grant and the key only open if the cache opened it (and holds that key)."""
        with self._lock:
            ans, challenge = self._challenged(
                f"the key of model {header.model_id!r}", header.digest(),
                lambda ch: {"op": "file_key", "model_id": header.model_id,
                            "header": b64e(header.raw), "challenge": b64e(ch)})
            try:
                grant = self._open_grant(ans, header.digest(), challenge, header.model_id)
                if grant.key_version != header.key_version:
                    raise GrantError("the relayed grant is for another key version than the file")
                sealed = b64d(ans.get("sealed_key"), field="sealed_key",
                              max_len=hpke.MAX_SEALED_LEN)
                assert self._nonce is not None
                try:
                    key = hpke.open(sealed, self._sk,
                                    file_key_info(grant.digest(), header.digest(), self._nonce,
                                                  challenge))
                except ProtocolError as e:
                    raise ProtocolError(
                        "the key cache did not prove possession of the key its grant was "
                        "issued to (its answer does not open with this request's challenge); "
                        "refusing it: this is not the cache this runtime attested to, or the "
                        "answer was altered"
                    ) from e
            finally:
                challenge.wipe()
        if len(key) != 32:
            key.wipe()
            raise ProtocolError("key cache returned a file key of the wrong length")
        try:
            check_file_key(key, header).wipe()
        except BaseException:
            key.wipe()
            raise
        return key, grant

    def grant(self, model_id: str) -> Grant:
        """The verified grant of ``model_id`` as relayed by the cache, fresh: bound to this
        request's challenge, so an older recorded answer (an older policy) is refused."""
        context = model_context(model_id)
        with self._lock:
            ans, challenge = self._challenged(
                f"the policy of model {model_id!r}", context,
                lambda ch: {"op": "policy", "model_id": model_id, "challenge": b64e(ch)})
            try:
                return self._open_grant(ans, context, challenge, model_id)
            finally:
                challenge.wipe()

    def policy(self, model_id: str) -> Any:
        """The model's :class:`~sealtorch.attestation.policy.ModelPolicy`, from a fresh grant."""
        from sealtorch.keycache.localauth import policy_from_grant

        return policy_from_grant(self.grant(model_id))

    def status(self) -> dict[str, Any]:
        """Lease state of the models this session was allowed (needs the session)."""
        with self._lock:
            ans = self._request(lambda: {"op": "status"}, "status")
        status = ans.get("status")
        if not isinstance(status, dict):
            raise ProtocolError("key cache answered status without a status")
        return status

    def health(self) -> dict[str, Any]:
        """The cache's state and counts (no session needed, nothing about any model)."""
        sock = self._connect()
        try:
            ans = call(sock, {"op": "health"}, timeout=self._timeout)
        finally:
            sock.close()
        if not ans.get("ok") or not isinstance(ans.get("health"), dict):
            _raise_for(ans, "health")
        return ans["health"]
