"""Length-prefixed canonical JSON frames on the local Unix socket (runtime <-> dkeycache).

A frame is a 4-byte big-endian length followed by that many bytes of canonical JSON (an
object). Frames are limited to 64 KiB and every read runs against a per-connection deadline, so
a slow or hostile peer cannot hold a worker or make the cache buffer unbounded input.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any

from sealtorch.errors import ProtocolError, ServiceUnavailableError
from sealtorch.protocol.canonical import canonical_json

MAX_FRAME = 64 * 1024
_LEN = struct.Struct(">I")


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
