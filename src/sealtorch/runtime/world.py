"""A local deployment with real processes: dkeyserver (HTTPS on loopback) and dkeycache (Unix
socket), both using the sim TEE. Used by ``sealtorch demo``, ``sealtorch bench serve`` and tests.

Every child runs in its own session so that Ctrl-C reaches only this process, which then stops
the children in order (:meth:`LocalDeployment.stop` is idempotent and always called). Start-up is
exception-safe: if starting a component fails (it exits, times out, or Ctrl-C arrives), every
child started so far is stopped before the error propagates, which names the component and its log.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from sealtorch.errors import ServeError

KEYSERVER = [sys.executable, "-I", "-c", "from sealtorch.keyserver.cli import main; main()"]
KEYCACHE = [sys.executable, "-I", "-m", "sealtorch.keycache"]


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def check_starting(proc: subprocess.Popen[bytes], what: str, log: Path, deadline: float
                   ) -> None:
    """While waiting for ``what`` to come up: raise, naming it and its log, if it exited or the
    ``deadline`` (a ``time.monotonic()`` value) passed, so a start never waits blind."""
    if proc.poll() is not None:
        raise ServeError(f"{what} exited early (status {proc.returncode}); its log {log} "
                         f"ends:\n{_tail(log)}")
    if time.monotonic() > deadline:
        raise ServeError(f"{what} did not start in time; its log {log} ends:\n{_tail(log)}")


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then deliver them to their own handlers.

    Around starting a child: a Ctrl-C inside ``Popen`` (after the fork, before it returns)
    would leave a running child that nobody recorded, so nobody stops. Main thread only (the
    only one Python delivers signals to)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
           for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


#: /readyz codes of a key server that runs but refuses its database (until 'recover')
REFUSING = ("state_rollback", "state_tampered")


def wait_keyserver(proc: subprocess.Popen[bytes], data_dir: Path, log: Path, deadline: float
                   ) -> tuple[str, str, bytes]:
    """Wait until a starting ``dkeyserver serve --data-dir data_dir`` has written its run.json
    (from which a stale copy must have been removed) and answers ``/readyz`` (ready, or up and
    refusing a rolled-back or tampered database); returns its release URL, admin URL and raw
    Ed25519 release-signing key. Raises as :func:`check_starting` does if it exits or the
    ``deadline`` passes."""
    import httpx
    from cryptography.hazmat.primitives import serialization

    from sealtorch.protocol.release_client import tls_client_context

    run_file = data_dir / "run.json"
    while not run_file.exists():
        check_starting(proc, "dkeyserver", log, deadline)
        time.sleep(0.05)
    ports = json.loads(run_file.read_text())
    url = f"https://127.0.0.1:{ports['release_port']}"
    admin_url = f"https://127.0.0.1:{ports['admin_port']}"
    pub = serialization.load_pem_public_key((data_dir / "signing.pub").read_bytes())
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ctx = tls_client_context(data_dir / "tls" / "ca.crt")
    while True:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            r = httpx.get(url + "/readyz", verify=ctx, timeout=5)
            if r.status_code == 200 or r.json()["error"]["code"] in REFUSING:
                return url, admin_url, raw
        check_starting(proc, "dkeyserver", log, deadline)
        time.sleep(0.05)


class LocalDeployment:
    """Key server + key cache on this machine (sim TEE, loopback only)."""

    def __init__(self, workdir: Path, *, startup_timeout: float = 60.0) -> None:
        self.workdir = workdir
        self.timeout = startup_timeout
        self.ks_dir = workdir / "keyserver"
        self.sim_dir = workdir / "sim"
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        # AF_UNIX paths are limited to ~100 characters: keep the socket in a short private dir
        self._sock_dir = Path(tempfile.mkdtemp(prefix="st-", dir="/tmp"))
        os.chmod(self._sock_dir, 0o700)
        self.socket = str(self._sock_dir / "kc.sock")
        self.env = dict(os.environ, SEALTORCH_SIM_DIR=str(self.sim_dir))
        self.env.pop("SEALTORCH_ADMIN_TOKEN", None)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.url = self.admin_url = ""
        self.ca_cert = self.ks_dir / "tls" / "ca.crt"
        self.server_public_key = b""
        self.cache_config = b""
        self.cache_ready: dict[str, Any] = {}

    # --- key server ------------------------------------------------------------------------
    def init_keyserver(self) -> None:
        """``dkeyserver init``: SQLite, file KEK, sim enabled, loopback listeners on free ports."""
        try:  # run() kills the child itself on a timeout or Ctrl-C
            p = subprocess.run(
                [*KEYSERVER, "init", "--data-dir", str(self.ks_dir), "--release-port", "0",
                 "--admin-port", "0", "--kek", "file", "--sim", "--auto-approve"],
                capture_output=True, env=self.env, timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired:
            raise ServeError(f"dkeyserver init did not finish in {self.timeout:g} s") from None
        if p.returncode != 0:
            raise ServeError("dkeyserver init failed: "
                             + p.stderr.decode(errors="replace")[-1500:])

    @contextlib.contextmanager
    def _starting(self, what: str) -> Iterator[Path]:
        """Start ``what`` (yields its log path); on any failure, Ctrl-C included, stop every
        child started so far before the error propagates, so no process outlives a failed start.
        The deployment is then stopped: make a new one to try again."""
        log = self.logs / f"{what}.log"
        try:
            yield log
        except BaseException as e:
            self.stop()
            if isinstance(e, Exception) and not isinstance(e, ServeError):
                raise ServeError(f"{what} failed to start ({type(e).__name__}: {e}); "
                                 f"its log: {log}") from e
            raise

    def _spawn(self, args: list[str], log: Path, *, stdout_pipe: bool = False
               ) -> subprocess.Popen[bytes]:
        with _signals_held(), open(log, "ab") as f:  # the child keeps its own descriptor copy
            proc = subprocess.Popen(args, stdout=subprocess.PIPE if stdout_pipe else f,
                                    stderr=f, stdin=subprocess.DEVNULL, env=self.env,
                                    start_new_session=True)
            self.procs.append(proc)
        return proc

    def start_keyserver(self) -> None:
        """Start ``dkeyserver serve`` and wait until it answers ``/readyz``."""
        run_file = self.ks_dir / "run.json"
        with contextlib.suppress(FileNotFoundError):
            run_file.unlink()
        with self._starting("dkeyserver") as log:
            proc = self._spawn([*KEYSERVER, "serve", "--data-dir", str(self.ks_dir)], log)
            self.url, self.admin_url, self.server_public_key = wait_keyserver(
                proc, self.ks_dir, log, time.monotonic() + self.timeout)

    @property
    def server_public_key_b64(self) -> str:
        """The pinned release-signing key as base64 of its raw 32 bytes."""
        return base64.b64encode(self.server_public_key).decode()

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None,
              *, expect: int = 200) -> Any:
        """Call the admin API (HTTPS, the server's CA, the first tenant's token)."""
        import httpx

        from sealtorch.protocol.release_client import tls_client_context

        token = (self.ks_dir / "admin.token").read_text().strip()
        with httpx.Client(verify=tls_client_context(self.ca_cert), timeout=30) as h:
            r = h.request(method, self.admin_url + path, json=body,
                          headers={"Authorization": f"Bearer {token}"})
        if r.status_code != expect:
            raise ServeError(f"admin {method} {path} answered HTTP {r.status_code}")
        return r.json()

    def init_sim_platform(self) -> str:
        """Create the sim platform key and register it; returns its fingerprint."""
        from sealtorch.attestation import sim

        key_path = sim.init_platform_key(self.sim_dir, overwrite=True)
        self.admin("POST", "/v1/admin/sim/platforms",
                   {"public_key": (self.sim_dir / sim.PUBLIC_FILE).read_text()})
        return sim.fingerprint(sim.load_platform_key(key_path).public_key())

    # --- key cache -------------------------------------------------------------------------
    def write_cache_config(self) -> bytes:
        """The cache's measured configuration (pins this key server and its key)."""
        self.cache_config = (
            "[keycache]\n"
            f'keyserver_url = "{self.url}"\n'
            f'server_public_key = "{self.server_public_key_b64}"\n'
            f'ca_cert = "{self.ca_cert}"\n'
            f'socket = "{self.socket}"\n'
        ).encode()
        (self.workdir / "dkeycache.toml").write_bytes(self.cache_config)
        return self.cache_config

    def start_cache(self) -> dict[str, Any]:
        """Start dkeycache (sim attester) and wait for its ``ready`` line."""
        with self._starting("dkeycache") as log:
            proc = self._spawn([*KEYCACHE, "serve", "--config",
                                str(self.workdir / "dkeycache.toml"), "--attester", "sim"],
                               log, stdout_pipe=True)
            assert proc.stdout is not None
            deadline = time.monotonic() + self.timeout
            while True:
                r, _, _ = select.select([proc.stdout], [], [], 0.2)
                if r:
                    line = proc.stdout.readline()
                    if line:
                        with contextlib.suppress(ValueError):
                            msg = json.loads(line)
                            if isinstance(msg, dict) and msg.get("event") == "ready":
                                self.cache_ready = msg
                                return msg
                        continue
                check_starting(proc, "dkeycache", log, deadline)

    # --- shutdown --------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every child (SIGTERM, then SIGKILL) — newest first; safe to call twice."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):  # go on with the others
                    proc.wait(5)
            # each child leads its own session: take down any worker it left behind
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs.clear()
        shutil.rmtree(self._sock_dir, ignore_errors=True)

    @property
    def running(self) -> list[int]:
        """Pids of children still running."""
        return [p.pid for p in self.procs if p.poll() is None]

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
