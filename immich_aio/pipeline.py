"""Run one request's entries against the registry: detection first, recognition on its output.

The rule for payloads, applied to every client protocol: each entry takes the part it needs
(`clip.textual` the text, every other entry the image). A part no entry needs is ignored and never
decoded. Names are resolved and the image's header checked before anything is decoded, so a bad
name or an oversized image costs nothing. The image is decoded when the first model asks for it,
within the shared pixel budget, and let go as soon as its last user has taken what it needs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from immich_aio.errors import InferenceError, PredictError
from immich_aio.imaging import ImageSource, PixelBudget, load_rgb, open_image, probe
from immich_aio.jobs import Job
from immich_aio.models.base import ModelSpec
from immich_aio.models.outputs import Output, OutputT, pick
from immich_aio.payload import Decoder, Payload
from immich_aio.protocol import Entry
from immich_aio.registry import ModelRegistry
from immich_aio.tasks import CLIP, ModelType, Task

log = logging.getLogger(__name__)


@dataclass
class Engine:
    """What a request runs against; one per server."""

    registry: ModelRegistry
    budget: PixelBudget
    max_pixels: int
    clip_reduced_decode: bool = False  # IMMICH_AIO_CLIP_REDUCED_DECODE: a CLIP-only request may decode a JPEG reduced


@dataclass
class Result:
    """Each entry's raw output (for other protocols' shapes) and Immich's response body."""

    outputs: dict[tuple[Task, ModelType], Output] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=dict)
    served: list[tuple[str, str, str]] = field(default_factory=list)  # (task, type, model) per entry
    size: tuple[int, int] | None = None  # (height, width) of the image as sent

    def output(self, task: Task, type_: ModelType, kind: type[OutputT]) -> OutputT:
        """An entry's raw output, as a protocol adapter reads it."""
        return pick(self.outputs, task, type_, kind)


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
    text = text if any(e.needs_text for e in entries) else None
    image_entries = [e for e in entries if not e.needs_text]
    if not image_entries or image is None:
        return _run_entries(engine, entries, specs, Payload(job, text=text))
    width, height = probe(image, engine.max_pixels)
    payload = Payload(
        job,
        text=text,
        size=(height, width),
        decoder=_decoder(engine, job, image),
        # CLIP-only requests: the models resize to a small square, so a JPEG may be decoded reduced (when allowed;
        # otherwise the decode is known to be a full one, and is done while the first model loads)
        may_reduce=engine.clip_reduced_decode and all(e.task == CLIP for e in image_entries),
    )
    try:
        return _run_entries(engine, entries, specs, payload)
    finally:
        payload.drop_image()


def _decoder(engine: Engine, job: Job, source: ImageSource) -> Decoder:
    def decode(min_side: int | None) -> tuple[Image.Image, Callable[[], None]]:
        opened = open_image(source, engine.max_pixels, min_side)
        lease = engine.budget.acquire(opened.width * opened.height, job)
        try:
            job.check()
            return load_rgb(opened), lease.release
        except BaseException:
            opened.close()
            lease.release()
            raise

    return decode


def _run_entries(engine: Engine, entries: list[Entry], specs: list[ModelSpec], payload: Payload) -> Result:
    result = Result()
    last_image_entry = max((i for i, e in enumerate(entries) if not e.needs_text), default=-1)
    # The later entries' models load while the first one loads and runs: on two cores a face request's
    # recogniser load no longer waits for its detector's load and run (a first request after a start or an idle
    # unload; nothing to do once they are loaded)
    ahead = {
        spec.key: future
        for spec in specs[1:]
        if spec.key != specs[0].key and (future := engine.registry.load_ahead(spec)) is not None
    }
    # A request with one model to load (CLIP's first request) has it loaded on a loader thread while this one
    # decodes the photo, which its model would ask for first thing: the session build keeps one core busy, the
    # decode (12-18 ms) takes the other. Not where two models load (both cores are busy), nor for a reduced
    # decode, whose size only the model knows.
    if not ahead and payload.full_decode_pending and (future := engine.registry.load_ahead(specs[0])) is not None:
        ahead[specs[0].key] = future
    for index, (entry, spec) in enumerate(zip(entries, specs, strict=True)):
        payload.job.check()
        payload.last_image_user = index == last_image_entry
        try:
            loading = ahead.pop(spec.key, None)
            if loading is not None:
                if index == 0:
                    payload.decode()
                with contextlib.suppress(CancelledError):  # the server is stopping: use() loads it if it can
                    loading.result()  # its load error, raised here once rather than tried again by use()
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
        if index == last_image_entry:
            payload.drop_image()
        payload.outputs[(entry.task, entry.type)] = output
        result.body[entry.task.value] = wire  # recognition replaces its detection under the task key
        result.served.append((entry.task.value, entry.type.value, spec.name))
    result.outputs = payload.outputs
    if payload.size is not None:
        result.size = payload.size
        result.body["imageHeight"], result.body["imageWidth"] = result.size
    return result
