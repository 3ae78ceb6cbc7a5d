"""The issue's "Done when" release suite over real HTTPS, on every database x KEK combination."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from tests.keyserver.conftest import SimCache
from tests.servers import RunningKeyServer, sim_policy, start_keyserver

from sealtorch.attestation import sim
from sealtorch.errors import ReleaseDenied
from sealtorch.format.keyfile import ModelKey
from sealtorch.keyserver.audit import verify_chain
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


def test_release_suite(tmp_path: Path, backend: dict[str, Any]) -> None:
    ks = start_keyserver(tmp_path, sim=True, auto_approve=False, init_args=[], **backend)
    eng = _engine(ks, backend.get("db_url"))
    # the nonce TTL is short so that the expired-nonce case needs only a brief wait
    ks.stop()
    (ks.data_dir / "config.toml").write_text(
        (ks.data_dir / "config.toml").read_text().replace("nonce_ttl = 120", "nonce_ttl = 3"))
    ks = ks.restart()
    client = ks.client()
    try:
        key_path = ks.sim_platform()
        cache = SimCache(key_path, MEAS)
        key1, key2 = os.urandom(32), os.urandom(32)
        ks.add_model("m1", key1)
        ks.add_model("m2", key2)
        ks.set_policy("m1", sim_policy(MEAS))
        ks.set_policy("m2", sim_policy(MEAS))

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
        assert g.key is not None and g.key.equals(key1)
        GrantVerifier(ks.signing_public_key).verify(g.document, nonce=n, requester_key=pk)
        assert res.audit_head.seq == _head(eng)
        rows = _audit_since(eng, seq)
        assert [(r["decision"], r["code"], r["model_id"]) for r in rows] == [
            ("release", "granted", "m1")]
        _open_sealed_model(tmp_path, key1, g.key)

        # reused nonce
        seq = _head(eng)
        assert _denied(lambda: client.release(ev, pk, n, ["m1"])) == "nonce_invalid"
        assert [r["code"] for r in _audit_since(eng, seq)] == ["nonce_invalid"]

        # a nonce the server never issued
        seq = _head(eng)
        ev2, _, pk2, n2 = cache.request(client, nonce=os.urandom(32))
        assert _denied(lambda: client.release(ev2, pk2, n2, ["m1"])) == "nonce_invalid"
        assert [r["code"] for r in _audit_since(eng, seq)] == ["nonce_invalid"]

        # expired nonce
        n3 = client.challenge()
        time.sleep(4.2)
        ev3, _, pk3, _ = cache.request(client, nonce=n3)
        seq = _head(eng)
        assert _denied(lambda: client.release(ev3, pk3, n3, ["m1"])) == "nonce_invalid"
        assert "expired" in _audit_since(eng, seq)[0]["details"]

        # evidence bound to another public key
        seq = _head(eng)
        other_pk = cache.request(client, nonce=os.urandom(32))[2]
        ev4, _, pk4, n4 = cache.request(client, bind_key=other_pk)
        assert _denied(lambda: client.release(ev4, pk4, n4, ["m1"])) == "evidence_invalid"
        assert [r["code"] for r in _audit_since(eng, seq)] == ["evidence_invalid"]

        # evidence bound to another audience
        seq = _head(eng)
        ev5, _, pk5, n5 = cache.request(client, audience=b"\x01" * 32)
        assert _denied(lambda: client.release(ev5, pk5, n5, ["m1"])) == "evidence_invalid"
        assert [r["code"] for r in _audit_since(eng, seq)] == ["evidence_invalid"]

        # an unregistered sim platform key
        seq = _head(eng)
        stranger = SimCache(sim.init_platform_key(tmp_path / "stranger"), MEAS)
        ev6, _, pk6, n6 = stranger.request(client)
        assert _denied(lambda: client.release(ev6, pk6, n6, ["m1"])) == "evidence_invalid"
        assert "registered" in _audit_since(eng, seq)[0]["details"]

        # a different measurement (same, approved platform): policy denies
        seq = _head(eng)
        ev7, _, pk7, n7 = SimCache(key_path, OTHER_MEAS).request(client)
        res = client.release(ev7, pk7, n7, ["m1"])
        assert res.grants == [] and res.denials == {"m1": "denied"}
        row = _audit_since(eng, seq)[0]
        assert row["code"] == "denied" and "measurement" in row["details"]

        # another tenant's model: this cache is approved by tenant 'default' only
        t2 = ks.add_tenant("other")
        ks.add_model("m-other", os.urandom(32), token_file=t2)
        ks.set_policy("m-other", sim_policy(MEAS), token_file=t2)
        r = ks.admin("GET", "/v1/admin/policy/m-other", expect=None)
        assert r.status_code == 404  # tenant 'default' cannot see it
        seq = _head(eng)
        ev8, _, pk8, n8 = cache.request(client)
        res = client.release(ev8, pk8, n8, ["m1", "m-other"])
        assert [x.grant.model_id for x in res.grants] == ["m1"]
        assert res.denials == {"m-other": "not_approved"}
        assert {r["code"] for r in _audit_since(eng, seq)} == {"granted", "not_approved"}

        # unknown model ids are denied without revealing anything
        ev9, _, pk9, n9 = cache.request(client)
        assert client.release(ev9, pk9, n9, ["nope"]).denials == {"nope": "unknown_model"}

        # a swapped wrapped key in the database: m1 and m2 exchange their blobs
        with eng.begin() as c:
            b1 = c.execute(sa.text("SELECT wrapped FROM key_versions WHERE model_id='m1'")
                           ).scalar_one()
            b2 = c.execute(sa.text("SELECT wrapped FROM key_versions WHERE model_id='m2'")
                           ).scalar_one()
            c.execute(sa.text("UPDATE key_versions SET wrapped=:b WHERE model_id='m1'"),
                      {"b": b2})
            c.execute(sa.text("UPDATE key_versions SET wrapped=:b WHERE model_id='m2'"),
                      {"b": b1})
        seq = _head(eng)
        ev10, _, pk10, n10 = cache.request(client)
        res = client.release(ev10, pk10, n10, ["m1", "m2"])
        assert res.grants == [] and res.denials == {"m1": "denied", "m2": "denied"}
        assert all("tampered" in r["details"] for r in _audit_since(eng, seq))
        with eng.begin() as c:  # put them back
            c.execute(sa.text("UPDATE key_versions SET wrapped=:b WHERE model_id='m1'"),
                      {"b": b1})
            c.execute(sa.text("UPDATE key_versions SET wrapped=:b WHERE model_id='m2'"),
                      {"b": b2})

        # an edited policy row (loosened to another measurement) is refused
        with eng.begin() as c:
            c.execute(sa.text("UPDATE policies SET policy=REPLACE(policy, :a, :b) "
                              "WHERE model_id='m2'"), {"a": MEAS.hex(), "b": OTHER_MEAS.hex()})
        seq = _head(eng)
        ev11, _, pk11, n11 = cache.request(client)
        res = client.release(ev11, pk11, n11, ["m1", "m2"])
        assert [x.grant.model_id for x in res.grants] == ["m1"]
        assert res.denials == {"m2": "denied"}
        m2row = next(r for r in _audit_since(eng, seq) if r["model_id"] == "m2")
        assert "tampered" in m2row["details"]

        # a revoked model
        ks.admin("POST", "/v1/admin/model-revoke/m1", {})
        seq = _head(eng)
        ev12, _, pk12, n12 = cache.request(client)
        assert client.release(ev12, pk12, n12, ["m1"]).denials == {"m1": "revoked"}
        assert [r["code"] for r in _audit_since(eng, seq)] == ["revoked"]
        st = client.status(res.cache_id, ["m1"])
        assert st.models["m1"].state == "revoked" and st.revocation_epoch >= 1

        # a revoked cache, also after it restarts with a new key (same platform)
        ks.add_model("m3", os.urandom(32))
        ks.set_policy("m3", sim_policy(MEAS))
        ks.revoke_cache(res.cache_id)
        for _ in range(2):  # each request uses a fresh HPKE key, like a restarted cache
            seq = _head(eng)
            evr, _, pkr, nr = cache.request(client)
            rr = client.release(evr, pkr, nr, ["m3"])
            assert rr.denials == {"m3": "revoked"} and rr.cache_state == "revoked"
            assert [r["code"] for r in _audit_since(eng, seq)] == ["revoked"]
        ks.stop()
        ks = ks.restart()  # revocation survives a server restart
        client.close()
        client = ks.client()
        evr, _, pkr, nr = cache.request(client)
        assert client.release(evr, pkr, nr, ["m3"]).denials == {"m3": "revoked"}

        # the whole chain verifies
        with eng.connect() as c:
            rows = [dict(r._mapping) for r in c.execute(sa.text(
                "SELECT * FROM audit_log ORDER BY seq"))]
        assert verify_chain(rows) == []
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
