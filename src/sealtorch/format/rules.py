"""The reader rules of sealed format v1, in the order a reader checks them (docs/format.md).

Each check sealtorch makes on a sealed file is one :class:`Rule` here: its id in the spec, the
error it raises (whose ``code`` the spec names) and what it says. Every module of ``format/``
raises through :meth:`Rule.fail`, so the spec, the code and the conformance corpus
(``conformance/v1``) name the same rule, and a test checks that all three agree.

The two rules on decrypted bytes live here too, as :class:`StreamChecks`: the reader applies
them to every byte it decrypts, whichever command asked (load, load_into, verify, unseal).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass

import numpy as np

from sealtorch._secret import wipe
from sealtorch.errors import (
    FormatError,
    HeaderError,
    IndexError_,
    IntegrityError,
    KeyMismatchError,
    NotASealedFileError,
    SignatureError,
    StreamError,
    TrailingDataError,
    TruncatedError,
    UnsupportedVersionError,
    WrongKeyError,
)


@dataclass(frozen=True)
class Rule:
    """One reader check: ``id`` as in docs/format.md, the error it raises, and what it says."""

    id: str
    error: type[FormatError]
    text: str

    @property
    def code(self) -> str:
        """The ``code`` of the error a reader reports when a file breaks this rule."""
        return self.error.code

    def fail(self, detail: str) -> FormatError:
        """The error for a file that breaks this rule (``detail`` says what and what to do)."""
        return self.error(f"{detail} (format rule {self.id})")


_R = Rule
# -- header, before any key is used ---------------------------------------------------------
MAGIC = _R("R-1", NotASealedFileError, "the file starts with the 8 bytes SEALTRCH")
PREFIX = _R("R-2", TruncatedError, "the file holds at least the first 12 header bytes")
VERSION = _R("R-3", UnsupportedVersionError, "format version is 1")
HEADER_LENGTH = _R("R-4", HeaderError, "header length H is 147 .. 274")
HEADER_PRESENT = _R("R-5", TruncatedError, "the file holds all H header bytes")
CIPHER = _R("R-6", UnsupportedVersionError, "cipher is 1")
FLAGS = _R("R-7", UnsupportedVersionError, "no flag bit other than 0x0001 and 0x0002 is set")
MODEL_ID_LENGTH = _R("R-8", HeaderError, "model id length L is H - 146")
CHUNK_SIZE = _R("R-9", HeaderError, "chunk size is 256 .. 2^30")
KEY_VERSION = _R("R-10", HeaderError, "key version is at least 1")
TOTAL_LENGTH = _R("R-11", HeaderError, "total length is at most 2^50")
CHUNK_COUNT = _R("R-12", HeaderError, "chunk count is max(1, ceil(total length / chunk size))")
INDEX_LENGTH = _R("R-13", HeaderError, "index length fits the index mode and is <= 64 MiB")
MODEL_ID = _R("R-14", HeaderError, "the model id follows the model id rule")
# -- key and header authentication ----------------------------------------------------------
KEY_MATCH = _R("R-15", KeyMismatchError, "a key file names the header's model id and key version")
KEY_COMMITMENT = _R("R-16", WrongKeyError, "the derived key commitment equals the header's")
HEADER_MAC = _R("R-17", HeaderError, "the header MAC verifies")
# -- file length ----------------------------------------------------------------------------
FILE_SHORT = _R("R-18", TruncatedError, "the file is not shorter than the header says")
FILE_LONG = _R("R-19", TrailingDataError, "the file is not longer than the header says")
# -- tensor index ---------------------------------------------------------------------------
INDEX_TAG = _R("R-20", IntegrityError, "the index section authenticates")
INDEX_JSON = _R("R-21", IndexError_, "the index is one JSON value (RFC 8259)")
INDEX_DUPLICATE_KEY = _R("R-22", IndexError_, "no JSON object has a member name twice")
INDEX_CANONICAL = _R("R-23", IndexError_, "the index is canonical JSON")
INDEX_FIELDS = _R("R-24", IndexError_, "the index is an object of format, metadata, tensors")
INDEX_FORMAT = _R("R-25", IndexError_, "format is sealtorch-index/v1")
METADATA = _R("R-26", IndexError_, "metadata maps strings to strings")
TENSOR_ENTRIES = _R("R-27", IndexError_, "tensors is a list of stored-tensor or alias entries")
NAME = _R("R-28", IndexError_, "every name follows the name rule")
NAME_UNIQUE = _R("R-29", IndexError_, "no name appears twice")
DTYPE = _R("R-30", IndexError_, "every dtype is one of the 18 dtype names")
SHAPE = _R("R-31", IndexError_, "every shape is a list of at most 32 dimensions in range")
OFFSET = _R("R-32", IndexError_, "every offset is an integer multiple of 64")
EMPTY_OFFSET = _R("R-33", IndexError_, "a zero-size tensor has offset 0")
PACKING = _R("R-34", IndexError_, "non-empty tensors are packed in offset order")
STREAM_END = _R("R-35", IndexError_, "total length is the end of the last non-empty tensor")
ALIAS_TARGET = _R("R-36", IndexError_, "every alias names a stored tensor")
# -- owner signature ------------------------------------------------------------------------
SIGNER_REQUIRED = _R("R-37", SignatureError, "with a required signer, the file is signed")
SIGNER_MATCH = _R("R-38", SignatureError, "with a required signer, the file's key is it")
SIGNATURE = _R("R-39", SignatureError, "the owner signature verifies")
# -- chunks and decrypted bytes ---------------------------------------------------------------
CHUNK_TAG = _R("R-40", IntegrityError, "every chunk decrypted authenticates")
PADDING = _R("R-41", StreamError, "every padding byte decrypted is zero")
BOOL_VALUE = _R("R-42", StreamError, "every BOOL byte decrypted is 0 or 1")

#: every rule, in the order a reader checks them
RULES: tuple[Rule, ...] = tuple(v for v in list(globals().values()) if isinstance(v, Rule))


class StreamChecks:
    """Where the rules on decrypted bytes apply: padding (R-41) and BOOL tensors (R-42).

    ``ranges`` are ``(start, end, is_bool)`` byte ranges of the plaintext stream, disjoint and
    in increasing order (padding ranges have ``is_bool`` False). Checking touches only those
    bytes, and leaves no copy of them.
    """

    __slots__ = ("_bool_starts", "_bools", "_pad_starts", "_pads")

    def __init__(self, ranges: list[tuple[int, int, bool]]) -> None:
        self._pads = [(a, b) for a, b, is_bool in ranges if not is_bool]
        self._bools = [(a, b) for a, b, is_bool in ranges if is_bool]
        self._pad_starts = [a for a, _ in self._pads]
        self._bool_starts = [a for a, _ in self._bools]

    def __bool__(self) -> bool:
        return bool(self._pads or self._bools)

    @staticmethod
    def _within(
        ranges: list[tuple[int, int]], starts: list[int], start: int, end: int
    ) -> list[tuple[int, int]]:
        """The parts of ``ranges`` inside ``[start, end)``, relative to ``start``."""
        lo = max(0, bisect_right(starts, start) - 1)
        sel = ranges[lo : bisect_left(starts, end, lo)]
        if sel and sel[0][1] <= start:  # the range before ``start`` ends before it
            del sel[0]
        if not sel:
            return sel
        # only the first range can begin before ``start`` and only the last end after ``end``
        sel[0] = (max(sel[0][0], start), min(sel[0][1], end))
        sel[-1] = (max(sel[-1][0], start), min(sel[-1][1], end))
        return [(a - start, b - start) for a, b in sel]

    def violation(self, start: int, data: memoryview) -> Rule | None:
        """The rule that stream bytes ``[start, start + len(data))``, held in ``data``, break."""
        end = start + len(data)
        if self._bools:
            for a, b in self._within(self._bools, self._bool_starts, start, end):
                if np.frombuffer(data[a:b], dtype=np.uint8).max() > 1:
                    return BOOL_VALUE
        pads = self._within(self._pads, self._pad_starts, start, end)
        if pads:  # one count over all the padding: five times cheaper than a test per gap
            joined = bytearray().join([data[a:b] for a, b in pads])
            try:
                if joined.count(0) != len(joined):
                    return PADDING
            finally:
                wipe(joined)
        return None

    def check(self, start: int, data: memoryview) -> None:
        """Raise :class:`StreamError` if ``data`` (stream bytes from ``start``) breaks a rule."""
        rule = self.violation(start, data)
        if rule is not None:
            raise rule.fail(describe_violation(rule))


def describe_violation(rule: Rule) -> str:
    """The message for a decrypted-bytes rule (no byte values: they are plaintext)."""
    what = "padding byte between tensors" if rule is PADDING else "BOOL tensor byte"
    must = "zero" if rule is PADDING else "0 or 1"
    return (
        f"the sealed file authenticates but a {what} is not {must}: it was written by a "
        "faulty or hostile writer holding the key; no tensors were loaded; reseal the model"
    )
