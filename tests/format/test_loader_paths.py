"""The loader's decryption paths: whole chunks, chunks split between large (direct) and small
(batched through scratch) pieces, gaps, tied copies, the shared thread pool, and the GIL check
behind the default thread count."""

from __future__ import annotations

import mmap
import threading
import time

import cryptography
import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealtorch.errors import IntegrityError
from sealtorch.format import chunks, memory, reader, writer
from sealtorch.format.header import read_header

from .conftest import same_bytes

CHUNK = 128 << 10  # small chunks so that every kind of piece occurs


def mixed_state() -> dict[str, torch.Tensor]:
    """Large tensors (> the direct-write threshold), runs of small ones, odd sizes (padding gaps),
    a non-contiguous tensor and a tied pair, in an order that mixes them inside chunks."""
    g = torch.Generator().manual_seed(11)
    sd: dict[str, torch.Tensor] = {}
    for i in range(6):
        sd[f"big{i}"] = torch.randn(70_000 + 333 * i, generator=g)  # ~280 KB, spans chunks
        for j in range(5):
            sd[f"small{i}.{j}"] = torch.randn(17 + j, generator=g)  # 68-84 B, padded to 64
        sd[f"mid{i}"] = torch.randint(0, 255, (20_001,), dtype=torch.uint8, generator=g)
    sd["nc"] = torch.randn(64, 48, generator=g).t()
    sd["tied.a"] = torch.randn(30_000, generator=g)
    sd["tied.b"] = sd["tied.a"]
    return sd


def module_for(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module with one zeroed buffer per stored tensor (tied names share one buffer)."""
    m = torch.nn.Module()
    made: dict[int, torch.Tensor] = {}
    for name, t in sd.items():
        if id(t) not in made:
            made[id(t)] = torch.zeros_like(t)
            if not t.is_contiguous():
                made[id(t)] = torch.zeros(t.shape[::-1], dtype=t.dtype).t()  # same strides
        m.register_buffer(name.replace(".", "_"), made[id(t)])
    return m


def module_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace(".", "_"): v for k, v in sd.items()}


@pytest.fixture
def sealed(tmp_path, mk):
    sd = module_names(mixed_state())
    p = tmp_path / "mixed.sealed"
    writer.seal(sd, p, mk, chunk_size=CHUNK)
    assert read_header(p).chunk_count > 10
    return sd, p


def _round_trip(sd, p, mk, threads):
    """``load`` and ``load_into`` both give back every tensor of ``sd`` byte for byte; returns
    the module loaded into."""
    out = reader.load(p, key=mk, threads=threads)
    assert set(out) == set(sd)
    for k, v in sd.items():
        assert same_bytes(out[k].contiguous(), v.contiguous()), k
    m = module_for(mixed_state())
    reader.load_into(m, p, key=mk, threads=threads)
    got = m.state_dict()
    for k, v in sd.items():
        assert same_bytes(got[k].contiguous(), v.contiguous()), k
    return m


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_load_and_load_into_every_piece_kind(sealed, mk, threads):
    sd, p = sealed
    m = _round_trip(sd, p, mk, threads)
    assert m.tied_a.data_ptr() == m.tied_b.data_ptr()


@pytest.mark.parametrize("threads", [1, 2])
def test_subset_leaves_gaps_undecrypted_into_tensors(sealed, mk, threads):
    sd, p = sealed
    names = ["small3_2", "big4", "mid0", "nc"]
    out = reader.load(p, key=mk, tensors=names, threads=threads)
    assert list(out) == names
    for k in names:
        assert same_bytes(out[k].contiguous(), sd[k].contiguous()), k


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("where", [0.2, 0.5, 0.97])
def test_tampered_split_chunk_zeroes_every_destination(sealed, mk, threads, where):
    _, p = sealed
    data = bytearray(p.read_bytes())
    h = read_header(p)
    pos = h.chunks_offset + int((len(data) - h.chunks_offset) * where)
    data[pos] ^= 0x40
    p.write_bytes(bytes(data))
    m = module_for(mixed_state())
    for t in m.buffers():
        t.fill_(7)  # "plaintext" that must not survive either
    with pytest.raises(IntegrityError):
        reader.load_into(m, p, key=mk, threads=threads)
    for name, t in m.state_dict().items():
        assert not t.any(), name
    with pytest.raises(IntegrityError):
        reader.load(p, key=mk, threads=threads)


def test_decrypt_threads_are_reused_between_loads(sealed, mk):
    _, p = sealed
    reader.load(p, key=mk, threads=2)
    before = {t.ident for t in threading.enumerate() if t.name.startswith("sealtorch-decrypt")}
    for _ in range(3):
        reader.load(p, key=mk, threads=2)
    after = {t.ident for t in threading.enumerate() if t.name.startswith("sealtorch-decrypt")}
    assert before and after == before


def test_gil_capability_follows_the_cryptography_version(monkeypatch):
    # the installed release (pyproject requires >= 50) runs AES-GCM without the GIL
    assert memory.aead_releases_gil()
    assert memory.default_threads() == memory._cpus()
    for version, expected in [("48.0.0", False), ("49.0.0", False), ("50.0.0", True),
                              ("50.0.2", True), ("51.1", True)]:
        monkeypatch.setattr(cryptography, "__version__", version)
        assert memory.aead_releases_gil() is expected, version
    monkeypatch.setattr(cryptography, "__version__", "49.0.0")
    assert memory.default_threads() == 1


def test_installed_aesgcm_lets_python_threads_run_during_decrypt_into():
    """The reason for the version floor: a thread woken just before four back-to-back
    decrypt_into calls gets to run Python during the first one. With the GIL held (48.x, 49.x)
    it cannot run before the first call returns, i.e. not in the first quarter of the time
    (measured: never below 0.35 there; typically below 0.05 on 50.x)."""
    aead = AESGCM(AESGCM.generate_key(256))
    pt = bytes(16 << 20)
    ct = aead.encrypt(b"\0" * 12, pt, None)
    out = bytearray(len(pt))
    outcomes = []
    for _ in range(20):  # a loaded machine may not wake the helper in time on every attempt
        go = threading.Event()
        seen: list[float] = []
        th = threading.Thread(
            target=lambda go=go, seen=seen: (go.wait(), seen.append(time.perf_counter()))
        )
        th.start()
        time.sleep(0.01)  # the helper is now blocked in go.wait()
        t0 = time.perf_counter()
        go.set()
        for _ in range(4):
            aead.decrypt_into(b"\0" * 12, ct, None, out)
        t1 = time.perf_counter()
        th.join()
        outcomes.append((seen[0] - t0) / (t1 - t0))
        if outcomes[-1] < 0.15:
            break
    assert min(outcomes) < 0.15, outcomes


def test_concurrent_loads_share_the_pool_correctly(sealed, mk):
    sd, p = sealed
    results: list[dict[str, torch.Tensor]] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(reader.load(p, key=mk, threads=2))
        except BaseException as e:
            errors.append(e)

    ths = [threading.Thread(target=one) for _ in range(4)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    assert not errors and len(results) == 4
    for out in results:
        for k, v in sd.items():
            assert same_bytes(out[k].contiguous(), v.contiguous()), k


def _vm_flags(ptr: int) -> set[str]:
    """The VmFlags of this process's mapping that holds address ``ptr`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= ptr < hi
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {ptr:#x}")


@pytest.mark.parametrize("kernel", ["huge_pages", "no_huge_page_hint"])
def test_whole_load_arena_is_undumpable_and_in_huge_pages(sealed, mk, monkeypatch, kernel):
    if kernel == "no_huge_page_hint":  # a platform whose mmap module lacks the hint
        monkeypatch.delattr(mmap, "MADV_HUGEPAGE")
    sd, p = sealed
    out = reader.load(p, key=mk)
    for k, v in sd.items():
        assert same_bytes(out[k].contiguous(), v.contiguous()), k
    flags = _vm_flags(out["big0"].data_ptr())
    assert "dd" in flags  # plaintext weights stay out of core dumps either way
    assert ("hg" in flags) == (kernel == "huge_pages"), flags


@pytest.mark.parametrize("threads", [1, 2])
def test_scratch_smaller_than_chunk_splits_gaps_runs_and_verified_chunks(
    sealed, mk, monkeypatch, threads
):
    """With a scratch buffer smaller than a chunk (the default is 256 KiB against 4 MiB chunks;
    here 16 KiB against 128 KiB), gaps larger than it, runs that would overflow it and chunks
    that are only verified pass through it in pieces: every byte still lands where it belongs,
    and a modified byte in a gap still fails its chunk."""
    monkeypatch.setattr(chunks, "_SCRATCH", 16 << 10)
    monkeypatch.setattr(chunks, "_DIRECT_MIN", 16 << 10)
    sd, p = sealed
    _round_trip(sd, p, mk, threads)
    some = ["small0_0", "small3_4", "mid5"]  # the big tensors around them are gaps now
    part = reader.load(p, key=mk, tensors=some, threads=threads)
    for k in some:
        assert same_bytes(part[k], sd[k].contiguous()), k
    with reader.open_sealed(p, key=mk) as sf:
        sf.verify_all(threads=threads)
        h, e = sf.header, sf.index.entries["small0_0"]
    where = e.offset - 1000  # inside big0, in the chunk that small0_0 starts in
    assert where // h.chunk_size == e.offset // h.chunk_size
    data = bytearray(p.read_bytes())
    data[h.chunk_offset(where // h.chunk_size) + where % h.chunk_size] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        reader.load(p, key=mk, tensors=["small0_0"], threads=threads)
    with reader.open_sealed(p, key=mk) as sf, pytest.raises(IntegrityError):
        sf.verify_all(threads=threads)


@pytest.mark.parametrize("threads", [1, 3])
def test_verify_reports_progress_over_every_chunk(sealed, mk, threads):
    """`sealtorch verify` draws a byte bar: the callback, called from the decryption threads,
    counts each chunk once, never goes back and ends at the stream's length; a tampered file
    stops it short with its error."""
    from sealtorch.format.owner import verify

    _, p = sealed
    total = read_header(p).total_length
    calls: list[tuple[int, int]] = []
    verify(p, key=mk, threads=threads, progress=lambda d, t: calls.append((d, t)))
    assert len(calls) == read_header(p).chunk_count > 1
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert calls[-1] == (total, total) and {t for _, t in calls} == {total}
    raw = bytearray(p.read_bytes())
    raw[-20] ^= 1  # inside the last chunk's ciphertext or tag
    p.write_bytes(bytes(raw))
    calls.clear()
    with pytest.raises(IntegrityError):
        verify(p, key=mk, threads=threads, progress=lambda d, t: calls.append((d, t)))
    assert not calls or calls[-1][0] < total
