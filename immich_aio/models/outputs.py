"""What each model's `predict` returns: the raw output a dependent entry or another protocol reads.

Immich's wire values are made from these by each model's `response`; MT Photos and the OCR fork shape their own
answers from the same objects, so a field is named and typed once, here. CLIP towers return a bare
`np.ndarray` (one row per input, un-normalised).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from immich_aio.tasks import ModelType, Task

OutputT = TypeVar("OutputT")


@dataclass(frozen=True)
class DetectedFaces:
    """SCRFD's faces, best first after NMS."""

    boxes: np.ndarray  # N×4 float32 (x1, y1, x2, y2) in pixels: Immich's answer rounds them, MT Photos' truncates
    scores: np.ndarray  # N float32
    landmarks: np.ndarray  # N×5×2 float32 pixels (N×0×2 for a detector without landmarks)


@dataclass(frozen=True)
class RecognisedFaces:
    """The detector's faces with one raw (un-normalised) ArcFace embedding each."""

    boxes: np.ndarray  # N×4 float32 pixels
    scores: np.ndarray  # N float32
    embeddings: np.ndarray  # N×D float32


@dataclass(frozen=True)
class TextBoxes:
    """PP-OCR's text regions in reading order."""

    quads: np.ndarray  # N×4×2 float32 pixels (four corners each)
    scores: np.ndarray  # N float32


@dataclass(frozen=True)
class TextLines:
    """The recognised lines that passed the score threshold, with their regions."""

    text: list[str]
    box: np.ndarray  # float32, each line's quad normalised by the image size and flattened (Immich's `box`)
    box_score: list[float]  # rounded to 5 decimals, as Immich ML sends them
    text_score: list[float]  # rounded to 5 decimals
    quads: np.ndarray  # N×4×2 float32 pixels, for the protocols that send pixel boxes


Output = np.ndarray | DetectedFaces | RecognisedFaces | TextBoxes | TextLines


def pick(
    outputs: Mapping[tuple[Task, ModelType], Output], task: Task, type_: ModelType, kind: type[OutputT]
) -> OutputT:
    """An entry's raw output, checked to be what the reader expects (a recogniser its detector's faces, say)."""
    value = outputs[(task, type_)]
    if not isinstance(value, kind):
        raise TypeError(f"{task}.{type_} gave {type(value).__name__}, not {kind.__name__}")
    return value
