"""Lazy single-flight loading, TTL unload that frees the session, preload, retry after failure."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from conftest import OCR_ENTRIES, encode, predict

from immich_aio.errors import ModelLoadError
from immich_aio.models.base import Model, ModelSpec
from immich_aio.registry import ModelRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeSession:
    """Stands in for an ONNX Runtime session; unlike `object()` it can be weakly referenced."""


class FakeModel(Model):
    task, type = "ocr", "detection"
    builds = 0
    fail_next = 0

    def load(self) -> None:
        time.sleep(0.05)  # long enough for concurrent callers to pile up
        if FakeModel.fail_next:
            FakeModel.fail_next -= 1
            raise RuntimeError("corrupt file")
        self.session = FakeSession()

    def predict(self, payload, options):
        return None


def spec(name="m") -> ModelSpec:
    def build():
        FakeModel.builds += 1
        return FakeModel(name, {}, None)  # type: ignore[arg-type]

    return ModelSpec("ocr", "detection", name, build, requested=name)


@pytest.fixture(autouse=True)
def _reset():
    FakeModel.builds = 0
    FakeModel.fail_next = 0


def test_concurrent_first_use_loads_once():
    reg = ModelRegistry({}, 300)
    s = spec()
    results = []
    threads = [threading.Thread(target=lambda: results.append(reg.load(s))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert FakeModel.builds == 1
    assert all(r is results[0] for r in results)


def test_ttl_unload_drops_the_session():
    clock = Clock()
    reg = ModelRegistry({}, 10, clock=clock)
    model = reg.load(spec())
    session_ref = weakref.ref(model.session)
    model_ref = weakref.ref(model)
    del model
    clock.now += 5
    assert reg.reap() == []
    clock.now += 6
    assert reg.reap() == [("ocr", "detection", "m")]
    gc.collect()
    assert model_ref() is None
    assert session_ref() is None
    assert reg.loaded() == []
    reg.load(spec())
    assert FakeModel.builds == 2  # loads again on next use


def test_model_in_use_is_not_unloaded():
    clock = Clock()
    reg = ModelRegistry({}, 10, clock=clock)
    with reg.use(spec()):
        clock.now += 100
        assert reg.reap() == []
    clock.now += 11
    assert len(reg.reap()) == 1


def test_pinned_models_never_expire_and_ttl_zero_disables():
    clock = Clock()
    reg = ModelRegistry({}, 10, clock=clock)
    reg.load(spec("p"), pin=True)
    clock.now += 10_000
    assert reg.reap() == []
    reg0 = ModelRegistry({}, 0, clock=clock)
    reg0.load(spec())
    clock.now += 10_000
    assert reg0.reap() == []


def test_failed_load_is_not_cached():
    reg = ModelRegistry({}, 300)
    FakeModel.fail_next = 1
    with pytest.raises(ModelLoadError, match="corrupt file"):
        reg.load(spec())
    assert reg.load(spec()) is not None
    assert FakeModel.builds == 2


def test_real_ttl_unload_frees_ort_session(make_client):
    """Through the server: after the TTL the OCR sessions are gone (weakly referenced) and /info is empty."""
    # No TTL while the request runs (however long the loads take), a short one once both models are in.
    client = make_client(MACHINE_LEARNING_MODEL_TTL="0", MACHINE_LEARNING_MODEL_TTL_POLL_S="0.1")
    img = encode(__import__("numpy").full((64, 64, 3), 255, "uint8"))
    assert predict(client, OCR_ENTRIES, image=img).status_code == 200
    runtime = client.app.state.runtime
    refs = [weakref.ref(e.model.session) for e in runtime.registry.loaded()]
    assert len(refs) == 2 and all(r() is not None for r in refs)
    runtime.registry._ttl_for = lambda task, type_: 0.2
    # The reaper empties the slot before it closes the model: wait for both (a session kept past this is a leak).
    deadline = time.monotonic() + 10
    while (runtime.registry.loaded() or any(r() is not None for r in refs)) and time.monotonic() < deadline:
        time.sleep(0.05)
        gc.collect()
    assert runtime.registry.loaded() == []
    assert all(r() is None for r in refs), "ONNX Runtime sessions still referenced after unload"
    assert client.get("/info").json()["models"] == []
    assert predict(client, OCR_ENTRIES, image=img).status_code == 200  # and loads again


def test_preload_pins_models(make_client, store: Path):
    client = make_client(
        MACHINE_LEARNING_PRELOAD__OCR__DETECTION="PP-OCRv5_mobile",
        MACHINE_LEARNING_PRELOAD__OCR__RECOGNITION="PP-OCRv5_mobile,does-not-exist",
        MACHINE_LEARNING_MODEL_TTL="0.1",
        MACHINE_LEARNING_MODEL_TTL_POLL_S="0.05",
    )
    assert client.get("/ping").text == "pong"  # answered while preloading goes on in the background
    deadline = time.monotonic() + 30
    while len(client.get("/info").json()["models"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.4)  # several TTLs: preloaded models must not expire
    models = client.get("/info").json()["models"]
    assert {(m["type"], m["preloaded"]) for m in models} == {("detection", True), ("recognition", True)}
    assert client.get("/ping").text == "pong"  # a failed preload is logged, the server still serves


def test_ping_answers_while_a_model_is_loading(make_client, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from immich_aio.models.ocr import OcrDetector

    release, loading = threading.Event(), threading.Event()
    real_load = OcrDetector.load

    def slow_load(self):
        loading.set()
        assert release.wait(60)
        real_load(self)

    monkeypatch.setattr(OcrDetector, "load", slow_load)
    client = make_client()
    img = encode(__import__("numpy").full((64, 64, 3), 255, "uint8"))
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(predict, client, OCR_ENTRIES, img)
        assert loading.wait(30)
        assert client.get("/ping").text == "pong"  # the load is still blocked
        assert not pending.done()
        release.set()
        assert pending.result(60).status_code == 200


class TwoStageModel(Model):
    """A detector or recogniser whose load can wait for the other's (events shared through `stage`)."""

    task = "facial-recognition"
    stage: ClassVar[dict] = {}

    def load(self) -> None:
        st = TwoStageModel.stage
        st["loads"].append(self.type)
        if self.type == "recognition":
            st["rec_loading"].set()
            if st.get("rec_fails"):
                raise RuntimeError("truncated file")
        else:  # the detector's load outlasts the start of the recogniser's only if that is loaded ahead
            st["det_saw_rec_loading"] = st["rec_loading"].wait(timeout=5)
        self.session = FakeSession()

    def predict(self, payload, options):
        return self.type


def _two_stage_request(reg: ModelRegistry):
    from immich_aio.imaging import PixelBudget
    from immich_aio.jobs import Job
    from immich_aio.payload import Payload
    from immich_aio.pipeline import Engine, _run_entries
    from immich_aio.protocol import Entry
    from immich_aio.tasks import ModelType, Task

    def spec_for(type_):
        model = type("M", (TwoStageModel,), {"type": type_})
        return ModelSpec("facial-recognition", type_, "buffalo_l", lambda: model("buffalo_l", {}, None))

    entries = [
        Entry(Task("facial-recognition"), ModelType("detection"), "buffalo_l"),
        Entry(Task("facial-recognition"), ModelType("recognition"), "buffalo_l"),
    ]
    engine = Engine(reg, PixelBudget(1 << 24, 1.0), 1 << 24)
    return _run_entries(engine, entries, [spec_for("detection"), spec_for("recognition")], Payload(Job()))


def test_a_requests_later_model_loads_while_its_first_one_loads():
    TwoStageModel.stage = {"loads": [], "rec_loading": threading.Event()}
    reg = ModelRegistry({}, 300)
    try:
        result = _two_stage_request(reg)
    finally:
        reg.close()
    assert TwoStageModel.stage["det_saw_rec_loading"] is True
    assert sorted(TwoStageModel.stage["loads"]) == ["detection", "recognition"]
    assert result.body == {"facial-recognition": "recognition"}
    assert len(reg.loaded()) == 2
    assert reg._ahead == {}  # nothing is kept once the load is done


def test_a_model_loaded_ahead_that_fails_is_reported_once_for_its_entry():
    TwoStageModel.stage = {"loads": [], "rec_loading": threading.Event(), "rec_fails": True}
    reg = ModelRegistry({}, 300)
    try:
        with pytest.raises(ModelLoadError, match="truncated file") as err:
            _two_stage_request(reg)
    finally:
        reg.close()
    assert err.value.type == "recognition"
    assert TwoStageModel.stage["loads"].count("recognition") == 1  # not tried again by the request


def test_a_load_ahead_cancelled_by_a_stop_leaves_the_request_to_load_it(monkeypatch):
    from concurrent.futures import Future

    TwoStageModel.stage = {"loads": [], "rec_loading": threading.Event()}
    TwoStageModel.stage["rec_loading"].set()  # the detector's load does not wait here
    reg = ModelRegistry({}, 300)

    def cancelled(spec):
        f: Future = Future()
        f.cancel()
        return f

    monkeypatch.setattr(reg, "load_ahead", cancelled)
    result = _two_stage_request(reg)
    assert result.body == {"facial-recognition": "recognition"}
    assert TwoStageModel.stage["loads"] == ["detection", "recognition"]


def test_load_ahead_is_one_load_per_model_and_none_once_loaded():
    release = threading.Event()

    class Held(FakeModel):
        def load(self) -> None:
            release.wait(timeout=10)
            self.session = FakeSession()

    s = ModelSpec("ocr", "detection", "m", lambda: Held("m", {}, None))  # type: ignore[arg-type]
    reg = ModelRegistry({}, 300)
    try:
        first, second = reg.load_ahead(s), reg.load_ahead(s)  # the first is still loading: held until released
        assert first is not None and first is second
        release.set()
        model = first.result(timeout=10)
        assert reg.load_ahead(s) is None
        assert reg.load(s) is model
        assert reg._ahead == {}
    finally:
        release.set()
        reg.close()


class DecodeWatcher(Model):
    """A model whose load waits (up to 5 s) for its request's photo to be decoded, and records whether it was."""

    task, type = "clip", "visual"
    seen: ClassVar[dict] = {}

    def load(self) -> None:
        seen = DecodeWatcher.seen
        seen["decoded_while_loading"] = seen["decoded"].wait(timeout=seen.get("wait", 5))
        self.session = FakeSession()

    def predict(self, payload, options):
        return payload.pil(224).size


def _image_request(reg: ModelRegistry, may_reduce: bool, second: bool = False):
    from PIL import Image

    from immich_aio.imaging import PixelBudget
    from immich_aio.jobs import Job
    from immich_aio.payload import Payload
    from immich_aio.pipeline import Engine, _run_entries
    from immich_aio.protocol import Entry
    from immich_aio.tasks import ModelType, Task

    asked: list[int | None] = []

    def decoder(min_side):
        asked.append(min_side)
        DecodeWatcher.seen["decoded"].set()
        return Image.new("RGB", (640, 480)), lambda: None

    entries = [Entry(Task("clip"), ModelType("visual"), "ViT-B-32__openai")]
    specs = [ModelSpec("clip", "visual", "ViT-B-32__openai", lambda: DecodeWatcher("ViT-B-32__openai", {}, None))]
    if second:  # a second model to load: both cores are taken by the two loads
        entries.append(Entry(Task("ocr"), ModelType("detection"), "PP-OCRv5_mobile"))
        specs.append(spec("PP-OCRv5_mobile"))
    payload = Payload(Job(), size=(480, 640), decoder=decoder, may_reduce=may_reduce)
    engine = Engine(reg, PixelBudget(1 << 24, 1.0), 1 << 24)
    return _run_entries(engine, entries, specs, payload), asked


def test_a_first_request_decodes_its_photo_while_its_model_loads():
    """Issue 19: the decode (12-21 ms of a first request) no longer waits behind the model's load."""
    DecodeWatcher.seen = {"decoded": threading.Event()}
    reg = ModelRegistry({}, 300)
    try:
        result, asked = _image_request(reg, may_reduce=False)
        assert DecodeWatcher.seen["decoded_while_loading"] is True
        assert asked == [None] and result.body["clip"] == (640, 480)  # decoded once, at full size
        assert reg._ahead == {}
        DecodeWatcher.seen = {"decoded": threading.Event()}  # loaded now: nothing to load ahead of the decode
        _result, asked = _image_request(reg, may_reduce=False)
        assert asked == [None] and "decoded_while_loading" not in DecodeWatcher.seen
    finally:
        reg.close()


def test_a_reduced_decode_waits_for_the_model_that_knows_its_size():
    DecodeWatcher.seen = {"decoded": threading.Event()}
    reg = ModelRegistry({}, 300)
    try:
        DecodeWatcher.seen["decoded"].set()  # the load does not wait here
        _result, asked = _image_request(reg, may_reduce=True)
    finally:
        reg.close()
    assert asked == [224]  # the model's own size, not a full decode done ahead


def test_a_request_loading_two_models_leaves_its_decode_to_its_first_model():
    DecodeWatcher.seen = {"decoded": threading.Event(), "wait": 0.3}
    reg = ModelRegistry({}, 300)
    try:
        _result, asked = _image_request(reg, may_reduce=False, second=True)
    finally:
        reg.close()
    assert DecodeWatcher.seen["decoded_while_loading"] is False and asked == [None]


@pytest.mark.parametrize("reduced", [False, True])
def test_a_clip_request_may_decode_reduced_only_where_that_is_allowed(monkeypatch, reduced):
    """With IMMICH_AIO_CLIP_REDUCED_DECODE off (the default) a CLIP-only request's decode is a full one, known
    before its model loads, so it can be done while the model loads; on, the model picks the size."""
    from immich_aio import pipeline
    from immich_aio.imaging import PixelBudget
    from immich_aio.jobs import Job
    from immich_aio.protocol import Entry
    from immich_aio.tasks import ModelType, Task

    seen = []
    monkeypatch.setattr(pipeline, "resolve", lambda engine, entries: [spec()])

    def entries_run(_engine, _entries, _specs, payload):
        seen.append((payload.may_reduce, payload.full_decode_pending))

    monkeypatch.setattr(pipeline, "_run_entries", entries_run)
    reg = ModelRegistry({}, 300)
    try:
        engine = pipeline.Engine(reg, PixelBudget(1 << 24, 1.0), 1 << 24, clip_reduced_decode=reduced)
        entries = [Entry(Task("clip"), ModelType("visual"), "ViT-B-32__openai")]
        pipeline.run(engine, Job(), entries, encode(np.zeros((64, 64, 3), np.uint8)), None)
    finally:
        reg.close()
    assert seen == [(reduced, not reduced)]
