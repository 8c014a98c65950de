"""What every model is: a named thing that loads its files, predicts, and lets go of them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from immich_aio.batching import Batcher
from immich_aio.imaging import to_array
from immich_aio.jobs import Job
from immich_aio.sessions import SessionFactory
from immich_aio.store import FileIdentity, identity


class Payload:
    """One request's input, shared by all of its entries; the image is decoded when a model first asks for it.

    The image is decoded once (within the pixel budget, by the pipeline's decoder) and handed out as a PIL
    image (what CLIP resizes from) or as an RGB array (what the face and OCR models work on). The pipeline
    marks the entry that is the image's last user; when that model calls `done_with_image` after taking what
    it needs (a resized input, face or line crops), the decoded pixels and their budget are let go before
    its run waits in the queue.
    """

    def __init__(
        self,
        job: Job,
        image: np.ndarray | None = None,
        text: str | None = None,
        *,
        size: tuple[int, int] | None = None,
        decoder: Callable[[int | None], tuple[Image.Image, Callable[[], None]]] | None = None,
        may_reduce: bool = False,
    ) -> None:
        self.job = job
        self.text = text
        self.outputs: dict[tuple[str, str], Any] = {}  # earlier entries' raw output
        self._array = image  # HxWx3 uint8 RGB at full size
        self._pil: Image.Image | None = None
        self._decoder = decoder  # (min_side) -> (RGB image, release of its budget)
        self._release: Callable[[], None] | None = None
        self.may_reduce = may_reduce  # every image entry only needs a small input: a reduced decode will do
        self.size = size if size is not None else (image.shape[:2] if image is not None else None)  # (h, w) sent
        self.last_image_user = False  # the pipeline marks the entry after which the image can go

    @property
    def has_image(self) -> bool:
        return self.size is not None

    def pil(self, min_side: int | None = None) -> Image.Image:
        """The RGB image as PIL; a model that needs only `min_side` pixels per side may get a reduced decode."""
        if self._pil is None and self._array is None:
            self._decode(min_side if self.may_reduce else None)
        if self._pil is not None:
            return self._pil
        assert self._array is not None
        return Image.fromarray(self._array)

    @property
    def image(self) -> np.ndarray:
        """The RGB image as a full-size HxWx3 uint8 array (made once; the PIL copy is let go)."""
        if self._array is None:
            if self._pil is None:
                self._decode(None)
            assert self._pil is not None
            if self.size is not None and self._pil.size != (self.size[1], self.size[0]):
                raise RuntimeError("a full-size image was asked for after a reduced decode")
            self._array = to_array(self._pil)
            self._pil.close()
            self._pil = None
        return self._array

    def _decode(self, min_side: int | None) -> None:
        if self._decoder is None:
            raise RuntimeError("this request has no image, or its image was already let go")
        self._pil, self._release = self._decoder(min_side)
        self._decoder = None

    def done_with_image(self) -> None:
        """Called by a model once it has what it needs from the image: if no later entry needs it, let it go."""
        if self.last_image_user:
            self.drop_image()

    def drop_image(self) -> None:
        if self._pil is not None:
            self._pil.close()
        self._pil = self._array = None
        self._decoder = None
        release, self._release = self._release, None
        if release is not None:
            release()


class Model(ABC):
    """Owns exactly its preprocessing, its ONNX Runtime session(s) and its postprocessing."""

    task: str
    type: str

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
    def predict(self, payload: Payload, options: dict[str, Any]) -> Any:
        """Raw output (kept for dependents); `response` turns it into the wire value."""

    def response(self, output: Any, options: dict[str, Any]) -> Any:
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
            self.factory.gate,
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
        with self.factory.gate.slot(job):
            job.check()  # the client may have left while this run waited for its slot
            job.ran = True
            return self.infer(feeds)

    def providers(self) -> list[str]:
        return list(self.session.get_providers()) if self.session is not None else []


@dataclass(frozen=True)
class ModelSpec:
    """A resolved request name: the real model that answers it and how to build that model."""

    task: str
    type: str
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

    task: str

    @abstractmethod
    def resolve(self, type_: str, requested: str) -> ModelSpec: ...

    def aliases(self) -> dict[str, str]:
        """Names this task answers to that are not model names themselves, for /info."""
        return {}

    def explain(self) -> dict[str, dict[str, str]]:
        """Each answered name: the model serving it and why (for /info and the startup banner)."""
        return {name: {"servedBy": served, "why": ""} for name, served in self.aliases().items()}

    def files(self, served: str) -> dict[str, Path]:
        """The files of an installed model, by role, for /info."""
        return {}
