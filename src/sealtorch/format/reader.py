"""Open, authenticate and decrypt sealed files straight into tensor memory.

Order of checks (the rules of docs/format.md, defined in ``format/rules.py``): header
structure -> key commitment (wrong key) -> header MAC -> file length (truncated / trailing data)
-> index tag and rules -> owner signature -> chunk tags and the rules on decrypted bytes. Chunks
are decrypted in parallel (OpenSSL runs without the GIL) from an mmap of the file directly into the
destination tensors: with ``AESGCM.decrypt_into`` when a chunk lies inside one tensor, and with
a streaming GCM decryptor writing each piece into its tensor when a chunk spans several. No
plaintext is ever written to disk, and if any tag fails every destination is zeroed before the
error is raised.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import mmap
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from queue import SimpleQueue
from types import TracebackType
from typing import Any

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealtorch._secret import Secret, wipe
from sealtorch.errors import FormatError, IndexError_, InputError, IntegrityError
from sealtorch.format import header as hdr
from sealtorch.format import keys as fkeys
from sealtorch.format import rules, signing
from sealtorch.format.dtypes import NAME_TO_DTYPE, torch_dtype
from sealtorch.format.index import Entry, Index, parse_index
from sealtorch.format.keyfile import ModelKey, read_key_file
from sealtorch.format.writer import chunk_aad, chunk_nonce, public_index_mac

KeyArg = ModelKey | Secret | str | os.PathLike[str] | None
SignerArg = Ed25519PublicKey | bytes | str | os.PathLike[str] | None


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


_POPULATE_MIN = 1 << 20
#: pieces of a chunk at least this large are decrypted straight into their tensor; smaller
#: ones are batched through a scratch buffer (one GIL release per run instead of per piece)
_DIRECT_MIN = 64 << 10


#: MADV_POPULATE_WRITE (Linux >= 5.14), which Python 3.11's mmap module does not name
_MADV_POPULATE_WRITE = 23


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

    Large buffers are a private anonymous mapping, excluded from core dumps where supported,
    backed by transparent huge pages where the kernel allows, and populated in one call before
    decryption: a new page costs a fault and a zeroing, and in 4 KiB pages that was 48 ms for
    ResNet-50's 102 MB here, against 11 ms in huge pages.
    """
    if n < _POPULATE_MIN or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(n, dtype=torch.uint8)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    mm = mmap.mmap(-1, n, flags=flags, prot=prot)
    _advise(mm, "MADV_HUGEPAGE")
    try:
        mm.madvise(_MADV_POPULATE_WRITE)
    except OSError:  # kernel before 5.14: populate in the mmap call instead, in small pages
        mm.close()
        mm = mmap.mmap(-1, n, flags=flags | getattr(mmap, "MAP_POPULATE", 0), prot=prot)
    _advise(mm, "MADV_DONTDUMP")  # before any plaintext is written into it
    return torch.frombuffer(mm, dtype=torch.uint8)  # the tensor keeps the mapping alive


def _raw_bytes(ptr: int, nbytes: int) -> memoryview:
    """A writable ``B`` memoryview of ``nbytes`` at ``ptr`` (the owner must outlive it).

    Five times cheaper than going through numpy, which matters once per tensor per load.
    """
    return memoryview((ctypes.c_ubyte * nbytes).from_address(ptr)).cast("B")


_TORCH_DTYPES = {name: torch_dtype(name) for name in NAME_TO_DTYPE}


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


def check_file_length(path: Path, header: hdr.Header, size: int) -> None:
    """Raise unless a file of ``size`` bytes has exactly the length ``header`` says."""
    expected = header.file_length
    if size < expected:
        raise rules.FILE_SHORT.fail(
            f"{path}: file is {expected - size} bytes shorter than its header says "
            "(truncated copy?); copy the sealed file again"
        )
    if size > expected:
        raise rules.FILE_LONG.fail(
            f"{path}: {size - expected} unexpected bytes after the last chunk; copy the sealed "
            "file again"
        )


def _file_key(header: hdr.Header, key: KeyArg, key_provider: fkeys.KeyProvider | None) -> Secret:
    if (key is None) == (key_provider is None):
        raise InputError("pass exactly one of key= (model key or key file) and key_provider=")
    if key_provider is not None:
        fk = key_provider.file_key(header)
        if not isinstance(fk, Secret):
            raise InputError("a KeyProvider must return the file key as a sealtorch Secret")
        return fk
    mk: ModelKey | Secret = key if isinstance(key, ModelKey | Secret) else read_key_file(key)  # type: ignore[arg-type]
    return fkeys.derive_file_key(mk, header)


class SealedFile:
    """An opened and authenticated sealed file (header, key and index checked)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        key: KeyArg = None,
        key_provider: fkeys.KeyProvider | None = None,
        signer: SignerArg = None,
        populate: bool = True,
    ) -> None:
        self.path = Path(path)
        self._keys: fkeys.FileKeys | None = None
        self._mm: mmap.mmap | None = None
        self._mv: memoryview | None = None
        #: drop each chunk's ciphertext pages from this process once decrypted (the page cache
        #: keeps them): resident memory then grows by the plaintext only, not also by the file
        self.release_pages = False
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise FormatError(f"{self.path}: cannot open sealed file ({e.strerror})") from None
        try:
            size = os.fstat(fd).st_size
            try:
                self.header = hdr.parse_header(hdr.read_header_bytes(fd, size))
            except FormatError as e:
                raise type(e)(f"{self.path}: {e}") from None
            file_key = _file_key(self.header, key, key_provider)
            try:
                self._keys = fkeys.check_file_key(file_key, self.header)
            finally:
                file_key.wipe()
            check_file_length(self.path, self.header, size)
            flags = mmap.MAP_SHARED
            if populate and hasattr(mmap, "MAP_POPULATE"):
                flags |= mmap.MAP_POPULATE
            self._mm = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
        except BaseException:
            self.close()
            raise
        finally:
            os.close(fd)
        try:
            self._mv = memoryview(self._mm)
            self.index = self._read_index()
            self.signer_public = self._check_signature(signer)
        except BaseException:
            self.close()
            raise

    # -- context management ---------------------------------------------------------------
    def __enter__(self) -> SealedFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Wipe the derived keys and unmap the file."""
        if self._keys is not None:
            self._keys.wipe()
        if self._mv is not None:
            self._mv.release()
            self._mv = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # pragma: no cover - a view is still alive; GC will unmap
                pass
            self._mm = None

    @property
    def keys(self) -> fkeys.FileKeys:
        if self._keys is None:  # pragma: no cover
            raise FormatError("sealed file is closed")
        return self._keys

    @property
    def view(self) -> memoryview:
        if self._mv is None:
            raise FormatError("sealed file is closed")
        return self._mv

    # -- index and signature ----------------------------------------------------------------
    def _read_index(self) -> Index:
        h = self.header
        section = self.view[h.header_length : h.chunks_offset]
        digest = h.digest()
        if h.public_index:
            body = bytes(section[: -hdr.MAC_BYTES])
            mac = public_index_mac(self.keys.index_key, digest, body)
            if not hmac.compare_digest(mac, bytes(section[-hdr.MAC_BYTES :])):
                raise rules.INDEX_TAG.fail("tensor index failed authentication (modified index)")
            return parse_index(body, h.total_length)
        nonce_bytes = hdr.INDEX_NONCE_BYTES
        plain = bytearray(len(section) - nonce_bytes - hdr.TAG_BYTES)
        try:
            AESGCM(self.keys.index_key.view()).decrypt_into(
                bytes(section[:nonce_bytes]), section[nonce_bytes:], digest, plain
            )
        except InvalidTag:
            wipe(plain)
            raise rules.INDEX_TAG.fail(
                "encrypted tensor index failed authentication (modified or spliced index)"
            ) from None
        try:
            return parse_index(plain, h.total_length)
        finally:
            wipe(plain)

    def tags_digest(self) -> bytes:
        """SHA-256 of every chunk's 16-byte tag, in order."""
        h = self.header
        d = hashlib.sha256()
        for i in range(h.chunk_count):
            end = h.chunk_offset(i) + h.chunk_plain_length(i) + hdr.TAG_BYTES
            d.update(self.view[end - hdr.TAG_BYTES : end])
        return d.digest()

    def _check_signature(self, signer: SignerArg) -> bytes | None:
        h = self.header
        wanted = None if signer is None else signing.raw_public(signing.load_public_key(signer))
        if not h.signed:
            if wanted is not None:
                raise rules.SIGNER_REQUIRED.fail(
                    "the file carries no owner signature but one was required; reseal with "
                    "--sign-key"
                )
            return None
        trailer = bytes(self.view[-hdr.SIGNATURE_TRAILER_BYTES :])
        public, signature = trailer[:32], trailer[32:]
        if wanted is not None and not hmac.compare_digest(public, wanted):
            raise rules.SIGNER_MATCH.fail(
                "the file is signed by another key than the required signer"
            )
        index_digest = hashlib.sha256(self.view[h.header_length : h.chunks_offset]).digest()
        signing.verify(
            public, signature, signing.signed_message(h.digest(), index_digest, self.tags_digest())
        )
        return public

    # -- decryption ---------------------------------------------------------------------------
    def decrypt(
        self,
        regions: Iterable[_Region],
        *,
        threads: int | None = None,
        chunks: Iterable[int] | None = None,
    ) -> None:
        """Decrypt the chunks that ``regions`` need (and ``chunks``) into the regions.

        ``regions`` must come in increasing ``start`` order, and may be a generator: the calling
        thread plans while ``threads - 1`` threads of a process-wide pool already decrypt every
        chunk whose destinations are all known (a chunk is complete once a region starts past
        its end), then joins them. Chunks are taken in file order from one queue (no per-chunk
        futures, no thread start-up per load). On any failure (a chunk tag, a rule on decrypted
        bytes, or an exception from the ``regions`` generator) every region seen so far is
        zeroed and the error is raised. Regions' ``copies`` are filled only after every chunk
        authenticated and every decrypted byte passed the index's :class:`StreamChecks`: bytes
        that stay in the scratch buffer (padding, tensors no region wants) as each chunk is
        decrypted, and regions marked ``check`` once all are.
        """
        h = self.header
        cs = h.chunk_size
        count = h.chunk_count
        extra = frozenset(chunks) if chunks is not None else frozenset()
        per_chunk: dict[int, list[_Region]] = {}
        seen: list[_Region] = []
        digest = h.digest()
        view = self.view
        key = self.keys.chunk_key.view()
        failed = threading.Event()
        errors: list[BaseException] = []
        ready: SimpleQueue[int | None] = SimpleQueue()
        checks = self.index.checks
        mm = self._mm if self.release_pages else None
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
            if not regs:  # verification only
                try:
                    aead.decrypt_into(nonce, ct, aad, scratch[:n])
                    broken = checks.violation(start, scratch[:n]) if checks else None
                finally:
                    wipe(scratch[:n])
                if broken is not None:
                    raise broken.fail(rules.describe_violation(broken))
                return
            # The chunk spans several destinations (or gaps): one streaming GCM pass. Large
            # pieces are decrypted straight into their tensor; runs of small pieces (and gaps)
            # go through the scratch buffer in one call and are copied out, because every
            # update_into call releases and retakes the GIL, which costs more than a small copy.
            dec = Cipher(algorithms.AES(key), modes.GCM(nonce, bytes(ct[n:]))).decryptor()
            dec.authenticate_additional_data(aad)
            pieces: list[tuple[int, int, _Region | None]] = []
            pos = start
            for reg in regs:
                a, b = max(reg.start, start), min(reg.end, start + n)
                if a > pos:  # bytes no destination wants (padding, other tensors)
                    pieces.append((pos, a, None))
                pieces.append((a, b, reg))
                pos = b
            if pos < start + n:
                pieces.append((pos, start + n, None))
            run: list[tuple[int, int, _Region | None]] = []
            used = 0  # scratch[:used] held plaintext and is wiped below
            try:
                for k, (a, b, dst) in enumerate(pieces):
                    if dst is not None and b - a >= _DIRECT_MIN:
                        dec.update_into(
                            ct[a - start : b - start], dst.arr[a - dst.start : b - dst.start]
                        )
                        continue
                    run.append((a, b, dst))
                    if k + 1 < len(pieces):
                        na, nb, nr = pieces[k + 1]
                        if nr is None or nb - na < _DIRECT_MIN:
                            continue  # the next piece joins this run
                    lo = run[0][0]
                    used = max(used, b - lo)
                    dec.update_into(ct[lo - start : b - start], scratch[: b - lo])
                    if checks and broken is None:
                        broken = checks.violation(lo, scratch[: b - lo])
                    for ra, rb, rr in run:
                        if rr is not None:
                            rr.arr[ra - rr.start : rb - rr.start] = scratch[ra - lo : rb - lo]
                    run.clear()
                dec.finalize()
            finally:
                if used:
                    wipe(scratch[:used])
            if broken is not None:
                raise broken.fail(rules.describe_violation(broken))

        def worker() -> None:
            aead = AESGCM(key)
            scratch = memoryview(bytearray(min(cs, max(h.total_length, 1))))
            try:
                while True:
                    i = ready.get()
                    if i is None or failed.is_set():
                        return
                    try:
                        chunk(aead, scratch, i)
                        if mm is not None:
                            release(i)
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
            if nthreads > 1:
                pool = _pool(nthreads - 1)
                futures = [pool.submit(worker) for _ in range(nthreads - 1)]
            published = 0  # chunks below this are queued (or need no work)

            def publish(upto: int) -> None:
                nonlocal published
                for i in range(published, upto):
                    if i in per_chunk or i in extra:
                        ready.put(i)
                if futures and upto > published:
                    time.sleep(0)  # hand the GIL to a woken worker now, not after 5 ms
                published = max(published, upto)

            last_start = 0
            for r in regions:
                if r.start < last_start:  # pragma: no cover - a planning bug, not bad input
                    raise FormatError("internal error: destinations out of order")
                last_start = r.start
                seen.append(r)
                if r.nbytes == 0 or failed.is_set():
                    continue
                first = r.start // cs
                if first > published:
                    publish(first)  # no later region can touch the chunks before this one
                for i in range(first, (r.end - 1) // cs + 1):
                    per_chunk.setdefault(i, []).append(r)
            publish(count)
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

    def verify_all(self, *, threads: int | None = None) -> None:
        """Authenticate every chunk without keeping any plaintext."""
        self.decrypt([], threads=threads, chunks=range(self.header.chunk_count))

    # -- loading ------------------------------------------------------------------------------
    def _entries(self, names: Sequence[str] | None) -> list[tuple[str, Entry]]:
        idx = self.index
        if names is None:
            return [(n, idx.resolve(n)) for n in idx.names]
        if isinstance(names, str):
            raise InputError("tensors= takes a list of names, not one string")
        unknown = [n for n in names if n not in idx.entries and n not in idx.aliases]
        if unknown:
            raise IndexError_(
                f"{len(unknown)} requested tensor name(s) are not in the file (first: "
                f"{str(unknown[0])[:80]!r}); list them with `sealtorch inspect --key-file`"
            )
        return [(n, idx.resolve(n)) for n in dict.fromkeys(names)]

    def load(
        self, names: Sequence[str] | None = None, *, threads: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Decrypt all tensors (or ``names``) into new CPU tensors; tied names share a tensor.

        A full load decrypts into one buffer that the tensors are views of (no copies); a subset
        gets one buffer per tensor and only the chunks it needs are decrypted.
        """
        wanted = self._entries(names)
        stored: dict[str, torch.Tensor] = {}
        regions: list[_Region] = []
        if names is None:
            arena = _plaintext_buffer(self.header.total_length)
            regions.append(_Region(0, self.header.total_length, arena.numpy().data, check=True))
            for _, e in wanted:
                if e.name not in stored:
                    stored[e.name] = (
                        arena[e.offset : e.end].view(torch_dtype(e.dtype)).view(e.shape)
                    )
        else:
            for _, e in sorted(wanted, key=lambda ne: ne[1].offset):
                if e.name in stored:
                    continue
                buf = torch.empty(e.nbytes, dtype=torch.uint8)
                regions.append(
                    _Region(e.offset, e.nbytes, buf.numpy().data, check=e.dtype == "BOOL")
                )
                stored[e.name] = buf.view(torch_dtype(e.dtype)).view(e.shape)
        # a read of every stored tensor authenticates every chunk, even one no tensor byte lies
        # in (the empty chunk of an empty stream), like verify
        full = names is None or len(stored) == len(self.index.entries)
        every = range(self.header.chunk_count) if full else None
        self.decrypt(regions, threads=threads, chunks=every)
        return {n: stored[e.name] for n, e in wanted}

    def load_into(
        self, module: torch.nn.Module, *, strict: bool = True, threads: int | None = None
    ) -> list[str]:
        """Decrypt into ``module``'s own parameter and buffer storage; returns the names loaded.

        Every check (names, dtypes, shapes, device, ties) runs before any byte is written, so a
        mismatched module is left untouched; then destinations are handed to the decryption
        threads in file order while the rest are still being prepared.
        """
        return self.load_into_tensors(module.state_dict(keep_vars=True), strict=strict,
                                      threads=threads)

    def load_into_tensors(
        self,
        state: Mapping[str, torch.Tensor],
        *,
        strict: bool = True,
        threads: int | None = None,
        every_chunk: bool = False,
    ) -> list[str]:
        """Decrypt into the given tensors' own storage, by name (what :meth:`load_into` does
        with a module's ``state_dict(keep_vars=True)``); tensors that share storage are ties.
        ``every_chunk`` authenticates every chunk even when ``strict=False``."""
        idx = self.index
        entries, aliases = idx.entries, idx.aliases
        if strict:
            missing = [n for n in state if n not in entries and n not in aliases]
            unexpected = [n for n in idx.order if n not in state]
            if missing or unexpected:
                parts = []
                if missing:
                    parts.append(
                        f"{len(missing)} module tensor(s) not in the file (e.g. {missing[0]!r})"
                    )
                if unexpected:
                    parts.append(f"{len(unexpected)} file tensor(s) not in the module")
                raise IndexError_(
                    "the sealed file does not match the module: "
                    + "; ".join(parts)
                    + "; pass strict=False to load the common subset"
                )
        # Checks, in one pass (~1 µs per tensor; ResNet-50 has 320): nothing is written yet.
        plan: list[tuple[int, int, int, torch.Tensor]] = []  # (offset, nbytes, ptr, tensor)
        by_storage: dict[tuple[int, int], int] = {}
        loaded = []
        for name, t in state.items():
            e = entries.get(name)
            if e is None:
                stored = aliases.get(name)
                if stored is None:
                    continue
                e = entries[stored]
            if t.dtype is not _TORCH_DTYPES[e.dtype] or t.shape != e.shape:
                raise IndexError_(
                    f"tensor {name!r}: the file holds {e.dtype}{list(e.shape)} but the module "
                    f"has {t.dtype}{list(t.shape)}"
                )
            if not t.is_cpu:
                raise InputError(
                    "load_into writes CPU tensors only; keep the module on CPU (moving weights "
                    "to a GPU needs an explicit unsafe_ opt-in, see sealtorch.load)"
                )
            loaded.append(name)
            if e.nbytes == 0:
                continue
            ptr = t.data_ptr()
            tied_to = by_storage.get((ptr, e.nbytes))
            if tied_to is None:  # first sight of this storage
                by_storage[(ptr, e.nbytes)] = e.offset
                plan.append((e.offset, e.nbytes, ptr, t))
            elif tied_to != e.offset:
                raise IndexError_(
                    f"tensor {name!r} is tied in the module but not in the file; untie it"
                )
        plan.sort(key=lambda p: p[0])
        post: list[tuple[torch.Tensor, torch.Tensor]] = []  # (non-contiguous target, temp)

        def regions() -> Iterator[_Region]:
            """Destinations in file order; an untied copy of a stored tensor joins its region."""
            region: _Region | None = None
            for offset, nbytes, ptr, t in plan:
                if t.is_contiguous():
                    arr = _raw_bytes(ptr, nbytes)  # `state` keeps the tensor alive meanwhile
                else:
                    tmp = torch.empty(t.shape, dtype=t.dtype)
                    post.append((t.detach(), tmp))
                    arr = tmp.reshape(-1).view(torch.uint8).numpy().data
                if region is not None and region.start == offset:
                    region.copies.append(arr)
                    continue
                if region is not None:
                    yield region
                region = _Region(offset, nbytes, arr, check=t.dtype is torch.bool)
            if region is not None:
                yield region

        try:
            # strict: every stored tensor is a destination, a full read (every chunk)
            every = range(self.header.chunk_count) if strict or every_chunk else None
            self.decrypt(regions(), threads=threads, chunks=every)
            with torch.no_grad():
                for target, tmp in post:
                    target.copy_(tmp)
        except BaseException:
            with torch.no_grad():
                for target, _ in post:
                    target.zero_()
            raise
        finally:
            for _, tmp in post:
                wipe(tmp.reshape(-1).view(torch.uint8).numpy().data)
        return loaded


def open_sealed(
    path: str | os.PathLike[str],
    *,
    key: KeyArg = None,
    key_provider: fkeys.KeyProvider | None = None,
    signer: SignerArg = None,
) -> SealedFile:
    """Open and authenticate a sealed file's header, index and signature (use as context)."""
    return SealedFile(path, key=key, key_provider=key_provider, signer=signer)


def load(
    path: str | os.PathLike[str],
    *,
    key: KeyArg = None,
    key_provider: fkeys.KeyProvider | None = None,
    tensors: Sequence[str] | None = None,
    signer: SignerArg = None,
    threads: int | None = None,
    unsafe_device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Load a sealed file into CPU tensors (``tensors=`` for a subset).

    ``key`` is a :class:`ModelKey`, a model-key :class:`Secret` or a key file path;
    ``key_provider`` a :class:`KeyProvider` (e.g. the key cache client). ``signer`` requires an
    owner signature by that Ed25519 key. ``unsafe_device`` moves the plaintext weights to
    another device (e.g. a GPU outside the TEE's protection) — only if you accept that.
    """
    with SealedFile(
        path, key=key, key_provider=key_provider, signer=signer, populate=tensors is None
    ) as sf:
        out = sf.load(tensors, threads=threads)
    if unsafe_device is not None:
        moved: dict[int, torch.Tensor] = {}
        result = {}
        for n, t in out.items():
            if id(t) not in moved:
                moved[id(t)] = t.to(unsafe_device)
            result[n] = moved[id(t)]
        return result
    return out


def load_into(
    module: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    key: KeyArg = None,
    key_provider: fkeys.KeyProvider | None = None,
    strict: bool = True,
    signer: SignerArg = None,
    threads: int | None = None,
) -> list[str]:
    """Decrypt a sealed file straight into ``module``'s parameters and buffers (CPU).

    On failure every parameter/buffer the load covered is zeroed before the error is raised.
    Returns the names that were loaded.
    """
    with SealedFile(path, key=key, key_provider=key_provider, signer=signer, populate=False) as sf:
        return sf.load_into(module, strict=strict, threads=threads)


def verify(
    path: str | os.PathLike[str],
    *,
    key: KeyArg = None,
    key_provider: fkeys.KeyProvider | None = None,
    signer: SignerArg = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Authenticate every byte of a sealed file, keeping no plaintext; returns a summary."""
    with SealedFile(path, key=key, key_provider=key_provider, signer=signer) as sf:
        sf.verify_all(threads=threads)
        return {
            **sf.header.describe(),
            "tensors": len(sf.index.entries),
            "aliases": len(sf.index.aliases),
            "signer": sf.signer_public.hex() if sf.signer_public else None,
            "ok": True,
        }


def unseal(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    key: KeyArg = None,
    key_provider: fkeys.KeyProvider | None = None,
    signer: SignerArg = None,
    overwrite: bool = False,
) -> int:
    """Write the plaintext weights to a .safetensors file (mode 0600; for the owner's machine).

    Tied tensors are written as separate copies (safetensors cannot share storage). Returns the
    number of tensors written.
    """
    from safetensors.torch import save_file

    target = Path(out)
    with SealedFile(path, key=key, key_provider=key_provider, signer=signer) as sf:
        names = list(sf.index.entries)
        tensors = sf.load(names)  # every stored tensor: a full read, as verify
        for alias, stored in sf.index.aliases.items():
            tensors[alias] = tensors[stored].clone()
        metadata = dict(sf.index.metadata)
    flags = os.O_WRONLY | os.O_CREAT | (0 if overwrite else os.O_EXCL)
    try:
        fd = os.open(target, flags, 0o600)
    except FileExistsError:
        raise InputError(f"{target}: already exists; pass --force to overwrite") from None
    except OSError as e:
        raise InputError(f"{target}: cannot create output ({e.strerror})") from None
    os.fchmod(fd, 0o600)
    os.close(fd)
    save_file(tensors, str(target), metadata=metadata or None)
    return len(tensors)


def inspect(
    path: str | os.PathLike[str],
    *,
    key: KeyArg = None,
    key_provider: fkeys.KeyProvider | None = None,
) -> dict[str, Any]:
    """What is known about a sealed file: its header, and its index when public or keyed."""
    header = hdr.read_header(path)
    if key is None and key_provider is None:  # with a key, SealedFile checks the MAC first
        check_file_length(Path(path), header, Path(path).stat().st_size)
    info: dict[str, Any] = {"header": header.describe()}
    if key is not None or key_provider is not None:
        with SealedFile(path, key=key, key_provider=key_provider, populate=False) as sf:
            info["index"] = sf.index.describe()
            info["index_authenticated"] = True
            info["signer"] = sf.signer_public.hex() if sf.signer_public else None
        return info
    if header.public_index:
        with open(path, "rb") as f:
            f.seek(header.header_length)
            body = f.read(header.index_length - hdr.MAC_BYTES)
        info["index"] = parse_index(body, header.total_length).describe()
        info["index_authenticated"] = False
    if header.signed:
        size = Path(path).stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - hdr.SIGNATURE_TRAILER_BYTES))
            info["signer_unverified"] = f.read(32).hex()
    return info
