"""`OIPModel` (what the KServe predictor serves) with several named inputs of OIP datatypes,
INT64 token ids and BYTES included: KServe's own request objects in, the codec's checks, and
outputs bit-identical to the unbatched reference."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferRequest
from tests.runtime.test_codec import SEQ, SIGNATURE, Toy, _batch

from sealtorch.kserve.model import OIPModel
from sealtorch.runtime.batcher import reference_forward


def _request(n: int, seed: int, *, binary: bool, ids_dtype: str = "INT64") -> InferRequest:
    ids, mask, text = _batch(n, seed)
    inputs = []
    for name, dt, v in (("input_ids", ids_dtype, ids.numpy()),
                        ("attention_mask", "INT64", mask.numpy()), ("text", "BYTES", text)):
        inp = InferInput(name, list(v.shape), dt)
        if dt == "INT64" or dt == "BYTES":
            inp.set_data_from_numpy(v, binary_data=binary)
        else:
            inp.data = v.reshape(-1).tolist()
        inputs.append(inp)
    return InferRequest(model_name="toy", infer_inputs=inputs, request_id=f"r{seed}")


def _model() -> OIPModel:
    m = OIPModel("toy", inputs=SIGNATURE, output_names=("embedding", "upper"), max_batch=4)
    m.serve(Toy().eval(), sealed=False)
    return m


@pytest.mark.parametrize("binary", [False, True])
def test_predict_several_inputs(binary: bool) -> None:
    model = _model()

    async def run() -> list:
        return list(await asyncio.gather(*(model.predict(_request(n, 20 + n, binary=binary))
                                           for n in (1, 3, 2))))

    for n, res in zip((1, 3, 2), asyncio.run(run()), strict=True):
        want_emb, want_upper = reference_forward(model.served.module, list(_batch(n, 20 + n)),
                                                 4, model.output_names)
        emb = res.get_output_by_name("embedding").as_numpy()
        upper = res.get_output_by_name("upper").as_numpy()
        assert res.id == f"r{20 + n}"
        assert torch.equal(torch.from_numpy(np.array(emb)), want_emb)
        assert list(upper.reshape(-1)) == list(want_upper.reshape(-1))
    assert model.get_input_types()[0] == {"name": "input_ids", "datatype": "INT64",
                                          "shape": [-1, SEQ]}
    assert model.get_output_types()[1] == {"name": "upper", "datatype": "BYTES", "shape": [-1, 1]}


def test_bad_requests_are_invalid_input() -> None:
    model = _model()
    with pytest.raises(InvalidInput, match="wrong datatype for input 'input_ids'"):
        asyncio.run(model.predict(_request(1, 1, binary=False, ids_dtype="INT32")))
    req = _request(1, 2, binary=False)
    req.inputs = req.inputs[:2]
    with pytest.raises(InvalidInput, match="exactly one tensor for each"):
        asyncio.run(model.predict(req))
    req = _request(1, 3, binary=False)
    req.inputs[0]._shape = [1, SEQ + 1]
    with pytest.raises(InvalidInput, match="wrong shape"):
        asyncio.run(model.predict(req))
    with pytest.raises(InvalidInput, match="Open Inference Protocol"):
        asyncio.run(model.predict({"instances": [1]}))  # type: ignore[arg-type]
