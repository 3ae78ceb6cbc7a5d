"""The factory allow-list is checked before the factory's module is imported."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tests.runtime.conftest import FACTORY, Sealed

from sealtorch.errors import FactoryError, WrongKeyError
from sealtorch.format.keyfile import generate_model_key
from sealtorch.format.keys import KeyFileProvider
from sealtorch.runtime.factory import check_allowed, resolve, validate_factory
from sealtorch.runtime.model import build_sealed


@pytest.fixture
def marker_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A module that leaves a marker file when imported (to prove it was not imported)."""
    marker = tmp_path / "imported"
    (tmp_path / "evil_factory_mod.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "import torch\n"
        "def build():\n    return torch.nn.Linear(1, 1)\n"
        "def not_a_module():\n    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "evil_factory_mod", marker
    sys.modules.pop("evil_factory_mod", None)


def test_not_allowed_factory_is_refused_before_import(
    sealed_resnet: Sealed, marker_module: tuple[str, Path]
) -> None:
    mod, marker = marker_module
    with pytest.raises(FactoryError, match="allow-list"):
        build_sealed(sealed_resnet.path, f"{mod}:build",
                     key_provider=KeyFileProvider(sealed_resnet.key),
                     allowed_factories=[FACTORY])
    assert not marker.exists()
    assert mod not in sys.modules


def test_empty_allow_list_refuses_everything(marker_module: tuple[str, Path]) -> None:
    mod, marker = marker_module
    with pytest.raises(FactoryError, match="allows no factory"):
        check_allowed(f"{mod}:build", [])
    assert not marker.exists()


@pytest.mark.parametrize("spec", ["", "os.system", "os:system()", "a..b:c", ":f", "m:",
                                  "m:f;g", "x" * 300 + ":f", "m:f\n", None, 3])
def test_malformed_factory_strings(spec: object) -> None:
    with pytest.raises(FactoryError, match=r"package\.module:function"):
        validate_factory(spec)


def test_allowed_factory_must_build_a_module(
    sealed_resnet: Sealed, marker_module: tuple[str, Path]
) -> None:
    mod, _ = marker_module
    with pytest.raises(FactoryError, match=r"torch\.nn\.Module"):
        build_sealed(sealed_resnet.path, f"{mod}:not_a_module",
                     key_provider=KeyFileProvider(sealed_resnet.key),
                     allowed_factories=[f"{mod}:not_a_module"])
    with pytest.raises(FactoryError, match="no callable"):
        resolve(f"{mod}:missing", [f"{mod}:missing"])
    with pytest.raises(FactoryError, match="cannot import"):
        resolve("no_such_module_xyz:f", ["no_such_module_xyz:f"])


def test_allowed_factory_loads_sealed_weights(sealed_resnet: Sealed) -> None:
    module = build_sealed(sealed_resnet.path, FACTORY,
                          key_provider=KeyFileProvider(sealed_resnet.key),
                          allowed_factories=[FACTORY])
    assert not module.training
    plain = sealed_resnet.plain.state_dict()
    for name, t in module.state_dict().items():
        assert torch.equal(t, plain[name]), name


def test_wrong_key_is_refused(sealed_resnet: Sealed) -> None:
    other = generate_model_key("resnet50-test")
    with pytest.raises(WrongKeyError):
        build_sealed(sealed_resnet.path, FACTORY, key_provider=KeyFileProvider(other),
                     allowed_factories=[FACTORY])


def test_a_sealed_directory_is_refused_a_factory_not_allowed_before_import(
    tmp_path: Path, sealed_resnet: Sealed, marker_module: tuple[str, Path]
) -> None:
    mod, marker = marker_module
    with pytest.raises(FactoryError, match="allow-list"):
        build_sealed(tmp_path, "sealtorch.hf.embedding:sentence_embedding",
                     key_provider=KeyFileProvider(sealed_resnet.key), allowed_factories=[FACTORY])
    with pytest.raises(FactoryError, match="allow-list"):
        build_sealed(tmp_path, f"{mod}:build", key_provider=KeyFileProvider(sealed_resnet.key),
                     allowed_factories=["sealtorch.hf.embedding:sentence_embedding"])
    assert not marker.exists()


def test_factory_kind_must_match_the_sealed_input(tmp_path: Path, sealed_resnet: Sealed) -> None:
    """A file factory given a directory, or a directory factory given a file, is refused
    before it is called."""
    from sealtorch.hf.embedding import sentence_embedding
    from sealtorch.models.resnet import resnet50
    from sealtorch.runtime.factory import check_kind

    check_kind(sentence_embedding, directory=True)
    check_kind(resnet50, directory=False)
    with pytest.raises(FactoryError, match="is a directory"):
        check_kind(resnet50, directory=True)
    with pytest.raises(FactoryError, match="sealed model given is a file"):
        check_kind(sentence_embedding, directory=False)
    provider = KeyFileProvider(sealed_resnet.key)
    with pytest.raises(FactoryError, match="is a directory"):
        build_sealed(tmp_path, FACTORY, key_provider=provider, allowed_factories=[FACTORY])
    embed = "sealtorch.hf.embedding:sentence_embedding"
    with pytest.raises(FactoryError, match="sealed model given is a file"):
        build_sealed(sealed_resnet.path, embed, key_provider=provider, allowed_factories=[embed])
