"""`sealtorch bench load --peers` and `--model sharded`: sealed loading against plain
safetensors and encrypted-weights peers, each load in a fresh worker process.

Variants (each loads into a ready model: a module whose tensors are allocated and zeroed, as a
constructor leaves them): ``plain_safetensors`` (``safetensors.torch.load_file`` +
``load_state_dict``), ``sealed_load_into``, ``sealed_load`` (``sealtorch.load`` +
``load_state_dict``) and, with ``--peers`` and the ``bench`` extra installed: ``cryptotensors``
(encrypted safetensors, ``cryptotensors.torch.load_file``), ``tensorizer`` (tensorizer with
encryption, ``TensorDeserializer.load_into_module``; one file even for the sharded case) and
``kserve_jwe`` (the KServe-style whole-file JWE: ``jwcrypto`` decrypts the whole compact JWE of
each safetensors file in memory, then ``safetensors.torch.load``). ``raw_aes`` is the
baseline, not a variant: AES-256-GCM ``decrypt_into`` of the same chunks into preallocated
buffers on the same threads, from which the fixed per-load overhead of ``load_into`` is
measured. It reads files mapped and faulted in before the clock starts; ``raw_aes_file`` is
the same AES work over files opened, mapped and unmapped inside the timed load, as every
loader (plain safetensors too) must read its file: the like-for-like floor of a load. The
sharded case is a Hugging Face style directory (``model-0000k-of-0000n.safetensors`` +
index) sealed with ``sealtorch seal DIR``, loaded shard by shard through ``sealtorch.hf.SealedDir``.

Each run is a new process (CryptoTensors' thread pool and torch's OpenMP slow each other in one
process, and every variant gets a clean peak RSS); rounds are interleaved (the order rotates).
A worker builds the module, loads once to warm up (lazy imports, thread pools, first use of the
file mappings), resets its peak RSS (``/proc/self/clear_refs``), times one load, then
(untimed, first round) checks every tensor bit for bit against the SHA-256 taken when the files were
written, and reports its peak RSS (``VmHWM``: the module itself plus what the load needed).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SEALED = ["plain_safetensors", "sealed_load_into", "sealed_load"]
#: the baseline of the fixed per-load overhead (not a way to load: no ``variants`` entry)
RAW_AES = "raw_aes_decrypt_into"
#: the same over files mapped inside the timed load
RAW_AES_FILE = "raw_aes_decrypt_file"
PEERS = ["cryptotensors", "tensorizer", "kserve_jwe"]
_MIXED = (torch.float32, torch.bfloat16, torch.float16)


def peer_status() -> dict[str, str | None]:
    """Each peer: ``None`` if it can run here, else why not (the exact import error)."""
    out: dict[str, str | None] = {}
    for name, modules in (("cryptotensors", ["cryptotensors.torch"]),
                          ("tensorizer", ["tensorizer", "libnacl"]),
                          ("kserve_jwe", ["jwcrypto.jwe"])):
        try:
            for m in modules:
                __import__(m)
            out[name] = None
        except Exception as e:  # an import can fail with more than ImportError (libsodium)
            out[name] = f"{type(e).__name__}: {e}"
    return out


def _state(model: str, size_mb: int) -> dict[str, torch.Tensor]:
    """ResNet-50's weights, or ``size_mb`` MiB of 16 MiB tensors cycling fp32/bf16/fp16 plus
    small ones (norm- and bias-like)."""
    if model == "resnet50":
        from sealtorch.models.resnet import make_resnet50

        return make_resnet50(0).state_dict()
    g = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    remaining, i = size_mb << 20, 0
    while remaining > 0:
        n = min(16 << 20, remaining)
        dt = _MIXED[i % 3]
        elems = n // torch.empty((), dtype=dt).element_size()
        state[f"layers.{i}.weight"] = torch.randn(elems, generator=g).to(dt).reshape(-1, 256)[
            : elems // 256]
        state[f"layers.{i}.norm"] = torch.randn(1024, generator=g).to(dt)
        remaining -= n
        i += 1
    return state


def _digest(state: dict[str, torch.Tensor]) -> str:
    d = hashlib.sha256()
    for name in sorted(state):
        t = state[name].contiguous()
        d.update(name.encode())
        d.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return d.hexdigest()


def _module(tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module whose buffers are ``tensors``, under their dotted names."""
    root = torch.nn.Module()
    for name, t in tensors.items():
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, torch.nn.Module())
            m = getattr(m, part)
        m.register_buffer(leaf, t)
    return root


def _ready(spec: list[list[Any]]) -> torch.nn.Module:
    """A module with a zeroed buffer per (name, dtype, shape): a ready model to load into."""
    return _module({n: torch.zeros(shape, dtype=getattr(torch, dt)) for n, dt, shape in spec})


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def prepare(d: Path, model: str, size_mb: int, peers: list[str], shards: int) -> dict[str, Any]:
    """Write every variant's files into ``d``; returns the spec the workers read."""
    from safetensors.torch import save_file

    from sealtorch.format import keyfile
    from sealtorch.format.writer import seal
    from sealtorch.hf.seal import seal_pretrained

    state = _state(model, size_mb)
    names = list(state)
    groups = [names[k::shards] for k in range(shards)] if shards > 1 else [names]
    plain = d / "plain"
    plain.mkdir()
    files = []
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" if shards > 1 else \
            "model.safetensors"
        save_file({n: state[n].contiguous() for n in group}, str(plain / fname))
        files.append(fname)
    mk = keyfile.generate_model_key(f"bench/{model}")
    keyfile.write_key_file(d / "model.key", mk)
    if shards > 1:
        (plain / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {n: files[k] for k, g in enumerate(groups)
                                            for n in g}}))
        (plain / "config.json").write_text('{"model_type": "bench"}')
        seal_pretrained(plain, d / "sealed", mk)
    else:
        seal(plain / files[0], d / "model.sealed", mk)
    spec: dict[str, Any] = {
        "model": model, "files": files, "sharded": shards > 1, "digest": _digest(state),
        "bytes": sum(t.numel() * t.element_size() for t in state.values()),
        "tensors": [[n, str(t.dtype).removeprefix("torch."), list(t.shape)]
                    for n, t in state.items()],
    }
    if "cryptotensors" in peers:
        from cryptography.hazmat.primitives import serialization as ser
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptotensors.torch import save_file as ct_save

        sk = Ed25519PrivateKey.generate()
        enc = {"kty": "oct", "alg": "aes256gcm", "kid": "bench-enc", "use": "enc",
               "k": _b64(os.urandom(32))}
        sig = {"kty": "okp", "crv": "Ed25519", "alg": "ed25519", "kid": "bench-sig",
               "use": "sig",
               "d": _b64(sk.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw,
                                          ser.NoEncryption())),
               "x": _b64(sk.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw))}
        spec["cryptotensors_keys"] = [enc, sig]
        for k, group in enumerate(groups):
            ct_save({n: state[n].contiguous() for n in group}, str(d / f"ct-{k}.safetensors"),
                    config={"enc_key": enc, "sign_key": sig})
    if "tensorizer" in peers:
        from tensorizer import EncryptionParams, TensorSerializer

        params = EncryptionParams.random()
        s = TensorSerializer(str(d / "model.tensors"), encryption=params)
        s.write_module(_module({n: t.contiguous() for n, t in state.items()}))
        s.close()
        spec["tensorizer_key"] = _b64(params.key)
    if "kserve_jwe" in peers:
        from jwcrypto import jwe, jwk

        key = jwk.JWK.generate(kty="oct", size=256)
        spec["jwe_key"] = key.export()
        for k, fname in enumerate(files):
            token = jwe.JWE((plain / fname).read_bytes(),
                            protected={"alg": "dir", "enc": "A256GCM"}, recipient=key)
            (d / f"jwe-{k}.jwe").write_text(token.serialize(compact=True))
    (d / "spec.json").write_text(json.dumps(spec))
    for p in d.rglob("*"):  # page cache warm for everyone
        if p.is_file():
            p.read_bytes()
    return spec


def _loader(d: Path, spec: dict[str, Any], variant: str, module: torch.nn.Module,
            threads: int | None) -> Callable[[], None]:
    """The timed load of ``variant`` into ``module``."""
    from safetensors.torch import load_file

    import sealtorch
    from sealtorch.format.keyfile import read_key_file

    plain = [d / "plain" / f for f in spec["files"]]
    state = module.state_dict(keep_vars=True)
    strict = not spec["sharded"]
    if variant == "plain_safetensors":

        def safetensors() -> None:
            for p in plain:
                module.load_state_dict(load_file(str(p)), strict=strict)

        return safetensors
    if variant in ("sealed_load_into", "sealed_load"):
        key = read_key_file(d / "model.key")

        def sealed() -> None:
            from sealtorch.hf import SealedDir

            if not spec["sharded"]:
                if variant == "sealed_load_into":
                    sealtorch.load_into(module, d / "model.sealed", key=key, threads=threads)
                else:
                    module.load_state_dict(
                        sealtorch.load(d / "model.sealed", key=key, threads=threads))
                return
            with SealedDir(d / "sealed", key=key) as sd:
                for sf in sd.shards:
                    if variant == "sealed_load_into":
                        sf.load_into_tensors(state, strict=False, threads=threads,
                                             every_chunk=True)
                    else:
                        module.load_state_dict(sf.load(threads=threads), strict=False)
                    sf.close()

        return sealed
    if variant in (RAW_AES, RAW_AES_FILE):
        return _raw_aes(d, spec, threads, map_in_load=variant == RAW_AES_FILE)
    if variant == "cryptotensors":
        import cryptotensors
        from cryptotensors.torch import load_file as ct_load

        cryptotensors.register_tmp_key_provider(  # type: ignore[attr-defined]
            keys=spec["cryptotensors_keys"])
        ct = [d / f"ct-{k}.safetensors" for k in range(len(plain))]

        def crypto() -> None:
            for p in ct:
                module.load_state_dict(ct_load(str(p)), strict=strict)

        return crypto
    if variant == "tensorizer":
        from tensorizer import DecryptionParams, TensorDeserializer

        params = DecryptionParams.from_key(base64.b64decode(spec["tensorizer_key"]))

        def tensorize() -> None:
            des = TensorDeserializer(str(d / "model.tensors"), device="cpu", encryption=params)
            des.load_into_module(module)
            des.close()

        return tensorize
    if variant == "kserve_jwe":
        from jwcrypto import jwe, jwk
        from safetensors.torch import load as st_load

        key = jwk.JWK.from_json(spec["jwe_key"])
        tokens = [d / f"jwe-{k}.jwe" for k in range(len(plain))]

        def whole_file() -> None:
            for p in tokens:
                token = jwe.JWE()
                token.deserialize(p.read_text(), key=key)
                module.load_state_dict(st_load(token.payload), strict=strict)

        return whole_file
    raise ValueError(f"unknown variant {variant!r}")


def _raw_aes(d: Path, spec: dict[str, Any], threads: int | None,
             map_in_load: bool) -> Callable[[], None]:
    """Raw AES-256-GCM ``decrypt_into`` of every chunk of the sealed file(s) into preallocated
    and touched buffers, on the threads ``sealed_load_into`` uses (the calling thread plus pool
    threads taking chunks from one iterator): the floor that the fixed per-load overhead is
    measured from. The files are opened and mapped beforehand, or with ``map_in_load`` in
    each load (``open``, ``mmap`` as the loader maps, ``munmap``)."""
    from concurrent.futures import ThreadPoolExecutor

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from sealtorch.bench.load import raw_aes
    from sealtorch.format import memory, reader
    from sealtorch.format.keyfile import read_key_file
    from sealtorch.hf import SealedDir

    key = read_key_file(d / "model.key")
    files = SealedDir(d / "sealed", key=key).shards if spec["sharded"] else \
        [reader.open_sealed(d / "model.sealed", key=key)]
    jobs = []  # (aead, header, digest, path, file view, destination)
    for sf in files:
        h = sf.header
        dest = torch.ones(h.total_length, dtype=torch.uint8).numpy().data
        jobs.append((AESGCM(sf.keys.chunk_key.view()), h, h.digest(), sf.path, sf.view, dest))
    nthreads = threads or memory.default_threads()
    pool = ThreadPoolExecutor(nthreads - 1) if nthreads > 1 else None

    def raw() -> None:
        for aead, h, digest, path, view, dest in jobs:  # one file after the other, as loaded
            if not map_in_load:
                raw_aes(aead, h, digest, view, dest, pool, nthreads)
                continue
            mm = memory.map_path(path)
            with memoryview(mm) as mapped:
                raw_aes(aead, h, digest, mapped, dest, pool, nthreads)
            mm.close()

    return raw


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0  # pragma: no cover - not Linux


def worker(d: Path, variant: str, threads: int | None, check: bool) -> dict[str, Any]:
    """One timed load in this process (see the module docstring)."""
    spec = json.loads((d / "spec.json").read_text())
    module = _ready(spec["tensors"])
    load = _loader(d, spec, variant, module, threads)
    load()  # warm-up: lazy imports, thread pools, first-touch of the file mappings
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak so far is the module, imports, warm-up; count from here
    t = time.perf_counter()
    load()
    ms = (time.perf_counter() - t) * 1e3
    out: dict[str, Any] = {"ms": ms, "peak_rss": _peak_rss()}
    if check and variant not in (RAW_AES, RAW_AES_FILE):  # baselines: their own buffers
        out["bit_identical"] = _digest(module.state_dict()) == spec["digest"]
    return out


def run_peers(model: str, size_mb: int, repeat: int, threads: int | None, peers: bool,
              shards: int) -> dict[str, Any]:
    """Prepare the files, run every variant ``repeat`` times in fresh processes, interleaved;
    returns per-variant median ms, ratio to plain safetensors and peak RSS, and the two raw
    AES-GCM baselines (files mapped beforehand, files mapped in the load) with the ratios
    measured from each (see :func:`_baseline`)."""
    load_start = os.getloadavg()[0]
    status = peer_status() if peers else {}
    runnable = [p for p, why in status.items() if why is None]
    variants = [*SEALED, RAW_AES, RAW_AES_FILE, *runnable]
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="sealtorch-bench-") as tmp:
        d = Path(tmp)
        spec = prepare(d, model, size_mb, runnable, shards)
        for r in range(repeat):
            for v in variants[r % len(variants):] + variants[: r % len(variants)]:
                cmd = [sys.executable, "-m", "sealtorch.bench.peers", str(d), v,
                       str(threads or 0), "1" if r == 0 else "0"]
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise RuntimeError(f"bench worker {v} failed: {done.stderr[-2000:]}")
                samples[v].append(json.loads(done.stdout.strip().splitlines()[-1]))
    plain = statistics.median(s["ms"] for s in samples["plain_safetensors"])
    plain_rss = max(s["peak_rss"] for s in samples["plain_safetensors"])
    result: dict[str, Any] = {}
    raw, raw_file = samples.pop(RAW_AES), samples.pop(RAW_AES_FILE)
    for v, runs in samples.items():
        med = statistics.median(s["ms"] for s in runs)
        rss = max(s["peak_rss"] for s in runs)
        result[v] = {"median_ms": round(med, 2), "min_ms": round(min(s["ms"] for s in runs), 2),
                     "max_ms": round(max(s["ms"] for s in runs), 2),
                     "ratio_to_plain": round(med / plain, 3), "peak_rss_bytes": rss,
                     "peak_rss_over_plain": round(rss / plain_rss, 3),
                     "bit_identical": runs[0]["bit_identical"]}
    return {"model": "sharded" if shards > 1 else model, "bytes": spec["bytes"],
            "shards": len(spec["files"]), "repeat": repeat, "threads": threads,
            "cpus": len(os.sched_getaffinity(0)), "variants": result,
            "raw_aes": _baseline(raw, samples["sealed_load_into"], samples["sealed_load"]),
            "raw_aes_file": _baseline(raw_file, samples["sealed_load_into"],
                                      samples["sealed_load"]),
            "loadavg_start": round(load_start, 2), "loadavg_end": round(os.getloadavg()[0], 2),
            "peers_unavailable": {p: why for p, why in status.items() if why is not None}}


def _baseline(raw: list[dict[str, Any]], into: list[dict[str, Any]],
              load: list[dict[str, Any]]) -> dict[str, Any]:
    """The raw AES-GCM baseline (medians) and what is measured from it in the same run:
    ``fixed_overhead_ms`` (``load_into`` minus raw AES, from the medians, and
    ``paired_fixed_overhead_ms`` the median of the per-round differences),
    ``sealed_over_raw_aes`` (raw AES time over ``load_into`` time: the share of AES
    throughput the loader reaches) and ``load_over_load_into`` (``sealtorch.load`` +
    ``load_state_dict`` over ``load_into``)."""
    raw_ms, into_ms, load_ms = ([s["ms"] for s in runs] for runs in (raw, into, load))
    raw_med, into_med = statistics.median(raw_ms), statistics.median(into_ms)
    return {"median_ms": round(raw_med, 2), "min_ms": round(min(raw_ms), 2),
            "max_ms": round(max(raw_ms), 2),
            "fixed_overhead_ms": round(into_med - raw_med, 2),
            "paired_fixed_overhead_ms": round(statistics.median(
                a - b for a, b in zip(into_ms, raw_ms, strict=True)), 2),
            "sealed_over_raw_aes": round(raw_med / into_med, 3),
            "load_over_load_into": round(statistics.median(load_ms) / into_med, 3)}


if __name__ == "__main__":
    _d, _variant, _threads, _check = sys.argv[1:5]
    print(json.dumps(worker(Path(_d), _variant, int(_threads) or None, _check == "1")))
