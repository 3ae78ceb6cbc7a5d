"""Fuzz targets: every parser that sees untrusted bytes, each as ``fn(data: bytes) -> None``.

A target may only fail with a :class:`sealtorch.errors.SealtorchError`; anything else (a
``KeyError``, ``struct.error``, a library's own exception) is a finding. Shared by the hypothesis
tests (tests/hardening/test_fuzz.py) and the atheris harnesses (fuzz/run.py). Each target has
seed inputs: real, valid documents that mutations start from.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from sealtorch.errors import SealtorchError

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "attestation"


@dataclass
class Target:
    """One parser under fuzz: ``run(data)`` and its seed corpus."""

    name: str
    run: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]
    json_input: bool = False
    notes: list[str] = field(default_factory=list)


@cache
def _world() -> dict[str, Any]:
    """Valid documents to seed the corpus with (built once per process)."""
    import torch
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sealtorch.attestation import sim
    from sealtorch.attestation.attesters.sim import SimAttester
    from sealtorch.format.header import read_header
    from sealtorch.format.keyfile import generate_model_key
    from sealtorch.format.writer import seal
    from sealtorch.protocol import hpke
    from sealtorch.protocol.grant import (
        AuditHead,
        Grant,
        ModelStatus,
        Status,
        sign_audit_head,
        sign_grant,
        sign_status,
    )
    from sealtorch.protocol.messages import ReleaseRequest, StatusRequest
    from sealtorch.protocol.signing import key_id

    with tempfile.TemporaryDirectory(prefix="fuzz-seed-") as tmp:
        d = Path(tmp)
        mk = generate_model_key("fuzz-model", 1)
        seal({"w": torch.zeros(8), "b": torch.ones(3)}, d / "m.sealed", mk, chunk_size=4096,
             public_index=True)
        header = read_header(d / "m.sealed")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sim.init_platform_key(d / "sim")
            att = SimAttester(d / "sim" / sim.KEY_FILE, sim.measure("dkeycache"),
                              role="dkeycache")
            ev = att.attest(os.urandom(64))
    sk = Ed25519PrivateKey.generate()
    _, pk = hpke.generate_keypair()
    policy = {"format": "sealtorch-policy/v1", "version": 3, "lease_seconds": 60,
              "max_releases_per_lease": 10, "factories": ["sealtorch.models.resnet:resnet50"],
              "caches": [{"tee": "sim", "name": "c", "measurement": "ab" * 32}],
              "runtimes": [{"tee": "sgx", "name": "r", "mrenclave": "cd" * 32,
                            "isvprodid": 1, "min_isvsvn": 2}]}
    g = Grant(tenant="t", model_id="fuzz-model", key_version=1, nonce=os.urandom(32),
              requester_key=pk, kem_id=hpke.KEM_ID, evidence_digest="00" * 32,
              cache_id="0" * 32, policy=policy, policy_version=3, lease_seconds=60,
              revocation_epoch=0, issued_at=int(time.time()), server_key_id=key_id(sk))
    st = Status(nonce=os.urandom(32), cache_id="0" * 32, revocation_epoch=1,
                cache_state="approved", models={"fuzz-model": ModelStatus("active", (1,), 3)},
                issued_at=1, server_key_id=key_id(sk))
    return {
        "sk": sk, "header": header.raw, "evidence": ev.to_json(), "policy": policy,
        "grant": sign_grant(sk, g), "status": sign_status(sk, st),
        "head": sign_audit_head(sk, AuditHead(5, "11" * 32, 1, key_id(sk))),
        "release": ReleaseRequest(ev.to_dict(), pk, os.urandom(32), ["a", "b"]).to_json(),
        "status_req": StatusRequest(os.urandom(32), "0" * 32, ["a"]).to_json(),
        "index": json.dumps({"format": "sealtorch-index/v1", "metadata": {"k": "v"},
                             "tensors": [{"name": "w", "dtype": "F32", "shape": [2],
                                          "offset": 0, "length": 8}]}).encode(),
    }


def _j(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _obj(data: bytes) -> Any:
    """Decode fuzz bytes as JSON for the dict-level parsers (non-JSON: nothing to test)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


# --- targets ------------------------------------------------------------------------------
def t_header(data: bytes) -> None:
    from sealtorch.format.header import parse_header

    parse_header(data)


def t_index(data: bytes) -> None:
    from sealtorch.format.index import parse_index

    parse_index(data, total_length=64)


def t_snp_report(data: bytes) -> None:
    from sealtorch.attestation.verifiers.snp import parse_report

    parse_report(data)


def t_quote_wrapper(data: bytes) -> None:
    from sealtorch.attestation.verifiers.dcap import quote_fmspc_ca

    quote_fmspc_ca(data)


def t_evidence(data: bytes) -> None:
    from sealtorch.attestation.evidence import Evidence

    Evidence.from_json(data)


def t_policy_json(data: bytes) -> None:
    from sealtorch.attestation.policy import ModelPolicy

    ModelPolicy.from_json(data)


def t_policy_toml(data: bytes) -> None:
    from sealtorch.attestation.policy import ModelPolicy

    ModelPolicy.from_toml(data.decode("utf-8", "replace"))


def t_grant(data: bytes) -> None:
    from sealtorch.protocol.grant import Grant
    from sealtorch.protocol.signing import KIND_GRANT, verify_document

    obj = _obj(data)
    if isinstance(obj, dict) and isinstance(obj.get("body"), dict):
        Grant.from_body(obj["body"])
    verify_document(_world()["sk"].public_key(), KIND_GRANT, obj)


def t_status_doc(data: bytes) -> None:
    from sealtorch.protocol.grant import GrantVerifier

    v = GrantVerifier(_world()["sk"].public_key())
    obj = _obj(data)
    v.verify_audit_head(obj)
    v.verify_status(obj, nonce=b"\x00" * 32)


def t_release_request(data: bytes) -> None:
    from sealtorch.protocol.messages import ReleaseRequest, parse_json_body

    ReleaseRequest.from_json(parse_json_body(data))


def t_status_request(data: bytes) -> None:
    from sealtorch.protocol.messages import StatusRequest, parse_json_body

    StatusRequest.from_json(parse_json_body(data))


def t_frame(data: bytes) -> None:
    from sealtorch.protocol.local import recv_frame

    a, b = socket.socketpair()
    try:
        a.sendall(data[:200_000])
        a.shutdown(socket.SHUT_WR)
        while recv_frame(b, deadline=time.monotonic() + 5) is not None:
            pass
    finally:
        a.close()
        b.close()


def t_cache_config(data: bytes) -> None:
    from sealtorch.keycache.config import parse_config

    parse_config(data)


def t_b64(data: bytes) -> None:
    from sealtorch.protocol.b64 import b64d

    b64d(data.decode("latin-1"), field="f", max_len=64)


def _frame(obj: Any) -> bytes:
    b = _j(obj)
    return len(b).to_bytes(4, "big") + b


def _file(p: Path) -> list[bytes]:
    return [p.read_bytes()] if p.exists() else []


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("header", t_header, lambda: [_world()["header"]]),
    Target("index", t_index, lambda: [_world()["index"]], json_input=True),
    Target("snp_report", t_snp_report, lambda: _file(VECTORS / "amd-snp/milan-vcek/report.bin")
           + _file(VECTORS / "amd-snp/trustee-vcek/test-report.bin")),
    Target("quote_wrapper", t_quote_wrapper, lambda: _file(VECTORS / "intel-dcap/sgx_quote")
           + _file(VECTORS / "intel-dcap/tdx_quote")),
    Target("evidence", t_evidence, lambda: [_world()["evidence"]], json_input=True),
    Target("policy_json", t_policy_json, lambda: [_j(_world()["policy"])], json_input=True),
    Target("policy_toml", t_policy_toml, lambda: [
        b'format = "sealtorch-policy/v1"\nversion = 1\n[[caches]]\ntee = "sim"\n'
        b'measurement = "' + b"ab" * 32 + b'"\n']),
    Target("grant", t_grant, lambda: [_j(_world()["grant"])], json_input=True),
    Target("status_doc", t_status_doc, lambda: [_j(_world()["status"]), _j(_world()["head"])],
           json_input=True),
    Target("release_request", t_release_request, lambda: [_j(_world()["release"])],
           json_input=True),
    Target("status_request", t_status_request, lambda: [_j(_world()["status_req"])],
           json_input=True),
    Target("frame", t_frame, lambda: [_frame({"op": "hello"}), _frame({"op": "file_key"})]),
    Target("cache_config", t_cache_config, lambda: [
        b'[keycache]\nkeyserver_url = "https://127.0.0.1:1"\nserver_public_key = "'
        + b"A" * 43 + b'="\nsocket = "/tmp/x.sock"\n']),
    Target("b64", t_b64, lambda: [b"AAAA", b"QUJD"]),
]}


def run_one(target: Target, data: bytes) -> BaseException | None:
    """Run one input; returns a finding (a non-sealtorch exception) or ``None``."""
    try:
        target.run(data)
    except SealtorchError:
        return None
    except Exception as e:  # anything else escaping a parser is a finding
        return e
    return None


def mutate(seed: bytes, rnd: Any) -> bytes:
    """A cheap structure-unaware mutation: flips, truncation, splices, repeats."""
    b = bytearray(seed)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randint(0, 5)
        if op == 0 and b:
            i = rnd.randrange(len(b))
            b[i] ^= 1 << rnd.randrange(8)
        elif op == 1 and b:
            del b[rnd.randrange(len(b)):]
        elif op == 2:
            i = rnd.randrange(len(b) + 1)
            b[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
        elif op == 3 and b:
            i = rnd.randrange(len(b))
            b[i] = rnd.choice(b'{}[]",:0-e\\\x00\xff')
        elif op == 4 and b:
            i = rnd.randrange(len(b))
            j = min(len(b), i + rnd.randint(1, 16))
            b[i:i] = b[i:j] * rnd.randint(1, 4)
        else:
            i = rnd.randrange(len(b) + 1)
            b[i:i] = rnd.choice([b"-1", b"1e999", b"NaN", b"null", b"[]", b"{}", b"\"\"",
                                 b"18446744073709551616", b"\\ud800", b"true"])
    return bytes(b)


def mutate_json(seed: bytes, rnd: Any) -> bytes:
    """Replace one value somewhere in a JSON document by a hostile one."""
    doc = json.loads(seed)
    hostile = [None, True, -1, 0, 2**64, 1.5, "", "x" * 300, "../..", [], {}, [1] * 40,
               {"a": {}}, "A" * 4097, "\u0000", "=AAA", 2**53 + 1, "ab" * 32]
    paths: list[tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k in list(node):
                paths.append((node, k))
                walk(node[k])
        elif isinstance(node, list):
            for i in range(len(node)):
                paths.append((node, i))
                walk(node[i])

    walk(doc)
    if not paths:
        return seed
    parent, key = rnd.choice(paths)
    r = rnd.random()
    if r < 0.15 and isinstance(parent, dict):
        del parent[key]
    elif r < 0.25 and isinstance(parent, dict):
        parent[key + "_x" if isinstance(key, str) else "x"] = rnd.choice(hostile)
    else:
        parent[key] = rnd.choice(hostile)
    return json.dumps(doc).encode()
