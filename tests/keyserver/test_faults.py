"""kill -9 during a release loop; two server processes sharing one PostgreSQL database."""

from __future__ import annotations

import json
import os
import shutil
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.keyserver.conftest import SimCache
from tests.servers import keyserver_cli, sim_policy, start_keyserver

from sealtorch.attestation import sim
from sealtorch.errors import ReleaseDenied, ServiceUnavailableError

warnings.filterwarnings("ignore", category=RuntimeWarning)
MEAS = sim.measure("dkeycache")


def test_kill9_during_release_loop(tmp_path: Path) -> None:
    ks = start_keyserver(tmp_path, sim=True, auto_approve=True)
    keys = {"k1": os.urandom(32), "k2": os.urandom(32)}
    cache = SimCache(ks.sim_platform(), MEAS)
    for mid, k in keys.items():
        ks.add_model(mid, k)
        ks.set_policy(mid, sim_policy(MEAS, cache.platform_key))
    released: list[tuple[str, int, bytes]] = []
    last_head: list[dict[str, Any]] = []
    enough = threading.Event()
    stop = threading.Event()

    def loop() -> None:
        with ks.client() as client:
            while not stop.is_set():
                try:
                    ev, sk, pk, n = cache.request(client)
                    res = client.release(ev, pk, n, None, private_key=sk)
                except (ServiceUnavailableError, ReleaseDenied, OSError):
                    return
                for g in res.grants:
                    assert g.key is not None
                    released.append((g.grant.model_id, g.grant.key_version, bytes(g.key)))
                last_head.append(res.audit_head_document)
                if len(last_head) >= 15:
                    enough.set()

    threads = [threading.Thread(target=loop) for _ in range(3)]
    for t in threads:
        t.start()
    assert enough.wait(120)
    ks.kill9()  # while the loop is still running
    stop.set()
    for t in threads:
        t.join(30)
    head_file = tmp_path / "head.json"
    head_file.write_text(json.dumps(last_head[-1]))

    # the chain verifies against the last signed head a client saw
    out = keyserver_cli("audit", "verify", "--data-dir", str(ks.data_dir), "--head",
                        str(head_file), env=ks.env)
    assert json.loads(out.stdout)["ok"] is True
    # and every released key is still in the store: the restarted server releases the same keys
    ks2 = ks.restart()
    try:
        with ks2.client() as client:
            ev, sk, pk, n = cache.request(client)
            res = client.release(ev, pk, n, ["k1", "k2"], private_key=sk)
        now = {(g.grant.model_id, g.grant.key_version): bytes(g.key) for g in res.grants}
        assert released and all(now[(m, v)] == k for m, v, k in released)
        assert all(keys[m] == k for m, _, k in released)
    finally:
        ks2.stop()

    # a truncated tail is detected against that signed head
    import sqlalchemy as sa

    eng = sa.create_engine(f"sqlite:///{ks.data_dir / 'keyserver.db'}")
    seq = json.loads(head_file.read_text())["body"]["seq"]
    with eng.begin() as c:
        c.execute(sa.text("DELETE FROM audit_log WHERE seq >= :s"), {"s": seq})
    eng.dispose()
    bad = keyserver_cli("audit", "verify", "--data-dir", str(ks.data_dir), "--head",
                        str(head_file), env=ks.env, check=False)
    assert bad.returncode == 1 and "truncated" in bad.stdout


def test_two_servers_one_postgresql_nonce_once(tmp_path: Path, pg_url: str) -> None:
    a = start_keyserver(tmp_path / "a", db_url=pg_url, sim=True, auto_approve=True)
    (tmp_path / "b").mkdir()
    b_dir = tmp_path / "b" / "keyserver"
    shutil.copytree(a.data_dir, b_dir, ignore=shutil.ignore_patterns("run.json"))
    b = start_keyserver(tmp_path / "b", data_dir=b_dir)
    try:
        a.add_model("m", os.urandom(32))
        cache = SimCache(a.sim_platform(), MEAS)
        a.set_policy("m", sim_policy(MEAS, cache.platform_key))
        with a.client() as ca, b.client() as cb:
            # sequential: issued by A, accepted by B once, then refused everywhere
            ev, _, pk, n = cache.request(ca)
            assert len(cb.release(ev, pk, n, ["m"]).grants) == 1
            for c in (ca, cb):
                try:
                    c.release(ev, pk, n, ["m"])
                    raise AssertionError("a nonce was accepted twice")
                except ReleaseDenied as e:
                    assert e.denial == "nonce_invalid"
            # concurrent: the same request raced at both servers, accepted exactly once
            wins = 0
            for _ in range(8):
                ev, _, pk, n = cache.request(ca)

                def go(c: Any, ev: Any = ev, pk: bytes = pk, n: bytes = n) -> int:
                    try:
                        return len(c.release(ev, pk, n, ["m"]).grants)
                    except ReleaseDenied as e:
                        assert e.denial == "nonce_invalid"
                        return 0

                with ThreadPoolExecutor(4) as pool:
                    got = list(pool.map(go, [ca, cb, ca, cb]))
                assert sum(got) == 1
                wins += 1
            assert wins == 8
    finally:
        a.stop()
        b.stop()
