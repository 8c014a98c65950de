"""The OCR fork of Immich (v1.134 with its own OCR search): its OCR request on `/predict`, and its answer.

The fork sends `entries = {"ocr": {"recognition": {"modelName": "ocr"}}}` — an `ocr` task with `recognition`
and no `detection`. Upstream Immich always sends both, so the shape alone tells them apart, and an `ocr`
entry that has `detection` is always answered the upstream way. The name `ocr` is not a model; the
request is served by the OCR model configured for MT Photos (IMMICH_AIO_MT_OCR_MODEL), with the thresholds
of the mt-photos-ai service the fork used (lines scoring under 0.5 dropped).

The answer: `ocr` — every line joined by one space (`""` when nothing is found; the fork then stores
nothing) — and `result` with `texts`, `scores` as strings with two decimals, and `boxes` as
`{x1, y1, x2, y2}`, plus `imageHeight`/`imageWidth`. The boxes are the true corners (top-left, bottom-right)
of each line's axis-aligned box, in pixels: the gateway the fork ran behind copied width and height into
`x2`/`y2`, but nothing in the fork reads boxes back, so the form the field names promise costs nothing.

This module is a variant of Immich's `/predict` (`adapters.immich.PredictVariant`): `app.py` hands it to that
route, which asks `claims` of every request's entries.
"""

from __future__ import annotations

from typing import Any

from immich_aio.adapters import mt_ocr
from immich_aio.config import Settings
from immich_aio.errors import BadRequest
from immich_aio.models.outputs import TextLines
from immich_aio.pipeline import Result
from immich_aio.protocol import Entry
from immich_aio.tasks import DETECTION, OCR, RECOGNITION


def claims(data: dict[str, Any]) -> bool:
    """An `ocr` task with recognition and no detection: the fork's request, never upstream's."""
    ocr = data.get(OCR)
    return isinstance(ocr, dict) and RECOGNITION in ocr and DETECTION not in ocr


def entries(data: dict[str, Any], settings: Settings) -> list[Entry]:
    if set(data) != {OCR} or set(data[OCR]) != {RECOGNITION}:
        raise BadRequest("the OCR fork's request (an 'ocr' task with 'recognition' only) must be sent on its own")
    return mt_ocr.entries(settings.mt_ocr_model)


def answer(result: Result) -> dict[str, Any]:
    lines = result.output(OCR, RECOGNITION, TextLines)
    body: dict[str, Any] = {
        "ocr": " ".join(lines.text),
        "result": {
            "texts": list(lines.text),
            "scores": mt_ocr.scores(lines.text_score),
            "boxes": [dict(zip(("x1", "y1", "x2", "y2"), b, strict=True)) for b in mt_ocr.boxes(lines.quads)],
        },
    }
    if result.size is not None:
        body["imageHeight"], body["imageWidth"] = result.size
    return body
