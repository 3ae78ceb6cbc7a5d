"""The Open Inference Protocol (KServe v2) REST app served by ``sealtorch serve``.

Endpoints: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}``,
``/v2/models/{name}/ready``, ``POST /v2/models/{name}/infer`` (JSON tensors) and ``GET
/metrics`` (Prometheus). Every bad request gets a 4xx with ``{"error": "..."}`` that says what
was wrong without echoing the input; the server keeps serving.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import sealtorch
from sealtorch.errors import InferenceInputError, OverloadedError, ServeError
from sealtorch.runtime.batcher import Batcher
from sealtorch.runtime.ratelimit import RateLimiter

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from sealtorch.runtime.model import ServedModel

log = logging.getLogger("sealtorch.serve")

MAX_ID_LEN = 128
_MODEL_KEYS = {"id", "parameters", "inputs", "outputs"}
_INPUT_KEYS = {"name", "shape", "datatype", "data", "parameters"}


@dataclass(frozen=True)
class ServeOptions:
    """Limits of one server."""

    max_batch: int = 8
    max_body_bytes: int | None = None  # default: enough for max_batch samples as JSON
    rate_per_second: float = 100.0
    rate_burst: int = 200
    max_queue_rows: int = 256
    metrics: bool = True


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _reject_constant(name: str) -> float:
    raise InferenceInputError("JSON numbers must be finite (NaN/Infinity are not allowed)")


def parse_infer_request(body: bytes, model: ServedModel, max_batch: int) -> tuple[str | None,
                                                                                 torch.Tensor]:
    """Validate a KServe v2 JSON infer request; return its id and the input tensor."""
    import numpy as np
    import torch

    from sealtorch.runtime.model import torch_dtype

    try:
        doc = json.loads(body, parse_constant=_reject_constant)
    except InferenceInputError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InferenceInputError("the request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InferenceInputError("the request must be a JSON object with an 'inputs' list")
    unknown = set(doc) - _MODEL_KEYS
    if unknown:
        raise InferenceInputError(f"unknown request field(s); allowed: {sorted(_MODEL_KEYS)}")
    rid = doc.get("id")
    if rid is not None and (not isinstance(rid, str) or len(rid) > MAX_ID_LEN
                            or not rid.isprintable()):
        raise InferenceInputError(f"'id' must be a printable string of at most {MAX_ID_LEN} "
                                  "characters")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InferenceInputError(
            f"'inputs' must be a list with exactly one tensor named {model.input_name!r}")
    inp = inputs[0]
    if set(inp) - _INPUT_KEYS or not {"name", "shape", "datatype", "data"} <= set(inp):
        raise InferenceInputError("an input tensor needs exactly 'name', 'shape', 'datatype' "
                                  "and 'data' (and optional 'parameters')")
    if inp["name"] != model.input_name:
        raise InferenceInputError(f"unknown input name; this model's input is "
                                  f"{model.input_name!r}")
    if inp["datatype"] != model.datatype:
        raise InferenceInputError(f"wrong datatype; this model takes {model.datatype}")
    shape = inp["shape"]
    want = list(model.input_shape)
    if (not isinstance(shape, list) or len(shape) != len(want) + 1
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        raise InferenceInputError(f"wrong shape; expected [batch, {', '.join(map(str, want))}]")
    if shape[1:] != want:
        raise InferenceInputError(f"wrong shape; expected [batch, {', '.join(map(str, want))}]")
    if not 1 <= shape[0] <= max_batch:
        raise InferenceInputError(f"batch size must be between 1 and {max_batch}")
    data = inp["data"]
    if not isinstance(data, list):
        raise InferenceInputError("'data' must be a list of numbers (flat or nested)")
    try:
        arr = np.array(data)
    except (ValueError, TypeError, OverflowError):
        raise InferenceInputError("'data' must be a rectangular list of numbers") from None
    if arr.dtype.kind not in "fiu":
        raise InferenceInputError("'data' must contain only numbers")
    n = math.prod(shape)
    if arr.size != n or (arr.ndim > 1 and list(arr.shape) != shape):
        raise InferenceInputError(f"'data' has the wrong number of values for shape; expected "
                                  f"{n}")
    dtype = torch_dtype(model.datatype)
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64,
                torch.int64: np.int64, torch.int32: np.int32}[dtype]
    if arr.dtype.kind == "f" and np_dtype in (np.int64, np.int32):
        raise InferenceInputError(f"wrong datatype; this model takes {model.datatype} values")
    with np.errstate(over="ignore", invalid="ignore"):
        conv = arr.astype(np_dtype).reshape(shape)
    if conv.dtype.kind == "f" and not np.isfinite(conv).all():
        raise InferenceInputError(f"values out of range for {model.datatype}")
    if conv.dtype.kind in "iu" and not np.array_equal(conv, arr.reshape(shape)):
        raise InferenceInputError(f"values out of range for {model.datatype}")
    return rid, torch.from_numpy(np.ascontiguousarray(conv))


class _Metrics:
    """Prometheus metrics of one app (own registry; no key material, no inputs)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("sealtorch_serve_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("sealtorch_serve_infer_seconds", "Infer request latency",
                                 registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.batch_rows = Histogram("sealtorch_serve_batch_rows", "Rows per forward pass",
                                    registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.queue_rows = Gauge("sealtorch_serve_queue_rows", "Rows waiting for inference",
                                registry=self.registry)
        self.ready = Gauge("sealtorch_serve_ready", "1 when the model is ready",
                           registry=self.registry)


def build_app(model: ServedModel, options: ServeOptions | None = None) -> Starlette:
    """A Starlette app serving ``model`` (already loaded: sealed or plaintext)."""
    opts = options or ServeOptions()
    metrics = _Metrics()
    batcher = Batcher(model, max_batch=opts.max_batch, max_queue_rows=opts.max_queue_rows,
                      on_batch=metrics.batch_rows.observe)
    limiter = RateLimiter(opts.rate_per_second, opts.rate_burst)
    max_body = opts.max_body_bytes or (
        65536 + opts.max_batch * model.sample_elements * 32)

    def error(status: int, message: str, endpoint: str,
              headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.requests.labels(endpoint, str(status)).inc()
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def ok(body: dict[str, Any], endpoint: str, status: int = 200) -> JSONResponse:
        metrics.requests.labels(endpoint, str(status)).inc()
        return JSONResponse(body, status_code=status)

    def check_model(request: Request, endpoint: str) -> JSONResponse | None:
        name = request.path_params["name"]
        version = request.path_params.get("version")
        if name != model.name or (version is not None and version != model.version):
            return error(404, "unknown model name or version", endpoint)
        return None

    async def live(request: Request) -> Response:
        return ok({"live": True}, "live")

    async def ready(request: Request) -> Response:
        return ok({"ready": batcher.ready}, "ready", 200 if batcher.ready else 503)

    async def server_meta(request: Request) -> Response:
        return ok({"name": "sealtorch", "version": sealtorch.__version__, "extensions": []},
                  "server")

    async def model_meta(request: Request) -> Response:
        if (bad := check_model(request, "model")) is not None:
            return bad
        if not batcher.ready:
            return error(503, "the model is not ready", "model")
        return ok({
            "name": model.name, "versions": [model.version], "platform": "pytorch",
            "inputs": [{"name": model.input_name, "datatype": model.datatype,
                        "shape": [-1, *model.input_shape]}],
            "outputs": [{"name": model.output_name, "datatype": batcher.output_datatype,
                         "shape": [-1, *batcher.output_shape]}],
        }, "model")

    async def model_ready(request: Request) -> Response:
        if (bad := check_model(request, "model_ready")) is not None:
            return bad
        return ok({"name": model.name, "ready": batcher.ready}, "model_ready",
                  200 if batcher.ready else 503)

    async def read_body(request: Request) -> bytes:
        cl = request.headers.get("content-length")
        if cl is not None:
            if not cl.isdigit() or len(cl) > 15:
                raise _HTTPError(400, "invalid Content-Length header")
            if int(cl) > max_body:
                raise _HTTPError(413, f"request body larger than {max_body} bytes")
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
        if ctype.lower() != "application/json":
            raise _HTTPError(415, "the request body must be application/json")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                raise _HTTPError(413, f"request body larger than {max_body} bytes")
        return bytes(body)

    async def infer(request: Request) -> Response:
        import anyio

        endpoint = "infer"
        if (bad := check_model(request, endpoint)) is not None:
            return bad
        client = request.client.host if request.client else "unknown"
        if not limiter.allow(client):
            return error(429, "rate limit exceeded; slow down", endpoint,
                         {"Retry-After": str(limiter.retry_after())})
        if not batcher.ready:
            return error(503, "the model is not ready", endpoint)
        start = time.perf_counter()
        try:
            body = await read_body(request)
            rid, x = await anyio.to_thread.run_sync(
                parse_infer_request, body, model, opts.max_batch)
        except _HTTPError as e:
            return error(e.status, e.message, endpoint, e.headers)
        except InferenceInputError as e:
            return error(400, str(e), endpoint)
        try:
            metrics.queue_rows.set(batcher.queued_rows + x.shape[0])
            y = await batcher.submit(x)
        except OverloadedError as e:
            return error(503, str(e), endpoint, {"Retry-After": "1"})
        except ServeError as e:
            log.error("inference failed: %s", e)
            return error(500, "inference failed; see the server log", endpoint)
        finally:
            metrics.queue_rows.set(batcher.queued_rows)
        out: dict[str, Any] = {
            "model_name": model.name, "model_version": model.version,
            "outputs": [{"name": model.output_name, "datatype": batcher.output_datatype,
                         "shape": list(y.shape), "data": y.reshape(-1).tolist()}],
        }
        if rid is not None:
            out["id"] = rid
        metrics.latency.observe(time.perf_counter() - start)
        return ok(out, endpoint)

    async def metrics_endpoint(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        metrics.ready.set(1 if batcher.ready else 0)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await batcher.start()
        log.info("model %s ready (max batch %d, sealed=%s)", model.name, opts.max_batch,
                 model.sealed)
        try:
            yield
        finally:
            await batcher.stop()

    routes = [
        Route("/v2", server_meta),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2/models/{name}", model_meta),
        Route("/v2/models/{name}/ready", model_ready),
        Route("/v2/models/{name}/versions/{version}", model_meta),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
    ]
    if opts.metrics:
        routes.append(Route("/metrics", metrics_endpoint))
    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        text = {404: "no such endpoint", 405: "method not allowed on this endpoint"}
        return error(status, text.get(status, "request failed"), "other")

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error})
    app.state.batcher = batcher
    app.state.model = model
    app.state.metrics = metrics
    app.state.max_body = max_body
    return app
