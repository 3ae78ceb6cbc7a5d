"""The conformance corpus (conformance/v1) against sealtorch's reader and against the spec.

sealtorch must return exactly each vector's expected result through every reader entry point
(load, load_into, verify, inspect, a partial load), refuse each invalid vector under the rule
it names, and the spec's reader rules table, ``format/rules.py`` and the corpus must agree.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from sealtorch._secret import Secret
from sealtorch.errors import FormatError
from sealtorch.format import keyfile, owner, reader, rules
from sealtorch.format.dtypes import NAME_TO_DTYPE

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "conformance" / "v1"
SPEC = REPO / "docs" / "format.md"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text())
TESTS = MANIFEST["tests"]
RULE_ROW = re.compile(r"^\| (R-\d+) \| ([^|]+) \| ([^|]+) \| `([a-z_]+)` \|$", re.MULTILINE)


def spec_rules() -> list[tuple[str, str]]:
    """(rule id, error code) rows of the reader rules table in docs/format.md, in order."""
    return [(m[0], m[3]) for m in RULE_ROW.findall(SPEC.read_text(encoding="utf-8"))]


def model_key(path: str) -> keyfile.ModelKey:
    """The key of a corpus key file (read directly: git does not keep its 0600 mode)."""
    doc = json.loads((CORPUS / path).read_text())
    key = Secret(base64.b64decode(doc["key"], validate=True))
    return keyfile.ModelKey(doc["model_id"], doc["key_version"], key, doc["created"])


def outcome(fn: Any) -> tuple[str, str]:
    """('ok', '') or (error code, message) of calling ``fn``."""
    try:
        fn()
    except FormatError as e:
        return e.code, str(e)
    return "ok", ""


def module_for(tensors: list[dict[str, Any]]) -> torch.nn.Module:
    """A module whose state_dict has the vector's tensors (zeros; aliases tied)."""
    root = torch.nn.Module()
    stored = {
        t["name"]: torch.zeros(t["shape"], dtype=NAME_TO_DTYPE[t["dtype"]])
        for t in tensors
        if "alias_of" not in t
    }
    for t in tensors:
        *path, leaf = t["name"].split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.register_buffer(leaf, stored[t.get("alias_of", t["name"])])
    return root


def digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (little-endian, row-major), as the manifest lists it."""
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()


def check_content(test: dict[str, Any], got: dict[str, torch.Tensor], ordered: bool) -> None:
    """``got`` holds exactly the vector's tensors (in index order if ``ordered``)."""
    names = [t["name"] for t in test["tensors"]]
    assert list(got) == names if ordered else sorted(got) == sorted(names)
    for t in test["tensors"]:
        if "alias_of" in t:
            assert got[t["name"]] is got[t["alias_of"]] or torch.equal(
                got[t["name"]], got[t["alias_of"]]
            )
            continue
        x = got[t["name"]]
        assert x.dtype is NAME_TO_DTYPE[t["dtype"]] and list(x.shape) == t["shape"], t["name"]
        assert digest(x) == t["sha256"], t["name"]


def expect(test: dict[str, Any], got: tuple[str, str], how: str) -> None:
    code, message = got
    assert code == test["expect"], f"{how}: {test['file']}: {code} ({message})"
    if test["result"] == "invalid":  # refused under the very rule the vector breaks
        assert message.endswith(f"(format rule {test['rule']})"), f"{how}: {message}"


@pytest.mark.parametrize("test", TESTS, ids=[Path(t["file"]).stem for t in TESTS])
def test_sealtorch_reader_returns_the_manifest_result(test):
    path, key = CORPUS / test["file"], model_key(test["key"])
    signer = bytes.fromhex(test["signer"]) if "signer" in test else None
    loaded: dict[str, torch.Tensor] = {}
    expect(test, outcome(lambda: loaded.update(reader.load(path, key=key, signer=signer))), "load")
    expect(test, outcome(lambda: owner.verify(path, key=key, signer=signer)), "verify")
    module = module_for(test.get("tensors", []))
    expect(test, outcome(lambda: reader.load_into(module, path, key=key, signer=signer)),
           "load_into")  # fmt: skip
    if test["result"] == "valid":
        check_content(test, loaded, ordered=True)
        check_content(test, dict(module.state_dict(keep_vars=True)), ordered=False)
        with reader.open_sealed(path, key=key) as sf:
            assert sf.index.metadata == test["metadata"]
        return
    for t in module.state_dict().values():  # a failed load_into leaves nothing behind
        assert not t.reshape(-1).view(torch.uint8).any()
    # inspect opens (header, key, index, signature) but decrypts no chunk: it refuses every
    # vector that breaks an earlier rule, with the same code
    before_chunks = int(test["rule"][2:]) < int(rules.CHUNK_TAG.id[2:])
    if before_chunks and "signer" not in test:
        expect(test, outcome(lambda: owner.inspect(path, key=key)), "inspect")


@pytest.mark.parametrize(
    "test",
    [t for t in TESTS if t["result"] == "valid" and any("dtype" in x for x in t["tensors"])],
    ids=lambda t: Path(t["file"]).stem,
)
def test_partial_loads_of_valid_vectors(test):
    path, key = CORPUS / test["file"], model_key(test["key"])
    for t in test["tensors"]:
        (got,) = reader.load(path, key=key, tensors=[t["name"]]).values()
        stored = next(x for x in test["tensors"] if x["name"] == t.get("alias_of", t["name"]))
        assert digest(got) == stored["sha256"], t["name"]


def test_partial_load_checks_the_bytes_it_decrypts():
    """A subset load decrypts the chunks of its tensors, and checks every byte in them."""
    by_rule = {t["rule"]: t for t in reversed(TESTS) if t["result"] == "invalid"}
    for rule, name in (("R-41", "steps"), ("R-42", "steps"), ("R-40", "embed.weight")):
        test = by_rule[rule] if rule != "R-40" else next(
            t for t in TESTS if t["file"].endswith("chunk-modified.sealed"))  # fmt: skip
        path = CORPUS / test["file"]
        got = outcome(lambda: reader.load(path, key=model_key(test["key"]), tensors=[name]))
        expect(test, got, f"load(tensors=[{name!r}])")


def test_the_committed_corpus_is_what_the_manifest_lists():
    listed = {t["file"] for t in TESTS}
    on_disk = {str(p.relative_to(CORPUS)) for p in (CORPUS / "vectors").iterdir()}
    assert listed == on_disk
    for t in TESTS:
        assert hashlib.sha256((CORPUS / t["file"]).read_bytes()).hexdigest() == t["sha256"]
    assert [t["tcId"] for t in TESTS] == list(range(1, len(TESTS) + 1))
    assert MANIFEST["numberOfTests"] == len(TESTS)
    size = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    assert size < 1 << 20, f"the corpus grew to {size} bytes; keep it under 1 MiB"


def test_generator_rewrites_the_corpus_byte_for_byte(tmp_path):
    out = tmp_path / "v1"
    r = subprocess.run(
        [sys.executable, str(REPO / "conformance" / "generate.py"), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    ours = {str(p.relative_to(CORPUS)): p.read_bytes() for p in CORPUS.rglob("*") if p.is_file()}
    new = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert sorted(new) == sorted(ours)
    changed = [name for name in ours if ours[name] != new[name]]
    assert not changed, f"regenerate the corpus (python conformance/generate.py): {changed[:5]}"


def test_spec_rules_table_is_format_rules():
    table = spec_rules()
    assert [rid for rid, _ in table] == [f"R-{i}" for i in range(1, len(table) + 1)]
    assert table == [(r.id, r.code) for r in rules.RULES]


def test_every_rule_has_an_invalid_vector_and_every_vector_a_rule():
    table = dict(spec_rules())
    invalid = [t for t in TESTS if t["result"] == "invalid"]
    assert {t["rule"] for t in invalid} == set(table), "a rule without a vector, or the reverse"
    for t in invalid:
        assert t["expect"] == table[t["rule"]], t["file"]
    for t in TESTS:
        assert t["result"] in ("valid", "invalid") and ("rule" in t) == (t["result"] == "invalid")
        assert t["flags"] and set(t["flags"]) <= set(MANIFEST["notes"]), t["file"]
        if t["result"] == "valid":
            assert t["expect"] == "ok"


def test_cli_verify_reports_the_rule_code(tmp_path):
    """`sealtorch verify` gives the same answers (one valid and two invalid vectors)."""
    for stem in ("base", "nonzero-padding", "duplicate-tensors-key"):
        test = next(t for t in TESTS if Path(t["file"]).stem.endswith(stem))
        key = tmp_path / "k.json"
        key.write_bytes((CORPUS / test["key"]).read_bytes())
        key.chmod(0o600)
        r = subprocess.run(
            [sys.executable, "-m", "sealtorch", "verify", str(CORPUS / test["file"]),
             "--key-file", str(key)],
            capture_output=True, text=True,
        )  # fmt: skip
        if test["expect"] == "ok":
            assert r.returncode == 0 and r.stdout.startswith("OK"), r.stderr
        else:
            assert r.returncode == 2 and r.stderr.startswith(f"error [{test['expect']}]"), r.stderr
            assert test["rule"] in r.stderr
