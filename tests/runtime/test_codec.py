"""Named inputs and outputs with their OIP datatypes (several inputs, INT64 token ids, BYTES),
JSON and binary tensor data, through tritonclient against `sealtorch serve`'s app."""

from __future__ import annotations

import asyncio
import json
import struct

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from sealtorch.errors import InferenceInputError
from sealtorch.runtime.app import ServeOptions, build_app
from sealtorch.runtime.batcher import Batcher, reference_forward
from sealtorch.runtime.codec import TensorSpec, decode_request
from sealtorch.runtime.localserver import LocalServer
from sealtorch.runtime.model import ServedModel

SEQ = 6
SIGNATURE = (TensorSpec("input_ids", "INT64", (SEQ,)),
             TensorSpec("attention_mask", "INT64", (SEQ,)),
             TensorSpec("text", "BYTES", (1,)))


class Toy(torch.nn.Module):
    """Embeds token ids (masked mean), and echoes its text input upper-cased."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(100, 8, _weight=torch.randn(
            100, 8, generator=torch.Generator().manual_seed(3)))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, text: np.ndarray
                ) -> dict[str, object]:
        m = mask.unsqueeze(-1).float()
        pooled = (self.emb(ids) * m).sum(1) / m.sum(1).clamp(min=1)
        upper = np.array([[t.upper() for t in row] for row in text], dtype=object)
        return {"embedding": pooled, "upper": upper}


def _model() -> ServedModel:
    return ServedModel("toy", Toy(), inputs=SIGNATURE, output_names=("embedding", "upper"))


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (n, SEQ), generator=g)
    mask = (torch.arange(SEQ) < torch.randint(1, SEQ + 1, (n, 1), generator=g)).long()
    text = np.array([[f"héllo {seed} {i}".encode()] for i in range(n)], dtype=object)
    return ids, mask, text


@pytest.fixture(scope="module")
def server():
    with LocalServer(build_app(_model(), ServeOptions(max_batch=4))) as srv:
        yield srv


def _triton(url: str, n: int, seed: int, *, binary: bool) -> tuple[np.ndarray, np.ndarray]:
    ids, mask, text = _batch(n, seed)
    inputs = [th.InferInput("input_ids", [n, SEQ], "INT64"),
              th.InferInput("attention_mask", [n, SEQ], "INT64"),
              th.InferInput("text", [n, 1], "BYTES")]
    for inp, v in zip(inputs, (ids.numpy(), mask.numpy(), text), strict=True):
        inp.set_data_from_numpy(v, binary_data=binary)
    outs = [th.InferRequestedOutput(name, binary_data=binary) for name in ("embedding", "upper")]
    with th.InferenceServerClient(url.removeprefix("http://")) as c:
        r = c.infer("toy", inputs, outputs=outs)
        return r.as_numpy("embedding"), r.as_numpy("upper")


@pytest.mark.parametrize("binary", [False, True])
def test_several_inputs_and_outputs_json_and_binary(server: LocalServer, binary: bool) -> None:
    model = Toy().eval()
    for n, seed in ((1, 1), (3, 2)):
        emb, upper = _triton(server.url, n, seed, binary=binary)
        want_emb, want_upper = reference_forward(model, list(_batch(n, seed)), 4,
                                                 ("embedding", "upper"))
        assert torch.equal(torch.from_numpy(np.array(emb)), want_emb)
        got = [v if isinstance(v, bytes) else v.encode() for v in upper.reshape(-1)]
        assert got == list(want_upper.reshape(-1))
        assert got[0] == f"héllo {seed} 0".encode().upper()


def test_metadata_lists_every_input_and_output(server: LocalServer) -> None:
    with th.InferenceServerClient(server.url.removeprefix("http://")) as c:
        meta = c.get_model_metadata("toy")
        assert c.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    assert meta["inputs"] == [{"name": "input_ids", "datatype": "INT64", "shape": [-1, SEQ]},
                              {"name": "attention_mask", "datatype": "INT64",
                               "shape": [-1, SEQ]},
                              {"name": "text", "datatype": "BYTES", "shape": [-1, 1]}]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 8]},
                               {"name": "upper", "datatype": "BYTES", "shape": [-1, 1]}]


def test_batches_of_several_inputs_are_bit_identical_to_unbatched() -> None:
    model = _model()
    xs = [_batch(n, 10 + n) for n in (1, 2, 1, 3)]

    async def run() -> list[list[object]]:
        b = Batcher(model, max_batch=4)
        await b.start()
        try:
            return list(await asyncio.gather(*(b.submit_many(list(x)) for x in xs)))
        finally:
            await b.stop()

    for x, (emb, upper) in zip(xs, asyncio.run(run()), strict=True):
        alone = [reference_forward(model.module, [v[i:i + 1] for v in x], 4,
                                   model.output_names) for i in range(x[0].shape[0])]
        assert torch.equal(emb, torch.cat([a[0] for a in alone]))
        assert list(upper.reshape(-1)) == [a[1][0, 0] for a in alone]


def _binary_body(header: dict, tail: bytes) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(header).encode()
    return raw + tail, {"Inference-Header-Content-Length": str(len(raw)),
                        "Content-Type": "application/octet-stream"}


def test_bad_binary_requests_get_400(server: LocalServer) -> None:
    ids = np.zeros((1, SEQ), dtype=np.int64).tobytes()
    text = struct.pack("<I", 2) + b"hi"

    def inp(name: str, dt: str, size: int, shape: list[int] | None = None) -> dict:
        return {"name": name, "datatype": dt, "shape": shape or [1, SEQ],
                "parameters": {"binary_data_size": size}}

    good = [inp("input_ids", "INT64", len(ids)), inp("attention_mask", "INT64", len(ids)),
            inp("text", "BYTES", len(text), [1, 1])]
    cases = [
        (good, ids + ids + text[:-1], "does not match"),                       # short tail
        (good, ids + ids + text + b"x", "more binary data"),                    # long tail
        ([good[0], {**good[1], "parameters": {"binary_data_size": 8}}, good[2]],
         ids + ids[:8] + text, "wrong size"),                                   # FP size
        ([good[0], good[1], inp("text", "BYTES", 3, [1, 1])], ids + ids + b"\x09\x00\x00",
         "truncated"),
        ([{**good[0], "datatype": "INT32"}, good[1], good[2]], ids + ids + text,
         "wrong datatype"),
    ]
    with httpx.Client(base_url=server.url) as c:
        for inputs, tail, msg in cases:
            body, headers = _binary_body({"inputs": inputs}, tail)
            r = c.post("/v2/models/toy/infer", content=body, headers=headers)
            assert r.status_code == 400 and msg in r.json()["error"], (msg, r.text)
        body, headers = _binary_body({"inputs": good}, ids + ids + text)
        r = c.post("/v2/models/toy/infer", content=body,
                   headers={**headers, "Inference-Header-Content-Length": "99999"})
        assert r.status_code == 400 and "length of the JSON part" in r.json()["error"]
        r = c.post("/v2/models/toy/infer", content=body,
                   headers={**headers, "Content-Type": "text/plain"})
        assert r.status_code == 415
        r = c.post("/v2/models/toy/infer", content=body, headers=headers)
        assert r.status_code == 200, r.text


def test_tritonclient_sees_the_error_message(server: LocalServer) -> None:
    inp = th.InferInput("input_ids", [1, SEQ + 1], "INT64")
    inp.set_data_from_numpy(np.zeros((1, SEQ + 1), dtype=np.int64))
    with th.InferenceServerClient(server.url.removeprefix("http://")) as c, \
            pytest.raises(InferenceServerException, match="exactly one tensor for each"):
        c.infer("toy", [inp])


def test_decode_checks_requested_outputs_and_utf8() -> None:
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1],
                        "data": ["a"]}], "outputs": [{"name": "nope"}]}
    with pytest.raises(InferenceInputError, match="unknown or repeated output name"):
        decode_request(json.dumps(body).encode(), SIGNATURE[2:], max_batch=2,
                       output_names=("upper",))
    body["outputs"] = [{"name": "upper", "parameters": {"binary_data": True}}]
    req = decode_request(json.dumps(body).encode(), SIGNATURE[2:], max_batch=2,
                         output_names=("upper",))
    assert req.outputs == ["upper"] and req.wants_binary("upper")
    assert req.values[0].tolist() == [[b"a"]]
