"""Seal a Hugging Face model directory: every weight shard, the config and the other files,
each its own sealed file under one model key, plus a sealed manifest that binds them together.

The layout follows the input (no re-sharding): ``model-00001-of-00003.safetensors`` becomes
``model-00001-of-00003.safetensors.sealed``; see docs/huggingface.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealtorch._outputs import output_dir
from sealtorch._secret import wipe
from sealtorch.errors import InputError, OutputError, SealedDirError
from sealtorch.format.keyfile import ModelKey, read_key_file
from sealtorch.format.writer import DEFAULT_CHUNK_SIZE, seal
from sealtorch.hf import manifest as mf

INDEX_NAME = "model.safetensors.index.json"


def _files(src: Path) -> list[str]:
    """Every regular file under ``src`` (symlinks to files followed, as in a hub cache
    snapshot), as sorted relative POSIX names; hidden files and directories are skipped."""
    out = []
    for root, dirs, names in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in names:
            p = Path(root, n)
            if n.startswith(".") or not p.is_file():
                continue
            out.append(p.relative_to(src).as_posix())
    return sorted(out)


def _shards(src: Path, names: list[str]) -> list[str]:
    """The weight shards in load order: the index's shard files, or the top-level
    ``*.safetensors`` files by name."""
    found = sorted(n for n in names if "/" not in n and n.endswith(".safetensors"))
    if not found:
        raise InputError(
            f"{src}: no *.safetensors weights at the top of the directory; save the model "
            "with save_pretrained() (safetensors is its default) and seal that directory"
        )
    if INDEX_NAME not in names:
        return found
    try:
        weight_map = json.loads((src / INDEX_NAME).read_text("utf-8"))["weight_map"]
        listed = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"{src / INDEX_NAME}: not a safetensors index (no weight_map)") from None
    if listed != found:
        raise InputError(
            f"{src}: {INDEX_NAME} lists the shards {listed[:3]}... but the directory holds "
            f"{found[:3]}...; seal a complete, consistent checkpoint"
        )
    return listed


def _seal_bytes(
    data: bytes, name: str, out: Path, mk: ModelKey, chunk_size: int, sign: Ed25519PrivateKey | None
) -> str:
    """Seal one small file's bytes as a sealed file with one U8 tensor; returns the header
    digest (hex)."""
    buf = bytearray(data)
    t = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
    try:
        header = seal({mf.FILE_TENSOR: t}, out, mk, chunk_size=chunk_size, sign_key=sign,
                      metadata={mf.FILE_NAME_KEY: name})
    finally:
        del t
        wipe(buf)
    return header.digest().hex()


def seal_pretrained(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    key: ModelKey | str | os.PathLike[str],
    *,
    public_config: bool = False,
    public: Iterable[str] = (),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    sign_key: Ed25519PrivateKey | str | os.PathLike[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> mf.Manifest:
    """Seal the Hugging Face model directory ``src`` into the new directory ``out``.

    Every ``*.safetensors`` shard and every other file is sealed with ``key`` (each its own
    salt and file key); ``config.json`` stays readable with ``public_config``, and other files
    named in ``public`` (paths relative to ``src``) are copied as they are, bound to the
    sealing by their SHA-256. Returns the manifest written to ``out/sealtorch-manifest.sealed``.
    ``progress(done, total)`` is called as the shards' weight bytes are sealed.
    """
    source = Path(src)
    if not source.is_dir():
        raise InputError(f"{source}: not a directory")
    names = _files(source)
    if mf.CONFIG_NAME not in names:
        raise InputError(f"{source}: no config.json, so not a Hugging Face model directory")
    for n in names:
        try:
            mf.check_name(n)
        except SealedDirError:
            raise InputError(f"{source}: cannot seal the file {n[:80]!r} (reserved or "
                             "unusable name); remove or rename it") from None
    shards = _shards(source, names)
    public_set = set(public) | ({mf.CONFIG_NAME} if public_config else set())
    unknown = sorted(public_set - set(names))
    if unknown:
        raise InputError(f"--public {unknown[0]!r}: no such file in {source} (names are "
                         "relative to the model directory, e.g. tokenizer.json)")
    if public_set & set(shards):
        raise InputError("weight shards are always sealed; do not name them with --public")
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise OutputError(f"{target} already exists and is not an empty directory; choose a "
                          "new output directory")
    created = not target.exists()
    output_dir(target)
    signer = None if sign_key is None else _signer(sign_key)
    mk = key if isinstance(key, ModelKey) else read_key_file(key)
    try:
        shard_items = []
        total = sum(_data_bytes(source / name) for name in shards)
        before = 0
        for name in shards:
            from safetensors import safe_open

            with safe_open(str(source / name), framework="pt") as f:
                count = len(list(f.keys()))
            header = seal(source / name, target / (name + mf.SEALED_SUFFIX), mk,
                          chunk_size=chunk_size, sign_key=signer,
                          progress=_offset(progress, before, total))
            before += header.total_length
            shard_items.append(mf.Item(name, True, header.digest().hex(), count))
        file_items = []
        for name in names:
            if name in shards:
                continue
            dest = target / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if name in public_set:
                shutil.copyfile(source / name, dest)
                digest = hashlib.sha256((source / name).read_bytes()).hexdigest()
                file_items.append(mf.Item(name, False, digest))
                continue
            data = (source / name).read_bytes()
            digest = _seal_bytes(data, name, Path(str(dest) + mf.SEALED_SUFFIX), mk, chunk_size,
                                 signer)
            file_items.append(mf.Item(name, True, digest))
        manifest = mf.Manifest(tuple(shard_items), tuple(file_items))
        seal({}, target / mf.MANIFEST_NAME, mk, chunk_size=chunk_size, sign_key=signer,
             metadata={mf.METADATA_KEY: manifest.to_json()})
    except BaseException:
        if created:
            shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        if not isinstance(key, ModelKey):
            mk.wipe()
    return manifest


def _offset(progress: Callable[[int, int], None] | None, before: int, total: int
            ) -> Callable[[int, int], None] | None:
    """One shard's ``progress(done, shard_total)`` as progress over all shards' bytes."""
    if progress is None:
        return None
    report = progress

    def shard_progress(done: int, _shard_total: int) -> None:
        report(before + done, total)

    return shard_progress


def _data_bytes(shard: Path) -> int:
    """The size of a safetensors file's tensor data (the file less its JSON header)."""
    with shard.open("rb") as f:
        head = f.read(8)
    return max(0, shard.stat().st_size - 8 - int.from_bytes(head.ljust(8, b"\0"), "little"))


def _signer(sign_key: Ed25519PrivateKey | str | os.PathLike[str]) -> Ed25519PrivateKey:
    from sealtorch.format.signing import load_signing_key

    return sign_key if isinstance(sign_key, Ed25519PrivateKey) else load_signing_key(sign_key)
