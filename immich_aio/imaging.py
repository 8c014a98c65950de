"""Bounded image decoding: upload bytes to an RGB array, refusing bombs before they expand.

Immich sends upright previews, so EXIF orientation is deliberately not applied (as upstream).
Only the formats Immich can produce are opened, which keeps exotic PIL plugins (EPS, which
shells out to Ghostscript, and friends) out of reach of uploaded bytes.

Decoded pixels are the largest per-request memory, so they are held within one `PixelBudget`
shared by all requests: a request decodes when its pixels fit, oldest request first, instead of
every queued request expanding its upload at once, and gives them back as soon as its models have
taken what they need (a CLIP request: once its 224×224 input is made).

A JPEG that only feeds a small model input can be decoded at a reduced size inside libjpeg (1/2,
1/4 or 1/8 of the DCT, `draft`), which costs a fraction of a full decode and of the resize after it.
"""

from __future__ import annotations

import heapq
import importlib
import io
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from immich_aio import priority
from immich_aio.errors import BadRequest, PayloadTooLarge, ServiceUnavailable, UndecodableImage
from immich_aio.jobs import Job

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_ACCEPTED_TEXT = "JPEG, PNG, WebP, GIF (first frame), BMP, TIFF"

# Their decoders registered when the server starts (30 ms): PIL imports its plugins on the first `Image.open`,
# which cost the first request after each start 7-13 ms
for _plugin in ("Bmp", "Gif", "Jpeg", "Png", "Tiff", "WebP"):
    importlib.import_module(f"PIL.{_plugin}ImagePlugin")

# The pixel bound is ours (checked on the header, before decoding); PIL's own bomb check
# would otherwise fire at a different, fixed threshold.
Image.MAX_IMAGE_PIXELS = None

ImageSource = bytes | BinaryIO


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, bytes | bytearray):
        if not source:
            raise UndecodableImage(f"The image part is empty; send an image file ({_ACCEPTED_TEXT})")
        stream: BinaryIO = io.BytesIO(source)
    else:
        stream = source
        stream.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(stream, formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError as e:
        if stream.seek(0, io.SEEK_END) == 0:
            raise UndecodableImage(f"The image part is empty; send an image file ({_ACCEPTED_TEXT})") from e
        raise UndecodableImage(f"The image could not be decoded; accepted formats: {_ACCEPTED_TEXT}") from e
    except Exception as e:  # truncated headers and other malformed input
        raise UndecodableImage(f"The image could not be decoded ({e}); accepted formats: {_ACCEPTED_TEXT}") from e


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise BadRequest("Image has zero width or height")
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"Image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} (IMMICH_AIO_MAX_PIXELS)"
        )


def probe(source: ImageSource, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the header alone; 400/413 before a single pixel is decoded."""
    with _open(source) as image:
        _check_size(*image.size, max_pixels)
        return image.size


def open_image(source: ImageSource, max_pixels: int, min_side: int | None = None) -> Image.Image:
    """The image opened and size-checked, not yet decoded; `.size` is what decoding will produce.

    With `min_side`, a JPEG is set to decode at the smallest DCT scale that keeps both sides at least
    `min_side` (other formats decode at full size).
    """
    image = _open(source)
    _check_size(*image.size, max_pixels)
    if min_side is not None and image.format == "JPEG":
        image.draft("RGB", (min_side, min_side))
    return image


def load_rgb(image: Image.Image) -> Image.Image:
    """Decode an opened image to RGB; alpha is dropped, not composited."""
    try:
        image.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            rgb = image if image.mode == "RGB" else _to_rgb(image)
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise UndecodableImage(f"The image could not be decoded ({e}); accepted formats: {_ACCEPTED_TEXT}") from e
    if rgb is not image:
        image.close()
    return rgb


def to_array(image: Image.Image) -> np.ndarray:
    """A decoded RGB image as a contiguous HxWx3 uint8 array."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise BadRequest(f"The image decoded to an unexpected shape {array.shape}")
    return np.ascontiguousarray(array)


SPLIT_RESIZE_PIXELS = 1 << 20  # smaller images resize in a few milliseconds on one thread
_resize_helper = ThreadPoolExecutor(1, thread_name_prefix="resize", initializer=priority.background)
_resize_helper_free = threading.Lock()


def resize_bicubic(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image.resize(size, BICUBIC)`, pixel for pixel, in about two thirds of the time when a second core is free.

    PIL resizes in two passes through an 8-bit image: every row to the new width, with weights that depend only on
    the two widths, then every column to the new height. The row pass over the full-size image is most of the time
    (a 1440x1920 preview to CLIP's 224 px: 18-22 ms, the column pass 2-3 of it), and its top and bottom halves,
    done apart, are the same pixels: a helper thread does one half while this thread does the other (13-14 ms in
    all), and the column pass follows on the joined rows. Splitting the output rows instead (PIL's `box`) is not
    exact: their weights come from other offsets, one grey level off. When the helper is busy with another
    request's half, this request resizes on its own thread, as before.
    """
    width, height = image.size
    new_width, new_height = size
    if (
        image.mode not in ("RGB", "L")  # 8 bits per channel, no alpha to premultiply: the passes above
        or new_width == width
        or width * height < SPLIT_RESIZE_PIXELS
        or not _resize_helper_free.acquire(blocking=False)
    ):
        return image.resize(size, Image.Resampling.BICUBIC)
    middle = height // 2
    try:
        image.load()
        lower = _resize_helper.submit(_row_pass_then_free, image, middle, height, new_width)
    except BaseException:
        _resize_helper_free.release()
        raise
    upper = _row_pass(image, 0, middle, new_width)
    rows = Image.new(image.mode, (new_width, height))
    rows.paste(upper, (0, 0))
    rows.paste(lower.result(), (0, middle))
    return rows if new_height == height else rows.resize(size, Image.Resampling.BICUBIC)


def _row_pass(image: Image.Image, top: int, bottom: int, new_width: int) -> Image.Image:
    """Rows `top` to `bottom` resized to `new_width` (the row pass only: the height stays)."""
    return image.crop((0, top, image.width, bottom)).resize((new_width, bottom - top), Image.Resampling.BICUBIC)


def _row_pass_then_free(image: Image.Image, top: int, bottom: int, new_width: int) -> Image.Image:
    try:
        return _row_pass(image, top, bottom, new_width)
    finally:
        _resize_helper_free.release()


def decode_image(source: ImageSource, max_pixels: int) -> np.ndarray:
    """Decode to a contiguous HxWx3 uint8 RGB array at full size."""
    with load_rgb(open_image(source, max_pixels)) as rgb:
        return to_array(rgb)


def _to_rgb(image: Image.Image) -> Image.Image:
    # 16-bit, 32-bit and float greyscale would be clipped by a plain convert("RGB"): scale to 8 bits first,
    # strip by strip, so a large image never has a float64 (or even float32) copy of itself in memory.
    if image.mode in {"I;16", "I;16B", "I;16L", "I", "F"}:
        arr = np.asarray(image)
        peak = float(arr.max()) if arr.size else 0.0
        floats_in_0_1 = image.mode == "F" and peak <= 1.0
        scale = 255.0 if floats_in_0_1 else (255.0 / peak if peak > 255 else 1.0)
        out = np.empty(arr.shape, dtype=np.uint8)
        for top in range(0, arr.shape[0], _STRIP):
            np.clip(
                arr[top : top + _STRIP].astype(np.float32) * scale,
                0,
                255,
                out=out[top : top + _STRIP],
                casting="unsafe",
            )
        del arr
        image = Image.fromarray(out, "L")
    return image.convert("RGB")


_STRIP = 256  # rows converted at a time


class PixelBudget:
    """Decoded pixels held at once, across all requests; waiters are served oldest job first.

    An image larger than the whole budget still runs, once nothing else holds any of it, so the
    budget bounds memory without refusing images the pixel limit allows.
    """

    def __init__(self, total: int, wait_s: float) -> None:
        self.total = total
        self.wait_s = wait_s
        self.used = 0
        self._waiting: list[int] = []  # heap of job seqs
        self._cond = threading.Condition()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @contextmanager
    def hold(self, pixels: int, job: Job) -> Iterator[None]:
        lease = self.acquire(pixels, job)
        try:
            yield
        finally:
            lease.release()

    def acquire(self, pixels: int, job: Job) -> Lease:
        """Wait (oldest job first) until `pixels` fit; the lease gives them back, once, when released."""
        need = min(pixels, self.total)
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            heapq.heappush(self._waiting, job.seq)
            try:
                while not (self._waiting[0] == job.seq and (self.used + need <= self.total or self.used == 0)):
                    job.check()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ServiceUnavailable(
                            f"Busy: waited {self.wait_s:g} s for memory to decode a {pixels / 1e6:.1f} MP image "
                            f"({self.used / 1e6:.1f} of {self.total / 1e6:g} MP in use, IMMICH_AIO_DECODE_BUDGET_MP); "
                            "try again later"
                        )
                    self._cond.wait(min(left, 0.25))  # wake up now and then to notice a client that left
            finally:
                self._waiting.remove(job.seq)
                heapq.heapify(self._waiting)
                self._cond.notify_all()
            self.used += need
        return Lease(self, need)

    def _give_back(self, pixels: int) -> None:
        with self._cond:
            self.used -= pixels
            self._cond.notify_all()


class Lease:
    """Pixels held in a `PixelBudget`; `release` is idempotent, so early and final releases can both run."""

    def __init__(self, budget: PixelBudget, pixels: int) -> None:
        self._budget: PixelBudget | None = budget
        self.pixels = pixels

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._give_back(self.pixels)
