"""Property test: a corrupted sealed file never yields tensors and never a foreign exception."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealtorch.errors import FormatError
from sealtorch.format import keyfile, owner, reader, writer

MK = keyfile.generate_model_key("fuzz-model", 1)


def _make(public_index: bool) -> bytes:
    import tempfile
    from pathlib import Path

    g = torch.Generator().manual_seed(11)
    sd = {
        "a": torch.randn(40, generator=g),
        "b": torch.randint(0, 9, (3, 7), dtype=torch.int64, generator=g),
        "c": torch.randn(2, 2, generator=g).half(),
    }
    sd["tied"] = sd["a"]
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f.sealed"
        writer.seal(sd, p, MK, chunk_size=256, public_index=public_index)
        return p.read_bytes()


BASE = {False: _make(False), True: _make(True)}
#: a subset whose chunks are all the file's chunks (asserted below), so it must see any damage
SUBSET = ["b", "c"]


def _module() -> torch.nn.Module:
    """A module with the fuzzed file's tensors (buffers), filled with zeros."""
    m = torch.nn.Module()
    m.register_buffer("a", torch.zeros(40))
    m.register_buffer("b", torch.zeros(3, 7, dtype=torch.int64))
    m.register_buffer("c", torch.zeros(2, 2, dtype=torch.float16))
    m.register_buffer("tied", m.a)
    return m


@st.composite
def corrupted(draw: st.DrawFn) -> tuple[bool, bytes]:
    public = draw(st.booleans())
    data = bytearray(BASE[public])
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "random", "magic"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 3))):
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "insert":
        pos = draw(st.integers(0, len(data)))
        data[pos:pos] = draw(st.binary(min_size=1, max_size=40))
    elif kind == "delete":
        a = draw(st.integers(0, len(data) - 1))
        b = draw(st.integers(a + 1, min(len(data), a + 300)))
        del data[a:b]
    elif kind == "random":
        data = bytearray(draw(st.binary(max_size=2000)))
    else:  # a plausible header with random fields
        data = bytearray(b"SEALTRCH" + struct.pack(">H", 1) + draw(st.binary(max_size=600)))
    return public, bytes(data)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=corrupted())
def test_corrupted_files_never_load(tmp_path, case):
    public, data = case
    if data == BASE[public]:
        return
    path = tmp_path / "x.sealed"
    path.write_bytes(data)
    with pytest.raises(FormatError):
        reader.load(path, key=MK)
    with pytest.raises(FormatError):
        reader.load(path, key=MK, tensors=SUBSET)
    with pytest.raises(FormatError):
        owner.verify(path, key=MK)
    module = _module()
    with pytest.raises(FormatError):
        reader.load_into(module, path, key=MK)
    assert all(not t.any() for t in module.state_dict().values())  # nothing left behind
    try:  # without a key nothing is authenticated; it may succeed, but only with FormatErrors
        owner.inspect(path)
    except FormatError:
        pass


def test_pristine_files_load():
    import tempfile
    from pathlib import Path

    for public in (False, True):
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "ok.sealed"
            p.write_bytes(BASE[public])
            out = reader.load(p, key=MK)
            assert out["tied"] is out["a"]
            m = _module()
            reader.load_into(m, p, key=MK)
            assert torch.equal(m.b, out["b"]) and m.tied is m.a
            with reader.open_sealed(p, key=MK) as sf:  # SUBSET's chunks are every chunk: the
                cs = sf.header.chunk_size  # subset load above sees them all
                covered = {i for n in SUBSET for e in [sf.index.entries[n]]
                           for i in range(e.offset // cs, (e.end - 1) // cs + 1)}
                assert covered == set(range(sf.header.chunk_count)) and len(covered) > 1
