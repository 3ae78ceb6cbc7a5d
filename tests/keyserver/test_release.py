"""The issue's "Done when" release suite over real HTTPS, on every database x KEK combination."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from tests.keyserver.conftest import SimCache
from tests.servers import RunningKeyServer, keyserver_cli, sim_policy, start_keyserver

from sealtorch.attestation import sim
from sealtorch.errors import ReleaseDenied
from sealtorch.format.keyfile import ModelKey
from sealtorch.protocol.grant import GrantVerifier

warnings.filterwarnings("ignore", category=RuntimeWarning)

MEAS = sim.measure("dkeycache")
OTHER_MEAS = sim.measure("dkeycache", b"other config")


def _engine(ks: RunningKeyServer, db_url: str | None) -> sa.Engine:
    return sa.create_engine(db_url or f"sqlite:///{ks.data_dir / 'keyserver.db'}")


def _audit_since(eng: sa.Engine, seq: int) -> list[dict[str, Any]]:
    with eng.connect() as c:
        return [dict(r._mapping) for r in c.execute(sa.text(
            "SELECT * FROM audit_log WHERE seq > :s ORDER BY seq"), {"s": seq})]


def _head(eng: sa.Engine) -> int:
    with eng.connect() as c:
        return int(c.execute(sa.text("SELECT audit_seq FROM server_state")).scalar_one())


def _denied(fn: Any) -> str:
    with pytest.raises(ReleaseDenied) as ei:
        fn()
    return ei.value.denial


def _anon(eng: sa.Engine) -> dict[str, int]:
    """The aggregate counters of anonymous failures, by code."""
    with eng.connect() as c:
        out: dict[str, int] = {}
        for code, n in c.execute(sa.text("SELECT code, count FROM anon_counters")):
            out[code] = out.get(code, 0) + int(n)
        return out


def test_release_suite(tmp_path: Path, backend: dict[str, Any]) -> None:
    ks = start_keyserver(tmp_path, sim=True, auto_approve=False, init_args=[], **backend)
    eng = _engine(ks, backend.get("db_url"))
    client = ks.client()
    try:
        key_path = ks.sim_platform()
        cache = SimCache(key_path, MEAS)
        key1, key2 = os.urandom(32), os.urandom(32)
        ks.add_model("m1", key1)
        ks.add_model("m2", key2)
        ks.set_policy("m1", sim_policy(MEAS, key_path))
        ks.set_policy("m2", sim_policy(MEAS, key_path))

        # not yet approved: enrols, denied not_approved, with an audit entry
        seq = _head(eng)
        ev, sk, pk, n = cache.request(client)
        res = client.release(ev, pk, n, ["m1"], private_key=sk)
        assert res.grants == [] and res.denials == {"m1": "not_approved"}
        assert res.cache_state == "pending"
        assert [r["code"] for r in _audit_since(eng, seq)] == ["not_approved"]
        ks.approve_cache(res.cache_id)

        # allowed: a verified grant, the key opens a sealed model
        seq = _head(eng)
        ev, sk, pk, n = cache.request(client)
        res = client.release(ev, pk, n, ["m1"], private_key=sk)
        assert res.denials == {} and len(res.grants) == 1
        g = res.grants[0]
        assert g.grant.model_id == "m1" and g.grant.key_version == 1
        assert g.grant.policy_version == 1 and g.grant.lease_seconds == 300
        assert g.grant.state_seq == res.state_seq > 0
        assert g.key is not None and g.key.equals(key1)
        GrantVerifier(ks.signing_public_key).verify(g.document, nonce=n, requester_key=pk)
        assert res.audit_head.seq == _head(eng)
        rows = _audit_since(eng, seq)
        assert [(r["decision"], r["code"], r["model_id"]) for r in rows] == [
            ("release", "granted", "m1")]
        assert '"admitted_by":"approval"' in rows[0]["details"]
        _open_sealed_model(tmp_path, key1, g.key)

        # anonymous failures are counted in aggregate rows, never audited one row each
        seq, anon = _head(eng), _anon(eng)
        # a reused nonce
        assert _denied(lambda: client.release(ev, pk, n, ["m1"])) == "nonce_invalid"
        # a nonce the server never issued
        ev2, _, pk2, n2 = cache.request(client, nonce=os.urandom(32))
        assert _denied(lambda: client.release(ev2, pk2, n2, ["m1"])) == "nonce_invalid"
        # evidence bound to another public key
        other_pk = cache.request(client, nonce=os.urandom(32))[2]
        ev4, _, pk4, n4 = cache.request(client, bind_key=other_pk)
        assert _denied(lambda: client.release(ev4, pk4, n4, ["m1"])) == "evidence_invalid"
        # evidence bound to another audience
        ev5, _, pk5, n5 = cache.request(client, audience=b"\x01" * 32)
        assert _denied(lambda: client.release(ev5, pk5, n5, ["m1"])) == "evidence_invalid"
        # an unregistered sim platform key
        stranger = SimCache(sim.init_platform_key(tmp_path / "stranger"), MEAS)
        ev6, _, pk6, n6 = stranger.request(client)
        assert _denied(lambda: client.release(ev6, pk6, n6, ["m1"])) == "evidence_invalid"
        assert _head(eng) == seq
        after = _anon(eng)
        assert after.get("nonce_invalid", 0) - anon.get("nonce_invalid", 0) == 2
        assert after.get("evidence_invalid", 0) - anon.get("evidence_invalid", 0) == 3

        # a different measurement (same, approved platform): policy denies
        seq = _head(eng)
        ev7, _, pk7, n7 = SimCache(key_path, OTHER_MEAS).request(client)
        res = client.release(ev7, pk7, n7, ["m1"])
        assert res.grants == [] and res.denials == {"m1": "denied"}
        row = _audit_since(eng, seq)[0]
        assert row["code"] == "denied" and "measurement" in row["details"]

        # another tenant's model: this cache is approved by tenant 'default' only, and an
        # unknown model gets the same answer (existence is not revealed)
        t2 = ks.add_tenant("other")
        ks.add_model("m-other", os.urandom(32), token_file=t2)
        ks.set_policy("m-other", sim_policy(MEAS, key_path), token_file=t2)
        r = ks.admin("GET", "/v1/admin/policy/m-other", expect=None)
        assert r.status_code == 404  # tenant 'default' cannot see it
        seq = _head(eng)
        ev8, _, pk8, n8 = cache.request(client)
        res = client.release(ev8, pk8, n8, ["m1", "m-other", "nope"])
        assert [x.grant.model_id for x in res.grants] == ["m1"]
        assert res.denials == {"m-other": "not_approved", "nope": "not_approved"}
        assert [(r["model_id"], r["code"]) for r in _audit_since(eng, seq)] == [
            ("m1", "granted"), ("m-other", "not_approved"), ("nope", "not_approved")]
        # the other tenant's sim platform must be its own: 'default' registered this one
        ks.approve_cache(res.cache_id, token_file=t2)
        ev8, _, pk8, n8 = cache.request(client)
        res = client.release(ev8, pk8, n8, ["m-other"])
        assert res.denials == {"m-other": "not_approved"}
        # and a tenant lists only the caches that asked for its models or that it approved
        assert [c["cache_id"] for c in ks.admin("GET", "/v1/admin/caches")["caches"]] == [
            res.cache_id]
        t3 = ks.add_tenant("third")
        assert ks.admin("GET", "/v1/admin/caches", token_file=t3)["caches"] == []

        # a revoked model
        ks.admin("POST", "/v1/admin/model-revoke/m1", {})
        seq = _head(eng)
        ev12, sk12, pk12, n12 = cache.request(client)
        assert client.release(ev12, pk12, n12, ["m1"], private_key=sk12).denials == {
            "m1": "revoked"}
        assert [r["code"] for r in _audit_since(eng, seq)] == ["revoked"]
        st = client.status(res.cache_id, ["m1", "m2"])
        assert st.models["m1"].state == "revoked" and st.revocation_epoch >= 1
        assert st.models["m2"].state == "active" and st.models["m2"].key_versions == (1,)

        # a revoked cache, also after it restarts with a new key (same platform)
        ks.add_model("m3", os.urandom(32))
        ks.set_policy("m3", sim_policy(MEAS, key_path))
        ks.revoke_cache(res.cache_id)
        ks.revoke_cache(res.cache_id, token_file=t2)
        for _ in range(2):  # each request uses a fresh HPKE key, like a restarted cache
            seq = _head(eng)
            evr, _, pkr, nr = cache.request(client)
            rr = client.release(evr, pkr, nr, ["m3"])
            assert rr.denials == {"m3": "not_approved"} and rr.cache_state == "revoked"
            assert [r["code"] for r in _audit_since(eng, seq)] == ["not_approved"]
            assert "revoked" in _audit_since(eng, seq)[0]["details"]
        ks.stop()
        ks = ks.restart()  # revocation survives a server restart
        client.close()
        client = ks.client()
        evr, _, pkr, nr = cache.request(client)
        assert client.release(evr, pkr, nr, ["m3"]).cache_state == "revoked"

        # the whole chain verifies (keyed: with the server's KEK)
        out = keyserver_cli("audit", "verify", "--data-dir", str(ks.data_dir), env=ks.env)
        assert json.loads(out.stdout) == {"ok": True, "problems": []}
    finally:
        client.close()
        ks.stop()
        eng.dispose()


def _open_sealed_model(tmp_path: Path, key: bytes, released: Any) -> None:
    """Seal a small state dict with the owner's key; load it with the released key."""
    import torch

    from sealtorch._secret import Secret
    from sealtorch.format import reader, writer

    sd = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(3)}
    path = tmp_path / "m1.sealed"
    writer.seal(sd, path, ModelKey("m1", 1, Secret(key), "2026-01-01T00:00:00Z"))
    got = reader.load(path, key=ModelKey("m1", 1, Secret(bytes(released)), "x"))
    assert torch.equal(got["w"], sd["w"]) and torch.equal(got["b"], sd["b"])
