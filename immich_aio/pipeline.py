"""Run one request's entries against the registry: detection first, recognition on its output.

The rule for payloads, applied to every client protocol: each entry takes the part it needs
(`clip.textual` the text, every other entry the image). A part no entry needs is ignored and never
decoded. Names are resolved before anything is decoded, so a bad name costs nothing; the image is
decoded within the shared pixel budget, when the request's turn comes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from immich_aio.errors import InferenceError, PredictError
from immich_aio.imaging import ImageSource, PixelBudget, decode_image, probe
from immich_aio.jobs import Job
from immich_aio.models.base import ModelSpec, Payload
from immich_aio.protocol import Entry
from immich_aio.registry import ModelRegistry

log = logging.getLogger(__name__)


@dataclass
class Engine:
    """What a request runs against; one per server."""

    registry: ModelRegistry
    budget: PixelBudget
    max_pixels: int


@dataclass
class Result:
    """Each entry's raw output (for other protocols' shapes) and Immich's response body."""

    outputs: dict[tuple[str, str], Any] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=dict)
    served: list[tuple[str, str, str]] = field(default_factory=list)  # (task, type, model) per entry
    size: tuple[int, int] | None = None  # (height, width) of the decoded image


def resolve(engine: Engine, entries: list[Entry]) -> list[ModelSpec]:
    specs = []
    for e in entries:
        try:
            specs.append(engine.registry.resolve(e.task, e.type, e.model_name))
        except PredictError as err:
            raise err.about(e.task, e.type, e.model_name) from None
    return specs


def run(
    engine: Engine,
    job: Job,
    entries: list[Entry],
    image: ImageSource | None,
    text: str | None,
) -> Result:
    """Blocking; call from a worker thread."""
    job.check()
    specs = resolve(engine, entries)
    needs_image = any(not e.needs_text for e in entries)
    payload = Payload(job=job, text=text if any(e.needs_text for e in entries) else None)
    if needs_image and image is not None:
        width, height = probe(image, engine.max_pixels)
        with engine.budget.hold(width * height, job):
            job.check()
            payload.image = decode_image(image, engine.max_pixels)
            return _run_entries(engine, entries, specs, payload)
    return _run_entries(engine, entries, specs, payload)


def _run_entries(engine: Engine, entries: list[Entry], specs: list[ModelSpec], payload: Payload) -> Result:
    result = Result()
    for entry, spec in zip(entries, specs, strict=True):
        payload.job.check()
        try:
            with engine.registry.use(spec) as model:
                try:
                    output = model.predict(payload, entry.options)
                    wire = model.response(output, entry.options)
                except PredictError:
                    raise
                except Exception as e:
                    log.exception("%s.%s failed on model %s", entry.task, entry.type, spec.name)
                    raise InferenceError(f"{entry.task}.{entry.type} with model '{spec.name}' failed: {e}") from e
        except PredictError as err:
            raise err.about(entry.task, entry.type, entry.model_name, spec.name) from None
        payload.outputs[(entry.task, entry.type)] = output
        result.body[entry.task] = wire  # recognition replaces its detection under the task key
        result.served.append((entry.task, entry.type, spec.name))
    result.outputs = payload.outputs
    if payload.image is not None:
        result.size = payload.image.shape[:2]
        result.body["imageHeight"], result.body["imageWidth"] = result.size
    return result
