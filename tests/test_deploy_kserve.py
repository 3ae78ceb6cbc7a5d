"""deploy/kserve: the InferenceService manifests parse, carry what a confidential predictor
needs, and agree with the Containerfile, the measured config and the predictor's own flags."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealtorch.attestation.initdata import (
    ANNOTATION,
    encode_annotation,
    read_initdata,
    render_initdata,
)
from sealtorch.attestation.selfcheck import decide_binding
from sealtorch.cli.initdata_cmds import check_bound_config
from sealtorch.format.signing import raw_public
from sealtorch.keycache.config import parse_config
from sealtorch.runtime.config import parse_runtime_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kserve"
INITDATA_FILE = "/run/sealtorch-initdata/cc_init_data"
TEE = {"kata-qemu-tdx": "tdx", "kata-qemu-snp": "snp"}


def _flags(args: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in args)


@pytest.mark.parametrize("manifest", ["inferenceservice-tdx.yaml", "inferenceservice-snp.yaml"])
def test_manifest(manifest: str) -> None:
    docs = list(yaml.safe_load_all((DEPLOY / manifest).read_text()))
    assert len(docs) == 1
    isvc = docs[0]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["kind"] == "InferenceService" and isvc["metadata"]["name"]
    pred = isvc["spec"]["predictor"]
    tee = TEE[pred["runtimeClassName"]]
    assert manifest == f"inferenceservice-{tee}.yaml"
    containers = {c["name"]: c for c in pred["containers"]}
    assert set(containers) == {"kserve-container", "dkeycache"}
    volumes = {v["name"]: v for v in pred["volumes"]}
    assert volumes["keycache-socket"]["emptyDir"]["medium"] == "Memory"
    mounts = {name: {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
              for name, c in containers.items()}
    # both containers mount the socket volume at the same place
    assert mounts["kserve-container"]["keycache-socket"] == \
        mounts["dkeycache"]["keycache-socket"] == "/run/sealtorch"
    predictor = containers["kserve-container"]
    flags = _flags(predictor["args"])
    assert flags["attester"] == tee
    assert Path(flags["keycache"]).parent == Path("/run/sealtorch")
    assert flags["enable_grpc"] == "false"  # plaintext only; the predictor refuses it
    assert predictor["image"] == containers["dkeycache"]["image"]
    assert "@sha256:" in predictor["image"]
    assert predictor["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert {"name": "STORAGE_URI", "value": predictor["env"][0]["value"]} in predictor["env"]
    assert flags["sealed"].startswith("/mnt/models/")
    cache = containers["dkeycache"]
    assert cache["command"] == ["python", "-I", "-m", "sealtorch.keycache"]
    assert cache["args"] == ["serve", "--config", flags["config"], "--attester", tee]
    for c in containers.values():
        assert c["securityContext"]["runAsUser"] == 1000
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    # the predictor's flags are the ones `python -m sealtorch.kserve` takes
    from sealtorch.kserve.__main__ import parse

    argv = sys.argv
    try:
        args = parse(predictor["args"])
    finally:
        sys.argv = argv
    assert args.model_name == "resnet50" and args.http_port == 8080
    assert args.enable_grpc is False and not args.unsafe_allow_plaintext
    assert flags["config"] == "/etc/sealtorch/sealtorch.toml"
    # CoCo initdata: the pod carries the annotation, both containers read it back (downward
    # API, read-only) at the path the measured config names
    assert pred["annotations"][ANNOTATION].startswith("REPLACE-")
    items = volumes["initdata"]["downwardAPI"]["items"]
    assert items == [{"path": Path(INITDATA_FILE).name, "fieldRef": {
        "fieldPath": f"metadata.annotations['{ANNOTATION}']"}}]
    for c in containers.values():
        m = {v["name"]: v for v in c["volumeMounts"]}["initdata"]
        assert m["mountPath"] == str(Path(INITDATA_FILE).parent) and m["readOnly"] is True


def test_measured_config_and_containerfile_agree() -> None:
    key = base64.b64encode(raw_public(Ed25519PrivateKey.generate().public_key())).decode()
    raw = (DEPLOY / "sealtorch.toml").read_bytes().replace(
        b"REPLACE-with-base64-of-the-raw-Ed25519-release-signing-key", key.encode())
    cache = parse_config(raw)
    runtime = parse_runtime_config(raw)
    assert cache.server_public_key == runtime.server_public_key
    assert cache.initdata == runtime.initdata == INITDATA_FILE
    # the document `sealtorch initdata` writes from it binds both roles on both platforms
    check_bound_config(raw)
    doc = read_initdata(encode_annotation(render_initdata({"sealtorch.toml": raw.decode()}))
                        .encode())
    for tee in ("tdx", "snp"):
        assert decide_binding(tee, doc.register(tee), raw, doc).via == "initdata"
    assert cache.socket == "/run/sealtorch/dkeycache.sock"
    assert cache.local_auth == "peercred" and cache.allowed_uids == (1000,)
    text = (DEPLOY / "Containerfile").read_text()
    assert "COPY deploy/kserve/sealtorch.toml /etc/sealtorch/sealtorch.toml" in text
    assert f"COPY deploy/kserve/ca.crt {cache.ca_cert}" in text
    assert "'.[kserve]'" in text and "torch==2.13.0" in text
    assert "USER 1000" in text
    assert 'ENTRYPOINT ["python", "-I", "-m", "sealtorch.kserve"]' in text
