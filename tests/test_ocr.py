"""OCR end to end on committed fixtures of rendered Chinese + English text, and parity with RapidOCR."""

from __future__ import annotations

import copy
import json

import cv2
import numpy as np
import pytest
from conftest import FIXTURES, OCR_ENTRIES, predict, temp_settings

from immich_aio.models.ocr import detector_input_size, reading_order

TRUTH: dict[str, list[str]] = json.loads((FIXTURES / "ocr" / "truth.json").read_text())


def squeeze(s: str) -> str:
    return "".join(s.split())


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_accuracy(pred: str, truth: str) -> float:
    return max(0.0, 1 - edit_distance(pred, truth) / max(1, len(truth)))


@pytest.fixture(scope="module")
def results():
    """Every fixture through /predict once, with Immich's default options."""
    from starlette.testclient import TestClient

    from immich_aio.app import create_app

    with temp_settings() as settings, TestClient(create_app(settings)) as client:
        out = {}
        for name in TRUTH:
            r = predict(client, OCR_ENTRIES, image=(FIXTURES / "ocr" / name).read_bytes())
            assert r.status_code == 200, r.text
            out[name] = r.json()
        det_only = {}
        for name in TRUTH:
            entries = {"ocr": {"detection": OCR_ENTRIES["ocr"]["detection"]}}
            det_only[name] = predict(client, entries, image=(FIXTURES / "ocr" / name).read_bytes()).json()
        yield out, det_only


def test_character_accuracy_at_least_95_percent(results):
    out, _ = results
    scores = {}
    for name, lines in TRUTH.items():
        got = out[name]["ocr"]["text"]
        scores[name] = char_accuracy(squeeze("".join(got)), squeeze("".join(lines)))
    print(scores)
    assert np.mean(list(scores.values())) >= 0.95, scores
    assert min(scores.values()) >= 0.85, scores


def test_response_shape_and_boxes(results):
    out, _ = results
    for name, body in out.items():
        ocr = body["ocr"]
        n = len(ocr["text"])
        assert set(ocr) == {"text", "box", "boxScore", "textScore"}
        assert n == len(TRUTH[name]), (name, ocr["text"])
        assert len(ocr["box"]) == 8 * n and len(ocr["boxScore"]) == n and len(ocr["textScore"]) == n
        assert all(s > 0.8 for s in ocr["textScore"])
        w, h = body["imageWidth"], body["imageHeight"]
        boxes = np.array(ocr["box"]).reshape(n, 4, 2)
        assert (boxes[..., 0] >= 0).all() and (boxes[..., 0] <= (w - 1) / w + 1e-6).all()
        assert (boxes[..., 1] >= 0).all() and (boxes[..., 1] <= (h - 1) / h + 1e-6).all()
        # clockwise from top-left: TR right of TL, BL below TL, BR right of BL and below TR
        assert (boxes[:, 1, 0] > boxes[:, 0, 0]).all() and (boxes[:, 3, 1] > boxes[:, 0, 1]).all()
        assert (boxes[:, 2, 0] > boxes[:, 3, 0]).all() and (boxes[:, 2, 1] > boxes[:, 1, 1]).all()
        # reading order: top to bottom for these one-column layouts
        assert (np.diff(boxes[:, 0, 1]) > 0).all()


def test_each_box_score_belongs_to_its_box(results):
    out, det_only = results
    for name in TRUTH:
        det = det_only[name]["ocr"]
        w, h = out[name]["imageWidth"], out[name]["imageHeight"]
        det_boxes = np.array(det["boxes"], dtype=np.float32) / np.array([w, h], np.float32)
        ocr = out[name]["ocr"]
        for i, score in enumerate(ocr["boxScore"]):
            quad = np.array(ocr["box"][8 * i : 8 * i + 8]).reshape(4, 2)
            j = int(np.argmin(np.abs(det_boxes - quad).sum(axis=(1, 2))))
            assert np.allclose(det_boxes[j], quad, atol=1e-6)
            assert score == pytest.approx(det["scores"][j], abs=1e-5)


def test_recognition_min_score_is_strict(client):
    img = (FIXTURES / "ocr" / "sign.jpg").read_bytes()
    first = predict(client, OCR_ENTRIES, image=img).json()["ocr"]
    lowest = min(first["textScore"])
    entries = copy.deepcopy(OCR_ENTRIES)
    entries["ocr"]["recognition"]["options"]["minScore"] = lowest
    second = predict(client, entries, image=img).json()["ocr"]
    assert len(second["text"]) == len(first["text"]) - 1
    assert lowest not in second["textScore"]


def test_detection_min_score_filters(client):
    img = (FIXTURES / "ocr" / "receipt.jpg").read_bytes()
    entries = copy.deepcopy(OCR_ENTRIES)
    entries["ocr"]["detection"]["options"]["minScore"] = 1.0
    r = predict(client, entries, image=img)
    assert r.status_code == 200
    assert r.json()["ocr"] == {"text": [], "box": [], "boxScore": [], "textScore": []}


def test_blank_photo_is_empty_200(client):
    from conftest import encode

    img = encode(np.full((1440, 1920, 3), 128, np.uint8))
    r = predict(client, OCR_ENTRIES, image=img)
    assert r.status_code == 200
    assert r.json()["ocr"]["text"] == []


@pytest.mark.slow
def test_agrees_with_rapidocr_pipeline(results):
    """rapidocr's own RapidOCR() (bundled PP-OCRv6 small) reads the same lines at the same places."""
    from rapidocr import RapidOCR

    engine = RapidOCR(params={"Global.log_level": "error"})
    out, _ = results
    for name in TRUTH:
        bgr = cv2.imread(str(FIXTURES / "ocr" / name))  # an ndarray, never a string: no URL fetching
        ref = engine(bgr)
        ref_text = squeeze("".join(ref.txts or ()))
        ours = out[name]["ocr"]
        assert char_accuracy(squeeze("".join(ours["text"])), ref_text) >= 0.95, (ours["text"], ref.txts)
        assert len(ours["text"]) == len(ref.txts)
        h, w = bgr.shape[:2]
        for i, ref_box in enumerate(np.asarray(ref.boxes)):
            quad = np.array(ours["box"][8 * i : 8 * i + 8]).reshape(4, 2) * [w, h]
            assert iou(quad, ref_box) > 0.6, (name, i)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    ax0, ay0, ax1, ay1 = a[:, 0].min(), a[:, 1].min(), a[:, 0].max(), a[:, 1].max()
    bx0, by0, bx1, by1 = b[:, 0].min(), b[:, 1].min(), b[:, 0].max(), b[:, 1].max()
    iw, ih = max(0, min(ax1, bx1) - max(ax0, bx0)), max(0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    return inter / ((ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter)


def test_detector_never_upscales_and_rounds_to_32():
    assert detector_input_size(1440, 1920, 736, 2560) == (736, 992)
    assert detector_input_size(300, 800, 736, 2560) == (288, 800)
    assert detector_input_size(40, 40, 736, 2560) == (32, 32)
    assert detector_input_size(1440, 1920, 1, 2560) == (32, 32)


@pytest.mark.parametrize(("h", "w"), [(1600, 62500), (62500, 1600), (1440, 100_000), (30_000, 30_000)])
@pytest.mark.parametrize("max_res", [736, 100_000])
def test_detector_working_size_is_bounded_on_both_sides(h, w, max_res):
    """A thin panorama used to reach the detector at 736×28736 (+3.5 GB): now both sides are bounded."""
    in_h, in_w = detector_input_size(h, w, max_res, 2560)
    assert max(in_h, in_w) <= 2560 and min(in_h, in_w) >= 32
    assert in_h * in_w <= 2560 * 2560


def test_reading_order_lines_then_columns():
    def box(x, y):
        return [[x, y], [x + 50, y], [x + 50, y + 20], [x, y + 20]]

    boxes = np.array([box(300, 104), box(10, 100), box(10, 200), box(150, 95)], dtype=np.float32)
    assert reading_order(boxes).tolist() == [1, 3, 0, 2]
