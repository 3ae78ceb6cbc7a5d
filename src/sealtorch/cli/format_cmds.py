"""Owner tools for sealed files: keygen, seal, inspect, verify, unseal."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from sealtorch.errors import InputError

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(|b|k|kb|kib|m|mb|mib|g|gb|gib)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str) -> int:
    """Parse ``4194304``, ``4MiB``, ``512k`` (binary units) into bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise InputError("size must be a number of bytes, optionally with k/M/G (binary units)")
    return int(m.group(1)) * _UNITS[m.group(2)[:1].lower()]


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


@click.command("keygen")
@click.option("--model-id", help="Model id the key belongs to (e.g. acme/resnet50).")
@click.option("--key-version", type=click.IntRange(1), default=1, show_default=True,
              help="Key version (raise it when rotating the model key).")
@click.option(
    "--signing",
    is_flag=True,
    help="Make an Ed25519 owner signing key (PEM) instead of a model key.",
)
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False),
              help="Key file to write (mode 0600).")
@click.option("--force", is_flag=True, help="Overwrite an existing key file (destroys that key).")
def keygen(model_id: str | None, key_version: int, signing: bool, output: str, force: bool) -> None:
    """Write a new random 256-bit model key (JSON, mode 0600), or an owner signing key."""
    from sealtorch.format import keyfile

    if signing:
        import os

        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from sealtorch.format.signing import raw_public

        sk = Ed25519PrivateKey.generate()
        pem = sk.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        from sealtorch._outputs import output_file

        output_file(output, overwrite=force)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
        try:
            fd = os.open(output, flags, 0o600)
        except FileExistsError:
            raise InputError(f"{output}: already exists; pass --force to overwrite") from None
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        pub = raw_public(sk.public_key()).hex()
        click.echo(f"wrote owner signing key {output}; public key (for --signer): {pub}")
        return
    if not model_id:
        raise click.UsageError("--model-id is required (unless --signing)")
    from sealtorch._outputs import output_file

    output_file(output, overwrite=True)  # the directory; an existing key: write_key_file
    mk = keyfile.generate_model_key(model_id, key_version)
    keyfile.write_key_file(output, mk, overwrite=force)
    click.echo(f"wrote key file {output} (model {mk.model_id!r}, key version {mk.key_version})")
    mk.wipe()


@click.command("seal")
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Sealed file to write (written to a temporary file, then renamed); for a "
                   "model directory, the new sealed directory.")
@click.option("--key-file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Model key file from `sealtorch keygen` (its model id goes in the header).")
@click.option("--chunk-size", default="4MiB", show_default=True,
              help="Bytes per encrypted chunk (k/M/G binary units).")
@click.option("--public-index", is_flag=True,
              help="Leave tensor names/shapes readable without the key.")
@click.option("--sign-key", type=click.Path(exists=True, dir_okay=False),
              help="Owner Ed25519 signing key (PEM, from `sealtorch keygen --signing`).")
@click.option("--metadata", multiple=True, metavar="KEY=VALUE",
              help="Stored in the (encrypted) index; repeatable.")
@click.option("--public-config", is_flag=True,
              help="Model directory: leave config.json readable (it is sealed by default).")
@click.option("--public", "public", multiple=True, metavar="NAME",
              help="Model directory: leave this file (path relative to the directory, e.g. "
                   "tokenizer.json) readable; repeatable. Weight shards are always sealed.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def seal_cmd(
    input_path: str,
    output: str,
    key_file: str,
    chunk_size: str,
    public_index: bool,
    sign_key: str | None,
    metadata: tuple[str, ...],
    public_config: bool,
    public: tuple[str, ...],
    force: bool,
) -> None:
    """Encrypt a state_dict (.pt/.pth/.bin, weights only) or .safetensors file, or a Hugging
    Face model directory (config.json and *.safetensors shards) into a sealed directory."""
    from sealtorch.cli.progress import bytes_bar
    from sealtorch.format.writer import seal

    if Path(input_path).is_dir():
        _seal_dir(input_path, output, key_file, parse_size(chunk_size), sign_key,
                  public_config, public, public_index or bool(metadata) or force)
        return
    if public_config or public:
        raise InputError("--public-config and --public apply to a model directory only")

    meta = {}
    for item in metadata:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise InputError("--metadata takes KEY=VALUE")
        meta[k] = v
    with bytes_bar(f"reading {Path(input_path).name}", "sealing") as progress:
        header = seal(
            input_path,
            output,
            key_file,
            chunk_size=parse_size(chunk_size),
            public_index=public_index,
            sign_key=sign_key,
            metadata=meta or None,
            progress=progress,
            overwrite=force,
        )
    click.echo(
        f"sealed {input_path} -> {output}: model {header.model_id!r} key version "
        f"{header.key_version}, {header.total_length} bytes in {header.chunk_count} chunks"
        + (", signed" if header.signed else "")
        + (", public index" if header.public_index else "")
    )


def _seal_dir(
    src: str, out: str, key_file: str, chunk_size: int, sign_key: str | None,
    public_config: bool, public: tuple[str, ...], file_only: bool,
) -> None:
    """`sealtorch seal MODEL_DIR -o SEALED_DIR`: see docs/huggingface.md."""
    from sealtorch.cli.progress import bytes_bar
    from sealtorch.hf.seal import seal_pretrained

    if file_only:
        raise InputError("--public-index, --metadata and --force apply to a single file only; "
                         "a model directory is sealed into a new directory")
    with bytes_bar(f"reading {Path(src).name}", f"sealing {Path(src).name}") as progress:
        manifest = seal_pretrained(src, out, key_file, public_config=public_config,
                                   public=public, chunk_size=chunk_size, sign_key=sign_key,
                                   progress=progress)
    open_files = [f.name for f in manifest.files if not f.sealed]
    click.echo(
        f"sealed {src} -> {out}: {len(manifest.shards)} weight shard(s), "
        f"{sum(f.sealed for f in manifest.files)} other file(s) sealed"
        + (f", readable: {', '.join(open_files)}" if open_files else "")
    )


@click.command("inspect")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False),
              help="Model key file: also authenticate and list the (encrypted) tensor index.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect_cmd(path: str, key_file: str | None, as_json: bool) -> None:
    """Show a sealed file's public header; with --key-file (or a public index), its tensors."""
    from sealtorch.cli.progress import activity
    from sealtorch.format.owner import inspect

    with activity(f"reading {Path(path).name}"):
        info = inspect(path, key=key_file)
    if as_json:
        _echo_json(info)
        return
    for k, v in info["header"].items():
        click.echo(f"{k:>15}: {v}")
    signer = info.get("signer") or info.get("signer_unverified")
    if signer:
        state = "verified" if info.get("signer") else "unverified: no key given"
        click.echo(f"{'signer':>15}: {signer} ({state})")
    index = info.get("index")
    if index is None:
        click.echo("tensor index is encrypted; pass --key-file to list tensors")
        return
    note = "" if info.get("index_authenticated") else " (public, NOT authenticated without the key)"
    click.echo(f"{len(index['tensors'])} tensors{note}:")
    for t in index["tensors"]:
        click.echo(f"  {t['name']}  {t['dtype']}{t['shape']}  {t['nbytes']} bytes")
    for alias, target in index["aliases"].items():
        click.echo(f"  {alias} -> {target} (tied)")
    for k, v in index["metadata"].items():
        click.echo(f"  metadata {k} = {v}")


@click.command("verify")
@click.argument("path", type=click.Path(exists=True))
@click.option("--key-file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Model key file of the sealed file.")
@click.option("--signer", help="Require an owner signature by this Ed25519 key (hex or PEM).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def verify_cmd(path: str, key_file: str, signer: str | None, as_json: bool) -> None:
    """Authenticate every byte of a sealed file (or sealed model directory); writes nothing."""
    from sealtorch.cli.progress import bytes_bar
    from sealtorch.format.owner import verify

    name = Path(path).name
    if Path(path).is_dir():
        from sealtorch.hf.sealed_dir import SealedDir

        with bytes_bar(f"opening {name}", f"verifying {name}") as progress, SealedDir(
            path, key=key_file, signer=signer
        ) as sd:
            counts = sd.verify_all(progress=progress)
        if as_json:
            _echo_json({**counts, "ok": True})
        else:
            click.echo(f"OK: {path} authenticates ({counts['shards']} weight shard(s), "
                       f"{counts['tensors']} tensors, {counts['files']} other file(s))")
        return

    with bytes_bar(f"opening {name}", f"verifying {name}") as progress:
        summary = verify(path, key=key_file, signer=signer, progress=progress)
    if as_json:
        _echo_json(summary)
        return
    click.echo(
        f"OK: {path} authenticates ({summary['tensors']} tensors, {summary['chunk_count']} "
        f"chunks" + (f", signed by {summary['signer']}" if summary["signer"] else "") + ")"
    )


@click.command("unseal")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--key-file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Model key file of the sealed file.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Plaintext .safetensors file to write (mode 0600).")
@click.option("--signer", help="Require an owner signature by this Ed25519 key (hex or PEM).")
@click.option("--force", is_flag=True, help="Overwrite the output file.")
def unseal_cmd(path: str, key_file: str, output: str, signer: str | None, force: bool) -> None:
    """Decrypt to a plaintext .safetensors file (mode 0600) — on the owner's machine only."""
    from sealtorch._outputs import output_file
    from sealtorch.cli.progress import bytes_bar
    from sealtorch.format.owner import unseal

    output_file(output, overwrite=force)
    name = Path(path).name
    with bytes_bar(f"opening {name}", f"decrypting {name}") as progress:
        n = unseal(path, output, key=key_file, signer=signer, overwrite=force,
                   progress=progress)
    click.echo(f"wrote {n} plaintext tensors to {output} (keep it on trusted storage)")


COMMANDS: list[click.Command] = [keygen, seal_cmd, inspect_cmd, verify_cmd, unseal_cmd]
