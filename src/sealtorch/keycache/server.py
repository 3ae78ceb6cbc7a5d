"""dkeycache's local release service on a Unix domain socket.

Per connection, one session: the runtime asks for a fresh nonce (``hello``), proves itself
(``session``: evidence bound with role ``local`` to that nonce, its ephemeral HPKE key and the
cache's key; or, in a TDX/SNP VM, the peer's ``SO_PEERCRED`` uid), then asks for file keys
(``file_key``: model id + raw public header). Each answer carries the server's signed grant and
the file key HPKE-sealed to the session key; nothing secret crosses the socket in plaintext.
Wire format: docs/keycache.md.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import logging
import os
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from sealtorch._secret import Secret
from sealtorch.errors import (
    ConfigError,
    ProtocolError,
    ReleaseDenied,
    SealtorchError,
)
from sealtorch.format.header import MAX_HEADER_BYTES, parse_header
from sealtorch.format.keys import check_file_key, derive_file_key
from sealtorch.keycache.framing import recv_frame, send_frame
from sealtorch.keycache.leases import Lease, LeaseManager
from sealtorch.keycache.metrics import CacheMetrics
from sealtorch.protocol import hpke
from sealtorch.protocol.b64 import b64d, b64e
from sealtorch.protocol.grant import MODEL_ID_RE, NONCE_LEN

log = logging.getLogger("sealtorch.keycache")

LOCAL_PROTOCOL = "sealtorch-local/v1"
FILE_KEY_INFO_LABEL = b"sealtorch/v1 local file key\x00"
MAX_EVIDENCE_FIELD = 60 * 1024


def file_key_info(grant_digest: bytes, header_digest: bytes, session_nonce: bytes) -> bytes:
    """HPKE ``info`` of a sealed file key: binds it to the grant, the file and the session."""
    return FILE_KEY_INFO_LABEL + grant_digest + header_digest + session_nonce


def cache_audience(cache_public_key: bytes) -> bytes:
    """The audience a runtime binds into its local evidence: SHA-256 of the cache's key."""
    return hashlib.sha256(cache_public_key).digest()


@dataclass(frozen=True)
class PeerCred:
    """``SO_PEERCRED`` of a Unix socket peer (kernel-provided, not spoofable by the peer)."""

    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred:
    """Read the peer's credentials from the kernel."""
    fmt = "3i"
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt))
    pid, uid, gid = struct.unpack(fmt, raw)
    return PeerCred(pid, uid, gid)


class LocalAuthenticator(Protocol):
    """How the cache decides who a local runtime is and whether a policy allows it."""

    mode: str  # "evidence" or "peercred"

    def authenticate(
        self, evidence: object, *, nonce: bytes, public_key: bytes, audience: bytes,
        peer: PeerCred,
    ) -> Any:
        """Verify the runtime; returns its claims (or ``None`` in peercred mode)."""
        ...

    def check_runtime(self, policy: Any, claims: Any) -> str | None:
        """``None`` if the ModelPolicy's runtime allow-list admits ``claims``, else a code."""
        ...


class _Session:
    __slots__ = ("claims", "nonce", "public_key")

    def __init__(self) -> None:
        self.nonce: bytes | None = None
        self.public_key: bytes | None = None
        self.claims: Any = None


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


class LocalServer:
    """Accepts local runtimes on ``socket_path`` and serves file keys from the lease manager."""

    def __init__(
        self,
        socket_path: str,
        leases: LeaseManager,
        auth: LocalAuthenticator,
        *,
        server_key_id: str,
        metrics: CacheMetrics | None = None,
        socket_group: str | None = None,
        allowed_uids: tuple[int, ...] = (),
        idle_timeout: float = 300.0,
        frame_timeout: float = 10.0,
        max_connections: int = 64,
    ) -> None:
        self.socket_path = socket_path
        self.leases = leases
        self.auth = auth
        self.server_key_id = server_key_id
        self.metrics = metrics or CacheMetrics(leases.snapshot)
        self._group = socket_group
        self._uids = set(allowed_uids) or {os.getuid()}
        self._idle = idle_timeout
        self._frame_timeout = frame_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.audience = cache_audience(leases.public_key)

    # --- lifecycle -----------------------------------------------------------------------
    def bind(self) -> None:
        """Create the socket with mode 0600 (0660 with a configured group) before listening."""
        path = self.socket_path
        if os.path.lexists(path):
            import stat

            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # a stale socket left by a killed cache
            else:
                raise ConfigError(f"another dkeycache is already listening on {path}")
            finally:
                probe.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177 if self._group is None else 0o117)
        try:
            s.bind(path)
        except OSError as e:
            s.close()
            raise ConfigError(f"cannot create the socket {path} ({e.strerror})") from e
        finally:
            os.umask(old)
        if self._group is not None:
            try:
                os.chown(path, -1, grp.getgrnam(self._group).gr_gid)
            except (KeyError, OSError) as e:
                s.close()
                raise ConfigError(f"cannot give the socket to group {self._group!r}") from e
            os.chmod(path, 0o660)
        else:
            os.chmod(path, 0o600)
        s.listen(128)
        self._sock = s

    def serve_forever(self) -> None:
        """Accept connections until :meth:`stop`; each connection runs in its own thread."""
        assert self._sock is not None, "call bind() first"
        self._sock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                raise
            if not self._slots.acquire(blocking=False):
                conn.close()  # too many connections; the client retries
                continue
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True).start()

    def start(self) -> None:
        """Bind and serve in a background thread."""
        if self._sock is None:
            self.bind()
        self._thread = threading.Thread(target=self.serve_forever, name="dkeycache-local",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)

    # --- one connection ------------------------------------------------------------------
    def _serve_conn(self, conn: socket.socket) -> None:
        try:
            peer = peer_cred(conn)
            if self.auth.mode == "peercred" and peer.uid not in self._uids:
                self.metrics.denials.labels("uid_not_allowed").inc()
                with contextlib.suppress(OSError):
                    send_frame(conn, _error("uid_not_allowed",
                                            "this user may not use the key cache"))
                return
            session = _Session()
            while not self._stop.is_set():
                try:
                    req = recv_frame(conn, deadline=time.monotonic() + self._idle,
                                     body_timeout=self._frame_timeout)
                except TimeoutError:
                    return
                except ProtocolError as e:
                    self.metrics.denials.labels(e.code).inc()
                    with contextlib.suppress(OSError):
                        send_frame(conn, _error(e.code, str(e)))
                    return
                if req is None:
                    return
                answer = self._handle(req, session, peer)
                conn.settimeout(self._frame_timeout)
                send_frame(conn, answer)
        except OSError:
            return
        finally:
            conn.close()
            self._slots.release()

    def _handle(self, req: dict[str, Any], session: _Session, peer: PeerCred) -> dict[str, Any]:
        op = req.get("op")
        if not isinstance(op, str) or op not in _OPS:
            self.metrics.requests.labels("invalid").inc()
            self.metrics.denials.labels("protocol_error").inc()
            return _error("protocol_error", f"op must be one of {', '.join(sorted(_OPS))}")
        self.metrics.requests.labels(op).inc()
        try:
            return getattr(self, f"_op_{op}")(req, session, peer)
        except ReleaseDenied as e:
            self.metrics.denials.labels(e.denial).inc()
            return _error(e.denial, str(e))
        except SealtorchError as e:
            self.metrics.denials.labels(e.code).inc()
            return _error(e.code, str(e))
        except Exception as e:  # a bug must not leak details or kill the connection silently
            log.error("internal error in local %s request (%s)", op, type(e).__name__)
            self.metrics.denials.labels("internal_error").inc()
            return _error("internal_error", "the key cache failed to answer; see its log")

    def _op_hello(self, req: dict[str, Any], session: _Session, peer: PeerCred) -> dict[str, Any]:
        session.nonce = secrets.token_bytes(NONCE_LEN)
        session.public_key = None
        session.claims = None
        return {
            "ok": True,
            "protocol": LOCAL_PROTOCOL,
            "nonce": b64e(session.nonce),
            "cache_key": b64e(self.leases.public_key),
            "kem_id": hpke.KEM_ID,
            "auth": self.auth.mode,
            "server_key_id": self.server_key_id,
        }

    def _op_session(
        self, req: dict[str, Any], session: _Session, peer: PeerCred
    ) -> dict[str, Any]:
        nonce = session.nonce
        session.nonce = None  # one-time: burned before the evidence is looked at
        if nonce is None:
            raise ProtocolError("send hello first: a session needs a fresh nonce from the cache")
        pk = b64d(req.get("public_key"), field="public_key", max_len=hpke.PUBLIC_KEY_LEN,
                  exact_len=hpke.PUBLIC_KEY_LEN)
        hpke.load_public_key(pk)
        claims = self.auth.authenticate(
            req.get("evidence"), nonce=nonce, public_key=pk, audience=self.audience, peer=peer
        )
        session.public_key = pk
        session.claims = claims
        session.nonce = nonce  # kept as the session id bound into every sealed answer
        return {"ok": True, "auth": self.auth.mode}

    def _need_session(self, session: _Session) -> tuple[bytes, bytes]:
        if session.public_key is None or session.nonce is None:
            raise ReleaseDenied("no session: send hello and session first", "no_session")
        return session.public_key, session.nonce

    @staticmethod
    def _model_id(req: dict[str, Any]) -> str:
        mid = req.get("model_id")
        if not isinstance(mid, str) or not MODEL_ID_RE.match(mid):
            raise ProtocolError("model_id must match [A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
        return mid

    def _op_file_key(
        self, req: dict[str, Any], session: _Session, peer: PeerCred
    ) -> dict[str, Any]:
        pk, sid = self._need_session(session)
        mid = self._model_id(req)
        raw = b64d(req.get("header"), field="header", max_len=MAX_HEADER_BYTES)
        header = parse_header(raw)
        if header.model_id != mid:
            raise ProtocolError("the header names another model id than model_id")

        def check(lease: Lease) -> None:
            code = self.auth.check_runtime(lease.policy, session.claims)
            if code is not None:
                raise ReleaseDenied(
                    f"the policy of model {mid!r} does not allow this runtime", code
                )

        def derive(lease: Lease) -> Secret:
            file_key = derive_file_key(lease.key, header)
            try:
                check_file_key(file_key, header).wipe()
            except BaseException:
                file_key.wipe()
                raise
            return file_key

        lease, file_key = self.leases.acquire(mid, header.key_version, check=check, use=derive)
        assert file_key is not None
        try:
            sealed = hpke.seal(
                file_key, pk, file_key_info(lease.grant_digest, header.digest(), sid)
            )
        finally:
            file_key.wipe()
        return {"ok": True, "grant": lease.document, "sealed_key": b64e(sealed)}

    def _op_policy(self, req: dict[str, Any], session: _Session, peer: PeerCred) -> dict[str, Any]:
        self._need_session(session)
        return {"ok": True, "grant": self.leases.grant_document(self._model_id(req))}

    def _op_status(self, req: dict[str, Any], session: _Session, peer: PeerCred) -> dict[str, Any]:
        return {"ok": True, "health": self.leases.snapshot()}


_OPS = frozenset({"hello", "session", "file_key", "policy", "status"})
