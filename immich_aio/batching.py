"""Cross-request batching and the gate that keeps ONNX Runtime runs from oversubscribing the cores.

Each batched model owns a `Batcher`: requests submit prepared items; one worker thread runs
whatever has queued up (up to a max batch) as one ONNX Runtime run. A lone item runs at once;
under load, items that arrive while a run executes form the next batch, so batching adds no
latency when idle. Background runs take a slot from the shared `RunGate`; interactive runs (a
person searching) skip it, so they never wait behind queued background work.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class RunGate:
    """At most `slots` background runs at a time, granted in arrival order; interactive runs pass straight through.

    FIFO hand-off matters: with a plain semaphore the model that just finished a run can take the
    slot straight back (its queue is never empty under load) and starve every other model.
    """

    def __init__(self, slots: int) -> None:
        self.slots = max(1, slots)
        self._free = self.slots
        self._waiting: deque[threading.Event] = deque()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            if self._free and not self._waiting:
                self._free -= 1
                return
            turn = threading.Event()
            self._waiting.append(turn)
        turn.wait()  # the releasing thread hands its slot over directly

    def release(self) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()
            else:
                self._free += 1

    @contextlib.contextmanager
    def slot(self, interactive: bool = False) -> Iterator[None]:
        if interactive:
            yield
            return
        self.acquire()
        try:
            yield
        finally:
            self.release()


@dataclass(frozen=True)
class BatchPolicy:
    max_size: int = 8
    max_wait_s: float = 0.0


class BatcherClosed(RuntimeError):
    pass


class Batcher(Generic[T, R]):
    """Runs `run(items) -> results` (same length, same order) on batches of submitted items.

    `key(item)` groups items that can share a run (e.g. OCR crops of one width bucket); a batch
    holds one key. If a batched run raises, its items are retried one by one, so a bad item
    fails only its own request.
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
    ) -> None:
        self._run = run
        self.policy = policy
        self._gate = gate
        self._interactive = interactive
        self._key = key or (lambda _item: None)
        self._queue: deque[tuple[T, Future[R]]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # recent run sizes, for tests and /info
        self._thread = threading.Thread(target=self._loop, name=f"batch-{name}", daemon=True)
        self._thread.start()

    def submit(self, item: T) -> Future[R]:
        return self.submit_many([item])[0]

    def submit_many(self, items: Sequence[T]) -> list[Future[R]]:
        futures: list[Future[R]] = [Future() for _ in items]
        with self._cond:
            if self._closed:
                raise BatcherClosed("model was unloaded")
            self._queue.extend(zip(items, futures, strict=True))
            self._cond.notify()
        return futures

    def map(self, items: Sequence[T]) -> list[R]:
        """Submit and wait: results in item order (raises the first item's error, if any)."""
        return [f.result() for f in self.submit_many(items)]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for _, fut in pending:
            fut.set_exception(BatcherClosed("model was unloaded"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def _take(self) -> list[tuple[T, Future[R]]] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            under_load = bool(self.batch_sizes) and self.batch_sizes[-1] > 1  # the last run was a batch
            if self.policy.max_wait_s > 0 and under_load and len(self._queue) < self.policy.max_size:
                # Under load wait briefly for more; when idle, never.
                deadline = time.monotonic() + self.policy.max_wait_s
                while len(self._queue) < self.policy.max_size and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._closed:  # close() emptied the queue while we waited
                    return None
            key = self._key(self._queue[0][0])
            batch, rest = [], deque()
            while self._queue and len(batch) < self.policy.max_size:
                entry = self._queue.popleft()
                (batch if self._key(entry[0]) == key else rest).append(entry)
            rest.extend(self._queue)
            self._queue = rest
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            self.batch_sizes.append(len(batch))
            items = [item for item, _ in batch]
            try:
                with self._gate.slot(self._interactive):
                    results = list(self._run(items))
                if len(results) != len(items):
                    raise RuntimeError(f"batch run returned {len(results)} results for {len(items)} items")
            except Exception as e:
                if len(batch) > 1:
                    self._run_one_by_one(batch)
                else:
                    batch[0][1].set_exception(e)
                continue
            for (_, fut), result in zip(batch, results, strict=True):
                fut.set_result(result)

    def _run_one_by_one(self, batch: list[tuple[T, Future[R]]]) -> None:
        for item, fut in batch:
            try:
                with self._gate.slot(self._interactive):
                    fut.set_result(self._run([item])[0])
            except Exception as e:
                fut.set_exception(e)
