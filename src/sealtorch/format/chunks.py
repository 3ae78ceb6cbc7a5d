"""The chunk decryption scheduler: decrypt a sealed file's chunks, in parallel and in file
order, straight into destination regions (``AESGCM.decrypt_into`` when a chunk lies inside one
region, a streaming GCM decryptor when it spans several); zero every region on any failure."""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from queue import SimpleQueue

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealtorch._secret import Secret, wipe
from sealtorch.errors import FormatError, IntegrityError
from sealtorch.format import header as hdr
from sealtorch.format import rules
from sealtorch.format.memory import _pool, default_threads
from sealtorch.format.rules import StreamChecks
from sealtorch.format.stream import chunk_aad, chunk_nonce

#: pieces of a chunk at least this large are decrypted straight into their tensor; smaller
#: ones are batched through a scratch buffer (one GIL release per run instead of per piece)
_DIRECT_MIN = 64 << 10
#: per-thread scratch buffer size (at least ``_DIRECT_MIN``): a run of small pieces, a gap or
#: a verified-only chunk goes through it in pieces of at most this size. A chunk-sized (4 MiB)
#: buffer cost every load of a fresh process 4 MiB of new, zeroed pages per thread.
_SCRATCH = 256 << 10


@dataclass
class _Region:
    """A destination: plaintext stream bytes [start, start+nbytes) go into ``arr``; with
    ``check``, the rules on decrypted bytes (padding, BOOL) are checked on ``arr``."""

    start: int
    nbytes: int
    arr: memoryview
    copies: list[memoryview] = field(default_factory=list)
    check: bool = False

    @property
    def end(self) -> int:
        return self.start + self.nbytes

    def zero(self) -> None:
        for a in (self.arr, *self.copies):
            if a.nbytes:
                wipe(a)


def decrypt(
    h: hdr.Header,
    view: memoryview,
    chunk_key: Secret,
    checks: StreamChecks,
    regions: Iterable[_Region],
    *,
    threads: int | None = None,
    chunks: Iterable[int] | None = None,
    release_map: mmap.mmap | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Decrypt the chunks that ``regions`` need (and ``chunks``) into the regions.

    ``regions`` must come in increasing ``start`` order, and may be a generator. The calling
    thread plans every destination first, then it and ``threads - 1`` threads of a
    process-wide pool take chunks from one queue (no per-chunk futures, no thread start-up per
    load): the chunks with the most destinations first, then file order. On any failure (a
    chunk tag, a rule on decrypted bytes, or an exception from the ``regions`` generator)
    every region seen so far is zeroed and the error is raised. Regions' ``copies`` are
    filled only after every chunk authenticated and every decrypted byte passed the index's
    :class:`StreamChecks`: bytes that stay in the scratch buffer (padding, tensors no region
    wants) as each chunk is decrypted, and regions marked ``check`` once all are. ``h`` and
    ``view`` are the file's header and bytes, ``checks`` its index's rules on decrypted bytes;
    with ``release_map`` (the file's mapping), each chunk's ciphertext pages are dropped from
    the process once decrypted. ``progress(n)`` is called (from any decryption thread) with
    each chunk's plaintext length
    once it authenticated.
    """
    cs = h.chunk_size
    count = h.chunk_count
    extra = frozenset(chunks) if chunks is not None else frozenset()
    per_chunk: dict[int, list[_Region]] = {}
    seen: list[_Region] = []
    digest = h.digest()
    key = chunk_key.view()
    failed = threading.Event()
    errors: list[BaseException] = []
    ready: SimpleQueue[int | None] = SimpleQueue()
    mm = release_map
    page = mmap.PAGESIZE

    def release(i: int) -> None:
        """Unmap chunk ``i``'s whole pages of ciphertext (MADV_DONTNEED; read-only file
        pages are read again from the page cache if ever needed)."""
        off = h.chunk_offset(i)
        lo = -(-off // page) * page
        hi = (off + h.chunk_plain_length(i) + hdr.TAG_BYTES) // page * page
        if mm is not None and hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def chunk(aead: AESGCM, scratch: memoryview, i: int) -> None:
        n = h.chunk_plain_length(i)
        off = h.chunk_offset(i)
        start = i * cs
        ct = view[off : off + n + hdr.TAG_BYTES]
        aad = chunk_aad(digest, i, i == count - 1)
        nonce = chunk_nonce(i)
        regs = per_chunk.get(i, ())
        broken: rules.Rule | None = None  # a rule on decrypted bytes, raised once authentic
        if len(regs) == 1 and regs[0].start <= start and regs[0].end >= start + n:
            a = start - regs[0].start
            aead.decrypt_into(nonce, ct, aad, regs[0].arr[a : a + n])
            return
        size = len(scratch)
        dec = Cipher(algorithms.AES(key), modes.GCM(nonce, bytes(ct[n:]))).decryptor()
        dec.authenticate_additional_data(aad)
        if not regs:  # verification only: the chunk passes through the scratch buffer
            try:
                for a in range(0, n, size):
                    b = min(n, a + size)
                    dec.update_into(ct[a:b], scratch[: b - a])
                    if checks and broken is None:
                        broken = checks.violation(start + a, scratch[: b - a])
                dec.finalize()
            finally:
                wipe(scratch[: min(n, size)])
            if broken is not None:
                raise broken.fail(rules.describe_violation(broken))
            return
        # The chunk spans several destinations (or gaps): one streaming GCM pass in stream
        # order. Large pieces are decrypted straight into their tensor; the bytes between
        # them (runs of small pieces, padding, tensors no region wants) go through the
        # scratch buffer, one call per buffer-full, and the small pieces are copied out,
        # because every update_into call releases and retakes the GIL, which costs more than
        # a small copy.
        pos = start  # stream bytes before ``pos`` are decrypted
        run: list[tuple[int, int, _Region]] = []  # small pieces within [pos, pos + size)
        used = 0  # scratch[:used] held plaintext and is wiped below

        def through(upto: int) -> None:
            """Decrypt [pos, upto) through the scratch buffer; copy out the run's pieces."""
            nonlocal pos, used, broken
            while pos < upto:
                hi = min(upto, pos + size)
                dec.update_into(ct[pos - start : hi - start], scratch[: hi - pos])
                used = max(used, hi - pos)
                if checks and broken is None:
                    broken = checks.violation(pos, scratch[: hi - pos])
                for ra, rb, rr in run:  # all inside the first buffer-full
                    rr.arr[ra - rr.start : rb - rr.start] = scratch[ra - pos : rb - pos]
                run.clear()
                pos = hi

        try:
            for reg in regs:
                a, b = max(reg.start, start), min(reg.start + reg.nbytes, start + n)
                if b - a >= _DIRECT_MIN:
                    through(a)
                    dec.update_into(ct[a - start : b - start],
                                    reg.arr[a - reg.start : b - reg.start])
                    pos = b
                    continue
                if b - pos > size:
                    through(a)  # the run is full: the buffer would not hold this piece too
                run.append((a, b, reg))
            through(start + n)
            dec.finalize()
        finally:
            if used:
                wipe(scratch[:used])
        if broken is not None:
            raise broken.fail(rules.describe_violation(broken))

    def worker() -> None:
        aead = AESGCM(key)
        scratch = memoryview(bytearray(min(_SCRATCH, cs, max(h.total_length, 1))))
        try:
            while True:
                i = ready.get()
                if i is None or failed.is_set():
                    return
                try:
                    chunk(aead, scratch, i)
                    if mm is not None:
                        release(i)
                    if progress is not None:
                        progress(h.chunk_plain_length(i))
                except InvalidTag:
                    raise rules.CHUNK_TAG.fail(
                        f"chunk {i} of {count} failed authentication: the file was "
                        "modified, truncated, reordered or spliced; no tensors were loaded"
                    ) from None
        except BaseException as e:
            failed.set()
            errors.append(e)

    nthreads = max(1, min(threads or default_threads(), count))
    futures: list[Future[None]] = []
    try:
        last_start = 0
        for r in regions:  # plan every destination first: planning is pure Python (GIL)
            if r.start < last_start:  # pragma: no cover - a planning bug, not bad input
                raise FormatError("internal error: destinations out of order")
            last_start = r.start
            seen.append(r)
            if r.nbytes:
                for i in range(r.start // cs, (r.start + r.nbytes - 1) // cs + 1):
                    per_chunk.setdefault(i, []).append(r)
        # Chunks with the most destinations first: a chunk of many small tensors is mostly
        # Python (GIL) work, which then overlaps the other threads' AES instead of running
        # alone at the end; the rest follow in file order.
        for i in sorted(per_chunk.keys() | extra, key=lambda i: (-len(per_chunk.get(i, ())), i)):
            ready.put(i)
        if nthreads > 1:
            pool = _pool(nthreads - 1)
            futures = [pool.submit(worker) for _ in range(nthreads - 1)]
    except BaseException as e:  # planning failed, or the pool could not start a thread
        failed.set()
        errors.append(e)
    finally:
        for _ in range(nthreads):
            ready.put(None)
    if not failed.is_set():
        worker()  # the calling thread decrypts too
    for f in futures:  # not started yet (pool busy with another load): nothing left
        f.cancel()
    wait(futures)
    if not errors and checks:
        for r in seen:
            broken = checks.violation(r.start, r.arr) if r.check else None
            if broken is not None:
                errors.append(broken.fail(rules.describe_violation(broken)))
                break
    if errors:
        for r in seen:
            r.zero()
        error = next((e for e in errors if isinstance(e, IntegrityError)), errors[0])
        if isinstance(error, IntegrityError):
            raise error.with_traceback(None)
        raise error
    for r in seen:  # untied copies of one stored tensor, once everything authenticated
        for c in r.copies:
            c[:] = r.arr
