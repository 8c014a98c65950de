"""The Starlette app: the protocol adapters' routes put together, and the runtime's life around them.

Models load and run on worker pools, never on the event loop, so `/ping` answers while every worker is busy
or a model is loading. The path each inference request takes is `edge.py`; what each client sends and
expects is its adapter's (`adapters/`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware

from immich_aio import reporting
from immich_aio.access_log import AccessLog
from immich_aio.adapters import fork_ocr, immich, mt_photos, status
from immich_aio.config import Settings
from immich_aio.runtime import Runtime

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        runtime = Runtime(settings)
        app.state.runtime = runtime
        reporting.watch(runtime)
        log.info("%s", await runtime.run(reporting.banner, runtime))
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    routes = [*immich.routes(variants=[fork_ocr]), *status.ROUTES, *mt_photos.ROUTES]
    middleware = [Middleware(AccessLog)] if settings.access_log else []
    return Starlette(routes=routes, lifespan=lifespan, middleware=middleware)
