"""``sealtorch demo`` as a user runs it: a real subprocess, real dkeyserver and dkeycache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (the demo's work dir)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmd:
            out.append(cmd)
    return out


def test_demo_runs_the_whole_flow(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    env = dict(os.environ, COLUMNS="200")
    p = subprocess.Popen([sys.executable, "-m", "sealtorch", "demo", "--workdir", str(workdir),
                          "--keep"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, out + err
    assert "outputs vs plaintext model: bit-identical (max |diff| = 0.0)" in out
    # two denials, each by the component whose rule it is, each with its reason
    assert "denied: key cache -> dkeyserver (audited)" in out
    assert "(dkeyserver: denied (audit #" in out
    assert ("reason (key server audit log): caches[0] (sim identity 'demo-dkeycache'): "
            "measurement is") in out
    assert "denied: runtime -> dkeycache" in out and "(dkeycache: policy_denied)" in out
    assert ("reason (key cache decision log): runtimes[0] (sim identity 'demo-serve'): "
            "measurement is") in out
    # --keep: the same steps as commands, with this run's paths
    assert f"dkeyserver init --data-dir {workdir / 'keyserver'}" in out
    assert f"dkeyserver policy set resnet50-demo {workdir / 'policy.toml'}" in out
    assert "sealtorch policy init --tee sim --platform-key" in out
    assert f"dkeycache serve --config {workdir / 'dkeycache.toml'} --attester sim" in out
    for name in ("seal ResNet-50", "attestation: dkeycache -> dkeyserver",
                 "attestation: runtime -> dkeycache", "release: signed policy",
                 "load: allow-listed factory", "inference: KServe v2 HTTP", "stop everything"):
        assert name in out
    assert "no process left running" in out
    # nothing left behind: no process runs on the work dir, logs show both services stopped
    assert _processes_mentioning(str(workdir)) == []
    assert (workdir / "resnet50.sealed").is_file()
    assert "Finished server process" in (workdir / "logs" / "dkeyserver.log").read_text()
    assert '"event": "stopped"' in (workdir / "logs" / "dkeycache.log").read_text()
    # no key material in the logs: the owner's model key never appears
    import json

    key_b64 = json.loads((workdir / "owner" / "resnet50-demo.key").read_text())["key"]
    for log in (workdir / "logs").iterdir():
        assert key_b64 not in log.read_text()
