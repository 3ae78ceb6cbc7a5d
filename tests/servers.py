"""Start a REAL dkeyserver subprocess in a temp dir (for any part's tests).

    ks = start_keyserver(tmp_path, sim=True, auto_approve=True)
    platform = ks.sim_platform()              # creates + registers a sim platform key
    ks.add_model("m1", key_bytes)              # or ks.add_model_file("m1", key_file)
    ks.set_policy("m1", sim_policy(measurement, platform_pub_hex))
    client = ks.client()                       # KeyServerClient pinned to the server key
    ...
    ks.stop()

Everything goes through the real HTTPS admin API (TLS 1.3, the server's own CA).
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from sealtorch.runtime.world import wait_keyserver

SERVER_CMD = [sys.executable, "-c", "from sealtorch.keyserver.cli import main; main()"]


def keyserver_cli(*args: str, env: dict[str, str] | None = None, check: bool = True,
                  timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``dkeyserver ARGS`` in a subprocess and return the completed process."""
    p = subprocess.run([*SERVER_CMD, *args], capture_output=True, text=True, env=env,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"dkeyserver {' '.join(args[:2])} failed: {p.stderr[-2000:]}")
    return p


def sim_fingerprint(platform: Path | str) -> str:
    """The fingerprint sim claims carry, of a platform key file (or a fingerprint as is)."""
    from sealtorch.attestation import sim

    if isinstance(platform, str):
        return platform
    return sim.fingerprint(sim.load_platform_key(platform).public_key())


def sim_policy(measurement: bytes | str, platform: Path | str, *,
               version: int = 1, lease_seconds: int = 300) -> dict[str, Any]:
    """A policy whose cache allow-list admits one sim measurement on one platform."""
    ident: dict[str, Any] = {"tee": "sim", "name": "test-cache",
                             "measurement": measurement if isinstance(measurement, str)
                             else measurement.hex(),
                             "platform_key": sim_fingerprint(platform)}
    return {"format": "sealtorch-policy/v1", "version": version, "lease_seconds": lease_seconds,
            "caches": [ident], "runtimes": [ident]}


@dataclass
class RunningKeyServer:
    """A dkeyserver subprocess and what a test needs to talk to it."""

    url: str
    admin_url: str
    admin_token_file: Path
    ca_cert_path: Path
    signing_public_key: bytes  # raw 32-byte Ed25519 public key
    signing_public_key_file: Path
    data_dir: Path
    process: subprocess.Popen[bytes]
    env: dict[str, str]
    log_path: Path
    _http: httpx.Client | None = field(default=None, repr=False)

    # --- admin API ------------------------------------------------------------------------
    def admin(self, method: str, path: str, body: dict[str, Any] | None = None, *,
              token_file: Path | None = None, expect: int | None = 200) -> Any:
        from sealtorch.protocol.release_client import tls_client_context

        token = Path(token_file or self.admin_token_file).read_text().strip()
        with httpx.Client(verify=tls_client_context(self.ca_cert_path), timeout=30) as h:
            r = h.request(method, self.admin_url + path, json=body,
                          headers={"Authorization": f"Bearer {token}"})
        if expect is not None and r.status_code != expect:
            raise AssertionError(f"{method} {path}: HTTP {r.status_code} {r.text[:500]}")
        return r.json() if expect is not None else r

    def add_model(self, model_id: str, key: bytes, key_version: int = 1, **kw: Any) -> Any:
        return self.admin("POST", "/v1/admin/models", {
            "model_id": model_id, "key_version": key_version,
            "key": base64.b64encode(key).decode()}, **kw)

    def add_model_file(self, model_id: str, key_file: str | Path) -> None:
        """Import a key file through the real CLI (``dkeyserver model add``)."""
        keyserver_cli("model", "add", "--admin-url", self.admin_url, "--ca-cert",
                      str(self.ca_cert_path), "--token-file", str(self.admin_token_file),
                      "--model-id", model_id, "--key-file", str(key_file), env=self.env)

    def set_policy(self, model_id: str, policy: dict[str, Any], **kw: Any) -> Any:
        return self.admin("PUT", f"/v1/admin/policy/{model_id}", {"policy": policy}, **kw)

    def register_sim(self, public_key_pem_or_hex: str) -> Any:
        return self.admin("POST", "/v1/admin/sim/platforms",
                          {"public_key": public_key_pem_or_hex})

    def sim_platform(self, directory: Path | None = None) -> Path:
        """Create a sim platform key under the data dir, register it; returns the key path."""
        from sealtorch.attestation import sim

        d = directory or (self.data_dir.parent / "sim-platform")
        key_path = sim.init_platform_key(d, overwrite=True)
        self.register_sim((d / sim.PUBLIC_FILE).read_text())
        return key_path

    def approve_cache(self, cache_id: str, **kw: Any) -> Any:
        return self.admin("POST", f"/v1/admin/caches/{cache_id}/approve", **kw)

    def revoke_cache(self, cache_id: str, **kw: Any) -> Any:
        return self.admin("POST", f"/v1/admin/caches/{cache_id}/revoke", **kw)

    def add_tenant(self, tenant: str) -> Path:
        """A second tenant (local CLI on the data dir); returns its token file."""
        out = self.data_dir.parent / f"{tenant}.token"
        keyserver_cli("tenant-add", "--data-dir", str(self.data_dir), "--tenant", tenant,
                      "--token-out", str(out), env=self.env)
        return out

    def client(self) -> Any:
        from sealtorch.protocol.release_client import KeyServerClient

        return KeyServerClient(self.url, self.ca_cert_path, self.signing_public_key)

    # --- lifecycle ------------------------------------------------------------------------
    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        return _stop_process(self.process, sig, timeout)

    def kill9(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def restart(self, **extra_env: str) -> RunningKeyServer:
        """Start a new process on the same data dir (after stop/kill9)."""
        env = dict(self.env, **extra_env)
        return _spawn(self.data_dir, env, self.log_path)

    def __enter__(self) -> RunningKeyServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _child_pids(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (dkeyserver's forked release workers), read from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:  # "pid (comm) state ppid ...": comm may hold spaces, so split after ')'
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(d.name))
    return out


def _stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
                  timeout: float = 20) -> int:
    """Send ``sig`` and wait; past ``timeout`` kill it and the workers it forked (a killed
    server cannot stop them itself). Returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            workers = _child_pids(proc.pid)
            proc.kill()
            proc.wait(5)
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    return proc.returncode


def _spawn(data_dir: Path, env: dict[str, str], log_path: Path,
           extra_args: list[str] | None = None, timeout: float = 60) -> RunningKeyServer:
    """Start ``dkeyserver serve`` and wait until ready; if that fails in any way (Ctrl-C too)
    the process is stopped before the error propagates, so no server outlives a failed start."""
    run_file = data_dir / "run.json"
    if run_file.exists():
        run_file.unlink()
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([*SERVER_CMD, "serve", "--data-dir", str(data_dir),
                                 *(extra_args or [])], stdout=log, stderr=log, env=env)
    try:
        url, admin_url, raw = wait_keyserver(proc, data_dir, log_path, time.monotonic() + timeout)
    except BaseException:
        _stop_process(proc, timeout=10)
        raise
    return RunningKeyServer(
        url=url, admin_url=admin_url, admin_token_file=data_dir / "admin.token",
        ca_cert_path=data_dir / "tls" / "ca.crt", signing_public_key=raw,
        signing_public_key_file=data_dir / "signing.pub", data_dir=data_dir, process=proc,
        env=env, log_path=log_path)


def start_keyserver(
    tmp_path: Path,
    *,
    db_url: str | None = None,
    kek: str = "file",
    sim: bool = True,
    auto_approve: bool = False,
    lease_seconds: int | None = None,
    workers: int | None = None,
    pkcs11_env: dict[str, str] | None = None,
    init_args: list[str] | None = None,
    data_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> RunningKeyServer:
    """``dkeyserver init`` a fresh data dir under ``tmp_path`` and start ``dkeyserver serve``.

    ``pkcs11_env`` (with ``kek="pkcs11"``) carries ``SOFTHSM2_CONF`` and ``SEALTORCH_PKCS11_PIN``.
    Listeners bind 127.0.0.1 on free ports. ``data_dir`` reuses an initialised directory.
    ``env`` adds environment variables for the server (e.g. a load test's rate limit).
    """
    extra = env
    env = dict(os.environ)
    env.update(pkcs11_env or {})
    env.update(extra or {})
    env.pop("SEALTORCH_ADMIN_TOKEN", None)
    d = data_dir or (tmp_path / "keyserver")
    if data_dir is None:
        args = ["init", "--data-dir", str(d), "--release-port", "0", "--admin-port", "0",
                "--kek", kek, "--sim" if sim else "--no-sim",
                "--auto-approve" if auto_approve else "--no-auto-approve"]
        if db_url:
            args += ["--db", db_url]
        if lease_seconds:
            args += ["--lease-seconds", str(lease_seconds)]
        if workers:
            args += ["--workers", str(workers)]
        keyserver_cli(*args, *(init_args or []), env=env)
    return _spawn(d, env, tmp_path / f"keyserver-{int(time.time() * 1000)}.log")
