"""docs/tutorial-sim.md, run as written: every ``$ command`` of its console blocks is executed in
order in one shell, and its output is compared with the output the document shows (``...`` is a
wildcard). The README's KeyCacheClient snippet is the tutorial's load.py, so it runs too.

The shell runs in a network namespace of its own, so the tutorial's fixed ports (8443, 8444,
8080) cannot collide with anything else on this machine. To update the document after a change,
run this test with ``SEALTORCH_TUTORIAL_CAPTURE=out.txt`` and copy each step's output from there
(replacing run-specific text with ``...``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import require_service

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "tutorial-sim.md"
README = ROOT / "README.md"
MARK = "@@@tutorial-step"


@dataclass
class Step:
    """One ``$ command`` of the document and the output shown after it."""

    line: int
    command: str
    expected: list[str] = field(default_factory=list)


def parse(text: str) -> list[Step]:
    """The steps of every ```console block, in order (heredocs and ``\\`` continuations kept)."""
    steps: list[Step] = []
    lines = text.splitlines()
    i, in_block = 0, False
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("```"):
            in_block = line.strip() == "```console" if not in_block else False
            i += 1
            continue
        if in_block and line.startswith("$ "):
            cmd = [line[2:]]
            heredoc = re.search(r"<<-?'?(\w+)'?", line)
            while cmd[-1].endswith("\\"):
                i += 1
                cmd.append(lines[i])
            if heredoc:
                end = heredoc.group(1)
                while lines[i] != end:
                    i += 1
                    cmd.append(lines[i])
            steps.append(Step(i + 1, "\n".join(cmd)))
        elif in_block and steps:
            steps[-1].expected.append(line)
        i += 1
    return steps


def matches(expected: list[str], actual: list[str]) -> bool:
    """``expected`` lines against ``actual``: ``...`` inside a line is any text, a line that is
    only ``...`` is any number of lines."""
    if not expected:
        return not actual
    head, rest = expected[0], expected[1:]
    if head == "...":
        return any(matches(rest, actual[k:]) for k in range(len(actual) + 1))
    if not actual:
        return False
    pattern = ".*".join(re.escape(part) for part in head.split("..."))
    return re.fullmatch(pattern, actual[0]) is not None and matches(rest, actual[1:])


def script(steps: list[Step]) -> str:
    """One bash script running every step, each framed by markers with its exit status."""
    out = ["ip link set lo up"]
    for n, s in enumerate(steps):
        out += [f"printf '\\n{MARK} {n}\\n'", "{", s.command, "} 2>&1",
                f"printf '\\n{MARK} {n} rc=%d\\n' $?"]
    return "\n".join(out) + "\n"


def split(output: str, count: int) -> list[tuple[list[str], int | None]]:
    """(output lines, exit status) per step from the framed output."""
    got: list[tuple[list[str], int | None]] = [([], None) for _ in range(count)]
    parts = re.split(rf"\n{MARK} (\d+)(?: rc=(\d+))?\n", "\n" + output)
    current: int | None = None
    for k in range(1, len(parts), 3):
        n, rc, body = int(parts[k]), parts[k + 1], parts[k + 2] if k + 2 < len(parts) else ""
        if rc is None:
            current = n
            got[n] = (body.strip("\n").splitlines(), None)
        elif current == n:
            got[n] = (got[n][0], int(rc))
            stray = body.strip("\n")
            assert not stray, f"output between steps: {stray[:200]}"
    return got


def test_parse_and_match() -> None:
    steps = parse("x\n```console\n$ a \\\n  b\nout 1\n$ cat > f <<'EOF'\nbody\nEOF\n```\n"
                  "$ not a step\n```sh\n$ nor this\n```\n")
    assert [(s.command, s.expected) for s in steps] == [("a \\\n  b", ["out 1"]),
                                                        ("cat > f <<'EOF'\nbody\nEOF", [])]
    assert matches(["id ...", "...", "end"], ["id 42", "x", "y", "end"])
    assert matches(["..."], []) and not matches([], ["x"]) and not matches(["a"], ["ab"])


def test_tutorial_runs_as_written(tmp_path: Path) -> None:
    if not (shutil.which("unshare") and shutil.which("ip") and shutil.which("curl")):
        require_service("unshare, ip and curl (the tutorial runs in a network namespace)")
    probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        require_service(f"a network namespace ({probe.stderr.strip()[:200]})")
    steps = parse(TUTORIAL.read_text())
    (tmp_path / "tutorial.sh").write_text(script(steps))
    env = {**os.environ, "HOME": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    p = subprocess.Popen(["unshare", "-n", "bash", "tutorial.sh"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        output, _ = p.communicate(timeout=600)
    finally:  # the services the tutorial started in the background, if it stopped early
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    results = split(output, len(steps))
    capture = os.environ.get("SEALTORCH_TUTORIAL_CAPTURE")
    if capture:  # to update the document: each step with what it printed now
        Path(capture).write_text("".join(
            f"$ {s.command}\n" + "".join(f"{x}\n" for x in lines) + f"# rc={rc}\n"
            for s, (lines, rc) in zip(steps, results, strict=True)))
    for step, (lines, rc) in zip(steps, results, strict=True):
        where = f"docs/tutorial-sim.md:{step.line}: {step.command.splitlines()[0]}"
        assert rc is not None, f"{where}: did not run (output so far:\n{output[-3000:]})"
        failing = any(x.startswith("error [") for x in step.expected)
        assert rc == (2 if failing else 0), f"{where}: exit status {rc}\n" + "\n".join(lines)
        assert matches(step.expected, lines), (
            f"{where}: output differs from the document\n--- expected\n"
            + "\n".join(step.expected) + "\n--- got\n" + "\n".join(lines))


def test_readme_keycache_snippet_is_the_tutorials() -> None:
    """The README's KeyCacheClient example is exactly the tutorial's load.py (which runs)."""
    readme = README.read_text()
    snippets = re.findall(r"```python\n(.*?)```", readme, re.S)
    client = [s for s in snippets if "KeyCacheClient(" in s]
    assert len(client) == 1
    body = re.search(r"\$ cat > load.py <<'EOF'\n(.*?)\nEOF\n", TUTORIAL.read_text(), re.S)
    assert body is not None and client[0].strip() == body.group(1).strip()
