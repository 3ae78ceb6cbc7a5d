"""A host in the middle of the local channel (SGX: loopback TCP, every frame visible) records an
answer and replays it later, after the owner tightened the policy: the runtime refuses it, and
`sealtorch serve`'s factory is refused before its module is imported."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sealtorch.errors import ProtocolError
from sealtorch.format.header import read_header
from sealtorch.keycache.client import KeyCacheClient
from sealtorch.protocol.local import recv_frame, send_frame

from .conftest import MODEL
from .test_cache_inprocess import Env

OLD = "replay_probe_factory:build"  # on the allow-list of policy v1 only
NEW = "sealtorch.models.resnet:resnet50"


class FrameProxy:
    """Forwards local frames between runtimes and the cache's TCP listener; records every
    answer by op, and for the ops in ``replay`` answers with the recorded one instead."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.recorded: dict[str, dict[str, Any]] = {}
        self.replay: set[str] = set()
        self.replayed = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(conn,), daemon=True).start()

    def _pipe(self, conn: socket.socket) -> None:
        with conn, socket.create_connection(self.upstream) as up:
            while True:
                req = recv_frame(conn, deadline=time.monotonic() + 30)
                if req is None:
                    return
                op = str(req.get("op"))
                if op in self.replay and op in self.recorded:
                    send_frame(up, req)  # the cache still sees the request ...
                    recv_frame(up, deadline=time.monotonic() + 30)
                    self.replayed += 1  # counted first: the runtime acts on the answer at once
                    send_frame(conn, self.recorded[op])  # ... the runtime gets the old answer
                    continue
                send_frame(up, req)
                ans = recv_frame(up, deadline=time.monotonic() + 30)
                assert ans is not None
                if ans.get("ok"):
                    self.recorded[op] = ans
                send_frame(conn, ans)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def env(sim_dir: Path, platform_fp: str, sealed: Any) -> Any:
    e = Env(sim_dir, platform_fp, sealed, tcp_listen='"127.0.0.1:0"')
    e.server.policy = {**e.server.policy, "factories": [OLD, NEW]}
    e.cache.leases.refresh()
    yield e
    e.close()


def test_a_replayed_policy_answer_is_refused_before_the_factory_is_imported(
        env: Any, tmp_path: Path) -> None:
    probe = tmp_path / "replay_probe_factory.py"
    probe.write_text("IMPORTED = True\n\ndef build():\n    raise AssertionError('built')\n")
    addr = env.cache.server.tcp_address
    proxy = FrameProxy((addr.host, addr.port))
    try:
        with KeyCacheClient(proxy.address, server_public_key=env.server.public_key_b64,
                            attester=env.rt_att) as kc:
            assert OLD in kc.policy(MODEL).factories  # v1, recorded by the host
            kc.file_key(read_header(env.path)).wipe()  # recorded too
            # the owner withdraws the old factory (policy v2); the cache renews its lease
            env.server.policy = {**env.server.policy, "factories": [NEW]}
            env.server.policy_version = 2
            env.cache.leases.refresh()
            proxy.replay = {"policy", "file_key"}
            with pytest.raises(ProtocolError, match="does not open for this request"):
                kc.policy(MODEL)  # what `sealtorch serve` asks before importing a factory
            # a replayed file-key answer (the grant it relays, the key) is refused the same way
            with pytest.raises(ProtocolError, match="does not open for this request"):
                kc.file_key(read_header(env.path))
            assert proxy.replayed == 2
            proxy.replay = set()
            fresh = kc.policy(MODEL)
            assert fresh.factories == (NEW,) and kc.grant(MODEL).policy_version == 2
    finally:
        proxy.close()
    assert "replay_probe_factory" not in sys.modules  # never imported


def test_serve_checks_the_factory_against_a_fresh_policy(env: Any) -> None:
    """The allow-list `sealtorch serve` enforces comes from the fresh grant: once the owner
    withdraws a factory, a runtime asking now gets the new list."""
    from sealtorch.errors import FactoryError
    from sealtorch.runtime.factory import resolve

    with env.client() as kc:
        assert OLD in kc.policy(MODEL).factories
        env.server.policy = {**env.server.policy, "factories": [NEW]}
        env.server.policy_version = 2
        env.cache.leases.refresh()
        with pytest.raises(FactoryError, match="allow-list"):
            resolve(OLD, kc.policy(MODEL).factories)
    assert "replay_probe_factory" not in sys.modules
