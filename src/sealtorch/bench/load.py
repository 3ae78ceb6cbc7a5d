"""`sealtorch bench load`: sealed loading against plain loading and raw AES-GCM, in one run.

Measured (files in the page cache; ``--threads`` forces one thread count on everything, else
each side uses its default): plain ``safetensors.torch.load_file`` + ``load_state_dict``; plain
``torch.load(weights_only=True)`` + ``load_state_dict``; ``sealtorch.load_into``;
``sealtorch.load``; and raw AES-256-GCM ``decrypt_into`` of the same chunks into one
preallocated buffer with the same thread count (the calling thread plus ``threads - 1`` pool
threads taking chunks from one iterator, as the loader does). The raw AES baseline writes into
memory from torch's allocator, like the module's parameters (4 KiB pages); the same into a numpy
buffer, which gets transparent huge pages, is reported as ``raw_aes_decrypt_into_thp`` and
``sealed_over_raw_aes_thp`` (huge pages alone make AES-GCM about 8% faster here, a property of
the destination memory, not of the loader). ``sealtorch.load`` decrypts into *new* memory, which
the kernel must fault in and zero first: ``raw_aes_decrypt_into_fresh`` is raw AES into a new
buffer from the loader's own allocator (``memory._plaintext_buffer``) each time, the floor for
``load``; ``load_over_raw_aes_fresh`` says how close ``load`` comes to it and
``fresh_over_preallocated`` what new memory costs raw AES on this machine. The raw AES
baselines read the sealed file through a mapping opened and faulted in before the clock starts;
``raw_aes_decrypt_file`` opens, maps and unmaps the file in each run as every loader must (the
like-for-like floor of a load), with ``sealed_over_raw_aes_file`` and
``fixed_overhead_file_ms`` (``load_into`` minus it) next to ``fixed_overhead_ms``.

The machine may be shared, so every method runs ``--repeat`` times, interleaved round by round
(the order rotates each round, so no method always follows the same one), and the report gives
each method's median, min and max. Ratios come from the medians: ``sealed_over_plain`` =
load_into / safetensors time (target <= 1.10 on ResNet-50) and ``sealed_over_raw_aes`` = sealed
throughput / raw AES throughput (target >= 0.85); ``paired_ratios`` gives the median of the
per-round ratios as a cross-check. The 1-minute load average at the start and the end says how
busy the machine was.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def _synthetic(size_mb: int) -> Any:
    """A module of buffers totalling ``size_mb`` MiB: 16 MiB tensors plus small ones."""
    import torch

    m = torch.nn.Module()
    remaining = size_mb << 20
    i = 0
    while remaining > 0:
        n = min(16 << 20, remaining)
        m.register_buffer(f"big{i}", torch.empty(n // 4).fill_(float(i)))
        m.register_buffer(f"small{i}", torch.full((257,), float(i)))
        remaining -= n
        i += 1
    return m


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def raw_aes(aead: Any, h: Any, digest: bytes, view: memoryview, dest: memoryview,
            pool: Any, nthreads: int) -> None:
    """Raw AES-256-GCM ``decrypt_into`` of every chunk of a sealed file (header ``h``, bytes
    ``view``) into ``dest``, on the calling thread and ``nthreads - 1`` threads of ``pool``
    taking chunks from one iterator, as the loader does: the floor both load benches measure
    the loader against."""
    from sealtorch.format.header import TAG_BYTES
    from sealtorch.format.stream import chunk_aad, chunk_nonce

    work = iter(range(h.chunk_count))
    cs, last = h.chunk_size, h.chunk_count - 1

    def drain() -> None:
        for i in work:  # threads share one iterator, like the loader
            n, off = h.chunk_plain_length(i), h.chunk_offset(i)
            aead.decrypt_into(chunk_nonce(i), view[off : off + n + TAG_BYTES],
                              chunk_aad(digest, i, i == last), dest[i * cs : i * cs + n])

    futures = [pool.submit(drain) for _ in range(nthreads - 1)] if pool else []
    drain()
    for f in futures:
        f.result()


def run_bench(model: str, size_mb: int, threads: int | None, repeat: int) -> dict[str, Any]:
    """Run the benchmark and return the figures (see module docstring)."""
    from concurrent.futures import ThreadPoolExecutor

    import cryptography
    import numpy as np
    import torch
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from safetensors.torch import load_file, save_file

    from sealtorch.format import keyfile, memory, reader, writer

    load_start = os.getloadavg()[0]
    if threads is not None:  # explicit: everyone gets the same count
        torch.set_num_threads(threads)
    nthreads = threads or memory.default_threads()  # sealtorch's own default otherwise
    if model == "resnet50":
        from sealtorch.models.resnet import make_resnet50

        module: torch.nn.Module = make_resnet50(0)
    else:
        module = _synthetic(size_mb)
    state = module.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    mk = keyfile.generate_model_key(f"bench/{model}")
    with tempfile.TemporaryDirectory(prefix="sealtorch-bench-") as d:
        st_path, pt_path, sealed = Path(d) / "m.safetensors", Path(d) / "m.pt", Path(d) / "m.sealed"
        save_file({k: v.contiguous() for k, v in state.items()}, str(st_path))
        torch.save(state, pt_path)
        writer.seal(module, sealed, mk)
        del state
        for p in (st_path, pt_path, sealed):  # page cache warm for everyone
            p.read_bytes()

        def plain_safetensors() -> None:
            module.load_state_dict(load_file(str(st_path)))

        def plain_torch() -> None:
            module.load_state_dict(torch.load(pt_path, weights_only=True, map_location="cpu"))

        def sealed_load_into() -> None:
            reader.load_into(module, sealed, key=mk, threads=nthreads)

        def sealed_load() -> object:
            return reader.load(sealed, key=mk, threads=nthreads)

        sf = reader.open_sealed(sealed, key=mk)
        h = sf.header
        # Destinations, preallocated and touched like a module's parameters: one from torch's
        # allocator (4 KiB pages, like the module's own tensors: the like-for-like baseline),
        # and one from numpy, which asks for transparent huge pages for large arrays (fewer TLB
        # misses, about 8% faster AES here), reported for comparison.
        dests = {
            "torch": torch.ones(h.total_length, dtype=torch.uint8).numpy().data,
            "thp": np.ones(h.total_length, dtype=np.uint8).data,
        }
        aead = AESGCM(sf.keys.chunk_key.view())
        digest = h.digest()
        view = sf.view
        pool = ThreadPoolExecutor(nthreads - 1) if nthreads > 1 else None

        def raw_aes_into(dest: memoryview | None, map_in_load: bool = False
                         ) -> Callable[[], object]:
            """Raw AES of every chunk into ``dest``, or (None) into a new plaintext buffer
            from the loader's allocator, returned so that it is freed outside the clock; with
            ``map_in_load`` the file is opened, mapped (as the loader maps it) and unmapped in
            each run instead of read from the mapping kept open."""

            def run() -> object:
                fresh = None
                target = dest
                if target is None:
                    fresh = memory._plaintext_buffer(h.total_length)
                    target = fresh.numpy().data
                if not map_in_load:
                    raw_aes(aead, h, digest, view, target, pool, nthreads)
                    return fresh
                mm = memory.map_path(sealed)
                with memoryview(mm) as mapped:
                    raw_aes(aead, h, digest, mapped, target, pool, nthreads)
                mm.close()
                return fresh

            return run

        phases: dict[str, Callable[[], object]] = {
            "plain_safetensors": plain_safetensors,
            "plain_torch_load": plain_torch,
            "sealed_load_into": sealed_load_into,
            "sealed_load": sealed_load,
            "raw_aes_decrypt_into": raw_aes_into(dests["torch"]),
            "raw_aes_decrypt_into_thp": raw_aes_into(dests["thp"]),
            "raw_aes_decrypt_into_fresh": raw_aes_into(None),
            "raw_aes_decrypt_file": raw_aes_into(dests["torch"], map_in_load=True),
        }
        for fn in phases.values():  # warm-up: first-touch allocations, thread start-up
            fn()
        samples: dict[str, list[float]] = {name: [] for name in phases}
        order = list(phases)
        for r in range(repeat):  # interleaved, so machine noise hits every phase alike
            for name in order[r % len(order) :] + order[: r % len(order)]:
                gc.collect()
                t = time.perf_counter()
                out = phases[name]()
                samples[name].append(time.perf_counter() - t)
                del out
        if pool is not None:
            pool.shutdown()
        sf.close()
    load_end = os.getloadavg()[0]
    times = {k: _median(v) for k, v in samples.items()}
    into, plain = samples["sealed_load_into"], samples["plain_safetensors"]
    raw = samples["raw_aes_decrypt_into"]
    paired_plain = _median([s / p for s, p in zip(into, plain, strict=True)])
    paired_aes = _median([a / s for a, s in zip(raw, into, strict=True)])
    gb = nbytes / 1e9
    return {
        "model": model,
        "bytes": nbytes,
        "threads": nthreads,
        "torch_threads": torch.get_num_threads(),
        "aead_releases_gil": memory.aead_releases_gil(),
        "repeat": repeat,
        "cryptography": cryptography.__version__,
        "torch": torch.__version__,
        "cpus": memory._cpus(),
        "loadavg_start": round(load_start, 2),
        "loadavg_end": round(load_end, 2),
        "times_s": {k: round(v, 6) for k, v in times.items()},
        "times_min_s": {k: round(min(v), 6) for k, v in samples.items()},
        "times_max_s": {k: round(max(v), 6) for k, v in samples.items()},
        "throughput_gb_s": {k: round(gb / v, 3) for k, v in times.items()},
        "sealed_over_plain": round(times["sealed_load_into"] / times["plain_safetensors"], 4),
        "sealed_over_raw_aes": round(times["raw_aes_decrypt_into"] / times["sealed_load_into"], 4),
        "sealed_over_raw_aes_file": round(
            times["raw_aes_decrypt_file"] / times["sealed_load_into"], 4
        ),
        "fixed_overhead_ms": round((times["sealed_load_into"] - times["raw_aes_decrypt_into"])
                                   * 1e3, 3),
        "fixed_overhead_file_ms": round(
            (times["sealed_load_into"] - times["raw_aes_decrypt_file"]) * 1e3, 3),
        "sealed_over_raw_aes_thp": round(
            times["raw_aes_decrypt_into_thp"] / times["sealed_load_into"], 4
        ),
        "load_over_load_into": round(times["sealed_load"] / times["sealed_load_into"], 4),
        "load_over_raw_aes_fresh": round(
            times["sealed_load"] / times["raw_aes_decrypt_into_fresh"], 4
        ),
        "fresh_over_preallocated": round(
            times["raw_aes_decrypt_into_fresh"] / times["raw_aes_decrypt_into"], 4
        ),
        "paired_ratios": {
            "sealed_over_plain": round(paired_plain, 4),
            "sealed_over_raw_aes": round(paired_aes, 4),
        },
    }


@click.command("load")
@click.option("--model", type=click.Choice(["resnet50", "synthetic", "sharded"]),
              default="resnet50", show_default=True,
              help="model to load (synthetic: --size-mb of tensors; sharded: the same as a "
                   "Hugging Face directory of --shards shards, sealed with `sealtorch seal DIR`)")
@click.option("--size-mb", type=int, default=1024, show_default=True,
              help="synthetic and sharded only")
@click.option("--shards", type=int, default=4, show_default=True, help="sharded only")
@click.option("--peers", is_flag=True,
              help="also CryptoTensors, tensorizer with encryption and a KServe-style whole-file "
                   "JWE (the `bench` extra), each load in a fresh worker process")
@click.option("--threads", type=int, default=None, help="default: one per CPU")
@click.option(
    "--repeat", type=int, default=9, show_default=True, help="rounds; medians are reported"
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def command(model: str, size_mb: int, shards: int, peers: bool, threads: int | None,
            repeat: int, as_json: bool) -> None:
    """Sealed load time vs plain safetensors/torch.load and raw AES-GCM (one run); with
    --peers or --model sharded, vs encrypted-weights peers in worker processes."""
    if size_mb < 1 or repeat < 1 or shards < 2 or (threads is not None and threads < 1):
        raise click.UsageError("--size-mb, --repeat and --threads must be positive, --shards "
                               "at least 2")
    if peers or model == "sharded":
        from sealtorch.bench.peers import run_peers

        res = run_peers("synthetic" if model == "sharded" else model, size_mb, repeat,
                        threads, peers, shards if model == "sharded" else 1)
        if as_json:
            click.echo(json.dumps(res, sort_keys=True))
            return
        click.echo(f"{res['model']}: {res['bytes'] / 1e6:.1f} MB in {res['shards']} file(s), "
                   f"median of {res['repeat']} interleaved rounds, one fresh process per load; "
                   f"load average {res['loadavg_start']} -> {res['loadavg_end']} on "
                   f"{res['cpus']} CPU(s)")
        for name, v in res["variants"].items():
            click.echo(f"  {name:<18} {v['median_ms']:10.1f} ms  x{v['ratio_to_plain']:<7} "
                       f"peak RSS {v['peak_rss_bytes'] / 1e6:8.1f} MB "
                       f"(x{v['peak_rss_over_plain']})"
                       + ("" if v["bit_identical"] else "  WEIGHTS DIFFER"))
        for label, key in (("raw AES-GCM", "raw_aes"), ("... file in load", "raw_aes_file")):
            raw = res[key]
            click.echo(f"  {label:<18} {raw['median_ms']:10.1f} ms  load_into overhead "
                       f"{raw['fixed_overhead_ms']} ms (paired "
                       f"{raw['paired_fixed_overhead_ms']}), sealed_over_raw_aes "
                       f"{raw['sealed_over_raw_aes']}")
        click.echo(f"  load/load_into     {res['raw_aes']['load_over_load_into']}")
        for name, why in res["peers_unavailable"].items():
            click.echo(f"  {name}: not run ({why})")
        return
    result = run_bench(model, size_mb, threads, repeat)
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
        return
    click.echo(
        f"{result['model']}: {result['bytes'] / 1e6:.1f} MB, {result['threads']} decrypt "
        f"thread(s), {result['torch_threads']} torch thread(s), median of {result['repeat']} "
        f"interleaved rounds; load average {result['loadavg_start']} -> {result['loadavg_end']} "
        f"on {result['cpus']} CPU(s)"
    )
    for k, v in result["times_s"].items():
        lo, hi = result["times_min_s"][k], result["times_max_s"][k]
        click.echo(
            f"  {k:<22} {v * 1e3:9.2f} ms  {result['throughput_gb_s'][k]:7.2f} GB/s  "
            f"(min {lo * 1e3:.2f}, max {hi * 1e3:.2f})"
        )
    click.echo(f"  sealed_over_plain    {result['sealed_over_plain']:.3f}   (target <= 1.10)")
    click.echo(f"  sealed_over_raw_aes  {result['sealed_over_raw_aes']:.3f}   (target >= 0.85)")
    click.echo(f"  ... over raw AES into huge pages {result['sealed_over_raw_aes_thp']:.3f}, "
               f"over raw AES with the file mapped in the load "
               f"{result['sealed_over_raw_aes_file']:.3f}")
    click.echo(f"  fixed overhead       {result['fixed_overhead_ms']:.2f} ms (target <= 4); "
               f"{result['fixed_overhead_file_ms']:.2f} ms over raw AES with the file mapped "
               "in the load")
    click.echo(f"  load/load_into      {result['load_over_load_into']:.3f}   (target <= 1.5); "
               f"load over raw AES into new memory {result['load_over_raw_aes_fresh']:.3f}, "
               f"new memory costs raw AES {result['fresh_over_preallocated']:.2f}x")
    pr = result["paired_ratios"]
    click.echo(
        f"  per-round medians: sealed_over_plain {pr['sealed_over_plain']:.3f}, "
        f"sealed_over_raw_aes {pr['sealed_over_raw_aes']:.3f}"
    )
