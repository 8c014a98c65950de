"""What an operator sees (issue #8): every refusal logged once with its reason, one startup banner, an opt-in
access log, Prometheus metrics with bounded labels, and per-model TTLs."""

from __future__ import annotations

import json
import logging
import re
import time

import httpx
import numpy as np
import pytest
from cnclip_ref import install_tiny, tiny_model
from conftest import FIXTURES, OCR_ENTRIES, predict
from live import captured_logs, server_process
from prometheus_client.parser import text_string_to_metric_families

from immich_aio.store import ModelStore

PHOTO = (FIXTURES / "ocr" / "sign.jpg").read_bytes()


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=3)


def refusals(logs) -> list[logging.LogRecord]:
    return [r for r in logs.records if r.name == "immich_aio.edge" and r.levelno >= logging.WARNING]


def test_a_dimension_mismatch_is_logged_once_with_everything_an_operator_needs(store, make_client, tiny):
    """Immich asked for a 768-d name while only a 512-d model was installed: Immich logs only '400 Bad Request'."""
    install_tiny(ModelStore(store), tiny)
    client = make_client()
    with captured_logs() as logs:
        r = predict(client, {"clip": {"visual": {"modelName": "ViT-L-14__openai"}}}, image=PHOTO)
    assert r.status_code == 400
    [record] = refusals(logs)
    line = record.getMessage()
    assert record.levelno == logging.WARNING
    for part in ("POST /predict -> 400", "task='clip'", "type='visual'", "requested='ViT-L-14__openai'", "768-d"):
        assert part in line, line
    assert r.json()["detail"] in line  # the reason the client got


def test_an_alias_to_the_wrong_dimension_names_the_model_that_would_have_served(store, make_client, tiny):
    install_tiny(ModelStore(store), tiny)
    client = make_client(IMMICH_AIO_CLIP_ALIASES="ViT-L-14__openai=CN-CLIP-ViT-B-16")
    with captured_logs() as logs:
        assert predict(client, {"clip": {"textual": {"modelName": "ViT-L-14__openai"}}}, text="x").status_code == 400
    [record] = refusals(logs)
    assert "model='CN-CLIP-ViT-B-16'" in record.getMessage()


def test_server_errors_are_logged_once_at_error(client, store):
    from immich_aio.models.ocr import bundled_model_dir

    folder = store / "ocr" / "PP-OCRv5_mobile"
    (folder / "detection").mkdir(parents=True)
    (folder / "recognition").mkdir(parents=True)
    (folder / "detection" / "model.onnx").write_bytes(b"broken")
    (folder / "recognition" / "model.onnx").write_bytes((bundled_model_dir() / "PP-OCRv6_rec_small.onnx").read_bytes())
    with captured_logs() as logs:
        assert predict(client, OCR_ENTRIES, image=PHOTO).status_code == 500
    [record] = refusals(logs)
    assert record.levelno == logging.ERROR
    assert (
        "-> 500 task='ocr' type='detection'" in record.getMessage() and "model='PP-OCRv5_mobile'" in record.getMessage()
    )


@pytest.mark.slow
def test_one_banner_and_an_opt_in_access_log(store, tiny):
    install_tiny(ModelStore(store), tiny)
    with server_process(store, IMMICH_AIO_ACCESS_LOG="true") as (url, proc):
        httpx.get(url + "/ping")
        assert httpx.post(
            url + "/predict", data={"entries": json.dumps(OCR_ENTRIES)}, files={"image": PHOTO}
        ).is_success
        proc.terminate()
        out = proc.communicate(timeout=60)[0].decode()
    assert out.count("ONNX Runtime") == 1, out
    assert re.search(r"immich-aio \S+ on ONNX Runtime \S+, providers CPUExecutionProvider", out)
    assert "threads: " in out and "decode budget" in out and f"model store {store.resolve()}" in out
    assert re.search(r"clip: CN-CLIP-ViT-B-16 answers .*ViT-B-32__openai", out)
    assert "ocr: PP-OCRv6_small answers" in out
    assert re.search(r'"GET /ping" 200 \d+ ms', out) and re.search(r'"POST /predict" 200 \d+ ms', out)
    with server_process(store) as (url, proc):
        httpx.get(url + "/ping")
        proc.terminate()
        out = proc.communicate(timeout=60)[0].decode()
    assert '"GET /ping"' not in out  # off unless asked for


def _metrics(client) -> dict[str, list]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def test_metrics_cover_requests_latency_batches_queues_models_and_memory(store, make_client, tiny):
    install_tiny(ModelStore(store), tiny)
    client = make_client()
    assert predict(client, OCR_ENTRIES, image=PHOTO).status_code == 200
    assert predict(client, {"clip": {"textual": {"modelName": "ViT-B-32__openai"}}}, text="海边").status_code == 200
    bogus = {"clip": {"visual": {"modelName": "immich-app/" + "x" * 500 + "/no-such-model"}}}
    assert predict(client, bogus, image=PHOTO).status_code == 400
    m = _metrics(client)
    requests = {
        (s.labels["task"], s.labels["type"], s.labels["model"], s.labels["status"]): s.value
        for s in m["immich_aio_requests"]
        if s.name.endswith("_total")
    }
    assert requests[("ocr", "detection", "PP-OCRv6_small", "200")] == 1
    assert requests[("ocr", "recognition", "PP-OCRv6_small", "200")] == 1
    assert requests[("clip", "textual", "CN-CLIP-ViT-B-16", "200")] == 1
    assert requests[("clip", "visual", "", "400")] == 1
    assert "x" * 20 not in client.get("/metrics").text  # client strings never become labels
    latency = {s.labels["task"] for s in m["immich_aio_request_seconds"] if s.name.endswith("_count")}
    assert {"ocr", "clip"} <= latency
    batches = {s.labels["model"] for s in m["immich_aio_batch_size"] if s.name.endswith("_count")}
    assert {"PP-OCRv6_small-rec", "CN-CLIP-ViT-B-16-textual"} <= batches
    assert any(s.value >= 1 for s in m["immich_aio_run_gate_wait_seconds"] if s.name.endswith("_count"))
    loads = {(s.labels["event"], s.labels["model"]) for s in m["immich_aio_model_events"] if s.value}
    assert ("loaded", "PP-OCRv6_small") in loads and ("loaded", "CN-CLIP-ViT-B-16") in loads
    assert {s.labels["model"] for s in m["immich_aio_queue_depth"]} >= {"PP-OCRv6_small-rec"}
    assert m["process_resident_memory_bytes"][0].value > 10_000_000
    for name in (
        "immich_aio_requests_in_flight",
        "immich_aio_decode_budget_pixels_used",
        "immich_aio_run_gate_waiting",
    ):
        assert name in m


def test_load_failures_and_unloads_are_counted(make_client, store):
    folder = store / "ocr" / "PP-OCRv5_mobile"
    for t in ("detection", "recognition"):
        (folder / t).mkdir(parents=True)
        (folder / t / "model.onnx").write_bytes(b"broken")
    client = make_client(MACHINE_LEARNING_MODEL_TTL="0.2", MACHINE_LEARNING_MODEL_TTL_POLL_S="0.05")
    assert predict(client, OCR_ENTRIES, image=PHOTO).status_code == 500
    entries = {"ocr": {t: {**v, "modelName": "PP-OCRv6_small"} for t, v in OCR_ENTRIES["ocr"].items()}}
    assert predict(client, entries, image=PHOTO).status_code == 200
    deadline = time.monotonic() + 10
    while client.app.state.runtime.registry.loaded() and time.monotonic() < deadline:
        time.sleep(0.05)
    events = {
        (s.labels["event"], s.labels["type"], s.labels["model"])
        for s in _metrics(client)["immich_aio_model_events"]
        if s.value
    }
    assert ("load_failed", "detection", "PP-OCRv5_mobile") in events
    assert ("unloaded", "detection", "PP-OCRv6_small") in events


@pytest.mark.slow
def test_per_model_ttl_keeps_the_search_encoder_warm_while_the_rest_unloads(store, make_client, tiny):
    install_tiny(ModelStore(store), tiny)
    client = make_client(
        MACHINE_LEARNING_MODEL_TTL="0.3",
        MACHINE_LEARNING_MODEL_TTL__CLIP__TEXTUAL="0",
        MACHINE_LEARNING_MODEL_TTL_POLL_S="0.05",
    )
    assert predict(client, {"clip": {"visual": {"modelName": "ViT-B-32__openai"}}}, image=PHOTO).status_code == 200
    assert predict(client, {"clip": {"textual": {"modelName": "ViT-B-32__openai"}}}, text="猫").status_code == 200
    assert predict(client, OCR_ENTRIES, image=PHOTO).status_code == 200

    def loaded() -> set[tuple[str, str]]:
        return {(m["task"], m["type"]) for m in client.get("/info").json()["models"]}

    deadline = time.monotonic() + 10
    while loaded() != {("clip", "textual")} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loaded() == {("clip", "textual")}
    time.sleep(1.0)  # far past the default TTL: the search encoder stays
    assert loaded() == {("clip", "textual")}
    ttl = {m["type"]: m["ttlSeconds"] for m in client.get("/info").json()["models"]}
    assert ttl == {"textual": 0}
    np.testing.assert_equal(client.get("/ping").text, "pong")


def test_the_banner_and_info_say_which_face_pack_answers(store):
    """An installed pack is named as such, not 'no model installed' (issue 18)."""
    from face_models import make_arcface, make_scrfd
    from starlette.testclient import TestClient

    from immich_aio.app import create_app
    from immich_aio.reporting import banner as banner_of
    from immich_aio.runtime import Runtime

    make_scrfd(store / "facial-recognition" / "buffalo_l" / "detection" / "model.onnx")
    make_arcface(store / "facial-recognition" / "buffalo_l" / "recognition" / "model.onnx")
    make_scrfd(store / "facial-recognition" / "antelopev2" / "detection" / "model.onnx")  # half a pack
    from conftest import settings_for

    settings = settings_for(store)
    banner = banner_of(Runtime(settings))
    assert "facial-recognition: buffalo_l answers buffalo_l (its own files)" in banner
    assert "antelopev2" not in banner and "facial-recognition: no model installed" not in banner
    with TestClient(create_app(settings)) as client:
        info = client.get("/info").json()
    assert info["answers"]["facial-recognition"] == {"buffalo_l": {"servedBy": "buffalo_l", "why": "its own files"}}
    files = info["servedFiles"]["facial-recognition"]["buffalo_l"]
    assert files["detection"]["path"] == "facial-recognition/buffalo_l/detection/model.onnx"
