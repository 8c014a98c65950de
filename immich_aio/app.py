"""The Starlette app: routes, lifespan, and the mapping of errors to JSON responses.

Models load and run on a worker pool, never on the event loop, so `/ping` answers while
every worker is busy or a model is loading.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from immich_aio import pipeline
from immich_aio.config import Settings
from immich_aio.errors import PredictError
from immich_aio.http_form import read_form
from immich_aio.imaging import decode_image
from immich_aio.models.base import Payload
from immich_aio.protocol import check_payload, dumps, parse_entries
from immich_aio.runtime import Runtime

log = logging.getLogger(__name__)


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(dumps(body), status_code=status, media_type="application/json")


async def root(request: Request) -> Response:
    return JSONResponse({"message": "Immich ML"})


async def ping(request: Request) -> Response:
    return PlainTextResponse("pong")


async def predict(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    try:
        form = await read_form(request, rt.settings.max_upload_bytes)
        entries = parse_entries(form.entries)
        check_payload(entries, form.image is not None, form.text is not None)
        payload = Payload(text=form.text if form.image is None else None)
        if form.image is not None:
            payload.image = await rt.run(decode_image, form.image, rt.settings.max_pixels)
        body = await rt.run(pipeline.run, rt.registry, entries, payload, interactive=payload.image is None)
    except PredictError as e:
        if e.status >= 500:
            log.error("/predict failed: %s", e.detail)
        return _json({"detail": e.detail}, e.status)
    except Exception as e:  # last line of defence: a JSON 500, and the server keeps serving
        log.exception("Unexpected error in /predict")
        return _json({"detail": f"Internal error: {type(e).__name__}: {e}"}, 500)
    return _json(body)


async def info(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    return _json(await rt.run(rt.info))


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
