"""The model registry: (task, type, name) to a loaded model, loaded once, unloaded when idle.

Thread-based because models load and run on worker threads; the event loop only schedules.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from immich_aio.errors import ModelLoadError, PredictError
from immich_aio.memory import trim
from immich_aio.models.base import Model, ModelSpec, Resolver

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    lock: threading.Lock = field(default_factory=threading.Lock)
    model: Model | None = None
    spec: ModelSpec | None = None
    last_used: float = 0.0
    active: int = 0
    pinned: bool = False
    requested_names: set[str] = field(default_factory=set)


class ModelRegistry:
    def __init__(self, resolvers: dict[str, Resolver], ttl_s: float, clock=time.monotonic) -> None:
        self.resolvers = resolvers
        self.ttl_s = ttl_s
        self._clock = clock
        self._slots: dict[tuple[str, str, str], _Slot] = {}
        self._lock = threading.Lock()

    def resolve(self, task: str, type_: str, requested: str) -> ModelSpec:
        return self.resolvers[task].resolve(type_, requested)

    def _slot(self, key: tuple[str, str, str]) -> _Slot:
        with self._lock:
            return self._slots.setdefault(key, _Slot())

    def load(self, spec: ModelSpec, pin: bool = False) -> Model:
        """Load (once, however many threads ask at the same time) and return the model."""
        slot = self._slot(spec.key)
        with slot.lock:
            if slot.model is None:
                started = time.perf_counter()
                try:
                    model = spec.build()
                    model.load()
                except PredictError:
                    raise
                except Exception as e:  # a broken file must not poison the slot: next request retries
                    log.exception("Failed to load %s/%s/%s", *spec.key)
                    raise ModelLoadError(f"Failed to load model '{spec.name}' ({spec.task}.{spec.type}): {e}") from e
                slot.model, slot.spec = model, spec
                log.info("Loaded %s/%s/%s in %.2fs", *spec.key, time.perf_counter() - started)
            slot.pinned = slot.pinned or pin
            if spec.requested:
                slot.requested_names.add(spec.requested)
            slot.last_used = self._clock()
            return slot.model

    @contextlib.contextmanager
    def use(self, spec: ModelSpec) -> Iterator[Model]:
        """A model held for the duration of one run: the reaper never unloads a model in use."""
        slot = self._slot(spec.key)
        with self._lock:
            slot.active += 1
        try:
            yield self.load(spec)
        finally:
            with self._lock:
                slot.active -= 1
                slot.last_used = self._clock()

    def reap(self) -> list[tuple[str, str, str]]:
        """Unload every model idle longer than the TTL; returns what was unloaded."""
        if self.ttl_s <= 0:
            return []
        now = self._clock()
        unloaded = []
        with self._lock:
            candidates = [
                (key, slot)
                for key, slot in self._slots.items()
                if slot.model is not None and not slot.pinned and slot.active == 0 and now - slot.last_used > self.ttl_s
            ]
        for key, slot in candidates:
            if not slot.lock.acquire(blocking=False):
                continue
            try:
                with self._lock:
                    if slot.active or slot.model is None or now - slot.last_used <= self.ttl_s:
                        continue
                    model, slot.model = slot.model, None
                model.close()
                del model
                unloaded.append(key)
                log.info("Unloaded %s/%s/%s after %.0fs idle", *key, now - slot.last_used)
            finally:
                slot.lock.release()
        if unloaded:
            gc.collect()
            trim()
        return unloaded

    def unload_all(self) -> None:
        with self._lock:
            slots = list(self._slots.values())
        for slot in slots:
            with slot.lock:
                if slot.model is not None:
                    slot.model.close()
                    slot.model = None
        gc.collect()
        trim()

    def loaded(self) -> list[tuple[ModelSpec, Model, set[str], bool]]:
        with self._lock:
            return [
                (slot.spec, slot.model, set(slot.requested_names), slot.pinned)
                for slot in self._slots.values()
                if slot.model is not None and slot.spec is not None
            ]
