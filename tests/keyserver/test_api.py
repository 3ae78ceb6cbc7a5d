"""Release/admin API behaviour: OpenAPI conformance, limits, TLS 1.3, tokens, keys, CLI."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import ssl
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from tests.keyserver.conftest import SimCache
from tests.pgserver import PgServer
from tests.servers import (
    RunningKeyServer,
    keyserver_cli,
    sim_fingerprint,
    sim_policy,
    start_keyserver,
)

from sealtorch.attestation import sim
from sealtorch.errors import ConfigError, ReleaseDenied
from sealtorch.protocol import hpke
from sealtorch.protocol.messages import StatusRequest, status_key_info
from sealtorch.protocol.release_client import tls_client_context

warnings.filterwarnings("ignore", category=RuntimeWarning)
MEAS = sim.measure("dkeycache")
SPEC = json.loads((Path(__file__).resolve().parents[2] / "src/sealtorch/keyserver/openapi.json"
                   ).read_text())


def check_schema(obj: Any, name: str) -> None:
    """Validate ``obj`` against a component schema of the OpenAPI spec."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": SPEC["components"]}
    jsonschema.validate(obj, schema, cls=jsonschema.Draft202012Validator)


@pytest.fixture(scope="module")
def ks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningKeyServer]:
    server = start_keyserver(tmp_path_factory.mktemp("api"), sim=True, auto_approve=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cache(ks: RunningKeyServer) -> SimCache:
    return SimCache(ks.sim_platform(), MEAS)


def _post(ks: RunningKeyServer, path: str, body: Any = None, *, content: bytes | None = None
          ) -> httpx.Response:
    with httpx.Client(verify=tls_client_context(ks.ca_cert_path), timeout=30) as h:
        if content is not None:
            return h.post(ks.url + path, content=content,
                          headers={"content-type": "application/json"})
        return h.post(ks.url + path, json=body)


def test_openapi_spec_is_valid_and_responses_conform(ks: RunningKeyServer,
                                                     cache: SimCache) -> None:
    from openapi_spec_validator import validate

    validate(SPEC)
    ks.add_model("spec-m", os.urandom(32))
    ks.set_policy("spec-m", sim_policy(MEAS, cache.platform_key))
    r = _post(ks, "/v1/challenge", {})
    assert r.status_code == 200
    check_schema(r.json(), "ChallengeResponse")
    with ks.client() as client:
        ev, sk, pk, n = cache.request(client)
    req = {"evidence": ev.to_dict(), "public_key": base64.b64encode(pk).decode(),
           "nonce": base64.b64encode(n).decode(), "models": ["spec-m", "absent"]}
    r = _post(ks, "/v1/release", req)
    assert r.status_code == 200, r.text
    body = r.json()
    check_schema(body, "ReleaseResponse")
    assert len(body["grants"]) == 1 and body["denials"] == [
        {"model_id": "absent", "code": "not_approved"}]
    r = _post(ks, "/v1/release", req)  # replay
    assert r.status_code == 403
    check_schema(r.json(), "Error")
    assert r.json()["error"]["code"] == "nonce_invalid"
    # status: only with a MAC under the status key sealed to this cache's key
    status_key = hpke.open(base64.b64decode(body["status_key"]), sk,
                           status_key_info(body["cache_id"], n))
    poll = StatusRequest(os.urandom(32), body["cache_id"], ["spec-m"])
    r = _post(ks, "/v1/status", poll.authenticated(b"\x00" * 32).to_json())
    assert r.status_code == 403 and r.json()["error"]["code"] == "unauthorized"
    r = _post(ks, "/v1/status", {k: v for k, v in poll.to_json().items() if k != "mac"})
    assert r.status_code == 400
    r = _post(ks, "/v1/status", poll.authenticated(status_key.view()).to_json())
    assert r.status_code == 200
    check_schema(r.json(), "StatusResponse")
    assert r.json()["status"]["body"]["models"]["spec-m"]["state"] == "active"
    with httpx.Client(verify=tls_client_context(ks.ca_cert_path)) as h:
        tok = ks.admin_token_file.read_text().strip()
        for path, name in [("/v1/admin/models", "ModelList"), ("/v1/admin/caches", "CacheList"),
                           ("/v1/admin/audit/verify", "AuditVerify")]:
            rr = h.get(ks.admin_url + path, headers={"Authorization": f"Bearer {tok}"})
            assert rr.status_code == 200
            check_schema(rr.json(), name)
        assert h.get(ks.url + "/healthz").json() == {"status": "ok"}


def test_limits_and_no_echo(ks: RunningKeyServer) -> None:
    r = _post(ks, "/v1/release", content=b"{" + b" " * (70 * 1024) + b"}")
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    marker = "ZZZmarkerZZZ"
    bad = {"evidence": {}, "public_key": marker + "==", "nonce": marker, "models": None}
    r = _post(ks, "/v1/release", bad)
    assert r.status_code == 400 and marker not in r.text
    check_schema(r.json(), "Error")
    many = {"evidence": {}, "public_key": base64.b64encode(b"k" * 32).decode(),
            "nonce": base64.b64encode(b"n" * 32).decode(),
            "models": [f"m{i}" for i in range(33)]}
    r = _post(ks, "/v1/release", many)
    assert r.status_code == 400 and "32" in r.json()["error"]["message"]
    r = _post(ks, "/v1/release", content=b"not json " + marker.encode())
    assert r.status_code == 400 and marker not in r.text
    # malformed anonymous requests are counted in aggregate rows, not audited one by one
    import sqlalchemy as sa

    eng = sa.create_engine(f"sqlite:///{ks.data_dir / 'keyserver.db'}")
    with eng.connect() as c:
        counts = dict(c.execute(sa.text("SELECT code, SUM(count) FROM anon_counters "
                                        "GROUP BY code")).all())
        audit_codes = {row[0] for row in c.execute(sa.text("SELECT code FROM audit_log"))}
    eng.dispose()
    assert counts["bad_request"] >= 3 and counts["too_large"] >= 1
    assert "bad_request" not in audit_codes


def test_tls12_refused(ks: RunningKeyServer) -> None:
    ctx = ssl.create_default_context(cafile=str(ks.ca_cert_path))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(httpx.ConnectError):
        httpx.get(ks.url + "/healthz", verify=ctx)
    with pytest.raises(httpx.ConnectError):
        httpx.get(ks.admin_url + "/healthz", verify=ctx)


def test_admin_auth_and_tokens(ks: RunningKeyServer, tmp_path: Path) -> None:
    with httpx.Client(verify=tls_client_context(ks.ca_cert_path)) as h:
        assert h.get(ks.admin_url + "/v1/admin/models").status_code == 401
        r = h.get(ks.admin_url + "/v1/admin/models",
                  headers={"Authorization": "Bearer stk_" + "A" * 43})
        assert r.status_code == 401 and "A" * 43 not in r.text
    new = ks.admin("POST", "/v1/admin/tokens", {"ttl_seconds": 3600})
    tf = tmp_path / "t2"
    tf.write_text(new["token"])
    assert ks.admin("GET", "/v1/admin/whoami", token_file=tf)["tenant"] == "default"
    ks.admin("DELETE", f"/v1/admin/tokens/{new['token_id']}")
    r = ks.admin("GET", "/v1/admin/whoami", token_file=tf, expect=None)
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    # tokens are stored only as SHA-256
    import sqlalchemy as sa

    eng = sa.create_engine(f"sqlite:///{ks.data_dir / 'keyserver.db'}")
    with eng.connect() as c:
        hashes = [row[0] for row in c.execute(sa.text("SELECT token_hash FROM tokens"))]
    eng.dispose()
    assert new["token"] not in hashes and len(hashes[0]) == 64


def test_create_export_rotate_retire(ks: RunningKeyServer, cache: SimCache,
                                     tmp_path: Path) -> None:
    ks.admin("POST", "/v1/admin/models", {"model_id": "gen", "key": None})
    ks.set_policy("gen", sim_policy(MEAS, cache.platform_key))
    out = tmp_path / "gen.key"
    keyserver_cli("model", "export", "gen", "--key-version", "1", "--out", str(out),
                  "--signing-public-key", str(ks.signing_public_key_file), "--admin-url",
                  ks.admin_url, "--ca-cert", str(ks.ca_cert_path), "--token-file",
                  str(ks.admin_token_file), env=ks.env)
    from sealtorch.format.keyfile import read_key_file

    exported = read_key_file(out)
    assert exported.model_id == "gen" and exported.key_version == 1
    # only once
    sk, pk = hpke.generate_keypair()
    r = ks.admin("POST", "/v1/admin/model-export/gen",
                 {"key_version": 1, "public_key": base64.b64encode(pk).decode()}, expect=None)
    assert r.status_code == 409
    v2 = os.urandom(32)
    assert ks.admin("POST", "/v1/admin/model-rotate/gen",
                    {"key": base64.b64encode(v2).decode()})["key_version"] == 2
    with ks.client() as client:
        ev, sk, pk, n = cache.request(client)
        res = client.release(ev, pk, n, ["gen"], private_key=sk)
        got = {g.grant.key_version: g.key for g in res.grants}
        assert set(got) == {1, 2}
        assert got[1].equals(exported.key) and got[2].equals(v2)
        ks.admin("POST", "/v1/admin/model-retire/gen", {"key_version": 1})
        ev, sk, pk, n = cache.request(client)
        res = client.release(ev, pk, n, ["gen"], private_key=sk)
        assert [g.grant.key_version for g in res.grants] == [2]
        assert res.grants[0].grant.revocation_epoch >= 1


def test_policy_test_explains_and_cli_paths(ks: RunningKeyServer, cache: SimCache,
                                            tmp_path: Path) -> None:
    from sealtorch.format.keyfile import generate_model_key, write_key_file

    mk = generate_model_key("cli-m")
    kf = tmp_path / "cli-m.key"
    write_key_file(kf, mk)
    ks.add_model_file("cli-m", kf)
    pol = tmp_path / "policy.json"
    pol.write_text(json.dumps(sim_policy(MEAS, cache.platform_key, version=3)))
    common = ["--admin-url", ks.admin_url, "--ca-cert", str(ks.ca_cert_path)]
    env = dict(ks.env, SEALTORCH_ADMIN_TOKEN=ks.admin_token_file.read_text().strip())
    keyserver_cli("policy", "set", "cli-m", str(pol), *common, env=env)
    shown = json.loads(keyserver_cli("policy", "show", "cli-m", *common, env=env).stdout)
    assert shown["policy_version"] == 3
    # a lower policy version is refused
    pol.write_text(json.dumps(sim_policy(MEAS, cache.platform_key, version=2)))
    bad = keyserver_cli("policy", "set", "cli-m", str(pol), *common, env=env, check=False)
    assert bad.returncode != 0
    other = SimCache(cache.platform_key, sim.measure("dkeycache", b"x"))
    with ks.client() as client:
        ev, _, _, _ = other.request(client)
    evf = tmp_path / "ev.json"
    evf.write_text(json.dumps(ev.to_dict()))
    out = json.loads(keyserver_cli("policy", "test", "cli-m", str(evf), *common,
                                   env=env).stdout)
    assert out["allowed"] is False and any("measurement" in r for r in out["reasons"])
    listed = json.loads(keyserver_cli("cache", "list", *common, env=env).stdout)
    assert listed["caches"]
    with ks.client() as client:
        ev, sk, pk, n = cache.request(client)
        res = client.release(ev, pk, n, ["cli-m"], private_key=sk)
        assert res.grants[0].key.equals(mk.key) and res.grants[0].grant.policy_version == 3


def test_metrics_and_audit_verify(ks: RunningKeyServer) -> None:
    with httpx.Client(verify=tls_client_context(ks.ca_cert_path)) as h:
        text = h.get(ks.admin_url + "/metrics").text
    assert "dkeyserver_releases_total" in text and "dkeyserver_denials_total" in text
    assert ks.admin("GET", "/v1/admin/audit/verify")["ok"] is True


def test_metrics_count_crypto_cpu_of_a_release_and_a_poll(ks: RunningKeyServer,
                                                          cache: SimCache) -> None:
    """A real release and status poll over HTTPS add the thread CPU of each crypto operation
    to ``dkeyserver_crypto_cpu_seconds`` under the route that needed it."""
    from sealtorch.bench import crypto_cpu

    ks.add_model("cpu-m", os.urandom(32))
    ks.set_policy("cpu-m", sim_policy(MEAS, cache.platform_key))

    def scrape() -> crypto_cpu.Counts:
        with httpx.Client(verify=tls_client_context(ks.ca_cert_path)) as h:
            return crypto_cpu.parse(h.get(ks.admin_url + "/metrics").text)

    before = scrape()
    with ks.client() as client:
        ev, sk, pk, n = cache.request(client)
        res = client.release(ev, pk, n, ["cpu-m"], private_key=sk)
        status = client.status(res.cache_id, ["cpu-m"])
    assert status.models["cpu-m"].state == "active"
    spent = crypto_cpu.minus(scrape(), before)
    expected = {("hmac", "challenge"),  # the nonce's tag
                ("hmac", "release"), ("verify_evidence", "release"), ("hpke_seal", "release"),
                ("hpke_key_check", "release"),  # the recipient key's low-order check
                ("sign", "release"),  # nonce check, status key; evidence; two seals, three docs
                ("hmac", "writer"),  # the audit entry's MAC, the server-state row's
                ("hmac", "status"), ("sign", "status")}  # the poll's MAC; the signed status
    for key in expected:
        assert 0 < spent[key] < 1.0, (key, spent[key])  # seconds of CPU: positive, not absurd
    assert spent[("verify_evidence", "status")] == 0 and spent[("hpke_seal", "status")] == 0


def test_release_all_entitled(ks: RunningKeyServer, cache: SimCache) -> None:
    ks.add_model("all-a", os.urandom(32))
    ks.set_policy("all-a", sim_policy(MEAS, cache.platform_key))
    with ks.client() as client:
        ev, sk, pk, n = cache.request(client)
        res = client.release(ev, pk, n, None, private_key=sk)
    ids = {g.grant.model_id for g in res.grants}
    assert "all-a" in ids and res.denials == {}


def test_sim_refused_off_loopback(tmp_path: Path) -> None:
    from sealtorch.keyserver.bootstrap import init_data_dir

    with pytest.raises(ConfigError, match="loopback"):
        init_data_dir(tmp_path / "d", sim=True, release_host="0.0.0.0")


def test_sim_off_by_default(tmp_path: Path) -> None:
    ks = start_keyserver(tmp_path, sim=False, auto_approve=True)
    try:
        r = ks.admin("POST", "/v1/admin/sim/platforms", {"public_key": "00" * 32}, expect=None)
        assert r.status_code == 400
        key = sim.init_platform_key(tmp_path / "p")
        with ks.client() as client:
            ev, _, pk, n = SimCache(key, MEAS).request(client)
            with pytest.raises(ReleaseDenied) as ei:
                client.release(ev, pk, n, ["x"])
        assert ei.value.denial == "evidence_invalid"
    finally:
        ks.stop()


def test_schema_1_database_upgrades_keeping_its_data(tmp_path: Path) -> None:
    """A database written by schema 1 (rows without MACs, an unkeyed audit chain, an
    exportable key) is upgraded in place: every row kept and MACed, the chain continued
    keyed, the exportable key turned into a one-time export copy; migrating again is a no-op."""
    import sqlalchemy as sa

    from sealtorch._secret import Secret
    from sealtorch.keyserver import audit, migrations
    from sealtorch.keyserver.admin import Principal, authenticate, verify_audit
    from sealtorch.keyserver.kek import FileKek
    from sealtorch.keyserver.keyring import NONCE_KEY_AAD, KeyRef
    from sealtorch.keyserver.store import Store

    FileKek.create(tmp_path / "kek")
    kek = FileKek(tmp_path / "kek")
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = Store(url, kek, data_dir=tmp_path)
    key = b"k" * 32
    token = "stk_" + "t" * 43
    eng = store.db.engine
    with eng.begin() as c:  # schema 1, as released, and rows as its server wrote them
        migrations._step_1(c, store.db, store.keyring)
        c.execute(sa.text("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, "
                          "applied_at INTEGER NOT NULL)"))
        c.execute(sa.text("INSERT INTO schema_migrations VALUES (1, 0)"))
        entry = audit.new_entry(1, audit.GENESIS, 5, actor="init", action="init",
                                decision="admin", code="ok", tenant="t")
        legacy = audit.legacy_hash(entry)
        c.execute(sa.text(
            "INSERT INTO audit_log VALUES (1, 5, 't', 'init', 'init', NULL, NULL, 'admin', 'ok',"
            " :d, :p, :h)"), {"d": entry["details"], "p": audit.GENESIS, "h": legacy})
        with Secret(os.urandom(32)) as nk:
            wrapped_nonce = kek.wrap(nk, NONCE_KEY_AAD)
        c.execute(sa.text("INSERT INTO server_state VALUES (1, 3, :n, 1, :h)"),
                  {"n": wrapped_nonce, "h": legacy})
        c.execute(sa.text("INSERT INTO tenants VALUES ('t', 1)"))
        c.execute(sa.text("INSERT INTO tokens VALUES ('id1', 't', :h, 9999999999, 0, 1)"),
                  {"h": hashlib.sha256(token.encode()).hexdigest()})
        c.execute(sa.text("INSERT INTO models VALUES ('m', 't', 'active', 1)"))
        with Secret(key) as k:
            blob = store.keyring.wrap_model_key(k, KeyRef("t", "m", 1))
        c.execute(sa.text("INSERT INTO key_versions VALUES ('m', 1, :b, 'active', 1, 1)"),
                  {"b": blob})
    assert migrations.migrate(store.db, store.keyring) == migrations.SCHEMA_VERSION
    assert migrations.migrate(store.db, store.keyring) == migrations.SCHEMA_VERSION  # no-op
    store.close()

    store = Store(url, FileKek(tmp_path / "kek"), data_dir=tmp_path)
    store.open()
    try:
        st = store.state()  # every row MACed and sealed: the verified state loads
        assert st.tenants == {"t"} and st.epoch == 3 and st.seq == 1
        assert authenticate(st, token, 1000) == Principal("t", "id1")
        (kv,) = st.active_versions("m")
        assert store.keyring.model_key(kv.wrapped, KeyRef("t", "m", 1)).equals(key)
        with store.keyring.open_export_copy(st.exports[("m", 1)], KeyRef("t", "m", 1)) as k:
            assert k.equals(key)
        problems, head = verify_audit(store, None)
        assert problems == [] and head.seq == 2  # the legacy entry, then the upgrade's
        rows = store_rows(store)
        assert rows[1]["action"] == "schema_upgrade" and legacy in rows[1]["details"]
    finally:
        store.close()
    os.chmod(tmp_path / "kek", 0o644)
    with pytest.raises(ConfigError, match="chmod"):
        FileKek(tmp_path / "kek")


def store_rows(store: Any) -> list[dict[str, Any]]:
    from sealtorch.keyserver import queries

    return queries.audit_rows(store.db)


def test_audit_export_and_expired_token(ks: RunningKeyServer, tmp_path: Path) -> None:
    from sealtorch.errors import AuthError
    from sealtorch.keyserver.admin import authenticate, create_token
    from sealtorch.keyserver.audit import Head, verify_chain
    from sealtorch.keyserver.bootstrap import open_store
    from sealtorch.keyserver.config import load_config
    from sealtorch.protocol.grant import GrantVerifier

    out = tmp_path / "audit.jsonl"
    keyserver_cli("audit", "export", "--data-dir", str(ks.data_dir), "--out", str(out),
                  env=ks.env)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    rows, head_doc = lines[:-1], lines[-1]["audit_head"]
    head = GrantVerifier(ks.signing_public_key).verify_audit_head(head_doc)
    assert rows and head.seq == rows[-1]["seq"] and head.head == rows[-1]["hash"]
    store, kek = open_store(load_config(ks.data_dir))
    try:
        mac = store.keyring.audit
        assert verify_chain(rows, mac=mac, head=Head(head.seq, head.head)) == []
        rows[0]["details"] = rows[0]["details"].replace("}", ',"x":1}')
        assert any("seq 1" in p and "edited" in p for p in verify_chain(rows, mac=mac))
        # an expired token is refused
        with store.states.change(store.now()) as ch:
            _, token = create_token(ch, "default", -1, actor="test")
        with pytest.raises(AuthError, match="expired"):
            authenticate(store.state(), token, store.now())
    finally:
        store.close()
        kek.close()


def test_slow_body_is_cut_off(ks: RunningKeyServer) -> None:
    import socket

    host, port = "127.0.0.1", int(ks.url.rsplit(":", 1)[1])
    ctx = ssl.create_default_context(cafile=str(ks.ca_cert_path))
    with ctx.wrap_socket(socket.create_connection((host, port)), server_hostname=host) as s:
        s.sendall(b"POST /v1/release HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n{")
        s.settimeout(60)
        data = b""
        while chunk := s.recv(4096):  # the server answers 408 and closes
            data += chunk
    assert data.startswith(b"HTTP/1.1 408")


def test_a_model_id_the_format_accepts_is_registered(ks: RunningKeyServer, cache: SimCache,
                                                     tmp_path: Path) -> None:
    """One model-id rule: a file sealed as 'acme@v1' can be registered and released."""
    import torch

    from sealtorch.format.header import read_header
    from sealtorch.format.keyfile import generate_model_key, write_key_file
    from sealtorch.format.writer import seal

    mk = generate_model_key("acme@v1")
    kf = tmp_path / "acme.key"
    write_key_file(kf, mk)
    seal({"w": torch.ones(2)}, tmp_path / "acme.sealed", mk)
    assert read_header(tmp_path / "acme.sealed").model_id == "acme@v1"
    ks.add_model_file("acme@v1", kf)
    ks.set_policy("acme@v1", sim_policy(MEAS, cache.platform_key))
    with ks.client() as client:
        ev, sk, pk, n = cache.request(client)
        res = client.release(ev, pk, n, ["acme@v1"], private_key=sk)
    assert res.grants[0].grant.model_id == "acme@v1" and res.grants[0].key.equals(mk.key)


def test_a_failed_init_leaves_nothing_and_can_be_retried(tmp_path: Path,
                                                          pg_server: PgServer) -> None:
    """init builds everything in a temporary directory: a failure (no PKCS#11 PIN, a database
    that does not exist) leaves no config, KEK, keys or TLS behind, and a retry just works."""
    env = {k: v for k, v in os.environ.items() if k != "SEALTORCH_PKCS11_PIN"}
    d = tmp_path / "ks"
    bad = keyserver_cli("init", "--data-dir", str(d), "--kek", "pkcs11", env=env, check=False)
    assert bad.returncode != 0 and "SEALTORCH_PKCS11_PIN" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not d.exists() and list(tmp_path.iterdir()) == []
    missing = pg_server.url("sealtorch_no_such_db")
    bad = keyserver_cli("init", "--data-dir", str(d), "--db", missing, env=env, check=False)
    assert bad.returncode != 0 and "sealtorch_no_such_db" in bad.stderr
    assert "check that it runs and exists" in bad.stderr and "Traceback" not in bad.stderr
    assert list(tmp_path.iterdir()) == []
    keyserver_cli("init", "--data-dir", str(d), env=env)
    assert (d / "config.toml").exists() and (d / "state.hwm").exists()
    again = keyserver_cli("init", "--data-dir", str(d), env=env, check=False)
    assert again.returncode != 0 and "already initialised" in again.stderr


def test_a_sim_platform_key_is_text_never_a_path_on_the_server(ks: RunningKeyServer,
                                                               tmp_path: Path) -> None:
    """The admin API takes a key's text forms only: a path is refused without being opened
    (the CLI reads files on the admin's machine, the server never does for a request)."""
    key = sim.init_platform_key(tmp_path / "p")
    pub = tmp_path / "p" / sim.PUBLIC_FILE
    for value in (str(pub), str(key), "/etc/hostname", "~/.ssh/id_ed25519"):
        r = ks.admin("POST", "/v1/admin/sim/platforms", {"public_key": value}, expect=None)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"].startswith("public_key: expected")
        assert value not in r.text
    for text in (pub.read_text(), sim.raw_public(sim.load_platform_public_key(pub)).hex()):
        r = ks.admin("POST", "/v1/admin/sim/platforms", {"public_key": text}, expect=None)
        assert r.status_code == 200 and r.json()["fingerprint"] == sim_fingerprint(key)
