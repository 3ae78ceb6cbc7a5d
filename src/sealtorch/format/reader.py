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

import hashlib
import hmac
import mmap
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealtorch._secret import Secret, wipe
from sealtorch.errors import FormatError, IndexError_, InputError
from sealtorch.format import chunks as fchunks
from sealtorch.format import header as hdr
from sealtorch.format import keys as fkeys
from sealtorch.format import rules, signing
from sealtorch.format.chunks import _Region
from sealtorch.format.dtypes import NAME_TO_DTYPE, torch_dtype
from sealtorch.format.index import Entry, Index, parse_index
from sealtorch.format.keyfile import ModelKey, read_key_file
from sealtorch.format.memory import _plaintext_buffer, _raw_bytes, map_file
from sealtorch.format.stream import public_index_mac

KeyArg = ModelKey | Secret | str | os.PathLike[str] | None
SignerArg = Ed25519PublicKey | bytes | str | os.PathLike[str] | None


_TORCH_DTYPES = {name: torch_dtype(name) for name in NAME_TO_DTYPE}


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides torch gives a contiguous tensor of ``shape`` (a 0 or 1 dim counts as 1)."""
    strides = []
    step = 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


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
            self._mm = map_file(fd, size, populate=populate)
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
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Decrypt the chunks that ``regions`` need (and ``chunks``) into the regions; see
        :func:`sealtorch.format.chunks.decrypt`."""
        fchunks.decrypt(
            self.header, self.view, self.keys.chunk_key, self.index.checks, regions,
            threads=threads, chunks=chunks, release_map=self._mm if self.release_pages else None,
            progress=progress,
        )

    def verify_all(self, *, threads: int | None = None,
                   progress: Callable[[int], None] | None = None) -> None:
        """Authenticate every chunk without keeping any plaintext; ``progress(n)`` is called
        with each chunk's plaintext length once it authenticated."""
        self.decrypt([], threads=threads, chunks=range(self.header.chunk_count),
                     progress=progress)

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
        self,
        names: Sequence[str] | None = None,
        *,
        threads: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Decrypt all tensors (or ``names``) into new CPU tensors; tied names share a tensor.

        A full load decrypts into one buffer that the tensors are views of (no copies), and drops
        each chunk's ciphertext pages once decrypted (:attr:`release_pages`), so resident memory
        grows by the plaintext only; a subset gets one buffer per tensor and only the chunks it
        needs are decrypted. ``progress(n)`` is called with each chunk's plaintext length once it
        authenticated.
        """
        wanted = self._entries(names)
        stored: dict[str, torch.Tensor] = {}
        regions: list[_Region] = []
        if names is None:
            self.release_pages = True
            arena = _plaintext_buffer(self.header.total_length)
            regions.append(_Region(0, self.header.total_length, arena.numpy().data, check=True))
            typed: dict[str, tuple[torch.Tensor, int]] = {}  # the arena as each dtype
            for _, e in wanted:
                if e.name in stored:
                    continue
                if e.dtype not in typed:
                    size = _TORCH_DTYPES[e.dtype].itemsize
                    whole = arena[: arena.numel() // size * size]
                    typed[e.dtype] = (whole.view(_TORCH_DTYPES[e.dtype]), size)
                as_dtype, size = typed[e.dtype]
                # one strided view per tensor (a slice and two views cost 3x as much); offsets
                # are multiples of 64, so of every item size
                stored[e.name] = as_dtype.as_strided(
                    e.shape, _contiguous_strides(e.shape), e.offset // size)
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
        self.decrypt(regions, threads=threads, chunks=every, progress=progress)
        return {n: stored[e.name] for n, e in wanted}

    def load_into(
        self, module: torch.nn.Module, *, strict: bool = True, threads: int | None = None
    ) -> list[str]:
        """Decrypt into ``module``'s own parameter and buffer storage; returns the names loaded.

        Every check (names, dtypes, shapes, device, ties) runs before any byte is written, so a
        mismatched module is left untouched; then every destination is planned and the
        decryption threads fill them.
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
    with SealedFile(path, key=key, key_provider=key_provider, signer=signer, populate=False) as sf:
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
