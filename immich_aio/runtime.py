"""Everything a running server owns: store, session factory, registry, worker pool, reaper."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import onnxruntime as ort

from immich_aio import __version__
from immich_aio.config import Settings
from immich_aio.errors import PredictError
from immich_aio.models.base import Resolver
from immich_aio.names.clip import ClipResolver
from immich_aio.names.faces import FaceResolver
from immich_aio.names.ocr import OcrResolver
from immich_aio.protocol import CLIP, FACES, OCR
from immich_aio.registry import ModelRegistry
from immich_aio.sessions import SessionFactory
from immich_aio.store import ModelStore

log = logging.getLogger(__name__)
T = TypeVar("T")


def build_resolvers(settings: Settings, store: ModelStore, factory: SessionFactory) -> dict[str, Resolver]:
    return {
        CLIP: ClipResolver(store, factory, settings.clip_aliases),
        FACES: FaceResolver(store, factory, settings.face_max_batch),
        OCR: OcrResolver(store, factory, settings.ocr_default_model, settings.ocr_max_batch),
    }


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Image requests (decode, pre/post-processing, waiting on batched runs) and text searches get
        # separate pools, so a person searching never queues behind the background backlog.
        self.executor = ThreadPoolExecutor(settings.request_threads, thread_name_prefix="request")
        self.interactive = ThreadPoolExecutor(4, thread_name_prefix="search")
        self.store = ModelStore(settings.cache_folder)
        self.factory = SessionFactory(settings)
        self.registry = ModelRegistry(build_resolvers(settings, self.store, self.factory), settings.model_ttl)
        self._tasks: list[asyncio.Task[Any]] = []

    async def run(self, fn: Callable[..., T], *args: Any, interactive: bool = False) -> T:
        pool = self.interactive if interactive else self.executor
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    async def start(self) -> None:
        # Preloading runs in the background: /ping answers from the first moment, and a request for a
        # model still loading simply waits for that one load.
        if self.settings.preload:
            self._tasks.append(asyncio.create_task(self.run(self.preload)))
        if self.settings.model_ttl > 0:
            self._tasks.append(asyncio.create_task(self._reap_forever()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await task
        self.interactive.shutdown(wait=True, cancel_futures=True)
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.registry.unload_all()
        log.info("Stopped: requests finished, models unloaded")

    def preload(self) -> None:
        """Load MACHINE_LEARNING_PRELOAD__* models now; they never expire. A failure is logged, not fatal."""
        for (task, type_), names in self.settings.preload.items():
            for name in names:
                try:
                    self.registry.load(self.registry.resolve(task, type_, name), pin=True)
                except (PredictError, KeyError) as e:
                    log.error("Preload of %s.%s %r failed: %s", task, type_, name, getattr(e, "detail", e))

    async def _reap_forever(self) -> None:
        poll = self.settings.model_ttl_poll_s
        poll = poll if poll > 0 else max(self.settings.model_ttl / 2, 0.05)
        while True:
            await asyncio.sleep(poll)
            try:
                await self.run(self.registry.reap)
            except RuntimeError:  # executor already shut down
                return

    def _served_files(self) -> dict[str, dict[str, dict[str, dict[str, object]]]]:
        """For every model that answers an alias, its files with size and sha256 (loaded or not)."""
        out: dict[str, dict[str, dict[str, dict[str, object]]]] = {}
        for task, resolver in self.registry.resolvers.items():
            for served in sorted(set(resolver.aliases().values())):
                files = resolver.files(served)
                if files:
                    out.setdefault(task, {})[served] = {
                        role: self.store.describe(p).as_dict() for role, p in files.items()
                    }
        return out

    def info(self) -> dict[str, Any]:
        models = []
        for spec, model, requested, pinned in self.registry.loaded():
            models.append(
                {
                    "task": spec.task,
                    "type": spec.type,
                    "name": spec.name,
                    "answersTo": sorted(requested),
                    "files": {role: self.store.describe(path).as_dict() for role, path in model.files.items()},
                    "providers": model.providers(),
                    "preloaded": pinned,
                    "recentBatchSizes": list(model.batcher.batch_sizes)[-20:] if model.batcher else [],
                }
            )
        return {
            "version": __version__,
            "onnxruntime": ort.__version__,
            "providers": self.factory.providers,
            "threads": {
                "intraOp": self.factory.intra_threads,
                "concurrentRuns": self.factory.gate.slots,
                "requestThreads": self.settings.request_threads,
                "maxBatch": self.factory.batch_size,
            },
            "modelStore": str(self.store.root),
            "models": sorted(models, key=lambda m: (m["task"], m["type"], m["name"])),
            "aliases": {task: r.aliases() for task, r in self.registry.resolvers.items()},
            "servedFiles": self._served_files(),
        }
