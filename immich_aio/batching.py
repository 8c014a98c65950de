"""Cross-request batching and the gate that keeps ONNX Runtime runs from oversubscribing the cores.

Each batched model owns a `Batcher`: requests submit prepared items; one worker thread runs
whatever has queued up (up to a max batch) as one ONNX Runtime run. A lone item runs at once;
under load, items that arrive while a run executes form the next batch, so batching adds no
latency when idle. Background runs take a slot from the shared `RunGate`; interactive runs (a
person searching) skip it, so they never wait behind queued background work.

Both queues are ordered by job age (admission order), not arrival: a request that has started
(its detection ran) gets its recognition run before requests that have not, so under load each
request's latency is its own work, not everyone else's.
"""

from __future__ import annotations

import contextlib
import contextvars
import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from immich_aio import priority
from immich_aio.jobs import Job

T = TypeVar("T")
R = TypeVar("R")


# Whether the run this thread is in was granted a narrow part of a slot (RunGate.split): the model runs it on its
# session of fewer threads. Set by RunGate.slot for the run's own thread only.
_NARROW: contextvars.ContextVar[bool] = contextvars.ContextVar("narrow_run", default=False)


def narrow_run() -> bool:
    """Whether the current run holds a narrow part of a slot (see RunGate)."""
    return _NARROW.get()


@dataclass
class _Waiter:
    priority: int
    arrival: int
    turn: threading.Event = field(default_factory=threading.Event)
    narrow: bool = False  # what it was granted, set before `turn` is

    def __lt__(self, other: _Waiter) -> bool:
        return (self.priority, self.arrival) < (other.priority, other.arrival)


class RunGate:
    """At most `slots` background runs at a time, granted oldest job first; interactive runs pass straight through.

    Ordered hand-off matters: with a plain semaphore the model that just finished a run can take the
    slot straight back (its queue is never empty under load) and starve every other model.

    `split` > 1: under a backlog a slot is shared by `split` narrow runs (each on a session with that share of the
    threads) instead of one wide run. A run granted while nobody else waits is wide, so a lone request keeps every
    thread; with others waiting, or with part of a slot still busy, it is narrow. Two runs of one thread did a third
    more work on 2 cores than one run of two (whose threads wait for each other inside every operator), README,
    "Memory and runtime settings".
    """

    def __init__(self, slots: int, on_wait: Callable[[float], None] | None = None, split: int = 1) -> None:
        self.slots = max(1, slots)
        self.split = max(1, split)
        self._free = self.slots * self.split  # parts: a wide run takes `split` of them, a narrow one takes one
        self._waiting: list[_Waiter] = []  # heap, oldest job first
        self._arrival = itertools.count()
        self._lock = threading.Lock()
        self._on_wait = on_wait
        self.wide_grants = 0  # runs granted, by width: for tests and /metrics
        self.narrow_grants = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def runs(self) -> int:
        """Runs that may go at once: `slots` wide ones, or `slots * split` narrow ones under a backlog."""
        return self.slots * self.split

    def first_in_line(self, priority: int) -> bool:
        """Whether a run of this priority would be granted next: no one older waits for a slot.

        A holder asks before running its next batch under the slot it already has, instead of giving
        the slot to a younger job and queueing behind that job's run.
        """
        with self._lock:
            return not self._waiting or self._waiting[0].priority > priority

    def _grant(self, others_waiting: bool) -> bool | None:
        """Take the parts of one run, with the lock held: whether it is narrow, or None if none is free."""
        if self._free >= self.split and not others_waiting:
            narrow = False
        elif self._free >= 1 and self.split > 1:
            narrow = True
        elif self._free >= self.split:
            narrow = False
        else:
            return None
        self._free -= 1 if narrow else self.split
        if narrow:
            self.narrow_grants += 1
        else:
            self.wide_grants += 1
        return narrow

    def acquire(self, priority: int = 0) -> bool:
        """Wait for a run's turn; whether it is narrow."""
        with self._lock:
            if not self._waiting and (narrow := self._grant(False)) is not None:
                if self._on_wait is not None:
                    self._on_wait(0.0)
                return narrow
            waiter = _Waiter(priority, next(self._arrival))
            heapq.heappush(self._waiting, waiter)
        started = time.perf_counter()
        waiter.turn.wait()  # a releasing thread hands the parts over directly
        if self._on_wait is not None:
            self._on_wait(time.perf_counter() - started)
        return waiter.narrow

    def release(self, narrow: bool = False) -> None:
        with self._lock:
            self._free += 1 if narrow else self.split
            while self._waiting and (granted := self._grant(len(self._waiting) > 1)) is not None:
                waiter = heapq.heappop(self._waiting)
                waiter.narrow = granted
                waiter.turn.set()

    def _widen(self) -> bool:
        """For a narrow holder about to run again under its grant: take the rest of its slot if that is free and
        nobody waits (the backlog is gone). Whether it did."""
        with self._lock:
            if self._waiting or self._free < self.split - 1:
                return False
            self._free -= self.split - 1
            return True

    @contextlib.contextmanager
    def slot(self, job: Job | None = None) -> Iterator[Callable[[], None]]:
        """Hold a run's turn. Yields `widen`: called before each further run under it (Batcher's held runs)."""
        if job is not None and job.interactive:
            yield lambda: None
            return
        narrow = self.acquire(job.seq if job is not None else 0)
        token = _NARROW.set(narrow)

        def widen() -> None:
            nonlocal narrow, token
            if narrow and self._widen():
                narrow = False
                _NARROW.reset(token)
                token = _NARROW.set(False)

        try:
            yield widen
        finally:
            _NARROW.reset(token)
            self.release(narrow)


@dataclass(frozen=True)
class BatchPolicy:
    max_size: int = 8
    max_wait_s: float = 0.0
    # Batches run back to back under one gate slot while their job is the oldest in line (e.g. the
    # other width buckets of one photo's text lines); bounded, so a slot always comes back to the gate.
    hold_runs: int = 8


class BatcherClosed(RuntimeError):
    pass


@dataclass(order=True)
class _Queued(Generic[T, R]):
    seq: int
    arrival: int
    item: T = field(compare=False)
    future: Future = field(compare=False)
    job: Job = field(compare=False)


class Batcher(Generic[T, R]):
    """Runs `run(items) -> results` (same length, same order) on batches of submitted items.

    `key(item)` groups items that can share a run (e.g. OCR crops of one width bucket); a batch
    holds one key. If a batched run raises, its items are retried one by one, so a bad item
    fails only its own request. Items whose job was cancelled before their run are dropped.
    """

    def __init__(
        self,
        run: Callable[[list[T]], Sequence[R]],
        policy: BatchPolicy,
        gate: RunGate,
        *,
        interactive: bool = False,
        key: Callable[[T], Hashable] | None = None,
        name: str = "batcher",
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._run = run
        self.name = name
        self.policy = policy
        self._gate = gate
        self._interactive = interactive
        self._key = key or (lambda _item: None)
        self._queue: list[_Queued[T, R]] = []
        self._arrival = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._on_batch = on_batch
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # recent run sizes, for tests and /info
        self._thread = threading.Thread(target=self._loop, name=f"batch-{name}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Items waiting for a run."""
        return len(self._queue)

    def submit(self, item: T, job: Job) -> Future[R]:
        return self.submit_many([item], job)[0]

    def submit_many(self, items: Sequence[T], job: Job) -> list[Future[R]]:
        futures: list[Future[R]] = [Future() for _ in items]
        with self._cond:
            if self._closed:
                raise BatcherClosed("model was unloaded")
            for item, fut in zip(items, futures, strict=True):
                heapq.heappush(self._queue, _Queued(job.seq, next(self._arrival), item, fut, job))
            self._cond.notify()
        return futures

    def map(self, items: Sequence[T], job: Job) -> list[R]:
        """Submit and wait: results in item order (raises the first item's error, if any)."""
        return job.wait(self.submit_many(items, job))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._queue = self._queue, []
            self._cond.notify_all()
        for q in pending:
            if q.future.set_running_or_notify_cancel():
                q.future.set_exception(BatcherClosed("model was unloaded"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def _take(self, *, held: bool = False) -> list[_Queued[T, R]] | None:
        """The next batch: the oldest item and the items of its key behind it, up to max_size.

        `held`: a gate slot is held for it, so never wait (None when nothing is queued), and take it
        only if its job is older than every run waiting at the gate.
        """
        with self._cond:
            while True:
                while not self._queue and not self._closed and not held:
                    self._cond.wait()
                if self._closed or (held and not self._queue):
                    return None
                if held and not self._gate.first_in_line(self._queue[0].seq):
                    return None
                under_load = bool(self.batch_sizes) and self.batch_sizes[-1] > 1  # the last run was a batch
                if not held and self.policy.max_wait_s > 0 and under_load and len(self._queue) < self.policy.max_size:
                    # Under load wait briefly for more; when idle, never.
                    deadline = time.monotonic() + self.policy.max_wait_s
                    while len(self._queue) < self.policy.max_size and not self._closed:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    if self._closed:  # close() emptied the queue while we waited
                        return None
                batch: list[_Queued[T, R]] = []
                rest: list[_Queued[T, R]] = []
                key: Hashable = None
                while self._queue and len(batch) < self.policy.max_size:
                    entry = heapq.heappop(self._queue)
                    if entry.future.cancelled():
                        continue  # its client went away before the run: drop it
                    k = self._key(entry.item)
                    if not batch:
                        key = k
                    if k != key:
                        rest.append(entry)
                    elif entry.future.set_running_or_notify_cancel():
                        batch.append(entry)
                for entry in rest:  # other keys wait for their own run, keeping their place
                    heapq.heappush(self._queue, entry)
                if batch:
                    return batch

    def _loop(self) -> None:
        if not self._interactive:
            priority.background()  # the backlog yields the cores to a search (priority.py)
        while (batch := self._take()) is not None:
            job = batch[0].job  # the oldest job in the batch decides its place at the gate
            failed: tuple[list[_Queued[T, R]], Exception] | None = None
            with self._gate.slot(job if not self._interactive else _INTERACTIVE) as widen:
                for run_no in range(self.policy.hold_runs):
                    if run_no:
                        widen()  # the backlog may have gone while this grant ran narrow
                    batch = self._still_wanted(batch)  # clients may have left while the batch waited
                    if batch:
                        try:
                            results = self._execute(batch)
                        except Exception as e:
                            failed = (batch, e)  # retried item by item below, each with its own slot
                            break
                        for q, result in zip(batch, results, strict=True):
                            q.future.set_result(result)
                    if self._interactive or run_no + 1 == self.policy.hold_runs:
                        break
                    next_batch = self._take(held=True)
                    if next_batch is None:
                        break
                    batch = next_batch
            if failed is not None:
                batch, error = failed
                if len(batch) > 1:
                    self._run_one_by_one(batch)
                else:
                    batch[0].future.set_exception(error)

    def _execute(self, batch: list[_Queued[T, R]]) -> list[R]:
        for q in batch:
            q.job.ran = True
        self.batch_sizes.append(len(batch))
        if self._on_batch is not None:
            self._on_batch(len(batch))
        results = list(self._run([q.item for q in batch]))
        if len(results) != len(batch):
            raise RuntimeError(f"batch run returned {len(results)} results for {len(batch)} items")
        return results

    @staticmethod
    def _still_wanted(batch: list[_Queued[T, R]]) -> list[_Queued[T, R]]:
        kept = []
        for q in batch:
            if q.job.cancelled:
                q.future.set_exception(q.job.error())
            else:
                kept.append(q)
        return kept

    def _run_one_by_one(self, batch: list[_Queued[T, R]]) -> None:
        for q in batch:
            try:
                with self._gate.slot(q.job if not self._interactive else _INTERACTIVE):
                    q.future.set_result(self._run([q.item])[0])
            except Exception as e:
                q.future.set_exception(e)


_INTERACTIVE = Job(interactive=True)
