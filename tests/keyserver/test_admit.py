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
    doc = sim_policy(MEAS)
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
        ks.set_policy("open", {**sim_policy(MEAS), "admit_caches": True})
        ks.add_model("gated", os.urandom(32))
        ks.set_policy("gated", sim_policy(MEAS))
        assert ks.admin("GET", "/v1/admin/policy/open")["policy"]["admit_caches"] is True

        with ks.client() as client:
            ev, sk, pk, n = cache.request(client)
            res = client.release(ev, pk, n, ["open", "gated"], private_key=sk)
            assert [g.grant.model_id for g in res.grants] == ["open"]
            assert res.grants[0].key is not None and res.grants[0].key.equals(key)
            assert res.grants[0].grant.policy["admit_caches"] is True
            assert res.denials == {"gated": "not_approved"}

            # admission is by policy match only: another measurement is still denied
            ev, _, pk, n = SimCache(platform, OTHER_MEAS).request(client)
            assert client.release(ev, pk, n, ["open"]).denials == {"open": "denied"}

            # cache revoke wins over the rule
            ks.revoke_cache(res.cache_id)
            ev, _, pk, n = cache.request(client)
            assert client.release(ev, pk, n, ["open"]).denials == {"open": "revoked"}
        entries = ks.admin("GET", "/v1/admin/audit?limit=1000")["entries"]
        codes = [(e["model_id"], e["code"]) for e in entries if e["action"] == "release"]
        assert codes == [("open", "granted"), ("gated", "not_approved"), ("open", "denied"),
                         ("open", "revoked")]
        granted = next(e for e in entries if e["code"] == "granted")
        assert '"admitted_by":"policy"' in granted["details"]
    finally:
        ks.stop()
