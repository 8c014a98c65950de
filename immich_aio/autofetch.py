"""Fetching on first use: a request for a model whose files are absent downloads it, as Immich ML does.

The Immich server drops every ML job that gets a non-2xx and never retries it, so a fresh install with an
empty model volume must answer its first jobs with 200, not with a command to run. Here:

- one download per model (single-flight): every request for it waits on the same download, and is
  answered when it lands; the installs are `immich-aio models`'s own (same mirrors, verification, atomic
  swap, resumable partial files), each in its own thread, different models side by side;
- a wait is bounded (image jobs below the Immich server's 300 s, a text search much shorter); past it, or
  when the download failed, the answer is a JSON 503 saying what is fetched, how far it got and the manual
  command;
- a failed download is tried again only after a backoff (30 s, doubling to 15 min), never once per request;
- the state of every download is in /info and /metrics, and the log has a line at the start, a few progress
  lines and a line at the end.

The set of downloads is bounded by the catalogue (names/fetchable.py): a plan is chosen by the server from
Immich's fixed name lists, never built from a client string.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from immich_aio.errors import ServiceUnavailable
from immich_aio.jobs import Job
from immich_aio.names.fetchable import FetchPlan
from immich_aio.store import ModelStore
from immich_aio.tasks import CLIP, FACES

log = logging.getLogger(__name__)

RETRY_FIRST_S = 30.0
RETRY_MAX_S = 900.0
PROGRESS_LOG_S = 30.0  # at most one progress line per download this often (and at each quarter of a big file)

Installer = Callable[[ModelStore, FetchPlan], None]


def install(store: ModelStore, plan: FetchPlan) -> None:
    """Run the same install `immich-aio models` runs for this plan."""
    if plan.kind == "cn-clip-onnx":
        from immich_aio.download.clip import fetch_onnx

        fetch_onnx(store, plan.arg)
    elif plan.kind == "immich-clip":
        from immich_aio.download.clip import fetch_immich

        fetch_immich(store, plan.arg)
    elif plan.kind == "faces":
        from immich_aio.download.faces import fetch_pack

        fetch_pack(store, plan.arg, "hf")
    elif plan.kind == "ocr":
        from immich_aio.download.ocr import fetch

        fetch(store, plan.arg)
    else:
        raise ValueError(f"unknown fetch plan kind {plan.kind!r}")


@dataclass
class Download:
    """One model's download: its latest attempt, and when the next may start."""

    plan: FetchPlan
    requested: str  # the name that first asked for it (from the catalogue's names, for the log and /info)
    state: str = "queued"  # queued | waiting-for-other-install | downloading | installing | installed | failed
    step: str = ""  # the install's latest step, e.g. "Splitting onnx/model.onnx into the image and text towers"
    file: str = ""
    done: int = 0
    total: int | None = None
    attempts: int = 0
    started: float = 0.0  # wall clock, for /info
    finished: float = 0.0
    error: str = ""
    retry_at: float = 0.0  # monotonic: no new attempt before this
    event: threading.Event = field(default_factory=threading.Event)  # set when the attempt ends
    _logged_at: float = 0.0
    _logged_quarter: int = 0

    @property
    def running(self) -> bool:
        return not self.event.is_set()

    def progress_text(self) -> str:
        if not self.file:
            return self.state
        size = f"{self.done / 1e6:.1f} of {self.total / 1e6:.1f} MB" if self.total else f"{self.done / 1e6:.1f} MB"
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return f"{self.state} {self.file}: {size}{pct}"

    def as_dict(self) -> dict[str, Any]:
        retry_in = max(0.0, self.retry_at - time.monotonic()) if self.state == "failed" else 0.0
        return {
            "model": self.plan.target,
            "task": self.plan.task,
            "requestedFor": self.requested,
            "source": self.plan.source,
            "state": self.state,
            "step": self.step or None,
            "file": self.file,
            "bytesDone": self.done,
            "bytesTotal": self.total,
            "attempts": self.attempts,
            "startedAt": self.started,
            "finishedAt": self.finished or None,
            "lastError": self.error or None,
            "retryInSeconds": round(retry_in, 1) if retry_in else None,
            "command": self.plan.command,
        }


class AutoFetcher:
    def __init__(
        self,
        store: ModelStore,
        enabled: bool,
        *,
        installer: Installer = install,
        on_event: Callable[[str, FetchPlan, int], None] | None = None,
        retry_first_s: float = RETRY_FIRST_S,
        retry_max_s: float = RETRY_MAX_S,
    ) -> None:
        self.store = store
        self.enabled = enabled
        self.installer = installer
        self.on_event = on_event or (lambda event, plan, n: None)  # metrics: started/installed/failed, bytes
        self.retry_first_s = retry_first_s
        self.retry_max_s = retry_max_s
        self._downloads: dict[str, Download] = {}  # keyed by plan.key: bounded by the catalogue
        self._lock = threading.Lock()
        self._warned_licence = False

    def start(self, plan: FetchPlan, requested: str) -> Download:
        """The model's download: the one running, a failed one still in its backoff, or a new attempt."""
        with self._lock:
            current = self._downloads.get(plan.key)
            if current is not None and (current.running or time.monotonic() < current.retry_at):
                return current
            download = Download(plan, requested, attempts=(current.attempts if current else 0) + 1)
            download.started = time.time()
            self._downloads[plan.key] = download
        threading.Thread(target=self._run, args=(download,), name=f"fetch-{plan.target}", daemon=True).start()
        return download

    async def obtain(self, plan: FetchPlan, requested: str, job: Job, wait_s: float) -> None:
        """Wait (on the event loop) until the model is installed; a JSON 503 past `wait_s` or on failure."""
        download = self.start(plan, requested)
        deadline = time.monotonic() + wait_s
        while download.running and time.monotonic() < deadline:
            job.check()
            await asyncio.sleep(0.1)
        if download.state == "installed":
            return
        if download.running:
            raise ServiceUnavailable(
                f"Model {plan.target} for {requested!r} is being fetched on first use from {plan.source}: "
                f"{download.progress_text()} after {time.time() - download.started:.0f} s; this request waited "
                f"{wait_s:g} s (IMMICH_AIO_FETCH_WAIT_S). Send it again later (Immich: run the job for missing "
                f"assets once the download is done), or install it by hand: `{plan.command}`",
                served=plan.target,
            )
        retry = max(0.0, download.retry_at - time.monotonic())
        raise ServiceUnavailable(
            f"Fetching model {plan.target} for {requested!r} from {plan.source} failed: {download.error}. The next "
            f"attempt starts with a request after {retry:.0f} s; or install it by hand: `{plan.command}`",
            served=plan.target,
        )

    def _run(self, download: Download) -> None:
        from immich_aio.download.fetch import reporting
        from immich_aio.download.install import install_lock

        plan = download.plan
        started = time.monotonic()
        if plan.task == CLIP:
            log.warning(
                "Fetching CLIP model %s for %r, which had no model here. If this Immich library already holds "
                "smart-search vectors from another model under that name (a switch from Immich ML without its "
                "model-cache volume, say), run Administration > Jobs > Smart Search > All once it is installed, "
                "or searches mix two vector spaces",
                plan.target,
                download.requested,
            )
        if plan.task == FACES and not self._warned_licence:
            self._warned_licence = True
            log.warning("InsightFace models are licensed for non-commercial research purposes only (%s)", plan.source)
        log.info(
            "Fetching %s for %r from %s on first use (attempt %d); requests for it wait for it",
            plan.key,
            download.requested,
            plan.source,
            download.attempts,
        )
        self.on_event("started", plan, 0)

        def wait_for_other(holder: str) -> bool:
            if download.state != "waiting-for-other-install":
                download.state = "waiting-for-other-install"
                log.info("%s is being installed by %s; waiting for it", plan.key, holder)
            return True

        earlier_files = 0  # bytes of the files this attempt fetched before the current one

        def report(file: str, done: int, total: int | None) -> None:
            nonlocal earlier_files
            if file != download.file:
                earlier_files += download.done
                download.file, download._logged_quarter = file, 0
            download.state, download.done, download.total = "downloading", done, total
            quarter = int(4 * done / total) if total else 0
            now = time.monotonic()
            big = (total or 0) >= 20_000_000
            if big and (quarter > download._logged_quarter or now - download._logged_at >= PROGRESS_LOG_S):
                if 0 < quarter < 4 or now - download._logged_at >= PROGRESS_LOG_S:
                    log.info("Fetching %s: %s", plan.key, download.progress_text())
                download._logged_quarter, download._logged_at = quarter, now

        def step(message: str) -> None:
            download.step = message
            if not message.startswith("Fetching"):  # the files are in: checking, splitting, installing
                download.state = "installing"
                log.info("Fetching %s: %s", plan.key, message)

        try:
            with install_lock(self.store, plan.lock, wait=wait_for_other), reporting(report, step):
                self.installer(self.store, plan)
        except BaseException as e:  # any failure of an install is this download's failure, reported
            delay = min(self.retry_first_s * 2 ** (download.attempts - 1), self.retry_max_s)
            download.error = _one_line(e)
            download.state = "failed"
            download.retry_at = time.monotonic() + delay
            download.finished = time.time()
            self.on_event("failed", plan, earlier_files + download.done)
            log.error(
                "Fetching %s failed after %.0f s: %s. Requests for it get a 503 saying so; the next attempt starts "
                "with a request after %.0f s. By hand: `%s`",
                plan.key,
                time.monotonic() - started,
                download.error,
                delay,
                plan.command,
            )
        else:
            download.state = "installed"
            download.finished = time.time()
            # Should the install not make the name servable (a store laid out otherwise), requests get the
            # resolver's own answer instead of starting the same install again and again.
            download.retry_at = time.monotonic() + self.retry_first_s
            self.on_event("installed", plan, earlier_files + download.done)
            log.info(
                "Installed %s in %.0f s (fetched on first use from %s)",
                plan.key,
                time.monotonic() - started,
                plan.source,
            )
        finally:
            download.event.set()

    def downloads(self) -> list[dict[str, Any]]:
        with self._lock:
            return [d.as_dict() for _key, d in sorted(self._downloads.items())]


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    # huggingface_hub's own advice names options of its API, not of this server
    text = ". ".join(part for part in text.split(". ") if "force_download" not in part)
    text = text.replace("run the command again to resume", "the next attempt resumes it")
    return text.replace("run the command again", "the next attempt starts afresh")[:600]
