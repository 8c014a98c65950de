"""OCR as mt-photos-ai answers it, shared by the two clients built for that service (MT Photos, the OCR fork).

Detection then recognition with its thresholds (RapidOCR's text_score 0.5: lines under it dropped), and each
line's axis-aligned box in pixels.
"""

from __future__ import annotations

import numpy as np

from immich_aio.protocol import Entry
from immich_aio.tasks import DETECTION, OCR, RECOGNITION

MIN_SCORE = 0.5  # RapidOCR's text_score in mt-photos-ai: lines under it are dropped
OPTIONS = {
    DETECTION: {"minScore": 0.5, "maxResolution": 736},
    RECOGNITION: {"minScore": MIN_SCORE - 1e-6},  # keep lines scoring exactly 0.5, as RapidOCR does
}


def entries(model: str) -> list[Entry]:
    """Detection then recognition with mt-photos-ai's thresholds: the fork's request and MT Photos' /ocr."""
    return [Entry(OCR, t, model, dict(OPTIONS[t])) for t in (DETECTION, RECOGNITION)]


def boxes(quads: np.ndarray) -> list[tuple[float, float, float, float]]:
    """Each line's axis-aligned box (left, top, right, bottom) in pixels, to two decimals."""
    return [
        (round(float(q[:, 0].min()), 2), round(float(q[:, 1].min()), 2), round(float(q[:, 0].max()), 2),
         round(float(q[:, 1].max()), 2))
        for q in quads
    ]  # fmt: skip


def scores(values: list[float]) -> list[str]:
    """Line scores as mt-photos-ai sends them: strings with two decimals."""
    return [f"{s:.2f}" for s in values]
