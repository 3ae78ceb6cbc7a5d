"""Owner tools over sealed files: verify every byte, unseal to safetensors, inspect what is
public (and, with the key, the index)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sealtorch._outputs import staged, write_failed
from sealtorch.errors import InputError
from sealtorch.format import header as hdr
from sealtorch.format import keys as fkeys
from sealtorch.format.index import parse_index
from sealtorch.format.reader import KeyArg, SealedFile, SignerArg, check_file_length


def byte_progress(progress: Callable[[int, int], None] | None, total: int
                  ) -> Callable[[int], None] | None:
    """A thread-safe ``add(n)`` that reports ``progress(done, total)`` as the decryption
    threads finish chunks (``None`` without ``progress``)."""
    if progress is None:
        return None
    lock = threading.Lock()
    done = 0

    def add(n: int) -> None:
        nonlocal done
        with lock:
            done += n
            progress(done, total)

    return add


def verify(
    path: str | os.PathLike[str],
    *,
    key: KeyArg = None,
    key_provider: fkeys.KeyProvider | None = None,
    signer: SignerArg = None,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Authenticate every byte of a sealed file, keeping no plaintext; returns a summary.
    ``progress(done, total)`` is called as chunks authenticate."""
    with SealedFile(path, key=key, key_provider=key_provider, signer=signer) as sf:
        sf.verify_all(threads=threads, progress=byte_progress(progress, sf.header.total_length))
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
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write the plaintext weights to a .safetensors file (mode 0600; for the owner's machine).

    Tied tensors are written as separate copies (safetensors cannot share storage). The file
    appears under its name only once complete: a failed write (a full disk) leaves nothing.
    ``progress(done, total)`` is called as chunks authenticate. Returns the number of tensors
    written.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    target = Path(out)
    if not overwrite and os.path.lexists(target):
        raise InputError(f"{target}: already exists; pass --force to overwrite")
    with SealedFile(path, key=key, key_provider=key_provider, signer=signer) as sf:
        names = list(sf.index.entries)
        # every stored tensor: a full read, as verify
        tensors = sf.load(names, progress=byte_progress(progress, sf.header.total_length))
        for alias, stored in sf.index.aliases.items():
            tensors[alias] = tensors[stored].clone()
        metadata = dict(sf.index.metadata)
    try:
        with staged(target, overwrite=overwrite) as (_, tmp):  # mode 0600, which save_file keeps
            save_file(tensors, tmp, metadata=metadata or None)
    except SafetensorError as err:  # safetensors' own wrapper of the I/O error
        raise write_failed(target, OSError(str(err))) from None
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
