"""The tensor index: names, dtypes, shapes and stream offsets of every stored tensor.

Encoded as canonical JSON; encrypted with the index key by default, or public (authenticated by
an HMAC) with ``public_index=True``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, NamedTuple, NoReturn

from sealtorch.errors import IndexError_
from sealtorch.format import rules
from sealtorch.format.dtypes import NAME_TO_DTYPE, itemsize
from sealtorch.format.rules import StreamChecks
from sealtorch.protocol.canonical import canonical_json

INDEX_FORMAT = "sealtorch-index/v1"
ALIGNMENT = 64
MAX_NAME_BYTES = 1024
MAX_DIMS = 32
MAX_TENSORS = 1_000_000
#: largest dimension and offset: every integer in an index is exact in an IEEE double
MAX_INT = 2**53 - 1
#: what a valid tensor name looks like, for error messages
NAME_RULE = (
    f"1-{MAX_NAME_BYTES} UTF-8 bytes of Unicode scalar values, none of them a control "
    "character (U+0000-U+001F, U+007F-U+009F)"
)


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
    #: the bytes R-41/R-42 apply to (padding, BOOL tensors); set by :func:`parse_index`
    checks: StreamChecks = field(default_factory=lambda: StreamChecks([]))

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


_TOP_KEYS = frozenset({"format", "metadata", "tensors"})
_ITEMSIZES = {name: itemsize(name) for name in NAME_TO_DTYPE}
#: characters a name must not hold: controls, and lone surrogates (JSON can spell them)
_BAD_NAME_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_OFFSET = itemgetter(3)
_new_tuple = tuple.__new__


def _bad(rule: rules.Rule, what: str) -> Exception:
    return rule.fail(f"tensor index is invalid: {what}")


class _Marks:
    """What the strict parse saw: a member name twice (R-22), a non-integer number (R-23)."""

    def __init__(self) -> None:
        self.duplicate = False
        self.fraction = False

    def pairs(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        self.duplicate |= len(obj) != len(pairs)
        return obj

    def number(self, text: str) -> float:
        self.fraction = True
        return float(text)


def _no_constant(text: str) -> NoReturn:
    raise ValueError("NaN and Infinity are not JSON")


def require_canonical(data: bytes) -> Any:
    """Parse ``data`` as canonical JSON or raise (R-21, R-22, R-23, in that order).

    The reference check: one parse that notes duplicate names and fractions, then one
    re-encoding compared with the input. Duplicate names alone would already make the
    re-encoding differ (it holds each name once); they are reported as such.
    """
    marks = _Marks()
    try:
        doc = json.loads(
            data,
            object_pairs_hook=marks.pairs,
            parse_float=marks.number,
            parse_constant=_no_constant,
        )
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
        raise _bad(rules.INDEX_JSON, "not JSON") from None
    if marks.duplicate:
        raise _bad(rules.INDEX_DUPLICATE_KEY, "an object has a member name twice")
    try:
        same = not marks.fraction and canonical_json(doc) == data
    except (ValueError, RecursionError):
        same = False
    if not same:
        raise _bad(
            rules.INDEX_CANONICAL,
            "not canonical JSON (sorted keys, no whitespace, ASCII escapes, integers only)",
        )
    return doc


_TOP_ORDER = ("format", "metadata", "tensors")
#: how every valid canonical index starts ("format" sorts first; its value is fixed)
_PREFIX = canonical_json({"format": INDEX_FORMAT})[:-1] + b","
_ENTRY_ORDER = ("dtype", "name", "offset", "shape")
_ALIAS_ORDER = ("alias_of", "name")


def _plainly_canonical(data: bytes, doc: Any) -> bool:
    """A cheap sufficient test that an index which then passes :func:`_validate` (so it holds
    only the objects the schema allows, their names in sorted order) is canonical JSON.

    Without a backslash, a DEL, NUL (UTF-16 or UTF-32 text) or whitespace byte, with only ASCII
    bytes and the fixed start of a valid index, every string is spelled as canonical JSON spells
    it and no separator has whitespace; without ``:-``, ``[-``
    or ``,-`` no number is negative (so none is ``-0``); and as many ``:`` bytes as members
    found proves that no object has a name twice (each member has one ``:``, a duplicate
    would be a member more than found, and a ``:`` in a string only adds to the count).
    Anything else goes to :func:`require_canonical` (one re-encoding, which costs about as
    much as the parse again). Two-byte searches are slow, so they run only when needed.
    """
    if (
        not data.isascii()
        or b"\\" in data
        or b"\x7f" in data
        or b"\x00" in data
        or b" " in data
        or b"\n" in data
        or b"\r" in data
        or b"\t" in data
        or not data.startswith(_PREFIX)
        or (
            data.find(b"-", len(_PREFIX)) >= 0 and (b":-" in data or b"[-" in data or b",-" in data)
        )
        or type(doc) is not dict
        or tuple(doc) != _TOP_ORDER
        or type(doc["metadata"]) is not dict
        or type(doc["tensors"]) is not list
    ):
        return False
    metadata, items = doc["metadata"], doc["tensors"]
    names = list(metadata)
    if names != sorted(names):
        return False
    try:
        members = len(_TOP_ORDER) + len(names) + sum(map(len, items))
    except TypeError:  # an item without a length: not a valid index anyway
        return False
    return data.count(b":") == members


def parse_index(data: bytes | bytearray | memoryview, total_length: int) -> Index:
    """Parse and validate an index against the header's total length (R-21 .. R-36).

    R-21 .. R-23 always come first: an index that is not canonical JSON is reported as such
    even when it also breaks a later rule.
    """
    data = bytes(data)
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise _bad(rules.INDEX_JSON, "not JSON") from None
    plain = _plainly_canonical(data, doc)
    if not plain:
        doc = require_canonical(data)
    try:
        return _validate(doc, data, total_length)
    except IndexError_:
        if plain:  # the cheap test assumed a valid schema: confirm R-21 .. R-23 first
            require_canonical(data)
        raise


def _validate(doc: Any, data: bytes, total_length: int) -> Index:
    """R-24 .. R-36 on a parsed canonical index (see :func:`parse_index`)."""
    escapes = b"\\" in data
    if type(doc) is not dict or doc.keys() != _TOP_KEYS:
        raise _bad(rules.INDEX_FIELDS, "the top level must have exactly format, metadata, tensors")
    if doc["format"] != INDEX_FORMAT:
        raise _bad(rules.INDEX_FORMAT, f"unknown index format (this release reads {INDEX_FORMAT})")
    items, metadata = doc["tensors"], doc["metadata"]
    if type(metadata) is not dict or not all(type(v) is str for v in metadata.values()):
        raise _bad(rules.METADATA, "metadata must map strings to strings")
    if escapes and any(_SURROGATE.search(s) for kv in metadata.items() for s in kv):
        raise _bad(rules.METADATA, "a metadata string holds a lone surrogate")
    if type(items) is not list or len(items) > MAX_TENSORS:
        raise _bad(rules.TENSOR_ENTRIES, f"tensors must be a list of at most {MAX_TENSORS:,}")
    entries: dict[str, Entry] = {}
    aliases: dict[str, str] = {}
    order: list[str] = []
    # Hot path (ResNet-50 has 320 entries, parsed on every load): exact type checks (JSON gives
    # only dict/list/str/int/bool/None here, and ``type(x) is int`` excludes bool), key-view
    # comparisons instead of building sets, and a UTF-8 length check only for long names.
    short_name = MAX_NAME_BYTES // 4  # at most 4 UTF-8 bytes per code point
    for item in items:
        if type(item) is not dict:
            raise _bad(rules.TENSOR_ENTRIES, "a tensor entry is not an object")
        keys = tuple(item)  # in the order given: canonical JSON sorts them
        is_alias = keys == _ALIAS_ORDER
        if not is_alias and keys != _ENTRY_ORDER:
            raise _bad(rules.TENSOR_ENTRIES, "a tensor entry has wrong fields")
        name = item["name"]
        if (
            type(name) is not str
            or not name
            or (escapes and _BAD_NAME_CHAR.search(name) is not None)
            or (len(name) > short_name and len(name.encode("utf-8")) > MAX_NAME_BYTES)
        ):
            raise _bad(rules.NAME, f"a tensor name is not {NAME_RULE}")
        if name in entries or name in aliases:
            raise _bad(rules.NAME_UNIQUE, "a tensor name appears twice")
        order.append(name)
        if is_alias:
            if type(item["alias_of"]) is not str:
                raise _bad(rules.ALIAS_TARGET, "an alias target is not a string")
            aliases[name] = item["alias_of"]
            continue
        dtype, shape, offset = item["dtype"], item["shape"], item["offset"]
        if type(dtype) is not str or dtype not in _ITEMSIZES:
            raise _bad(rules.DTYPE, "a tensor has an unknown dtype")
        if type(shape) is not list or len(shape) > MAX_DIMS:
            raise _bad(rules.SHAPE, f"a tensor shape is not a list of at most {MAX_DIMS} dims")
        for d in shape:
            if type(d) is not int or not 0 <= d <= MAX_INT:
                raise _bad(rules.SHAPE, "a tensor dimension is not an integer in 0 .. 2^53-1")
        if type(offset) is not int or not 0 <= offset <= MAX_INT or offset % ALIGNMENT:
            raise _bad(rules.OFFSET, "a tensor offset is not an integer multiple of 64")
        nbytes = math.prod(shape) * _ITEMSIZES[dtype]
        if offset and not nbytes:
            raise _bad(rules.EMPTY_OFFSET, "a zero-size tensor has a nonzero offset")
        # tuple.__new__ skips the named tuple's Python-level __new__: half the cost per entry
        entries[name] = _new_tuple(Entry, (name, dtype, tuple(shape), offset, nbytes))
    # in offset order each non-empty tensor starts where the previous one ends,
    # rounded up to 64 bytes, and the last one ends the stream; what lies between is padding
    checks: list[tuple[int, int, bool]] = []
    end = 0
    for e in sorted(entries.values(), key=_OFFSET):
        nbytes = e.nbytes
        if not nbytes:
            continue
        start = (end + ALIGNMENT - 1) & -ALIGNMENT
        if e.offset != start:
            raise _bad(rules.PACKING, "a tensor is not at the end of the previous one")
        if start != end:
            checks.append((end, start, False))
        end = start + nbytes
        if e.dtype == "BOOL":
            checks.append((start, end, True))
    if end != total_length:
        raise _bad(rules.STREAM_END, "the tensors do not end where the header's total length does")
    for target in aliases.values():
        if target not in entries:
            raise _bad(rules.ALIAS_TARGET, "an alias does not name a stored tensor")
    return Index(entries, aliases, dict(metadata), order, StreamChecks(checks))
