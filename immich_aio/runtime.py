"""Everything a running server owns: store, session factory, registry, pixel budget, worker pools, reaper.

It also knows which jobs are in flight, so that a client that leaves can have its queued work
dropped, and a shutdown can let running work finish while refusing anything new.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import onnxruntime as ort
from prometheus_client.core import GaugeMetricFamily

from immich_aio import __version__, memory
from immich_aio.admission import Admission
from immich_aio.autofetch import AutoFetcher
from immich_aio.config import Settings
from immich_aio.errors import ModelMissing, PredictError, ServiceUnavailable
from immich_aio.imaging import PixelBudget
from immich_aio.jobs import Job
from immich_aio.metrics import Metrics
from immich_aio.models.base import Resolver
from immich_aio.names.clip import ClipResolver
from immich_aio.names.faces import FaceResolver
from immich_aio.names.fetchable import FetchPlan
from immich_aio.names.ocr import OcrResolver
from immich_aio.pipeline import Engine
from immich_aio.protocol import CLIP, FACES, OCR
from immich_aio.registry import ModelRegistry
from immich_aio.sessions import SessionFactory
from immich_aio.store import TASKS, ModelStore

log = logging.getLogger(__name__)

# Quiet this long after the last answer: the memory the requests freed goes back to the system. Long
# enough that a steady stream of jobs (Immich's queues) never pays for pages it would fault in again.
IDLE_TRIM_S = 2.0
# Decoded pixels per concurrent run: about three 1440-px previews, one in its run and two ready for the
# next, so the runs never wait for a decode while queued requests hold only their (compressed) upload.
DECODE_MP_PER_RUN = 8
T = TypeVar("T")
FETCH_RULE = (
    "A name with no model is fetched on its first request (IMMICH_AIO_AUTO_FETCH): a CLIP name gets the "
    "Chinese-CLIP of its dimension from a ready ONNX export (512-d CN-CLIP ViT-B-16, 768-d ViT-L-14), any other "
    "dimension or IMMICH_AIO_AUTO_FETCH_CLIP=immich gets Immich's own model for the name; a face pack comes from "
    "immich-app/<pack>; an OCR name for a script the bundled model cannot read gets its own PP-OCRv5 files. A name "
    "whose files exist is never answered by a fetched other model."
)
IMMICH_DEFAULTS = {"ViT-B-32__openai", "buffalo_l", "PP-OCRv5_mobile"}  # what Immich sends unless told otherwise


def build_resolvers(settings: Settings, store: ModelStore, factory: SessionFactory) -> dict[str, Resolver]:
    return {
        CLIP: ClipResolver(store, factory, settings.clip_aliases, settings.auto_fetch_clip),
        FACES: FaceResolver(store, factory, settings.face_max_batch),
        OCR: OcrResolver(store, factory, settings.ocr_default_model, settings.ocr_max_batch, settings.ocr_max_side),
    }


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Image requests (decode, pre/post-processing, waiting on batched runs) and text searches get
        # separate pools, so a person searching never queues behind the background backlog.
        self.executor = ThreadPoolExecutor(settings.request_threads, thread_name_prefix="request")
        self.interactive = ThreadPoolExecutor(4, thread_name_prefix="search")
        self.store = ModelStore(settings.cache_folder, settings.model_revision)
        self.metrics = Metrics()
        self.factory = SessionFactory(settings, self.metrics)
        self.registry = ModelRegistry(
            build_resolvers(settings, self.store, self.factory),
            settings.ttl_for,
            store=self.store,
            listener=self.metrics.model_event,
        )
        budget = settings.decode_budget_pixels or DECODE_MP_PER_RUN * 1_000_000 * self.factory.gate.slots
        self.budget = PixelBudget(budget, settings.decode_wait_s)
        self.engine = Engine(self.registry, self.budget, settings.max_pixels)
        self.admission = Admission(
            settings.max_upload_bytes, settings.memory_reserve_bytes, settings.disk_reserve_bytes, settings.max_queued
        )
        self.fetcher = AutoFetcher(self.store, settings.auto_fetch, on_event=self.metrics.download_event)
        self.jobs: set[Job] = set()  # admitted and not yet answered
        self._quiet = 0  # counts the moments the last request in flight was answered
        self.draining = False
        self._stopping = False
        self._tasks: list[asyncio.Task[Any]] = []
        self.metrics.watch(self._live_gauges)

    def _live_gauges(self) -> Iterable[GaugeMetricFamily]:
        """What is waiting right now, read when /metrics is scraped."""
        queued = GaugeMetricFamily("immich_aio_queue_depth", "Items waiting for a batched run", labels=["model"])
        loaded = GaugeMetricFamily("immich_aio_models_loaded", "Models loaded now", labels=["task", "type"])
        counts: dict[tuple[str, str], int] = {}
        for entry in self.registry.loaded():
            model = entry["model"]
            counts[(model.task, model.type)] = counts.get((model.task, model.type), 0) + 1
            if model.batcher is not None:
                queued.add_metric([model.batcher.name], model.batcher.depth)
        for (task, type_), n in sorted(counts.items()):
            loaded.add_metric([task, type_], n)
        yield queued
        yield loaded
        yield GaugeMetricFamily(
            "immich_aio_run_gate_waiting", "Background runs waiting for a slot", value=self.factory.gate.waiting
        )
        yield GaugeMetricFamily(
            "immich_aio_requests_in_flight", "Requests admitted and not answered", value=len(self.jobs)
        )
        yield GaugeMetricFamily(
            "immich_aio_decode_budget_pixels_used",
            "Decoded pixels held now (IMMICH_AIO_DECODE_BUDGET_MP)",
            value=self.budget.used,
        )
        yield GaugeMetricFamily(
            "immich_aio_decode_budget_waiting", "Requests waiting for the decode budget", value=self.budget.waiting
        )

    async def run(self, fn: Callable[..., T], *args: Any, interactive: bool = False) -> T:
        pool = self.interactive if interactive else self.executor
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    def admit(self, interactive: bool = False) -> Job:
        """A job for a new request, or a 503 when shutting down or the machine cannot hold one more (admission)."""
        if self.draining:
            raise ServiceUnavailable("Shutting down: not taking new work; send it to another server or try again")
        self.admission.check(len(self.jobs))
        job = Job(interactive=interactive)
        self.jobs.add(job)
        return job

    def done(self, job: Job) -> None:
        """Called on the event loop when a request is answered; the last one out schedules the idle trim."""
        self.jobs.discard(job)
        if not self.jobs:
            self._quiet += 1
            asyncio.get_running_loop().call_later(IDLE_TRIM_S, self._trim_if_quiet, self._quiet)

    def _trim_if_quiet(self, quiet: int) -> None:
        """Still nothing in flight since that moment: give freed memory back (memory.trim), off the loop."""
        if quiet != self._quiet or self.jobs or self.draining:
            return
        with contextlib.suppress(RuntimeError):  # the executor has shut down
            self.executor.submit(memory.trim)

    def cancel_queued(self, error: PredictError) -> int:
        """Shutdown past its grace period: jobs that have not started a run are answered with `error`.

        Jobs with a run under way are left to finish.
        """
        waiting = [job for job in self.jobs if not job.ran]
        for job in waiting:
            job.cancel(error)
        return len(waiting)

    def banner(self) -> str:
        """The one startup summary: version, providers, store, thread budget, and who answers what."""
        f = self.factory
        allocator = memory.active()
        hint = (
            " (install libjemalloc2 for a smaller footprint: README, 'Memory and runtime settings')"
            if allocator == "glibc" and self.settings.allocator == "auto"
            else ""
        )
        lines = [
            f"immich-aio {__version__} on ONNX Runtime {ort.__version__}, providers {', '.join(f.providers)}",
            f"  model store {self.store.root}; memory allocator {allocator}{hint}",
            f"  threads: {f.intra_threads} per run, {f.gate.slots} concurrent runs, "
            f"{self.settings.request_threads} request threads; batches up to {f.batch_size}; "
            f"decode budget {self.budget.total / 1e6:g} MP",
        ]
        for task, resolver in self.registry.resolvers.items():
            by_model: dict[tuple[str, str], set[str]] = {}
            for name, entry in resolver.explain().items():
                key = (entry["servedBy"], entry["why"])
                by_model.setdefault(key, set()).add(name.split(" (")[0])  # OCR lists each type
            if not by_model:
                fetched = "; fetched on the first request for it" if self.fetcher.enabled else ""
                lines.append(f"  {task}: no model installed{fetched}")
            for (served, why), names in sorted(by_model.items()):
                ordered = sorted(names, key=lambda n: (n not in IMMICH_DEFAULTS, n))
                shown = ", ".join(ordered[:4]) + (
                    f" and {len(ordered) - 4} more (see /info)" if len(ordered) > 4 else ""
                )
                lines.append(f"  {task}: {served} answers {shown}" + (f" ({why})" if why else ""))
        for entry, why in sorted(self.store.skipped().items()):
            lines.append(f"  skipped {entry}: {why}")
        return "\n".join(lines)

    async def start(self) -> None:
        log.info("%s", await self.run(self.banner))
        # Preloading runs in the background: /ping answers from the first moment, and a request for a
        # model still loading simply waits for that one load.
        if self.settings.preload:
            self._tasks.append(asyncio.create_task(self.run(self.preload)))
        self._tasks.append(asyncio.create_task(self._reap_forever()))

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await task
        self.interactive.shutdown(wait=True, cancel_futures=True)
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.registry.unload_all()
        log.info("Stopped: requests finished, models unloaded")

    def missing_plan(self, task: str, type_: str, name: str) -> FetchPlan | None:
        """What would be fetched for this entry, when its model is missing and fetching on first use is on."""
        if not self.fetcher.enabled:
            return None
        try:
            self.registry.resolve(task, type_, name)
        except ModelMissing as e:
            return e.plan if isinstance(e.plan, FetchPlan) else None
        except (PredictError, KeyError):
            return None  # answered by the pipeline, with its own reason
        return None

    def preload(self) -> None:
        """Load MACHINE_LEARNING_PRELOAD__* models now; they never expire. A failure is logged, not fatal.

        A preloaded name whose model is missing starts its download now (fetching on first use); it is loaded
        when the download lands.
        """
        for (task, type_), names in self.settings.preload.items():
            for name in names:
                plan = self.missing_plan(task, type_, name)
                if plan is not None:
                    download = self.fetcher.start(plan, name)
                    while not download.event.wait(0.5):
                        if self._stopping:
                            return  # the download goes on in its own thread; the shutdown does not wait for it
                try:
                    self.registry.load(self.registry.resolve(task, type_, name), pin=True)
                except (PredictError, KeyError) as e:
                    log.error("Preload of %s.%s %r failed: %s", task, type_, name, getattr(e, "detail", e))

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.model_ttl_poll_s)
            try:
                await self.run(self.registry.reap)
            except RuntimeError:  # executor already shut down
                return

    def _served_files(self) -> dict[str, dict[str, dict[str, dict[str, object]]]]:
        """For every model that answers an alias, its files with size and sha256 as on disk now (loaded or not)."""
        out: dict[str, dict[str, dict[str, dict[str, object]]]] = {}
        for task, resolver in self.registry.resolvers.items():
            for served in sorted(set(resolver.aliases().values())):
                files = {}
                for role, path in resolver.files(served).items():
                    try:
                        files[role] = self.store.describe(path).as_dict()
                    except OSError as e:
                        files[role] = {"path": str(path), "error": f"unreadable: {e.strerror or e}"}
                if files:
                    out.setdefault(task, {})[served] = files
        return out

    def info(self) -> dict[str, Any]:
        for task in TASKS:
            self.store.names(task)  # notices (and logs once) any bad entry in the store
        models = []
        for entry in self.registry.loaded():
            spec, model = entry["spec"], entry["model"]
            models.append(
                {
                    "task": spec.task,
                    "type": spec.type,
                    "name": spec.name,
                    "answersTo": sorted(entry["requested"]),
                    "files": {role: info.as_dict() for role, info in entry["files"].items()},
                    "providers": model.providers(),
                    "preloaded": entry["pinned"],
                    "ttlSeconds": self.registry.ttl(spec.task, spec.type),
                    "recentBatchSizes": list(model.batcher.batch_sizes)[-20:] if model.batcher else [],
                }
            )
        return {
            "version": __version__,
            "onnxruntime": ort.__version__,
            "providers": self.factory.providers,
            "allocator": memory.active(),
            "threads": {
                "intraOp": self.factory.intra_threads,
                "concurrentRuns": self.factory.gate.slots,
                "requestThreads": self.settings.request_threads,
                "maxBatch": self.factory.batch_size,
                "decodeBudgetMegapixels": self.budget.total / 1e6,
            },
            "modelStore": str(self.store.root),
            "models": sorted(models, key=lambda m: (m["task"], m["type"], m["name"])),
            "aliases": {task: r.aliases() for task, r in self.registry.resolvers.items()},
            "answers": {task: r.explain() for task, r in self.registry.resolvers.items()},
            "servedFiles": self._served_files(),
            "skippedStoreEntries": self.store.skipped(),
            "autoFetch": {
                "enabled": self.fetcher.enabled,
                "clip": self.settings.auto_fetch_clip,
                "waitSeconds": {"image": self.settings.fetch_wait_s, "text": self.settings.fetch_wait_text_s},
                "rule": FETCH_RULE,
            },
            "downloads": self.fetcher.downloads(),
            "admission": self.admission.describe(),
            "modelRevision": self.settings.model_revision,
        }
