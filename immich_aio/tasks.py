"""The tasks and model types of Immich's ML contract, as enums: one spelling for every module.

StrEnum members are the wire strings themselves (`Task.CLIP == "clip"`), so they compare, hash and format
as the strings Immich sends; only a JSON object key needs `.value` (orjson takes plain `str` keys only).
"""

from __future__ import annotations

from enum import StrEnum


class Task(StrEnum):
    CLIP = "clip"
    FACES = "facial-recognition"
    OCR = "ocr"


class ModelType(StrEnum):
    VISUAL = "visual"
    TEXTUAL = "textual"
    DETECTION = "detection"
    RECOGNITION = "recognition"


# Short names for the members, as the code reads them.
CLIP, FACES, OCR = Task.CLIP, Task.FACES, Task.OCR
VISUAL, TEXTUAL, DETECTION, RECOGNITION = (
    ModelType.VISUAL,
    ModelType.TEXTUAL,
    ModelType.DETECTION,
    ModelType.RECOGNITION,
)

# The model type that serves a person searching: its runs skip the background queue (batching.py) and its threads
# keep the server's CPU priority (priority.py, registry.py).
INTERACTIVE = TEXTUAL

# Every (task, type) the server can send.
TASK_TYPES: dict[Task, tuple[ModelType, ...]] = {
    CLIP: (VISUAL, TEXTUAL),
    FACES: (DETECTION, RECOGNITION),
    OCR: (DETECTION, RECOGNITION),
}
