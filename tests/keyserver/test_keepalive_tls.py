"""Connection reuse with dkeyserver: the idle keep-alive setting (parsed, bounded, applied)."""

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
from sealtorch.protocol.release_client import tls_client_context

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
