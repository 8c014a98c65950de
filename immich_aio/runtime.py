"""Everything a running server owns: store, session factory, registry, pixel budget, worker pools, reaper.

It also knows which jobs are in flight, so that a client that leaves can have its queued work
dropped, and a shutdown can let running work finish while refusing anything new.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from immich_aio import memory, priority
from immich_aio.admission import Admission
from immich_aio.autofetch import AutoFetcher
from immich_aio.config import Settings
from immich_aio.errors import ModelMissing, PredictError, ServiceUnavailable
from immich_aio.imaging import PixelBudget
from immich_aio.jobs import Job
from immich_aio.metrics import Metrics
from immich_aio.models.base import Resolver
from immich_aio.models.ocr import import_post_processing
from immich_aio.names.clip import ClipResolver
from immich_aio.names.faces import FaceResolver
from immich_aio.names.fetchable import FetchPlan
from immich_aio.names.ocr import OcrResolver
from immich_aio.pipeline import Engine
from immich_aio.registry import ModelRegistry
from immich_aio.sessions import SessionFactory
from immich_aio.store import ModelStore
from immich_aio.tasks import CLIP, FACES, OCR, ModelType, Task

log = logging.getLogger(__name__)

# Quiet this long after the last answer: the memory the requests freed goes back to the system. Long
# enough that a steady stream of jobs (Immich's queues) never pays for pages it would fault in again.
IDLE_TRIM_S = 2.0
# And while busy, this often: the allocator keeps freed pages for the next requests (none purged on a timer), so
# without it memory stays at the high-water mark of whatever ran before, e.g. a burst of OCR before the usual
# mix (README, "Memory and runtime settings"). A purge costs the next runs some page faults: about 1 % at this rate.
BUSY_TRIM_S = 10.0
# Decoded pixels per slot: about three 1440-px previews, one in its run and two ready for the next, so the runs
# never wait for a decode while queued requests hold only their (compressed) upload. A slot split in two under a
# backlog (IMMICH_AIO_SPLIT_RUNS) shares its 8: at 8 per run OCR alone at 8 concurrent peaked 70-150 MB higher for
# no more throughput (README, "Memory and runtime settings").
DECODE_MP_PER_RUN = 8
T = TypeVar("T")
RUNNING_GRACE_S = 30  # after the grace period: how long runs under way may take to end


def build_resolvers(settings: Settings, store: ModelStore, factory: SessionFactory) -> dict[Task, Resolver]:
    return {
        CLIP: ClipResolver(store, factory, settings.clip_aliases, settings.auto_fetch_clip),
        FACES: FaceResolver(store, factory, factory.face_batch),
        OCR: OcrResolver(store, factory, settings.ocr_default_model, settings.ocr_max_batch, settings.ocr_max_side),
    }


def _warm_imports() -> None:
    try:
        import_post_processing()
    except Exception as e:  # the OCR model's own load reports it, with its reason, when OCR is asked for
        log.debug("warm imports: %s", e)


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Image requests (decode, pre/post-processing, waiting on batched runs) and text searches get
        # separate pools, so a person searching never queues behind the background backlog; the image pool's
        # threads run at background priority, the search pool's do not (priority.py).
        priority.configure(settings.background_nice)
        self.executor = ThreadPoolExecutor(
            settings.request_threads, thread_name_prefix="request", initializer=priority.background
        )
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
        budget = settings.decode_budget_pixels or DECODE_MP_PER_RUN * 1_000_000 * self.factory.run_slots
        self.budget = PixelBudget(budget, settings.decode_wait_s)
        self.engine = Engine(self.registry, self.budget, settings.max_pixels, settings.clip_reduced_decode)
        self.admission = Admission(
            settings.max_upload_bytes, settings.memory_reserve_bytes, settings.disk_reserve_bytes, settings.max_queued
        )
        self.fetcher = AutoFetcher(self.store, settings.auto_fetch, on_event=self.metrics.download_event)
        self.jobs: set[Job] = set()  # admitted and not yet answered
        self._quiet = 0  # counts the moments the last request in flight was answered
        self._draining = False
        self._idle = asyncio.Event()  # set while nothing is in flight
        self._idle.set()
        # Set while nothing has been in flight for IDLE_TRIM_S (and at start), cleared by the next request:
        # background work waits for it (the optimised-model cache's packing).
        self.settled = threading.Event()
        self.settled.set()
        if self.factory.ort_cache is not None:
            self.factory.ort_cache.quiet = self.settled
        self._stopping = False
        self._tasks: list[asyncio.Task[Any]] = []

    async def run(self, fn: Callable[..., T], *args: Any, interactive: bool = False) -> T:
        pool = self.interactive if interactive else self.executor
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    def admit(self, interactive: bool = False) -> Job:
        """A job for a new request, or a 503 when shutting down or the machine cannot hold one more (admission)."""
        if self._draining:
            raise ServiceUnavailable("Shutting down: not taking new work; send it to another server or try again")
        self.admission.check(len(self.jobs))
        job = Job(interactive=interactive)
        self.jobs.add(job)
        self._idle.clear()
        self.settled.clear()
        return job

    def done(self, job: Job) -> None:
        """Called on the event loop when a request is answered; the last one out schedules the idle trim."""
        self.jobs.discard(job)
        if not self.jobs:
            self._idle.set()
            self._quiet += 1
            asyncio.get_running_loop().call_later(IDLE_TRIM_S, self._trim_if_quiet, self._quiet)

    def _trim_if_quiet(self, quiet: int) -> None:
        """Still nothing in flight since that moment: give freed memory back (memory.trim), off the loop."""
        if quiet != self._quiet or self.jobs or self._draining:
            return
        self.settled.set()
        with contextlib.suppress(RuntimeError):  # the executor has shut down
            self.executor.submit(memory.trim)

    async def drain(self, grace_s: float, why: str) -> None:
        """A graceful shutdown: refuse new work, give admitted work `grace_s` to finish, then answer what has not
        started a run with a 503 and let the runs under way (ONNX Runtime cannot interrupt one) end, up to
        RUNNING_GRACE_S more. Returns when nothing is in flight or the time is up."""
        self._draining = True
        log.info("%s: finishing %d request(s), refusing new work (grace %g s)", why, len(self.jobs), grace_s)
        if await self._idle_within(grace_s):
            return
        waiting = [job for job in self.jobs if not job.ran]
        error = ServiceUnavailable("Shutting down: this request was not finished in time; send it again")
        for job in waiting:
            job.cancel(error)
        log.warning("Grace period over: %d request(s) still queued were answered with 503", len(waiting))
        await self._idle_within(RUNNING_GRACE_S)

    async def _idle_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), seconds)
        return not self.jobs

    async def start(self) -> None:
        # Imports a first OCR request would otherwise wait for (0.6 s), done before the server answers: on a
        # background thread they competed with the first requests for the CPU instead.
        await asyncio.to_thread(_warm_imports)
        await asyncio.to_thread(self.store.sweep_records)
        if self.factory.ort_cache is not None:
            await asyncio.to_thread(self.factory.ort_cache.sweep)
        if self.factory.openvino_cache is not None:
            await asyncio.to_thread(self.factory.openvino_cache.sweep)
        # Preloading runs in the background: /ping answers from the first moment, and a request for a
        # model still loading simply waits for that one load.
        if self.settings.preload:
            self._tasks.append(asyncio.create_task(self.run(self.preload)))
        self._tasks.append(asyncio.create_task(self._reap_forever()))
        self._tasks.append(asyncio.create_task(self._trim_while_busy()))

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await task
        if self.factory.ort_cache is not None:
            self.factory.ort_cache.close()  # a packing child under way goes with the server
        self.interactive.shutdown(wait=True, cancel_futures=True)
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.registry.unload_all()
        self.registry.close()
        log.info("Stopped: requests finished, models unloaded")

    def missing_plan(self, task: Task, type_: ModelType, name: str) -> FetchPlan | None:
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

    async def _trim_while_busy(self) -> None:
        """Under steady work, every BUSY_TRIM_S: the pages a busier moment left behind go back to the system."""
        while True:
            await asyncio.sleep(BUSY_TRIM_S)
            if self.jobs and not self._draining:
                with contextlib.suppress(RuntimeError):  # the executor has shut down
                    self.executor.submit(memory.trim)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.model_ttl_poll_s)
            try:
                await self.run(self.registry.reap)
            except RuntimeError:  # executor already shut down
                return
