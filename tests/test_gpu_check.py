"""scripts/gpu_check.py's comparisons: a CUDA answer that differs from the CPU one must show (the GPU itself is
measured on a device, not tested here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import gpu_check


def _face(x1: float, vec: list[float]) -> dict:
    return {"boundingBox": {"x1": x1, "y1": 0.0, "x2": x1 + 10, "y2": 10.0}, "embedding": json.dumps(vec), "score": 0.9}


def test_clip_and_faces_compare_by_cosine_and_nearest_box():
    assert gpu_check.compare("clip", {"clip": "[1, 0]"}, {"clip": "[1, 0]"}) == {"min_cos": 1.0}
    assert gpu_check.compare("search", {"clip": "[1, 0]"}, {"clip": "[0, 1]"})["min_cos"] == 0.0
    cpu = {"facial-recognition": [_face(0, [1, 0]), _face(100, [0, 1])]}
    same = gpu_check.compare("face", {"facial-recognition": [_face(100, [0, 1]), _face(0, [1, 0])]}, cpu)
    assert same == {"count_diff": 0, "min_cos": 1.0, "box_px": 0.0}  # order does not matter
    off = gpu_check.compare("face", {"facial-recognition": [_face(3, [0, 1])]}, cpu)
    assert off == {"count_diff": 1, "min_cos": 0.0, "box_px": 3.0}


def test_ocr_counts_lines_alike_and_box_drift():
    cpu = {"text": ["a", "b"], "box": [0.1] * 16}
    gpu = {"text": ["a", "c"], "box": [0.1] * 8 + [0.102] * 8}
    d = gpu_check.compare("ocr", {"ocr": gpu}, {"ocr": cpu})
    assert (d["lines_same"], d["lines_gpu"], d["lines_cpu"]) == (1, 2, 2) and round(d["box_milli"], 3) == 2.0
    fewer = gpu_check.compare("ocr", {"ocr": {"text": ["a"], "box": [0.1] * 8}}, {"ocr": cpu})
    assert fewer["box_milli"] == float("inf") and fewer["lines_same"] == 1
