"""Decoding every accepted format to RGB, without EXIF transposition."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from immich_aio.errors import BadRequest, PayloadTooLarge
from immich_aio.imaging import decode_image

RNG = np.random.default_rng(1)
RGB = RNG.integers(0, 255, (37, 53, 3), dtype=np.uint8)


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_roundtrip(fmt):
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(save(Image.fromarray(RGB), fmt, **kw), 10**8)
    assert out.dtype == np.uint8 and out.shape == (37, 53, 3)
    np.testing.assert_array_equal(out, RGB)


def test_jpeg():
    out = decode_image(save(Image.fromarray(RGB), "JPEG", quality=95), 10**8)
    assert out.shape == (37, 53, 3)


def test_gif_first_frame():
    frames = [Image.new("RGB", (20, 10), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = save(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = decode_image(data, 10**8)
    assert out.shape == (10, 20, 3)
    assert out[5, 5, 0] > 200 and out[5, 5, 2] < 50  # red, the first frame


def test_rgba_alpha_is_dropped_not_composited():
    rgba = np.dstack([RGB, np.zeros((37, 53), np.uint8)])
    out = decode_image(save(Image.fromarray(rgba, "RGBA"), "PNG"), 10**8)
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize("mode", ["L", "P", "LA", "CMYK", "I;16"])
def test_other_modes_become_rgb(mode):
    img = Image.fromarray(RGB).convert("L" if mode == "I;16" else mode)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img).astype(np.uint16) * 257)
        assert img.mode == "I;16"
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    out = decode_image(save(img, fmt), 10**8)
    assert out.shape == (37, 53, 3) and out.dtype == np.uint8
    assert out.max() > 100


def test_exif_orientation_not_applied():
    img = Image.fromarray(RGB)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = decode_image(save(img, "JPEG", exif=exif.tobytes()), 10**8)
    assert out.shape == (37, 53, 3)  # not (53, 37, 3)


def test_formats_outside_the_list_are_refused():
    data = save(Image.fromarray(RGB), "ICO")
    with pytest.raises(BadRequest, match="accepted formats"):
        decode_image(data, 10**8)
    with pytest.raises(BadRequest):
        decode_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 10**8)


def test_pixel_limit_counts_width_times_height():
    data = save(Image.fromarray(RGB), "PNG")
    with pytest.raises(PayloadTooLarge):
        decode_image(data, 37 * 53 - 1)
    assert decode_image(data, 37 * 53).shape == (37, 53, 3)


def test_empty_is_bad_request():
    with pytest.raises(BadRequest):
        decode_image(b"", 10**8)


def test_the_accepted_formats_decoders_are_registered_before_the_first_request():
    """PIL would import its plugins on the first open, in the first request's time; the server does it at start."""
    import subprocess
    import sys

    code = (
        "from PIL import Image\n"
        "import immich_aio.imaging as im\n"
        "missing = [f for f in im.ACCEPTED_FORMATS if f not in Image.OPEN]\n"
        "assert not missing, missing\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _resize_cases():
    rng = np.random.default_rng(7)
    for mode, shape, size in [
        ("RGB", (1920, 1440, 3), (224, 298)),  # a portrait preview to CLIP's shorter side
        ("RGB", (1440, 1920, 3), (298, 224)),
        ("RGB", (1441, 1083, 3), (224, 224)),  # odd height, squashed (Chinese-CLIP)
        ("RGB", (1200, 1000, 3), (1500, 1800)),  # upscaled
        ("L", (1301, 999), (336, 437)),
    ]:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        pixels[: shape[0] // 3] //= 4  # some structure, not only noise
        yield Image.fromarray(pixels, mode), size


def test_resize_bicubic_is_pils_resize_pixel_for_pixel_with_its_row_pass_split(monkeypatch):
    from immich_aio import imaging

    passes = []
    row_pass = imaging._row_pass
    monkeypatch.setattr(imaging, "_row_pass", lambda *a: passes.append(a[1:3]) or row_pass(*a))
    for image, size in _resize_cases():
        passes.clear()
        got = imaging.resize_bicubic(image, size)
        assert got.size == size and got.mode == image.mode
        assert np.array_equal(np.asarray(got), np.asarray(image.resize(size, Image.Resampling.BICUBIC)))
        assert sorted(passes) == [(0, image.height // 2), (image.height // 2, image.height)]  # split in two
    assert not imaging._resize_helper_free.locked()


def test_resize_bicubic_resizes_alone_when_the_helper_is_busy_and_from_many_threads_at_once():
    import threading

    from immich_aio import imaging

    cases = list(_resize_cases())
    expected = [np.asarray(image.resize(size, Image.Resampling.BICUBIC)) for image, size in cases]
    assert imaging._resize_helper_free.acquire(timeout=30)  # another request's half is on the helper
    try:
        image, size = cases[0]
        assert np.array_equal(np.asarray(imaging.resize_bicubic(image, size)), expected[0])
    finally:
        imaging._resize_helper_free.release()
    results: dict[tuple[int, int], np.ndarray] = {}

    def worker(t: int) -> None:
        for i, (image, size) in enumerate(cases):
            results[(t, i)] = np.asarray(imaging.resize_bicubic(image, size))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert len(results) == 6 * len(cases)
    for (_, i), got in results.items():
        assert np.array_equal(got, expected[i])
    assert not imaging._resize_helper_free.locked()
