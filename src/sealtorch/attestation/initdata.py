"""Confidential Containers *initdata*: the document a CoCo pod is launched with, and the value
its digest puts into the VM's launch register (TDX MRCONFIGID, SNP HOST_DATA).

Follows the Initdata Specification of confidential-containers/trustee (``kbs/docs/
initdata.md``) as Kata Containers and the CoCo guest components implement it:

- the document is TOML with ``version = "0.1.0"``, ``algorithm`` (``sha256``, ``sha384`` or
  ``sha512``) and a ``[data]`` table of file name -> file content (section "Initdata");
- its digest is ``algorithm`` over **the whole document's bytes**, so producer and consumer
  must hash the same bytes (section "Initdata Digest Calculating");
- the digest is cut to the register's width, or padded with zero bytes at the end (section
  "Integrity Binding for Different TEEs": TDX ``mr_config_id`` 48 bytes, SNP ``hostdata`` 32);
- a pod carries the document in the annotation ``io.katacontainers.config.hypervisor.
  cc_init_data`` as base64 of its gzip compression (Kata runtime).

Everything here is pure (bytes in, typed values out); reading a file is :func:`load_initdata`.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import re
import tomllib
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sealtorch.errors import ConfigError

#: the only document version the specification defines
VERSION = "0.1.0"
#: ``algorithm`` values Kata and the guest components accept (hashlib constructors)
ALGORITHMS: Mapping[str, Callable[..., Any]] = MappingProxyType(
    {"sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512})
#: width of the launch register that holds the initdata digest, per TEE
REGISTER_BYTES: Mapping[str, int] = MappingProxyType({"tdx": 48, "snp": 32})
#: the pod annotation that carries the document (base64 of gzip) to the Kata runtime
ANNOTATION = "io.katacontainers.config.hypervisor.cc_init_data"
#: the ``[data]`` entry that holds sealtorch's measured configuration, byte for byte
CONFIG_ENTRY = "sealtorch.toml"
#: limits: Kubernetes caps a pod's annotations at 256 KiB in all; a document is text
MAX_DOCUMENT_BYTES = 1024 * 1024
MAX_ANNOTATION_CHARS = 256 * 1024
MAX_ENTRIES = 64
_ENTRY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_KEYS = {"version", "algorithm", "data"}


@dataclass(frozen=True)
class InitData:
    """A validated initdata document; ``raw`` is the exact bytes the digest is taken over."""

    version: str
    algorithm: str
    data: Mapping[str, str]
    raw: bytes = field(repr=False)

    @property
    def digest(self) -> bytes:
        """``algorithm`` over the whole document (spec: "Initdata Digest Calculating")."""
        return bytes(ALGORITHMS[self.algorithm](self.raw).digest())

    def register(self, tee: str) -> bytes:
        """The value MRCONFIGID (``tdx``) or HOST_DATA (``snp``) holds for this document."""
        return register_value(self.digest, tee)

    def entry(self, name: str) -> bytes:
        """The UTF-8 bytes of ``[data]`` entry ``name``; a clear error when it is missing."""
        if name not in self.data:
            raise ConfigError(
                f"the initdata document has no {name!r} entry in [data]; generate it with "
                "`sealtorch initdata CONFIG` from the configuration this pod runs with")
        return self.data[name].encode("utf-8")


def register_value(digest: bytes, tee: str) -> bytes:
    """Fit an initdata digest to ``tee``'s launch register: cut the bytes beyond its width at
    the end, or pad with zero bytes at the end (spec: "Integrity Binding for Different TEEs";
    TDX ``mr_config_id`` 48 bytes, SNP ``hostdata`` 32 bytes)."""
    if tee not in REGISTER_BYTES:
        raise ConfigError(f"initdata binds only TDX (MRCONFIGID) and SNP (HOST_DATA), not "
                          f"{tee!r}")
    width = REGISTER_BYTES[tee]
    return digest[:width].ljust(width, b"\0")


def parse_initdata(raw: bytes) -> InitData:
    """Parse and validate an initdata TOML document, strictly: known version, allowed
    algorithm, no other top-level key, ``[data]`` of string entries with plain file names."""
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise ConfigError(f"initdata document larger than {MAX_DOCUMENT_BYTES} bytes; keep "
                          "only configuration files in [data]")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"initdata document is not valid UTF-8 TOML ({type(e).__name__}); "
                          "write it with `sealtorch initdata`") from e
    if set(doc) != _KEYS:
        raise ConfigError("initdata document must have exactly the keys 'version', "
                          "'algorithm' and a [data] table (Initdata Specification 0.1.0)")
    if doc["version"] != VERSION:
        raise ConfigError(f"initdata version must be {VERSION!r}, the only version of the "
                          "Initdata Specification that Kata and sealtorch read")
    if not isinstance(doc["algorithm"], str) or doc["algorithm"] not in ALGORITHMS:
        raise ConfigError(f"initdata algorithm must be one of {', '.join(ALGORITHMS)} "
                          "(the names Kata accepts; not 'sha-384' or others)")
    data = doc["data"]
    if not isinstance(data, dict):
        raise ConfigError("initdata 'data' must be a table of file name = file content")
    if len(data) > MAX_ENTRIES:
        raise ConfigError(f"initdata [data] has more than {MAX_ENTRIES} entries")
    for name, value in data.items():
        if not _ENTRY_NAME.fullmatch(name):
            raise ConfigError("initdata [data] entry names must be plain file names (letters, "
                              "digits, '.', '_', '-'; at most 255 characters)")
        if not isinstance(value, str):
            raise ConfigError(f"initdata [data] entry {name!r} must be a string (the file's "
                              "content)")
    return InitData(VERSION, doc["algorithm"], MappingProxyType(dict(data)), bytes(raw))


def encode_annotation(raw: bytes) -> str:
    """The annotation value for document ``raw``: base64 of its gzip compression (fixed
    mtime, so the same document always gives the same value)."""
    return base64.b64encode(gzip.compress(raw, compresslevel=9, mtime=0)).decode("ascii")


def decode_annotation(value: str | bytes) -> bytes:
    """The document bytes an annotation value carries (base64 of gzip); the decompressed size
    is bounded, so a small value cannot expand without limit."""
    text = value.encode("ascii", "replace") if isinstance(value, str) else value
    text = b"".join(text.split())
    if len(text) > MAX_ANNOTATION_CHARS:
        raise ConfigError(f"initdata annotation longer than {MAX_ANNOTATION_CHARS} characters "
                          "(Kubernetes' limit for all of a pod's annotations)")
    try:
        packed = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ConfigError("initdata annotation is not standard base64; paste the value "
                          "`sealtorch initdata` printed") from e
    inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip container
    try:
        raw = inflate.decompress(packed, MAX_DOCUMENT_BYTES + 1)
    except zlib.error as e:
        raise ConfigError("initdata annotation is base64 but not gzip data; it must be "
                          "base64 of the gzip-compressed document") from e
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise ConfigError(f"initdata document larger than {MAX_DOCUMENT_BYTES} bytes")
    if not inflate.eof or inflate.unused_data:
        raise ConfigError("initdata annotation's gzip data is truncated or has trailing bytes")
    return raw


def read_initdata(blob: bytes) -> InitData:
    """An initdata document given either as TOML or as the annotation value (base64 of gzip,
    e.g. a Kubernetes downward-API file of the pod's annotation)."""
    stripped = blob.strip()
    if stripped[:4] == b"H4sI":  # base64 of the gzip magic 1f 8b 08
        return parse_initdata(decode_annotation(stripped))
    return parse_initdata(blob)


def load_initdata(path: str | Path) -> InitData:
    """Read and validate the initdata document (or annotation value) at ``path``."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            blob = f.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read the initdata document {p} ({e.strerror}); mount the "
                          f"pod's {ANNOTATION} annotation there (downward API)") from e
    return read_initdata(blob)


def render_initdata(entries: Mapping[str, str], algorithm: str = "sha384") -> bytes:
    """Write an initdata document holding ``entries`` (file name -> content), in name order,
    and check that it reads back to exactly these entries."""
    import tomli_w

    for name in entries:
        if not _ENTRY_NAME.fullmatch(name):
            raise ConfigError(f"initdata entry names must be plain file names (letters, "
                              f"digits, '.', '_', '-'), not {name[:40]!r}")
    doc_body = {"version": VERSION, "algorithm": algorithm,
                "data": {name: entries[name] for name in sorted(entries)}}
    # multi-line strings keep files readable, but TOML readers turn a CRLF in them into LF:
    # a document with a carriage return anywhere is written with escapes only
    readable = not any("\r" in text for text in entries.values())
    raw = tomli_w.dumps(doc_body, multiline_strings=readable).encode("utf-8")
    doc = parse_initdata(raw)
    if dict(doc.data) != dict(entries):
        raise ConfigError("internal: the written initdata does not read back to its entries")
    return raw
