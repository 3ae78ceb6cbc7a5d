"""The bounded body reader shared by the inference servers: an announced length over the limit
is refused before anything is read, a streamed one as soon as it passes the limit."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sealtorch.runtime.asgi import BodyRefused, check_content_length, read_body


def _receiver(*chunks: bytes, disconnect: bool = False):
    """An ASGI receive callable that yields ``chunks`` (then a disconnect if asked); it counts
    how many messages were taken."""
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1 or disconnect}
        for i, c in enumerate(chunks)]
    if disconnect:
        messages.append({"type": "http.disconnect"})
    taken = []

    async def receive() -> dict[str, Any]:
        taken.append(1)
        return messages[len(taken) - 1]

    return receive, taken


@pytest.mark.parametrize(("value", "status"), [("11", 413), (b"11", 413), ("1e3", 400),
                                                ("-1", 400), ("١٢", 400), ("9" * 16, 400)])
def test_announced_length_refused(value: str | bytes, status: int) -> None:
    with pytest.raises(BodyRefused) as e:
        check_content_length(value, 10)
    assert e.value.status == status


@pytest.mark.parametrize("value", [None, "", "0", "10", b"10"])
def test_announced_length_accepted(value: str | bytes | None) -> None:
    check_content_length(value, 10)


def test_streamed_body_read_whole_or_refused_as_it_passes_the_limit() -> None:
    receive, _ = _receiver(b"abc", b"def", b"")
    assert asyncio.run(read_body(receive, 6)) == b"abcdef"
    receive, taken = _receiver(b"abcd", b"efgh", b"ijkl")
    with pytest.raises(BodyRefused) as e:
        asyncio.run(read_body(receive, 6))
    assert e.value.status == 413 and "larger than 6 bytes" in e.value.message
    assert len(taken) == 2   # the third chunk is never read


def test_client_gone_mid_body() -> None:
    receive, _ = _receiver(b"abc", disconnect=True)
    with pytest.raises(BodyRefused) as e:
        asyncio.run(read_body(receive, 100))
    assert (e.value.status, e.value.code) == (400, "disconnected")
