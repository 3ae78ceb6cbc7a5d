"""Secret byte containers and process hardening.

Python cannot guarantee that no copy of a secret survives (immutable ``bytes`` objects are made
by most APIs), but sealtorch keeps long-lived secrets in :class:`Secret` (a ``bytearray`` that
is zeroed on :meth:`Secret.wipe`, on context exit and on garbage collection) and never lets one
reach ``repr``/logs.
"""

from __future__ import annotations

import ctypes
import hmac
import resource
import sys
import warnings
from types import TracebackType


class Secret:
    """A mutable secret buffer with a redacted ``repr`` that is zeroed when wiped."""

    __slots__ = ("__weakref__", "_buf")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._buf = bytearray(data)

    @classmethod
    def take(cls, data: bytearray) -> Secret:
        """Wrap ``data`` without copying; the caller must not keep using it."""
        s = cls.__new__(cls)
        s._buf = data
        return s

    def __len__(self) -> int:
        return len(self._buf)

    def __repr__(self) -> str:
        return f"<Secret {len(self._buf)} bytes redacted>"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[object, ...]:  # never pickle a secret by accident
        raise TypeError("Secret objects cannot be pickled")

    def __bytes__(self) -> bytes:
        """Return an immutable copy (needed by some APIs); prefer :meth:`view`."""
        return bytes(self._buf)

    def view(self) -> memoryview:
        """A read-only view of the secret bytes, valid until :meth:`wipe`."""
        return memoryview(self._buf).toreadonly()

    def equals(self, other: bytes | bytearray | Secret) -> bool:
        """Constant-time comparison."""
        o = other._buf if isinstance(other, Secret) else other
        return hmac.compare_digest(self._buf, o)

    def wipe(self) -> None:
        """Overwrite the buffer with zeros."""
        buf = self._buf
        if buf:
            ctypes.memset((ctypes.c_char * len(buf)).from_buffer(buf), 0, len(buf))

    @property
    def wiped(self) -> bool:
        return not any(self._buf)

    def __enter__(self) -> Secret:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()

    def __del__(self) -> None:
        try:
            self.wipe()
        except Exception:  # noqa: S110 - interpreter shutdown; nothing useful to do
            pass


def wipe(buf: bytearray | memoryview) -> None:
    """Zero a writable buffer in place."""
    mv = memoryview(buf).cast("B")
    if len(mv):
        ctypes.memset((ctypes.c_char * len(mv)).from_buffer(mv), 0, len(mv))


_PR_SET_DUMPABLE = 4


def harden_process() -> None:
    """Disable core dumps and make the process non-dumpable (no ptrace by same-uid peers).

    Called at start by every service that holds keys. Best effort off Linux.
    """
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):  # pragma: no cover - platform dependent
        warnings.warn("could not disable core dumps", RuntimeWarning, stacklevel=2)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:  # pragma: no cover
                warnings.warn("prctl(PR_SET_DUMPABLE, 0) failed", RuntimeWarning, stacklevel=2)
        except OSError:  # pragma: no cover
            warnings.warn("prctl unavailable", RuntimeWarning, stacklevel=2)
