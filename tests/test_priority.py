"""The backlog's threads run at a lower CPU priority than a person's search (priority.py).

What is checked is where each thread's nice value comes from: the threads that build and run the image models
(request pool, their batchers, the sessions they build, which ONNX Runtime's own threads inherit from) are raised
by IMMICH_AIO_BACKGROUND_NICE, and the threads that build and run a text tower are not, preloaded or not. What
that does to a search's time under the mix is measured by scripts/bench.py and scripts/side_by_side.py.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cnclip_ref import install_tiny, tiny_model
from conftest import FIXTURES, OCR_ENTRIES, predict, wait_for

from immich_aio import priority
from immich_aio.batching import Batcher, BatchPolicy, RunGate
from immich_aio.jobs import Job
from immich_aio.models.base import Model
from immich_aio.sessions import SessionFactory
from immich_aio.store import ModelStore

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")

TEXT = {"clip": {"textual": {"modelName": "ViT-B-32__openai"}}}
VISUAL = {"clip": {"visual": {"modelName": "ViT-B-32__openai"}}}
PHOTO = (FIXTURES / "ocr" / "sign.jpg").read_bytes()
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=11)


@pytest.fixture(autouse=True)
def _restore_setting():
    yield
    priority.configure(0)


def in_new_thread(fn):
    """fn's result, computed on a thread of its own (a thread's nice value cannot be lowered again)."""
    out: list = []
    worker = threading.Thread(target=lambda: out.append(fn()))
    worker.start()
    worker.join(30)
    assert not worker.is_alive()
    return out[0]


def test_background_raises_the_calling_thread_only():
    base = priority.nice()
    assert base is not None
    priority.configure(7)

    def raised():
        priority.background()
        return priority.nice()

    assert in_new_thread(raised) == min(19, base + 7)
    assert priority.nice() == base  # the thread that asked for nothing is as it was
    priority.configure(0)
    assert in_new_thread(raised) == base
    priority.configure(50)  # capped
    assert in_new_thread(raised) == 19


def test_a_refusal_is_logged_once_and_the_thread_goes_on(monkeypatch, caplog):
    def refuse(*_args):
        raise PermissionError("not here")

    monkeypatch.setattr(priority.os, "setpriority", refuse)
    monkeypatch.setattr(priority, "_refused", False)
    priority.configure(5)
    with caplog.at_level(logging.INFO, logger="immich_aio.priority"):
        for _ in range(3):
            in_new_thread(priority.background)
    said = [r.getMessage() for r in caplog.records if r.name == "immich_aio.priority"]
    assert len(said) == 1 and "not here" in said[0]


@pytest.mark.parametrize("interactive", [False, True])
def test_a_batchers_thread_has_its_lanes_priority(interactive):
    base = priority.nice()
    assert base is not None
    priority.configure(4)
    batcher = Batcher(
        lambda items: [priority.nice() for _ in items], BatchPolicy(), RunGate(1), interactive=interactive, name="t"
    )
    try:
        ran_at = batcher.submit("x", Job(interactive=interactive)).result(30)
    finally:
        batcher.close()
    assert ran_at == (base if interactive else base + 4)


@pytest.fixture
def seen(monkeypatch) -> list[tuple[str, str, int | None]]:
    """Every session build (by its file's folder: textual, visual, detection...) and run (by model type) in the
    server, with the nice value of the thread it happened on."""
    out: list[tuple[str, str, int | None]] = []
    create, infer = SessionFactory.create, Model.infer

    def recording_create(self, model, *args, **kwargs):
        out.append(("build", Path(str(model)).parent.name, priority.nice()))
        return create(self, model, *args, **kwargs)

    def recording_infer(self, feeds):
        out.append(("run", self.type, priority.nice()))
        return infer(self, feeds)

    monkeypatch.setattr(SessionFactory, "create", recording_create)
    monkeypatch.setattr(Model, "infer", recording_infer)
    return out


def test_image_work_runs_below_a_search_end_to_end(store, make_client, tiny, seen):
    """Every build and run of the image models at +N (the CLIP tower loads ahead and runs in its batcher, OCR's
    detector runs on the request's thread), every one of the text tower at the search's priority."""
    base = priority.nice()
    assert base is not None
    install_tiny(ModelStore(store), tiny)
    client = make_client(IMMICH_AIO_BACKGROUND_NICE="6", IMMICH_AIO_ORT_CACHE="false")
    for _ in range(2):
        assert predict(client, TEXT, text="海边的日落").status_code == 200
        assert predict(client, VISUAL, image=PHOTO).status_code == 200
        assert predict(client, OCR_ENTRIES, image=PHOTO).status_code == 200
    text = {nice for what, type_, nice in seen if type_ == "textual"}
    image = {nice for what, type_, nice in seen if type_ != "textual"}
    assert ("run", "detection", base + 6) in seen
    assert {what for what, type_, _ in seen if type_ == "textual"} == {"build", "run"}
    assert {what for what, type_, _ in seen if type_ == "visual"} == {"build", "run"}
    assert text == {base} and image == {base + 6}, seen
    threads = client.get("/info").json()["threads"]
    assert (threads["searchNice"], threads["backgroundNice"]) == (base, base + 6)


def test_off_every_thread_at_the_servers_priority_and_said_so(store, make_client, tiny, seen):
    from immich_aio.reporting import banner

    base = priority.nice()
    install_tiny(ModelStore(store), tiny)
    client = make_client(IMMICH_AIO_BACKGROUND_NICE="0", IMMICH_AIO_ORT_CACHE="false")
    assert predict(client, VISUAL, image=PHOTO).status_code == 200
    assert predict(client, TEXT, text="海边的日落").status_code == 200
    assert {nice for *_, nice in seen} == {base}, seen
    assert client.get("/info").json()["threads"]["backgroundNice"] is None
    assert "background work at a search's CPU priority" in banner(client.app.state.runtime)


def test_a_text_tower_asked_for_by_a_background_thread_loads_at_the_servers_priority(store, make_client, tiny, seen):
    """An odd request with a text and an image (the image lane) is the first to need the text tower: the searches
    after it must not run on threads made at background priority."""
    base = priority.nice()
    assert base is not None
    install_tiny(ModelStore(store), tiny)
    client = make_client(IMMICH_AIO_BACKGROUND_NICE="5", IMMICH_AIO_ORT_CACHE="false")
    r = predict(client, {**TEXT, **OCR_ENTRIES}, image=PHOTO, text="一只猫")  # not all text: the image lane
    assert r.status_code == 200, r.text
    assert ("run", "detection", base + 5) in seen  # it did run in the image lane
    assert predict(client, TEXT, text="海边的日落").status_code == 200
    text = [(what, nice) for what, type_, nice in seen if type_ == "textual"]
    assert ("build", base) in text and all(nice == base for _, nice in text), seen


def test_preloaded_text_towers_load_at_the_servers_priority(store, make_client, tiny, seen):
    """Preloads run on the request pool (background priority): the text tower is built on the registry's thread."""
    base = priority.nice()
    assert base is not None
    install_tiny(ModelStore(store), tiny)
    make_client(
        IMMICH_AIO_BACKGROUND_NICE="3",
        IMMICH_AIO_ORT_CACHE="false",
        MACHINE_LEARNING_PRELOAD__CLIP__TEXTUAL="ViT-B-32__openai",
        MACHINE_LEARNING_PRELOAD__CLIP__VISUAL="ViT-B-32__openai",
    )
    built = lambda: {name: nice for what, name, nice in seen if what == "build"}  # noqa: E731
    wait_for(lambda: built().keys() >= {"textual", "visual"}, "both towers preloaded", 60)
    assert built() == {"textual": base, "visual": base + 3}, seen


def test_the_resize_helper_and_the_load_ahead_pool_run_in_the_background(tmp_path):
    """Both pools start their threads on first use, so this runs in a fresh process."""
    code = (
        "from immich_aio import priority, imaging\n"
        "from immich_aio.registry import ModelRegistry\n"
        "priority.configure(5)\n"
        "base = priority.nice()\n"
        "print(imaging._resize_helper.submit(priority.nice).result() - base)\n"
        "registry = ModelRegistry({}, 300)\n"
        "print(registry._loader.submit(priority.nice).result() - base)\n"
        "print(registry._hasher.submit(priority.nice).result())\n"
        "registry.close()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split() == ["5", "5", "19"], done.stderr
