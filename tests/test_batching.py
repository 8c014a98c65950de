"""Cross-request batching: same results as item-by-item, order kept, failures isolated, interactive
work never queued behind background work, and the run gate's cap on concurrent runs."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import OCR_ENTRIES, encode, loaded_model, predict, wait_for

from immich_aio.batching import Batcher, BatcherClosed, BatchPolicy, RunGate
from immich_aio.config import Settings
from immich_aio.jobs import Job
from immich_aio.sessions import SessionFactory


class Recorder:
    """A fake batched run: doubles items, remembers batch sizes, can block or fail on demand."""

    def __init__(self, gate_open: threading.Event | None = None, fail_on=None) -> None:
        self.batches: list[list[int]] = []
        self.gate_open = gate_open
        self.fail_on = fail_on
        self.running = 0
        self.max_running = 0
        self.lock = threading.Lock()
        self.started = threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        self.started.set()
        try:
            if self.gate_open is not None:
                assert self.gate_open.wait(30)
            self.batches.append(list(items))
            if self.fail_on is not None and self.fail_on in items:
                raise ValueError(f"bad item {self.fail_on}")
            return [2 * i for i in items]
        finally:
            with self.lock:
                self.running -= 1


def blocked_batcher(max_size: int = 8, **kw):
    release = threading.Event()
    rec = Recorder(release, **kw)
    return Batcher(rec, BatchPolicy(max_size), RunGate(4), name="t"), rec, release


def test_items_arriving_during_a_run_share_the_next_run_and_keep_their_order():
    batcher, rec, release = blocked_batcher(max_size=8)
    first = batcher.submit(0, Job())
    assert rec.started.wait(10)
    futures = batcher.submit_many(list(range(1, 11)), Job())
    release.set()
    assert first.result(10) == 0
    assert [f.result(10) for f in futures] == [2 * i for i in range(1, 11)]
    assert rec.batches == [[0], list(range(1, 9)), [9, 10]]
    batcher.close()


def test_batched_results_equal_item_by_item():
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(16, 4)).astype(np.float32)
    items = [rng.normal(size=16).astype(np.float32) for _ in range(20)]

    def run(batch):
        return list(np.stack(batch) @ weights)

    one_by_one = [run([x])[0] for x in items]
    batcher = Batcher(run, BatchPolicy(8), RunGate(1))
    with ThreadPoolExecutor(10) as pool:
        together = list(pool.map(lambda x: batcher.submit(x, Job()).result(10), items))
    for a, b in zip(together, one_by_one, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    batcher.close()


def test_a_failing_item_fails_only_its_own_request():
    batcher, rec, release = blocked_batcher(fail_on=3)
    batcher.submit(0, Job())
    assert rec.started.wait(10)
    futures = batcher.submit_many([1, 2, 3, 4], Job())
    release.set()
    assert futures[0].result(10) == 2 and futures[1].result(10) == 4 and futures[3].result(10) == 8
    with pytest.raises(ValueError, match="bad item 3"):
        futures[2].result(10)
    assert [1, 2, 3, 4] in rec.batches  # tried together first, then one by one
    batcher.close()


def test_keys_never_mix_in_one_run():
    release = threading.Event()
    rec = Recorder(release)
    batcher = Batcher(rec, BatchPolicy(8), RunGate(1), key=lambda i: i % 2)
    batcher.submit(100, Job())
    assert rec.started.wait(10)
    futures = batcher.submit_many([1, 2, 3, 4, 5, 6], Job())
    release.set()
    assert [f.result(10) for f in futures] == [2, 4, 6, 8, 10, 12]
    assert all(len({i % 2 for i in b}) == 1 for b in rec.batches)
    batcher.close()


def test_lone_request_does_not_wait_for_a_batch_to_fill():
    rec = Recorder()
    batcher = Batcher(rec, BatchPolicy(8, max_wait_s=5.0), RunGate(1))
    started = time.monotonic()
    assert batcher.submit(7, Job()).result(10) == 14
    assert time.monotonic() - started < 2.5  # it would take 5 s if an idle batcher waited for company
    batcher.close()


def test_gate_caps_concurrent_background_runs_but_not_interactive_ones():
    gate = RunGate(1)
    release = threading.Event()
    slow = Recorder(release)
    other = Recorder()
    bg1 = Batcher(slow, BatchPolicy(1), gate, name="bg1")
    bg2 = Batcher(other, BatchPolicy(1), gate, name="bg2")
    search = Batcher(Recorder(), BatchPolicy(1), gate, interactive=True, name="search")
    blocked = bg1.submit(1, Job())
    assert slow.started.wait(10)
    waiting = bg2.submit(2, Job())
    # A person searching is answered while the only background slot is held.
    assert search.submit(3, Job()).result(10) == 6
    assert not waiting.done()  # the second background run waits for the slot
    release.set()
    assert blocked.result(10) == 2 and waiting.result(10) == 4
    for b in (bg1, bg2, search):
        b.close()


def test_gate_hands_slots_over_in_arrival_order():
    """A model that just released the slot must not take it back ahead of others already waiting."""
    gate = RunGate(1)
    order: list[str] = []
    gate.acquire()
    waiters = []
    for name in ("face", "ocr"):
        t = threading.Thread(target=lambda n=name: (gate.acquire(), order.append(n), gate.release()))
        t.start()
        waiters.append(t)
        wait_for(lambda: len(gate._waiting) >= len(waiters), f"{name} waiting at the gate")
    gate.release()
    gate.acquire()  # the busy model comes straight back for another run
    order.append("clip")
    gate.release()
    for t in waiters:
        t.join(10)
    assert order == ["face", "ocr", "clip"]


def test_a_started_request_finishes_first():
    """Issue 13: once a photo's detection has run, its recognition goes ahead of detections of photos that
    arrived later, even when those were queued at the gate first."""
    gate = RunGate(1)
    order: list[str] = []
    photo = Job()  # admitted first; its detection has already run
    later = [Job(), Job()]  # admitted after it, not started
    recognition = Batcher(lambda items: [order.append(f"recognition {i}") or i for i in items], BatchPolicy(8), gate)
    gate.acquire()  # another request's run holds the only slot

    def detect(job: Job, name: str) -> None:
        with gate.slot(job):
            order.append(name)

    threads = [threading.Thread(target=detect, args=(j, f"detection {k}")) for k, j in enumerate(later)]
    for t in threads:
        t.start()
    wait_for(lambda: gate.waiting >= 2, "both later detections waiting at the gate")
    faces = recognition.submit_many([1, 2], photo)  # queued last
    wait_for(lambda: gate.waiting >= 3, "the recognition waiting at the gate")
    gate.release()
    assert [f.result(10) for f in faces] == [1, 2]
    for t in threads:
        t.join(10)
    recognition.close()
    assert order == ["recognition 1", "recognition 2", "detection 0", "detection 1"]


def _bucketed(gate: RunGate, order: list[str], hold_runs: int = 8, on_run=None) -> Batcher:
    """A batcher whose items are (key, n): one run per key, as OCR lines run per width bucket."""

    def run(items):
        order.append(f"bucket {items[0][0]}")
        if on_run is not None:
            on_run(items)
        return [n for _key, n in items]

    return Batcher(run, BatchPolicy(8, hold_runs=hold_runs), gate, key=lambda item: item[0])


def _younger_run(gate: RunGate, job: Job, order: list[str], name: str) -> threading.Thread:
    def go() -> None:
        with gate.slot(job):
            order.append(name)

    t = threading.Thread(target=go)
    t.start()
    return t


def test_a_photos_buckets_run_back_to_back_under_its_slot():
    """Issue 19: one photo's text lines of several width buckets run one after another under the slot the
    first bucket got, instead of each bucket queueing behind a younger request's run."""
    gate = RunGate(1)
    order: list[str] = []
    photo, younger = Job(), Job()
    recognition = _bucketed(gate, order)
    gate.acquire()  # another run holds the only slot
    lines = recognition.submit_many([(320, 1), (640, 2), (960, 3)], photo)
    wait_for(lambda: gate.waiting >= 1, "the first bucket waiting at the gate")
    other = _younger_run(gate, younger, order, "younger request")
    wait_for(lambda: gate.waiting >= 2, "the younger request waiting at the gate")
    gate.release()
    assert [f.result(10) for f in lines] == [1, 2, 3]
    other.join(10)
    assert not other.is_alive()
    recognition.close()
    assert order == ["bucket 320", "bucket 640", "bucket 960", "younger request"]


def test_a_held_slot_goes_to_an_older_job_and_holding_is_bounded():
    """The slot is kept only while the photo is the oldest in line, and for at most hold_runs runs."""
    gate = RunGate(1)
    order: list[str] = []
    older, photo = Job(), Job()
    threads: list[threading.Thread] = []

    def older_arrives(items) -> None:  # during the photo's first run, an older job's run queues at the gate
        if items[0][0] == 320:
            threads.append(_younger_run(gate, older, order, "older request"))
            wait_for(lambda: gate.waiting >= 1, "the older request waiting at the gate")

    recognition = _bucketed(gate, order, on_run=older_arrives)
    lines = recognition.submit_many([(320, 1), (640, 2), (960, 3)], photo)
    assert [f.result(10) for f in lines] == [1, 2, 3]
    threads[0].join(10)
    recognition.close()
    assert order == ["bucket 320", "older request", "bucket 640", "bucket 960"]

    order.clear()
    bounded = _bucketed(gate, order, hold_runs=2)
    gate.acquire()
    lines = bounded.submit_many([(320, 1), (640, 2), (960, 3)], Job())
    wait_for(lambda: gate.waiting >= 1, "the first bucket waiting at the gate")
    other = _younger_run(gate, Job(), order, "younger request")
    wait_for(lambda: gate.waiting >= 2, "the younger request waiting at the gate")
    gate.release()
    assert [f.result(10) for f in lines] == [1, 2, 3]
    other.join(10)
    bounded.close()
    assert order == ["bucket 320", "bucket 640", "younger request", "bucket 960"]


def test_a_failed_run_under_a_held_slot_is_retried_item_by_item_without_deadlock():
    """A batch that fails in the middle of a hold gives the slot back before its items are retried one by one
    (each retry takes a slot: with one slot, retrying under the held one would wait for itself)."""
    gate = RunGate(1)

    def run(items):
        if len(items) > 1 and items[0][0] == 640:
            raise ValueError("a bad batch")
        return [n for _key, n in items]

    recognition = Batcher(run, BatchPolicy(8), gate, key=lambda item: item[0])
    gate.acquire()
    lines = recognition.submit_many([(320, 1), (640, 2), (640, 3)], Job())
    wait_for(lambda: gate.waiting >= 1, "the first bucket waiting at the gate")
    gate.release()
    assert [f.result(10) for f in lines] == [1, 2, 3]
    recognition.close()


def test_close_fails_pending_work_and_refuses_new():
    batcher, rec, release = blocked_batcher()
    batcher.submit(0, Job())
    assert rec.started.wait(10)
    pending = batcher.submit(1, Job())
    threading.Timer(0.2, release.set).start()
    batcher.close()
    with pytest.raises(BatcherClosed):
        pending.result(10)
    with pytest.raises(BatcherClosed):
        batcher.submit(2, Job())


def test_thread_budget_defaults_and_overrides(monkeypatch):
    monkeypatch.setattr("immich_aio.mapped_load.cores", lambda: 2)
    f = SessionFactory(Settings.from_env({}))
    assert (f.intra_threads, f.gate.slots, f.batch_size) == (2, 1, 4)
    monkeypatch.setattr("immich_aio.mapped_load.cores", lambda: 16)
    f = SessionFactory(Settings.from_env({}))
    assert (f.intra_threads, f.gate.slots) == (4, 4)
    f = SessionFactory(
        Settings.from_env(
            {
                "MACHINE_LEARNING_MODEL_INTRA_OP_THREADS": "8",
                "IMMICH_AIO_CONCURRENT_RUNS": "3",
                "IMMICH_AIO_BATCH_MAX_SIZE": "2",
                "IMMICH_AIO_BATCH_MAX_WAIT_MS": "5",
            }
        )
    )
    assert (f.intra_threads, f.gate.slots, f.batch_size, f.policy().max_wait_s) == (8, 3, 2, 0.005)
    assert f.options().intra_op_num_threads == 8


@pytest.mark.slow
def test_ocr_lines_from_concurrent_requests_share_bucketed_runs(make_client):
    """Lines from different requests share recognition runs, one width bucket per run, and the answers don't change.

    The first recognition run is held until every other line of the six requests is queued behind it, so the
    runs that follow must batch across requests: no timing decides it.
    """
    from conftest import FIXTURES

    from immich_aio.models.ocr import REC_BUCKETS, OcrRecognizer

    # a held run leaves run slots for the detections, and request threads for all six requests
    client = make_client(IMMICH_AIO_CONCURRENT_RUNS="4", MACHINE_LEARNING_REQUEST_THREADS="8")
    images = [(FIXTURES / "ocr" / n).read_bytes() for n in ("receipt.jpg", "sign.jpg", "rotated.jpg")]
    runtime = client.app.state.runtime
    alone = [predict(client, OCR_ENTRIES, image=img).json() for img in images]
    rec = loaded_model(runtime, "recognition")
    lines_per_round = sum(rec.batcher.batch_sizes)
    assert lines_per_round > len(images)
    rec.batcher.batch_sizes.clear()

    real_run, release, runs = rec.batcher._run, threading.Event(), []

    def recorded(items):
        runs.append({item.shape[2] for item in items})
        if len(runs) == 1:
            release.wait(60)  # never released: the test thread fails at its own deadline
        return real_run(items)

    rec.batcher._run = recorded
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(lambda img=img: predict(client, OCR_ENTRIES, image=img).json()) for img in images * 2]
        held = wait_for(lambda: runs and rec.batcher.batch_sizes[0], "the first recognition run started", 60)
        wait_for(lambda: rec.batcher.depth == 2 * lines_per_round - held, "every other line queued behind it", 60)
        release.set()
        together = [f.result(timeout=120) for f in futures]
    assert together == alone * 2  # batching changes nothing in the answers
    sizes = list(rec.batcher.batch_sizes)
    assert sum(sizes) == 2 * lines_per_round
    assert max(sizes[1:]) > 1 and len(sizes) < sum(sizes)  # lines of different requests shared runs
    assert all(len(widths) == 1 for widths in runs)  # one width bucket per run
    crop = np.zeros((30, 200, 3), np.uint8)
    assert OcrRecognizer.prepare_line(crop).shape == (3, 48, 320)
    assert OcrRecognizer.prepare_line(np.zeros((30, 700, 3), np.uint8)).shape[2] in REC_BUCKETS


def test_search_is_answered_while_background_image_work_is_stuck(make_client):
    """Through HTTP: every background slot and batch is blocked, yet a text search returns."""
    from cnclip_ref import (
        install_tiny,  # the tiny CN-CLIP built from cn_clip's code
        tiny_model,
    )

    from immich_aio.store import ModelStore

    client = make_client(MACHINE_LEARNING_REQUEST_THREADS="4")
    runtime = client.app.state.runtime
    install_tiny(ModelStore(runtime.settings.cache_folder), tiny_model())
    entries = {"clip": {"visual": {"modelName": "ViT-B-32__openai"}}}
    img = encode(np.zeros((64, 64, 3), np.uint8))
    assert predict(client, entries, image=img).status_code == 200
    visual = loaded_model(runtime, "visual")
    release = threading.Event()
    entered = threading.Event()
    real_embed = visual.embed

    def stuck_embed(batch):
        entered.set()
        assert release.wait(60)
        return real_embed(batch)

    visual.embed = stuck_embed
    with ThreadPoolExecutor(8) as pool:
        background = [pool.submit(predict, client, entries, img) for _ in range(8)]
        assert entered.wait(30)
        r = predict(client, {"clip": {"textual": {"modelName": "ViT-B-32__openai"}}}, text="海边的日落")
        assert r.status_code == 200
        assert not any(f.done() for f in background)  # the search did not wait for them
        release.set()
        assert all(f.result(60).status_code == 200 for f in background)


def test_close_while_waiting_for_a_batch_to_fill_ends_cleanly(monkeypatch):
    crashes = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashes.append(args.exc_value))
    batcher, rec, release = blocked_batcher(max_size=8)
    batcher.policy = BatchPolicy(8, max_wait_s=30.0)
    batcher.submit(0, Job())
    assert rec.started.wait(10)
    first = batcher.submit_many([1, 2], Job())  # queued during the run: the next run is a batch of 2
    release.set()
    assert [f.result(10) for f in first] == [2, 4]
    waiting = batcher.submit(3, Job())  # after a batch, the worker waits up to 30 s for company
    time.sleep(0.2)  # let the worker enter that wait
    batcher.close()
    with pytest.raises(BatcherClosed):
        waiting.result(10)
    assert not batcher._thread.is_alive()
    assert crashes == []


@pytest.mark.parametrize("lane", [True, False], ids=["own-lane", "shared-gate"])
def test_ocr_runs_take_their_own_lane_only_when_asked(make_client, lane):
    """IMMICH_AIO_SHORT_RUNS_LANE: with every slot of the shared gate held by other work, an OCR request still
    finishes on its own lane; without the setting it waits for a slot (it cannot finish while they are held)."""
    from conftest import FIXTURES

    client = make_client(IMMICH_AIO_SHORT_RUNS_LANE=str(lane).lower())
    factory = client.app.state.runtime.factory
    assert factory.short_lane == lane
    assert factory.run_slots == factory.gate.slots + lane
    assert not (lane and factory.split)  # the lane and split runs are two answers to one backlog: never both
    assert client.app.state.runtime.budget.total == 8_000_000 * factory.run_slots  # the decode budget counts it
    photo = (FIXTURES / "ocr" / "sign.jpg").read_bytes()
    answers: list = []
    held = [factory.gate.acquire() for _ in range(factory.gate.slots)]  # CLIP and face runs holding the machine
    try:
        worker = threading.Thread(target=lambda: answers.append(predict(client, OCR_ENTRIES, image=photo)), daemon=True)
        worker.start()
        worker.join(60 if lane else 3)
        assert worker.is_alive() != lane, "the OCR request did not take the lane it was given"
    finally:
        for narrow in held:
            factory.gate.release(narrow)
    worker.join(60)
    assert not worker.is_alive()
    assert len(answers) == 1 and answers[0].status_code == 200 and answers[0].json()["ocr"]["text"]
