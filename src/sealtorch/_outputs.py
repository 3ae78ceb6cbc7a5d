"""Checks before writing an output, so that a bad path is one clear error (what and what to do)
instead of an ``OSError`` from deep inside a command, and nothing is half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sealtorch.errors import OutputError


def output_file(path: str | os.PathLike[str], *, overwrite: bool, flag: str = "--force") -> Path:
    """Check that ``path`` can be created: its directory exists, and nothing is there unless
    ``overwrite`` (a symlink counts as something, dangling or not). Returns ``path``."""
    p = Path(path)
    parent = p.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise OutputError(f"cannot write {p}: the directory {parent} {what}; create it or "
                          "choose another output path")
    if os.path.lexists(p):
        if p.is_dir() and not p.is_symlink():
            raise OutputError(f"cannot write {p}: it is a directory; choose a file name")
        if not overwrite:
            raise OutputError(f"{p} already exists; pass {flag} to overwrite it")
    return p


def output_dir(path: str | os.PathLike[str], *, mode: int = 0o777) -> Path:
    """Create directory ``path`` (and its parents) if needed; a file in the way is an
    :class:`OutputError` naming it. Returns ``path``."""
    p = Path(path)
    for part in (p, *p.parents):
        if part.exists() and not part.is_dir():
            raise OutputError(f"cannot create the directory {p}: {part} is a file, not a "
                              "directory; remove it or choose another path")
    try:
        p.mkdir(parents=True, exist_ok=True, mode=mode)
    except OSError as e:
        raise OutputError(f"cannot create the directory {p} ({e.strerror}); choose a writable "
                          "path") from None
    return p


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write every byte of ``data`` to ``fd``. A raw write may write only part (a file system
    filling up, a file size limit): the rest is written again, and a disk that is really full
    then raises ``OSError`` instead of leaving a silently truncated file."""
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - regular files never accept 0 bytes without an error
            raise OSError(28, "no space left on device")
        view = view[n:]


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 and ``data`` in it (refuses to overwrite)."""
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def write_failed(path: str | os.PathLike[str], err: OSError) -> OutputError:
    """The error for an output that could not be written (its partial file already removed)."""
    return OutputError(f"cannot write {path} ({err.strerror or err}); nothing was written: make "
                       "room on its file system (or check that it is writable) and run again")


@contextlib.contextmanager
def staged(path: Path, *, overwrite: bool) -> Iterator[tuple[int, str]]:
    """Write ``path`` through a temporary file beside it (mode 0600): yields its open
    descriptor and name; once the block completes the file is synced and given its name
    (:func:`publish`). On any failure the temporary file is removed, so nothing half-written
    is ever left, and an ``OSError`` (a full disk) becomes one :func:`write_failed` error."""
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as err:
        raise OutputError(f"cannot write {path} ({err.strerror}); choose a writable "
                          "directory") from None
    try:
        try:
            yield fd, tmp
            os.fsync(fd)
        finally:
            os.close(fd)
        publish(tmp, path, overwrite)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise write_failed(path, err) from None
        raise


def write_file(path: str | os.PathLike[str], data: bytes, *, overwrite: bool,
               mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through :func:`staged`, with mode ``mode``: a full disk is
    one :func:`write_failed` error with nothing left behind, instead of a truncated file; an
    existing file is replaced only with ``overwrite``. With ``overwrite``, a pipe or device
    already there (``/dev/stdout``) is written into, not replaced by a file."""
    p = Path(path)
    if overwrite and p.exists() and not p.is_file() and not p.is_dir():
        try:
            fd = os.open(p, os.O_WRONLY)
            try:
                write_all(fd, data)
            finally:
                os.close(fd)
        except OSError as err:
            raise write_failed(p, err) from None
        return
    with staged(p, overwrite=overwrite) as (fd, _):
        os.fchmod(fd, mode)
        write_all(fd, data)


def publish(tmp: str, path: Path, overwrite: bool) -> None:
    """Give the finished temporary file its name: atomically replacing whatever is there
    (a symlink itself, never its target) with ``overwrite``, else only if nothing is there."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if anything, even a dangling symlink, appeared meanwhile
    except FileExistsError:
        raise OutputError(f"{path} already exists; pass --force (overwrite=True) to "
                          "overwrite it") from None
    except OSError:  # a file system without hard links: check, then rename
        if os.path.lexists(path):
            raise OutputError(f"{path} already exists; pass --force (overwrite=True) to "
                              "overwrite it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)
