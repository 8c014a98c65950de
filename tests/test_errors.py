"""Every /predict error: right status, a JSON detail that says what is accepted, server keeps serving."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from conftest import OCR_ENTRIES, encode, predict

IMG = encode(np.full((64, 64, 3), 200, np.uint8))


def assert_detail(r, status: int, *words: str):
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    for w in words:
        assert w in detail, detail


def test_missing_entries_is_422(client):
    r = client.post("/predict", files={"image": ("blob", IMG, "application/octet-stream")})
    assert_detail(r, 422, "entries")


@pytest.mark.parametrize(
    "entries",
    [
        "not json",
        "[]",
        "{}",
        '{"ocr": []}',
        '{"ocr": {"detection": "x"}}',
        '{"ocr": {"detection": {"options": {}}}}',
        '{"ocr": {"detection": {"modelName": 5}}}',
        '{"ocr": {"detection": {"modelName": "PP-OCRv5_mobile", "options": [1]}}}',
    ],
)
def test_malformed_entries_is_422(client, entries):
    assert_detail(predict(client, entries, image=IMG), 422)


def test_neither_image_nor_text_is_400(client):
    r = client.post("/predict", data={"entries": json.dumps(OCR_ENTRIES)})
    assert_detail(r, 400, "Either image or text must be provided")


def test_text_for_image_task_is_400(client):
    assert_detail(predict(client, OCR_ENTRIES, text="hello"), 400, "image")


def test_unknown_task_type_and_model_are_400_naming_known(client):
    r = predict(client, {"pets": {"detection": {"modelName": "x"}}}, image=IMG)
    assert_detail(r, 400, "pets", "clip", "facial-recognition", "ocr")
    r = predict(client, {"ocr": {"pipeline": {"modelName": "x"}}}, image=IMG)
    assert_detail(r, 400, "pipeline", "for task 'ocr'", "detection", "recognition")  # the wire name, not an enum
    entries = {"ocr": {"detection": {"modelName": "no-such-ocr"}, "recognition": {"modelName": "no-such-ocr"}}}
    assert_detail(predict(client, entries, image=IMG), 400, "no-such-ocr", "PP-OCRv5_mobile", "PP-OCRv6_small")


def test_recognition_without_detection_is_400(client):
    r = predict(client, {"facial-recognition": {"recognition": {"modelName": "buffalo_l"}}}, image=IMG)
    assert_detail(r, 400, "depends on", "detection")
    # OCR recognition alone is the OCR fork of Immich's request (tests/test_mt_photos.py): answered, its way
    r = predict(client, {"ocr": {"recognition": {"modelName": "PP-OCRv5_mobile"}}}, image=IMG)
    assert r.status_code == 200 and r.json()["ocr"] == ""


@pytest.mark.parametrize("name", ["../../etc/passwd", "..", "a/..", "x\\..\\..", "", "...", "名字"])
def test_hostile_model_names_are_400(client, name):
    entries = {"ocr": {"detection": {"modelName": name}, "recognition": {"modelName": name}}}
    r = predict(client, entries, image=IMG)
    assert r.status_code in (400, 422), r.text


@pytest.mark.parametrize("data", [b"garbage bytes", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, IMG[: len(IMG) // 3]])
def test_undecodable_image_is_400(client, data):
    assert_detail(predict(client, OCR_ENTRIES, image=data), 400, "JPEG", "WebP")
    assert client.get("/ping").status_code == 200


def test_option_out_of_range_is_400(client):
    entries = json.loads(json.dumps(OCR_ENTRIES))
    entries["ocr"]["detection"]["options"]["minScore"] = "high"
    assert_detail(predict(client, entries, image=IMG), 400, "minScore")


def test_unknown_options_are_ignored(client):
    entries = json.loads(json.dumps(OCR_ENTRIES))
    entries["ocr"]["recognition"]["options"]["someFutureOption"] = 1
    assert predict(client, entries, image=IMG).status_code == 200


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_pixel_bomb_is_413_before_decoding(client):
    # 60000 x 60000 RGB would need ~10 GB if decoded; the header check refuses it first.
    r = predict(client, OCR_ENTRIES, image=_png_header_only(60000, 60000))
    assert_detail(r, 413, "3600000000", "IMMICH_AIO_MAX_PIXELS")
    assert client.get("/ping").status_code == 200


def test_max_pixels_is_configurable(make_client):
    client = make_client(IMMICH_AIO_MAX_PIXELS="4000")
    assert_detail(predict(client, OCR_ENTRIES, image=IMG), 413, "4096")
    assert predict(client, OCR_ENTRIES, image=encode(np.zeros((60, 60, 3), np.uint8))).status_code == 200


def test_upload_over_limit_is_413(make_client):
    client = make_client(IMMICH_AIO_MAX_UPLOAD_MB="1")
    big = np.random.default_rng(0).integers(0, 255, (1200, 1200, 3), dtype=np.uint8)
    data = encode(big, "PNG")
    assert len(data) > 3 * 1024 * 1024
    assert_detail(predict(client, OCR_ENTRIES, image=data), 413, "IMMICH_AIO_MAX_UPLOAD_MB")
    assert client.get("/ping").text == "pong"


def test_zero_size_and_tiny_images_are_empty_not_errors(client):
    tiny = encode(np.zeros((10, 20, 3), np.uint8), "PNG")
    r = predict(client, OCR_ENTRIES, image=tiny)
    assert r.status_code == 200
    assert r.json() == {
        "ocr": {"text": [], "box": [], "boxScore": [], "textScore": []},
        "imageHeight": 10,
        "imageWidth": 20,
    }


def test_broken_model_file_is_500_and_next_request_retries(client, store):
    from immich_aio.models.ocr import bundled_model_dir

    det = store / "ocr" / "PP-OCRv5_mobile" / "detection" / "model.onnx"
    rec = store / "ocr" / "PP-OCRv5_mobile" / "recognition" / "model.onnx"
    det.parent.mkdir(parents=True)
    rec.parent.mkdir(parents=True)
    det.write_bytes(b"this is not an onnx file")
    rec.write_bytes((bundled_model_dir() / "PP-OCRv6_rec_small.onnx").read_bytes())
    r = predict(client, OCR_ENTRIES, image=IMG)
    assert_detail(r, 500, "Failed to load model", "PP-OCRv5_mobile")
    assert client.get("/ping").status_code == 200
    # The user fixes the file; the very next request loads it (no failure is cached).
    det.write_bytes((bundled_model_dir() / "PP-OCRv6_det_small.onnx").read_bytes())
    r = predict(client, OCR_ENTRIES, image=IMG)
    assert r.status_code == 200, r.text
    names = {(m["type"], m["name"]) for m in client.get("/info").json()["models"]}
    assert ("detection", "PP-OCRv5_mobile") in names
    assert ("recognition", "PP-OCRv5_mobile") in names


def test_non_multipart_body_is_400(client):
    r = client.post("/predict", content=b'{"entries": 1}', headers={"content-type": "application/json"})
    assert_detail(r, 400, "multipart/form-data")


def _formats() -> dict[str, bytes]:
    import io

    from PIL import Image

    rgb = np.random.default_rng(3).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    out = {}
    for fmt, kw in [
        ("JPEG", {}),
        ("PNG", {}),
        ("WEBP", {}),
        ("GIF", {}),
        ("BMP", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
    ]:
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format=fmt, **kw)
        out[fmt] = buf.getvalue()
    return out


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_truncated_and_corrupted_images_are_400_never_500(client, fmt):
    data = _formats()[fmt]
    rng = np.random.default_rng(len(fmt))
    variants = [data[:n] for n in (8, 16, 40, len(data) // 2, len(data) - 3)]
    for _ in range(4):  # flip bytes after the signature
        broken = bytearray(data)
        for i in rng.integers(12, len(data), 8):
            broken[i] ^= 0xFF
        variants.append(bytes(broken))
    for v in variants:
        r = predict(client, OCR_ENTRIES, image=v)
        assert r.status_code in (200, 400), (fmt, len(v), r.text)
        if r.status_code == 400:
            assert "image" in r.json()["detail"].lower()
    assert client.get("/ping").text == "pong"
