"""Write the sealed format v1 conformance corpus: key files, vectors and manifest.json.

    python conformance/generate.py            # rewrites conformance/v1
    python conformance/generate.py --out DIR  # writes elsewhere (the tests compare the two)

Needs only `cryptography`. Every random byte comes from RNGs seeded by name (see
``vectors.rng``), and Ed25519 signatures are deterministic, so the output is the same byte
for byte on every run and machine. The error code each invalid vector expects is read from
the reader rules table of docs/format.md, the one place that defines it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from builder import build, key_file
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from vectors import KEYS, SEED, Vector, invalid_vectors, rng, valid_vectors

HERE = Path(__file__).resolve().parent
SPEC = HERE.parent / "docs" / "format.md"
CREATED = "2026-01-01T00:00:00Z"
#: one row of the reader rules table: | R-n | stage | check | `code` |
RULE_ROW = re.compile(r"^\| (R-\d+) \| [^|]+ \| [^|]+ \| `([a-z_]+)` \|$", re.MULTILINE)

NOTES = {
    "EncryptedIndex": "valid: the tensor index is encrypted (default)",
    "PublicIndex": "valid: the tensor index is public, authenticated by an HMAC",
    "Signed": "valid: an owner signature trailer",
    "SignerRequired": "valid: the reader is asked to require the file's signer",
    "Aliases": "aliases (tied tensors stored once)",
    "ZeroSize": "valid: zero-size tensors (offset 0, no bytes)",
    "Padding": "valid: zero padding between tensors",
    "OneChunk": "valid: one chunk",
    "ManyChunks": "valid: several chunks, tensors across chunk boundaries",
    "FullLastChunk": "valid: the last chunk is full",
    "MaxChunkSize": "valid: the largest chunk size",
    "EveryDtype": "valid: every dtype",
    "LayoutOrder": "valid: stream order differs from index order",
    "EmptyStream": "an empty stream (total length 0, one empty chunk)",
    "LargestHeader": "valid: the longest model id",
    "LongestName": "valid: a tensor name of the most UTF-8 bytes",
    "MaxRank": "valid: a tensor of the highest rank",
    "Unicode": "non-ASCII text and escapes in the index",
    "BadMagic": "not a sealed file",
    "Truncation": "the file, or the stream, was cut short",
    "TrailingData": "bytes after the end of the file",
    "UnsupportedVersion": "a version, cipher or flag this format version does not define",
    "MalformedHeader": "a header field out of range or inconsistent",
    "ModifiedHeader": "a header byte changed after sealing",
    "WrongKey": "the key does not open the file",
    "KeyMismatch": "the key file is for another model id or key version",
    "ModifiedIndex": "the index section changed after sealing",
    "Splicing": "a part taken from another file sealed with the same key",
    "MalformedIndex": "an authenticated index that is not JSON",
    "DuplicateKey": "an object with a member name twice: readers would disagree on its value",
    "NonCanonicalJson": "JSON that is not in canonical form",
    "IndexSchema": "an index that breaks the index schema",
    "Layout": "tensor byte ranges that break the stream layout",
    "MissingSignature": "no signature where one is required",
    "ForeignSigner": "a signature by another key than the required one",
    "ModifiedSignature": "a signature that does not verify",
    "ChunkTampering": "a chunk byte changed",
    "ChunkReordering": "chunks out of order",
    "ChunkSplicing": "a chunk from another file sealed with the same key",
    "LastChunkFlag": "the last-chunk flag on the wrong chunk",
    "NonzeroPadding": "authenticated padding that is not zero",
    "InvalidBool": "an authenticated BOOL byte that is not 0 or 1",
}


def spec_rules(spec: Path = SPEC) -> dict[str, str]:
    """Rule id -> error code, from the reader rules table of docs/format.md."""
    rules = dict(RULE_ROW.findall(spec.read_text(encoding="utf-8")))
    if not rules:
        raise SystemExit(f"{spec}: no reader rules table found")
    return rules


def _public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes_raw().hex()


def _test(tc_id: int, vec: Vector, path: str, data: bytes, codes: dict[str, str]) -> dict[str, Any]:
    t: dict[str, Any] = {"tcId": tc_id, "comment": vec.comment, "file": path}
    t["sha256"] = hashlib.sha256(data).hexdigest()
    t["key"] = f"keys/{vec.key}.key"
    if vec.signer is not None:
        t["signer"] = _public_hex(vec.signer)
    if vec.rule is None:
        t.update(result="valid", expect="ok")
    else:
        if vec.rule not in codes:
            raise SystemExit(f"vector {vec.slug}: rule {vec.rule} is not in {SPEC}")
        t.update(result="invalid", expect=codes[vec.rule], rule=vec.rule)
    t["flags"] = vec.flags
    if vec.known:
        t["tensors"] = [
            {"name": x.name, "alias_of": x.alias_of}
            if x.alias_of is not None
            else {
                "name": x.name,
                "dtype": x.dtype,
                "shape": list(x.shape),
                "sha256": hashlib.sha256(x.data).hexdigest(),
            }
            for x in vec.recipe.tensors
        ]
        if vec.rule is None:
            t["metadata"] = vec.recipe.metadata
    return t


def generate(out: Path, spec: Path = SPEC) -> dict[str, Any]:
    """Write the corpus into ``out``; returns the manifest."""
    codes = spec_rules(spec)
    (out / "keys").mkdir(parents=True, exist_ok=True)
    (out / "vectors").mkdir(parents=True, exist_ok=True)
    for name, key in KEYS.items():
        (out / "keys" / f"{name}.key").write_bytes(key_file(key, CREATED))
    tests, written = [], set()
    for tc_id, vec in enumerate(valid_vectors() + invalid_vectors(), start=1):
        data, _, _ = build(vec.recipe, rng(f"file:{vec.slug}"))
        path = f"vectors/{tc_id:03d}-{vec.slug}.sealed"
        (out / path).write_bytes(data)
        written.add(out / path)
        tests.append(_test(tc_id, vec, path, data, codes))
    for stale in (out / "vectors").glob("*.sealed"):
        if stale not in written:
            stale.unlink()
    manifest = {
        "algorithm": "sealtorch sealed format v1",
        "spec": "docs/format.md",
        "generator": "conformance/generate.py",
        "seed": SEED,
        "numberOfTests": len(tests),
        "header": [
            "Each test names a sealed file, the key file to open it with and, optionally, a "
            "signer (hex Ed25519 public key) the reader must require. A reader MUST return "
            "'expect': 'ok' for a valid file (and the listed tensors, bit for bit), or refuse "
            "an invalid one with the error code of the rule it breaks (docs/format.md). The "
            "keys are public test keys: never use them for anything else."
        ],
        "notes": {flag: {"description": text} for flag, text in NOTES.items()},
        "keys": {name: f"keys/{name}.key" for name in KEYS},
        "tests": tests,
    }
    unknown = {f for t in tests for f in t["flags"]} - NOTES.keys()
    if unknown:
        raise SystemExit(f"flags without a note: {sorted(unknown)}")
    text = json.dumps(manifest, indent=1, ensure_ascii=True) + "\n"
    (out / "manifest.json").write_text(text, encoding="ascii")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "v1")
    args = parser.parse_args()
    manifest = generate(args.out)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {manifest['numberOfTests']} vectors to {args.out} ({size:,} bytes)")


if __name__ == "__main__":
    main()
