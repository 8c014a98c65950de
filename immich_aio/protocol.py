"""Immich's `/predict` contract: the `entries` field in, the JSON body out.

Pure functions with no model or HTTP knowledge, so the wire format can be checked on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from immich_aio.errors import BadRequest, InvalidEntries, shown
from immich_aio.tasks import CLIP, DETECTION, FACES, OCR, RECOGNITION, TASK_TYPES, TEXTUAL, VISUAL, ModelType, Task

# A recognition entry consumes its task's detection output.
DEPENDS_ON: dict[tuple[Task, ModelType], tuple[Task, ModelType]] = {
    (FACES, RECOGNITION): (FACES, DETECTION),
    (OCR, RECOGNITION): (OCR, DETECTION),
}
TEXT_INPUT = {(CLIP, TEXTUAL)}


@dataclass(frozen=True)
class Entry:
    task: Task
    type: ModelType
    model_name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_text(self) -> bool:
        return (self.task, self.type) in TEXT_INPUT


def decode_entries(raw: str | bytes | None) -> dict[str, Any]:
    """The `entries` field as a JSON object; shape errors are 422, as upstream's validation."""
    if raw is None:
        raise InvalidEntries('Field "entries" is required: a JSON object {task: {type: {"modelName": ...}}}')
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidEntries(f'"entries" is not valid JSON: {e}') from e
    if not isinstance(data, dict) or not data:
        raise InvalidEntries('"entries" must be a non-empty JSON object {task: {type: {"modelName": ...}}}')
    return data


def entries_from(data: dict[str, Any]) -> list[Entry]:
    """Entries in run order (detection before its recognition); an unknown task or type is 400 naming the known."""
    entries: list[Entry] = []
    for name, types in data.items():
        if name not in TASK_TYPES:
            raise BadRequest(f"Unknown task {shown(name)!r}; known tasks: {', '.join(TASK_TYPES)}")
        task = Task(name)
        if not isinstance(types, dict) or not types:
            raise InvalidEntries(f'entries["{task}"] must be a non-empty object {{type: {{"modelName": ...}}}}')
        for type_, spec in types.items():
            if type_ not in TASK_TYPES[task]:
                raise BadRequest(
                    f"Unknown type {shown(type_)!r} for task {name!r}; known types: {', '.join(TASK_TYPES[task])}"
                )
            if not isinstance(spec, dict):
                raise InvalidEntries(f'entries["{task}"]["{type_}"] must be an object with "modelName"')
            model = spec.get("modelName")
            if not isinstance(model, str) or not model:
                raise InvalidEntries(f'entries["{task}"]["{type_}"].modelName must be a non-empty string')
            options = spec.get("options") or {}
            if not isinstance(options, dict):
                raise InvalidEntries(f'entries["{task}"]["{type_}"].options must be an object')
            entries.append(Entry(task, ModelType(type_), model, options))

    present = {(e.task, e.type) for e in entries}
    for e in entries:
        dep = DEPENDS_ON.get((e.task, e.type))
        if dep and dep not in present:
            raise BadRequest(
                f"Task {e.task} of type {e.type} depends on output of {dep[0]}.{dep[1]}; send both entries"
            )
    # Stable: independent entries first, dependents after.
    return sorted(entries, key=lambda e: (e.task, e.type) in DEPENDS_ON)


def check_payload(entries: Iterable[Entry], has_image: bool, has_text: bool) -> None:
    """Each entry takes the part it needs (text for CLIP textual, else the image); parts nobody needs are ignored.

    A request may carry both parts. Both CLIP types at once is refused: the response has one `clip` key.
    """
    entries = list(entries)
    if not has_image and not has_text:
        raise BadRequest("Either image or text must be provided")
    if {(e.task, e.type) for e in entries} >= {(CLIP, VISUAL), (CLIP, TEXTUAL)}:
        raise BadRequest(
            "clip.visual and clip.textual cannot share a request (both would answer under 'clip'); send them separately"
        )
    for e in entries:
        if e.needs_text and not has_text:
            raise BadRequest(f"{e.task}.{e.type} needs a 'text' field; it got an image").about(
                e.task, e.type, e.model_name
            )
        if not e.needs_text and not has_image:
            raise BadRequest(f"{e.task}.{e.type} needs an 'image' file part; it got text").about(
                e.task, e.type, e.model_name
            )


def option_float(options: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    """A numeric option in [lo, hi]; anything else is a 400 that names the range."""
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= float(value) <= hi:
        raise BadRequest(f"option {key!r} must be a number between {lo} and {hi}, got {shown(repr(value))}")
    return float(value)


def vector_string(vec: np.ndarray) -> str:
    """An embedding as the contract's JSON-array string (float32 shortest repr, no spaces)."""
    return orjson.dumps(np.ascontiguousarray(vec, dtype=np.float32), option=orjson.OPT_SERIALIZE_NUMPY).decode()


def dumps(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
