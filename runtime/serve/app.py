"""The HTTP app around one Pipeline: the native API (/v1/*), A1111's (/sdapi/v1/*) and Prometheus metrics.

Every generation goes through one Scheduler (scheduler.py). User errors answer 422 with the engine's
own one-line message; a full queue 429 with Retry-After; a passed deadline 504; a server that is
stopping 503; anything else 500 with the error's type only (the traceback goes to the server's log).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from diffusion_engine.engine.specs import DECODERS
from diffusion_engine.runtime.infotext import infotext, model_identity, per_image
from diffusion_engine.runtime.pipeline import GenerationResult, Pipeline
from diffusion_engine.runtime.request import GenerationRequest
from diffusion_engine.runtime.samplers import SAMPLERS
from diffusion_engine.runtime.serve import a1111
from diffusion_engine.runtime.serve.codec import b64, decode_image, png_bytes
from diffusion_engine.runtime.serve.scheduler import (
    Cancelled,
    DeadlineExceeded,
    QueueFull,
    Scheduler,
    ShuttingDown,
    Ticket,
)

logger = logging.getLogger(__name__)

# The request fields the native API takes: GenerationRequest's, less the ones that are not data
# (latents: an array; refiner: a second engine), plus the request's deadline in seconds.
NATIVE_FIELDS = tuple(f for f in GenerationRequest.field_names() if f not in ("latents", "refiner", "refiner_start"))
PAIRS = ("original_size", "crops_coords_top_left", "target_size")
UNAUTHENTICATED = ("/v1/health", "/v1/ready")


@dataclass(frozen=True)
class ServeConfig:
    """The server's limits and settings (engine-serve's flags)."""

    max_queue: int = 32
    batch_window: float = 0.02  # seconds a batchable request waits for company
    max_batch: int | None = None  # None: the engine's max batch
    timeout: float = 600.0  # seconds a request may take, queue included, unless it asks for less
    api_key: str | None = None
    max_body: int = 32 << 20  # bytes of one request body
    max_image_bytes: int = 16 << 20  # bytes of one decoded image
    max_images: int = 16  # images per request (A1111's batch_size x n_iter)
    warmup: bool = True

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_body", "max_image_bytes", "max_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout}")
        if not (math.isfinite(self.batch_window) and self.batch_window >= 0):
            raise ValueError(f"batch-window must be >= 0, got {self.batch_window}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key must not be empty")


class HTTPError(Exception):
    def __init__(self, status: int, kind: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.kind, self.detail, self.headers = status, kind, detail, headers or {}


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps may live in one process)."""

    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("diffusion_engine_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("diffusion_engine_request_seconds", "Seconds from request to answer", ["endpoint"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=r)
        self.stages = Histogram("diffusion_engine_stage_seconds", "Seconds per pipeline stage of one batch", ["stage"],
                                buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.batch = Histogram("diffusion_engine_batch_size", "Requests per UNet batch",
                               buckets=tuple(range(1, max_batch + 1)), registry=r)
        self.rejections = Counter("diffusion_engine_rejections", "Requests answered without images, by reason",
                                  ["reason"], registry=r)
        self.dropped = Counter("diffusion_engine_dropped", "Work the queue dropped: its client gone (cancelled), its "
                               "deadline passed in the queue, a running batch nobody waits for (abandoned)",
                               ["reason"], registry=r)
        self.errors = Counter("diffusion_engine_errors", "Engine failures", ["kind"], registry=r)
        self.queue = Gauge("diffusion_engine_queue_depth", "Requests waiting in the queue", registry=r)

    def observe(self, event: str, data: dict[str, Any]) -> None:
        if "depth" in data:
            self.queue.set(data["depth"])
        if event == "batch":
            self.batch.observe(data["size"])
            for stage, seconds in data["timings"].items():
                if stage != "batch":
                    self.stages.labels(stage).observe(seconds)
        elif event == "dropped":
            self.dropped.labels(data["reason"]).inc()
        elif event == "error":
            self.errors.labels(data["kind"]).inc()


def create_app(pipe: Pipeline, config: ServeConfig = ServeConfig()) -> FastAPI:
    """The ASGI app serving `pipe`; its scheduler starts and warms the engine up with the app (lifespan)."""
    model = _model(pipe)
    metrics = Metrics(pipe.manifest.build.max_batch)
    state: dict[str, Any] = {"ready": False, "scheduler": None}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler = Scheduler(pipe, config.max_queue, config.batch_window, config.max_batch, metrics.observe)
        state["scheduler"] = scheduler
        warm = threading.Thread(target=_warm_up, args=(pipe, state, config.warmup), name="warm-up", daemon=True)
        warm.start()
        try:
            yield
        finally:  # uvicorn has stopped taking connections and waited for the open ones: finish the queue
            await asyncio.to_thread(scheduler.close)

    app = FastAPI(title="diffusion-engine", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    app.add_middleware(Guard, config=config, metrics=metrics)

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, exc: HTTPError) -> Response:
        if exc.kind != "error":  # engine failures are counted by the scheduler (errors, by exception type)
            metrics.rejections.labels(exc.kind).inc()
        return _error(exc)

    async def run(request: Request, gen: list[GenerationRequest], timeout: float) -> list[GenerationResult]:
        scheduler: Scheduler | None = state["scheduler"]
        if scheduler is None or not state["ready"]:
            raise HTTPError(503, "not_ready", "the engine is still warming up; see /v1/ready", {"Retry-After": "1"})
        tickets: list[Ticket] = []
        try:
            for r in gen:
                tickets.append(await asyncio.to_thread(scheduler.submit, r, timeout))
        except ValueError as exc:
            raise HTTPError(422, "invalid", str(exc)) from None
        except QueueFull as exc:
            raise HTTPError(429, "queue_full", str(exc), {"Retry-After": str(math.ceil(exc.retry_after))}) from None
        except ShuttingDown as exc:
            raise HTTPError(503, "shutting_down", str(exc)) from None
        finally:
            if len(tickets) < len(gen):  # a later image of the request was refused: drop the earlier ones
                for t in tickets:
                    scheduler.cancel(t)
        return await _wait(request, scheduler, tickets, timeout)

    def deadline(body: dict[str, Any]) -> float:
        value = body.pop("timeout", None)
        if value is None:
            return config.timeout
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= config.timeout:
            raise HTTPError(422, "invalid", f"timeout must be a number of seconds in (0, {config.timeout:g}], got {value!r}")
        return float(value)

    # -- the native API ----------------------------------------------------------------------------

    @app.post("/v1/generate")
    async def generate(request: Request) -> Response:
        body = await _json(request, config.max_body)
        timeout = deadline(body)
        gen = _native_request(body, config, pipe)
        results = await run(request, [gen], timeout)
        result = results[0]
        texts = _infotexts(result, model)
        if "image/png" in request.headers.get("accept", "") and "application/json" not in request.headers.get("accept", ""):
            if len(result.images) != 1:
                raise HTTPError(406, "invalid", f"this request makes {len(result.images)} images: a PNG answer holds "
                                                "one; ask for application/json")
            png = png_bytes(result.images[0], texts[0], json.dumps(result.parameters))
            return Response(png, media_type="image/png", headers={"X-Seed": str(result.seed)})
        images = per_image(result.parameters, len(result.images))
        return JSONResponse({
            "images": [b64(png_bytes(im, t, json.dumps(p))) for im, t, p in zip(result.images, texts, images)],
            "parameters": images, "infotexts": texts, "seed": result.seed, "timings": result.timings,
        })

    @app.get("/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/ready")
    async def ready() -> Response:
        if state["ready"]:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "detail": state.get("warmup_error") or "warming up"}, status_code=503)

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        m, d = pipe.manifest, pipe.defaults
        return {
            "family": m.family, "backend": pipe.backend, "model": model.name, "model_hash": model.short_hash,
            "sizes": {"min": m.build.min_size, "max": m.build.max_size,
                      "multiple_of": m.dims.size_multiple},
            "max_batch": m.build.max_batch, "samplers": list(SAMPLERS),
            "decoders": [k for k, v in DECODERS.items() if v in pipe.sessions],
            "defaults": {"size": d.size, "steps": d.steps, "guidance_scale": d.guidance_scale, "scheduler": d.scheduler},
            "img2img": "vae_encoder" in pipe.sessions, "inpainting_unet": m.dims.inpainting,
            "controlnets": [], "loras": [],
            "queue": {"max_queue": config.max_queue, "batch_window_ms": config.batch_window * 1000,
                      "max_images": config.max_images, "timeout": config.timeout},
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- A1111's API -------------------------------------------------------------------------------

    async def sdapi(request: Request, fields: frozenset[str], img2img: bool) -> Response:
        body = await _json(request, config.max_body)
        try:
            a1111.check_fields(body, fields)
            init, mask = None, None
            if img2img:
                images = body.get("init_images")
                if not isinstance(images, list) or len(images) != 1:
                    raise ValueError("init_images must be a list of one base64 image (this engine takes one init image)")
                init = a1111.flatten(_decode(images[0], "init_images[0]", config, pipe))
                if body.get("mask") is not None:
                    mask = a1111.mask_levels(_decode(body["mask"], "mask", config, pipe), body.get("inpainting_mask_invert"))
            gen = a1111.requests(body, model, config.max_images, init, mask)
        except ValueError as exc:
            raise HTTPError(422, "invalid", str(exc)) from None
        results = await run(request, gen, config.timeout)
        texts = [_infotexts(r, model)[0] for r in results]
        seeds = [r.seed for r in results]
        images = [] if body.get("send_images") is False else [
            b64(png_bytes(r.images[0], t, json.dumps(r.parameters))) for r, t in zip(results, texts)]
        echo = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
        return JSONResponse({"images": images, "parameters": echo,
                             "info": a1111.info(results, texts, body, model, seeds)})

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request) -> Response:
        return await sdapi(request, a1111.TXT2IMG, img2img=False)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request) -> Response:
        return await sdapi(request, a1111.IMG2IMG, img2img=True)

    @app.get("/sdapi/v1/samplers")
    async def samplers() -> list[dict[str, Any]]:
        return a1111.samplers()

    @app.get("/sdapi/v1/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        return [{"title": model.title, "model_name": model.name, "hash": model.short_hash, "sha256": model.sha256,
                 "filename": model.filename, "config": None}]

    @app.get("/sdapi/v1/options")
    async def options() -> dict[str, Any]:
        return {"sd_model_checkpoint": model.title, "sd_checkpoint_hash": model.sha256, "samples_format": "png",
                "CLIP_stop_at_last_layers": 1, "eta_ddim": 0.0, "eta_ancestral": 1.0, "sd_vae": "Automatic",
                "randn_source": "CPU"}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request) -> Response:
        body = await _json(request, config.max_body)
        try:
            a1111.check_options(body, model, field="options")
        except ValueError as exc:
            raise HTTPError(422, "invalid", str(exc)) from None
        return JSONResponse(None)

    @app.get("/sdapi/v1/progress")
    async def progress() -> dict[str, Any]:
        scheduler: Scheduler | None = state["scheduler"]
        p = scheduler.progress if scheduler is not None else None
        running = p is not None and p.running > 0
        fraction = p.done / p.total if running and p.total else 0.0
        elapsed = time.time() - p.started if running and p.started else 0.0
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        depth = scheduler.depth if scheduler is not None else 0
        return {"progress": fraction, "eta_relative": eta,
                "state": {"skipped": False, "interrupted": False, "job": "", "job_count": depth + (1 if running else 0),
                          "job_timestamp": "0", "job_no": 0, "sampling_step": p.done if running else 0,
                          "sampling_steps": p.total if running else 0},
                "current_image": None, "textinfo": None}

    app.state.serve = state
    app.state.metrics = metrics
    return app


# -- helpers -----------------------------------------------------------------------------------------

def _model(pipe: Pipeline) -> a1111.Model:
    name, short = model_identity(pipe.manifest.source)
    digest = pipe.manifest.source.get("digest")
    return a1111.Model(name or pipe.engine_dir.name, short,
                       digest.split(":", 1)[-1] if isinstance(digest, str) else None, str(pipe.engine_dir))


def _warm_up(pipe: Pipeline, state: dict[str, Any], enabled: bool) -> None:
    """One short run at the default size (guided where the family guides; on TensorRT its CUDA graph), then ready."""
    try:
        if enabled:
            d = pipe.defaults
            pipe.generate("warm-up", steps=2, seed=0, guidance_scale=d.guidance_scale, height=d.size, width=d.size)
        state["ready"] = True
    except Exception as exc:  # the engine cannot run: /v1/ready says why, generation answers 503
        logger.exception("warm-up failed")
        state["warmup_error"] = f"warm-up failed: {type(exc).__name__}: {exc}"


class Guard:
    """Pure ASGI middleware (so a handler still sees its client disconnect): the API key, the body size limit
    by Content-Length, and the per-endpoint request counts and latencies."""

    def __init__(self, app: Any, config: ServeConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), {"code": 500}

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            if self.config.api_key is not None and scope["path"] not in UNAUTHENTICATED:
                _check_key(headers, self.config.api_key)
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.config.max_body):
                raise HTTPError(413, "too_large", f"the request body is {length} bytes; this server takes at most "
                                                  f"{self.config.max_body}")
        except HTTPError as exc:
            self.metrics.rejections.labels(exc.kind).inc()
            await _error(exc)(scope, receive, sending)
        else:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


def _check_key(headers: dict[str, str], key: str) -> None:
    given = headers.get("x-api-key")
    auth = headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if given is None or not hmac.compare_digest(given.encode(), key.encode()):
        raise HTTPError(401, "unauthorized", "missing or wrong API key (send it as 'Authorization: Bearer KEY' or "
                                             "'X-API-Key: KEY')", {"WWW-Authenticate": "Bearer"})


async def _json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, read up to `limit` bytes (413 past it), 422 if it is not one."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, "too_large", f"the request body is over the {limit} bytes this server takes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks) or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HTTPError(422, "invalid", f"the request body is not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise HTTPError(422, "invalid", f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _decode(data: Any, field: str, config: ServeConfig, pipe: Pipeline) -> Any:
    side = 4 * pipe.manifest.build.max_size  # room to be resized down by resize_mode
    return decode_image(data, field, side * side, config.max_image_bytes)


def _native_request(body: dict[str, Any], config: ServeConfig, pipe: Pipeline) -> GenerationRequest:
    unknown = sorted(set(body) - set(NATIVE_FIELDS))
    if unknown:
        raise HTTPError(422, "invalid", f"unknown field {unknown[0]!r}; valid: {', '.join(NATIVE_FIELDS)}, timeout")
    if "prompt" not in body:
        raise HTTPError(422, "invalid", "prompt is required")
    values = dict(body)
    try:
        for key in ("image", "mask"):
            if values.get(key) is not None:
                values[key] = _decode(values[key], key, config, pipe)
        for key in PAIRS:
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        batch = values.get("batch_size", 1)
        if isinstance(batch, int) and batch > config.max_images:
            raise ValueError(f"batch_size {batch} is more than the {config.max_images} images this server makes per request")
    except ValueError as exc:
        raise HTTPError(422, "invalid", str(exc)) from None
    return GenerationRequest(**values)


async def _wait(request: Request, scheduler: Scheduler, tickets: list[Ticket], timeout: float) -> list[GenerationResult]:
    """The tickets' results; a client that goes away has its work dropped, a passed deadline answers 504."""
    futures = [asyncio.wrap_future(t.future) for t in tickets]
    end = time.monotonic() + timeout
    try:
        while True:
            pending = [f for f in futures if not f.done()]
            if not pending:
                break
            left = end - time.monotonic()
            if left <= 0:
                raise HTTPError(504, "deadline", f"the request did not finish within its {timeout:g} s deadline")
            await asyncio.wait(pending, timeout=min(0.1, left))
            if await request.is_disconnected():
                logger.info("client went away: dropping its %d queued or running request(s)", len(tickets))
                raise HTTPError(499, "cancelled", "the client went away")
        results = []
        for f in futures:
            try:
                results.append(f.result())
            except asyncio.CancelledError:
                raise HTTPError(499, "cancelled", "the request was cancelled") from None
            except DeadlineExceeded as exc:
                raise HTTPError(504, "deadline", str(exc)) from None
            except Cancelled as exc:
                raise HTTPError(499, "cancelled", str(exc)) from None
            except ValueError as exc:  # a check only the run could make
                raise HTTPError(422, "invalid", str(exc)) from None
            except Exception as exc:
                logger.error("generation failed", exc_info=exc)
                raise HTTPError(500, "error", f"the engine failed ({type(exc).__name__}); see the server's log") from None
        return results
    except BaseException:
        for t in tickets:
            scheduler.cancel(t)
        raise


def _error(exc: HTTPError) -> JSONResponse:
    return JSONResponse({"error": exc.kind, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)


def _infotexts(result: GenerationResult, model: a1111.Model) -> list[str]:
    return [infotext(p, model.name, model.short_hash) for p in per_image(result.parameters, len(result.images))]
