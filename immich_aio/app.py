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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from immich_aio import pipeline
from immich_aio.config import Settings
from immich_aio.errors import BadRequest, ClientGone, PredictError
from immich_aio.http_form import ReadLimits, read_form, read_small_field
from immich_aio.jobs import Job
from immich_aio.protocol import check_payload, dumps, parse_entries
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
    work = asyncio.ensure_future(rt.run(fn, *args, interactive=job.interactive))
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


def refusal(request: Request, error: PredictError, endpoint: str) -> Response | None:
    """Log a non-2xx answer once (WARNING for 4xx, ERROR for 5xx) and build its JSON body."""
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
    log.log(level, "%s %s -> %d %s: %s", request.method, endpoint, error.status, context or "-", error.detail)
    return json_response({"detail": error.detail}, error.status)


async def answer(
    request: Request, endpoint: str, work: Callable[[Job], Awaitable[Response]], interactive: bool = False
) -> Response:
    """Admit a request as a job and run `work(job)`; any error becomes its one logged, JSON answer."""
    rt: Runtime = request.app.state.runtime
    job = None
    try:
        job = rt.admit(interactive=interactive)
        return await work(job)
    except PredictError as e:
        return refusal(request, e, endpoint) or Response(status_code=499)
    except Exception as e:  # last line of defence: a JSON 500, and the server keeps serving
        log.exception("Unexpected error in %s", endpoint)
        return json_response({"detail": f"Internal error: {type(e).__name__}: {e}"}, 500)
    finally:
        if job is not None:
            rt.done(job)


async def root(request: Request) -> Response:
    return JSONResponse({"message": "Immich ML"})


async def ping(request: Request) -> Response:
    return PlainTextResponse("pong")


async def predict(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime

    async def work(job: Job) -> Response:
        async with read_form(request, read_limits(rt.settings)) as form:
            entries = parse_entries(await read_small_field(form, "entries"))
            text = await read_small_field(form, "text") or None
            image = form.files.get("image")
            if image is None and form.fields.get("image"):
                raise BadRequest("'image' must be a file part (the raw image bytes), not a text field")
            check_payload(entries, image is not None, text is not None)
            job.interactive = all(e.needs_text for e in entries)  # a search: the interactive lane
            result = await run_job(request, job, pipeline.run, rt.engine, job, entries, image, text)
        return json_response(result.body)

    return await answer(request, "/predict", work)


async def info(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    return json_response(await rt.run(rt.info))


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
        # Immich v3 resolves `predict`/`ping` relative to the configured URL, so accept any prefix.
        Route("/{prefix:path}/ping", ping),
        Route("/{prefix:path}/predict", predict, methods=["POST"]),
        Route("/{prefix:path}/info", info),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
