"""schemathesis (a tool nobody here wrote) against a live dkeyserver, both listeners, every
check: the OpenAPI document says what the server enforces, and the server answers only what
the document declares (status codes, bodies, 405 with Allow for undeclared methods)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.servers import RunningKeyServer, start_keyserver

from sealtorch.keyserver.openapi import OPERATIONS, document, render

SPEC = Path(__file__).resolve().parents[2] / "src/sealtorch/keyserver/openapi.json"
ST = [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()"]

# A policy document is checked by the policy rules (docs/policy.md: per-TEE fields and
# cross-field requirements such as "an sgx identity by mrsigner also needs isv_prod_id"), which
# the spec does not restate: it declares an object and a 400 (code policy_invalid, naming the
# rule). So for policy_set alone a schema-valid body may get 400.
CONFIG = """
[[operations]]
include-operation-id = "policy_set"
checks.positive_data_acceptance.expected-statuses = ["2xx", 400, 401, 404, 409, 429]
"""


@pytest.fixture(scope="module")
def ks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningKeyServer]:
    server = start_keyserver(tmp_path_factory.mktemp("st"), sim=True, auto_approve=False,
                             env={"SEALTORCH_KS_RATE_PER_CLIENT": "100000",
                                  "SEALTORCH_KS_RATE_PER_TOKEN": "100000"})
    try:
        yield server
    finally:
        server.stop()


def test_openapi_json_is_the_generated_document() -> None:
    assert json.loads(SPEC.read_text()) == document(), (
        "openapi.json is stale: python -m sealtorch.keyserver.openapi > " + str(SPEC))
    assert SPEC.read_text() == render()


def test_every_route_of_both_listeners_is_documented() -> None:
    doc = document()
    ops = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    assert ("POST", "/v1/admin/models") in ops and ("PUT", "/v1/admin/policy/{model_id}") in ops
    assert ("DELETE", "/v1/admin/tokens/{token_id}") in ops
    assert ops == {(op.method, op.path) for op in OPERATIONS}  # what app.py routes
    tags = {t for item in doc["paths"].values() for op in item.values() for t in op["tags"]}
    assert tags == {"release listener", "admin listener"}


@pytest.mark.parametrize("listener", ["release", "admin"])
def test_schemathesis_finds_nothing(ks: RunningKeyServer, tmp_path: Path, listener: str) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    url = ks.url if listener == "release" else ks.admin_url
    auth = (["-H", f"Authorization: Bearer {ks.admin_token_file.read_text().strip()}"]
            if listener == "admin" else [])
    p = subprocess.run(
        [*ST, "--config-file", str(config), "run", str(SPEC), "--url", url,
         "--tls-verify", str(ks.ca_cert_path), "--include-tag", f"{listener} listener",
         "--checks", "all", "--max-examples", "15", "--workers", "1", "--seed", "1",
         "--suppress-health-check", "too_slow", "--no-color", *auth],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-8000:] + p.stderr[-2000:]
    assert "Failures:" not in p.stdout and "Errors:" not in p.stdout
    tested = int(p.stdout.split("Tested: ")[1].split()[0])
    wanted = sum(1 for item in document()["paths"].values() for op in item.values()
                 if f"{listener} listener" in op["tags"])
    assert tested == wanted
