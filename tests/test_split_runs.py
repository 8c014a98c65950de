"""IMMICH_AIO_SPLIT_RUNS: a lone run gets every thread of its slot; under a backlog the slot runs two runs of half
the threads each, on a second session per model that answers exactly as the first."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import OCR_ENTRIES, SIGN, loaded_model, predict, split_ocr_server, wait_for
from face_models import BareRecognizer, make_arcface

from immich_aio import mapped_load
from immich_aio.batching import Batcher, BatchPolicy, RunGate, narrow_run
from immich_aio.config import Settings
from immich_aio.jobs import Job
from immich_aio.models.base import Model
from immich_aio.models.faces import FaceRecognizer
from immich_aio.sessions import SessionFactory


class Holder:
    """A thread that takes a run's turn at the gate, says how it was granted and holds it until told."""

    def __init__(self, gate: RunGate, job: Job | None = None) -> None:
        self.granted = threading.Event()
        self.done = threading.Event()
        self.narrow: bool | None = None
        self.widened: bool | None = None
        self.widen_now = threading.Event()
        self.gate, self.job = gate, job or Job()
        self.thread = threading.Thread(target=self._hold, daemon=True)
        self.thread.start()

    def _hold(self) -> None:
        with self.gate.slot(self.job) as widen:
            self.narrow = narrow_run()
            self.granted.set()
            if self.widen_now.wait(30) and not self.done.is_set():
                widen()
                self.widened = not narrow_run()
            self.done.wait(30)

    def let_go(self) -> None:
        self.done.set()
        self.widen_now.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


def two_narrow(gate: RunGate) -> tuple[Holder, Holder]:
    """Two runs granted narrow: they wait behind a wide one, then get half the slot each."""
    blocker = Holder(gate)
    assert blocker.granted.wait(10)
    a, b = Holder(gate), Holder(gate)
    wait_for(lambda: gate.waiting == 2, "two runs waiting")
    blocker.let_go()
    assert a.granted.wait(10) and b.granted.wait(10) and a.narrow and b.narrow
    return a, b


def test_a_lone_run_is_wide_and_a_backlog_splits_the_slot():
    gate = RunGate(1, split=2)
    first = Holder(gate)
    assert first.granted.wait(10) and first.narrow is False  # nobody else: every thread
    second, third = Holder(gate), Holder(gate)
    wait_for(lambda: gate.waiting == 2, "two runs waiting behind the wide one")
    assert not second.granted.is_set()
    first.let_go()
    # both waiting runs go at once, each on half the slot
    assert second.granted.wait(10) and third.granted.wait(10)
    assert (second.narrow, third.narrow) == (True, True)
    fourth = Holder(gate)
    wait_for(lambda: gate.waiting == 1, "a third run waiting: the slot is full")
    assert not fourth.granted.wait(0.2)
    second.let_go()
    assert fourth.granted.wait(10) and fourth.narrow is True  # half a slot was free: it goes at once, narrow
    third.let_go()
    fourth.let_go()
    assert (gate.wide_grants, gate.narrow_grants) == (1, 3)
    again = Holder(gate)
    assert again.granted.wait(10) and again.narrow is False  # the backlog gone, a run is wide again
    again.let_go()
    assert gate._free == gate.runs  # every part came back


def test_a_narrow_run_widens_when_the_backlog_is_gone_and_returns_what_it_took():
    gate = RunGate(1, split=2)
    a, b = two_narrow(gate)
    a.widen_now.set()  # the other half is busy: it stays narrow
    wait_for(lambda: a.widened is not None, "a's widen")
    assert a.widened is False
    b.let_go()
    c = Holder(gate)
    assert c.granted.wait(10) and c.narrow is True  # took the half b left
    c.let_go()
    a2 = Holder(gate)  # a still holds its half; nothing waits, the other half is free
    assert a2.granted.wait(10) and a2.narrow is True
    a2.let_go()
    a.let_go()
    assert gate._free == gate.runs
    d, e = Holder(gate), Holder(gate)  # d wide at once, e waits
    assert d.granted.wait(10) and d.narrow is False
    wait_for(lambda: gate.waiting == 1, "e waiting")
    d.let_go()
    assert e.granted.wait(10) and e.narrow is False  # alone in line when the whole slot came back
    e.let_go()
    # a narrow holder whose partner left widens for its next run, and gives the whole slot back after
    f, g = two_narrow(gate)
    g.let_go()
    f.widen_now.set()
    wait_for(lambda: f.widened is not None, "f's widen")
    assert f.widened is True
    h = Holder(gate)
    wait_for(lambda: gate.waiting == 1, "h waits: f holds the whole slot now")
    f.let_go()
    assert h.granted.wait(10) and h.narrow is False
    h.let_go()
    assert gate._free == gate.runs


def test_without_split_every_run_is_wide_and_one_at_a_time():
    gate = RunGate(1)
    first = Holder(gate)
    assert first.granted.wait(10) and first.narrow is False
    second = Holder(gate)
    wait_for(lambda: gate.waiting == 1, "the second run waiting")
    assert not second.granted.wait(0.2)
    first.let_go()
    assert second.granted.wait(10) and second.narrow is False
    second.let_go()
    assert gate.narrow_grants == 0


def test_two_models_backlogs_run_side_by_side_in_a_split_slot():
    """Two batchers with work: with split their runs overlap, two at a time; never more."""
    for split, most in ((2, 2), (1, 1)):
        gate = RunGate(1, split=split)
        lock = threading.Lock()
        running, seen, widths = [0], [0], []
        release = threading.Event()

        def run(items, running=running, seen=seen, widths=widths, release=release, lock=lock):
            with lock:
                running[0] += 1
                seen[0] = max(seen[0], running[0])
                widths.append(narrow_run())
            release.wait(0.3)  # long enough for a run of the other model to start beside it, if it may
            with lock:
                running[0] -= 1
            return items

        batchers = [Batcher(run, BatchPolicy(1), gate, name=f"m{k}") for k in range(3)]
        futures = [b.submit(k, Job()) for k in range(4) for b in batchers]
        assert [f.result(30) for f in futures] == [k for k in range(4) for _ in batchers]
        for b in batchers:
            b.close()
        assert seen[0] == most
        assert any(widths) == (split > 1)


def test_the_split_default_follows_the_cpu_and_the_settings(monkeypatch):
    monkeypatch.setattr("immich_aio.mapped_load.cores", lambda: 2)
    f = SessionFactory(Settings.from_env({}))
    assert (f.split, f.intra_threads, f.narrow_threads, f.gate.slots, f.gate.runs) == (True, 2, 1, 1, 2)
    assert f.run_slots == 1  # the decode budget is per slot, split or not
    for env in (
        {"IMMICH_AIO_SPLIT_RUNS": "false"},
        {"IMMICH_AIO_SHORT_RUNS_LANE": "true"},  # its own answer to an OCR backlog
        {"MACHINE_LEARNING_MODEL_INTRA_OP_THREADS": "1"},  # nothing to split
    ):
        f = SessionFactory(Settings.from_env(env))
        assert not f.split and f.gate.runs == f.gate.slots, env
    monkeypatch.setattr("immich_aio.mapped_load.cores", lambda: 16)
    f = SessionFactory(Settings.from_env({}))
    assert (f.intra_threads, f.narrow_threads, f.gate.slots, f.gate.runs) == (4, 2, 4, 8)


def test_under_a_backlog_ocr_runs_narrow_on_a_second_session_with_the_same_answers(make_client):
    client, runtime, lone = split_ocr_server(make_client)
    gate = runtime.factory.gate
    rec = loaded_model(runtime, "recognition", "ocr")
    det = loaded_model(runtime, "detection", "ocr")
    assert gate.narrow_grants == 0 and rec.narrow is None  # a lone request: wide, and no second session
    det._solo = None  # detections may go two at a time here (test_run_memory covers them one at a time)
    answers = []
    for backlog in range(2):  # the first backlog has the second sessions made; the second runs on them
        if backlog:
            det.narrow = counted = Counted(det.narrow)
        held = gate.acquire()  # another run holds the slot while a backlog gathers behind it
        with ThreadPoolExecutor(6) as pool:
            pending = [pool.submit(predict, client, OCR_ENTRIES, image=SIGN) for _ in range(6)]
            try:
                wait_for(lambda: gate.waiting >= 2, "a backlog at the gate", 30)
            finally:
                gate.release(held)  # a failed wait must not leave the requests (and the pool's exit) hanging
            answers += [p.result(60) for p in pending]
        assert gate.narrow_grants >= 2
        wait_for(lambda: det.narrow is not None, "the detector's narrow session made", 60)
    assert counted.runs > 0  # the oldest two waiting (detections) ran narrow, on the second session
    assert all(a.status_code == 200 and a.json()["ocr"] == lone.json()["ocr"] for a in answers)
    # the two sessions of a model, on the same input: identical
    for model, x in ((det, np.random.default_rng(1).random((1, 3, 256, 320), dtype=np.float32)),
                     (rec, np.random.default_rng(2).random((3, 3, 48, 320), dtype=np.float32))):  # fmt: skip
        if model.narrow is not None or model is det:
            name = model.session.get_inputs()[0].name
            np.testing.assert_array_equal(model.narrow.run(None, {name: x})[0], model.session.run(None, {name: x})[0])
    assert det.narrow is counted  # still the one made
    info = client.get("/info").json()
    assert info["threads"]["splitRuns"] is True and info["threads"]["narrowThreads"] == 1
    assert [m["narrowSession"] for m in info["models"] if m["type"] == "detection"] == [True]
    assert 'immich_aio_runs_granted_total{width="narrow"}' in client.get("/metrics").text
    rec.close()  # as an unload does: the second session goes with the first
    assert rec.narrow is None and rec.session is None


class Counted:
    """A session that counts its runs."""

    def __init__(self, session) -> None:
        self.session, self.runs = session, 0

    def run(self, *args, **kw):
        self.runs += 1
        return self.session.run(*args, **kw)

    def __getattr__(self, name: str):
        return getattr(self.session, name)


def _narrow_made(model: Model) -> bool:
    """Ask for the narrow session as a narrow run would, and wait for the thread that makes it."""
    model._narrow_tried = float("-inf")
    gate = RunGate(1, split=2)
    a, b = two_narrow(gate)
    out: list[list[np.ndarray]] = []
    runner = threading.Thread(target=lambda: _in_narrow_run(gate, model, out))
    a.let_go()
    runner.start()
    runner.join(30)
    b.let_go()
    assert out, "the run failed"
    for t in threading.enumerate():
        if t.name == f"narrow-{model.name}":
            t.join(60)
    return model.narrow is not None


def _in_narrow_run(gate: RunGate, model: Model, out: list) -> None:
    with gate.slot(Job()):
        assert narrow_run()
        out.append(model.infer({"input.1": np.zeros((1, 3, 112, 112), np.float32)}))


@pytest.mark.packs
def test_a_large_model_gets_a_narrow_session_only_from_its_saved_copy(tmp_path, monkeypatch):
    """Both sessions map the saved copy's weights (shared pages); from the file itself the second session would
    hold the whole model a second time, so it waits for the copy."""
    store = tmp_path / "store"
    path = make_arcface(store / "facial-recognition" / "buffalo_l" / "recognition" / "model.onnx")
    monkeypatch.setattr(mapped_load, "MIN_FILE_BYTES", 1)  # the test model counts as large
    f = SessionFactory(Settings.from_env({"MACHINE_LEARNING_CACHE_FOLDER": str(store)}))
    assert f.split or os.cpu_count() == 1
    monkeypatch.setattr(f, "narrow_threads", 1)
    monkeypatch.setattr(f.gate, "split", 2)
    model = BareRecognizer("buffalo_l", {"model": path}, f)
    model.load()
    assert not f.narrow_ready(path) and not _narrow_made(model)  # no copy yet: the run went on the wide session
    assert f.ort_cache is not None and f.ort_cache.wait_written(180)
    assert f.narrow_ready(path) and _narrow_made(model)
    x = np.random.default_rng(0).standard_normal((2, 3, 112, 112)).astype(np.float32)
    np.testing.assert_array_equal(model.narrow.run(None, {"input.1": x})[0], model.session.run(None, {"input.1": x})[0])
    off = SessionFactory(Settings.from_env({"MACHINE_LEARNING_CACHE_FOLDER": str(store), "IMMICH_AIO_ORT_CACHE": "0"}))
    assert not off.narrow_ready(path)


def test_a_narrow_session_is_never_made_from_a_replaced_file_nor_kept_after_close(tmp_path, monkeypatch):
    path = make_arcface(tmp_path / "a" / "model.onnx")
    f = SessionFactory(Settings.from_env({"MACHINE_LEARNING_CACHE_FOLDER": str(tmp_path), "IMMICH_AIO_ORT_CACHE": "0"}))
    monkeypatch.setattr(f, "narrow_threads", 1)
    monkeypatch.setattr(f.gate, "split", 2)
    model = BareRecognizer("buffalo_l", {"model": path}, f)
    model.load()
    other = make_arcface(tmp_path / "b" / "model.onnx", seed=2)
    os.replace(other, path)  # a reinstall: the registry loads the new file as a model of its own
    assert not _narrow_made(model)  # never two versions of a model in one
    real = f.create
    for meanwhile in ("replaced", "closed"):
        model = BareRecognizer("buffalo_l", {"model": path}, f)
        model.load()
        made = threading.Event()

        def slow_create(*args, meanwhile=meanwhile, model=model, made=made, **kw):
            session = real(*args, **kw)
            if kw.get("threads"):
                if meanwhile == "closed":
                    model.close()  # unloaded while its second session was being made
                else:  # replaced while it was being made
                    os.replace(make_arcface(tmp_path / "c" / "model.onnx", seed=3), path)
                made.set()
            return session

        monkeypatch.setattr(f, "create", slow_create)
        source, session = model._source, model.session
        assert source is not None and session is not None
        model._make_narrow(source, session)
        assert made.is_set() and model.narrow is None, meanwhile
        monkeypatch.setattr(f, "create", real)


def test_a_recogniser_given_a_batch_axis_in_memory_never_gets_one_from_its_batch_1_file(tmp_path):
    path = make_arcface(tmp_path / "fixed" / "model.onnx", batch=1)
    f = SessionFactory(Settings.from_env({"MACHINE_LEARNING_CACHE_FOLDER": str(tmp_path), "IMMICH_AIO_ORT_CACHE": "0"}))
    model = FaceRecognizer("fixed", {"model": path}, f)
    model.load()
    assert model.batched and model._source is None
    model.close()
