"""Memory for decrypted weights and the decryption threads: CPU count, whether AES-GCM runs
without the GIL, the process-wide thread pool, anonymous mappings for plaintext (huge pages,
excluded from core dumps, faulted in by the decryption threads), read-only mappings of sealed
files and raw writable views of tensor storage."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch


def _cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


#: first cryptography release whose AES-GCM calls run without the GIL. pyca/cryptography#15361
#: ("Release the GIL in one-shot AEAD encrypt/decrypt", merged 2026-07-30) shipped in 50.0.0.
#: Measured here with a spinner thread during one 128 MiB call: AESGCM.decrypt_into/encrypt_into
#: block it for the whole call on 48.0.0 and 49.0.0 and not at all on 50.0.0 and 50.0.2; so does
#: the streaming GCM ``update_into`` on 48.0.0 (blocks) and 50.0.2 (does not).
AEAD_NOGIL_VERSION = (50, 0)


def aead_releases_gil() -> bool:
    """Whether the installed ``cryptography`` runs AES-GCM without holding the GIL.

    Older releases hold it for the whole operation, so there extra threads only add contention.
    """
    import cryptography

    parts = cryptography.__version__.split(".")
    try:
        version = (int(parts[0]), int(parts[1]) if len(parts) > 1 else 0)
    except ValueError:  # pragma: no cover - unparseable dev build: be conservative
        return False
    return version >= AEAD_NOGIL_VERSION


def default_threads() -> int:
    """Decryption threads: one per CPU when AES-GCM runs in parallel, else one."""
    return _cpus() if aead_releases_gil() else 1


_POOL_LOCK = threading.Lock()
_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool)


def _pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of at least ``workers`` decryption threads, reused across loads.

    Starting threads for every load costs about as much as decrypting a megabyte. A new pool
    replaces the old one after a fork (its threads do not exist in the child) or when more
    threads are asked for; the old pool's threads exit once it is no longer referenced.
    """
    global _POOL
    with _POOL_LOCK:
        cur = _POOL
        if cur is not None and cur[0] == os.getpid() and cur[1] >= workers:
            return cur[2]
        size = max(workers, cur[1] if cur is not None else 0)
        pool = ThreadPoolExecutor(size, thread_name_prefix="sealtorch-decrypt")
        _POOL = (os.getpid(), size, pool)
        return pool


_ARENA_MIN = 1 << 20


def map_file(fd: int, size: int, *, populate: bool = False) -> mmap.mmap:
    """The first ``size`` bytes of file ``fd``, mapped read-only and shared, as sealed files are
    read (the page cache's pages, no copy); ``populate`` faults every page in now."""
    flags = mmap.MAP_SHARED
    if populate and hasattr(mmap, "MAP_POPULATE"):
        flags |= mmap.MAP_POPULATE
    return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)


def map_path(path: str | os.PathLike[str]) -> mmap.mmap:
    """A whole file mapped as :func:`map_file` maps it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return map_file(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _advise(mm: mmap.mmap, name: str) -> None:
    """Apply an optional ``madvise`` hint; a kernel without it just does not get the hint."""
    option = getattr(mmap, name, None)
    if option is not None:
        try:
            mm.madvise(option)
        except OSError:  # pragma: no cover - kernel without this hint
            pass


def _plaintext_buffer(n: int) -> torch.Tensor:
    """A uint8 tensor of ``n`` bytes for decrypted weights.

    Large buffers are a private anonymous mapping, excluded from core dumps where supported
    and backed by transparent huge pages where the kernel allows. They are not populated
    here: a new page costs a fault and a zeroing (in 4 KiB pages that was 48 ms for
    ResNet-50's 102 MB here, against 11 ms in huge pages), and left to the decryption
    threads, which write each chunk with the GIL released, those faults run in parallel
    (one thread populating the whole buffer first made ``load`` 1.3x slower on 2 CPUs).
    """
    if n < _ARENA_MIN or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(n, dtype=torch.uint8)
    mm = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                   prot=mmap.PROT_READ | mmap.PROT_WRITE)
    _advise(mm, "MADV_HUGEPAGE")
    _advise(mm, "MADV_DONTDUMP")  # before any plaintext is written into it
    return torch.frombuffer(mm, dtype=torch.uint8)  # the tensor keeps the mapping alive


def _raw_bytes(ptr: int, nbytes: int) -> memoryview:
    """A writable ``B`` memoryview of ``nbytes`` at ``ptr`` (the owner must outlive it).

    Five times cheaper than going through numpy, which matters once per tensor per load.
    """
    return memoryview((ctypes.c_ubyte * nbytes).from_address(ptr)).cast("B")
