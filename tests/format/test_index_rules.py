"""The index rules in depth: the cheap canonical-JSON test never accepts what the reference
check (one re-encoding) refuses, and the writer refuses what readers refuse."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sealtorch.errors import IndexError_, InputError
from sealtorch.format import index, rules, writer
from sealtorch.protocol.canonical import canonical_json

# names as the rule allows them, often with the bytes the cheap test looks for
_NAME_CHARS = st.characters(
    blacklist_categories=("Cs",), blacklist_characters=[chr(c) for c in range(0x20)]
    + [chr(c) for c in range(0x7F, 0xA0)],
)  # fmt: skip
_NAMES = st.one_of(
    st.sampled_from(["w", "a.b", "x:y", 'q"t', "b\\s", "s p", "-1", "é", "\U0001f600", "ab-0"]),
    st.text(_NAME_CHARS, min_size=1, max_size=6),
)
_DTYPES = st.sampled_from(["F32", "U8", "BOOL", "I64", "F16"])


@st.composite
def indexes(draw: st.DrawFn) -> tuple[bytes, int]:
    """A valid index (canonical bytes) and its total length."""
    names = draw(st.lists(_NAMES, min_size=0, max_size=5, unique=True))
    items, end = [], 0
    for name in names:
        if items and draw(st.booleans()) and "offset" in items[0]:
            items.append({"alias_of": items[0]["name"], "name": name})
            continue
        dtype = draw(_DTYPES)
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        nbytes = index._ITEMSIZES[dtype]
        for d in shape:
            nbytes *= d
        offset = (end + 63) & -64 if nbytes else 0
        end = offset + nbytes if nbytes else end
        items.append({"dtype": dtype, "name": name, "offset": offset, "shape": shape})
    metadata = draw(st.dictionaries(_NAMES, st.text(max_size=4), max_size=3))
    doc = {"format": index.INDEX_FORMAT, "metadata": metadata, "tensors": items}
    return canonical_json(doc), end


def _mutate(data: bytes, draw: st.DrawFn) -> bytes:
    """One edit that keeps the value (or nearly) but may change its spelling."""
    kinds = ["space", "dup", "dup-in-entry", "reorder", "minus0", "float", "escape", "none"]
    kind = draw(st.sampled_from(kinds))
    if kind == "space":
        at = draw(st.sampled_from([i for i, c in enumerate(data) if c in b",:[]{}"]))
        return data[: at + 1] + b" " + data[at + 1 :]
    if kind == "dup":
        return data.replace(b'"metadata":{', b'"metadata":{"k":"1","k":"2",', 1)
    if kind == "dup-in-entry":  # names stay in order: only the member count tells
        return data.replace(b'{"dtype":', b'{"dtype":"U8","dtype":', 1)
    if kind == "reorder":
        return data.replace(b'"metadata":', b'"tensors":[],"metadata":', 1)
    if kind == "minus0":
        return data.replace(b'"offset":0', b'"offset":-0', 1)
    if kind == "float":
        return data.replace(b'"offset":0', b'"offset":0.0', 1)
    if kind == "escape":
        return data.replace(b'"format"', b'"\\u0066ormat"', 1)
    return data


def _reference_ok(data: bytes) -> bool:
    try:
        index.require_canonical(data)
    except IndexError_:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_cheap_canonical_test_agrees_with_the_reference(data):
    raw, total = data.draw(indexes())
    index.parse_index(raw, total)  # valid by construction: no error
    mutated = _mutate(raw, data.draw)
    try:
        index.parse_index(mutated, total)
    except IndexError_ as e:
        if not _reference_ok(mutated):  # refused: under R-21 .. R-23 when not canonical
            assert any(f"rule {r.id})" in str(e) for r in rules.RULES[20:23]), str(e)
        return
    assert _reference_ok(mutated), mutated  # accepted: the reference check agrees


@pytest.mark.parametrize(
    "data, rule",
    [
        (b'{"format":"sealtorch-index/v1","metadata":{},"tensors":[]} ', rules.INDEX_CANONICAL),
        (b'{"format":"sealtorch-index/v1","metadata":{},"tensors":[]', rules.INDEX_JSON),
        (b'{"format":"sealtorch-index/v1","metadata":{"a":"\\u00E9"},"tensors":[]}',
         rules.INDEX_CANONICAL),
        (b'{"format":"sealtorch-index/v1","metadata":{"a":"x","a":"x"},"tensors":[]}',
         rules.INDEX_DUPLICATE_KEY),
        (b'{"format":"sealtorch-index/v1","metadata":{"a":NaN},"tensors":[]}', rules.INDEX_JSON),
        (b'{"format":"sealtorch-index/v1","metadata":{"b":"1","a":"2"},"tensors":[]}',
         rules.INDEX_CANONICAL),
        # canonical but with an unknown member: the schema rule, after canonical form passed
        (b'{"extra":1,"format":"sealtorch-index/v1","metadata":{},"tensors":[]}',
         rules.INDEX_FIELDS),
    ],
)  # fmt: skip
def test_index_json_rules(data, rule):
    with pytest.raises(IndexError_, match=f"rule {rule.id}\\)"):
        index.parse_index(data, 0)


def test_minimal_indexes_are_valid():
    empty = index.parse_index(b'{"format":"sealtorch-index/v1","metadata":{},"tensors":[]}', 0)
    assert empty.entries == {} and empty.metadata == {} and not empty.checks
    doc = {"format": index.INDEX_FORMAT, "metadata": {"k": "a b\n\u00e9"},
           "tensors": [{"dtype": "BOOL", "name": "m x", "offset": 0, "shape": [3]},
                       {"dtype": "U8", "name": "n", "offset": 64, "shape": [1]}]}  # fmt: skip
    parsed = index.parse_index(canonical_json(doc), 65)
    assert parsed.metadata == {"k": "a b\n\u00e9"}
    assert parsed.checks.violation(0, memoryview(bytes(65))) is None
    plain = bytearray(65)
    plain[1] = 2
    assert parsed.checks.violation(0, memoryview(plain)) is rules.BOOL_VALUE
    plain[1], plain[10] = 1, 1
    assert parsed.checks.violation(0, memoryview(plain)) is rules.PADDING
    assert parsed.checks.violation(64, memoryview(plain)[64:]) is None  # only what it is given


def test_writer_refuses_what_readers_refuse(tmp_path, mk):
    bad_bool = torch.tensor([0, 1, 2], dtype=torch.uint8).view(torch.bool)
    with pytest.raises(InputError, match="bool tensor 'm' holds bytes other than 0 and 1"):
        writer.seal({"m": bad_bool}, tmp_path / "b.sealed", mk)
    with pytest.raises(InputError, match=r"cannot seal this input: .*\(format rule R-28\)"):
        writer.seal({"a\nb": torch.zeros(2)}, tmp_path / "n.sealed", mk)
    with pytest.raises(InputError, match=r"\(format rule R-28\)"):
        writer.seal({"a" * 1025: torch.zeros(2)}, tmp_path / "l.sealed", mk)
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file
    writer.seal({"é" * 512: torch.zeros(2), "ok": torch.ones(2) > 0}, tmp_path / "ok.sealed", mk)


def test_rules_are_numbered_in_order():
    assert [r.id for r in rules.RULES] == [f"R-{i}" for i in range(1, len(rules.RULES) + 1)]
    assert all(r.text and r.code != "format_error" for r in rules.RULES)
