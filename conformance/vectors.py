"""The conformance vectors of sealed format v1: valid files covering every feature, and files
that each break one reader rule of docs/format.md (all else correct, every MAC and tag valid
unless the rule is about it). Written with :mod:`builder`, from seeded RNGs only."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from builder import ITEMSIZE, Key, Layout, Recipe, Tensor, build, canonical
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SEED = "sealtorch-conformance-v1"


def rng(label: str) -> random.Random:
    """A generator of its own for each use, so adding a vector changes no other file."""
    return random.Random(f"{SEED}:{label}")


KEYS = {
    "model": Key("conformance/v1", 1, rng("key:model").randbytes(32)),
    "wrong": Key("conformance/v1", 1, rng("key:wrong").randbytes(32)),
    "other-model": Key("conformance/other", 1, rng("key:other-model").randbytes(32)),
    "longest-id": Key("conformance/" + "x" * 116, 1, rng("key:longest-id").randbytes(32)),
}
OWNER = Ed25519PrivateKey.from_private_bytes(rng("signer:owner").randbytes(32))
STRANGER = Ed25519PrivateKey.from_private_bytes(rng("signer:stranger").randbytes(32))


def tensor(name: str, dtype: str, shape: tuple[int, ...]) -> Tensor:
    n = ITEMSIZE[dtype]
    for d in shape:
        n *= d
    r = rng(f"tensor:{name}:{dtype}:{shape}")
    data = bytes(r.randrange(2) for _ in range(n)) if dtype == "BOOL" else r.randbytes(n)
    return Tensor(name, dtype, shape, data)


# The base file: 1416 stream bytes in 6 chunks of 256; padding 1298..1344 and 1357..1408
BASE = [
    tensor("embed.weight", "F32", (40, 8)),  # 0 .. 1280
    tensor("norm.bias", "F16", (9,)),  # 1280 .. 1298
    tensor("mask", "BOOL", (13,)),  # 1344 .. 1357
    tensor("steps", "I64", ()),  # 1408 .. 1416
    Tensor("head.weight", alias_of="embed.weight"),
    tensor("empty", "F32", (0, 3)),  # zero-size: offset 0
]


@dataclass
class Vector:
    slug: str
    comment: str
    recipe: Recipe
    flags: list[str]
    rule: str | None = None  # None: a valid file
    key: str = "model"
    signer: Ed25519PrivateKey | None = None  # a reader is asked to require this signer
    known: bool = True  # the manifest lists the tensors (the index is intact)
    extra: dict[str, Any] = field(default_factory=dict)


def base(**changes: Any) -> Recipe:
    return replace(Recipe(KEYS["model"], list(BASE)), **changes)


def entry(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(e for e in doc["tensors"] if e["name"] == name)


def edited(fn: Callable[[dict[str, Any]], object]) -> Callable[[dict[str, Any]], bytes]:
    """An index edit: ``fn`` changes the index object, which is then written canonically."""

    def make(doc: dict[str, Any]) -> bytes:
        fn(doc)
        return canonical(doc)

    return make


def text(old: bytes, new: bytes) -> Callable[[dict[str, Any]], bytes]:
    """An index edit on the canonical bytes: the first ``old`` becomes ``new``."""

    def make(doc: dict[str, Any]) -> bytes:
        data = canonical(doc)
        assert old in data, old
        return data.replace(old, new, 1)

    return make


def setting(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc.__setitem__(key, value)


def entry_set(which: str, **fields: Any) -> Callable[[dict[str, Any]], None]:
    """An index edit: set members of the entry named ``which``."""
    return lambda doc: entry(doc, which).update(fields)


def poke(offset: int, value: int) -> Callable[[bytearray], bytearray]:
    def make(stream: bytearray) -> bytearray:
        stream[offset] = value
        return stream

    return make


def flip(where: Callable[[Layout, int], int], mask: int = 0x01) -> Callable[..., bytearray]:
    """A finished-file edit: flip bits of the byte at ``where(layout, file length)``."""

    def make(data: bytearray, layout: Layout) -> bytearray:
        data[where(layout, len(data))] ^= mask
        return data

    return make


def cut(keep: Callable[[Layout, int], int]) -> Callable[..., bytearray]:
    return lambda data, layout: data[: keep(layout, len(data))]


def spliced(part: Callable[[Layout], tuple[int, int]], donor: str) -> Callable[..., bytearray]:
    """Replace a part with the same part of a file sealed alike (same key, other salt)."""

    def make(data: bytearray, layout: Layout) -> bytearray:
        other, _, _ = build(base(), rng(donor))
        a, b = part(layout)
        data[a:b] = other[a:b]
        return data

    return make


def chunk_range(i: int) -> Callable[[Layout], tuple[int, int]]:
    return lambda lay: (lay.chunk_offsets[i], lay.chunk_offsets[i] + lay.chunk_lengths[i])


def swap_chunks(data: bytearray, lay: Layout) -> bytearray:
    (a, n), b = (lay.chunk_offsets[0], lay.chunk_lengths[0]), lay.chunk_offsets[1]
    data[a : a + n], data[b : b + n] = data[b : b + n], data[a : a + n]
    return data


def valid_vectors() -> list[Vector]:
    every = [tensor(f"t.{d.lower()}", d, (2, 3)) for d in ITEMSIZE]
    by_size = [t.name for t in sorted(every, key=lambda t: -len(t.data))]
    zero_only = [
        tensor("a", "F32", (0,)),
        tensor("b", "I8", (2, 0, 5)),
        Tensor("c", alias_of="a"),
        tensor("d", "U8", (0, 2**53 - 1)),
    ]
    unicode = [
        tensor("caf\u00e9.weight", "F32", (3,)),
        tensor("emoji.\U0001f600", "I16", (2,)),
        tensor("line\u2028sep and space", "U8", (5,)),
        tensor("\u00e9" * 512, "I8", (1,)),  # the longest name: 1024 UTF-8 bytes
    ]
    meta = {"note": 'line 1\nline 2\t"quoted" back\\slash /', "\u043a\u043b\u044e\u0447": "\x7f"}
    return [
        Vector("base", "encrypted index, many chunks, an alias, a zero-size tensor, padding",
               base(), ["EncryptedIndex", "ManyChunks", "Aliases", "ZeroSize", "Padding"]),
        Vector("base-public-index", "the base file with a public index",
               base(public_index=True), ["PublicIndex", "ManyChunks", "Aliases"]),
        Vector("signed", "owner signature, and the reader requires that signer",
               base(signer=OWNER), ["Signed", "SignerRequired"], signer=OWNER),
        Vector("signed-public-index", "signed, public index; no signer required",
               base(signer=OWNER, public_index=True), ["Signed", "PublicIndex"]),
        Vector("one-chunk", "one partial chunk; the largest chunk size (2^30)",
               Recipe(KEYS["model"], [tensor("w", "F32", (3, 3))], chunk_size=1 << 30),
               ["OneChunk", "MaxChunkSize"]),
        Vector("full-last-chunk", "the stream is exactly two chunks: the last one is full",
               Recipe(KEYS["model"], [tensor("w", "U8", (512,))]), ["FullLastChunk"]),
        Vector("every-dtype", "one tensor of each of the 18 dtypes, largest first in the stream",
               Recipe(KEYS["model"], every, public_index=True, layout=by_size),
               ["EveryDtype", "LayoutOrder", "PublicIndex"]),
        Vector("empty-stream", "no tensors at all: total length 0, one empty chunk",
               Recipe(KEYS["model"], []), ["EmptyStream"]),
        Vector("zero-size-only", "only zero-size tensors (one of them aliased): an empty stream",
               Recipe(KEYS["model"], zero_only), ["EmptyStream", "ZeroSize", "Aliases"]),
        Vector("longest-header", "a 128-character model id: the largest header (274 bytes)",
               Recipe(KEYS["longest-id"], [tensor("w", "F16", (4,))]), ["LargestHeader"],
               key="longest-id"),
        Vector("unicode", "non-ASCII, space and U+2028 in names, the longest name (1024 "
               "UTF-8 bytes), escapes in metadata: canonical JSON escapes",
               Recipe(KEYS["model"], unicode, metadata=meta), ["Unicode", "LongestName"]),
        Vector("max-rank", "a tensor of rank 32",
               Recipe(KEYS["model"], [tensor("r", "F32", (1,) * 32)], public_index=True),
               ["MaxRank"]),
    ]  # fmt: skip


def _rest_of_header(layout: Layout, n: int) -> int:
    return layout.header_length - 1


def invalid_vectors() -> list[Vector]:
    v = Vector
    last = lambda lay, n: n - 1  # noqa: E731
    embed0 = b'"name":"embed.weight","offset":0,'
    alias_of_alias = lambda d: d["tensors"].append({"alias_of": "head.weight", "name": "tail"})  # noqa: E731
    return [
        # R-1 .. R-14: the header, before any key is used
        v("bad-magic", "first magic byte changed", base(finish=flip(lambda lay, n: 0, 0x20)),
          ["BadMagic"], "R-1", known=False),
        v("empty-file", "zero bytes", base(finish=cut(lambda lay, n: 0)), ["BadMagic"], "R-1",
          known=False),
        v("eleven-bytes", "the file ends before the header length field is complete",
          base(finish=cut(lambda lay, n: 11)), ["Truncation"], "R-2", known=False),
        v("version-2", "format version 2", base(header={"version": 2}),
          ["UnsupportedVersion"], "R-3"),
        v("version-0", "format version 0", base(header={"version": 0}),
          ["UnsupportedVersion"], "R-3"),
        v("header-length-146", "header length below the least (147)",
          base(header={"header_length": 146}), ["MalformedHeader"], "R-4"),
        v("header-length-275", "header length above the most (274)",
          base(header={"header_length": 275}), ["MalformedHeader"], "R-4"),
        v("ends-inside-header", "the file ends inside the header",
          base(finish=cut(lambda lay, n: 100)), ["Truncation"], "R-5", known=False),
        v("cipher-2", "cipher 2", base(header={"cipher": 2}), ["UnsupportedVersion"], "R-6"),
        v("unknown-flag", "flag bit 0x0004 set", base(header={"flags": 4}),
          ["UnsupportedVersion"], "R-7"),
        v("model-id-length-mismatch", "model id length field one less than H - 146",
          base(header={"model_id_length": 13}), ["MalformedHeader"], "R-8"),
        v("chunk-size-255", "chunk size one below the least", base(header={"chunk_size": 255}),
          ["MalformedHeader"], "R-9"),
        v("chunk-size-over-2^30", "chunk size one above the most",
          base(header={"chunk_size": (1 << 30) + 1}), ["MalformedHeader"], "R-9"),
        v("key-version-0", "key version 0", base(header={"key_version": 0}),
          ["MalformedHeader"], "R-10"),
        v("total-length-over-2^50", "total length 2^50 + 256 (chunk count consistent)",
          base(header={"total_length": 2**50 + 256, "chunk_count": 2**42 + 1}),
          ["MalformedHeader"], "R-11"),
        v("chunk-count-plus-one", "chunk count one more than the total length needs",
          base(header={"chunk_count": 7}), ["MalformedHeader"], "R-12"),
        v("chunk-count-zero", "an empty stream with chunk count 0 (it has one empty chunk)",
          Recipe(KEYS["model"], [], header={"chunk_count": 0}), ["MalformedHeader"], "R-12"),
        v("index-length-over-64MiB", "index length 64 MiB + 1",
          base(header={"index_length": (64 << 20) + 1}), ["MalformedHeader"], "R-13"),
        v("index-length-28", "an encrypted index section of 28 bytes: no room for the index",
          base(header={"index_length": 28}), ["MalformedHeader"], "R-13"),
        v("index-length-32-public", "a public index section of 32 bytes: only its MAC",
          base(public_index=True, header={"index_length": 32}), ["MalformedHeader"], "R-13"),
        v("model-id-dot-dot", "model id with a '..' path segment",
          base(model_id=b"conformance/../v1"), ["MalformedHeader"], "R-14"),
        v("model-id-non-ascii", "model id with a non-ASCII byte",
          base(model_id="conformance/v\u00e9".encode()), ["MalformedHeader"], "R-14"),
        # R-15 .. R-19: the key, the header MAC, the file length
        v("key-for-other-model", "the key file names another model id", base(),
          ["KeyMismatch"], "R-15", key="other-model"),
        v("wrong-key", "a key file for the same model id and key version, another key",
          base(), ["WrongKey"], "R-16", key="wrong"),
        v("salt-modified", "a salt byte changed: the derived key differs, reported as wrong key",
          base(finish=flip(lambda lay, n: 48)), ["WrongKey", "ModifiedHeader"], "R-16"),
        v("header-mac-modified", "the last header MAC byte changed",
          base(finish=flip(_rest_of_header)), ["ModifiedHeader"], "R-17"),
        v("total-length-modified", "total length 1416 -> 1400 after sealing (same chunk count)",
          base(finish=flip(lambda lay, n: 39, 0xF0)), ["ModifiedHeader"], "R-17"),
        v("truncated-one-byte", "the last byte is missing", base(finish=cut(lambda lay, n: n - 1)),
          ["Truncation"], "R-18"),
        v("last-chunk-removed", "the last chunk is missing",
          base(finish=cut(lambda lay, n: lay.chunk_offsets[-1])), ["Truncation"], "R-18"),
        v("signature-stripped", "signed flag set, signature trailer removed",
          base(signer=OWNER, finish=cut(lambda lay, n: n - 96)), ["Truncation"], "R-18"),
        v("trailing-byte", "one byte appended",
          base(finish=lambda d, lay: d + b"\x00"), ["TrailingData"], "R-19"),
        v("last-chunk-repeated", "the last chunk appended again",
          base(finish=lambda d, lay: d + d[lay.chunk_offsets[-1]:]), ["TrailingData"], "R-19"),
        # R-20 .. R-36: the tensor index
        v("index-ciphertext-modified", "a byte of the encrypted index changed",
          base(finish=flip(lambda lay, n: lay.header_length + 40)), ["ModifiedIndex"], "R-20"),
        v("public-index-modified", "a public index byte changed, its MAC not updated",
          base(public_index=True, finish=flip(lambda lay, n: lay.header_length + 100)),
          ["ModifiedIndex"], "R-20"),
        v("index-spliced", "the index section of a file sealed alike (same key, other salt)",
          base(finish=spliced(lambda lay: (lay.header_length,
                                           lay.header_length + lay.index_length), "donor")),
          ["ModifiedIndex", "Splicing"], "R-20"),
        v("index-not-json", "the index lacks its closing brace",
          base(index_json=lambda d: canonical(d)[:-1]), ["MalformedIndex"], "R-21", known=False),
        v("index-trailing-text", "a second value after the index object",
          base(index_json=lambda d: canonical(d) + b"0"), ["MalformedIndex"], "R-21", known=False),
        v("index-nan", "NaN as an offset (not JSON)",
          base(index_json=text(embed0, b'"name":"embed.weight","offset":NaN,')),
          ["MalformedIndex"], "R-21", known=False),
        v("index-invalid-utf8", "a metadata value with the byte 0xFF",
          base(metadata={"k": "v"}, index_json=text(b'"k":"v"', b'"k":"\xff"')),
          ["MalformedIndex"], "R-21", known=False),
        v("duplicate-tensors-key", "'tensors' twice; a reader keeping the last one would load "
          "embed.weight as [8, 40]",
          base(index_json=lambda d: canonical(d)[:-1] + b',"tensors":' + canonical(
              [{**t, "shape": [8, 40]} if t["name"] == "embed.weight" else t for t in d["tensors"]]
          ) + b"}"), ["DuplicateKey"], "R-22", known=False),
        v("duplicate-entry-key", "'name' twice in one entry",
          base(index_json=text(b'"name":"embed.weight"', b'"name":"embed.weight","name":"x"')),
          ["DuplicateKey"], "R-22", known=False),
        v("duplicate-metadata-key", "a metadata name twice",
          base(metadata={"k": "v"}, index_json=text(b'"k":"v"', b'"k":"v","k":"w"')),
          ["DuplicateKey"], "R-22", known=False),
        v("whitespace", "the index written with spaces after ':' and ','",
          base(index_json=lambda d: json.dumps(d, sort_keys=True).encode()),
          ["NonCanonicalJson"], "R-23", known=False),
        v("unsorted-keys", "entry members in the order name, dtype, shape, offset",
          base(index_json=lambda d: json.dumps(
              {**d, "tensors": [dict(reversed(list(t.items()))) for t in d["tensors"]]},
              separators=(",", ":")).encode()),
          ["NonCanonicalJson"], "R-23", known=False),
        v("fraction", "offset written 0.0", base(index_json=text(embed0, embed0[:-1] + b".0,")),
          ["NonCanonicalJson"], "R-23", known=False),
        v("exponent", "a dimension written 4e1",
          base(index_json=text(b'"shape":[40,8]', b'"shape":[4e1,8]')),
          ["NonCanonicalJson"], "R-23", known=False),
        v("minus-zero", "offset written -0",
          base(index_json=text(embed0, b'"name":"embed.weight","offset":-0,')),
          ["NonCanonicalJson"], "R-23", known=False),
        v("needless-escape", "'e' written \\u0065 in a name",
          base(index_json=text(b'"embed.weight"', b'"\\u0065mbed.weight"')),
          ["NonCanonicalJson"], "R-23", known=False),
        v("escaped-slash", "'/' written \\/ in metadata",
          base(metadata={"k": "a/b"}, index_json=text(b"a/b", b"a\\/b")),
          ["NonCanonicalJson"], "R-23", known=False),
        v("uppercase-escape", "\\u00E9 instead of \\u00e9",
          base(metadata={"k": "\u00e9"}, index_json=text(b"\\u00e9", b"\\u00E9")),
          ["NonCanonicalJson"], "R-23", known=False),
        v("raw-utf8", "a non-ASCII character as raw UTF-8 instead of an escape",
          base(metadata={"k": "\u00e9"}, index_json=text(b"\\u00e9", "\u00e9".encode())),
          ["NonCanonicalJson"], "R-23", known=False),
        v("short-escape-spelled-long", "a newline written \\u000a instead of \\n",
          base(metadata={"k": "\n"}, index_json=text(b"\\n", b"\\u000a")),
          ["NonCanonicalJson"], "R-23", known=False),
        v("byte-order-mark", "a UTF-8 byte order mark before the index",
          base(index_json=lambda d: b"\xef\xbb\xbf" + canonical(d)),
          ["NonCanonicalJson"], "R-23", known=False),
        v("unknown-top-level-member", "a member 'version' next to format, metadata, tensors",
          base(index_json=edited(setting("version", 1))), ["IndexSchema"], "R-24", known=False),
        v("missing-metadata", "no metadata member",
          base(index_json=edited(lambda d: d.pop("metadata"))),
          ["IndexSchema"], "R-24", known=False),
        v("index-is-array", "the index is a list",
          base(index_json=lambda d: canonical([d])), ["IndexSchema"], "R-24", known=False),
        v("index-format-v2", "format sealtorch-index/v2",
          base(index_json=edited(setting("format", "sealtorch-index/v2"))),
          ["IndexSchema", "UnsupportedVersion"], "R-25", known=False),
        v("metadata-number", "a metadata value that is a number",
          base(index_json=edited(setting("metadata", {"k": 1}))),
          ["IndexSchema"], "R-26", known=False),
        v("metadata-list", "metadata is a list",
          base(index_json=edited(setting("metadata", []))), ["IndexSchema"], "R-26", known=False),
        v("metadata-lone-surrogate", "a metadata value holding a lone surrogate (\\udc00)",
          base(index_json=edited(setting("metadata", {"k": "\udc00"}))),
          ["IndexSchema", "Unicode"], "R-26", known=False),
        v("entry-extra-member", "an entry with a member 'extra'",
          base(index_json=edited(entry_set("mask", extra=1))),
          ["IndexSchema"], "R-27", known=False),
        v("entry-missing-offset", "an entry without offset",
          base(index_json=edited(lambda d: entry(d, "mask").pop("offset"))),
          ["IndexSchema"], "R-27", known=False),
        v("tensors-object", "tensors is an object",
          base(index_json=edited(setting("tensors", {}))), ["IndexSchema"], "R-27", known=False),
        v("entry-string", "an entry that is a string",
          base(index_json=edited(lambda d: d["tensors"].append("mask"))), ["IndexSchema"], "R-27",
          known=False),
        v("empty-name", "an empty name", base(index_json=edited(entry_set("norm.bias", name=""))),
          ["IndexSchema"], "R-28", known=False),
        v("name-control-character", "a name with U+0001",
          base(index_json=edited(entry_set("norm.bias", name="norm\u0001bias"))),
          ["IndexSchema", "Unicode"], "R-28", known=False),
        v("name-c1-control", "a name with U+0085",
          base(index_json=edited(entry_set("norm.bias", name="norm\u0085bias"))),
          ["IndexSchema", "Unicode"], "R-28", known=False),
        v("name-lone-surrogate", "a name with a lone surrogate (\\ud800)",
          base(index_json=edited(entry_set("norm.bias", name="n\ud800"))),
          ["IndexSchema", "Unicode"], "R-28", known=False),
        v("name-1025-bytes", "a name of 1023 'a' and one 'é': 1024 characters, 1025 UTF-8 bytes",
          base(index_json=edited(entry_set("norm.bias", name="a" * 1023 + "\u00e9"))),
          ["IndexSchema", "Unicode"], "R-28", known=False),
        v("name-number", "a name that is a number",
          base(index_json=edited(entry_set("norm.bias", name=5))),
          ["IndexSchema"], "R-28", known=False),
        v("duplicate-name", "an alias with the name of a stored tensor",
          base(index_json=edited(lambda d: d["tensors"].append(
              {"alias_of": "embed.weight", "name": "norm.bias"}))), ["IndexSchema"], "R-29",
          known=False),
        v("unknown-dtype", "dtype F128",
          base(index_json=edited(entry_set("norm.bias", dtype="F128"))),
          ["IndexSchema"], "R-30", known=False),
        v("lowercase-dtype", "dtype f16",
          base(index_json=edited(entry_set("norm.bias", dtype="f16"))),
          ["IndexSchema"], "R-30", known=False),
        v("rank-33", "a shape of 33 dimensions (all 1)",
          base(index_json=edited(entry_set("steps", shape=[1] * 33))), ["IndexSchema"], "R-31",
          known=False),
        v("negative-dimension", "a zero-size tensor of shape [-3, 0]",
          base(index_json=edited(entry_set("empty", shape=[-3, 0]))), ["IndexSchema"], "R-31",
          known=False),
        v("dimension-2^53", "a zero-size tensor of shape [0, 2^53]",
          base(index_json=edited(entry_set("empty", shape=[0, 2**53]))), ["IndexSchema"], "R-31",
          known=False),
        v("dimension-true", "a dimension that is true",
          base(index_json=edited(entry_set("empty", shape=[0, True]))), ["IndexSchema"], "R-31",
          known=False),
        v("offset-unaligned", "norm.bias at 1288, not a multiple of 64",
          base(index_json=edited(entry_set("norm.bias", offset=1288))), ["Layout"], "R-32",
          known=False),
        v("offset-negative", "norm.bias at -64",
          base(index_json=edited(entry_set("norm.bias", offset=-64))), ["Layout"], "R-32",
          known=False),
        v("offset-string", "an offset that is a string",
          base(index_json=edited(entry_set("embed.weight", offset="0"))), ["Layout"], "R-32",
          known=False),
        v("zero-size-at-64", "a zero-size tensor at offset 64",
          base(index_json=edited(entry_set("empty", offset=64))), ["Layout"], "R-33", known=False),
        v("overlap", "norm.bias at 1216, inside embed.weight",
          base(index_json=edited(entry_set("norm.bias", offset=1216))), ["Layout"], "R-34",
          known=False),
        v("gap", "64 more zero bytes before mask (mask and steps moved, total length to match)",
          base(stream=lambda s: s[:1344] + bytes(64) + s[1344:],
               index_json=edited(lambda d: (entry_set("mask", offset=1408)(d),
                                            entry_set("steps", offset=1472)(d)))),
          ["Layout"], "R-34", known=False),
        v("first-at-64", "the first tensor at 64, zero bytes before it",
          base(stream=lambda s: bytes(64) + s, index_json=edited(lambda d: [
              e.update(offset=e["offset"] + 64) for e in d["tensors"]
              if "offset" in e and e["name"] != "empty"])),
          ["Layout"], "R-34", known=False),
        v("stream-longer", "64 zero bytes after the last tensor (header total length 1480)",
          base(stream=lambda s: s + bytes(64)), ["Layout"], "R-35", known=False),
        v("stream-shorter", "the last tensor ends 8 bytes past the total length (1408)",
          base(stream=lambda s: s[:-8]), ["Layout"], "R-35", known=False),
        v("alias-of-alias", "an alias of the alias head.weight",
          base(index_json=edited(alias_of_alias)), ["IndexSchema", "Aliases"], "R-36", known=False),
        v("alias-of-itself", "head.weight is an alias of head.weight",
          base(index_json=edited(entry_set("head.weight", alias_of="head.weight"))),
          ["IndexSchema", "Aliases"], "R-36", known=False),
        v("alias-of-missing", "an alias of a name the index does not have",
          base(index_json=edited(entry_set("head.weight", alias_of="nothing"))),
          ["IndexSchema", "Aliases"], "R-36", known=False),
        v("alias-target-number", "alias_of is a number",
          base(index_json=edited(entry_set("head.weight", alias_of=7))), ["IndexSchema", "Aliases"],
          "R-36", known=False),
        # R-37 .. R-39: the owner signature
        v("unsigned-signer-required", "an unsigned file; the reader requires a signer", base(),
          ["MissingSignature"], "R-37", signer=OWNER),
        v("foreign-signer", "signed by another key than the required signer",
          base(signer=STRANGER), ["ForeignSigner"], "R-38", signer=OWNER),
        v("signature-modified", "the last signature byte changed",
          base(signer=OWNER, finish=flip(last)), ["ModifiedSignature"], "R-39"),
        v("trailer-key-replaced", "the trailer names another public key than the signer's",
          base(signer=OWNER, trailer_public=STRANGER.public_key().public_bytes_raw()),
          ["ModifiedSignature"], "R-39"),
        v("trailer-key-not-a-point", "the trailer's public key is 32 bytes of 0xFF",
          base(signer=OWNER, trailer_public=b"\xff" * 32), ["ModifiedSignature"], "R-39"),
        v("signature-without-tags", "the signature leaves out the chunk tags digest",
          base(signer=OWNER, signed_message=lambda m: m[:-32]), ["ModifiedSignature"], "R-39"),
        v("signature-over-other-file", "the signature of a file sealed alike (other salt)",
          base(signer=OWNER, finish=lambda d, lay: d[:-64] + build(base(signer=OWNER),
                                                                    rng("donor"))[0][-64:]),
          ["ModifiedSignature", "Splicing"], "R-39"),
        # R-40 .. R-42: chunks and the bytes they hold
        v("chunk-modified", "a ciphertext byte of chunk 2 changed",
          base(finish=flip(lambda lay, n: lay.chunk_offsets[2] + 10)), ["ChunkTampering"], "R-40"),
        v("tag-modified", "a tag byte of chunk 3 changed",
          base(finish=flip(lambda lay, n: lay.chunk_offsets[4] - 1)), ["ChunkTampering"], "R-40"),
        v("chunks-swapped", "chunks 0 and 1 swapped", base(finish=swap_chunks),
          ["ChunkReordering"], "R-40"),
        v("chunk-spliced", "chunk 1 of a file sealed alike (same key, other salt)",
          base(finish=spliced(chunk_range(1), "donor")), ["ChunkSplicing", "Splicing"], "R-40"),
        v("nonce-off-by-one", "every chunk encrypted with nonce index i + 1",
          base(chunk_nonce=lambda i: i + 1), ["ChunkReordering"], "R-40"),
        v("early-last-flag", "chunk 0 encrypted as the last chunk", base(last_flags={0: 1}),
          ["LastChunkFlag"], "R-40"),
        v("missing-last-flag", "the last chunk encrypted as not the last", base(last_flags={5: 0}),
          ["LastChunkFlag", "Truncation"], "R-40"),
        v("truncated-at-chunk-boundary", "header and index rebuilt for the first 5 chunks only: "
          "chunk 4 was not sealed as the last",
          Recipe(KEYS["model"], [BASE[0]], last_flags={4: 0}), ["Truncation", "LastChunkFlag"],
          "R-40"),
        v("empty-stream-tag-modified", "the tag of an empty stream's only chunk changed",
          Recipe(KEYS["model"], [], finish=flip(last)), ["ChunkTampering", "EmptyStream"], "R-40"),
        v("nonzero-padding", "a padding byte after norm.bias (stream offset 1300) is 1",
          base(stream=poke(1300, 1)), ["NonzeroPadding"], "R-41"),
        v("nonzero-padding-before-last", "the padding byte before steps (1407) is 0x80",
          base(stream=poke(1407, 0x80)), ["NonzeroPadding"], "R-41"),
        v("bool-2", "a BOOL byte of mask is 2", base(stream=poke(1347, 2)), ["InvalidBool"],
          "R-42"),
        v("bool-ff", "the last BOOL byte of mask is 0xFF", base(stream=poke(1356, 0xFF)),
          ["InvalidBool"], "R-42"),
        v("bool-2-large-mask", "a BOOL tensor over three chunks; its byte 400 is 2",
          Recipe(KEYS["model"], [tensor("big_mask", "BOOL", (600,))], stream=poke(400, 2)),
          ["InvalidBool"], "R-42"),
    ]  # fmt: skip
