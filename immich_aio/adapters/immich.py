"""Immich's own endpoints: `/predict` (with its `entries`, `image` and `text` parts), `/ping` and `/`.

Another client's request shape on the same `/predict` (the OCR fork's) is a `PredictVariant` handed in by
`app.py`: the first variant that claims a request's entries builds its entries and shapes its answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from immich_aio import edge
from immich_aio.config import Settings
from immich_aio.errors import BadRequest
from immich_aio.http_form import read_form, read_small_field
from immich_aio.pipeline import Result
from immich_aio.protocol import Entry, check_payload, decode_entries, entries_from


class PredictVariant(Protocol):
    """Another client's request shape on `/predict`, recognised by its entries (a module satisfies this)."""

    def claims(self, data: dict[str, Any]) -> bool: ...

    def entries(self, data: dict[str, Any], settings: Settings) -> list[Entry]: ...

    def answer(self, result: Result) -> dict[str, Any]: ...


async def root(request: Request) -> Response:
    return JSONResponse({"message": "Immich ML"})


async def ping(request: Request) -> Response:
    return PlainTextResponse("pong")


def predict_endpoint(variants: Sequence[PredictVariant] = ()) -> Callable[[Request], Awaitable[Response]]:
    async def predict(request: Request) -> Response:
        settings = edge.runtime(request).settings

        async def work(call: edge.Call) -> Response:
            job = call.job
            async with read_form(request, edge.read_limits(settings)) as form:
                data = decode_entries(await read_small_field(form, "entries"))
                variant = next((v for v in variants if v.claims(data)), None)
                entries = variant.entries(data, settings) if variant is not None else entries_from(data)
                call.task = entries[0].task
                text = await read_small_field(form, "text") or None
                image = form.files.get("image")
                if image is None and form.fields.get("image"):
                    raise BadRequest("'image' must be a file part (the raw image bytes), not a text field")
                check_payload(entries, image is not None, text is not None)
                job.interactive = all(e.needs_text for e in entries)  # a search: the interactive lane
                result = await edge.run_pipeline(request, job, entries, image, text)
                call.served = result.served
            return edge.json_response(variant.answer(result) if variant is not None else result.body)

        return await edge.answer(request, "/predict", work)

    return predict


def routes(variants: Sequence[PredictVariant] = ()) -> list[Route]:
    predict = predict_endpoint(variants)
    return [
        Route("/", root),
        Route("/ping", ping),
        Route("/predict", predict, methods=["POST"]),
        # Immich v3 resolves `predict`/`ping` relative to the configured URL, so accept any prefix.
        Route("/{prefix:path}/ping", ping),
        Route("/{prefix:path}/predict", predict, methods=["POST"]),
    ]
