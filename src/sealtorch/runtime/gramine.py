"""Gramine manifest templates for the two in-enclave roles (``serve`` and ``keycache``).

The output is valid TOML and a valid ``gramine-manifest`` (Jinja) template at once: only the
Gramine install locations stay as ``{{ gramine.* }}`` placeholders inside strings. What the
enclave runs is fixed here and therefore measured: ``loader.argv`` (Python with ``-I``) and
``loader.env`` are literal, no ``insecure__*`` option appears, ``sgx.debug = false``,
``sgx.file_check_policy = "strict"``, DCAP remote attestation, and the Python runtime, the
sealtorch package and the role's measured configuration (which pins the key server's key) are
trusted files, so changing any of them changes MRENCLAVE.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealtorch.errors import ConfigError

ROLES = ("serve", "keycache")
SYSTEM_LIB_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu")
#: sized for PyTorch: ResNet-50-class models, intra-op thread pool, uvicorn and the batcher
#: ISVPRODID differs per role, so that an MRSIGNER-based policy can tell the key cache from the
#: runtime (both are signed by the same key)
DEFAULTS: dict[str, dict[str, Any]] = {
    "serve": {"enclave_size": "16G", "max_threads": 64, "omp_threads": 8, "isvprodid": 2},
    "keycache": {"enclave_size": "2G", "max_threads": 16, "omp_threads": 1, "isvprodid": 1},
}


@dataclass
class ManifestOptions:
    """Everything the manifest fixes; defaults match the docs (docs/gramine.md)."""

    role: str
    config: Path = Path("/etc/sealtorch/runtime.toml")
    model: Path = Path("/models/model.sealed")
    factory: str = "sealtorch.models.resnet:resnet50"
    socket: str = "/run/sealtorch/dkeycache.sock"
    host: str = "0.0.0.0"
    port: int = 8080
    max_batch: int = 8
    enclave_size: str | None = None
    max_threads: int | None = None
    omp_threads: int | None = None
    isvprodid: int | None = None  # None: the role's default (keycache 1, serve 2)
    isvsvn: int = 1
    ca_cert: Path | None = None
    python: str = field(default_factory=lambda: os.path.realpath(sys.executable))
    extra_trusted: list[str] = field(default_factory=list)


def _package_root() -> Path:
    import sealtorch

    return Path(sealtorch.__file__).resolve().parent


def _python_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    out: list[str] = []
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = str(Path(paths[key]).resolve())
        if p not in out:
            out.append(p)
    return out


def _argv(o: ManifestOptions) -> list[str]:
    if o.role == "serve":
        return ["python3", "-I", "-m", "sealtorch", "serve", str(o.model),
                "--factory", o.factory, "--keycache", o.socket, "--config", str(o.config),
                "--attester", "sgx", "--host", o.host, "--port", str(o.port),
                "--max-batch", str(o.max_batch)]
    return ["python3", "-I", "-m", "sealtorch.keycache", "serve", "--config", str(o.config),
            "--attester", "sgx"]


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string for everything we emit
    if isinstance(v, list):
        if v and isinstance(v[0], dict):
            return "[\n" + ",\n".join("  " + _toml(x) for x in v) + ",\n]"
        return "[\n" + "".join(f"  {_toml(x)},\n" for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    raise ConfigError(f"cannot write {type(v).__name__} to a manifest")


def render_manifest(o: ManifestOptions) -> str:
    """The manifest text for ``o.role`` (TOML; ``{{ gramine.* }}`` left for gramine-manifest)."""
    if o.role not in ROLES:
        raise ConfigError(f"role must be one of {', '.join(ROLES)}")
    if not o.config.is_absolute() or (o.role == "serve" and not o.model.is_absolute()):
        raise ConfigError("config and model paths in a manifest must be absolute")
    d = DEFAULTS[o.role]
    enclave_size = o.enclave_size or d["enclave_size"]
    max_threads = o.max_threads or d["max_threads"]
    omp = o.omp_threads or d["omp_threads"]
    pkg = str(_package_root())
    py_dirs = _python_dirs()
    mounts: list[dict[str, str]] = [
        {"path": "/lib", "uri": "file:{{ gramine.runtimedir() }}"},
        *({"path": p, "uri": f"file:{p}"} for p in SYSTEM_LIB_DIRS),
        {"path": o.python, "uri": f"file:{o.python}"},
        *({"path": p, "uri": f"file:{p}"} for p in py_dirs),
        {"path": str(o.config.parent), "uri": f"file:{o.config.parent}"},
        {"type": "tmpfs", "path": "/tmp"},  # noqa: S108 - in-enclave tmpfs, not the host
    ]
    if o.role == "serve" and o.model.parent != o.config.parent:
        mounts.insert(-1, {"path": str(o.model.parent), "uri": f"file:{o.model.parent}"})
    if o.ca_cert is not None and o.ca_cert.parent != o.config.parent:
        mounts.insert(-1, {"path": str(o.ca_cert.parent), "uri": f"file:{o.ca_cert.parent}"})
    if not any(pkg.startswith(p + "/") for p in py_dirs):  # e.g. an editable install
        mounts.insert(-1, {"path": pkg, "uri": f"file:{pkg}"})
    trusted = [
        "file:{{ gramine.libos }}",
        "file:{{ gramine.runtimedir() }}/",
        *(f"file:{p}/" for p in SYSTEM_LIB_DIRS),
        f"file:{o.python}",
        *(f"file:{p}/" for p in py_dirs),
        f"file:{pkg}/",
        f"file:{o.config}",  # the measured config: pins the key server's release-signing key
    ]
    if o.ca_cert is not None:
        trusted.append(f"file:{o.ca_cert}")
    trusted += o.extra_trusted
    # dedupe, keep order
    trusted = list(dict.fromkeys(trusted))
    lines = [
        f"# Gramine manifest for sealtorch role {o.role!r} (generated by `sealtorch gramine "
        "manifest`).",
        "# Build:  gramine-manifest this.toml > sealtorch.manifest && gramine-sgx-sign "
        "--manifest sealtorch.manifest --output sealtorch.manifest.sgx",
        "# Then put the MRENCLAVE/MRSIGNER printed by gramine-sgx-sign into the model policy.",
        "# Everything below is measured. Do not add insecure__* options or host passthrough.",
        "",
        f"libos.entrypoint = {_toml(o.python)}",
        f"loader.entrypoint.uri = {_toml('file:{{ gramine.libos }}')}",
        f"loader.log_level = {_toml('error')}",
        f"loader.argv = {_toml(_argv(o))}",
        "",
        "[loader.env]",
        f"LD_LIBRARY_PATH = {_toml('/lib:' + ':'.join(SYSTEM_LIB_DIRS))}",
        f"PATH = {_toml(str(Path(o.python).parent))}",
        f"HOME = {_toml('/tmp')}",  # noqa: S108 - the in-enclave tmpfs
        f"PYTHONDONTWRITEBYTECODE = {_toml('1')}",
        f"PYTHONHASHSEED = {_toml('0')}",
        f"OMP_NUM_THREADS = {_toml(str(omp))}",
        f"MKL_NUM_THREADS = {_toml(str(omp))}",
        "",
        "[fs]",
        f"mounts = {_toml(mounts)}",
        "",
        "[sys]",
        f"stack.size = {_toml('4M')}",
        f"enable_extra_runtime_domain_names_conf = {_toml(o.role == 'keycache')}",
        "",
        "[sgx]",
        f"debug = {_toml(False)}",
        f"edmm_enable = {_toml(False)}",
        f"enclave_size = {_toml(enclave_size)}",
        f"max_threads = {_toml(max_threads)}",
        f"remote_attestation = {_toml('dcap')}",
        f"file_check_policy = {_toml('strict')}",
        f"isvprodid = {_toml(d['isvprodid'] if o.isvprodid is None else o.isvprodid)}",
        f"isvsvn = {_toml(o.isvsvn)}",
        f"trusted_files = {_toml(trusted)}",
    ]
    if o.role == "serve":
        lines += [
            "# the sealed model is authenticated by its own AEAD tags and key commitment, so it",
            "# is read as an allowed (not trusted) file: re-sealing needs no new MRENCLAVE",
            f"allowed_files = {_toml([f'file:{o.model}'])}",
        ]
    return "\n".join(lines) + "\n"
