"""Seal -> load round trips are bit-exact for every input kind."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import save_file
from tests.format.conftest import same_bytes

import sealtorch
from sealtorch.errors import IndexError_, InputError
from sealtorch.format import owner, reader, writer
from sealtorch.format.header import read_header


@pytest.mark.parametrize("chunk_size", [256, 1000, 4 << 20])
@pytest.mark.parametrize("public_index", [False, True])
def test_round_trip_every_case(tmp_path, mk, state, chunk_size, public_index):
    path = tmp_path / "m.sealed"
    h = writer.seal(state, path, mk, chunk_size=chunk_size, public_index=public_index)
    assert h.public_index == public_index and read_header(path) == h
    out = reader.load(path, key=mk)
    assert list(out) == list(state)
    for name, t in state.items():
        assert same_bytes(out[name], t), name
        # each is a contiguous view of its own bytes, as torch.empty(shape) would be laid out
        assert out[name].stride() == torch.empty(t.shape).stride(), name
    assert out["tied.weight"] is out["weight"]  # restored tied
    assert out["noncontig.t"].is_contiguous()


def test_tied_weights_stored_once(tmp_path, mk):
    w = torch.randn(64, 64)
    path = tmp_path / "m.sealed"
    writer.seal({"a": w, "b": w}, path, mk, public_index=True)
    info = owner.inspect(path)
    assert [t["name"] for t in info["index"]["tensors"]] == ["a"]
    assert info["index"]["aliases"] == {"b": "a"}


def test_api_entry_points_and_files(tmp_path, mk, key_file, state):
    sd = {k: v.contiguous().clone() for k, v in state.items() if k != "tied.weight"}
    pt, st = tmp_path / "m.pt", tmp_path / "m.safetensors"
    torch.save(sd, pt)
    save_file(sd, str(st), metadata={"origin": "unit-test"})
    for src in (pt, st):
        out_path = tmp_path / (src.name + ".sealed")
        sealtorch.seal(src, out_path, key_file)
        out = sealtorch.load(out_path, key=key_file)
        assert set(out) == set(sd)
        for k in sd:
            assert same_bytes(out[k], sd[k]), (src, k)
    meta = reader.load  # metadata of a safetensors input is kept in the index
    with reader.open_sealed(tmp_path / "m.safetensors.sealed", key=mk) as sf:
        assert sf.index.metadata == {"origin": "unit-test"}
    del meta


def test_module_round_trip_and_load_into(tmp_path, mk):
    torch.manual_seed(0)
    src = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 8)
    )
    src[2].weight = torch.nn.Parameter(torch.randn(8, 16))
    path = tmp_path / "m.sealed"
    writer.seal(src, path, mk, chunk_size=256)
    dst = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 8)
    )
    ptrs = {n: t.data_ptr() for n, t in dst.state_dict().items()}
    loaded = sealtorch.load_into(dst, path, key=mk, threads=2)
    assert set(loaded) == set(src.state_dict())
    for (n, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert same_bytes(a, b), n
        assert b.data_ptr() == ptrs[n]  # decrypted in place, storage unchanged


def test_load_into_tied_module(tmp_path, mk):
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(50, 8)
            self.out = torch.nn.Linear(8, 50, bias=False)
            self.out.weight = self.emb.weight

    a, b = Tied(), Tied()
    path = tmp_path / "t.sealed"
    writer.seal(a, path, mk, chunk_size=256)
    reader.load_into(b, path, key=mk)
    assert torch.equal(a.emb.weight, b.emb.weight)
    assert b.out.weight is b.emb.weight


def test_load_into_mismatch(tmp_path, mk):
    path = tmp_path / "m.sealed"
    writer.seal(torch.nn.Linear(4, 4), path, mk)
    with pytest.raises(IndexError_, match="does not match the module"):
        reader.load_into(torch.nn.Linear(4, 4, bias=False), path, key=mk)
    with pytest.raises(IndexError_, match="file holds F32"):
        reader.load_into(torch.nn.Linear(4, 5), path, key=mk)
    m = torch.nn.Linear(4, 4, bias=False)
    assert reader.load_into(m, path, key=mk, strict=False) == ["weight"]


def test_subset_decrypts_only_needed_chunks(tmp_path, mk):
    sd = {f"t{i}": torch.full((256,), float(i)) for i in range(8)}  # 1 KiB each
    path = tmp_path / "m.sealed"
    writer.seal(sd, path, mk, chunk_size=1024)
    with reader.open_sealed(path, key=mk) as sf:
        seen: list[int] = []
        orig = sf.decrypt

        def spy(regions, **kw):
            cs = sf.header.chunk_size
            for r in regions:
                seen.extend(range(r.start // cs, (r.end - 1) // cs + 1))
            return orig(regions, **kw)

        sf.decrypt = spy  # type: ignore[method-assign]
        out = sf.load(["t3", "t5"])
    assert sorted(set(seen)) == [3, 5]
    assert torch.equal(out["t3"], sd["t3"]) and torch.equal(out["t5"], sd["t5"])
    # subset from a file where tensors straddle chunks, and through an alias
    writer.seal({**sd, "alias": sd["t2"]}, path, mk, chunk_size=300, overwrite=True)
    out = reader.load(path, key=mk, tensors=["alias", "t6"])
    assert torch.equal(out["alias"], sd["t2"]) and torch.equal(out["t6"], sd["t6"])
    with pytest.raises(IndexError_, match="not in the file"):
        reader.load(path, key=mk, tensors=["nope"])


def test_unseal_and_verify(tmp_path, mk, state):
    path = tmp_path / "m.sealed"
    writer.seal(state, path, mk, chunk_size=300)
    summary = owner.verify(path, key=mk)
    assert summary["ok"] and summary["tensors"] == len(state) - 1 and summary["aliases"] == 1
    out = tmp_path / "plain.safetensors"
    assert owner.unseal(path, out, key=mk) == len(state)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    from safetensors.torch import load_file

    plain = load_file(str(out))
    for k, v in state.items():
        assert same_bytes(plain[k], v), k
    with pytest.raises(InputError, match="already exists"):
        owner.unseal(path, out, key=mk)


def test_bad_inputs(tmp_path, mk):
    with pytest.raises(InputError):
        writer.seal({"a": [1, 2]}, tmp_path / "x", mk)
    with pytest.raises(InputError):
        writer.seal(42, tmp_path / "x", mk)
    with pytest.raises(InputError):
        writer.seal({"a": torch.zeros(2)}, tmp_path / "x", mk, chunk_size=10)
    evil = tmp_path / "evil.pt"
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil.write_bytes(pickle.dumps({"a": Boom()}))
    with pytest.raises(InputError, match="weights_only"):
        writer.seal(evil, tmp_path / "x", mk)
    assert not (tmp_path / "x").exists()
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(InputError, match="unsupported input"):
        writer.seal(tmp_path / "x.txt", tmp_path / "x", mk)


def test_tied_in_file_untied_in_module(tmp_path, mk):
    w = torch.randn(300, 7)
    path = tmp_path / "t.sealed"
    writer.seal({"a": w, "b": w, "c": torch.randn(5)}, path, mk, chunk_size=256)
    m = torch.nn.Module()
    m.register_buffer("a", torch.zeros(300, 7))
    m.register_buffer("b", torch.zeros(300, 7))
    m.register_buffer("c", torch.zeros(5))
    reader.load_into(m, path, key=mk)
    assert torch.equal(m.a, w) and torch.equal(m.b, w) and m.a.data_ptr() != m.b.data_ptr()
    # a non-contiguous destination is filled through a temporary and copied in
    m2 = torch.nn.Module()
    m2.register_buffer("a", torch.zeros(7, 300).t())
    m2.register_buffer("b", torch.zeros(300, 7))
    m2.register_buffer("c", torch.zeros(5))
    reader.load_into(m2, path, key=mk)
    assert torch.equal(m2.a, w) and not m2.a.is_contiguous()


def test_large_full_load_uses_its_own_buffer(tmp_path, mk):
    w = torch.randn(700_000)  # > 1 MiB: the populated anonymous mapping path
    path = tmp_path / "big.sealed"
    writer.seal({"w": w, "s": torch.tensor(1.0)}, path, mk, chunk_size=1 << 20)
    out = reader.load(path, key=mk)
    import gc

    gc.collect()  # the mapping must stay alive as long as the tensors
    assert torch.equal(out["w"], w) and out["s"].item() == 1.0
    out["w"][0] = 5.0  # writable
    assert out["w"][0].item() == 5.0
