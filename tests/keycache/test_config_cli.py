"""The measured configuration, the dkeycache CLI and the benchmark command."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest

from sealtorch.errors import ConfigError
from sealtorch.keycache.config import parse_config

PUB = base64.b64encode(bytes(range(32))).decode()


def cfg(**kw: str) -> bytes:
    base = {"keyserver_url": '"https://127.0.0.1:8443"', "server_public_key": f'"{PUB}"'}
    base.update(kw)
    return ("[keycache]\n" + "".join(f"{k} = {v}\n" for k, v in base.items() if v)).encode()


def test_valid_config_keeps_raw_bytes() -> None:
    raw = cfg(poll_interval="5", models='["a", "b"]')
    c = parse_config(raw)
    assert c.raw == raw and c.poll_interval == 5.0 and c.models == ("a", "b")
    assert c.local_auth == "auto" and c.socket.startswith("/")


@pytest.mark.parametrize("kw, msg", [
    ({"keyserver_url": '"http://127.0.0.1:8443"'}, "https"),
    ({"server_public_key": '"bm90IGEga2V5"'}, "server_public_key"),
    ({"server_public_key": ""}, "server_public_key"),
    ({"typo_field": "1"}, "unknown config field"),
    ({"poll_interval": "0"}, "poll_interval"),
    ({"local_auth": '"trust-me"'}, "local_auth"),
    ({"socket": '"relative.sock"'}, "socket"),
    ({"models": '["bad id!"]'}, "models"),
])
def test_invalid_config_rejected(kw: dict[str, str], msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        parse_config(cfg(**kw))


def test_config_not_toml() -> None:
    with pytest.raises(ConfigError, match="TOML"):
        parse_config(b"[keycache\nx=")


def test_serve_refuses_bad_config_and_auto_never_picks_sim(tmp_path) -> None:
    p = tmp_path / "c.toml"
    p.write_bytes(cfg(keyserver_url='"http://x"'))
    r = subprocess.run([sys.executable, "-m", "sealtorch.keycache", "serve", "--config", str(p)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "config_invalid" in r.stderr
    p.write_bytes(cfg(socket=f'"{tmp_path}/s.sock"'))
    r = subprocess.run([sys.executable, "-m", "sealtorch.keycache", "serve", "--config", str(p)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "attester_unavailable" in r.stderr


def test_status_without_cache_fails_cleanly(tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "sealtorch.keycache", "status", "--socket",
                        str(tmp_path / "none.sock")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unavailable" in r.stderr


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_bench_keycache_json(transport: str) -> None:
    r = subprocess.run([sys.executable, "-m", "sealtorch", "bench", "keycache", "--json",
                        "--fetches", "60", "--sessions", "2", "--concurrency", "4",
                        "--transport", transport],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["transport"] == transport
    for k in ("fetch_p50_ms", "fetch_p99_ms", "session_setup_ms", "requests_per_s_1",
              "requests_per_s_concurrent"):
        assert res[k] > 0
    assert res["fetch_p99_ms"] >= res["fetch_p50_ms"]
