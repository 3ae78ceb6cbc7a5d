"""Open a sealed model through the key cache: the one loading core of ``sealtorch serve`` and
the KServe predictor (``python -m sealtorch.kserve``).

:func:`prepare` checks everything that needs no key (factory syntax, the measured config, the
sealed header, the attester) so that a mistake is reported before the cache is asked;
:func:`load_through_cache` then asks the cache for the grant, checks the factory against the
allow-list of the *signed* policy the grant carries before its module is imported, builds the
module and decrypts the weights straight into it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from sealtorch.attestation.binding import ServedIdentity
    from sealtorch.format.header import Header
    from sealtorch.protocol.grant import Grant
    from sealtorch.runtime.config import RuntimeConfig


@dataclass(frozen=True)
class SealedSource:
    """A sealed model and what loads it, checked without the key."""

    path: Path
    factory: str
    header: Header
    config: RuntimeConfig
    attester: Any


def prepare(path: str | os.PathLike[str], factory: str, config_path: str | os.PathLike[str],
            attester: str) -> SealedSource:
    """Check the factory's syntax, read the measured config and the sealed header, and select
    the attester (``attester`` as ``--attester``); raises the specific error of the first
    failing check. ``path`` is a sealed file or a sealed directory (``sealtorch seal
    MODEL_DIR``), whose manifest's header names the model."""
    from sealtorch.attestation import attesters
    from sealtorch.errors import SealedDirError
    from sealtorch.format.header import read_header
    from sealtorch.hf.manifest import MANIFEST_NAME
    from sealtorch.runtime.config import load_runtime_config
    from sealtorch.runtime.factory import validate_factory

    validate_factory(factory)
    config = load_runtime_config(config_path)
    if os.path.isdir(path) and not Path(path, MANIFEST_NAME).is_file():
        raise SealedDirError(f"{path}: a directory without {MANIFEST_NAME}, so not a sealed "
                             "model directory; seal one with `sealtorch seal MODEL_DIR -o DIR`")
    header = read_header(Path(path, MANIFEST_NAME) if os.path.isdir(path) else path)
    tee = attesters.select(attester, role="serve", config_bytes=config.raw,
                           initdata=config.initdata)
    return SealedSource(Path(path), factory, header, config, tee)


@dataclass
class LoadedModel:
    """A module whose sealed weights were decrypted into it, and the grant that allowed it."""

    module: torch.nn.Module
    source: SealedSource
    grant: Grant

    def identity(self, name: str) -> ServedIdentity:
        """What this server proves it serves as ``name`` (bound into its attestation)."""
        from sealtorch.attestation.binding import ServedIdentity

        header = self.source.header
        return ServedIdentity(
            name=name, model_id=header.model_id, key_version=header.key_version,
            header_digest=header.digest(), policy_version=self.grant.policy_version,
            factory=self.source.factory, tenant=self.grant.tenant,
            server_key_id=bytes.fromhex(self.grant.server_key_id))


def load_through_cache(source: SealedSource, keycache: str, *, threads: int | None = None
                       ) -> LoadedModel:
    """Attest to the key cache at ``keycache``, take the grant, check the factory against its
    policy, build the module and decrypt the sealed weights into it."""
    from sealtorch.keycache.client import KeyCacheClient
    from sealtorch.keycache.localauth import policy_from_grant
    from sealtorch.runtime.model import build_sealed

    client = KeyCacheClient(keycache, server_public_key=source.config.server_public_key,
                            attester=source.attester)
    try:
        grant = client.grant(source.header.model_id)
        module = build_sealed(source.path, source.factory, key_provider=client,
                              allowed_factories=policy_from_grant(grant).factories,
                              threads=threads)
    finally:
        client.close()
    return LoadedModel(module, source, grant)
