"""The MT-Photos AI API (mt-photos-ai's routes) and its face service's `/represent`, on immich-aio's port.

A thin adapter at the HTTP edge: each route builds the same entries an Immich request would, runs them
through the same pipeline (admission, pixel budget, registry, batchers, run gate; `/clip/txt` is a person
searching, so it takes the interactive lane) and reshapes the raw outputs into MT Photos' wire format:

- every POST needs the `api-key` header; the API is off (404) until MT_PHOTOS_API_KEY (or the official
  service's API_AUTH_KEY) is set; a missing header is FastAPI's 422, a wrong key 401 `Invalid API key`,
  compared in constant time, never logged;
- answers under `result`; CLIP vectors as strings with 16 decimals, un-normalised as the official service
  sends them; OCR boxes as pixel strings, scores with two decimals, lines under 0.5 dropped; faces with
  L2-normalised embeddings, integer boxes and their confidence;
- what the official service answers as a soft failure (an image it cannot read, one over 10000 px, a
  model error) is HTTP 200 `{"result": [], "msg": ...}` here too, logged like every refusal;
- `/restart` and `/restart_v2` unload the models no request is using, instead of re-executing the
  process, and answer.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from immich_aio import pipeline
from immich_aio.adapters import mt_ocr
from immich_aio.edge import Call, answer, json_response, read_limits, run_pipeline, runtime
from immich_aio.errors import (
    BadRequest,
    ClientGone,
    InvalidEntries,
    NotFound,
    PredictError,
    Unauthorized,
    UndecodableImage,
    shown,
)
from immich_aio.http_form import FIELD_SLACK, read_form
from immich_aio.imaging import probe
from immich_aio.models.outputs import RecognisedFaces, TextLines
from immich_aio.protocol import Entry
from immich_aio.tasks import CLIP, DETECTION, FACES, OCR, RECOGNITION, TEXTUAL, VISUAL

log = logging.getLogger(__name__)

MAX_SIDE = 10_000  # the official service refuses larger images (as a soft failure)
HELP = "https://mtmt.tech/docs/advanced/ocr_api"


def _invalid(reason: str, kind: str, loc: list[str], msg: str) -> InvalidEntries:
    """A 422 with FastAPI's validation body, as MT Photos' official service (a FastAPI app) answers it."""
    return InvalidEntries(reason, body={"detail": [{"type": kind, "loc": loc, "msg": msg, "input": None}]})


def _missing(where: str, name: str) -> InvalidEntries:
    return _invalid(f"{where} field {name!r} is required", "missing", [where, name], "Field required")


def _guard(request: Request) -> None:
    key = runtime(request).settings.mt_api_key
    if key is None:
        raise NotFound(
            "The MT Photos API is off on this server: set MT_PHOTOS_API_KEY (or API_AUTH_KEY) to the key MT Photos "
            "is given, and restart"
        )
    sent = request.headers.get("api-key")
    if sent is None:
        raise _missing("header", "api-key")
    if not hmac.compare_digest(sent.encode("utf-8", "surrogateescape"), key.encode()):
        raise Unauthorized("Invalid API key")  # the key sent is never logged


def _soft(error: PredictError) -> Response | None:
    """The official service's soft failure: HTTP 200 with an empty result and the reason."""
    if isinstance(error, Unauthorized | NotFound | InvalidEntries | ClientGone) or error.status in (408, 503):
        return None
    return json_response({"result": [], "msg": error.detail})


async def _image_job(request: Request, call: Call, entries: list[Entry], limit_side: bool) -> pipeline.Result:
    rt = runtime(request)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise _missing("body", "file")  # what FastAPI answers the official service's clients
    async with read_form(request, read_limits(rt.settings), request.url.path) as form:
        upload = form.files.get("file")
        if upload is None:
            raise _missing("body", "file")
        call.filename = form.filenames.get("file", "")
        if limit_side:
            width, height = await rt.run(probe, upload, rt.settings.max_pixels)
            if max(width, height) > MAX_SIDE:
                raise BadRequest("height or width out of range")
        result = await run_pipeline(request, call.job, entries, upload, None)
    call.served = result.served
    return result


async def check(request: Request) -> Response:
    async def work(call: Call) -> Response:
        rt = runtime(request)
        return json_response(
            {
                "result": "pass",
                "title": "mt-photos-ai服务",
                "help": HELP,
                "device": "cuda" if rt.factory.on_cuda else "cpu",
                "detector_backend": "insightface",
                "recognition_model": rt.settings.mt_face_model,
            }
        )

    return await answer(request, "/check", work, guard=_guard)


async def ocr(request: Request) -> Response:
    model = runtime(request).settings.mt_ocr_model
    entries = mt_ocr.entries(model)

    async def work(call: Call) -> Response:
        call.task = OCR
        result = await _image_job(request, call, entries, limit_side=True)
        lines = result.output(OCR, RECOGNITION, TextLines)  # lines under MIN_SCORE were dropped by the recogniser
        boxes = mt_ocr.boxes(lines.quads)
        return json_response(
            {
                "result": {
                    "texts": list(lines.text),
                    "scores": mt_ocr.scores(lines.text_score),
                    "boxes": [
                        {"x": str(x1), "y": str(y1), "width": str(round(x2 - x1, 2)), "height": str(round(y2 - y1, 2))}
                        for x1, y1, x2, y2 in boxes
                    ],
                }
            }
        )

    return await answer(request, "/ocr", work, guard=_guard, soft=_soft)


def _vector(values: np.ndarray) -> list[str]:
    """CLIP features as the official service sends them: un-normalised, 16 decimals, never an exponent."""
    return [f"{v:.16f}" for v in values.astype(np.float32).tolist()]


async def clip_img(request: Request) -> Response:
    rt = runtime(request)
    # IMMICH_AIO_MT_CLIP_SWAP_RB reproduces mt-photos-ai's onnx/openvino images, which fed BGR as RGB.
    entries = [Entry(CLIP, VISUAL, rt.settings.mt_clip_model, {"swapRB": rt.settings.mt_clip_swap_rb})]

    async def work(call: Call) -> Response:
        call.task = CLIP
        result = await _image_job(request, call, entries, limit_side=False)
        return json_response({"result": _vector(result.output(CLIP, VISUAL, np.ndarray))})

    return await answer(request, "/clip/img", work, guard=_guard, soft=_soft)


async def clip_txt(request: Request) -> Response:
    rt = runtime(request)

    async def work(call: Call) -> Response:
        call.task = CLIP
        text = await _json_text(request)
        entries = [Entry(CLIP, TEXTUAL, rt.settings.mt_clip_model, {})]
        result = await run_pipeline(request, call.job, entries, None, text)
        call.served = result.served
        return json_response({"result": _vector(result.output(CLIP, TEXTUAL, np.ndarray))})

    return await answer(request, "/clip/txt", work, interactive=True, guard=_guard)


async def _json_text(request: Request) -> str:
    """`{"text": ...}` from a JSON body (Content-Type JSON or none), bounded like every upload."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise _invalid(
            f"/clip/txt expects a JSON body, got content type {shown(content_type)!r}",
            "model_attributes_type",
            ["body"],
            "Input should be a valid JSON object",
        )
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > FIELD_SLACK:
            raise _invalid("/clip/txt body over 1 MB", "too_long", ["body"], "Body too large")
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise _invalid("/clip/txt body is not a JSON object", "json_invalid", ["body"], "JSON decode error")
    if "text" not in data:
        raise _missing("body", "text")
    if not isinstance(data["text"], str):
        raise _invalid("'text' must be a string", "string_type", ["body", "text"], "Input should be a valid string")
    return data["text"]


async def represent(request: Request) -> Response:
    rt = runtime(request)
    pack = rt.settings.mt_face_model
    entries = [
        Entry(FACES, DETECTION, pack, {"minScore": rt.settings.mt_face_threshold}),
        Entry(FACES, RECOGNITION, pack, {}),
    ]

    async def work(call: Call) -> Response:
        call.task = FACES
        try:
            result = await _image_job(request, call, entries, limit_side=True)
        except UndecodableImage:  # the face service's own words
            raise BadRequest(f"The uploaded file {call.filename} is not a valid image format or is corrupted.").about(
                FACES, DETECTION, pack
            ) from None
        faces = result.output(FACES, RECOGNITION, RecognisedFaces)
        embeddings = faces.embeddings
        norms = np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        return json_response(
            {
                "detector_backend": "insightface",
                "recognition_model": pack,
                "result": [
                    {
                        "embedding": (emb / norm).astype(np.float32).tolist(),
                        "facial_area": {"x": int(x1), "y": int(y1), "w": int(x2 - x1), "h": int(y2 - y1)},
                        "face_confidence": float(score),
                    }
                    for (x1, y1, x2, y2), emb, norm, score in zip(
                        faces.boxes.tolist(), embeddings, norms, faces.scores, strict=True
                    )
                ],
            }
        )

    return await answer(request, "/represent", work, guard=_guard, soft=_soft)


async def restart(request: Request) -> Response:
    """MT Photos asks for a restart to release memory: unload the models no request is using, and answer."""
    endpoint = request.url.path.rsplit("/", 1)[-1]

    async def work(call: Call) -> Response:
        rt = runtime(request)
        unloaded = await rt.run(rt.registry.unload_all, True)
        log.info("%s: unloaded %d model(s) on MT Photos' request", endpoint, len(unloaded))
        return json_response({"result": "pass"})

    return await answer(request, f"/{endpoint}", work, guard=_guard)


ROUTES: list[Any] = [
    Route("/check", check, methods=["POST"]),
    Route("/ocr", ocr, methods=["POST"]),
    Route("/clip/img", clip_img, methods=["POST"]),
    Route("/clip/txt", clip_txt, methods=["POST"]),
    Route("/represent", represent, methods=["POST"]),
    Route("/restart", restart, methods=["POST"]),
    Route("/restart_v2", restart, methods=["POST"]),
]
