"""``sealtorch client infer`` (verify the server, then send one encrypted request) and
``sealtorch receipt verify`` (check a saved receipt offline)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


def _read_input(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise click.BadParameter(f"cannot read {path} ({e.strerror})",
                                 param_hint="--input") from None


def _show_reasons(e: Exception) -> None:
    for reason in getattr(e, "reasons", []):
        click.echo(f"  - {reason}", err=True)


@click.group("client")
def client() -> None:
    """Talk to an attested inference server end to end (docs/e2e.md)."""


@client.command("infer")
@click.argument("url")
@click.option("--policy", "policy_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="the client policy (runtimes, models, owners, [verifier])")
@click.option("--input", "input_path", required=True,
              help="the OIP inference request (JSON file, or - for stdin)")
@click.option("--model", default=None, help="model name to attest (default: the only one)")
@click.option("--output", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="write the response JSON here (default: stdout, exactly the bytes the "
                   "receipt covers)")
@click.option("--receipt", "receipt_out", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="save the signed receipt (COSE_Sign1 CBOR) here")
@click.option("--evidence", "evidence_out", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="save the verified attestation document (JSON) here")
@click.option("--unsafe-sim", is_flag=True,
              help="accept sim evidence (protects nothing; loopback URLs only)")
def infer(url: str, policy_path: Path, input_path: str, model: str | None,
          output: Path | None, receipt_out: Path | None, evidence_out: Path | None,
          unsafe_sim: bool) -> None:
    """Verify the server at URL against --policy, then send --input encrypted to it."""
    from sealtorch._outputs import output_file, write_file
    from sealtorch.client import AttestedClient, ClientPolicy
    from sealtorch.errors import PolicyDenied

    for path in (output, receipt_out, evidence_out):  # a bad path fails before any request
        if path is not None:
            output_file(path, overwrite=True)
    body = _read_input(input_path)
    try:
        json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise click.BadParameter("the input is not JSON (an OIP inference request)",
                                 param_hint="--input") from None
    policy = ClientPolicy.load(policy_path)
    if unsafe_sim:
        click.echo("warning: --unsafe-sim: sim evidence proves nothing about hardware",
                   err=True)
    with AttestedClient(url, policy, model=model, unsafe_sim=unsafe_sim) as c:
        try:
            server = c.attest()
        except PolicyDenied as e:
            click.echo("the server is not allowed by the client policy:", err=True)
            _show_reasons(e)
            raise
        if evidence_out is not None:
            write_file(evidence_out, server.document.to_json(), overwrite=True)
        result = c.infer(body)
    if receipt_out is not None:
        write_file(receipt_out, result.receipt, overwrite=True)
    if output is not None:
        write_file(output, result.body, overwrite=True, mode=0o600)  # decrypted: private
    else:  # the exact bytes the receipt's digest covers (no newline added)
        sys.stdout.buffer.write(result.body)
        sys.stdout.flush()
    ident = server.identity
    click.echo(f"verified: {server.claims.tee} server serving {ident.model_id} key version "
               f"{ident.key_version} (policy {ident.policy_version}); receipt "
               f"{result.receipt_claims.receipt_id.hex()}", err=True)


@click.group("receipt")
def receipt() -> None:
    """Inference receipts."""


@receipt.command("verify")
@click.argument("receipt_path", metavar="RECEIPT",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--evidence", "evidence_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="the attestation document saved with `sealtorch client infer --evidence`")
@click.option("--policy", "policy_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="the client policy the server must satisfy (as for `client infer`)")
@click.option("--request", "request_path", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="also check the request body the receipt names")
@click.option("--response", "response_path", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="also check the response body the receipt names")
@click.option("--at", "at", default=None, type=click.IntRange(0),
              help="verify the evidence at this unix time (offline use; default now)")
@click.option("--unsafe-sim", is_flag=True, help="accept sim evidence (protects nothing)")
def receipt_verify(receipt_path: Path, evidence_path: Path, policy_path: Path,
                   request_path: Path | None, response_path: Path | None, at: int | None,
                   unsafe_sim: bool) -> None:
    """Check RECEIPT offline: the evidence against --policy, then the receipt's signature by
    the attested receipt key and its claims."""
    from sealtorch.client import ClientPolicy, verify_attestation, verify_receipt_offline
    from sealtorch.e2e.document import AttestationDocument
    from sealtorch.errors import PolicyDenied

    policy = ClientPolicy.load(policy_path)
    doc = AttestationDocument.from_json(evidence_path.read_bytes())
    try:
        server = verify_attestation(doc, nonce=None, policy=policy,
                                    verifiers=policy.verifier_set(unsafe_sim=unsafe_sim),
                                    now=at)
    except PolicyDenied as e:
        click.echo("the evidence is not allowed by the client policy:", err=True)
        _show_reasons(e)
        raise
    claims = verify_receipt_offline(
        receipt_path.read_bytes(), server,
        request=request_path.read_bytes() if request_path else None,
        response=response_path.read_bytes() if response_path else None)
    click.echo(json.dumps({"valid": True, "tee": server.claims.tee, **claims.to_dict()},
                          sort_keys=True, indent=2))


COMMANDS: list[click.Command] = [client, receipt]
