"""What every model is: a named thing that loads its files, predicts, and lets go of them."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from immich_aio.batching import Batcher, RunGate, narrow_run
from immich_aio.jobs import Job
from immich_aio.models.outputs import Output
from immich_aio.payload import Payload
from immich_aio.sessions import SessionFactory, SessionProfile
from immich_aio.store import FileIdentity, file_identity, identity
from immich_aio.tasks import ModelType, Task

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]  # a run's inputs by name

NARROW_RETRY_S = 30.0  # a large model's narrow session waits for its optimised copy: asked again this often


class Model(ABC):
    """Owns exactly its preprocessing, its ONNX Runtime session(s) and its postprocessing."""

    task: Task
    type: ModelType
    # A request of this model makes a chain of short runs (OCR: a detection, then a run per width bucket of
    # text lines): on the CPU they go through a lane of their own instead of queueing behind other models' runs.
    short_runs: bool = False
    # Runs that need much memory (OCR's detector: 85-115 MB of intermediate tensors for one 736-px photo) go one at
    # a time, oldest job first, when a backlog splits slots: two at once added their peaks for a sixth more work.
    solo_runs: bool = False

    def __init__(
        self, name: str, files: dict[str, Path], factory: SessionFactory, max_batch: int | None = None
    ) -> None:
        self.name = name
        self.files = files  # role -> path, shown in /info
        self.factory = factory
        self.max_batch = max_batch  # items per batched run, for models that batch (None: the factory's default)
        self.session: ort.InferenceSession | None = None
        # A second session on half the threads, for runs granted a narrow part of a slot under a backlog
        # (RunGate.split). Made in the background when the first such run comes, from the file `open` read.
        self.narrow: ort.InferenceSession | None = None
        self._source: tuple[Path, SessionProfile | None, FileIdentity] | None = None  # path, profile, identity
        self._narrow_lock = threading.Lock()
        self._narrow_tried = -math.inf  # when a narrow session was last asked for (monotonic seconds)
        self.batcher: Batcher | None = None  # set by models whose runs are batched across requests
        self._solo = RunGate(1) if self.solo_runs and factory.split else None
        self.users = 0  # runs holding this model (kept by the registry)
        self.retired = False  # replaced by a newer installation: closed when its last user is done

    @abstractmethod
    def load(self) -> None:
        """Create sessions; raise with a reason a user can act on."""

    @abstractmethod
    def predict(self, payload: Payload, options: dict[str, Any]) -> Output:
        """Raw output (kept for dependents); `response` turns it into the wire value."""

    def response(self, output: Any, options: dict[str, Any]) -> Any:
        """Immich's wire value for this entry (a string, a list or an object, as its JSON has it)."""
        return output

    def batcher_for(
        self,
        run: Callable[[list[Any]], Sequence[Any]],
        max_size: int | None = None,
        *,
        suffix: str,
        key: Callable[[Any], Hashable] | None = None,
        interactive: bool = False,
    ) -> Batcher:
        """A batcher on the shared run gate, with this model's name on its thread and in the metrics."""
        name = f"{self.name}-{suffix}"
        return Batcher(
            run,
            self.factory.policy(max_size),
            self.factory.gate_for(self.short_runs),
            interactive=interactive,
            key=key,
            name=name,
            on_batch=self.factory.batch_observer(name),
        )

    def open(self, path: Path, profile: SessionProfile | None = None) -> ort.InferenceSession:
        """The model's session for its file; the file is remembered for a narrow session later."""
        read = file_identity(path)
        session = self.factory.create(path, profile)
        self._source = (path, profile, read) if read is not None else None
        return session

    def close(self) -> None:
        """Stop the batcher and drop the sessions so ONNX Runtime frees their memory (host and device)."""
        if self.batcher is not None:
            self.batcher.close()
            self.batcher = None
        with self._narrow_lock:
            self.session = None
            self.narrow = None
            self._source = None

    def infer(self, feeds: Feeds) -> list[np.ndarray]:
        """Run the session (the narrow one in a narrow run, once it exists); fp16 models whose inputs are fp16 too
        get cast inputs and float32 outputs."""
        session = self.session
        assert session is not None
        if narrow_run():
            if self.narrow is None:
                self._ask_narrow()  # until it is made, a narrow run goes on the wide session
            session = self.narrow or session
        halves = {i.name for i in session.get_inputs() if i.type == "tensor(float16)"}
        if halves:
            feeds = {k: v.astype(np.float16) if k in halves else v for k, v in feeds.items()}
        outs = session.run(None, feeds)
        return [o.astype(np.float32) if o.dtype == np.float16 else o for o in outs]

    def _ask_narrow(self) -> None:
        """Have the narrow session made on a thread of its own (this run goes on the wide one meanwhile): once per
        load, or again after NARROW_RETRY_S while the file's optimised copy is still to be written (a large model's
        second session waits for it: SessionFactory.narrow_ready)."""
        now = time.monotonic()
        with self._narrow_lock:
            if self._source is None or now - self._narrow_tried < NARROW_RETRY_S:
                return
            self._narrow_tried = math.inf  # one maker at a time; it says when to ask again
            source, session = self._source, self.session
        maker = threading.Thread(target=self._make_narrow, args=(source, session), name=f"narrow-{self.name}")
        maker.daemon = True
        maker.start()

    def _make_narrow(
        self, source: tuple[Path, SessionProfile | None, FileIdentity], session: ort.InferenceSession
    ) -> None:
        path, profile, read = source
        if file_identity(path) != read:  # replaced: the registry loads the new file as a model of its own
            return
        if not self.factory.narrow_ready(path):
            log.debug("%s: no narrow session yet (its file is large and its optimised copy not written)", self.name)
            with self._narrow_lock:
                self._narrow_tried = time.monotonic()  # asked again after NARROW_RETRY_S
            return
        try:
            narrow = self.factory.create(path, profile, threads=self.factory.narrow_threads)
        except Exception as e:  # ONNX Runtime raises its own types; the wide session keeps serving (not asked again)
            log.warning("%s: a second session for runs under load could not be made (%s)", self.name, e)
            return
        # Never two versions of a model in one: the file must be the one the wide session was made from, before and
        # after (a reinstall mixing two models' vectors), with the same inputs and outputs.
        if file_identity(path) != read or _signature(narrow) != _signature(session):
            log.info("%s changed while its second session was made; not used", path)
            return
        with self._narrow_lock:
            if self.session is session:  # not closed or reloaded meanwhile
                self.narrow = narrow
                log.debug("%s: narrow session ready (%d threads)", self.name, self.factory.narrow_threads)

    def run(self, feeds: Feeds | Callable[[], Feeds], job: Job) -> list[np.ndarray]:
        """One unbatched run, through the shared gate in job order.

        `feeds` may be a function that makes the inputs once the run has its slot: a detector's float input is 4x
        the bytes of the uint8 image it is made from, and under a backlog many requests wait with theirs.
        """
        job.check()  # nobody is waiting for it any more: don't spend the cores
        with (
            self._solo.slot(job) if self._solo is not None else contextlib.nullcontext(),
            self.factory.gate_for(self.short_runs).slot(job),
        ):
            job.check()  # the client may have left while this run waited for its slot
            job.ran = True
            return self.infer(feeds() if callable(feeds) else feeds)

    def providers(self) -> list[str]:
        return list(self.session.get_providers()) if self.session is not None else []


def _signature(session: ort.InferenceSession) -> list[tuple[str, str, object]]:
    return [(v.name, v.type, v.shape) for v in (*session.get_inputs(), *session.get_outputs())]


@dataclass(frozen=True)
class ModelSpec:
    """A resolved request name: the real model that answers it and how to build that model."""

    task: Task
    type: ModelType
    name: str  # the served model's own name; the cache key
    build: Callable[[], Model]
    requested: str = ""  # the cleaned name the client sent
    # Files whose replacement means a new installation. A CLIP tower lists both towers' files, so
    # a reinstall switches image and text encoders together, never one without the other.
    watch: tuple[Path, ...] = ()

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.task, self.type, self.name)

    def identity(self) -> tuple[FileIdentity, ...]:
        return identity(self.watch)


class Resolver(ABC):
    """Maps the names a client may send for one task to installed models."""

    task: Task

    @abstractmethod
    def resolve(self, type_: ModelType, requested: str) -> ModelSpec: ...

    def aliases(self) -> dict[str, str]:
        """Names this task answers to that are not model names themselves, for /info."""
        return {}

    def explain(self) -> dict[str, dict[str, str]]:
        """Each answered name: the model serving it and why (for /info and the startup banner)."""
        return {name: {"servedBy": served, "why": ""} for name, served in self.aliases().items()}

    def files(self, served: str) -> Mapping[str, Path]:
        """The files of an installed model, by role, for /info."""
        return {}
