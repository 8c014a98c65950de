"""One request's input as the pipeline hands it to each model: text, and an image decoded on first use.

Built by the pipeline (which owns the decode and its pixel budget) and read by the models; it sits below both so
that models need not import the pipeline that runs them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from immich_aio.imaging import to_array
from immich_aio.jobs import Job
from immich_aio.models.outputs import Output, OutputT, pick
from immich_aio.tasks import ModelType, Task

Decoder = Callable[[int | None], tuple[Image.Image, Callable[[], None]]]  # (min_side) -> (RGB image, release)


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
        decoder: Decoder | None = None,
        may_reduce: bool = False,
    ) -> None:
        self.job = job
        self.text = text
        self.outputs: dict[tuple[Task, ModelType], Output] = {}  # earlier entries' raw output
        self._array = image  # HxWx3 uint8 RGB at full size
        self._pil: Image.Image | None = None
        self._decoder = decoder
        self._release: Callable[[], None] | None = None
        self.may_reduce = may_reduce  # every image entry only needs a small input: a reduced decode will do
        self.size = size if size is not None else (image.shape[:2] if image is not None else None)  # (h, w) sent
        self.last_image_user = False  # the pipeline marks the entry after which the image can go

    @property
    def has_image(self) -> bool:
        return self.size is not None

    def output(self, task: Task, type_: ModelType, kind: type[OutputT]) -> OutputT:
        """An earlier entry's raw output (a recogniser reads its detector's)."""
        return pick(self.outputs, task, type_, kind)

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

    @property
    def full_decode_pending(self) -> bool:
        """Not decoded yet, and every model will want it at full size (no reduced decode is allowed)."""
        return self._decoder is not None and not self.may_reduce

    def decode(self) -> None:
        """Decode now what the first model would decode first thing (the pipeline does it while that model loads)."""
        if self.full_decode_pending:
            self._decode(None)

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
