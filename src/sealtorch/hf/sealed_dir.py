"""Open a sealed Hugging Face model directory: authenticate the manifest, then check that the
directory holds exactly the manifest's files and that every file is the one this sealing wrote,
before any tensor is decrypted. Small files (config, tokenizer) are decrypted into memory only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from sealtorch._secret import wipe
from sealtorch.errors import InputError, SealedDirError
from sealtorch.format import header as hdr
from sealtorch.format.keyfile import ModelKey, read_key_file
from sealtorch.format.keys import KeyProvider
from sealtorch.format.reader import KeyArg, SealedFile, SignerArg
from sealtorch.hf import manifest as mf


def _listing(root: Path) -> set[str]:
    """Every file under ``root`` (hidden ones too) as relative POSIX names."""
    out = set()
    for base, dirs, names in os.walk(root):
        dirs.sort()
        for n in names:
            out.add(Path(base, n).relative_to(root).as_posix())
    return out


class SealedDir:
    """An opened sealed model directory: the manifest authenticated, the listing checked, every
    shard opened (header, key, length and tensor index authenticated) and bound to the manifest.

    Use as a context manager; :meth:`close` unmaps the shards and wipes their keys.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        key: KeyArg = None,
        key_provider: KeyProvider | None = None,
        signer: SignerArg = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise InputError(f"{self.path}: not a directory (a sealed model directory is what "
                             "`sealtorch seal MODEL_DIR -o SEALED_DIR` writes)")
        if (key is None) == (key_provider is None):
            raise InputError("pass exactly one of key= (model key or key file) and key_provider=")
        self._owns_key = key is not None and not isinstance(key, ModelKey)
        if key is not None and not isinstance(key, ModelKey) and isinstance(key, str | os.PathLike):
            key = read_key_file(key)
        self._key: KeyArg = key
        self._provider = key_provider
        self._signer = signer
        self.shards: list[SealedFile] = []
        try:
            self.manifest = self._read_manifest()
            mf.check_listing(self.manifest, _listing(self.path))
            for item in self.manifest.files:
                self._check_file(item)
            names: set[str] = set()
            for item in self.manifest.shards:
                sf = self._open(item)
                self.shards.append(sf)
                if len(sf.index.order) != item.tensors:
                    raise SealedDirError(f"{item.stored_name}: holds {len(sf.index.order)} "
                                         f"tensors, the manifest says {item.tensors}")
                if not names.isdisjoint(sf.index.order):
                    raise SealedDirError(f"{item.stored_name}: a tensor name is also in an "
                                         "earlier shard; the checkpoint is inconsistent")
                names.update(sf.index.order)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> SealedDir:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Unmap every shard, wipe their keys (and the model key if read from a file here)."""
        for sf in self.shards:
            sf.close()
        self.shards = []
        if self._owns_key and isinstance(self._key, ModelKey):
            self._key.wipe()
            self._key = None

    def _sealed(self, stored: str, populate: bool = False) -> SealedFile:
        return SealedFile(self.path / stored, key=self._key, key_provider=self._provider,
                          signer=self._signer, populate=populate)

    def _read_manifest(self) -> mf.Manifest:
        path = self.path / mf.MANIFEST_NAME
        if not path.is_file():
            raise SealedDirError(f"{self.path}: no {mf.MANIFEST_NAME}, so not a sealed model "
                                 "directory; seal one with `sealtorch seal MODEL_DIR -o DIR`")
        with self._sealed(mf.MANIFEST_NAME) as sf:
            text = sf.index.metadata.get(mf.METADATA_KEY)
            if text is None or sf.index.order:
                raise SealedDirError(f"{path}: a sealed file, but not a sealed directory's "
                                     "manifest")
            return mf.parse_manifest(text)

    def _open(self, item: mf.Item) -> SealedFile:
        """Open a sealed file of the manifest, refusing it (before any key is used) unless its
        header is the one the manifest lists."""
        path = self.path / item.stored_name
        mf.check_digest(item, hdr.read_header(path).digest().hex())
        sf = self._sealed(item.stored_name)
        try:
            mf.check_digest(item, sf.header.digest().hex())  # the file changed meanwhile?
        except BaseException:
            sf.close()
            raise
        return sf

    def _check_file(self, item: mf.Item) -> None:
        if item.sealed:
            mf.check_digest(item, hdr.read_header(self.path / item.stored_name).digest().hex())
        else:
            data = (self.path / item.name).read_bytes()
            mf.check_digest(item, hashlib.sha256(data).hexdigest())

    def verify_all(self, *, threads: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
        """Authenticate every byte of every file of the sealing, keeping no plaintext;
        ``progress(done, total)`` counts the shards' weight bytes as they authenticate."""
        from sealtorch.format.owner import byte_progress

        add = byte_progress(progress, sum(sf.header.total_length for sf in self.shards))
        for sf in self.shards:
            sf.verify_all(threads=threads, progress=add)
        for item in self.manifest.files:
            if item.sealed:
                with self._open(item) as sf:
                    sf.verify_all(threads=threads)
            else:
                self._check_file(item)
        return {"shards": len(self.manifest.shards), "files": len(self.manifest.files),
                "tensors": sum(len(sf.index.order) for sf in self.shards)}

    def has_file(self, name: str) -> bool:
        """Whether the sealing holds the (non-weight) file ``name``, e.g. ``tokenizer.json``."""
        return self.manifest.item(name) is not None

    def read_bytes(self, name: str) -> bytearray:
        """Decrypt (or, if public, read and check) the file ``name`` of the original directory
        into memory. The caller should wipe the result when done (``sealtorch._secret.wipe``)."""
        item = self.manifest.item(name)
        if item is None:
            raise SealedDirError(f"{self.path}: the sealing holds no file {name[:80]!r}")
        if not item.sealed:
            data = (self.path / item.name).read_bytes()
            mf.check_digest(item, hashlib.sha256(data).hexdigest())
            return bytearray(data)
        with self._open(item) as sf:
            if sf.index.metadata.get(mf.FILE_NAME_KEY) != name or sf.index.order != [
                mf.FILE_TENSOR
            ]:
                raise SealedDirError(f"{item.stored_name}: not the sealed file {name!r}")
            t = sf.load()[mf.FILE_TENSOR]
        out = bytearray(t.numel())
        if out:
            memoryview(out)[:] = t.numpy().data
            wipe(t.numpy().data)
        return out
