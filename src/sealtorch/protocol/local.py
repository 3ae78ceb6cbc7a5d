"""The local protocol between an inference runtime and dkeycache, as both ends must speak it:
its version, frames, the HPKE ``info`` labels that bind each sealed secret to its context, and
the runtime's check of the grant the cache relays. Wire format: docs/keycache.md.

A frame is a 4-byte big-endian length followed by that many bytes of canonical JSON (an
object). Frames are limited to 64 KiB and every read runs against a per-connection deadline, so
a slow or hostile peer cannot hold a worker or make the cache buffer unbounded input.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import struct
import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sealtorch._secret import Secret
from sealtorch.errors import GrantError, ProtocolError, ServiceUnavailableError
from sealtorch.protocol.canonical import canonical_json
from sealtorch.protocol.grant import Grant
from sealtorch.protocol.signing import KIND_GRANT, verify_document

LOCAL_PROTOCOL = "sealtorch-local/v1"
MAX_FRAME = 64 * 1024
_LEN = struct.Struct(">I")
FILE_KEY_INFO_LABEL = b"sealtorch/v1 local file key\x00"
CHALLENGE_INFO_LABEL = b"sealtorch/v1 local cache challenge\x00"
GRANT_INFO_LABEL = b"sealtorch/v1 local grant\x00"
_MODEL_CONTEXT_LABEL = b"sealtorch/v1 local model\x00"
#: the runtime's fresh secret that only the holder of the cache's HPKE key can open
CHALLENGE_LEN = 32
#: HPKE ``enc`` (32) + the sealed 32-byte secret + AES-GCM tag (16)
SEALED_CHALLENGE_LEN = 32 + CHALLENGE_LEN + 16
MAX_EVIDENCE_FIELD = 60 * 1024


def file_key_info(grant_digest: bytes, header_digest: bytes, session_nonce: bytes,
                  challenge: bytes | Secret) -> bytes:
    """HPKE ``info`` of a sealed file key: binds it to the grant, the file, the session and the
    runtime's challenge secret (which proves the answer comes from the holder of the cache key
    the grant was issued to)."""
    return FILE_KEY_INFO_LABEL + grant_digest + header_digest + session_nonce + bytes(challenge)


def challenge_info(header_digest: bytes, session_nonce: bytes) -> bytes:
    """HPKE ``info`` of the runtime's challenge sealed to the cache key: binds it to the file
    and the session, so it cannot be replayed into another request context."""
    return CHALLENGE_INFO_LABEL + header_digest + session_nonce


def grant_info(context: bytes, session_nonce: bytes, challenge: bytes | Secret) -> bytes:
    """HPKE ``info`` of a relayed grant sealed to the runtime's session key: binds it to what
    was asked (a file's header digest, or :func:`model_context`), the session and the runtime's
    fresh challenge, so a recorded answer cannot be replayed later (an older, looser policy)."""
    return GRANT_INFO_LABEL + context + session_nonce + bytes(challenge)


def model_context(model_id: str) -> bytes:
    """The 32-byte context of a request about a model rather than one file (``policy``)."""
    return hashlib.sha256(_MODEL_CONTEXT_LABEL + model_id.encode("ascii")).digest()


def seal_grant(document: dict[str, Any], session_key: bytes, info: bytes) -> bytes:
    """A grant document sealed (HPKE) to a runtime's session key."""
    from sealtorch.protocol import hpke

    return hpke.seal(canonical_json(document), session_key, info)


def open_grant(sealed: bytes, private_key: Any, info: bytes) -> dict[str, Any]:
    """The grant document of :func:`seal_grant` (:class:`ProtocolError` if it does not open)."""
    from sealtorch.protocol import hpke

    with hpke.open(sealed, private_key, info, max_len=MAX_FRAME) as raw:
        try:
            doc = json.loads(bytes(raw.view()))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ProtocolError("the relayed grant is not a JSON document") from e
    if not isinstance(doc, dict):
        raise ProtocolError("the relayed grant is not a JSON object")
    return doc


def cache_audience(cache_public_key: bytes) -> bytes:
    """The audience a runtime binds into its local evidence: SHA-256 of the cache's key."""
    return hashlib.sha256(cache_public_key).digest()


def verify_relayed_grant(server_key: Ed25519PublicKey, doc: object, *, cache_key: bytes,
                         model_id: str, seen_policy: dict[str, int]) -> Grant:
    """The runtime's check of a grant its cache relays: signed by the pinned server key,
    issued to the cache this runtime attested to (its HPKE key), for the model asked for, and
    never with a lower policy version than ``seen_policy`` holds (updated on success)."""
    from sealtorch.protocol.signing import key_id

    grant = Grant.from_body(verify_document(server_key, KIND_GRANT, doc))
    if not hmac.compare_digest(grant.requester_key, cache_key):
        raise GrantError(
            "the relayed grant was issued to another key cache than the one this runtime "
            "attested to; refusing it"
        )
    if not hmac.compare_digest(grant.server_key_id, key_id(server_key)):
        raise GrantError("the relayed grant names another server key than the pinned one")
    if grant.model_id != model_id:
        raise GrantError("the relayed grant is for another model than the one requested")
    seen = seen_policy.get(model_id, 0)
    if grant.policy_version < seen:
        raise GrantError(
            f"policy version {grant.policy_version} of model {model_id!r} is lower than "
            f"version {seen} already seen; refusing a rollback"
        )
    seen_policy[model_id] = grant.policy_version
    return grant


def send_frame(sock: socket.socket, obj: dict[str, Any]) -> None:
    """Send one object as a frame; refuses to send more than :data:`MAX_FRAME` bytes."""
    data = canonical_json(obj)
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"local message larger than {MAX_FRAME} bytes; refusing to send it")
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("local peer did not send a complete message in time")
            sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            if not buf:
                return None
            raise ProtocolError("local peer closed the connection in the middle of a message")
        buf += chunk
    return bytes(buf)


def recv_frame(
    sock: socket.socket, *, deadline: float | None = None, body_timeout: float | None = None
) -> dict[str, Any] | None:
    """Read one frame; ``None`` on a clean close before a frame started.

    ``deadline`` is a :func:`time.monotonic` instant by which the whole frame must have arrived
    (:class:`TimeoutError` otherwise); once its length prefix is in, the rest must also arrive
    within ``body_timeout`` seconds, so a peer cannot trickle a message in byte by byte.
    """
    head = _recv_exact(sock, _LEN.size, deadline)
    if head is None:
        return None
    (length,) = _LEN.unpack(head)
    if length == 0 or length > MAX_FRAME:
        raise ProtocolError(f"local message length out of range (1..{MAX_FRAME} bytes)")
    if body_timeout is not None:
        body_deadline = time.monotonic() + body_timeout
        deadline = body_deadline if deadline is None else min(deadline, body_deadline)
    data = _recv_exact(sock, length, deadline)
    if data is None:
        raise ProtocolError("local peer closed the connection in the middle of a message")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ProtocolError("local message is not UTF-8 JSON") from e
    if not isinstance(obj, dict):
        raise ProtocolError("local message must be a JSON object")
    return obj


def call(sock: socket.socket, obj: dict[str, Any], *, timeout: float) -> dict[str, Any]:
    """Send a request frame and read its answer frame within ``timeout`` seconds."""
    try:
        sock.settimeout(timeout)
        send_frame(sock, obj)
        answer = recv_frame(sock, deadline=time.monotonic() + timeout)
    except (TimeoutError, OSError) as e:
        raise ServiceUnavailableError(
            f"key cache did not answer ({type(e).__name__}); is dkeycache running?"
        ) from e
    if answer is None:
        raise ServiceUnavailableError("key cache closed the connection without an answer")
    return answer
