"""Secrets hygiene: run the whole flow (dkeyserver, dkeycache, a runtime, ``sealtorch serve``),
provoke errors everywhere, then search every log line, error body (validation errors too),
metrics page, audit/admin answer, CLI output, file in the work dir and new temp file for every
secret of the run — model key, derived file key, HPKE private keys, KEK, release-signing key and
admin tokens — raw, hex (both cases) and base64 (standard and URL-safe, at every alignment).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
import warnings
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from tests.servers import keyserver_cli

from sealtorch._secret import Secret
from sealtorch.attestation import sim
from sealtorch.attestation.attesters.sim import SimAttester
from sealtorch.format.header import read_header
from sealtorch.format.keyfile import ModelKey
from sealtorch.format.keys import derive_file_key
from sealtorch.keycache.client import KeyCacheClient
from sealtorch.protocol.local import call
from sealtorch.protocol.release_client import tls_client_context

from .conftest import record
from .test_load import loadgen

warnings.filterwarnings("ignore", category=RuntimeWarning)
# files that are supposed to hold a secret (0600) and are not searched
SECRET_FILES = {"kek.bin", "signing.key", "admin.token", "server.key", "platform.key",
                "sim-platform.key"}


def forms(secret: bytes) -> set[bytes]:
    """Every encoding of ``secret`` we search for (raw, hex, base64 at every alignment)."""
    out = {secret, secret.hex().encode(), secret.hex().upper().encode()}
    for shift in range(3):
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            b = enc(b"\0" * shift + secret).rstrip(b"=")
            # drop the characters that mix in the padding bytes or the next byte
            start = 4 if shift else 0
            out.add(b[start:len(b) - 2])
    return {f for f in out if len(f) >= 16}


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def test_no_secret_in_logs_errors_metrics_or_files(tmp_path: Path) -> None:
    started = time.time()
    lg = loadgen()
    health = _free_port()
    rig = lg.Rig(tmp_path / "w", serve=True, cache_health_port=health).start()
    texts: dict[str, bytes] = {}
    secrets: dict[str, bytes] = {}
    try:
        dep = rig.dep
        ks_dir = dep.ks_dir
        header = read_header(rig.sealed)
        mk = ModelKey(lg.MODEL, 1, Secret(rig.model_key), "x")
        secrets["model key"] = rig.model_key
        secrets["file key"] = bytes(derive_file_key(mk.key, header))
        secrets["KEK"] = (ks_dir / "kek.bin").read_bytes()
        sk = serialization.load_pem_private_key((ks_dir / "signing.key").read_bytes(), None)
        secrets["signing key"] = sk.private_bytes(serialization.Encoding.Raw,
                                                  serialization.PrivateFormat.Raw,
                                                  serialization.NoEncryption())
        token = (ks_dir / "admin.token").read_text().strip()
        secrets["admin token"] = token.encode()
        # a runtime session (its HPKE private key is a secret too) and some load
        att = SimAttester(dep.sim_dir / sim.KEY_FILE, sim.measure("runtime"), role="runtime")
        kc = KeyCacheClient(dep.socket, server_public_key=dep.server_public_key, attester=att)
        kc.file_key(header).wipe()
        secrets["runtime HPKE key"] = kc._sk.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption())
        asyncio.run(lg.run_load(rig, ["keyserver", "keycache", "serve"], [2], 1.0))

        # a second admin token, created over the API
        ctx = tls_client_context(dep.ca_cert)
        auth = {"Authorization": f"Bearer {token}"}
        with httpx.Client(verify=ctx, timeout=30) as h:
            new = h.post(dep.admin_url + "/v1/admin/tokens", json={"ttl_seconds": 600},
                         headers=auth).json()
            secrets["second admin token"] = new["token"].encode()
            # error bodies, validation errors included, from every API
            b64key = base64.b64encode(rig.model_key).decode()
            answers = {
                "ks release bad": h.post(dep.url + "/v1/release", json={
                    "evidence": {"tee": "sim", "quote": b64key}, "public_key": b64key,
                    "nonce": b64key, "models": [b64key]}),
                "ks release garbage": h.post(dep.url + "/v1/release",
                                             content=b"{" + token.encode()),
                "ks model dup": h.post(dep.admin_url + "/v1/admin/models", json={
                    "model_id": lg.MODEL, "key_version": 1, "key": b64key}, headers=auth),
                "ks model bad key": h.post(dep.admin_url + "/v1/admin/models", json={
                    "model_id": "x", "key_version": 1, "key": b64key + "!"}, headers=auth),
                "ks token wrong": h.get(dep.admin_url + "/v1/admin/whoami", headers={
                    "Authorization": f"Bearer {token[:-2]}xx"}),
                "ks policy bad": h.put(dep.admin_url + f"/v1/admin/policy/{lg.MODEL}",
                                       json={"policy": {"key": b64key}}, headers=auth),
                "ks metrics": h.get(dep.admin_url + "/metrics"),
                "ks audit": h.get(dep.admin_url + "/v1/admin/audit?limit=1000", headers=auth),
                "ks models": h.get(dep.admin_url + "/v1/admin/models", headers=auth),
                "ks caches": h.get(dep.admin_url + "/v1/admin/caches", headers=auth),
                "ks verify": h.get(dep.admin_url + "/v1/admin/audit/verify", headers=auth),
            }
        for name, r in answers.items():
            texts[name] = r.content
        with httpx.Client(timeout=60) as h:
            texts["serve bad json"] = h.post(rig.serve_url + "/v2/models/resnet50/infer",
                                             content=b"{" + b64key.encode()).content
            texts["serve bad shape"] = h.post(rig.serve_url + "/v2/models/resnet50/infer",
                                              json={"inputs": [{"name": b64key, "shape": [1],
                                                                "datatype": "FP32",
                                                                "data": [1.0]}]}).content
            texts["serve metrics"] = h.get(rig.serve_url + "/metrics").content
            texts["cache metrics"] = h.get(f"http://127.0.0.1:{health}/metrics").content
            texts["cache health"] = h.get(f"http://127.0.0.1:{health}/healthz").content
        # cache error frames
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(dep.socket)
        texts["cache bad op"] = json.dumps(call(s, {"op": b64key}, timeout=10)).encode()
        texts["cache no session"] = json.dumps(call(s, {"op": "file_key", "model_id": lg.MODEL,
                                                        "header": b64key}, timeout=10)).encode()
        s.close()
        kc.close()
        # CLI output
        env = dict(dep.env, SEALTORCH_ADMIN_TOKEN_FILE=str(ks_dir / "admin.token"),
                   SEALTORCH_CA_CERT=str(dep.ca_cert))
        for args in (["model", "list", "--admin-url", dep.admin_url],
                     ["audit", "show", "--admin-url", dep.admin_url],
                     ["audit", "verify", "--data-dir", str(ks_dir)]):
            p = keyserver_cli(*args, env=env, check=False)
            texts["cli " + " ".join(args[:2])] = (p.stdout + p.stderr).encode()
    finally:
        rig.stop()

    # every file of the run (logs, database, configs, certificates) and new temp files
    files = [p for p in (tmp_path).rglob("*") if p.is_file() and p.name not in SECRET_FILES]
    tmp_new = []
    for root, _, names in os.walk("/tmp"):
        for n in names:
            p = Path(root) / n
            try:
                st = p.stat()
            except OSError:
                continue
            if (st.st_mtime >= started and st.st_size < 8 << 20 and p.is_file()
                    and tmp_path not in p.parents and n not in SECRET_FILES):
                tmp_new.append(p)
        if len(tmp_new) > 5000:
            break
    for p in files + tmp_new:
        try:
            texts[str(p)] = p.read_bytes()
        except OSError:
            continue
    assert any("log" in k for k in texts) and len(texts) > 20
    # positive control: the search finds a secret embedded at any base64 alignment
    for pad in (b"", b"a", b"ab"):
        for enc in (base64.b64encode, base64.urlsafe_b64encode, lambda b: b.hex().encode()):
            blob = b"x" + enc(pad + secrets["model key"] + b"tail")
            assert any(f in blob for f in forms(secrets["model key"]))
    leaks = []
    for sname, sval in secrets.items():
        assert len(sval) >= 16, sname
        for f in forms(sval):
            for where, blob in texts.items():
                if f in blob:
                    leaks.append(f"{sname} in {where}")
    assert not leaks, "secrets leaked:\n" + "\n".join(sorted(set(leaks)))
    record("secrets", places=len(texts), secrets=len(secrets), forms=sum(
        len(forms(v)) for v in secrets.values()), leaks=0)
