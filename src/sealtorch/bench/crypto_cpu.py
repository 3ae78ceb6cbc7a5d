"""The crypto cost of a release, measured two ways for the key server benches.

- Idle: each operation timed alone in the bench's own process after the load
  (:func:`crypto_per_release`).
- In the server: the thread CPU a running dkeyserver counted in itself while it served
  (``dkeyserver_crypto_cpu_seconds`` on its admin ``/metrics``: evidence verification, HPKE
  seals, signed documents and HMACs, by operation and route). The benches scrape it before and
  after a run and compare the server's process CPU with it like for like: same process, same
  time, same load."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: (op, route) -> CPU seconds
Counts = dict[tuple[str, str], float]

METRIC = "dkeyserver_crypto_cpu_seconds"
#: the operations the idle-process figure times (evidence, HPKE seals with their recipient
#: key check, signatures)
IDLE_OPS = frozenset({"verify_evidence", "hpke_seal", "hpke_key_check", "sign"})
#: the routes whose crypto a release needs (the nonce, the release, its group-commit batch)
RELEASE_ROUTES = frozenset({"challenge", "release", "writer"})


def per_op(fn: Any, budget: float = 0.3, clock: Any = time.perf_counter) -> float:
    """Mean seconds per call of ``fn`` over a short time budget of ``clock`` (wall time, or
    ``time.process_time`` for CPU time, comparable with a server's CPU on a loaded machine)."""
    fn()
    n, start = 0, clock()
    while clock() - start < budget:
        fn()
        n += 1
    return (clock() - start) / max(n, 1)


def micro(platform_key: Path, measurement: bytes, clock: Any = time.perf_counter
          ) -> dict[str, float]:
    """One evidence verification, one HPKE seal and one grant signature, each timed alone in
    this (idle) process with ``clock``, in microseconds."""
    import os

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sealtorch.attestation import binding, sim
    from sealtorch.attestation.attesters.sim import SimAttester
    from sealtorch.attestation.verifiers import VerifierSet
    from sealtorch.protocol import hpke
    from sealtorch.protocol.grant import Grant, sign_grant
    from sealtorch.protocol.signing import key_id

    att = SimAttester(platform_key, measurement, role="dkeycache")
    vs = VerifierSet(sim_platform_keys=[sim.load_platform_key(platform_key).public_key()])
    _, pk = hpke.generate_keypair()
    ev = att.attest(binding.report_data("remote", os.urandom(32), hpke.KEM_ID, pk, b"a" * 32))
    sk = Ed25519PrivateKey.generate()
    g = Grant("t", "m", 1, os.urandom(32), pk, hpke.KEM_ID, "00" * 32, "ab" * 16,
              {"version": 1}, 1, 300, 0, 0, key_id(sk))
    return {
        "verify_evidence_us": per_op(lambda: vs.verify(ev), clock=clock) * 1e6,
        "hpke_seal_us": per_op(lambda: hpke.seal(b"k" * 32, pk, b"info"), clock=clock) * 1e6,
        "grant_sign_us": per_op(lambda: sign_grant(sk, g), clock=clock) * 1e6,
    }


def crypto_per_release(platform_key: Path, measurement: bytes) -> dict[str, float]:
    """The crypto a release needs, in CPU microseconds (like the servers' CPU, so that a loaded
    machine does not inflate it), measured now: one evidence verification, two HPKE seals (the
    model key, the status key) and three Ed25519 signatures (grant, the cache's claims, the
    audit head); a status poll needs one HMAC and one signature."""
    m = micro(platform_key, measurement, clock=time.process_time)
    m["crypto_per_release_us"] = (m["verify_evidence_us"] + 2 * m["hpke_seal_us"]
                                  + 3 * m["grant_sign_us"])
    m["crypto_per_poll_us"] = m["grant_sign_us"]
    return m


def parse(text: str) -> Counts:
    """The counter's samples in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Counts = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != METRIC:
            continue
        for s in fam.samples:
            if s.name == METRIC + "_total":
                out[(s.labels["op"], s.labels["route"])] = float(s.value)
    return out


def scrape(admin_url: str, ca: Path) -> Counts:
    """The counter of the dkeyserver whose admin listener is ``admin_url`` (TLS, CA ``ca``)."""
    import httpx

    from sealtorch.protocol.release_client import tls_client_context

    r = httpx.get(admin_url + "/metrics", verify=tls_client_context(ca), timeout=30)
    r.raise_for_status()
    return parse(r.text)


def add(*counts: Counts) -> Counts:
    """The sum of several processes' (or spans') counts."""
    out: Counts = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0.0) + v
    return out


def minus(after: Counts, before: Counts) -> Counts:
    """What was counted between two scrapes of one process."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def total(c: Counts, *, ops: Iterable[str] | None = None,
          routes: Iterable[str] | None = None) -> float:
    """CPU seconds over the given operations and routes (all when ``None``)."""
    o = None if ops is None else set(ops)
    r = None if routes is None else set(routes)
    return sum(v for (op, route), v in c.items()
               if (o is None or op in o) and (r is None or route in r))


def per_op_us(c: Counts, n: int, routes: Iterable[str] | None = None) -> dict[str, float]:
    """Microseconds of each operation per one of ``n`` requests, over ``routes``."""
    ops = sorted({op for op, _ in c})
    return {op: total(c, ops=[op], routes=routes) * 1e6 / max(n, 1) for op in ops}


def figures(c: Counts | None, server_cpu: float, releases: int, polls: int = 0
            ) -> dict[str, Any]:
    """The in-server figures of a run: crypto per release (its routes: challenge, release,
    the writer's batches) and per status poll, by operation, and the server's process CPU
    over all the crypto it counted (and over the operations the idle figure times). ``c``
    ``None``: not measured (several worker processes: /metrics shows one process)."""
    if c is None:
        return {"server_cpu_over_crypto_in_server": None}
    everything, idle_ops = total(c), total(c, ops=IDLE_OPS)
    out: dict[str, Any] = {
        "crypto_in_server_us_per_release": total(c, routes=RELEASE_ROUTES) * 1e6
        / max(releases, 1),
        "crypto_in_server_us_per_release_by_op": per_op_us(c, releases, RELEASE_ROUTES),
        "crypto_in_server_other_s": total(c, routes=["other"]),
        "server_cpu_over_crypto_in_server": server_cpu / everything if everything else None,
        "server_cpu_over_crypto_in_server_idle_ops": server_cpu / idle_ops if idle_ops else None,
    }
    if polls:
        out["crypto_in_server_us_per_poll"] = total(c, routes=["status"]) * 1e6 / polls
        out["crypto_in_server_us_per_poll_by_op"] = per_op_us(c, polls, ["status"])
    return out


__all__ = ["IDLE_OPS", "RELEASE_ROUTES", "Counts", "add", "crypto_per_release", "figures",
           "micro", "minus", "parse", "per_op_us", "scrape", "total"]
