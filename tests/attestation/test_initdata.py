"""CoCo initdata: the document, its digest and register values (checked against hashlib
following the Initdata Specification), the annotation encoding, and the configuration binding
through initdata on TDX and SNP evidence from temporary configfs-tsm trees."""

from __future__ import annotations

import base64
import gzip
import hashlib
from pathlib import Path

import pytest

from sealtorch.attestation import attesters
from sealtorch.attestation.initdata import (
    MAX_DOCUMENT_BYTES,
    decode_annotation,
    encode_annotation,
    load_initdata,
    parse_initdata,
    read_initdata,
    register_value,
    render_initdata,
)
from sealtorch.attestation.selfcheck import check_own_config, decide_binding
from sealtorch.errors import ConfigError

from .test_attesters import vm_factory

CONFIG = (b"[keycache]\nkeyserver_url = 'https://owner.example:8443'\n"
          b"initdata = \"/run/sealtorch-initdata/cc_init_data\"\n")
#: a document written by hand, as a user or another tool would (the spec's TOML layout)
HAND_WRITTEN = b"""algorithm = "sha384"
version = "0.1.0"

[data]
"sealtorch.toml" = '''
[keycache]
keyserver_url = 'https://owner.example:8443'
initdata = "/run/sealtorch-initdata/cc_init_data"
'''

"policy.rego" = '''
package agent_policy
default CreateContainerRequest := true
'''
"""


def _expected(algorithm: str, raw: bytes) -> dict[str, bytes]:
    """Register values computed here from hashlib and the spec's truncate/pad rule, written
    out per case (TDX MRCONFIGID 48 bytes, SNP HOST_DATA 32 bytes)."""
    d = hashlib.new(algorithm, raw).digest()
    if algorithm == "sha256":  # 32 bytes: TDX pads 16 zero bytes at the end, SNP takes it all
        return {"digest": d, "tdx": d + bytes(16), "snp": d}
    if algorithm == "sha384":  # 48 bytes: TDX takes it all, SNP its first 32
        return {"digest": d, "tdx": d, "snp": d[:32]}
    return {"digest": d, "tdx": d[:48], "snp": d[:32]}  # sha512: both cut at the end


@pytest.mark.parametrize("algorithm", ["sha256", "sha384", "sha512"])
def test_digest_and_registers_follow_the_spec(algorithm: str) -> None:
    raw = render_initdata({"sealtorch.toml": CONFIG.decode(), "aa.toml": "[token_configs]\n"},
                          algorithm)
    doc = parse_initdata(raw)
    want = _expected(algorithm, raw)
    assert doc.algorithm == algorithm and doc.version == "0.1.0"
    assert doc.digest == want["digest"]
    assert doc.register("tdx") == want["tdx"] and len(want["tdx"]) == 48
    assert doc.register("snp") == want["snp"] and len(want["snp"]) == 32
    assert doc.entry("sealtorch.toml") == CONFIG


def test_a_hand_written_document_is_hashed_as_its_bytes() -> None:
    doc = parse_initdata(HAND_WRITTEN)
    assert doc.entry("sealtorch.toml") == CONFIG
    assert doc.data["policy.rego"].startswith("package agent_policy\n")
    assert doc.digest == hashlib.sha384(HAND_WRITTEN).digest()
    # the same data, another layout: another digest (spec: the digest is over the document)
    relaid = HAND_WRITTEN.replace(b'"policy.rego" =', b'"policy.rego"  =')
    assert dict(parse_initdata(relaid).data) == dict(doc.data)
    assert parse_initdata(relaid).digest != doc.digest


def test_register_value_pads_and_cuts_at_the_end() -> None:
    assert register_value(b"\x01" * 32, "tdx") == b"\x01" * 32 + bytes(16)
    assert register_value(bytes(range(64)), "snp") == bytes(range(32))
    with pytest.raises(ConfigError, match=r"only TDX .* and SNP"):
        register_value(bytes(32), "sgx")


@pytest.mark.parametrize("content", [
    "plain\n", "", "\n\nleading blank lines\n", "ends with a quote'", "has ''' inside\n",
    "tab\tand CRLF\r\n", "bell \x07 and del \x7f", "ünïcödé ☃\n", 'quotes " and \\ \n'])
def test_render_round_trips_any_text(content: str) -> None:
    raw = render_initdata({"sealtorch.toml": content, "x.txt": content})
    assert parse_initdata(raw).data == {"sealtorch.toml": content, "x.txt": content}


def test_annotation_is_base64_of_gzip() -> None:
    raw = render_initdata({"sealtorch.toml": CONFIG.decode()})
    value = encode_annotation(raw)
    assert gzip.decompress(base64.b64decode(value, validate=True)) == raw
    assert value == encode_annotation(raw)  # reproducible
    # a value another tool made (default gzip header): decodes to the same bytes
    theirs = base64.b64encode(gzip.compress(HAND_WRITTEN)).decode()
    assert decode_annotation(theirs) == HAND_WRITTEN
    assert read_initdata(theirs.encode() + b"\n").raw == HAND_WRITTEN  # downward-API file
    assert read_initdata(HAND_WRITTEN).raw == HAND_WRITTEN  # the TOML itself


@pytest.mark.parametrize(("raw", "message"), [
    (HAND_WRITTEN.replace(b'"0.1.0"', b'"0.2.0"'), "version must be '0.1.0'"),
    (HAND_WRITTEN.replace(b'"sha384"', b'"sha-384"'), "algorithm must be one of"),
    (HAND_WRITTEN.replace(b'"sha384"', b'"md5"'), "algorithm must be one of"),
    (HAND_WRITTEN.replace(b'"sha384"', b"384"), "algorithm must be one of"),
    (HAND_WRITTEN.replace(b'version = "0.1.0"\n', b""), "exactly the keys"),
    (b'digest = "00"\n' + HAND_WRITTEN, "exactly the keys"),
    (b'version = "0.1.0"\nalgorithm = "sha256"\ndata = "x"\n', "must be a table"),
    (b'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n"a.toml" = 3\n', "must be a string"),
    (b'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n"../etc/passwd" = "x"\n',
     "plain file names"),
    (b'version = "0.1.0"\nalgorithm = "sha256"\n[data]\na = {b = "c"}\n', "must be a string"),
    (b"\xff\xfe", "not valid UTF-8 TOML"),
    (b"version = ", "not valid UTF-8 TOML"),
    (b"#" * (MAX_DOCUMENT_BYTES + 1), "larger than"),
])
def test_bad_documents_are_refused_with_the_reason(raw: bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_initdata(raw)


def test_bad_annotations_are_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="not standard base64"):
        decode_annotation("H4sI not base64!")
    with pytest.raises(ConfigError, match="not gzip"):
        decode_annotation(base64.b64encode(b"plain text, not gzip"))
    packed = gzip.compress(HAND_WRITTEN)
    with pytest.raises(ConfigError, match="truncated"):
        decode_annotation(base64.b64encode(packed[:-9]))
    with pytest.raises(ConfigError, match="trailing"):
        decode_annotation(base64.b64encode(packed + b"junk"))
    bomb = gzip.compress(b"#" * (MAX_DOCUMENT_BYTES + 10))  # ~1 KiB that expands past the limit
    with pytest.raises(ConfigError, match="larger than"):
        decode_annotation(base64.b64encode(bomb))


def test_load_initdata_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read the initdata document .*downward API"):
        load_initdata(tmp_path / "absent")


# --- the binding decision (pure) ------------------------------------------------------------
DOC = parse_initdata(render_initdata({"sealtorch.toml": CONFIG.decode()}))


@pytest.mark.parametrize("tee", ["tdx", "snp"])
def test_binding_through_initdata(tee: str) -> None:
    b = decide_binding(tee, DOC.register(tee), CONFIG, DOC)
    assert b.bound and b.via == "initdata" and "initdata document" in b.describe()


@pytest.mark.parametrize("tee", ["tdx", "snp"])
def test_binding_through_initdata_fails_closed(tee: str) -> None:
    width = len(DOC.register(tee))
    # config not byte-identical to the entry (one more newline)
    with pytest.raises(ConfigError, match=r"not byte-identical .*'sealtorch.toml' entry"):
        decide_binding(tee, DOC.register(tee), CONFIG + b"\n", DOC)
    # a tampered entry: the document the pod sees differs from the one the register binds
    tampered = parse_initdata(DOC.raw.replace(b"owner.example", b"evil.example"))
    with pytest.raises(ConfigError, match="launched with another initdata"):
        decide_binding(tee, DOC.register(tee), tampered.entry("sealtorch.toml"), tampered)
    # the register of another pod's document
    other = parse_initdata(render_initdata({"sealtorch.toml": CONFIG.decode()}, "sha512"))
    with pytest.raises(ConfigError, match="launched with another initdata"):
        decide_binding(tee, other.register(tee), CONFIG, DOC)
    # a register that holds the config's own digest is not enough once initdata is asked for
    with pytest.raises(ConfigError, match="launched with another initdata"):
        decide_binding(tee, register_value(hashlib.sha384(CONFIG).digest(), tee), CONFIG, DOC)
    with pytest.raises(ConfigError, match="is zero: the runtime did not bind initdata"):
        decide_binding(tee, bytes(width), CONFIG, DOC)
    no_entry = parse_initdata(render_initdata({"aa.toml": "x"}))
    with pytest.raises(ConfigError, match=r"no 'sealtorch.toml' entry"):
        decide_binding(tee, no_entry.register(tee), CONFIG, no_entry)


def test_without_initdata_the_register_of_an_initdata_pod_refuses() -> None:
    """A config without `initdata` in a CoCo pod: the register holds the document's digest,
    not the config's, so the role refuses and says where to look."""
    with pytest.raises(ConfigError, match=r"launched for another configuration.*initdata"):
        decide_binding("tdx", DOC.register("tdx"), CONFIG)


# --- through configfs-tsm trees -------------------------------------------------------------


@pytest.mark.parametrize("tee", ["tdx", "snp"])
def test_a_pod_vm_checks_its_initdata_binding(tmp_path: Path, dcap_dir: Path, snp_dir: Path,
                                              tee: str) -> None:
    vm = vm_factory(tmp_path, dcap_dir, snp_dir, tee)
    b = check_own_config(vm(DOC.register(tee)), CONFIG, role="dkeycache", initdata=DOC)
    assert b.bound and b.via == "initdata"
    with pytest.raises(ConfigError, match="launched with another initdata"):
        check_own_config(vm(DOC.register(tee)[::-1]), CONFIG, role="serve", initdata=DOC)


@pytest.mark.parametrize("tee", ["tdx", "snp"])
def test_select_reads_the_document_the_config_names(tmp_path: Path, dcap_dir: Path,
                                                    snp_dir: Path, tee: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``attesters.select`` as both roles call it: the config's `initdata` path holds the
    downward-API file of the annotation; the VM's register decides."""
    vm = vm_factory(tmp_path, dcap_dir, snp_dir, tee)
    register = {"value": DOC.register(tee)}
    monkeypatch.setattr(attesters, "TsmAttester", lambda d, tee: vm(register["value"]))
    path = tmp_path / "cc_init_data"
    path.write_text(encode_annotation(DOC.raw))
    att = attesters.select(tee, role="dkeycache", config_bytes=CONFIG, initdata=str(path),
                           tsm_dir=tmp_path)
    assert att.tee == tee
    with pytest.raises(ConfigError, match="not byte-identical"):
        attesters.select(tee, role="serve", config_bytes=CONFIG.replace(b"8443", b"8444"),
                         initdata=str(path), tsm_dir=tmp_path)
    register["value"] = bytes(len(DOC.register(tee)))
    with pytest.raises(ConfigError, match="is zero"):
        attesters.select(tee, role="serve", config_bytes=CONFIG, initdata=str(path),
                         tsm_dir=tmp_path)


@pytest.mark.parametrize("kind", ["sim", "sgx"])
def test_initdata_needs_a_confidential_vm(kind: str) -> None:
    with pytest.raises(ConfigError, match="only a TDX or SNP"):
        attesters.select(kind, role="serve", config_bytes=CONFIG, initdata="/x")
