"""What a run holds in memory beyond its model: no planned block per input shape on the CPU, a detector's float input
made only once its run has a slot, and runs that need much memory one at a time when a backlog splits the slots."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from conftest import OCR_ENTRIES, SIGN, loaded_model, predict, runs_waiting, split_ocr_server, wait_for
from face_models import BareRecognizer, make_arcface

from immich_aio.config import Settings
from immich_aio.jobs import Job
from immich_aio.models.base import Model
from immich_aio.models.faces import FaceDetector, letterbox
from immich_aio.models.ocr import detector_blob
from immich_aio.sessions import SessionFactory


def test_cpu_sessions_plan_no_memory_block_per_shape():
    f = SessionFactory(Settings.from_env({}))
    assert f.cpu_only
    assert f.options().enable_mem_pattern is False
    assert f.options(threads=1).enable_mem_pattern is False  # the narrow sessions too


def test_a_run_makes_its_inputs_only_once_it_has_its_slot(tmp_path):
    f = SessionFactory(Settings.from_env({"MACHINE_LEARNING_CACHE_FOLDER": str(tmp_path), "IMMICH_AIO_ORT_CACHE": "0"}))
    model = BareRecognizer("buffalo_l", {"model": make_arcface(tmp_path / "model.onnx")}, f)
    model.load()
    made = threading.Event()

    def feeds() -> dict[str, np.ndarray]:
        made.set()
        return {"input.1": np.zeros((2, 3, 112, 112), np.float32)}

    held = f.gate.acquire()  # another run holds the whole slot
    out: list[list[np.ndarray]] = []
    runner = threading.Thread(target=lambda: out.append(model.run(feeds, Job())), daemon=True)
    runner.start()
    wait_for(lambda: f.gate.waiting == 1, "the run waiting for its slot")
    assert not made.is_set()  # no input exists while it waits
    f.gate.release(held)
    runner.join(30)
    assert made.is_set() and out and out[0][0].shape == (2, 512)


def test_the_detectors_inputs_are_the_reference_normalisations_bit_for_bit():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (480, 700, 3), dtype=np.uint8)
    planes, scale = FaceDetector.prepare(photo)
    assert planes.dtype == np.uint8 and planes.shape == (3, 640, 640)  # a quarter of the float input while it waits
    canvas, ref_scale = letterbox(photo)
    ref = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]  # SCRFD's (x - 127.5) / 128
    blob = FaceDetector.blob(planes)
    assert scale == ref_scale and blob.flags.c_contiguous
    np.testing.assert_array_equal(blob, ref)
    bgr = rng.integers(0, 256, (736, 992, 3), dtype=np.uint8)
    ref = ((bgr.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None]  # PP-OCR's detector input
    blob = detector_blob(np.ascontiguousarray(bgr.transpose(2, 0, 1)))
    assert blob.flags.c_contiguous
    np.testing.assert_array_equal(blob, ref)


def test_under_a_backlog_ocr_detections_run_one_at_a_time_beside_other_runs(make_client):
    """Two OCR detections at once would hold two detectors' intermediate tensors (85-115 MB each at 736 px)."""
    client, runtime, lone = split_ocr_server(make_client)
    gate = runtime.factory.gate
    det, rec = loaded_model(runtime, "detection", "ocr"), loaded_model(runtime, "recognition", "ocr")
    lock = threading.Lock()
    running = {"det": 0, "rec": 0}
    most = {"det": 0, "rec": 0}

    def counting(model: Model, kind: str):
        infer = model.infer

        def wrapped(feeds):
            with lock:
                running[kind] += 1
                most[kind] = max(most[kind], running[kind])
            time.sleep(0.15)  # long enough for another run to start beside it, if it may
            try:
                return infer(feeds)
            finally:
                with lock:
                    running[kind] -= 1

        return wrapped

    det.infer, rec.infer = counting(det, "det"), counting(rec, "rec")
    held = gate.acquire()  # another run holds the slot while a backlog gathers behind it
    with ThreadPoolExecutor(6) as pool:
        pending = [pool.submit(predict, client, OCR_ENTRIES, image=SIGN) for _ in range(6)]
        try:
            # at least two detections waiting (as many as the decode budget lets in): at the gate or for their turn
            wait_for(lambda: runs_waiting(runtime, det) >= 2, "a backlog", 30)
        finally:
            gate.release(held)
        answers = [p.result(60) for p in pending]
    assert all(a.status_code == 200 and a.json()["ocr"] == lone.json()["ocr"] for a in answers)
    assert most["det"] == 1  # never two detections at once
