"""Connection reuse with dkeyserver: the idle keep-alive setting (parsed, bounded, applied) and
TLS session resumption in the clients (resumed on reconnect, still pinned to the CA), one write
per answer, and log lines without a caller lookup."""

from __future__ import annotations

import socket
import ssl
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.servers import RunningKeyServer, start_keyserver

from sealtorch.errors import ConfigError
from sealtorch.keyserver.config import KEEPALIVE_MAX, load_config
from sealtorch.protocol.release_client import KeyServerClient
from sealtorch.protocol.tls import ResumingContext, tls_client_context

warnings.filterwarnings("ignore", category=RuntimeWarning)


@pytest.fixture(scope="module")
def ks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningKeyServer]:
    server = start_keyserver(tmp_path_factory.mktemp("keepalive"), sim=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def short_ks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningKeyServer]:
    """A server whose idle connections are closed after one second."""
    server = start_keyserver(tmp_path_factory.mktemp("keepalive1"), sim=True,
                             env={"SEALTORCH_KS_KEEPALIVE_SECONDS": "1"})
    try:
        yield server
    finally:
        server.stop()


def _hostport(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("https://").rsplit(":", 1)
    return host, int(port)


def _open(url: str, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    host, port = _hostport(url)
    return ctx.wrap_socket(socket.create_connection((host, port), timeout=30),
                           server_hostname=host)


def _get_healthz(s: ssl.SSLSocket) -> bytes:
    s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        assert chunk, "the server closed the connection instead of answering"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head
    return body


def test_keepalive_setting_is_parsed_and_bounded(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_config(tmp_path).keepalive_seconds == 75  # longer than a cache's 30 s poll
    (tmp_path / "config.toml").write_text("keepalive_seconds = 40\n")
    assert load_config(tmp_path).keepalive_seconds == 40
    monkeypatch.setenv("SEALTORCH_KS_KEEPALIVE_SECONDS", "120")
    assert load_config(tmp_path).keepalive_seconds == 120
    for bad in ("0", str(KEEPALIVE_MAX + 1)):
        monkeypatch.setenv("SEALTORCH_KS_KEEPALIVE_SECONDS", bad)
        with pytest.raises(ConfigError, match="keepalive_seconds must be between"):
            load_config(tmp_path)


def test_an_idle_connection_outlives_uvicorns_default_keepalive(ks: RunningKeyServer) -> None:
    with _open(ks.url, tls_client_context(ks.ca_cert_path)) as s:
        _get_healthz(s)
        time.sleep(6.5)  # uvicorn's own default closes after 5 s
        _get_healthz(s)  # the same connection still answers


def test_the_server_closes_an_idle_connection_after_its_keepalive(
        short_ks: RunningKeyServer) -> None:
    with _open(short_ks.url, tls_client_context(short_ks.ca_cert_path)) as s:
        _get_healthz(s)
        s.settimeout(60)
        assert s.recv(1) == b""  # closed by the server (1 s), not by this client


def test_tls_client_context_is_as_strict_as_the_default_context(ks: RunningKeyServer) -> None:
    ours = tls_client_context(ks.ca_cert_path)
    ref = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ks.ca_cert_path))
    assert isinstance(ours, ResumingContext)
    assert ours.verify_mode == ref.verify_mode == ssl.CERT_REQUIRED
    assert ours.check_hostname and ref.check_hostname
    assert ours.options == ref.options and ours.verify_flags == ref.verify_flags
    assert ours.get_ca_certs() == ref.get_ca_certs()
    assert ours.minimum_version == ssl.TLSVersion.TLSv1_3


def test_tls_secrets_are_never_logged(ks: RunningKeyServer, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """SSLKEYLOGFILE (which ssl.create_default_context honours) is ignored: a connection made
    with the environment set writes no key log."""
    log = tmp_path / "keys.log"
    monkeypatch.setenv("SSLKEYLOGFILE", str(log))
    for ctx in (tls_client_context(ks.ca_cert_path), tls_client_context(None)):
        assert ctx.keylog_filename is None
    with _open(ks.url, tls_client_context(ks.ca_cert_path)) as s:
        _get_healthz(s)
    assert not log.exists()


def test_a_reconnect_resumes_and_stays_pinned(ks: RunningKeyServer, tmp_path: Path) -> None:
    ctx = tls_client_context(ks.ca_cert_path)
    with _open(ks.url, ctx) as s:
        assert not s.session_reused
        cert = s.getpeercert(binary_form=True)
        _get_healthz(s)  # the TLS 1.3 ticket arrives after the handshake
        ctx.remember(s)
    with _open(ks.url, ctx) as s:
        assert s.session_reused  # no certificate exchange this time
        assert s.getpeercert(binary_form=True) == cert
        _get_healthz(s)
    # an impostor on the same name (its own CA): the ticket is not its to open, so it must
    # show a certificate, which the pinned CA refuses
    other = start_keyserver(tmp_path, sim=True)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            _open(other.url, ctx)
    finally:
        other.stop()
    # a session is never offered by a context other than the one that verified it
    foreign = tls_client_context(ks.ca_cert_path)
    with _open(ks.url, foreign) as s:
        assert not s.session_reused


def test_the_release_client_reconnects_after_an_idle_close_and_resumes(
        short_ks: RunningKeyServer) -> None:
    c = KeyServerClient(short_ks.url, short_ks.ca_cert_path, short_ks.signing_public_key)
    try:
        assert len(c.challenge()) == 32
        time.sleep(2.5)  # the server (keep-alive 1 s) closes the idle connection
        assert len(c.challenge()) == 32
        assert c.tls_connections == 2 and c.tls_resumed == 1
    finally:
        c.close()


def test_the_bench_light_client_resumes_its_session(ks: RunningKeyServer) -> None:
    from sealtorch.bench.keyserver import _arun, _Http

    host, port = _hostport(ks.url)

    async def twice() -> _Http:
        h = _Http(host, port, tls_client_context(ks.ca_cert_path))
        for _ in range(2):
            st, _ = await h.request(b"GET", b"/healthz")
            assert st == 200
            await h.close()
        return h

    h = _arun(twice())
    assert (h.opened, h.resumed) == (2, 1)


class _FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_an_answer_leaves_in_one_write_and_close_sends_what_is_pending() -> None:
    import asyncio

    from sealtorch.keyserver.server import _CoalescingTransport

    async def run() -> _FakeTransport:
        t = _FakeTransport()
        c = _CoalescingTransport(t, asyncio.get_running_loop())
        c.write(b"HTTP/1.1 200 OK\r\n\r\n")
        c.write(b"{}")
        assert t.writes == []  # not yet: joined at the end of this loop turn
        await asyncio.sleep(0)
        assert t.writes == [b"HTTP/1.1 200 OK\r\n\r\n{}"]
        assert c.get_extra_info("peername") == "info:peername"  # the rest passes through
        c.write(b"last")
        c.close()  # what is pending goes out before the close
        assert t.writes[-1] == b"last" and t.closed
        await asyncio.sleep(0)  # the scheduled flush finds nothing left to send
        return t

    assert len(asyncio.run(run()).writes) == 2


def test_log_lines_are_json_without_a_caller_lookup(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import logging

    from sealtorch.keyserver import ops

    for name in ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing"):
        monkeypatch.setattr(logging, name, getattr(logging, name))
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    ops.setup_logging()
    seen: list[logging.LogRecord] = []
    monkeypatch.setattr(root.handlers[0], "filter", lambda r: seen.append(r) or True)
    logging.getLogger("sealtorch.keyserver").info("release decision",
                                                  extra={"fields": {"grants": 1}})
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["msg"] == "release decision" and line["grants"] == 1
    assert seen[0].lineno == 0 and seen[0].thread is None  # no stack walk, no thread lookup
