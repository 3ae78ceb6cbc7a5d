"""Dynamic batching on one inference thread, with a fixed batch shape.

Concurrent requests wait in an asyncio queue; one task takes as many as fit in ``max_batch`` rows
and runs them in a single forward pass on a dedicated thread (``torch.inference_mode``).

Why a *fixed* shape: on CPU, PyTorch/oneDNN pick kernels by batch size (and thread count), so a
sample's output can differ in the last bits between a batch of 1 and a batch of 4 (measured for
ResNet-50 in eval mode). Every forward therefore runs at exactly ``max_batch`` rows, padding with
zeros, so a request's output depends only on its own input and never on which requests it was
batched with; :func:`reference_forward` computes the same thing for a plaintext model.

A model may take several inputs (tensors, or numpy arrays of ``bytes`` for BYTES inputs, padded
with ``b""``), called as ``module(*inputs)``, and return one tensor, a tuple of them, or a dict
keyed by output name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from sealtorch.errors import OverloadedError, ServeError
from sealtorch.runtime.codec import NUMPY_DTYPES, TensorSpec, datatype_of

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from sealtorch.runtime.codec import Value
    from sealtorch.runtime.model import ServedModel

log = logging.getLogger("sealtorch.serve")


def _pad(values: Sequence[Value], max_batch: int) -> list[Value]:
    """Each value zero-padded (BYTES: ``b""``) to ``max_batch`` rows."""
    import torch

    out: list[Value] = []
    for v in values:
        p: Value
        if isinstance(v, np.ndarray):
            p = np.full((max_batch, *v.shape[1:]), b"", dtype=object)
        else:
            p = torch.zeros((max_batch, *v.shape[1:]), dtype=v.dtype)
        p[: v.shape[0]] = v  # type: ignore[assignment]
        out.append(p)
    return out


def call_module(module: Any, values: Sequence[Value], output_names: Sequence[str]
                ) -> list[Value]:
    """Run ``module(*values)`` (inference mode) and return its outputs in ``output_names``
    order; raises :class:`ServeError` if they do not match."""
    import torch

    with torch.inference_mode():
        out = module(*values)
    if isinstance(out, dict):
        if set(out) != set(output_names):
            raise ServeError(f"the model returned outputs {sorted(out)}; expected "
                             f"{list(output_names)}")
        outs = [out[n] for n in output_names]
    else:
        outs = list(out) if isinstance(out, tuple | list) else [out]
    if len(outs) != len(output_names) or not all(
            isinstance(o, torch.Tensor | np.ndarray) and o.ndim >= 1 for o in outs):
        raise ServeError(f"the model must return {len(output_names)} tensor(s) "
                         f"({', '.join(output_names)}) with the batch as first dimension")
    return outs


def reference_forward(module: torch.nn.Module, x: Value | Sequence[Value], max_batch: int,
                      output_names: Sequence[str] = ("output",)) -> Any:
    """What the server returns for ``x`` (one input, or a list of them): forward in
    ``max_batch``-row padded batches. One output: that tensor; several: a list."""
    import torch

    xs = [x] if isinstance(x, torch.Tensor | np.ndarray) else list(x)
    parts: list[list[Value]] = []
    for start in range(0, xs[0].shape[0], max_batch):
        chunk = [v[start:start + max_batch] for v in xs]
        rows = chunk[0].shape[0]
        parts.append([_copy(o[:rows]) for o in call_module(module, _pad(chunk, max_batch),
                                                           output_names)])
    outs = [_cat([p[i] for p in parts]) for i in range(len(output_names))]
    return outs[0] if len(outs) == 1 else outs


def _copy(v: Value) -> Value:
    return v.copy() if isinstance(v, np.ndarray) else v.clone()


def _cat(vs: list[Value]) -> Value:
    import torch

    if isinstance(vs[0], np.ndarray):
        return np.concatenate(vs)
    return torch.cat([v for v in vs if isinstance(v, torch.Tensor)])


@dataclass
class _Item:
    values: list[Value]
    future: asyncio.Future[list[Value]] = field(repr=False)

    @property
    def rows(self) -> int:
        return int(self.values[0].shape[0])


class Batcher:
    """Collects concurrent requests into batches of at most ``max_batch`` rows."""

    def __init__(self, model: ServedModel, *, max_batch: int = 8, max_queue_rows: int = 256,
                 on_batch: Callable[[float], object] | None = None) -> None:
        if not 1 <= max_batch <= 1024:
            raise ServeError("max batch must be between 1 and 1024")
        self.model = model
        self.max_batch = max_batch
        self.max_queue_rows = max(max_queue_rows, max_batch)
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Item] | None = None
        self._carry: _Item | None = None
        self._queued_rows = 0
        self._task: asyncio.Task[None] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.ready = False
        self.outputs: list[TensorSpec] = []

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a forward pass."""
        return self._queued_rows

    async def start(self) -> None:
        """Warm the model up at the fixed shape (checks it runs) and start the worker."""
        import torch

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sealtorch-infer")
        loop = asyncio.get_running_loop()
        warm: list[Value] = []
        for spec in self.model.inputs:
            if spec.datatype == "BYTES":
                warm.append(np.full((1, *spec.shape), b"", dtype=object))
            else:
                warm.append(torch.zeros((1, *spec.shape),
                                        dtype=torch.from_numpy(np.zeros(
                                            0, NUMPY_DTYPES[spec.datatype])).dtype))
        ys = await loop.run_in_executor(self._pool, self._forward, _pad(warm, self.max_batch))
        if any(y.shape[0] != self.max_batch for y in ys):
            raise ServeError("the model must return tensors with the batch as first dimension")
        self.outputs = [TensorSpec(n, datatype_of(y), tuple(y.shape[1:]))
                        for n, y in zip(self.model.output_names, ys, strict=True)]
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="sealtorch-batcher")
        self.ready = True

    async def stop(self) -> None:
        """Stop the worker; pending requests fail."""
        self.ready = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    async def submit(self, x: Value | Sequence[Value]) -> Any:
        """Queue one input (a tensor) or one value per model input (``[n, ...]``, ``n <=
        max_batch``); return the output rows (one output: a tensor; several: a list)."""
        import torch

        values: list[Value] = ([x] if isinstance(x, np.ndarray | torch.Tensor)
                               else list(x))
        outs = await self.submit_many(values)
        return outs[0] if len(outs) == 1 else outs

    async def submit_many(self, values: list[Value]) -> list[Value]:
        """Queue one value per model input; return every output's rows, in output order."""
        if self._queue is None or not self.ready:
            raise ServeError("the model is not ready")
        rows = int(values[0].shape[0])
        if self._queued_rows + rows > self.max_queue_rows:
            raise OverloadedError("too many requests are waiting; retry later")
        fut: asyncio.Future[list[Value]] = asyncio.get_running_loop().create_future()
        self._queued_rows += rows
        await self._queue.put(_Item(values, fut))
        return await fut

    def _forward(self, xs: list[Value]) -> list[Value]:
        return call_module(self.model.module, xs, self.model.output_names)

    async def _next_batch(self) -> list[_Item]:
        assert self._queue is not None
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
        batch, rows = [first], first.rows
        while rows < self.max_batch:
            try:
                nxt = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if rows + nxt.rows > self.max_batch:
                self._carry = nxt
                break
            batch.append(nxt)
            rows += nxt.rows
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            rows = sum(it.rows for it in batch)
            self._queued_rows -= rows
            live = [it for it in batch if not it.future.done()]
            if not live:
                continue
            try:
                joined = [_cat([it.values[i] for it in live])
                          for i in range(len(live[0].values))]
                off = int(joined[0].shape[0])
                ys = await loop.run_in_executor(self._pool, self._forward,
                                                _pad(joined, self.max_batch))
            except Exception as e:  # the model failed: every waiting request gets the error
                log.error("inference failed: %s", type(e).__name__)
                for it in live:
                    if not it.future.done():
                        it.future.set_exception(ServeError(
                            f"inference failed ({type(e).__name__}); see the server log"))
                continue
            if self._on_batch is not None:
                self._on_batch(off)
            off = 0
            for it in live:
                if not it.future.done():
                    it.future.set_result([y[off:off + it.rows] for y in ys])
                off += it.rows
