"""A policy rule admits caches: with ``admit_caches = true`` a cache whose evidence matches the
model's cache allow-list gets the key without ``cache approve``; a non-matching cache is still
denied, ``cache revoke`` still keeps a cache out, and other models stay approval-gated."""

from __future__ import annotations

import os
from pathlib import Path

from tests.keyserver.conftest import SimCache
from tests.servers import sim_policy, start_keyserver

from sealtorch.attestation import sim
from sealtorch.attestation.policy import ModelPolicy

MEAS = sim.measure("dkeycache")
OTHER_MEAS = sim.measure("dkeycache", b"other config")


def test_policy_without_the_rule_keeps_its_canonical_form() -> None:
    doc = sim_policy(MEAS, "ab" * 32)
    plain = ModelPolicy.from_dict(doc)
    assert "admit_caches" not in plain.to_dict() and plain.admit_caches is False
    admitting = ModelPolicy.from_dict({**doc, "admit_caches": True})
    assert admitting.to_dict()["admit_caches"] is True
    assert ModelPolicy.from_dict(admitting.to_dict()) == admitting


def test_admit_caches_rule(tmp_path: Path) -> None:
    ks = start_keyserver(tmp_path, auto_approve=False)
    try:
        platform = ks.sim_platform()
        cache = SimCache(platform, MEAS)
        key = os.urandom(32)
        ks.add_model("open", key)
        ks.set_policy("open", {**sim_policy(MEAS, platform), "admit_caches": True})
        ks.add_model("gated", os.urandom(32))
        ks.set_policy("gated", sim_policy(MEAS, platform))
        assert ks.admin("GET", "/v1/admin/policy/open")["policy"]["admit_caches"] is True

        with ks.client() as client:
            ev, sk, pk, n = cache.request(client)
            res = client.release(ev, pk, n, ["open", "gated"], private_key=sk)
            assert [g.grant.model_id for g in res.grants] == ["open"]
            assert res.grants[0].key is not None and res.grants[0].key.equals(key)
            assert res.grants[0].grant.policy["admit_caches"] is True
            assert res.denials == {"gated": "not_approved"}

            # a cache admitted only by the rule keeps its lease across status polls
            for _ in range(5):
                st = client.status(res.cache_id, ["open", "gated"])
                assert st.models["open"].state == "active"
                assert st.models["open"].key_versions == (1,)
                assert st.models["gated"].state == "revoked"  # never admitted
                assert st.cache_state == "pending"

            # admission is by policy match only: another measurement is not admitted
            ev, _, pk, n = SimCache(platform, OTHER_MEAS).request(client)
            assert client.release(ev, pk, n, ["open"]).denials == {"open": "not_approved"}

            # cache revoke wins over the rule, at release and at the next status poll
            ks.revoke_cache(res.cache_id)
            st = client.status(res.cache_id, ["open"])
            assert st.models["open"].state == "revoked" and st.cache_state == "revoked"
            ev, _, pk, n = cache.request(client)
            assert client.release(ev, pk, n, ["open"]).denials == {"open": "not_approved"}
        entries = ks.admin("GET", "/v1/admin/audit?limit=1000")["entries"]
        codes = [(e["model_id"], e["code"]) for e in entries if e["action"] == "release"]
        assert codes == [("open", "granted"), ("gated", "not_approved"),
                         ("open", "not_approved"), ("open", "not_approved")]
        granted = next(e for e in entries if e["code"] == "granted")
        assert '"admitted_by":"policy"' in granted["details"]
    finally:
        ks.stop()


def test_a_cache_admitted_by_the_rule_keeps_its_lease_in_dkeycache(tmp_path: Path) -> None:
    """The lease manager of a real cache, polling the real server: no drop, no re-attest."""
    from sealtorch.keycache.leases import LeaseManager

    ks = start_keyserver(tmp_path, auto_approve=False)
    try:
        platform = ks.sim_platform()
        cache = SimCache(platform, MEAS)
        ks.add_model("open", os.urandom(32))
        ks.set_policy("open", {**sim_policy(MEAS, platform, lease_seconds=3600),
                               "admit_caches": True})
        now = [1000.0]
        with ks.client() as client:
            att = cache.attester()

            def evidence(nonce: bytes, public_key: bytes, audience: bytes) -> object:
                from sealtorch.attestation import binding
                from sealtorch.protocol import hpke

                return att.attest(binding.report_data("remote", nonce, hpke.KEM_ID,
                                                      public_key, audience))

            lm = LeaseManager(client, evidence, models=["open"], poll_interval=30,
                              clock=lambda: now[0])
            lm.step()  # attests: the first lease
            assert lm.refreshes == 1 and lm.polls == 0
            for _ in range(20):  # 20 polls, 30 s apart, well before the lease's renewal
                now[0] += 30
                lm.step()
            assert lm.polls == 20 and lm.refreshes == 1
            lease, _ = lm.acquire("open", 1)
            assert lease.grant.model_id == "open"
            assert lm.snapshot()["denied"] == {}
    finally:
        ks.stop()
