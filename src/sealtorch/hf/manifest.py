"""The manifest of a sealed Hugging Face model directory (docs/format.md section 14).

It lists every file of the sealing: the weight shards in load order and every other file, each
bound to this sealing by the SHA-256 of its sealed header (which covers the file's random salt,
its chunk count and length; every chunk and the index are authenticated against that digest) or,
for a file left public, the SHA-256 of its bytes. The manifest itself is a sealed file, so only
a key holder can read or forge it. The checks here are pure functions over the parsed manifest.
"""

from __future__ import annotations

import hmac
import json
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from sealtorch.errors import SealedDirError

FORMAT = "sealtorch-hf/v1"
#: the manifest's own file name in a sealed directory
MANIFEST_NAME = "sealtorch-manifest.sealed"
#: suffix of every sealed file in a sealed directory
SEALED_SUFFIX = ".sealed"
#: the index metadata member of the manifest file that holds the manifest JSON
METADATA_KEY = "sealtorch.hf.manifest"
#: the index metadata member of a sealed small file that names it (a second guard on swaps)
FILE_NAME_KEY = "sealtorch.hf.file"
#: the one tensor of a sealed small file: its bytes
FILE_TENSOR = "bytes"
CONFIG_NAME = "config.json"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_NAME = 255


@dataclass(frozen=True)
class Item:
    """One file of the sealing: ``name`` is its path in the original directory (POSIX,
    relative); ``sealed`` files are stored as ``name + ".sealed"`` and bound by ``digest``, the
    SHA-256 of their sealed header; public files keep their name and ``digest`` is the SHA-256
    of their bytes. ``tensors`` counts a shard's tensors (``None`` for other files)."""

    name: str
    sealed: bool
    digest: str
    tensors: int | None = None

    @property
    def stored_name(self) -> str:
        return self.name + SEALED_SUFFIX if self.sealed else self.name


@dataclass(frozen=True)
class Manifest:
    """Shards in load order, then every other file (config, tokenizer, ...)."""

    shards: tuple[Item, ...]
    files: tuple[Item, ...]

    def to_json(self) -> str:
        def item(i: Item) -> dict[str, Any]:
            out: dict[str, Any] = {"name": i.name, "sealed": i.sealed, "sha256": i.digest}
            if i.tensors is not None:
                out["tensors"] = i.tensors
            return out

        body = {
            "format": FORMAT,
            "shards": [item(s) for s in self.shards],
            "files": [item(f) for f in self.files],
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def item(self, name: str) -> Item | None:
        """The non-shard file called ``name`` (``config.json``, ``tokenizer.json``, ...)."""
        return next((f for f in self.files if f.name == name), None)

    def stored_names(self) -> set[str]:
        return {i.stored_name for i in (*self.shards, *self.files)}


def check_name(name: object) -> str:
    """A file name from a model directory or a manifest: a relative POSIX path without empty,
    ``.`` or ``..`` parts, hidden parts or control characters, not the manifest's own name."""
    bad = "file names in a sealed directory are relative paths without '.', '..' or hidden parts"
    if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME:
        raise SealedDirError(f"manifest invalid: {bad}")
    parts = name.split("/")
    if (
        any(not p or p.startswith(".") for p in parts)
        or any(ord(c) < 0x20 or ord(c) == 0x7F or c == "\\" for c in name)
        or PurePosixPath(name).is_absolute()
        or name in (MANIFEST_NAME, MANIFEST_NAME.removesuffix(SEALED_SUFFIX))
    ):
        raise SealedDirError(f"manifest invalid: {bad} ({name[:80]!r})")
    return name


def _item(raw: object, *, shard: bool) -> Item:
    if not isinstance(raw, dict):
        raise SealedDirError("manifest invalid: an entry is not an object")
    keys = {"name", "sealed", "sha256"} | ({"tensors"} if shard else set())
    if set(raw) != keys:
        raise SealedDirError(f"manifest invalid: an entry must have exactly {sorted(keys)}")
    name = check_name(raw["name"])
    sealed, digest = raw["sealed"], raw["sha256"]
    if not isinstance(sealed, bool) or not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise SealedDirError(f"manifest invalid: entry {name!r} has a bad 'sealed' or 'sha256'")
    tensors = raw.get("tensors")
    if shard:
        if not sealed or not isinstance(tensors, int) or isinstance(tensors, bool) or tensors < 0:
            raise SealedDirError(f"manifest invalid: shard {name!r} must be sealed with a count")
    return Item(name, sealed, digest, tensors if shard else None)


def parse_manifest(text: str) -> Manifest:
    """Parse and check the manifest JSON (already authenticated: it came out of a sealed file)."""
    try:
        raw = json.loads(text)
    except ValueError:
        raise SealedDirError("manifest invalid: not JSON") from None
    if not isinstance(raw, dict) or set(raw) != {"format", "shards", "files"}:
        raise SealedDirError("manifest invalid: expected members format, shards and files")
    if raw["format"] != FORMAT:
        raise SealedDirError(
            f"manifest format {str(raw['format'])[:40]!r} is not {FORMAT!r}; use a sealtorch "
            "release that reads it"
        )
    if not isinstance(raw["shards"], list) or not isinstance(raw["files"], list):
        raise SealedDirError("manifest invalid: shards and files must be arrays")
    shards = tuple(_item(s, shard=True) for s in raw["shards"])
    files = tuple(_item(f, shard=False) for f in raw["files"])
    names = [i.name for i in (*shards, *files)]
    stored = [i.stored_name for i in (*shards, *files)]
    if len(set(names)) != len(names) or len(set(stored)) != len(stored):
        raise SealedDirError("manifest invalid: a file is listed twice")
    if not shards:
        raise SealedDirError("manifest invalid: no weight shards")
    return Manifest(shards, files)


def check_listing(manifest: Manifest, present: set[str]) -> None:
    """Refuse a directory whose files are not exactly the manifest's (plus the manifest)."""
    expected = manifest.stored_names()
    missing = sorted(expected - present)
    extra = sorted(present - expected - {MANIFEST_NAME})
    if missing:
        raise SealedDirError(
            f"{len(missing)} file(s) of the sealing are missing (first: {missing[0]!r}); copy "
            "the whole sealed directory again"
        )
    if extra:
        raise SealedDirError(
            f"{len(extra)} file(s) in the sealed directory are not part of this sealing "
            f"(first: {extra[0]!r}); remove them (a sealed directory holds only what "
            "`sealtorch seal` wrote)"
        )


def check_digest(item: Item, actual: str) -> None:
    """Refuse a file whose header digest (sealed) or content digest (public) is not the one the
    manifest lists: swapped, replaced, or from another sealing."""
    if not hmac.compare_digest(item.digest, actual):
        what = "sealed header" if item.sealed else "content"
        raise SealedDirError(
            f"{item.stored_name}: its {what} is not the one this sealing's manifest lists "
            "(a file swapped, replaced or taken from another sealing, or the manifest is from "
            "another sealing); copy the whole sealed directory again"
        )
