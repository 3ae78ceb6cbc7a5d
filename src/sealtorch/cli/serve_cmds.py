"""``sealtorch serve`` (Open Inference Protocol), ``sealtorch gramine manifest``, ``sealtorch
demo``. Heavy modules (torch, uvicorn) are imported inside the commands."""

from __future__ import annotations

from pathlib import Path

import click

ATTESTERS = ("auto", "sgx", "tdx", "snp", "sim")


def _shape(value: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in value.split(","))
    except ValueError:
        raise click.BadParameter("expected comma-separated sizes, e.g. 3,224,224") from None
    if not dims or any(d <= 0 for d in dims):
        raise click.BadParameter("sizes must be positive")
    return dims


@click.command("serve")
@click.argument("sealed", type=click.Path(exists=True, path_type=Path))
@click.option("--factory", required=True,
              help="package.module:function building the module; must be on the policy's "
                   "'factories' allow-list")
@click.option("--keycache", "socket_path", required=True,
              help="dkeycache Unix socket, or tcp://127.0.0.1:PORT (its tcp_listen, SGX)")
@click.option("--config", "config_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="the runtime's measured config ([runtime] server_public_key)")
@click.option("--attester", default="auto", show_default=True, type=click.Choice(ATTESTERS),
              help="TEE backend for local evidence; auto never picks sim (sim reads its "
                   "platform key from $SEALTORCH_SIM_DIR)")
@click.option("--name", default=None,
              help="model name in the API (default: the model id with each character other "
                   "than letters, digits and '-_.' made '-', e.g. acme/resnet50 -> "
                   "acme-resnet50)")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port to listen on (0: any free port, printed at start)")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="rows per forward pass (every pass runs at exactly this size)")
@click.option("--input-shape", default="3,224,224", show_default=True,
              help="per-sample input shape")
@click.option("--datatype", default="FP32", show_default=True,
              type=click.Choice(["FP32", "FP64", "INT64", "INT32", "BYTES"]),
              help="datatype of the input tensor (BYTES: text, e.g. for "
                   "sealtorch.hf.embedding:sentence_embedding with --input-shape 1)")
@click.option("--rate", default=100.0, show_default=True, type=click.FloatRange(0),
              help="requests per second per client (0 = unlimited)")
@click.option("--threads", default=None, type=click.IntRange(1, 1024),
              help="torch threads (default: torch's choice)")
@click.option("--unsafe-allow-plaintext", is_flag=True,
              help="also accept plaintext inference requests (the host and any proxy can read "
                   "them); by default only end-to-end encrypted requests are served")
def serve(sealed: Path, factory: str, socket_path: str, config_path: Path, attester: str,
          name: str | None, host: str, port: int, max_batch: int, input_shape: str,
          datatype: str, rate: float, threads: int | None, unsafe_allow_plaintext: bool
          ) -> None:
    """Serve a sealed model (a file, or a directory sealed with `sealtorch seal MODEL_DIR`)
    over the Open Inference Protocol (KServe v2 REST).

    Clients attest the server (GET /v2/attestation?nonce=) and send end-to-end encrypted
    requests (docs/e2e.md). Everything that can fail without the model key (name, input shape,
    factory syntax, config, the listening port) is checked before the key cache is asked."""
    import logging

    import torch
    import uvicorn

    from sealtorch._secret import harden_process
    from sealtorch.cli.progress import activity
    from sealtorch.runtime.app import ServeOptions, build_app
    from sealtorch.runtime.attested import E2EMiddleware, Gateway
    from sealtorch.runtime.listener import bind_listener
    from sealtorch.runtime.loading import load_through_cache, prepare
    from sealtorch.runtime.model import (
        ServedModel,
        check_input_shape,
        check_model_name,
        default_model_name,
    )

    harden_process()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # checks that need no key, cheapest first: nothing below asks the cache before they pass
    shape = check_input_shape(_shape(input_shape))
    source = prepare(sealed, factory, config_path, attester)
    header = source.header
    model_name = check_model_name(name) if name is not None else default_model_name(
        header.model_id)
    listener = bind_listener(host, port)
    try:
        bound = listener.getsockname()[1]
        click.echo(f"model {header.model_id!r} as {model_name!r}; listening on {host}:{bound}; "
                   "asking the key cache for the key", err=True)
        if threads:
            torch.set_num_threads(threads)
        with activity(f"loading {sealed.name} through the key cache"):
            loaded = load_through_cache(source, socket_path, threads=threads)
        model = ServedModel(model_name, loaded.module, input_shape=shape, datatype=datatype)
        app = build_app(model, ServeOptions(max_batch=max_batch, rate_per_second=rate,
                                            rate_burst=max(1, int(rate * 2))))
        # no TLS terminates in this process, so the TLS key bound into the evidence is empty
        gateway = Gateway(source.attester, [loaded.identity(model.name)])
        e2e = E2EMiddleware(app, gateway, allow_plaintext=unsafe_allow_plaintext,
                            max_request_bytes=app.state.max_body + 4096,
                            registry=app.state.metrics.registry)
        click.echo(f"serving {model.name} on http://{host}:{bound}/v2/models/{model.name} "
                   f"(attestation: /v2/attestation; "
                   f"{'plaintext ALLOWED' if unsafe_allow_plaintext else 'end-to-end only'})",
                   err=True)
        server = uvicorn.Server(uvicorn.Config(e2e, log_level="warning", server_header=False,
                                               timeout_keep_alive=5))
        server.run(sockets=[listener])
    finally:
        listener.close()


COMMANDS: list[click.Command] = [serve]


@click.command("demo")
@click.option("--model", default="resnet50", show_default=True, type=click.Choice(["resnet50"]),
              help="model to seal and serve")
@click.option("--workdir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="where to put the key server, sealed file and logs (default: a temp dir)")
@click.option("--keep", is_flag=True,
              help="keep the work directory afterwards and print the demo's steps as commands")
@click.option("--weights", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="ResNet-50 state_dict (.safetensors/.pt) instead of fixed-seed weights")
@click.option("--batch", default=2, show_default=True, type=click.IntRange(1, 64),
              help="sample batch size")
def demo(model: str, workdir: Path | None, keep: bool, weights: Path | None, batch: int) -> None:
    """Run the whole flow on this machine: seal, attest, release, load, infer, and two
    denials (a key cache and a runtime whose measurements the policy does not allow)."""
    import logging

    from rich.console import Console
    from rich.table import Table

    from sealtorch.errors import ServeError
    from sealtorch.runtime.demo import run_demo

    logging.basicConfig(level=logging.ERROR)
    console = Console(highlight=False)
    console.print("[bold]sealtorch demo[/bold] — sim TEE: [yellow]protects nothing, for "
                  "development only[/yellow]; real deployments use SGX/TDX/SNP")
    result = run_demo(workdir=workdir, keep=keep, weights=weights, batch=batch,
                      say=console.print)
    table = Table(title="step timings")
    table.add_column("step")
    table.add_column("ms", justify="right")
    table.add_column("detail")
    for s in result.steps:
        table.add_row(s.name, f"{s.seconds * 1000:.0f}", s.detail)
    console.print(table)
    if keep:
        console.print(f"work directory kept: {result.workdir}")
        console.print("the same steps as commands (docs/tutorial-sim.md explains each; paths, "
                      "URLs and measurements are this run's):")
        for line in result.commands:
            console.print(f"  {line}", soft_wrap=True, markup=False)
    if result.leftover_pids:
        raise ServeError(f"processes still running after stop: {result.leftover_pids}")
    if not result.bit_identical:
        raise ServeError("sealed and plaintext outputs differ")
    assert result.cache_denial is not None and result.runtime_denial is not None
    console.print("[green]ok[/green]: outputs bit-identical to the plaintext model; rogue key "
                  f"cache denied by dkeyserver ({result.cache_denial.code}); rogue runtime "
                  f"denied by dkeycache ({result.runtime_denial.code}); no process left running")


COMMANDS.append(demo)


@click.group("gramine")
def gramine() -> None:
    """Gramine (SGX) deployment helpers."""


@gramine.command("manifest")
@click.option("--role", required=True, type=click.Choice(["serve", "keycache"]),
              help="what the enclave runs: `sealtorch serve` or `dkeycache serve`")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="manifest template to write (input of gramine-manifest)")
@click.option("--config", "config_path", default=None, type=click.Path(path_type=Path),
              help="absolute path of the role's measured config inside the enclave "
                   "(default /etc/sealtorch/runtime.toml or /etc/sealtorch/dkeycache.toml); "
                   "if it exists here it is validated (and a keycache's CA cert is trusted)")
@click.option("--model", default="/models/model.sealed", show_default=True,
              type=click.Path(path_type=Path), help="serve: the sealed model path")
@click.option("--factory", default="sealtorch.models.resnet:resnet50", show_default=True,
              help="serve: the model factory (must also be on the policy allow-list)")
@click.option("--socket", "socket_path", default="/run/sealtorch/dkeycache.sock",
              show_default=True, help="serve: the key cache socket")
@click.option("--host", default="0.0.0.0", show_default=True, help="serve: listen address")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535),
              help="serve: listen port")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="serve: rows per forward pass")
@click.option("--enclave-size", default=None, help="e.g. 16G (default by role)")
@click.option("--max-threads", default=None, type=click.IntRange(4, 4096),
              help="enclave threads (default by role)")
@click.option("--isvprodid", default=None, type=click.IntRange(0, 65535),
              help="SGX ISVPRODID (default by role: keycache 1, serve 2, so that an MRSIGNER "
                   "policy tells them apart)")
@click.option("--isvsvn", default=1, show_default=True, type=click.IntRange(0, 65535),
              help="SGX ISVSVN (security version; raise it for each security fix)")
@click.option("--force", is_flag=True, help="overwrite an existing output file")
def gramine_manifest(role: str, output: Path, config_path: Path | None, model: Path,
                     factory: str, socket_path: str, host: str, port: int, max_batch: int,
                     enclave_size: str | None, max_threads: int | None, isvprodid: int | None,
                     isvsvn: int, force: bool) -> None:
    """Write a Gramine manifest template for ROLE in an SGX enclave with DCAP attestation."""
    import re

    from sealtorch._outputs import output_file, write_file
    from sealtorch.errors import ConfigError
    from sealtorch.runtime.factory import validate_factory
    from sealtorch.runtime.gramine import ManifestOptions, render_manifest

    output_file(output, overwrite=force)  # before any work, and again just before writing

    if config_path is None:
        config_path = Path("/etc/sealtorch/runtime.toml" if role == "serve"
                           else "/etc/sealtorch/dkeycache.toml")
    config_path = config_path.absolute()
    if enclave_size is not None and not re.fullmatch(r"[1-9][0-9]{0,4}[MG]", enclave_size):
        raise ConfigError("--enclave-size must look like 512M or 16G")
    validate_factory(factory)
    ca_cert = None
    if config_path.exists():
        if role == "serve":
            from sealtorch.runtime.config import load_runtime_config

            load_runtime_config(config_path)
        else:
            from sealtorch.keycache.config import load_config

            cfg = load_config(config_path)
            ca_cert = Path(cfg.ca_cert).absolute() if cfg.ca_cert else None
            socket_path = cfg.socket
    text = render_manifest(ManifestOptions(
        role=role, config=config_path, model=model.absolute(), factory=factory,
        socket=socket_path, host=host, port=port, max_batch=max_batch,
        enclave_size=enclave_size, max_threads=max_threads, isvprodid=isvprodid,
        isvsvn=isvsvn, ca_cert=ca_cert))
    output_file(output, overwrite=force)
    write_file(output, text.encode(), overwrite=force)
    click.echo(f"wrote {output} (role {role}); next: gramine-manifest, gramine-sgx-sign, then "
               "pin the printed MRENCLAVE/MRSIGNER in the model policy", err=True)


COMMANDS.append(gramine)
