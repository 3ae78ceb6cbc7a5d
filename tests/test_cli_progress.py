"""On a terminal, the long CLI steps show a rich progress display (seal, while reading the input
and then per byte; verify; unseal; inspect); redirected, they print only their result."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sealtorch.format.keyfile import generate_model_key, write_key_file


def on_terminal(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run ``sealtorch ARGS`` with stdout and stderr on a pseudo-terminal; (status, screen)."""
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-I", "-m", "sealtorch", *args], cwd=cwd,
                         stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                         env={**os.environ, "TERM": "xterm", "COLUMNS": "120"})
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return p.wait(timeout=120), b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("progress")
    torch.save({"w": torch.zeros(1 << 20)}, d / "m.pt")  # 4 MiB
    write_key_file(d / "m.key", generate_model_key("acme/m"))
    return d


SEAL = ["seal", "m.pt", "-o", "m.sealed", "--key-file", "m.key", "--chunk-size", "64k"]
KEYED = ["m.sealed", "--key-file", "m.key"]


@pytest.mark.parametrize(("args", "again", "shown"), [
    (SEAL, [*SEAL, "--force"], "reading m.pt"),
    (["verify", *KEYED], ["verify", *KEYED], "verifying m.sealed"),
    (["unseal", *KEYED, "-o", "p1.safetensors"], ["unseal", *KEYED, "-o", "p2.safetensors"],
     "decrypting m.sealed"),
    (["inspect", *KEYED], ["inspect", *KEYED], "reading m.sealed"),
], ids=["seal", "verify", "unseal", "inspect"])
def test_long_steps_show_progress_on_a_terminal(work: Path, args: list[str], again: list[str],
                                                shown: str) -> None:
    rc, screen = on_terminal(args, work)
    assert rc == 0, screen
    assert shown in screen, screen
    redirected = subprocess.run([sys.executable, "-I", "-m", "sealtorch", *again], cwd=work,
                                capture_output=True, text=True, timeout=120)
    assert redirected.returncode == 0, redirected.stderr
    assert redirected.stderr == ""  # no progress display when nobody watches
