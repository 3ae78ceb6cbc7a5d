"""The Open Inference Protocol (KServe v2) REST app served by ``sealtorch serve``.

Endpoints: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}``,
``/v2/models/{name}/ready``, ``POST /v2/models/{name}/infer`` (JSON tensors, and the binary
tensor data extension; :mod:`.codec`) and ``GET /metrics`` (Prometheus). Every
bad request gets a 4xx with ``{"error": "..."}`` that says what was wrong without echoing the
input; the server keeps serving.
"""

from __future__ import annotations

import contextlib
import logging
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
from sealtorch.runtime.asgi import BodyRefused, check_content_length, read_body
from sealtorch.runtime.attested import JSON_ONLY
from sealtorch.runtime.batcher import Batcher
from sealtorch.runtime.codec import HEADER_LENGTH, decode_request, encode_response
from sealtorch.runtime.ratelimit import RateLimiter

if TYPE_CHECKING:  # pragma: no cover
    from sealtorch.runtime.model import ServedModel

log = logging.getLogger("sealtorch.serve")

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
    max_body = opts.max_body_bytes or (65536 + opts.max_batch * model.max_sample_bytes)

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
        return ok({"name": "sealtorch", "version": sealtorch.__version__,
                   "extensions": ["binary_tensor_data"]}, "server")

    async def model_meta(request: Request) -> Response:
        if (bad := check_model(request, "model")) is not None:
            return bad
        if not batcher.ready:
            return error(503, "the model is not ready", "model")
        return ok({
            "name": model.name, "versions": [model.version], "platform": "pytorch",
            "inputs": [s.to_dict() for s in model.inputs],
            "outputs": [s.to_dict() for s in batcher.outputs],
        }, "model")

    async def model_ready(request: Request) -> Response:
        if (bad := check_model(request, "model_ready")) is not None:
            return bad
        return ok({"name": model.name, "ready": batcher.ready}, "model_ready",
                  200 if batcher.ready else 503)

    async def request_body(request: Request) -> bytes:
        try:
            check_content_length(request.headers.get("content-length"), max_body)
            ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
            binary = HEADER_LENGTH in request.headers
            if ctype.lower() not in (("application/json", "application/octet-stream") if binary
                                     else ("application/json",)):
                raise _HTTPError(415, "the request body must be application/json (or binary "
                                      f"tensor data with the {HEADER_LENGTH} header)")
            return await read_body(request.receive, max_body)
        except BodyRefused as e:
            raise _HTTPError(e.status, e.message) from None

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
            body = await request_body(request)
            req = await anyio.to_thread.run_sync(lambda: decode_request(
                body, model.inputs, max_batch=opts.max_batch,
                header_length=request.headers.get(HEADER_LENGTH),
                output_names=model.output_names))
            await anyio.to_thread.run_sync(model.check_values, req.values)
        except _HTTPError as e:
            return error(e.status, e.message, endpoint, e.headers)
        except InferenceInputError as e:
            return error(400, str(e), endpoint)
        if request.scope.get(JSON_ONLY):
            req.binary_default, req.binary = False, {}
        try:
            metrics.queue_rows.set(batcher.queued_rows + req.rows)
            ys = await batcher.submit_many(req.values)
        except OverloadedError as e:
            return error(503, str(e), endpoint, {"Retry-After": "1"})
        except ServeError as e:
            log.error("inference failed: %s", e)
            return error(500, "inference failed; see the server log", endpoint)
        finally:
            metrics.queue_rows.set(batcher.queued_rows)
        try:
            out, header_len = encode_response(
                model_name=model.name, model_version=model.version, request=req,
                outputs=list(zip(model.output_names, ys, strict=True)))
        except InferenceInputError as e:
            return error(400, str(e), endpoint)
        metrics.latency.observe(time.perf_counter() - start)
        metrics.requests.labels(endpoint, "200").inc()
        if header_len is None:
            return Response(out, media_type="application/json")
        return Response(out, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(header_len)})

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
