"""``python -m sealtorch.kserve``: a sealed model under ``kserve.ModelServer``.

Takes KServe's usual flags (``--model_name``, ``--http_port``, ``--grpc_port``,
``--enable_grpc``, ...) and sealtorch's (``--sealed``, ``--factory``, ``--keycache``,
``--config``, ``--attester``, the signature). As ``sealtorch serve`` does, it checks everything
that needs no key (factory syntax, config, header, name, ports) before it asks the key cache,
answers ``/v2/attestation`` and end-to-end encrypted requests, and refuses plaintext inference
unless ``--unsafe_allow_plaintext`` (gRPC, which cannot carry end-to-end requests, is then off).
"""

from __future__ import annotations

import argparse
import logging
import sys

from sealtorch.errors import SealtorchError

ATTESTERS = ("auto", "sgx", "tdx", "snp", "sim")
log = logging.getLogger("sealtorch.kserve")


def _shape(value: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated sizes, e.g. 3,224,224"
                                         ) from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError("sizes must be positive")
    return dims


def build_parser() -> argparse.ArgumentParser:
    """sealtorch's flags (KServe's model server flags are parsed by KServe's own parser)."""
    from sealtorch.runtime.codec import DATATYPES

    p = argparse.ArgumentParser(
        prog="python -m sealtorch.kserve", allow_abbrev=False,
        description="Serve a sealed model on KServe's model server (REST and gRPC); the key "
                    "comes from dkeycache after attestation.",
        epilog="Every other flag is KServe's model server's (--model_name, --http_port, "
               "--grpc_port, --enable_grpc, ...; `python -m sealtorch.kserve --kserve-help`).")
    p.add_argument("--sealed", required=True,
                   help="the sealed model file, or a directory sealed with `sealtorch seal "
                        "MODEL_DIR` (its factory then takes the directory)")
    p.add_argument("--factory", required=True,
                   help="package.module:function building the module; must be on the signed "
                        "policy's 'factories' allow-list")
    p.add_argument("--keycache", required=True,
                   help="dkeycache Unix socket, or tcp://127.0.0.1:PORT")
    p.add_argument("--config", required=True,
                   help="the runtime's measured config ([runtime] server_public_key)")
    p.add_argument("--attester", default="auto", choices=ATTESTERS,
                   help="TEE backend; auto never picks sim (sim reads $SEALTORCH_SIM_DIR)")
    p.add_argument("--input_name", default="input", help="name of the input tensor")
    p.add_argument("--input_shape", default=(3, 224, 224), type=_shape,
                   help="per-sample input shape, e.g. 3,224,224")
    p.add_argument("--datatype", default="FP32", choices=list(DATATYPES),
                   help="OIP datatype of the input")
    p.add_argument("--output_name", default="output", help="name of the output tensor")
    p.add_argument("--max_batch", default=8, type=int,
                   help="rows per forward pass (every pass runs at exactly this size)")
    p.add_argument("--max_body_bytes", default=None, type=int,
                   help="largest request body (default: max_batch samples as JSON + 64 KiB)")
    p.add_argument("--threads", default=None, type=int, help="torch threads")
    p.add_argument("--unsafe_allow_plaintext", action="store_true",
                   help="also accept plaintext inference (REST and gRPC): the host and any "
                        "proxy can read those inputs and outputs")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    """sealtorch's flags, then KServe's from what is left: ``kserve.model_server`` parses
    ``sys.argv`` when imported (with abbreviations, so ``--config`` would be taken for its
    ``--configure_logging``), so it only ever sees its own flags."""
    if "--kserve-help" in argv:
        sys.argv = [sys.argv[0], "--help"]
        from kserve import model_server

        argparse.ArgumentParser(prog="python -m sealtorch.kserve",
                                parents=[model_server.parser]).parse_args(["--help"])
    ours, rest = build_parser().parse_known_args(argv)
    sys.argv = [sys.argv[0], *rest]
    from kserve import model_server

    theirs = argparse.ArgumentParser(prog="python -m sealtorch.kserve", allow_abbrev=False,
                                     parents=[model_server.parser])
    theirs.set_defaults(model_name=None)
    return argparse.Namespace(**vars(theirs.parse_args(rest)), **vars(ours))


def run(args: argparse.Namespace) -> None:
    """Check, load through the key cache, then serve until stopped."""
    import prometheus_client
    import torch
    from kserve import ModelServer, model_server

    from sealtorch._secret import harden_process
    from sealtorch.errors import ServeError
    from sealtorch.kserve.limits import BodyLimit
    from sealtorch.kserve.model import SealedModel
    from sealtorch.runtime.attested import E2EMiddleware, Gateway
    from sealtorch.runtime.codec import TensorSpec
    from sealtorch.runtime.listener import bind_listener
    from sealtorch.runtime.loading import prepare
    from sealtorch.runtime.model import check_model_name, default_model_name

    harden_process()
    # checks that need no key, cheapest first: nothing below asks the cache before they pass
    if args.workers != 1:
        raise ServeError("the sealed model is decrypted in this process: pass --workers 1 "
                         "(scale with replicas)")
    if not 1 <= args.max_batch <= 1024:
        raise ServeError("--max_batch must be between 1 and 1024")
    spec = TensorSpec(args.input_name, args.datatype, args.input_shape)
    source = prepare(args.sealed, args.factory, args.config, args.attester)
    name = (check_model_name(args.model_name) if args.model_name is not None
            else default_model_name(source.header.model_id))
    grpc = bool(args.enable_grpc)
    if grpc and not args.unsafe_allow_plaintext:
        log.warning("gRPC is off: it carries plaintext only (pass --unsafe_allow_plaintext "
                    "to serve it)")
        grpc = False
    for port in [args.http_port, *([args.grpc_port] if grpc else [])]:
        bind_listener("0.0.0.0", port).close()  # a port in use is found before the key
    print(f"model {source.header.model_id!r} as {name!r}; asking the key cache for the key",
          file=sys.stderr, flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = SealedModel(name, source, args.keycache, inputs=[spec],
                        output_names=(args.output_name,), max_batch=args.max_batch,
                        threads=args.threads)
    model.load()
    assert model.loaded is not None and model.served is not None
    max_body = args.max_body_bytes or 65536 + args.max_batch * model.served.max_sample_bytes
    app = model_server.app
    app.add_middleware(BodyLimit, max_bytes=max_body, precheck=model.binary_precheck)
    app.add_middleware(E2EMiddleware,
                       gateway=Gateway(source.attester, [model.loaded.identity(name)]),
                       allow_plaintext=args.unsafe_allow_plaintext,
                       max_request_bytes=max_body + 4096, registry=prometheus_client.REGISTRY)
    print(f"serving {name} on http://0.0.0.0:{args.http_port}/v2/models/{name}"
          f"{f' and gRPC :{args.grpc_port}' if grpc else ''} (attestation: /v2/attestation; "
          f"{'plaintext ALLOWED' if args.unsafe_allow_plaintext else 'end-to-end only'})",
          file=sys.stderr, flush=True)
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=1,
                enable_grpc=grpc).start([model])


def main(argv: list[str] | None = None) -> None:
    """Entry point: sealtorch errors become one line ``error [code]: ...`` and exit code 2."""
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except SealtorchError as e:
        code = getattr(e, "denial", None) or e.code
        print(f"error [{code}]: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
