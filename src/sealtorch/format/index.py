"""The tensor index: names, dtypes, shapes and stream offsets of every stored tensor.

Encoded as canonical JSON; encrypted with the index key by default, or public (authenticated by
an HMAC) with ``public_index=True``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sealtorch.errors import IndexError_
from sealtorch.format.dtypes import NAME_TO_DTYPE, itemsize
from sealtorch.protocol.canonical import canonical_json

INDEX_FORMAT = "sealtorch-index/v1"
ALIGNMENT = 64
MAX_NAME_BYTES = 1024
MAX_DIMS = 32
MAX_TENSORS = 1_000_000


class Entry(NamedTuple):
    """One stored tensor: its dtype name, shape and byte range in the plaintext stream.

    A named tuple rather than a dataclass: the loader builds one per tensor on every load, and
    a tuple is four times cheaper to make.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass
class Index:
    """Stored tensors, aliases of tied tensors (alias -> stored name), user metadata, and the
    order of all names as given to ``seal``."""

    entries: dict[str, Entry]
    aliases: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.order:
            self.order = [*self.entries, *self.aliases]

    @property
    def names(self) -> list[str]:
        """Every loadable name (stored tensors and aliases) in the original order."""
        return list(self.order)

    def resolve(self, name: str) -> Entry:
        """The entry a (possibly aliased) name refers to; ``KeyError`` if unknown."""
        return self.entries[self.aliases.get(name, name)]

    @property
    def total_length(self) -> int:
        return max((e.end for e in self.entries.values() if e.nbytes), default=0)

    def to_json(self) -> bytes:
        items: list[dict[str, Any]] = []
        for name in self.order:
            if name in self.aliases:
                items.append({"name": name, "alias_of": self.aliases[name]})
            else:
                e = self.entries[name]
                items.append(
                    {"name": name, "dtype": e.dtype, "shape": list(e.shape), "offset": e.offset}
                )
        return canonical_json(
            {"format": INDEX_FORMAT, "tensors": items, "metadata": dict(self.metadata)}
        )

    def describe(self) -> dict[str, Any]:
        """JSON-safe listing for ``sealtorch inspect``."""
        return {
            "tensors": [
                {
                    "name": e.name,
                    "dtype": e.dtype,
                    "shape": list(e.shape),
                    "offset": e.offset,
                    "nbytes": e.nbytes,
                }
                for e in self.entries.values()
            ],
            "aliases": dict(self.aliases),
            "metadata": dict(self.metadata),
        }


def align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _bad(what: str) -> IndexError_:
    return IndexError_(f"tensor index is invalid: {what}")


_ENTRY_KEYS = frozenset({"name", "dtype", "shape", "offset"})
_ALIAS_KEYS = frozenset({"name", "alias_of"})
_ITEMSIZES = {name: itemsize(name) for name in NAME_TO_DTYPE}
_MAX_DIM = 2**62


def parse_index(data: bytes | bytearray | memoryview, total_length: int) -> Index:
    """Parse and validate an index against the header's total length (strict, no extras)."""
    try:
        doc = json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _bad("not JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"format", "tensors", "metadata"}:
        raise _bad("wrong top-level fields")
    if doc["format"] != INDEX_FORMAT:
        raise _bad("unknown index format")
    items, metadata = doc["tensors"], doc["metadata"]
    if not isinstance(items, list) or len(items) > MAX_TENSORS:
        raise _bad("tensors must be a list of at most 1,000,000 entries")
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad("metadata must map strings to strings")
    entries: dict[str, Entry] = {}
    aliases: dict[str, str] = {}
    order: list[str] = []
    # Hot path (ResNet-50 has 320 entries, parsed on every load): exact type checks (JSON gives
    # only dict/list/str/int/bool/float/None, and ``type(x) is int`` excludes bool), key-view
    # comparisons instead of building sets, and a UTF-8 length check only for long names.
    short_name = MAX_NAME_BYTES // 4  # at most 4 UTF-8 bytes per code point
    for item in items:
        if type(item) is not dict:
            raise _bad("a tensor entry is not an object")
        name = item.get("name")
        if (
            type(name) is not str
            or not name
            or (
                len(name) > short_name
                and len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES
            )
        ):
            raise _bad("a tensor name is empty, not a string or too long")
        if name in entries or name in aliases:
            raise _bad("a tensor name appears twice")
        order.append(name)
        keys = item.keys()
        if keys == _ALIAS_KEYS:
            if type(item["alias_of"]) is not str:
                raise _bad("an alias target is not a string")
            aliases[name] = item["alias_of"]
            continue
        if keys != _ENTRY_KEYS:
            raise _bad("a tensor entry has wrong fields")
        dtype, shape, offset = item["dtype"], item["shape"], item["offset"]
        if type(dtype) is not str or dtype not in _ITEMSIZES:
            raise _bad("a tensor has an unknown dtype")
        if type(shape) is not list or len(shape) > MAX_DIMS:
            raise _bad("a tensor has an invalid shape")
        for d in shape:
            if type(d) is not int or not 0 <= d < _MAX_DIM:
                raise _bad("a tensor has an invalid shape")
        if type(offset) is not int or offset < 0 or offset % ALIGNMENT:
            raise _bad("a tensor has an invalid or unaligned offset")
        nbytes = math.prod(shape) * _ITEMSIZES[dtype]
        entries[name] = Entry(name, dtype, tuple(shape), offset, nbytes)
    end = 0
    for e in sorted(entries.values(), key=lambda e: e.offset):
        if e.nbytes == 0:  # zero-size tensors own no bytes (the writer puts them at 0)
            if e.offset > total_length:
                raise _bad("a tensor offset is beyond the data")
            continue
        if e.offset < end:
            raise _bad("tensors overlap")
        end = e.end
    if end != total_length:  # no unaccounted plaintext bytes at the end
        raise _bad("tensor byte ranges do not match the header's total length")
    for target in aliases.values():
        if target not in entries:
            raise _bad("an alias does not name a stored tensor")
    return Index(entries, aliases, dict(metadata), order)
