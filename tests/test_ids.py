"""The one model-id rule: the sealed format, key files, grants and release requests agree."""

from __future__ import annotations

import pytest

from sealtorch.errors import KeyFileError, ProtocolError
from sealtorch.format.keyfile import validate_model_id
from sealtorch.ids import MODEL_ID_MAX, is_model_id
from sealtorch.protocol.wire import parse_models

VALID = ["acme/resnet50", "acme@v1", "x:y+z=1", "a/.b", "A" * MODEL_ID_MAX, "m-1_2.3"]
INVALID = ["", ".a", "a/", "a//b", "a/./b", "a/../b", "a/..", "a b", "a\n", "é",
           "A" * (MODEL_ID_MAX + 1), "/abs", None, 7]


@pytest.mark.parametrize("mid", VALID)
def test_valid_everywhere(mid: str) -> None:
    assert is_model_id(mid)
    assert validate_model_id(mid) == mid
    assert parse_models([mid]) == [mid]


@pytest.mark.parametrize("mid", INVALID)
def test_invalid_everywhere(mid: object) -> None:
    assert not is_model_id(mid)
    with pytest.raises(KeyFileError):
        validate_model_id(mid)
    with pytest.raises(ProtocolError):
        parse_models([mid])
