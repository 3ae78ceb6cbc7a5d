"""dkeycache's measured configuration file (TOML).

Everything that decides whom the cache trusts lives here and nowhere else: the key server URL,
the pinned release-signing public key, the TLS CA, the poll interval and the local access rules.
The file is part of the TEE measurement (Gramine trusted file, TDX MRCONFIGID, SNP HOST_DATA,
sim: ``sim.measure`` config bytes), so a host cannot point the cache at another server.

Example::

    [keycache]
    keyserver_url = "https://127.0.0.1:8443"   # or a list of replicas: ["https://a:8443", ...]
    server_public_key = "<base64 raw Ed25519 key, or PEM>"
    ca_cert = "/etc/sealtorch/ca.pem"
    poll_interval = 30          # seconds between signed status polls
    models = ["resnet50"]       # optional; default: every model the cache is entitled to
    socket = "/run/sealtorch/dkeycache.sock"
    socket_group = ""           # optional group for a 0660 socket (default 0600)
    local_auth = "auto"         # auto | evidence | peercred
    allowed_uids = []           # peercred mode: uids allowed to connect (default: own uid)
    health_port = 0             # loopback health/metrics listener; 0 = off
    sim_platform_keys = []      # sim only: registered sim platform keys for local evidence
    pccs_url = ""               # SGX local evidence: PCCS to fetch collateral from
    tcp_listen = ""             # optional loopback TCP listener, e.g. "127.0.0.1:7001" (SGX:
                                # Gramine's Unix sockets do not cross enclaves); evidence only
    initdata = "/run/sealtorch-initdata/cc_init_data"  # optional: CoCo pod (docs/kserve.md)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sealtorch._toml import initdata_path, load_table, pinned_server_key
from sealtorch.errors import ConfigError
from sealtorch.ids import is_model_id
from sealtorch.keycache.address import TcpAddress, parse_tcp

MAX_CONFIG_BYTES = 64 * 1024
LOCAL_AUTH_MODES = ("auto", "evidence", "peercred")
_ALLOWED = {
    "keyserver_url", "server_public_key", "ca_cert", "poll_interval", "models", "socket",
    "socket_group", "local_auth", "allowed_uids", "health_port", "sim_platform_keys",
    "renew_fraction", "retry_min", "retry_max", "request_timeout", "pccs_url",
    "tcp_listen", "initdata",
    "collateral",  # refused below with an explanation (it was a host directory)
}


@dataclass(frozen=True)
class CacheConfig:
    """The parsed configuration; ``raw`` is the exact file bytes (what is measured)."""

    keyserver_urls: tuple[str, ...]
    server_public_key: str
    ca_cert: str | None
    poll_interval: float = 30.0
    models: tuple[str, ...] | None = None
    socket: str = "/run/sealtorch/dkeycache.sock"
    socket_group: str | None = None
    local_auth: str = "auto"
    allowed_uids: tuple[int, ...] = ()
    health_port: int = 0
    sim_platform_keys: tuple[str, ...] = ()
    renew_fraction: float = 0.5
    retry_min: float = 0.5
    retry_max: float = 30.0
    request_timeout: float = 10.0
    pccs_url: str | None = None
    tcp_listen: TcpAddress | None = None
    initdata: str | None = None  # CoCo: bound through this initdata document
    raw: bytes = field(default=b"", repr=False)

    @property
    def keyserver_url(self) -> str:
        """The first key server URL (the only one of a single-server configuration)."""
        return self.keyserver_urls[0]


def _num(d: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    v = d.get(name, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise ConfigError(f"config field {name!r} must be a number in [{lo}, {hi}]")
    return float(v)


MAX_KEYSERVER_URLS = 32


def _keyserver_urls(value: object) -> tuple[str, ...]:
    """``keyserver_url``: one https:// URL or a non-empty list of them (the replicas)."""
    urls = value if isinstance(value, list) else [value]
    if not 1 <= len(urls) <= MAX_KEYSERVER_URLS:
        raise ConfigError(f"keyserver_url must be one https:// URL or a list of 1 to "
                          f"{MAX_KEYSERVER_URLS} of them (the key server replicas)")
    for url in urls:
        if not isinstance(url, str) or not url.startswith("https://") or len(url) > 512:
            raise ConfigError("keyserver_url must be an https:// URL or a list of https:// "
                              "URLs (TLS 1.3 is required)")
        try:
            u = urlsplit(url)
            ok = bool(u.hostname) and (u.port is None or u.port > 0)
        except ValueError:  # a port that is not a number, or out of range
            ok = False
        if not ok or u.query or u.fragment or u.username or u.password:
            raise ConfigError("keyserver_url must be https://HOST[:PORT] (no user, query or "
                              "fragment); fix the URL in the configuration")
    if len(set(urls)) != len(urls):
        raise ConfigError("keyserver_url lists the same URL twice; list each replica once")
    return tuple(urls)


def parse_config(raw: bytes) -> CacheConfig:
    """Parse and validate the configuration bytes (strict: unknown fields are errors)."""
    kc = load_table(raw, table="keycache", allowed=_ALLOWED, max_bytes=MAX_CONFIG_BYTES,
                    what="config")
    urls = _keyserver_urls(kc.get("keyserver_url"))
    spk = pinned_server_key(kc)
    ca = kc.get("ca_cert")
    if ca is not None and (not isinstance(ca, str) or not ca):
        raise ConfigError("ca_cert must be a path to the key server's CA certificate")
    models = kc.get("models")
    if models is not None:
        if not isinstance(models, list) or not all(
            is_model_id(m) for m in models
        ):
            raise ConfigError("models must be a list of valid model ids")
        models = tuple(models)
    sock = kc.get("socket", CacheConfig.socket)
    if not isinstance(sock, str) or not sock.startswith("/") or len(sock) > 100:
        raise ConfigError("socket must be an absolute path of at most 100 characters")
    group = kc.get("socket_group") or None
    if group is not None and not isinstance(group, str):
        raise ConfigError("socket_group must be a group name")
    mode = kc.get("local_auth", "auto")
    if mode not in LOCAL_AUTH_MODES:
        raise ConfigError(f"local_auth must be one of {', '.join(LOCAL_AUTH_MODES)}")
    uids = kc.get("allowed_uids", [])
    if not isinstance(uids, list) or not all(
        isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in uids
    ):
        raise ConfigError("allowed_uids must be a list of non-negative integers")
    port = kc.get("health_port", 0)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError("health_port must be a TCP port number (0 = off)")
    simkeys = kc.get("sim_platform_keys", [])
    if not isinstance(simkeys, list) or not all(isinstance(k, str) for k in simkeys):
        raise ConfigError("sim_platform_keys must be a list of strings")
    retry_min = _num(kc, "retry_min", 0.5, 0.01, 60)
    if "collateral" in kc:  # a host directory is not a trusted file
        raise ConfigError("collateral is no longer read from a file: an SGX cache takes the "
                          "DCAP collateral its key server signed ('dkeyserver collateral "
                          "import' on the owner machine); remove the setting")
    pccs = kc.get("pccs_url") or None
    if pccs is not None and (not isinstance(pccs, str) or not pccs.startswith("https://")):
        raise ConfigError("pccs_url must be an https:// URL")
    tcp_raw = kc.get("tcp_listen", "")
    tcp = None
    if tcp_raw != "":
        tcp = parse_tcp(tcp_raw, what="tcp_listen", allow_port_zero=True)
        if mode == "peercred":
            raise ConfigError(
                "tcp_listen cannot be combined with local_auth = \"peercred\": TCP has no peer "
                "credentials; use local_auth = \"evidence\" (SGX) or drop tcp_listen (TDX/SNP "
                "VMs use the Unix socket)"
            )
    return CacheConfig(
        keyserver_urls=urls,
        server_public_key=spk,
        ca_cert=ca,
        poll_interval=_num(kc, "poll_interval", 30.0, 0.05, 86400),
        models=models,
        socket=sock,
        socket_group=group,
        local_auth=mode,
        allowed_uids=tuple(uids),
        health_port=port,
        sim_platform_keys=tuple(simkeys),
        renew_fraction=_num(kc, "renew_fraction", 0.5, 0.1, 0.9),
        retry_min=retry_min,
        retry_max=_num(kc, "retry_max", 30.0, retry_min, 3600),
        request_timeout=_num(kc, "request_timeout", 10.0, 0.1, 300),
        pccs_url=pccs,
        tcp_listen=tcp,
        initdata=initdata_path(kc),
        raw=bytes(raw),
    )


def load_config(path: str | os.PathLike[str]) -> CacheConfig:
    """Read and parse the configuration file at ``path``."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {p} ({e.strerror})") from e
    return parse_config(raw)
