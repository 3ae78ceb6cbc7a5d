"""dkeycache's local release service on a Unix domain socket (and optionally loopback TCP).

Per connection, one session: the runtime asks for a fresh nonce (``hello``), proves itself
(``session``: evidence bound with role ``local`` to that nonce, its ephemeral HPKE key and the
cache's key; or, in a TDX/SNP VM, the peer's ``SO_PEERCRED`` uid), then asks for file keys
(``file_key``: model id + raw public header + a fresh secret HPKE-sealed to the cache's key,
which the cache must open and bind into its answer: proof that it holds the key the grant was
issued to) or for a model's grant (``policy``, the same challenge). Each answer carries the
server's signed grant and the file key, both HPKE-sealed to the session key and bound to that
request's challenge: nothing crosses the socket in plaintext and no answer can be replayed.
``status`` (a session's own models) needs a session; ``health`` (state and counts) does not.
The optional loopback TCP listener (for SGX, where Gramine's Unix sockets do not cross enclaves)
speaks the same protocol and accepts evidence-based sessions only. Every connect/session/file-key
outcome is recorded by a :class:`DecisionLog`. Wire format: docs/keycache.md.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sealtorch._net import is_loopback_host
from sealtorch._secret import Secret
from sealtorch.errors import (
    ConfigError,
    ProtocolError,
    ReleaseDenied,
    SealtorchError,
)
from sealtorch.format.header import MAX_HEADER_BYTES, Header, parse_header
from sealtorch.format.keys import check_file_key, derive_file_key
from sealtorch.ids import MODEL_ID_RULE, is_model_id
from sealtorch.keycache.address import TcpAddress
from sealtorch.keycache.decisions import DecisionContext, DecisionLog, runtime_identity
from sealtorch.keycache.lease import Lease
from sealtorch.keycache.leases import LeaseManager
from sealtorch.keycache.metrics import CacheMetrics
from sealtorch.protocol import hpke
from sealtorch.protocol.b64 import b64d, b64e
from sealtorch.protocol.grant import NONCE_LEN
from sealtorch.protocol.local import (
    LOCAL_PROTOCOL,
    SEALED_CHALLENGE_LEN,
    cache_audience,
    challenge_info,
    file_key_info,
    grant_info,
    model_context,
    recv_frame,
    seal_grant,
    send_frame,
)

log = logging.getLogger("sealtorch.keycache")

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


def peer_info(peer: PeerCred | None) -> dict[str, Any]:
    """What the decision log says about the connecting process (kernel facts only)."""
    if peer is None:
        return {"transport": "tcp"}
    return {"transport": "unix", "pid": peer.pid, "uid": peer.uid}


class LocalAuthenticator(Protocol):
    """How the cache decides who a local runtime is and whether a policy allows it."""

    mode: str  # "evidence" or "peercred"

    def authenticate(
        self, evidence: object, *, nonce: bytes, public_key: bytes, audience: bytes,
        peer: PeerCred | None,
    ) -> Any:
        """Verify the runtime (``peer`` is ``None`` on TCP); returns its claims (or ``None``)."""
        ...

    def check_runtime(self, policy: Any, claims: Any) -> tuple[str | None, tuple[str, ...]]:
        """``(None, ())`` if the policy's runtime allow-list admits ``claims``, else a denial
        code and the reasons (for the decision log, never for the runtime)."""
        ...


class _Session:
    __slots__ = ("claims", "models", "nonce", "peer", "public_key", "runtime")

    def __init__(self, peer: PeerCred | None) -> None:
        self.peer = peer  # None on TCP
        self.nonce: bytes | None = None
        self.public_key: bytes | None = None
        self.claims: Any = None
        self.runtime: dict[str, Any] | None = None  # identity claims for the decision log
        self.models: set[str] = set()  # models this session was allowed (what status shows)


def _is_loopback_peer(addr: Any) -> bool:
    return isinstance(addr, tuple) and bool(addr) and is_loopback_host(str(addr[0]))


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


class LocalServer:
    """Accepts local runtimes on ``socket_path`` (and ``tcp``) and serves file keys from leases."""

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
        tcp: TcpAddress | None = None,
        decisions: DecisionLog | None = None,
    ) -> None:
        if tcp is not None and auth.mode != "evidence":
            raise ConfigError(
                "the TCP listener accepts evidence-based local auth only (TCP has no peer "
                "credentials); drop tcp_listen or use local_auth = \"evidence\""
            )
        self.socket_path = socket_path
        self.tcp = tcp
        self.tcp_address: TcpAddress | None = None  # the bound address (real port)
        self.decisions = decisions or DecisionLog()
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
        self._tcp_sock: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
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
        if self.tcp is not None:
            try:
                self._bind_tcp(self.tcp)
            except BaseException:
                self._sock.close()
                self._sock = None
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise

    def _bind_tcp(self, addr: TcpAddress) -> None:
        """Listen on the loopback address (the config already refused anything else)."""
        t = socket.socket(addr.family, socket.SOCK_STREAM)
        try:
            t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            t.bind((addr.host, addr.port))
            t.listen(128)
        except OSError as e:
            t.close()
            raise ConfigError(f"cannot listen on {addr} ({e.strerror})") from e
        self._tcp_sock = t
        self.tcp_address = TcpAddress(addr.host, t.getsockname()[1])

    def serve_forever(self) -> None:
        """Accept Unix-socket connections until :meth:`stop` (one thread per connection)."""
        assert self._sock is not None, "call bind() first"
        self._accept_loop(self._sock, tcp=False)

    def _accept_loop(self, lsock: socket.socket, *, tcp: bool) -> None:
        lsock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                conn, addr = lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                raise
            if tcp and not _is_loopback_peer(addr):
                conn.close()  # cannot happen on a loopback bind; refuse if it ever does
                continue
            if not self._slots.acquire(blocking=False):
                conn.close()  # too many connections; the client retries
                continue
            threading.Thread(target=self._serve_conn, args=(conn, tcp), daemon=True).start()

    def start(self) -> None:
        """Bind and serve in background threads (one per listener)."""
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        listeners = [(self._sock, False, "dkeycache-local")]
        if self._tcp_sock is not None:
            listeners.append((self._tcp_sock, True, "dkeycache-tcp"))
        for lsock, tcp, name in listeners:
            t = threading.Thread(target=self._accept_loop, args=(lsock,), kwargs={"tcp": tcp},
                                 name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        if self._tcp_sock is not None:
            self._tcp_sock.close()
        if self._sock is not None:
            self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)

    # --- one connection ------------------------------------------------------------------
    def _serve_conn(self, conn: socket.socket, tcp: bool = False) -> None:
        try:
            peer: PeerCred | None = None
            if tcp:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                peer = peer_cred(conn)
            if self.auth.mode == "peercred" and (peer is None or peer.uid not in self._uids):
                self.metrics.denials.labels("uid_not_allowed").inc()
                self.decisions.record(
                    DecisionContext("connect", peer_info(peer),
                                    reasons=["the peer's uid is not in allowed_uids"]),
                    allowed=False, code="uid_not_allowed")
                with contextlib.suppress(OSError):
                    send_frame(conn, _error("uid_not_allowed",
                                            "this user may not use the key cache"))
                return
            session = _Session(peer)
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
                answer = self._handle(req, session)
                conn.settimeout(self._frame_timeout)
                send_frame(conn, answer)
        except OSError:
            return
        finally:
            conn.close()
            self._slots.release()

    def _handle(self, req: dict[str, Any], session: _Session) -> dict[str, Any]:
        op = req.get("op")
        if not isinstance(op, str) or op not in _OPS:
            self.metrics.requests.labels("invalid").inc()
            self.metrics.denials.labels("protocol_error").inc()
            return _error("protocol_error", f"op must be one of {', '.join(sorted(_OPS))}")
        self.metrics.requests.labels(op).inc()
        ctx = DecisionContext(op, peer_info(session.peer), runtime=session.runtime)
        code: str | None = None
        try:
            answer: dict[str, Any] = getattr(self, f"_op_{op}")(req, session, ctx)
        except ReleaseDenied as e:
            code, answer = e.denial, _error(e.denial, str(e))
        except SealtorchError as e:
            code, answer = e.code, _error(e.code, str(e))
        except Exception as e:  # a bug must not leak details or kill the connection silently
            log.error("internal error in local %s request (%s)", op, type(e).__name__)
            code = "internal_error"
            answer = _error(code, "the key cache failed to answer; see its log")
            ctx.reasons.append(f"internal error ({type(e).__name__})")
        if code is not None:
            self.metrics.denials.labels(code).inc()
            if not ctx.reasons:  # our own fixed message: never key material or input
                ctx.reasons.append(answer["error"]["message"])
        if op in _DECISION_OPS:
            self.metrics.decisions.labels(op, "deny" if code else "allow").inc()
            self.decisions.record(ctx, allowed=code is None, code=code)
        return answer

    def _op_hello(
        self, req: dict[str, Any], session: _Session, ctx: DecisionContext
    ) -> dict[str, Any]:
        session.nonce = secrets.token_bytes(NONCE_LEN)
        session.public_key = None
        session.claims = None
        session.runtime = None
        session.models = set()
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
        self, req: dict[str, Any], session: _Session, ctx: DecisionContext
    ) -> dict[str, Any]:
        nonce = session.nonce
        session.nonce = None  # one-time: burned before the evidence is looked at
        session.public_key = session.claims = session.runtime = None
        session.models = set()
        ctx.runtime = None
        if nonce is None:
            raise ProtocolError("send hello first: a session needs a fresh nonce from the cache")
        pk = b64d(req.get("public_key"), field="public_key", max_len=hpke.PUBLIC_KEY_LEN,
                  exact_len=hpke.PUBLIC_KEY_LEN)
        hpke.load_public_key(pk)
        claims = self.auth.authenticate(
            req.get("evidence"), nonce=nonce, public_key=pk, audience=self.audience,
            peer=session.peer,
        )
        session.public_key = pk
        session.claims = claims
        session.runtime = ctx.runtime = runtime_identity(claims)
        session.nonce = nonce  # kept as the session id bound into every sealed answer
        return {"ok": True, "auth": self.auth.mode}

    def _need_session(self, session: _Session) -> tuple[bytes, bytes]:
        if session.public_key is None or session.nonce is None:
            raise ReleaseDenied("no session: send hello and session first", "no_session")
        return session.public_key, session.nonce

    @staticmethod
    def _model_id(req: dict[str, Any]) -> str:
        mid = req.get("model_id")
        if not is_model_id(mid):
            raise ProtocolError(f"model_id must be {MODEL_ID_RULE}")
        return mid

    def _op_file_key(
        self, req: dict[str, Any], session: _Session, ctx: DecisionContext
    ) -> dict[str, Any]:
        pk, sid = self._need_session(session)
        mid = ctx.model_id = self._model_id(req)
        raw = b64d(req.get("header"), field="header", max_len=MAX_HEADER_BYTES)
        header = parse_header(raw)
        if header.model_id != mid:
            raise ProtocolError("the header names another model id than model_id")
        ctx.key_version = header.key_version
        challenge = self._challenge(req, header.digest(), sid)
        try:
            return self._release_file_key(mid, header, pk, sid, challenge, session, ctx)
        finally:
            challenge.wipe()

    def _challenge(self, req: dict[str, Any], context: bytes, sid: bytes) -> Secret:
        """Open the runtime's fresh secret, sealed to this cache's key for this request."""
        sealed_ch = b64d(req.get("challenge"), field="challenge",
                         max_len=SEALED_CHALLENGE_LEN, exact_len=SEALED_CHALLENGE_LEN)
        return self.leases.open_challenge(sealed_ch, challenge_info(context, sid))

    def _runtime_check(self, mid: str, session: _Session, ctx: DecisionContext
                       ) -> Callable[[Lease], None]:
        """The model's ``runtimes`` allow-list, applied to this session's runtime."""
        def check(lease: Lease) -> None:
            code, reasons = self.auth.check_runtime(lease.policy, session.claims)
            if code is not None:
                ctx.reasons.extend(reasons)
                raise ReleaseDenied(
                    f"the policy of model {mid!r} does not allow this runtime", code
                )
        return check

    def _release_file_key(
        self, mid: str, header: Header, pk: bytes, sid: bytes, challenge: Secret,
        session: _Session, ctx: DecisionContext,
    ) -> dict[str, Any]:
        """Derive the file key of ``header`` under the model's lease and seal it and the grant to
        the session key, bound to the runtime's (already opened) challenge."""

        def derive(lease: Lease) -> Secret:
            file_key = derive_file_key(lease.key, header)
            try:
                check_file_key(file_key, header).wipe()
            except BaseException:
                file_key.wipe()
                raise
            return file_key

        lease, file_key = self.leases.acquire(mid, header.key_version,
                                              check=self._runtime_check(mid, session, ctx),
                                              use=derive)
        assert file_key is not None
        session.models.add(mid)
        try:
            sealed = hpke.seal(
                file_key, pk,
                file_key_info(lease.grant_digest, header.digest(), sid, challenge),
            )
        finally:
            file_key.wipe()
        grant = seal_grant(lease.document, pk, grant_info(header.digest(), sid, challenge))
        return {"ok": True, "sealed_grant": b64e(grant), "sealed_key": b64e(sealed)}

    def _op_policy(
        self, req: dict[str, Any], session: _Session, ctx: DecisionContext
    ) -> dict[str, Any]:
        """The model's newest grant, to a runtime its policy allows, sealed to the session and
        bound to a fresh challenge (a replayed answer with an older policy does not open)."""
        pk, sid = self._need_session(session)
        mid = ctx.model_id = self._model_id(req)
        context = model_context(mid)
        challenge = self._challenge(req, context, sid)
        try:
            lease = self.leases.newest(mid, check=self._runtime_check(mid, session, ctx))
            session.models.add(mid)
            grant = seal_grant(lease.document, pk, grant_info(context, sid, challenge))
        finally:
            challenge.wipe()
        return {"ok": True, "sealed_grant": b64e(grant)}

    def _op_status(
        self, req: dict[str, Any], session: _Session, ctx: DecisionContext
    ) -> dict[str, Any]:
        """Lease state of the models this session was allowed, to that session only."""
        self._need_session(session)
        return {"ok": True, "status": self.leases.snapshot(models=session.models)}

    def _op_health(
        self, req: dict[str, Any], session: _Session, ctx: DecisionContext
    ) -> dict[str, Any]:
        return {"ok": True, "health": self.health()}

    def health(self) -> dict[str, Any]:
        """State and counts only (no model ids, leases, peers or reasons): what anyone who can
        reach the socket or the health listener may see, plus the cache's own id and state,
        which an operator needs to approve it (derived from the platform, not a secret)."""
        return {**self.leases.summary(), "decisions": self.decisions.counts()}


_OPS = frozenset({"hello", "session", "file_key", "policy", "status", "health"})
#: operations whose outcome is a decision about a runtime (logged and kept in the ring)
_DECISION_OPS = frozenset({"session", "file_key", "policy"})
