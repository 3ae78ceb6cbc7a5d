"""Dynamic batching on one inference thread, with a fixed batch shape.

Concurrent requests wait in an asyncio queue; one task takes as many as fit in ``max_batch`` rows
and runs them in a single forward pass on a dedicated thread (``torch.inference_mode``).

Why a *fixed* shape: on CPU, PyTorch/oneDNN pick kernels by batch size (and thread count), so a
sample's output can differ in the last bits between a batch of 1 and a batch of 4 (measured for
ResNet-50 in eval mode). Every forward therefore runs at exactly ``max_batch`` rows, padding with
zeros, so a request's output depends only on its own input and never on which requests it was
batched with; :func:`reference_forward` computes the same thing for a plaintext model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sealtorch.errors import OverloadedError, ServeError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from sealtorch.runtime.model import ServedModel

log = logging.getLogger("sealtorch.serve")


def reference_forward(module: torch.nn.Module, x: torch.Tensor, max_batch: int) -> torch.Tensor:
    """What the server returns for ``x``: forward in ``max_batch``-row zero-padded batches."""
    import torch

    outs = []
    with torch.inference_mode():
        for start in range(0, x.shape[0], max_batch):
            part = x[start:start + max_batch]
            padded = torch.zeros((max_batch, *x.shape[1:]), dtype=x.dtype)
            padded[: part.shape[0]] = part
            outs.append(module(padded)[: part.shape[0]].clone())
    return torch.cat(outs)


@dataclass
class _Item:
    x: torch.Tensor
    future: asyncio.Future[torch.Tensor] = field(repr=False)

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])


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

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a forward pass."""
        return self._queued_rows

    async def start(self) -> None:
        """Warm the model up at the fixed shape (checks it runs) and start the worker."""
        import torch

        from sealtorch.runtime.model import torch_dtype

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sealtorch-infer")
        loop = asyncio.get_running_loop()
        x = torch.zeros((self.max_batch, *self.model.input_shape),
                        dtype=torch_dtype(self.model.datatype))
        y = await loop.run_in_executor(self._pool, self._forward, x)
        if not isinstance(y, torch.Tensor) or y.dim() < 1 or y.shape[0] != self.max_batch:
            raise ServeError("the model must return one tensor with the batch as first dimension")
        self.output_shape: tuple[int, ...] = tuple(y.shape[1:])
        self.output_datatype = _datatype(y)
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

    async def submit(self, x: torch.Tensor) -> torch.Tensor:
        """Queue ``x`` (``[n, *input_shape]``, ``n <= max_batch``); return its output rows."""
        if self._queue is None or not self.ready:
            raise ServeError("the model is not ready")
        if self._queued_rows + x.shape[0] > self.max_queue_rows:
            raise OverloadedError("too many requests are waiting; retry later")
        fut: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self._queued_rows += int(x.shape[0])
        await self._queue.put(_Item(x, fut))
        return await fut

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            out = self.model.module(x)
        if not isinstance(out, torch.Tensor):
            raise ServeError("the model returned something other than one tensor")
        return out

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
        import torch

        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            rows = sum(it.rows for it in batch)
            self._queued_rows -= rows
            live = [it for it in batch if not it.future.done()]
            if not live:
                continue
            try:
                x = torch.zeros((self.max_batch, *live[0].x.shape[1:]), dtype=live[0].x.dtype)
                off = 0
                for it in live:
                    x[off:off + it.rows] = it.x
                    off += it.rows
                y = await loop.run_in_executor(self._pool, self._forward, x)
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
                    it.future.set_result(y[off:off + it.rows])
                off += it.rows


def _datatype(y: torch.Tensor) -> str:
    from sealtorch.runtime.model import datatype_of

    return datatype_of(y.dtype)
