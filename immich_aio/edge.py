"""The one path every inference request takes, whichever protocol it speaks.

admit (or refuse with a 503 while shutting down or when the machine cannot hold one more) → the adapter
reads and translates the request → the entries run on a worker, watched for a client that leaves (its
queued work is then dropped) and waiting on the event loop for a model fetched on first use → the answer,
or one refusal logged with what it concerned and why → counted in the metrics either way.

The protocol adapters (`adapters/`) sit above this module and only translate requests and answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from immich_aio import pipeline
from immich_aio.config import Settings
from immich_aio.errors import ClientGone, ModelMissing, PredictError, shown
from immich_aio.http_form import ReadLimits
from immich_aio.imaging import ImageSource
from immich_aio.jobs import Job
from immich_aio.metrics import endpoint_label, task_label, type_label
from immich_aio.names.fetchable import FetchPlan
from immich_aio.protocol import Entry, dumps
from immich_aio.runtime import Runtime

log = logging.getLogger(__name__)
T = TypeVar("T")


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def json_response(body: Any, status: int = 200) -> Response:
    return Response(dumps(body), status_code=status, media_type="application/json")


def read_limits(settings: Settings) -> ReadLimits:
    return ReadLimits(settings.max_upload_bytes, settings.body_timeout_s)


@dataclass
class Call:
    """One inference request as the edge sees it: its job, and what served it (for metrics)."""

    job: Job
    endpoint: str
    task: str | None = None
    filename: str = ""  # the upload's name, for protocols that echo it
    served: list[tuple[str, str, str]] = field(default_factory=list)  # (task, type, model)


async def answer(
    request: Request,
    endpoint: str,
    work: Callable[[Call], Awaitable[Response]],
    interactive: bool = False,
    guard: Callable[[Request], None] | None = None,
    soft: Callable[[PredictError], Response | None] | None = None,
) -> Response:
    """Admit a request and run `work(call)`; any error becomes its one logged answer. Counted either way.

    `interactive` puts the request in the search lane from its admission on; `guard` runs before admission
    (authentication: a refused client takes no queue place); `soft` may turn an error into the 200 answer a
    protocol expects instead (MT Photos' `{"result": [], "msg": ...}`).
    """
    rt = runtime(request)
    started = time.perf_counter()
    call: Call | None = None
    error: PredictError | None = None
    try:
        if guard is not None:
            guard(request)
        call = Call(rt.admit(interactive=interactive), endpoint)
        response = await work(call)
    except PredictError as e:
        error = e
        soft_answer = soft(e) if soft is not None else None
        note = " (answered 200 with this message, as the protocol expects)" if soft_answer is not None else ""
        response = refusal(request, e, endpoint, note) or Response(status_code=499)
        if soft_answer is not None and response.status_code != 499:
            response = soft_answer
    except Exception as e:  # last line of defence: a JSON 500, and the server keeps serving
        log.exception("Unexpected error in %s", endpoint)
        error = PredictError(f"Internal error: {type(e).__name__}: {e}")
        response = json_response({"detail": error.detail}, 500)
    finally:
        if call is not None:
            rt.done(call.job)
    _count(rt, endpoint, call, error, response.status_code, time.perf_counter() - started)
    return response


async def run_pipeline(
    request: Request, job: Job, entries: list[Entry], image: ImageSource | None, text: str | None
) -> pipeline.Result:
    """Run the entries on a worker of the job's lane; if the client leaves first, its queued work is dropped
    (ClientGone). A model that is missing and can be fetched on first use is downloaded while the
    request waits here, on the event loop (holding no worker thread), and the entries run again once it lands; the
    common path, every model installed, pays nothing for this."""
    rt = runtime(request)
    fetched = 0  # at most one download per entry; then the pipeline's own answer stands
    while True:
        try:
            work = rt.run(pipeline.run, rt.engine, job, entries, image, text, interactive=job.interactive)
            return await _unless_client_leaves(request, job, work)
        except ModelMissing as e:
            if not rt.fetcher.enabled or not isinstance(e.plan, FetchPlan) or fetched == len(entries):
                raise
            fetched += 1
            plan, requested = e.plan, e.requested or e.plan.target
            wait = rt.settings.fetch_wait_text_s if job.interactive else rt.settings.fetch_wait_s
            try:
                await _unless_client_leaves(request, job, rt.fetcher.obtain(plan, requested, job, wait))
            except PredictError as err:
                raise err.about(e.task or "", e.type or "", requested, plan.target) from None


async def _client_left(request: Request) -> None:
    """Returns when the client disconnects (call once the body has been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_client_leaves(request: Request, job: Job, awaitable: Awaitable[T]) -> T:
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_client_left(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if work.done():
        return work.result()
    job.cancel()
    work.cancel()  # not started yet: never runs; started: stops at its next step
    work.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody reads it; don't warn
    raise ClientGone("the client closed the connection before its answer was ready")


def refusal(request: Request, error: PredictError, endpoint: str, note: str = "") -> Response | None:
    """Log a refused request once (WARNING for 4xx, ERROR for 5xx) and build its JSON body."""
    context = " ".join(
        f"{k}={shown(v)!r}"
        for k, v in (
            ("task", error.task),
            ("type", error.type),
            ("requested", error.requested),
            ("model", error.served),
        )
        if v
    )
    if isinstance(error, ClientGone):
        log.info(
            "%s %s: %s; its queued work was dropped%s",
            request.method,
            endpoint,
            error.detail,
            f" ({context})" if context else "",
        )
        return None
    level = logging.ERROR if error.status >= 500 else logging.WARNING
    log.log(level, "%s %s -> %d %s: %s%s", request.method, endpoint, error.status, context or "-", error.detail, note)
    return json_response(error.body if error.body is not None else {"detail": error.detail}, error.status)


def _count(rt: Runtime, endpoint: str, call: Call | None, error: PredictError | None, status: int, s: float) -> None:
    m = rt.metrics
    ep = endpoint_label(endpoint)
    task = (error.task if error else None) or (call.task if call else None)
    if error is not None:
        m.requests.labels(ep, task_label(task), type_label(task, error.type), error.served or "", str(status)).inc()
    elif call is not None:
        served: Sequence[tuple[str | None, str | None, str]] = call.served or [(task, None, "")]
        for entry_task, type_, model in served:
            m.requests.labels(ep, task_label(entry_task), type_label(entry_task, type_), model, str(status)).inc()
    m.latency.labels(ep, task_label(task)).observe(s)
