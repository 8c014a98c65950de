"""The Starlette app: routes, lifespan, and the one path every inference request takes.

Models load and run on worker pools, never on the event loop, so `/ping` answers while every
worker is busy or a model is loading. Every inference request is admitted (or refused with a 503
while shutting down or overloaded), watched for a client that leaves (its queued work is then
dropped), and every non-2xx answer is logged exactly once with what it concerned and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from immich_aio import fork_ocr, pipeline
from immich_aio.access_log import AccessLog
from immich_aio.config import Settings
from immich_aio.errors import BadRequest, ClientGone, ModelMissing, PredictError
from immich_aio.http_form import ReadLimits, read_form, read_small_field
from immich_aio.imaging import ImageSource
from immich_aio.jobs import Job
from immich_aio.metrics import endpoint_label, task_label, type_label
from immich_aio.names.fetchable import FetchPlan
from immich_aio.protocol import OCR, RECOGNITION, Entry, check_payload, decode_entries, dumps, entries_from
from immich_aio.runtime import Runtime

log = logging.getLogger(__name__)
T = TypeVar("T")


def json_response(body: Any, status: int = 200) -> Response:
    return Response(dumps(body), status_code=status, media_type="application/json")


def read_limits(settings: Settings) -> ReadLimits:
    return ReadLimits(settings.max_upload_bytes, settings.body_timeout_s)


async def _client_left(request: Request) -> None:
    """Returns when the client disconnects (call once the body has been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_job(request: Request, job: Job, fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)` on a worker; if the client leaves first, drop the job's queued work and raise ClientGone."""
    rt: Runtime = request.app.state.runtime
    return await _unless_client_leaves(request, job, rt.run(fn, *args, interactive=job.interactive))


async def run_pipeline(
    request: Request, job: Job, entries: list[Entry], image: ImageSource | None, text: str | None
) -> pipeline.Result:
    """Run the entries on a worker. A model that is missing and can be fetched on first use is downloaded while the
    request waits here, on the event loop (holding no worker thread), and the entries run again once it lands; the
    common path, every model installed, pays nothing for this."""
    rt: Runtime = request.app.state.runtime
    fetched = 0  # at most one download per entry; then the pipeline's own answer stands
    while True:
        try:
            return await run_job(request, job, pipeline.run, rt.engine, job, entries, image, text)
        except ModelMissing as e:
            if not rt.fetcher.enabled or not isinstance(e.plan, FetchPlan) or fetched == len(entries):
                raise
            fetched += 1
            plan, requested = e.plan, e.requested or e.plan.target
            wait = rt.settings.fetch_wait_text_s if job.interactive else rt.settings.fetch_wait_s
            try:
                await _unless_client_leaves(request, job, rt.fetcher.obtain(plan, requested, job, wait))
            except PredictError as err:
                raise err.about(e.task or "", e.type or "", requested, plan.target) from None


async def _unless_client_leaves(request: Request, job: Job, awaitable: Awaitable[T]) -> T:
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_client_left(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if work.done():
        return work.result()
    job.cancel()
    work.cancel()  # not started yet: never runs; started: stops at its next step
    work.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody reads it; don't warn
    raise ClientGone("the client closed the connection before its answer was ready")


def refusal(request: Request, error: PredictError, endpoint: str, note: str = "") -> Response | None:
    """Log a refused request once (WARNING for 4xx, ERROR for 5xx) and build its JSON body."""
    context = " ".join(
        f"{k}={v!r}"
        for k, v in (
            ("task", error.task),
            ("type", error.type),
            ("requested", error.requested),
            ("model", error.served),
        )
        if v
    )
    if isinstance(error, ClientGone):
        log.info(
            "%s %s: %s; its queued work was dropped%s",
            request.method,
            endpoint,
            error.detail,
            f" ({context})" if context else "",
        )
        return None
    level = logging.ERROR if error.status >= 500 else logging.WARNING
    log.log(level, "%s %s -> %d %s: %s%s", request.method, endpoint, error.status, context or "-", error.detail, note)
    return json_response(error.body if error.body is not None else {"detail": error.detail}, error.status)


@dataclass
class Call:
    """One inference request as the edge sees it: its job, and what served it (for metrics)."""

    job: Job
    endpoint: str
    task: str | None = None
    filename: str = ""  # the upload's name, for protocols that echo it
    served: list[tuple[str, str, str]] = field(default_factory=list)  # (task, type, model)


async def answer(
    request: Request,
    endpoint: str,
    work: Callable[[Call], Awaitable[Response]],
    interactive: bool = False,
    guard: Callable[[Request], None] | None = None,
    soft: Callable[[PredictError], Response | None] | None = None,
) -> Response:
    """Admit a request and run `work(call)`; any error becomes its one logged answer. Counted either way.

    `guard` runs before admission (authentication: a refused client takes no queue place); `soft` may turn an
    error into the 200 answer a protocol expects instead (MT Photos' `{"result": [], "msg": ...}`).
    """
    rt: Runtime = request.app.state.runtime
    started = time.perf_counter()
    call: Call | None = None
    error: PredictError | None = None
    try:
        if guard is not None:
            guard(request)
        call = Call(rt.admit(interactive=interactive), endpoint)
        response = await work(call)
    except PredictError as e:
        error = e
        soft_answer = soft(e) if soft is not None else None
        note = " (answered 200 with this message, as the protocol expects)" if soft_answer is not None else ""
        response = refusal(request, e, endpoint, note) or Response(status_code=499)
        if soft_answer is not None and response.status_code != 499:
            response = soft_answer
    except Exception as e:  # last line of defence: a JSON 500, and the server keeps serving
        log.exception("Unexpected error in %s", endpoint)
        error = PredictError(f"Internal error: {type(e).__name__}: {e}")
        response = json_response({"detail": error.detail}, 500)
    finally:
        if call is not None:
            rt.done(call.job)
    _count(rt, endpoint, call, error, response.status_code, time.perf_counter() - started)
    return response


def _count(rt: Runtime, endpoint: str, call: Call | None, error: PredictError | None, status: int, s: float) -> None:
    m = rt.metrics
    ep = endpoint_label(endpoint)
    task = (error.task if error else None) or (call.task if call else None)
    if error is not None:
        m.requests.labels(ep, task_label(task), type_label(task, error.type), error.served or "", str(status)).inc()
    elif call is not None:
        for entry_task, type_, model in call.served or [(task, None, "")]:
            m.requests.labels(ep, task_label(entry_task), type_label(entry_task, type_), model, str(status)).inc()
    m.latency.labels(ep, task_label(task)).observe(s)


async def root(request: Request) -> Response:
    return JSONResponse({"message": "Immich ML"})


async def ping(request: Request) -> Response:
    return PlainTextResponse("pong")


async def predict(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime

    async def work(call: Call) -> Response:
        job = call.job
        async with read_form(request, read_limits(rt.settings)) as form:
            data = decode_entries(await read_small_field(form, "entries"))
            fork = fork_ocr.is_fork_request(data)  # the OCR fork of Immich: recognition without detection
            entries = fork_ocr.entries(data, rt.settings.mt_ocr_model) if fork else entries_from(data)
            call.task = entries[0].task
            text = await read_small_field(form, "text") or None
            image = form.files.get("image")
            if image is None and form.fields.get("image"):
                raise BadRequest("'image' must be a file part (the raw image bytes), not a text field")
            check_payload(entries, image is not None, text is not None)
            job.interactive = all(e.needs_text for e in entries)  # a search: the interactive lane
            result = await run_pipeline(request, job, entries, image, text)
            call.served = result.served
        if fork:
            return json_response(fork_ocr.answer(result.outputs[(OCR, RECOGNITION)], result.size))
        return json_response(result.body)

    return await answer(request, "/predict", work)


async def info(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    return json_response(await rt.run(rt.info))


async def metrics(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    body, content_type = rt.metrics.exposition()
    return Response(body, media_type=content_type)


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        runtime = Runtime(settings)
        app.state.runtime = runtime
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    routes = [
        Route("/", root),
        Route("/ping", ping),
        Route("/predict", predict, methods=["POST"]),
        Route("/info", info),
        Route("/metrics", metrics),
        # Immich v3 resolves `predict`/`ping` relative to the configured URL, so accept any prefix.
        Route("/{prefix:path}/ping", ping),
        Route("/{prefix:path}/predict", predict, methods=["POST"]),
        Route("/{prefix:path}/info", info),
    ]
    from immich_aio import mt_photos  # an adapter over this module: imported here to keep the import order one-way

    routes += mt_photos.ROUTES
    middleware = [Middleware(AccessLog)] if settings.access_log else []
    return Starlette(routes=routes, lifespan=lifespan, middleware=middleware)
