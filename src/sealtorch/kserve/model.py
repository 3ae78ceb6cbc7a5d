"""``SealedModel``: a ``kserve.Model`` whose weights are decrypted inside the TEE.

:class:`OIPModel` serves a module whose weights are in place; :class:`SealedModel`'s ``load()``
opens the sealed model through dkeycache with the same core as ``sealtorch serve``
(:mod:`sealtorch.runtime.loading`: the factory is checked against the signed policy before its
module is imported); ``predict()`` checks each input against the model's signature with the
shared codec and runs it in process through the same fixed-shape batcher, so outputs are
bit-identical to :func:`~sealtorch.runtime.batcher.reference_forward` of the plaintext model.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from kserve import Model
from kserve.errors import InvalidInput, ModelNotReady
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from sealtorch.errors import InferenceInputError, OverloadedError, ServeError
from sealtorch.runtime.attested import INFER_RE
from sealtorch.runtime.batcher import Batcher
from sealtorch.runtime.codec import (
    HEADER_LENGTH,
    TensorSpec,
    check_input,
    datatype_of,
    decode_request,
    input_value,
)
from sealtorch.runtime.loading import LoadedModel, SealedSource, load_through_cache
from sealtorch.runtime.model import ServedModel


class OIPModel(Model):
    """A module under ``kserve.ModelServer`` with a fixed signature: requests are checked with
    the shared codec and run through the fixed-shape batcher. :meth:`serve` makes it ready."""

    def __init__(self, name: str, *, inputs: Sequence[TensorSpec],
                 output_names: Sequence[str] = ("output",), max_batch: int = 8,
                 max_queue_rows: int = 256) -> None:
        super().__init__(name)
        self.inputs = tuple(inputs)
        self.output_names = tuple(output_names)
        self.max_batch = max_batch
        self.max_queue_rows = max_queue_rows
        self.served: ServedModel | None = None
        self._batcher: Batcher | None = None
        self._starting: asyncio.Lock | None = None

    def serve(self, module: Any, *, sealed: bool = True) -> bool:
        """Serve ``module`` (its weights already in place); the model is then ready."""
        self.served = ServedModel(self.name, module, inputs=self.inputs,
                                  output_names=self.output_names, sealed=sealed)
        self.ready = True
        return self.ready

    async def batcher(self) -> Batcher:
        """The model's batcher, started (warm-up at the fixed shape) on first use in the
        server's event loop."""
        if self._batcher is not None and self._batcher.ready:
            return self._batcher
        if self.served is None:
            raise ServeError("the model is not loaded")
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._batcher is None:
                b = Batcher(self.served, max_batch=self.max_batch,
                            max_queue_rows=self.max_queue_rows)
                await b.start()
                self._batcher = b
        return self._batcher

    def binary_precheck(self, path: str, headers: dict[bytes, bytes], body: bytes
                        ) -> str | None:
        """What is wrong with a binary tensor data request to this model (None: nothing, or
        not such a request): the shared codec reads it as ``sealtorch serve`` would."""
        length = headers.get(HEADER_LENGTH.encode())
        m = INFER_RE.fullmatch(path)
        if length is None or m is None or m.group("name") != self.name:
            return None
        try:
            decoded = decode_request(body, self.inputs, max_batch=self.max_batch,
                                     header_length=length.decode("latin-1"),
                                     output_names=self.output_names)
            if self.served is not None:  # e.g. text that is not UTF-8, which KServe answers 500
                self.served.check_values(decoded.values)
        except InferenceInputError as e:
            return str(e)
        return None

    def get_input_types(self) -> list[dict[str, Any]]:
        """Model metadata: the inputs (``-1``: the batch dimension)."""
        return [s.to_dict() for s in self.inputs]

    def get_output_types(self) -> list[dict[str, Any]]:
        """Model metadata: the outputs, once known (after the first forward pass)."""
        if self._batcher is None:
            return [{"name": n} for n in self.output_names]
        return [s.to_dict() for s in self._batcher.outputs]

    def decode(self, payload: InferRequest) -> list[Any]:
        """One value per model input, in signature order, each checked against its spec."""
        if not isinstance(payload, InferRequest):
            raise InvalidInput("this model speaks the Open Inference Protocol (v2) only")
        names = [s.name for s in self.inputs]
        given = [i.name for i in payload.inputs]
        if sorted(given) != sorted(names):
            raise InvalidInput(f"'inputs' must hold exactly one tensor for each of this "
                               f"model's inputs: {names}")
        values: list[Any] = []
        rows = None
        try:
            for spec in self.inputs:
                inp = payload.inputs[given.index(spec.name)]
                n = check_input(spec, datatype=inp.datatype, shape=list(inp.shape),
                                max_batch=self.max_batch)
                if rows is not None and n != rows:
                    raise InferenceInputError("every input must have the same batch size")
                rows = n
                try:
                    array = inp.as_numpy()
                except (ValueError, TypeError) as e:
                    raise InferenceInputError(f"the data of input {spec.name!r} does not "
                                              f"match its shape and datatype") from e
                if spec.datatype == "BYTES":
                    array = np.array([v.encode() if isinstance(v, str) else bytes(v)
                                      for v in array.reshape(-1)], dtype=object)
                values.append(input_value(spec, array, n))
            if self.served is not None:
                self.served.check_values(values)
        except InferenceInputError as e:
            raise InvalidInput(str(e)) from None
        return values

    async def predict(self, payload: InferRequest,
                      headers: dict[str, str] | None = None) -> InferResponse:
        """Run one request through the batcher; answer every output the model has."""
        values = self.decode(payload)
        batcher = await self.batcher()
        try:
            ys = await batcher.submit_many(values)
        except OverloadedError as e:  # 503: retry later
            raise ModelNotReady(self.name, str(e)) from None
        outputs = []
        for name, y in zip(self.output_names, ys, strict=True):
            arr = y if isinstance(y, np.ndarray) else y.numpy()
            out = InferOutput(name=name, shape=list(arr.shape), datatype=datatype_of(y))
            out.set_data_from_numpy(arr, binary_data=True)  # REST re-encodes it as asked
            outputs.append(out)
        return InferResponse(response_id=payload.id or str(uuid.uuid4()),
                             model_name=self.name, infer_outputs=outputs,
                             use_binary_outputs=payload.use_binary_outputs,
                             requested_outputs=payload.request_outputs)

    def stop(self) -> None:
        """Stop the batcher's worker thread with the server."""
        self.ready = False
        if self._batcher is not None:
            self._batcher.ready = False


class SealedModel(OIPModel):
    """A sealed model served by ``kserve.ModelServer`` (REST and gRPC): :meth:`load` opens it
    through the key cache."""

    def __init__(self, name: str, source: SealedSource, keycache: str, *,
                 inputs: Sequence[TensorSpec], output_names: Sequence[str] = ("output",),
                 max_batch: int = 8, max_queue_rows: int = 256,
                 threads: int | None = None) -> None:
        super().__init__(name, inputs=inputs, output_names=output_names, max_batch=max_batch,
                         max_queue_rows=max_queue_rows)
        self.source = source
        self.keycache = keycache
        self.threads = threads
        self.loaded: LoadedModel | None = None

    def load(self) -> bool:
        """Attest to the key cache, check the factory against the signed policy, decrypt."""
        self.loaded = load_through_cache(self.source, self.keycache, threads=self.threads)
        return self.serve(self.loaded.module)
