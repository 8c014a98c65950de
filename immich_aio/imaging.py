"""Bounded image decoding: upload bytes to an RGB array, refusing bombs before they expand.

Immich sends upright previews, so EXIF orientation is deliberately not applied (as upstream).
Only the formats Immich can produce are opened, which keeps exotic PIL plugins (EPS, which
shells out to Ghostscript, and friends) out of reach of uploaded bytes.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from immich_aio.errors import BadRequest, PayloadTooLarge

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_ACCEPTED_TEXT = "JPEG, PNG, WebP, GIF (first frame), BMP, TIFF"

# The pixel bound is ours (checked on the header, before decoding); PIL's own bomb check
# would otherwise fire at a different, fixed threshold.
Image.MAX_IMAGE_PIXELS = None


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode to a contiguous HxWx3 uint8 RGB array; alpha is dropped, not composited."""
    if not data:
        raise BadRequest(f"The image part is empty; send an image file ({_ACCEPTED_TEXT})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError as e:
        raise BadRequest(f"The image could not be decoded; accepted formats: {_ACCEPTED_TEXT}") from e
    except Exception as e:  # truncated headers and other malformed input
        raise BadRequest(f"The image could not be decoded ({e}); accepted formats: {_ACCEPTED_TEXT}") from e

    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise BadRequest("Image has zero width or height")
        if width * height > max_pixels:
            raise PayloadTooLarge(
                f"Image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
                f"(IMMICH_AIO_MAX_PIXELS)"
            )
        try:
            image.seek(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image.load()
                rgb = image if image.mode == "RGB" else _to_rgb(image)
                array = np.asarray(rgb, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise BadRequest(f"The image could not be decoded ({e}); accepted formats: {_ACCEPTED_TEXT}") from e
    if array.ndim != 3 or array.shape[2] != 3:
        raise BadRequest(f"The image decoded to an unexpected shape {array.shape}")
    return np.ascontiguousarray(array)


def _to_rgb(image: Image.Image) -> Image.Image:
    # 16-bit and float greyscale would be clipped by a plain convert("RGB"); scale to 8 bits first.
    if image.mode in {"I;16", "I;16B", "I;16L", "I"}:
        arr = np.asarray(image, dtype=np.float64)
        peak = arr.max() if arr.size else 0
        arr = arr * (255.0 / peak) if peak > 255 else arr
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")
