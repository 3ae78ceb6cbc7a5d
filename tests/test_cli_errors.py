"""Every CLI mistake a newcomer made is one line with a code, what was wrong and what to do,
and writes nothing; the public API raises sealtorch.errors types for the same mistakes."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization

import sealtorch
from sealtorch.attestation import binding, sim
from sealtorch.attestation.attesters.sim import SimAttester
from sealtorch.errors import KeyFileError, OutputError, SealtorchError
from sealtorch.format.keyfile import generate_model_key, write_key_file


def run(*args: str, cwd: Path, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", "-m", "sealtorch", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120, env={**os.environ, **(env or {})})


def one_line_error(p: subprocess.CompletedProcess[str], code: str) -> str:
    """The single stderr line of a failed command, checked to carry ``code``."""
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith(f"error [{code}]: "), lines[0]
    return lines[0]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A directory with a state_dict, its key file, and a plain file ``f`` in the way."""
    torch.save({"w": torch.arange(6, dtype=torch.float32)}, tmp_path / "m.pt")
    write_key_file(tmp_path / "m.key", generate_model_key("acme/m"))
    (tmp_path / "f").write_text("a file, not a directory\n")
    return tmp_path


def test_seal_into_a_missing_directory(work: Path) -> None:
    line = one_line_error(run("seal", "m.pt", "-o", "missing/dir/m.sealed", "--key-file",
                              "m.key", cwd=work), "output_invalid")
    assert "the directory missing/dir does not exist" in line and "create it" in line
    assert sorted(p.name for p in work.iterdir()) == ["f", "m.key", "m.pt"]


def test_seal_refuses_to_overwrite_without_force(work: Path) -> None:
    assert run("seal", "m.pt", "-o", "m.sealed", "--key-file", "m.key", cwd=work).returncode == 0
    before = (work / "m.sealed").read_bytes()
    line = one_line_error(run("seal", "m.pt", "-o", "m.sealed", "--key-file", "m.key",
                              cwd=work), "output_invalid")
    assert "already exists; pass --force" in line
    assert (work / "m.sealed").read_bytes() == before
    assert run("seal", "m.pt", "-o", "m.sealed", "--key-file", "m.key", "--force",
               cwd=work).returncode == 0
    assert (work / "m.sealed").read_bytes() != before  # a fresh salt: a new file
    assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]


def test_seal_through_a_symlink_needs_force_and_replaces_the_link(work: Path) -> None:
    victim = work / "victim.txt"
    victim.write_text("keep me\n")
    (work / "link.sealed").symlink_to(victim)
    line = one_line_error(run("seal", "m.pt", "-o", "link.sealed", "--key-file", "m.key",
                              cwd=work), "output_invalid")
    assert "link.sealed already exists" in line
    (work / "dangling.sealed").symlink_to(work / "nowhere")
    one_line_error(run("seal", "m.pt", "-o", "dangling.sealed", "--key-file", "m.key",
                       cwd=work), "output_invalid")
    assert not (work / "nowhere").exists()
    assert run("seal", "m.pt", "-o", "link.sealed", "--key-file", "m.key", "--force",
               cwd=work).returncode == 0
    assert victim.read_text() == "keep me\n"  # the link was replaced, not its target
    assert not (work / "link.sealed").is_symlink()


@pytest.mark.parametrize("args", [
    ["gramine", "manifest", "--role", "serve", "-o", "missing/m.toml"],
    ["gramine", "manifest", "--role", "serve", "-o", "f/m.toml"],
    ["sim", "init", "--dir", "f/sim"],
    ["policy", "init", "--tee", "sim", "--measurement", "00" * 32, "-o", "f/p.toml"],
    ["policy", "init", "--tee", "sim", "--measurement", "00" * 32, "-o", "missing/p.toml"],
    ["keygen", "--model-id", "acme/m", "-o", "f/k.key"],
    ["keygen", "--signing", "-o", "missing/owner.pem"],
    ["unseal", "m.pt", "--key-file", "m.key", "-o", "f/plain.safetensors"],
    ["demo", "--workdir", "f/wd"],
], ids=["manifest-missing", "manifest-file", "sim-init", "policy-file", "policy-missing",
        "keygen", "keygen-signing", "unseal", "demo"])
def test_an_output_path_that_cannot_be_written(work: Path, args: list[str]) -> None:
    line = one_line_error(run(*args, cwd=work), "output_invalid")
    assert ("f is a file, not a directory" in line or "is not a directory" in line
            or "does not exist" in line), line
    assert sorted(p.name for p in work.iterdir()) == ["f", "m.key", "m.pt"]


def test_inspect_of_a_truncated_file_fails(work: Path) -> None:
    assert run("seal", "m.pt", "-o", "m.sealed", "--key-file", "m.key", cwd=work).returncode == 0
    data = (work / "m.sealed").read_bytes()
    (work / "m.sealed").write_bytes(data[:-10])
    line = one_line_error(run("inspect", "m.sealed", cwd=work), "truncated")
    assert "10 bytes shorter than its header says" in line and "copy the sealed file" in line
    (work / "m.sealed").write_bytes(data + b"x")
    one_line_error(run("inspect", "m.sealed", cwd=work), "trailing_data")


def test_attest_measure_takes_only_roles_that_exist(work: Path) -> None:
    p = run("attest", "measure", "--role", "bogus", cwd=work)
    assert p.returncode == 2 and "'bogus' is not one of 'dkeycache', 'serve'" in p.stderr
    assert p.stdout == ""
    good = run("attest", "measure", "--role", "serve", cwd=work)
    assert good.returncode == 0 and len(good.stdout.strip()) == 64


def test_a_warning_is_one_line_printed_once(work: Path) -> None:
    sim.init_platform_key(work / "sim")
    ev = SimAttester(work / "sim" / sim.KEY_FILE, sim.measure("serve"), role="serve").attest(
        binding.report_data("local", b"n" * 32, 32, b"k" * 32, b"a" * 32))
    (work / "ev.json").write_bytes(ev.to_json())
    p = run("attest", "verify", "ev.json", "--tee", "sim", "--sim-key",
            str(work / "sim" / sim.PUBLIC_FILE), cwd=work)
    assert p.returncode == 0, p.stderr
    lines = [x for x in p.stderr.splitlines() if "sim attestation verifier" in x]
    assert len(lines) == 1, p.stderr
    assert ".py:" not in p.stderr and "warnings.warn" not in p.stderr


def test_policy_init_writes_a_cache_and_a_runtime_identity(work: Path) -> None:
    import tomllib

    sim.init_platform_key(work / "sim")
    p = run("policy", "init", "--tee", "sim", "--platform-key",
            str(work / "sim" / sim.PUBLIC_FILE), "--cache", "measurement=" + "aa" * 32,
            "--runtime", "measurement=" + "bb" * 32, "--runtime", "name=web",
            "--factory", "sealtorch.models.resnet:resnet50", "-o", "p.toml", cwd=work)
    assert p.returncode == 0, p.stderr
    doc = tomllib.loads((work / "p.toml").read_text())
    fp = sim.fingerprint(sim.load_platform_key(work / "sim" / sim.KEY_FILE).public_key())
    assert [(i["measurement"], i["platform_key"]) for i in doc["caches"]] == [("aa" * 32, fp)]
    assert [(i["measurement"], i["name"]) for i in doc["runtimes"]] == [("bb" * 32, "web")]
    bad = run("policy", "init", "--tee", "sim", "--platform-key", fp, "--measurement", "aa" * 32,
              "--runtime", "mrenclave=" + "cc" * 32, "-o", "q.toml", cwd=work)
    assert "not valid for tee 'sim'" in one_line_error(bad, "policy_invalid")


def test_api_errors_are_sealtorch_errors(work: Path) -> None:
    mk = generate_model_key("acme/m")
    with pytest.raises(OutputError, match="does not exist"):
        sealtorch.seal({"w": torch.zeros(2)}, "/nonexistent/x.sealed", mk)
    path = work / "m.sealed"
    sealtorch.seal({"w": torch.zeros(2)}, path, mk)
    with pytest.raises(OutputError, match="already exists"):
        sealtorch.seal({"w": torch.zeros(2)}, path, mk)
    for bad in (b"123", 123, bytearray(32)):
        with pytest.raises(KeyFileError, match="key= takes a ModelKey") as ei:
            sealtorch.load(path, key=bad)  # type: ignore[arg-type]
        assert isinstance(ei.value, SealtorchError)


def _file_size_limit(limit: int) -> None:
    """In the child: files may grow to ``limit`` bytes; a write beyond fails with EFBIG (and is
    first cut short, as on a disk that fills up) instead of killing the process."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("command", ["seal", "unseal"])
def test_an_output_that_cannot_be_written_whole_leaves_nothing(work: Path, command: str) -> None:
    """A write cut short (a disk filling up, here a file size limit) is one clear error, and
    neither the output nor a partial temporary file is left: before, a short write to the
    sealed file went unnoticed and a truncated file was published with exit status 0."""
    torch.save({"w": torch.zeros(1 << 19)}, work / "big.pt")  # 2 MiB
    seal = ["seal", "big.pt", "-o", "big.sealed", "--key-file", "m.key"]
    if command == "unseal":
        assert run(*seal, cwd=work).returncode == 0
    args = seal if command == "seal" else ["unseal", "big.sealed", "--key-file", "m.key", "-o",
                                           "plain.safetensors"]
    before = sorted(p.name for p in work.iterdir())
    p = subprocess.run([sys.executable, "-I", "-m", "sealtorch", *args], capture_output=True,
                       text=True, cwd=work, timeout=120,
                       preexec_fn=lambda: _file_size_limit(1 << 20))
    line = one_line_error(p, "output_invalid")
    assert "File too large" in line and "nothing was written" in line, line
    assert sorted(p.name for p in work.iterdir()) == before  # no output, no temporary file
    # with room, the same command works
    assert run(*args, cwd=work).returncode == 0


def _small_outputs(work: Path) -> dict[str, tuple[list[str], bytes | None]]:
    """Commands that write one small output, each with the exact bytes it writes (rendered
    by the library code the command uses; ``None``: checked as TOML only)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sealtorch.attestation.initdata import CONFIG_ENTRY, render_initdata
    from sealtorch.format.signing import raw_public
    from sealtorch.runtime.gramine import ManifestOptions, render_manifest

    key = base64.b64encode(raw_public(Ed25519PrivateKey.generate().public_key())).decode()
    config = (f'[runtime]\nserver_public_key = "{key}"\n'
              'initdata = "/run/sealtorch-initdata/cc_init_data"\n')
    (work / "sealtorch.toml").write_text(config)
    notes = "".join(f"note {i}\n" for i in range(300))  # ~3 KiB
    (work / "notes.txt").write_text(notes)
    absent = work / "absent.toml"  # the enclave's config path, not validated here
    sim.init_platform_key(work / "sim")
    return {
        "initdata": (["initdata", "sealtorch.toml", "-o", "out.toml", "--entry",
                      "notes.txt=notes.txt"],
                     render_initdata({CONFIG_ENTRY: config, "notes.txt": notes}, "sha384")),
        "gramine-manifest": (["gramine", "manifest", "--role", "serve", "--config", str(absent),
                              "-o", "out.toml"],
                             render_manifest(ManifestOptions(role="serve",
                                                             config=absent)).encode()),
        "policy-init": (["policy", "init", "--tee", "sim", "--measurement", "00" * 32,
                         "--platform-key", str(work / "sim" / sim.PUBLIC_FILE),
                         *(a for i in range(50) for a in ("--factory", f"pkg.m{i}:build")),
                         "-o", "out.toml"], None),
    }


@pytest.mark.parametrize("command", ["initdata", "gramine-manifest", "policy-init"])
def test_a_small_output_that_cannot_be_written_whole_leaves_nothing(work: Path,
                                                                     command: str) -> None:
    """As for sealed files: a write cut short is one clear error with no partial output and
    no temporary file (before, these wrote in place: a truncated file, sometimes exit 0);
    with room the same command writes the same bytes as before, mode 0644."""
    import tomllib

    args, expected = _small_outputs(work)[command]
    before = sorted(p.name for p in work.iterdir())
    limit = 1024  # -B: a bytecode cache cut short at the limit would be a corrupt cache
    p = subprocess.run([sys.executable, "-I", "-B", "-m", "sealtorch", *args],
                       capture_output=True, text=True, cwd=work, timeout=120,
                       preexec_fn=lambda: _file_size_limit(limit))
    line = one_line_error(p, "output_invalid")
    assert "cannot write out.toml (File too large)" in line, line
    assert "nothing was written" in line and "make room" in line, line
    assert sorted(p.name for p in work.iterdir()) == before  # no output, no temporary file
    assert run(*args, cwd=work).returncode == 0
    written = (work / "out.toml").read_bytes()
    assert len(written) > limit
    if expected is not None:
        assert written == expected
    else:
        assert len(tomllib.loads(written.decode())["factories"]) == 50
    assert (work / "out.toml").stat().st_mode & 0o777 == 0o644
    assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]


def test_a_small_output_into_a_pipe_writes_into_it(work: Path) -> None:
    """With --force, an existing pipe (like /dev/stdout) is written into, not replaced by a
    file beside it."""
    args, expected = _small_outputs(work)["initdata"]
    fifo = work / "out.toml"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that the writer's open succeeds
    try:
        p = run(*args, "--force", cwd=work)
        assert p.returncode == 0, p.stderr
        got = b""
        while chunk := os.read(reader, 1 << 16):
            got += chunk
    finally:
        os.close(reader)
    assert got == expected
    assert fifo.is_fifo()
    assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]


def test_a_sim_platform_key_cut_short_leaves_no_key(work: Path) -> None:
    """`sim init` writes its public key, then its private key, each staged: a write cut short
    leaves no private key and no partial file (so a retry needs no --force), and with room
    both are written, the public key the private key's."""
    for limit in (64, 116):  # smaller than either PEM; room for the public key (113 bytes) only
        p = subprocess.run([sys.executable, "-I", "-B", "-m", "sealtorch", "sim", "init",
                            "--dir", "sim"], capture_output=True, text=True, cwd=work,
                           timeout=120, preexec_fn=lambda n=limit: _file_size_limit(n))
        line = one_line_error(p, "output_invalid")
        assert "File too large" in line and "nothing was written" in line, line
        left = sorted(x.name for x in (work / "sim").iterdir())
        assert left in ([], [sim.PUBLIC_FILE]), left  # no private key, no temporary file
    assert run("sim", "init", "--dir", "sim", cwd=work).returncode == 0
    key = sim.load_platform_key(work / "sim" / sim.KEY_FILE)  # 0600, and its public key matches
    public = (work / "sim" / sim.PUBLIC_FILE).read_bytes()
    assert public == key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
