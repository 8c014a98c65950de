"""One client request's work as the scheduler sees it: its age, its lane, and whether anyone still waits for it.

Every run a request causes carries its job. Runs are granted oldest job first, so a photo whose
detection has run gets its recognition ahead of photos that have not started; and when the
client goes away, the job's work that has not started yet is dropped instead of run for nobody.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import CancelledError, Future
from typing import TypeVar

from immich_aio.errors import ClientGone, PredictError

R = TypeVar("R")
_sequence = itertools.count()


class Job:
    def __init__(self, interactive: bool = False) -> None:
        self.seq = next(_sequence)  # admission order: smaller runs first
        self.interactive = interactive  # a person waiting (text search): skips the background queue
        self.ran = False  # a model run has started for it: a shutdown lets it finish
        self._cancelled = threading.Event()
        self._error: PredictError = ClientGone("the client closed the connection")
        self._lock = threading.Lock()
        self._futures: set[Future] = set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self, error: PredictError | None = None) -> None:
        """Queued work is dropped and the job ends with `error` (default: the client is gone).

        A run already executing finishes; the job stops at its next step.
        """
        if error is not None and not self._cancelled.is_set():
            self._error = error
        self._cancelled.set()
        with self._lock:
            futures, self._futures = list(self._futures), set()
        for f in futures:
            f.cancel()

    def check(self) -> None:
        if self._cancelled.is_set():
            raise self.error()

    def wait(self, futures: Sequence[Future[R]]) -> list[R]:
        """Results in order; raises ClientGone if the job was cancelled while they were queued."""
        self._track(futures)
        try:
            return [f.result() for f in futures]
        except CancelledError:
            raise self.error() from None
        finally:
            with self._lock:
                self._futures.difference_update(futures)

    def error(self) -> PredictError:
        """A new instance of the error this job ends with once cancelled."""
        return type(self._error)(self._error.detail)

    def _track(self, futures: Iterable[Future]) -> None:
        with self._lock:
            if not self._cancelled.is_set():
                self._futures.update(futures)
                return
        for f in futures:
            f.cancel()
