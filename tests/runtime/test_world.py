"""A failed start of the local deployment leaves no process behind (real dkeyserver, dkeycache).

dkeyserver starts for real, then dkeycache fails to start (its socket is taken, its measured
config is invalid, or Ctrl-C arrives while it starts): the key server that was already running,
the cache and anything either forked must be gone when the error reaches the caller.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealtorch.errors import ServeError
from sealtorch.runtime.world import LocalDeployment


def _stat_fields(pid_dir: Path) -> list[str]:
    """The fields of ``/proc/PID/stat`` after ``(comm)``: state, ppid, pgrp, session, ..."""
    return (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()


def _live_in_sessions(sessions: set[int]) -> list[int]:
    """Pids of live (not zombie) processes in one of ``sessions`` (each child leads its own)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = _stat_fields(d)
        except (OSError, IndexError):
            continue
        if f[0] != "Z" and int(f[3]) in sessions:
            out.append(int(d.name))
    return out


def _pids_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line mentions ``text``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                out.append(int(d.name))
        except OSError:
            continue
    return out


def _assert_gone(pids: list[int]) -> None:
    """Each pid has exited (a zombie awaiting its parent's wait counts as exited)."""
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        assert state == "Z", f"process {pid} is still running (state {state})"


class _PidLog(list):  # type: ignore[type-arg]
    """``LocalDeployment.procs`` that also remembers every pid added (stop() empties it)."""

    def __init__(self) -> None:
        super().__init__()
        self.pids: list[int] = []

    def append(self, proc: subprocess.Popen[bytes]) -> None:
        self.pids.append(proc.pid)
        super().append(proc)


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A loopback TCP port that accepts connections and never answers (a hung key server)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


@pytest.mark.parametrize("failure", ["socket taken", "invalid config"])
def test_cache_failing_to_start_stops_the_running_key_server(tmp_path: Path,
                                                             failure: str) -> None:
    dep = LocalDeployment(tmp_path)
    dep.procs = started = _PidLog()
    taken: socket.socket | None = None
    try:
        dep.init_keyserver()
        dep.start_keyserver()
        dep.init_sim_platform()
        assert len(started.pids) == 1 and dep.running == started.pids
        dep.write_cache_config()
        if failure == "socket taken":  # another listener holds the cache's socket path
            taken = socket.socket(socket.AF_UNIX)
            taken.bind(dep.socket)
            taken.listen(1)
        else:  # the socket must be an absolute path
            (tmp_path / "dkeycache.toml").write_bytes(
                dep.cache_config.replace(dep.socket.encode(), b"kc.sock"))
        with pytest.raises(ServeError) as err:
            dep.start_cache()
    finally:
        if taken is not None:
            taken.close()
    log = tmp_path / "logs" / "dkeycache.log"
    msg = str(err.value)
    assert msg.startswith("dkeycache exited early") and str(log) in msg
    assert ("already listening" if failure == "socket taken" else "absolute path") in msg
    # everything started before the failure is stopped: the deployment holds nothing, the
    # pids are gone, and no process is left in the sessions the children led
    assert len(started.pids) == 2 and dep.procs == [] and dep.running == []
    _assert_gone(started.pids)
    assert _live_in_sessions(set(started.pids)) == []
    assert _pids_mentioning(str(tmp_path)) == []
    assert not Path(dep.socket).parent.exists()
    dep.stop()  # still safe to call


_INTERRUPTED = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from sealtorch.runtime.world import LocalDeployment

    dep = LocalDeployment(Path(sys.argv[1]))
    dep.init_keyserver()
    dep.start_keyserver()
    dep.init_sim_platform()
    raw = dep.write_cache_config().replace(dep.url.encode(),
                                           f"https://127.0.0.1:{sys.argv[2]}".encode())
    (dep.workdir / "dkeycache.toml").write_bytes(raw + b"request_timeout = 300\\n")
    print(json.dumps({"keyserver": dep.procs[0].pid}), flush=True)
    dep.start_cache()  # no try/finally here: start-up itself must clean up
    print("cache started", flush=True)
""")


def test_ctrl_c_while_the_cache_starts_stops_everything(tmp_path: Path,
                                                        silent_listener: int) -> None:
    # the cache attests to a "key server" that never answers, so it cannot become ready
    # before the Ctrl-C; the key server that did start must be stopped with it
    wd = tmp_path / "dep"
    p = subprocess.Popen([sys.executable, "-c", _INTERRUPTED, str(wd), str(silent_listener)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line, p.communicate(timeout=60)[1]
        keyserver = json.loads(line)["keyserver"]
        cache_cmd = str(wd / "dkeycache.toml")
        while not (cache := _pids_mentioning(cache_cmd)):  # wait until dkeycache is running
            assert p.poll() is None, p.communicate()[1]
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "cache started" not in out
    assert "KeyboardInterrupt" in err and p.returncode != 0, (p.returncode, err[-4000:])
    _assert_gone([keyserver, *cache])
    assert _live_in_sessions({keyserver, *cache}) == []
    assert _pids_mentioning(str(wd)) == []
