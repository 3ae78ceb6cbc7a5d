import subprocess
import sys

import pytest

import sealtorch
from sealtorch._secret import Secret, wipe


def test_cli_help_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sealtorch", "--help"], capture_output=True, text=True, check=True
    )
    assert "Seal PyTorch models" in out.stdout


def test_secret_is_redacted_and_wipes() -> None:
    s = Secret(b"\x01" * 32)
    assert "01" not in repr(s) and "redacted" in repr(s)
    assert s.equals(b"\x01" * 32) and not s.equals(b"\x02" * 32)
    s.wipe()
    assert s.wiped and bytes(s) == bytes(32)
    buf = bytearray(b"abc")
    wipe(buf)
    assert buf == bytearray(3)


def test_secret_refuses_pickle() -> None:
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(Secret(b"k"))


def test_unknown_attribute() -> None:
    with pytest.raises(AttributeError):
        _ = sealtorch.does_not_exist  # type: ignore[attr-defined]
