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
"""

from __future__ import annotations

from typing import Any

import numpy as np

from immich_aio.errors import BadRequest
from immich_aio.protocol import DETECTION, OCR, RECOGNITION, Entry

MIN_SCORE = 0.5  # RapidOCR's text_score in mt-photos-ai: lines under it are dropped
OPTIONS = {
    DETECTION: {"minScore": 0.5, "maxResolution": 736},
    RECOGNITION: {"minScore": MIN_SCORE - 1e-6},  # keep lines scoring exactly 0.5, as RapidOCR does
}


def is_fork_request(data: dict[str, Any]) -> bool:
    ocr = data.get("ocr")
    return isinstance(ocr, dict) and RECOGNITION in ocr and DETECTION not in ocr


def ocr_entries(model: str) -> list[Entry]:
    """Detection then recognition with mt-photos-ai's thresholds: the fork's request and MT Photos' /ocr."""
    return [Entry(OCR, t, model, dict(OPTIONS[t])) for t in (DETECTION, RECOGNITION)]


def entries(data: dict[str, Any], model: str) -> list[Entry]:
    if set(data) != {OCR} or set(data[OCR]) != {RECOGNITION}:
        raise BadRequest("the OCR fork's request (an 'ocr' task with 'recognition' only) must be sent on its own")
    return ocr_entries(model)


def boxes(quads: np.ndarray) -> list[tuple[float, float, float, float]]:
    """Each line's axis-aligned box (left, top, right, bottom) in pixels, to two decimals."""
    return [
        (round(float(q[:, 0].min()), 2), round(float(q[:, 1].min()), 2), round(float(q[:, 0].max()), 2),
         round(float(q[:, 1].max()), 2))
        for q in quads
    ]  # fmt: skip


def answer(recognition: dict[str, Any], size: tuple[int, int] | None) -> dict[str, Any]:
    texts = list(recognition["text"])
    body: dict[str, Any] = {
        "ocr": " ".join(texts),
        "result": {
            "texts": texts,
            "scores": [f"{s:.2f}" for s in recognition["textScore"]],
            "boxes": [dict(zip(("x1", "y1", "x2", "y2"), b, strict=True)) for b in boxes(recognition["quads"])],
        },
    }
    if size is not None:
        body["imageHeight"], body["imageWidth"] = size
    return body
