"""What every model is: a named thing that loads its files, predicts, and lets go of them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from immich_aio.batching import Batcher
from immich_aio.jobs import Job
from immich_aio.models.outputs import Output
from immich_aio.payload import Payload
from immich_aio.sessions import SessionFactory
from immich_aio.store import FileIdentity, identity
from immich_aio.tasks import ModelType, Task


class Model(ABC):
    """Owns exactly its preprocessing, its ONNX Runtime session(s) and its postprocessing."""

    task: Task
    type: ModelType
    # A request of this model makes a chain of short runs (OCR: a detection, then a run per width bucket of
    # text lines): on the CPU they go through a lane of their own instead of queueing behind other models' runs.
    short_runs: bool = False

    def __init__(
        self, name: str, files: dict[str, Path], factory: SessionFactory, max_batch: int | None = None
    ) -> None:
        self.name = name
        self.files = files  # role -> path, shown in /info
        self.factory = factory
        self.max_batch = max_batch  # items per batched run, for models that batch (None: the factory's default)
        self.session: ort.InferenceSession | None = None
        self.batcher: Batcher | None = None  # set by models whose runs are batched across requests
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

    def close(self) -> None:
        """Stop the batcher and drop the session so ONNX Runtime frees its memory (host and device)."""
        if self.batcher is not None:
            self.batcher.close()
            self.batcher = None
        self.session = None

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the session; fp16 models whose inputs are fp16 too get cast inputs and float32 outputs."""
        assert self.session is not None
        halves = {i.name for i in self.session.get_inputs() if i.type == "tensor(float16)"}
        if halves:
            feeds = {k: v.astype(np.float16) if k in halves else v for k, v in feeds.items()}
        outs = self.session.run(None, feeds)
        return [o.astype(np.float32) if o.dtype == np.float16 else o for o in outs]

    def run(self, feeds: dict[str, np.ndarray], job: Job) -> list[np.ndarray]:
        """One unbatched run, through the shared gate in job order."""
        job.check()  # nobody is waiting for it any more: don't spend the cores
        with self.factory.gate_for(self.short_runs).slot(job):
            job.check()  # the client may have left while this run waited for its slot
            job.ran = True
            return self.infer(feeds)

    def providers(self) -> list[str]:
        return list(self.session.get_providers()) if self.session is not None else []


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
