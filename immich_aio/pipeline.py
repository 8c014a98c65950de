"""Run one request's entries against the registry: detection first, recognition on its output."""

from __future__ import annotations

import logging
from typing import Any

from immich_aio.errors import InferenceError, PredictError
from immich_aio.models.base import Payload
from immich_aio.protocol import Entry
from immich_aio.registry import ModelRegistry

log = logging.getLogger(__name__)


def run(registry: ModelRegistry, entries: list[Entry], payload: Payload) -> dict[str, Any]:
    """Blocking; call from a worker thread. Names are resolved before any model runs."""
    specs = [registry.resolve(e.task, e.type, e.model_name) for e in entries]
    response: dict[str, Any] = {}
    for entry, spec in zip(entries, specs, strict=True):
        with registry.use(spec) as model:
            try:
                output = model.predict(payload, entry.options)
                wire = model.response(output, entry.options)
            except PredictError:
                raise
            except Exception as e:
                log.exception("%s.%s failed on model %s", entry.task, entry.type, spec.name)
                raise InferenceError(f"{entry.task}.{entry.type} with model '{spec.name}' failed: {e}") from e
        payload.outputs[(entry.task, entry.type)] = output
        response[entry.task] = wire  # recognition replaces its detection under the task key
    if payload.image is not None:
        response["imageHeight"], response["imageWidth"] = payload.image.shape[:2]
    return response
