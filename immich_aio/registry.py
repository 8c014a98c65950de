"""The model registry: (task, type, name) to a loaded model, loaded once, unloaded when idle, swapped when reinstalled.

Thread-based because models load and run on worker threads; the event loop only schedules.

Every use compares the model's installation identity (a few stat calls) with the one it was
loaded from. When `immich-aio models ...` (or anything else) replaced the files, the next request
loads the new installation; runs already holding the old model finish on it, and it is closed
when the last of them is done. The files' sizes and hashes are recorded for the files as loaded, so /info
describes what is running, not whatever is on disk now. The hashing starts beside the session's creation, in a
thread at the lowest priority, and only /info waits for it: a request's time is its model's load and run, on any
CPU (here, with SHA instructions, a 408 MB text tower hashes in 0.27 s and was hidden behind its 0.9 s load; at the
0.2-0.4 GB/s of a CPU without them it would not be). A file replaced before it was hashed is shown without a
sha256 rather than with its successor's. Each file version is hashed once: the store
keeps each file's sha256 for the next start.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from immich_aio import priority
from immich_aio.errors import ModelLoadError, PredictError
from immich_aio.memory import trim
from immich_aio.models.base import Model, ModelSpec, Resolver
from immich_aio.store import FileIdentity, FileInfo, ModelStore, file_identity
from immich_aio.tasks import INTERACTIVE, ModelType, Task

log = logging.getLogger(__name__)

MAX_REQUESTED_NAMES = 8  # per model, for /info; client-chosen, so bounded
LOAD_ATTEMPTS = 3  # files that keep changing while they load are given up on after this


@dataclass
class _Slot:
    lock: threading.Lock = field(default_factory=threading.Lock)
    model: Model | None = None
    spec: ModelSpec | None = None
    identity: tuple[FileIdentity, ...] = ()
    described: Future[dict[str, FileInfo]] | None = None  # the files as loaded, described beside the load
    last_used: float = 0.0
    pinned: bool = False
    requested: OrderedDict[str, None] = field(default_factory=OrderedDict)


@dataclass(frozen=True)
class Loaded:
    """A loaded model as `loaded()` reports it: what it is, the names it answered, and its files when loaded."""

    spec: ModelSpec
    model: Model
    requested: list[str]  # the latest client names it answered (at most MAX_REQUESTED_NAMES)
    pinned: bool  # preloaded: never unloaded when idle
    described: Future[dict[str, FileInfo]] | None

    @property
    def files(self) -> dict[str, FileInfo]:
        """Its files as loaded (blocking until they are described: call it from a worker)."""
        if self.described is None or self.described.cancelled():  # the server is stopping
            return {}
        return self.described.result()


Listener = Callable[[str, tuple[str, str, str], float], None]  # (event, key, seconds)


class ModelRegistry:
    def __init__(
        self,
        resolvers: dict[Task, Resolver],
        ttl_for: Callable[[str, str], float] | float,
        store: ModelStore | None = None,
        clock: Callable[[], float] = time.monotonic,
        listener: Listener | None = None,
    ) -> None:
        self.resolvers = resolvers
        self._ttl_for = ttl_for if callable(ttl_for) else (lambda _task, _type, ttl=ttl_for: ttl)
        self.store = store
        self._clock = clock
        self._listener = listener or (lambda event, key, seconds: None)
        self._slots: dict[tuple[str, str, str], _Slot] = {}
        self._lock = threading.Lock()
        # model loads are rare: one at a time, on CPU time no request wants (nice 19)
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="describe", initializer=priority.lowest)
        # a request's later models, loaded while its first one loads and runs (load_ahead): an image request's, so
        # at background priority, as the sessions' threads it makes will be
        self._loader = ThreadPoolExecutor(2, thread_name_prefix="load-ahead", initializer=priority.background)
        self._ahead: dict[tuple[str, str, str], Future[Model]] = {}
        # Text towers load on a thread at the server's own priority, whoever asks (a preload, an odd request with an
        # image too): the threads of a session and of its batcher start with the priority of the thread that loads
        # it, and a search's must not be a background thread's (priority.py). Made now, by the registry's maker.
        self._search_loader = ThreadPoolExecutor(1, thread_name_prefix="load-search")
        self._search_loader.submit(lambda: None).result()

    def resolve(self, task: Task, type_: ModelType, requested: str) -> ModelSpec:
        return self.resolvers[task].resolve(type_, requested)

    def ttl(self, task: str, type_: str) -> float:
        return self._ttl_for(task, type_)

    def _slot(self, key: tuple[str, str, str]) -> _Slot:
        # Keys are served model names (store folders or built-ins), never raw client strings.
        with self._lock:
            return self._slots.setdefault(key, _Slot())

    def _build(self, spec: ModelSpec) -> tuple[Model, tuple[FileIdentity, ...], Future[dict[str, FileInfo]]]:
        """Load a model whose files did not change while loading; have what was loaded described."""
        for _attempt in range(LOAD_ATTEMPTS):
            before = spec.identity()
            started = time.perf_counter()
            try:
                model = spec.build()
                identities = {role: file_identity(path) for role, path in model.files.items()}
                described = self._describing(model, identities)
                model.load()
            except PredictError:
                self._listener("load_failed", spec.key, time.perf_counter() - started)
                raise
            except Exception as e:  # a broken file must not poison the slot: the next request retries
                self._listener("load_failed", spec.key, time.perf_counter() - started)
                log.warning("Failed to load %s/%s/%s: %s", *spec.key, e)
                raise ModelLoadError(
                    f"Failed to load model '{spec.name}' ({spec.task}.{spec.type}): {e}", served=spec.name
                ) from e
            trim()  # loading parses whole model files: hand the transient memory back (glibc keeps it otherwise)
            if spec.identity() == before:
                self._listener("loaded", spec.key, time.perf_counter() - started)
                log.info("Loaded %s/%s/%s in %.2fs", *spec.key, time.perf_counter() - started)
                return model, before, described
            log.info("%s/%s/%s changed on disk while loading; loading it again", *spec.key)
            model.close()
        raise ModelLoadError(
            f"Model '{spec.name}' ({spec.task}.{spec.type}) kept changing on disk while loading; "
            "is an install still running? Try again when it has finished",
            served=spec.name,
        )

    def _build_in_its_lane(
        self, spec: ModelSpec
    ) -> tuple[Model, tuple[FileIdentity, ...], Future[dict[str, FileInfo]]]:
        if spec.type == INTERACTIVE and priority.lowered():
            try:
                loading = self._search_loader.submit(self._build, spec)
            except RuntimeError:  # closed: the server is stopping
                return self._build(spec)
            return loading.result()
        return self._build(spec)

    def _describing(self, model: Model, identities: dict[str, FileIdentity]) -> Future[dict[str, FileInfo]]:
        """The files described beside the load, not after it; not at all once the server is stopping."""
        try:
            return self._hasher.submit(self._describe, model, identities)
        except RuntimeError:  # closed: a load still under way at the stop is not described
            dropped: Future[dict[str, FileInfo]] = Future()
            dropped.cancel()
            return dropped

    def _describe(self, model: Model, identities: dict[str, FileIdentity]) -> dict[str, FileInfo]:
        """Each file's path, size and sha256, for the version that was loaded: one replaced before it was hashed
        keeps its size as loaded and no sha256 (its successor's would be a lie)."""
        if self.store is None:
            return {}
        out = {}
        for role, path in model.files.items():
            loaded = identities.get(role)
            try:
                info = self.store.describe(path)
            except OSError:
                info = None
            if loaded is not None and (info is None or file_identity(path) != loaded):
                info = self.store.undescribed(path, size=loaded[2])
            if info is not None:
                out[role] = info
        return out

    def load(self, spec: ModelSpec, pin: bool = False) -> Model:
        """Load (once, however many threads ask at the same time) and return the model."""
        with self._hold(spec, pin) as model:
            return model

    def load_ahead(self, spec: ModelSpec) -> Future[Model] | None:
        """Start loading a model that a request needs after another (a face request's recogniser while its detector
        loads and runs), on a loader thread; None when it is loaded already (or the server is stopping). One load
        per model at a time, so this holds at most one entry per served model, whatever clients send. The request
        takes the result before it uses the model: a failed load is raised there, once, not tried again."""
        with self._lock:
            slot = self._slots.get(spec.key)
            if slot is not None and slot.model is not None:
                return None
            pending = self._ahead.get(spec.key)
            if pending is not None:
                return pending
            try:
                future = self._loader.submit(self._load_ahead, spec)
            except RuntimeError:  # closed
                return None
            self._ahead[spec.key] = future
            return future

    def _load_ahead(self, spec: ModelSpec) -> Model:
        try:
            return self.load(spec)
        finally:  # before the future is done (its entry was added under the lock this waits for)
            with self._lock:
                self._ahead.pop(spec.key, None)

    @contextlib.contextmanager
    def use(self, spec: ModelSpec) -> Iterator[Model]:
        """A model held for the duration of one run: it is never closed while a run holds it."""
        with self._hold(spec) as model:
            yield model

    @contextlib.contextmanager
    def _hold(self, spec: ModelSpec, pin: bool = False) -> Iterator[Model]:
        slot = self._slot(spec.key)
        current = spec.identity()
        with slot.lock:
            if slot.model is None or slot.identity != current:
                old = slot.model
                model, loaded_identity, described = self._build_in_its_lane(spec)
                with self._lock:
                    slot.model, slot.spec, slot.identity, slot.described = model, spec, loaded_identity, described
                if old is not None:
                    log.info("%s/%s/%s was reinstalled: now serving the new files", *spec.key)
                    self._retire(old)
            with self._lock:
                model = slot.model
                assert model is not None
                model.users += 1
                slot.pinned = slot.pinned or pin
                if spec.requested:
                    slot.requested[spec.requested] = None
                    slot.requested.move_to_end(spec.requested)
                    while len(slot.requested) > MAX_REQUESTED_NAMES:
                        slot.requested.popitem(last=False)
                slot.last_used = self._clock()
        try:
            yield model
        finally:
            with self._lock:
                model.users -= 1
                slot.last_used = self._clock()
                close_now = model.retired and model.users == 0
            if close_now:
                self._close(model, spec.key, "replaced")

    def _retire(self, model: Model) -> None:
        with self._lock:
            model.retired = True
            close_now = model.users == 0
        if close_now:
            self._close(model, (model.task, model.type, model.name), "replaced")

    def _close(self, model: Model, key: tuple[str, str, str], why: str) -> None:
        model.close()
        self._listener("unloaded", key, 0.0)
        log.info("Unloaded %s/%s/%s (%s)", *key, why)

    def reap(self) -> list[tuple[str, str, str]]:
        """Unload every model idle longer than its TTL; returns what was unloaded."""
        now = self._clock()
        unloaded = []
        with self._lock:
            candidates = []
            for key, slot in self._slots.items():
                ttl = self.ttl(key[0], key[1])
                model = slot.model
                if model is None or slot.pinned or ttl <= 0 or model.users or now - slot.last_used <= ttl:
                    continue
                candidates.append((key, slot, ttl))
        for key, slot, ttl in candidates:
            if not slot.lock.acquire(blocking=False):
                continue  # being (re)loaded right now
            try:
                with self._lock:
                    model = slot.model
                    if model is None or model.users or now - slot.last_used <= ttl:
                        continue
                    slot.model, slot.described = None, None
                self._close(model, key, f"idle for {now - slot.last_used:.0f}s")
                del model
                unloaded.append(key)
            finally:
                slot.lock.release()
        if unloaded:
            gc.collect()
            trim()
        return unloaded

    def close(self) -> None:
        """The server is stopping: hashing not yet begun is dropped (a hash under way still ends, one file)."""
        self._hasher.shutdown(wait=False, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)
        self._search_loader.shutdown(wait=False, cancel_futures=True)

    def unload_all(self, keep_pinned: bool = False) -> list[tuple[str, str, str]]:
        """Unload every model (runs under way finish first); `keep_pinned` spares the preloaded ones."""
        with self._lock:
            slots = list(self._slots.items())
        unloaded = []
        for key, slot in slots:
            with slot.lock:
                with self._lock:
                    model = slot.model
                    if model is None or (keep_pinned and slot.pinned):
                        continue
                    slot.model, slot.described = None, None
                    model.retired = True
                    close_now = model.users == 0
                if close_now:
                    self._close(model, key, "unloaded on request")
                unloaded.append(key)
        gc.collect()
        trim()
        return unloaded

    def loaded(self) -> list[Loaded]:
        """What is loaded now, with the files as they were when loaded."""
        with self._lock:
            return [
                Loaded(slot.spec, slot.model, list(slot.requested), slot.pinned, slot.described)
                for slot in self._slots.values()
                if slot.model is not None and slot.spec is not None
            ]
