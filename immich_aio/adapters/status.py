"""The server's own endpoints: `/info` (what answers what, loaded models, downloads) and `/metrics` (Prometheus)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from immich_aio import edge, reporting


async def info(request: Request) -> Response:
    rt = edge.runtime(request)
    return edge.json_response(await rt.run(reporting.info, rt))


async def metrics(request: Request) -> Response:
    body, content_type = edge.runtime(request).metrics.exposition()
    return Response(body, media_type=content_type)


ROUTES = [
    Route("/info", info),
    Route("/metrics", metrics),
    Route("/{prefix:path}/info", info),  # beside Immich's prefixed /predict and /ping
]
