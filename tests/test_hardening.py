"""Regression tests for what a hostile client, a bad store and a live reinstall broke (issue #11).

Each test names the defect class it guards; each failed on the code before the fix.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from cnclip_ref import install_tiny, tiny_model
from conftest import FIXTURES, OCR_ENTRIES, encode, loaded_model, predict, runs_waiting, settings_for, wait_for
from live import InProcessServer, captured_logs, free_port, server_process
from PIL import Image
from starlette.testclient import TestClient

from immich_aio.app import create_app
from immich_aio.errors import ClientGone, ServiceUnavailable
from immich_aio.imaging import PixelBudget
from immich_aio.jobs import Job
from immich_aio.store import ModelStore

TEXT = {"clip": {"textual": {"modelName": "ViT-B-32__openai"}}}
VISUAL = {"clip": {"visual": {"modelName": "ViT-B-32__openai"}}}
PHOTO = (FIXTURES / "ocr" / "sign.jpg").read_bytes()


def vec(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.array(json.loads(r.json()["clip"]), dtype=np.float32)


@pytest.fixture(scope="module")
def tiny_a():
    return tiny_model(seed=1)


@pytest.fixture(scope="module")
def tiny_b():
    return tiny_model(seed=2)


@pytest.fixture
def clip_client(store, make_client, tiny_a):
    install_tiny(ModelStore(store), tiny_a)
    return make_client()


# --- class 1: a request with both parts -----------------------------------------------------------


def test_textual_entry_with_an_image_too_takes_the_text(clip_client):
    alone = vec(predict(clip_client, TEXT, text="海边的日落"))
    both = vec(predict(clip_client, TEXT, image=PHOTO, text="海边的日落"))
    np.testing.assert_allclose(both, alone, atol=1e-6)


def test_image_entry_with_text_too_takes_the_image(clip_client):
    alone = vec(predict(clip_client, VISUAL, image=PHOTO))
    both = vec(predict(clip_client, VISUAL, image=PHOTO, text="ignored"))
    np.testing.assert_allclose(both, alone, atol=1e-6)
    r = predict(clip_client, OCR_ENTRIES, image=PHOTO, text="ignored")
    assert r.status_code == 200 and r.json()["ocr"]["text"]


def test_both_clip_types_in_one_request_is_a_clear_400(clip_client):
    entries = {"clip": {"visual": {"modelName": "ViT-B-32__openai"}, "textual": {"modelName": "ViT-B-32__openai"}}}
    r = predict(clip_client, entries, image=PHOTO, text="海边")
    assert r.status_code == 400
    assert "clip.visual and clip.textual" in r.json()["detail"]
    assert clip_client.get("/ping").text == "pong"


# --- class 2: client-chosen names -----------------------------------------------------------------


def test_client_chosen_names_do_not_grow_server_state(client):
    image = encode(np.full((64, 64, 3), 255, np.uint8))
    for i in range(40):
        entries = json.loads(json.dumps(OCR_ENTRIES))
        for t in ("detection", "recognition"):
            entries["ocr"][t]["modelName"] = f"immich-app/{'x' * 20_000}{i}/PP-OCRv5_mobile"
        assert predict(client, entries, image=image).status_code == 200
    for i in range(100):
        entries = {"ocr": {"detection": {"modelName": f"bogus-{i}"}, "recognition": {"modelName": f"bogus-{i}"}}}
        assert predict(client, entries, image=image).status_code == 400
    info = client.get("/info")
    assert info.status_code == 200
    assert len(info.content) < 20_000 and b"xxxx" not in info.content and b"bogus" not in info.content
    for m in info.json()["models"]:
        assert m["answersTo"] == ["PP-OCRv5_mobile"]


def test_long_name_is_refused_without_echoing_it_whole(client, caplog):
    """Neither in the answer nor in the refusal's log line: a client could otherwise grow the log by the form's size
    per request."""
    name = "a" * 100_000
    entries = {"ocr": {"detection": {"modelName": name}, "recognition": {"modelName": name}}}
    with caplog.at_level(logging.INFO):
        r = predict(client, entries, image=PHOTO)
    assert r.status_code == 400 and len(r.content) < 1000
    refusals = [rec.getMessage() for rec in caplog.records if "-> 400" in rec.getMessage()]
    assert refusals and all(len(line) < 1000 and "(100000 characters)" in line for line in refusals)


LONG = "t" * 100_000


@pytest.mark.parametrize(
    "entries",
    [
        {LONG: {"detection": {"modelName": "PP-OCRv5_mobile"}}},  # a task
        {"ocr": {LONG: {"modelName": "PP-OCRv5_mobile"}}},  # a type
        {"ocr": {"detection": {"modelName": "PP-OCRv5_mobile"}, LONG: {"modelName": "PP-OCRv5_mobile"}}},
    ],
)
def test_unknown_long_task_and_type_names_are_not_echoed_whole(client, caplog, entries):
    """Found attacking the log: an unknown task or type name came back whole in the answer and the refusal's line."""
    with caplog.at_level(logging.INFO):
        r = predict(client, entries, image=PHOTO)
    assert r.status_code == 400 and len(r.content) < 1000 and "(100000 characters)" in r.json()["detail"]
    lines = [rec.getMessage() for rec in caplog.records]
    assert lines and max(len(line) for line in lines) < 1000


def test_an_option_of_any_size_is_refused_in_a_line():
    from immich_aio.errors import BadRequest
    from immich_aio.protocol import option_float

    with pytest.raises(BadRequest) as e:
        option_float({"minScore": LONG}, "minScore", 0.7, 0.0, 1.0)
    assert len(e.value.detail) < 200 and "characters)" in e.value.detail


# --- class 3: working sizes and decoded pixels ----------------------------------------------------


def test_panorama_reaches_the_detector_within_the_working_size(make_client):
    client = make_client(IMMICH_AIO_OCR_MAX_SIDE="2560")
    pano = np.full((400, 16000, 3), 255, np.uint8)  # 40:1, like the 62500x1600 attack, smaller to stay quick
    data = encode(pano, "PNG")
    assert predict(client, OCR_ENTRIES, image=encode(np.full((64, 64, 3), 255, np.uint8))).status_code == 200
    det = loaded_model(client.app.state.runtime, "detection", "ocr")
    shapes = []
    real = det.infer
    det.infer = lambda feeds: (shapes.append(next(iter(feeds.values())).shape), real(feeds))[1]
    entries = json.loads(json.dumps(OCR_ENTRIES))
    entries["ocr"]["detection"]["options"]["maxResolution"] = 100_000
    r = predict(client, entries, image=data)
    assert r.status_code == 200, r.text
    assert shapes and max(shapes[0][2:]) <= 2560


def test_pixel_budget_serves_oldest_first_and_bounds_what_is_held():
    budget = PixelBudget(total=10, wait_s=5)
    order, held, peak = [], [0], [0]
    lock = threading.Lock()
    first = Job()
    gate = threading.Event()

    def take(job: Job, pixels: int, name: str) -> None:
        with budget.hold(pixels, job):
            with lock:
                order.append(name)
                held[0] += pixels
                peak[0] = max(peak[0], held[0])
            if name == "first":
                gate.wait(5)
            time.sleep(0.02)
            with lock:
                held[0] -= pixels

    jobs = [Job() for _ in range(4)]
    t0 = threading.Thread(target=take, args=(first, 8, "first"))
    t0.start()
    wait_for(lambda: budget.used > 0, "the first image holding the budget")
    threads = []
    for i, job in reversed(list(enumerate(jobs))):  # started newest first; served oldest first
        threads.append(threading.Thread(target=take, args=(job, 6, f"job{i}")))
        threads[-1].start()
    wait_for(lambda: budget.waiting >= 4, "four jobs waiting for the budget")
    gate.set()
    for t in [t0, *threads]:
        t.join(10)
    assert order == ["first", "job0", "job1", "job2", "job3"]
    assert peak[0] <= 10


def test_pixel_budget_larger_image_runs_alone_times_out_and_notices_cancel():
    budget = PixelBudget(total=10, wait_s=0.3)
    with budget.hold(50, Job()):  # larger than the whole budget: allowed when nothing else holds any
        assert budget.used == 10
        with pytest.raises(ServiceUnavailable, match="IMMICH_AIO_DECODE_BUDGET_MP"), budget.hold(1, Job()):
            pass
        job = Job()
        threading.Timer(0.05, job.cancel).start()
        budget.wait_s = 5
        with pytest.raises(ClientGone), budget.hold(1, job):
            pass
    assert budget.used == 0 and budget.waiting == 0


def test_decoded_images_alive_at_once_stay_within_the_budget(make_client, monkeypatch):
    from immich_aio import payload

    client = make_client(IMMICH_AIO_DECODE_BUDGET_MP="1", MACHINE_LEARNING_REQUEST_THREADS="8")
    alive, peak = [0], [0]
    lock = threading.Lock()
    real = payload.to_array

    def counting(image):
        array = real(image)
        with lock:
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])

        def gone():
            with lock:
                alive[0] -= 1

        weakref.finalize(array, gone)
        return array

    monkeypatch.setattr(payload, "to_array", counting)
    image = encode(np.random.default_rng(0).integers(0, 255, (900, 1000, 3), dtype=np.uint8))  # 0.9 MP
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: predict(client, OCR_ENTRIES, image=image).status_code, range(8)))
    assert codes == [200] * 8
    assert peak[0] == 1  # 16 request threads used to decode everything queued at once


def test_a_request_lets_its_pixels_go_before_it_waits_for_its_recognition_run(make_client, monkeypatch):
    """Issue 13: the line crops are all recognition needs, so the photo and its budget are let go before the run."""
    from immich_aio.models import ocr

    client = make_client()
    budget = client.app.state.runtime.budget
    held: list[int] = []
    real = ocr.OcrRecognizer.recognize

    def recognize(self, crops, job):
        held.append(budget.used)
        return real(self, crops, job)

    monkeypatch.setattr(ocr.OcrRecognizer, "recognize", recognize)
    r = predict(client, OCR_ENTRIES, image=(FIXTURES / "ocr" / "sign.jpg").read_bytes())
    assert r.status_code == 200 and r.json()["ocr"]["text"], r.text
    assert held == [0]
    assert budget.used == 0


def test_the_decode_budget_follows_the_concurrent_runs(make_client):
    """Issue 13: decoded pixels for about three previews per slot (one running, two ready), unless set; a slot
    split in two under a backlog (IMMICH_AIO_SPLIT_RUNS) shares its budget (more held its peak higher, no faster)."""
    for runs, split, expected in (("1", "false", 8.0), ("3", "false", 24.0), ("1", "true", 8.0), ("3", "true", 24.0)):
        info = (
            make_client(
                IMMICH_AIO_CONCURRENT_RUNS=runs,
                IMMICH_AIO_SPLIT_RUNS=split,
                MACHINE_LEARNING_MODEL_INTRA_OP_THREADS="2",
            )
            .get("/info")
            .json()
        )
        assert info["threads"]["decodeBudgetMegapixels"] == expected, (runs, split)
    assert (
        make_client(IMMICH_AIO_DECODE_BUDGET_MP="2.5").get("/info").json()["threads"]["decodeBudgetMegapixels"] == 2.5
    )


def test_high_bit_depth_images_decode_without_large_float_copies():
    """A sibling of class 3: 16-bit greyscale went through two full-size float64 copies (16 bytes per pixel)."""
    import tracemalloc

    from immich_aio.imaging import decode_image

    arr = np.random.default_rng(0).integers(0, 65535, (1000, 2000)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    tracemalloc.start()
    try:
        out = decode_image(buf.getvalue(), 100_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (1000, 2000, 3)
    # bytes per pixel at the peak, the 3-byte result included: 19 with the float64 copies, 8 without
    # (Pillow's own asarray of a 16-bit image costs up to 9 on its own)
    assert peak < 12 * arr.size


# --- class 4: slow and vanishing clients ----------------------------------------------------------


@pytest.fixture
def live(store):
    settings = settings_for(
        store,
        IMMICH_PORT=str(free_port()),
        IMMICH_AIO_HEADER_TIMEOUT_S="1",
        IMMICH_AIO_BODY_TIMEOUT_S="1",
        IMMICH_AIO_CONCURRENT_RUNS="1",
        MACHINE_LEARNING_REQUEST_THREADS="4",
    )
    with InProcessServer(settings) as srv:
        yield srv


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _reply(sock: socket.socket) -> str:
    """A whole HTTP response: headers and body may come in separate segments, so read to its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data.decode(errors="replace")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
        0,
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


def test_client_that_never_finishes_its_headers_is_disconnected(live):
    with captured_logs() as logs:
        sock = _connect(live.url)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # ... and nothing more
        started = time.monotonic()
        assert sock.recv(100) == b""  # closed by the server
        assert time.monotonic() - started < 10
        sock.close()
    assert any("no complete request" in line for line in logs.lines(logging.INFO))


def test_every_response_says_how_long_an_idle_connection_stays_and_it_stays_that_long(store):
    """Immich's server (Node's fetch, undici) keeps an idle connection 4 s unless a response says otherwise, and a
    request sent just as the server closes it fails ("other side closed", EPIPE; 2 of 8 with Node 20's fetch idling
    exactly the old 2 s): Immich drops that job. Each response says the server's keep-alive, in whole seconds, as
    the server holds it, so undici lets the connection go before the server does."""
    settings = settings_for(store, IMMICH_PORT=str(free_port()), MACHINE_LEARNING_HTTP_KEEPALIVE_TIMEOUT_S="2.6")
    with InProcessServer(settings) as srv:
        sock = _connect(srv.url)
        try:
            sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            assert "\r\nkeep-alive: timeout=3\r\n" in _reply(sock).lower()  # 2.6 s, held as uvicorn holds it
            time.sleep(1.5)  # idle, well within what was said: the connection is still there
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            refused = _reply(sock)
            assert refused.startswith("HTTP/1.1 4") and "\r\nkeep-alive: timeout=3\r\n" in refused.lower()
            idle = time.monotonic()
            assert sock.recv(100) == b""  # then the server closes it (the socket's own timeout: 10 s)
            assert time.monotonic() - idle >= 2.9  # not before the 3 s it said
        finally:
            sock.close()


def test_a_connection_idle_between_requests_is_kept_as_said_and_a_slow_next_request_still_times_out(store):
    """The header deadline is for a request that has begun; an idle connection is the keep-alive's, longer here."""
    settings = settings_for(
        store,
        IMMICH_PORT=str(free_port()),
        MACHINE_LEARNING_HTTP_KEEPALIVE_TIMEOUT_S="30",
        IMMICH_AIO_HEADER_TIMEOUT_S="1",
    )
    with InProcessServer(settings) as srv:
        sock = _connect(srv.url)
        try:
            sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            assert "\r\nkeep-alive: timeout=30\r\n" in _reply(sock).lower()
            time.sleep(2.0)  # idle past the header deadline, well within the keep-alive
            sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _reply(sock).endswith("pong")
            sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n")  # a third request that never finishes its headers
            begun = time.monotonic()
            assert sock.recv(100) == b""
            assert time.monotonic() - begun < 9  # its header deadline (1 s), not the keep-alive (30 s)
        finally:
            sock.close()


def test_stalled_body_gets_a_408(live):
    sock = _connect(live.url)
    body = b'--b\r\nContent-Disposition: form-data; name="entries"\r\n\r\n{}'
    head = (
        "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {len(body) + 5000}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    reply = _reply(sock)
    sock.close()
    assert reply.startswith("HTTP/1.1 408") and "IMMICH_AIO_BODY_TIMEOUT_S" in reply
    assert httpx.get(live.url + "/ping").text == "pong"


def test_client_leaving_mid_upload_is_one_info_line(live):
    with captured_logs() as logs:
        sock = _connect(live.url)
        head = (
            "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            'Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name="image"; filename="x"\r\n\r\n'
        )
        sock.sendall(head.encode() + b"x" * 5000)
        time.sleep(0.3)
        sock.close()
        deadline = time.monotonic() + 10
        while not any("closed the connection" in ln for ln in logs.lines()) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert any("closed the connection while sending" in ln for ln in logs.lines(logging.INFO))
    assert not logs.lines(logging.WARNING)
    assert httpx.get(live.url + "/ping").text == "pong"


def _post_raw(url: str, entries: dict, image: bytes) -> socket.socket:
    boundary = "xyz"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="entries"\r\n\r\n{json.dumps(entries)}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="blob"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = _connect(url)
    sock.sendall(head + body)
    return sock


def test_queued_work_of_a_client_that_left_never_runs(live):
    assert (
        httpx.post(live.url + "/predict", data={"entries": json.dumps(OCR_ENTRIES)}, files={"image": PHOTO}).status_code
        == 200
    )
    det = loaded_model(live.runtime, "detection", "ocr")
    calls, entered, release = [], threading.Event(), threading.Event()
    real = det.infer

    def blocking(feeds):
        calls.append(1)
        if len(calls) == 1:
            entered.set()
            release.wait(30)
        return real(feeds)

    det.infer = blocking
    with captured_logs() as logs, ThreadPoolExecutor(1) as pool:
        first = pool.submit(
            httpx.post,
            live.url + "/predict",
            data={"entries": json.dumps(OCR_ENTRIES)},
            files={"image": PHOTO},
            timeout=60,
        )
        assert entered.wait(30)  # the only run slot is held by the first request
        sock = _post_raw(live.url, OCR_ENTRIES, PHOTO)
        deadline = time.monotonic() + 30
        while runs_waiting(live.runtime, det) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runs_waiting(live.runtime, det) == 1  # the second request waits for the slot
        sock.close()  # ... and its client gives up
        while len(live.runtime.jobs) > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
        assert first.result(60).status_code == 200
    assert len(calls) == 1  # the abandoned request's detection never ran
    assert any("closed the connection" in line for line in logs.lines(logging.INFO))
    assert not logs.lines(logging.ERROR)


# --- class 5: a reinstall while serving -----------------------------------------------------------


def _reference(tmp_path: Path, model, name: str) -> tuple[np.ndarray, np.ndarray]:
    root = tmp_path / name
    install_tiny(ModelStore(root), model)
    with TestClient(create_app(settings_for(root))) as c:
        return vec(predict(c, VISUAL, image=PHOTO)), vec(predict(c, TEXT, text="海边的日落"))


@pytest.mark.slow
def test_reinstall_switches_both_towers_and_running_work_finishes_on_the_old(
    tmp_path, store, make_client, tiny_a, tiny_b
):
    image_a, text_a = _reference(tmp_path, tiny_a, "ref-a")
    image_b, text_b = _reference(tmp_path, tiny_b, "ref-b")
    assert float(image_a @ image_b) < 0.99 and float(text_a @ text_b) < 0.99

    install_tiny(ModelStore(store), tiny_a)
    client = make_client(IMMICH_AIO_CONCURRENT_RUNS="2")  # the stalled run below holds one slot
    np.testing.assert_allclose(vec(predict(client, VISUAL, image=PHOTO)), image_a, atol=1e-5)
    np.testing.assert_allclose(vec(predict(client, TEXT, text="海边的日落")), text_a, atol=1e-5)

    # An image run is in progress on model A when B is installed over it.
    old = loaded_model(client.app.state.runtime, "visual")
    entered, release = threading.Event(), threading.Event()
    real = old.embed

    def slow(batch):
        entered.set()
        release.wait(30)
        return real(batch)

    old.embed = slow
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(predict, client, VISUAL, PHOTO)
        assert entered.wait(30)
        install_tiny(ModelStore(store), tiny_b)
        # The next requests use B for both towers, while A's run is still going.
        np.testing.assert_allclose(vec(predict(client, VISUAL, image=PHOTO)), image_b, atol=1e-5)
        np.testing.assert_allclose(vec(predict(client, TEXT, text="海边的日落")), text_b, atol=1e-5)
        assert old.session is not None  # still held by the running request
        release.set()
        np.testing.assert_allclose(vec(running.result(30)), image_a, atol=1e-5)
    assert old.session is None  # closed once its last run finished
    sha = {m["type"]: m["files"]["model"]["sha256"] for m in client.get("/info").json()["models"]}
    manifest = json.loads((store / "clip" / "CN-CLIP-ViT-B-16" / "manifest.json").read_text())["files"]
    assert sha == {t: manifest[f"{t}/model.onnx"]["sha256"] for t in ("visual", "textual")}


@pytest.mark.slow
def test_requests_during_repeated_reinstalls_never_mix_models(tmp_path, store, make_client, tiny_a, tiny_b):
    refs = {"a": _reference(tmp_path, tiny_a, "ref-a"), "b": _reference(tmp_path, tiny_b, "ref-b")}
    install_tiny(ModelStore(store), tiny_a)
    client = make_client(MACHINE_LEARNING_REQUEST_THREADS="6")
    stop = threading.Event()
    answers: list[tuple[str, object]] = []

    def load():  # records what came back; every check is made in the test's own thread
        while not stop.is_set():
            for kind, call in (
                ("image", lambda: predict(client, VISUAL, image=PHOTO)),
                ("text", lambda: predict(client, TEXT, text="海边的日落")),
            ):
                try:
                    answers.append((kind, call()))
                except Exception as e:  # judged below, not lost as a thread warning
                    answers.append((kind, e))

    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
        w.start()
    for model in (tiny_b, tiny_a, tiny_b):
        time.sleep(0.3)
        install_tiny(ModelStore(store), model)
    time.sleep(0.3)
    stop.set()
    for w in workers:
        w.join(60)
    assert all(not w.is_alive() for w in workers)
    assert len(answers) > 10
    for kind, answer in answers:
        assert not isinstance(answer, Exception), f"a {kind} request failed: {answer!r}"
        assert answer.status_code == 200, answer.text
        index = 0 if kind == "image" else 1
        v = vec(answer)
        assert any(np.allclose(v, ref[index], atol=1e-5) for ref in refs.values()), "a vector from neither model"
    # after the last install both towers answer with B
    np.testing.assert_allclose(vec(predict(client, VISUAL, image=PHOTO)), refs["b"][0], atol=1e-5)
    np.testing.assert_allclose(vec(predict(client, TEXT, text="海边的日落")), refs["b"][1], atol=1e-5)


# --- class 6: /info describes what was loaded -----------------------------------------------------


def test_info_shows_the_loaded_files_even_after_they_change_or_vanish(client, store):
    from immich_aio.store import sha256_file

    folder = _ocr_in_store(store)
    loaded_sha = sha256_file(folder / "detection" / "model.onnx")
    assert predict(client, OCR_ENTRIES, image=PHOTO).status_code == 200
    assert client.get("/info").status_code == 200  # the files as loaded are described (it waits for that)
    (folder / "detection" / "model.onnx").write_bytes(b"replaced on disk, not loaded")
    det = next(m for m in client.get("/info").json()["models"] if m["type"] == "detection")
    assert det["files"]["model"]["sha256"] == loaded_sha
    shutil.rmtree(folder)
    r = client.get("/info")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    det = next(m for m in r.json()["models"] if m["type"] == "detection")
    assert det["files"]["model"]["sha256"] == loaded_sha


def _ocr_in_store(store: Path) -> Path:
    from immich_aio.models.ocr import bundled_model_dir

    folder = store / "ocr" / "PP-OCRv5_mobile"
    for t, f in (("detection", "PP-OCRv6_det_small.onnx"), ("recognition", "PP-OCRv6_rec_small.onnx")):
        (folder / t).mkdir(parents=True)
        shutil.copyfile(bundled_model_dir() / f, folder / t / "model.onnx")
    return folder


def _held_hashing(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Hashing for /info held until `release` is set; `started` is set when the first hash begins."""
    from immich_aio import store as store_module

    started, release = threading.Event(), threading.Event()
    real = store_module.sha256_file

    def held(path, *args, **kwargs):
        started.set()
        release.wait(60)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(store_module, "sha256_file", held)
    return started, release


def test_a_first_request_does_not_wait_for_the_sha256_of_its_files(client, store, monkeypatch):
    """Issue 19: on a first start on files never seen, the first request waited for its files' sha256 (/info's),
    computed beside the load: on a CPU hashing slower than ONNX Runtime loads, that was the request's time. It is
    still computed beside the load, at the lowest priority, and nothing but /info waits for it."""
    from immich_aio.store import sha256_file

    folder = _ocr_in_store(store)
    started, release = _held_hashing(monkeypatch)
    answered: list[int] = []
    try:
        request = threading.Thread(
            target=lambda: answered.append(predict(client, OCR_ENTRIES, image=PHOTO).status_code)
        )
        request.start()
        request.join(60)
        assert started.is_set()  # hashing had begun, and is held
        assert answered == [200]  # answered while it was held
    finally:
        release.set()
    det = next(m for m in client.get("/info").json()["models"] if m["type"] == "detection")
    assert det["files"]["model"]["sha256"] == sha256_file(folder / "detection" / "model.onnx")
    hashers = [t.native_id for t in threading.enumerate() if t.name.startswith("describe")]  # every registry's
    assert hashers and all(tid is not None and os.getpriority(os.PRIO_PROCESS, tid) == 19 for tid in hashers)


def test_a_file_replaced_before_it_was_hashed_is_shown_without_a_sha256(client, store, monkeypatch):
    """Its successor's sha256 would describe a file that is not loaded: /info shows the size as loaded and no
    sha256 (the next request loads the new file, which is then described)."""
    folder = _ocr_in_store(store)
    model = folder / "detection" / "model.onnx"
    loaded_size = model.stat().st_size
    started, release = _held_hashing(monkeypatch)
    try:
        assert predict(client, OCR_ENTRIES, image=PHOTO).status_code == 200
        assert started.wait(60)
        replacement = model.with_name("new.onnx")
        shutil.copyfile(model, replacement)
        with replacement.open("ab") as f:
            f.write(b"\0" * 16)  # another version of the file (ONNX ignores nothing here: it is never loaded)
        replacement.replace(model)
    finally:
        release.set()
    det = next(m for m in client.get("/info").json()["models"] if m["type"] == "detection")
    assert det["files"]["model"] == {"path": "ocr/PP-OCRv5_mobile/detection/model.onnx", "size": loaded_size,
                                     "sha256": None}  # fmt: skip


def test_a_stopping_server_drops_hashing_not_yet_begun(client, store, monkeypatch):
    """Hashing no request waits for must not hold up a stop either: what has not begun is dropped (the file being
    hashed is finished), and the model it was for shows no files rather than failing."""
    from immich_aio import store as store_module
    from immich_aio.store import sha256_file

    folder = _ocr_in_store(store)
    started, release = _held_hashing(monkeypatch)
    hashed: list[Path] = []
    held = store_module.sha256_file

    def recorded(path, *args, **kwargs):
        hashed.append(Path(path))
        return held(path, *args, **kwargs)

    monkeypatch.setattr(store_module, "sha256_file", recorded)
    registry = client.app.state.runtime.registry
    try:
        assert predict(client, OCR_ENTRIES, image=PHOTO).status_code == 200  # one model's hash held, the other's queued
        assert started.wait(60)
        registry.close()
    finally:
        release.set()
    # the two models load side by side (ModelRegistry.load_ahead), so either may be the one hashed first
    first = hashed[0].parent.name
    queued = {"detection": "recognition", "recognition": "detection"}[first]
    loaded = {e.spec.type: e for e in registry.loaded()}
    assert loaded[queued].described is not None and loaded[queued].described.cancelled()
    assert loaded[queued].files == {}
    assert loaded[first].files["model"].sha256 == sha256_file(folder / first / "model.onnx")
    assert len(hashed) == 1
    registry.unload_all()  # a load still under way at the stop: it loads, undescribed
    assert predict(client, OCR_ENTRIES, image=PHOTO).status_code == 200
    assert all(e.files == {} for e in registry.loaded())


# --- class 7: one bad store entry -----------------------------------------------------------------


def test_a_store_entry_leading_outside_affects_only_itself(tmp_path, store, make_client, tiny_a):
    install_tiny(ModelStore(store), tiny_a)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (store / "clip" / "evil").symlink_to(outside)
    (store / "ocr").mkdir()
    (store / "ocr" / "evil").symlink_to(outside)
    with captured_logs() as logs:
        client = make_client()
        for _ in range(3):
            assert predict(client, VISUAL, image=PHOTO).status_code == 200
            assert predict(client, OCR_ENTRIES, image=PHOTO).status_code == 200
        assert predict(client, {"clip": {"visual": {"modelName": "evil"}}}, image=PHOTO).status_code == 400
        info = client.get("/info").json()
    assert set(info["skippedStoreEntries"]) == {"clip/evil", "ocr/evil"}
    warnings = [line for line in logs.lines(logging.WARNING) if "clip/evil" in line]
    assert len(warnings) == 1


# --- class 12: whole-string name checks -----------------------------------------------------------


@pytest.mark.parametrize("name", ["PP-OCRv5_mobile\n", " PP-OCRv5_mobile", "PP-OCRv5_mobile\x00"])
def test_names_must_match_as_whole_strings(client, name):
    entries = {"ocr": {"detection": {"modelName": name}, "recognition": {"modelName": name}}}
    assert predict(client, entries, image=PHOTO).status_code == 400


# --- class 13: disconnects and shutdown -----------------------------------------------------------


@pytest.mark.slow
def test_sigterm_with_a_backlog_answers_json_503_and_exits_0(store):
    image = (FIXTURES / "ocr" / "small_text_1440.jpg").read_bytes()
    with server_process(store, IMMICH_AIO_SHUTDOWN_GRACE_S="0.5", IMMICH_AIO_CONCURRENT_RUNS="1") as (url, proc):

        def post():
            try:
                return httpx.post(
                    url + "/predict", data={"entries": json.dumps(OCR_ENTRIES)}, files={"image": image}, timeout=120
                )
            except httpx.HTTPError as e:
                return e

        assert post().status_code == 200

        def in_flight() -> float:
            metrics = httpx.get(url + "/metrics", timeout=10).text
            line = next(ln for ln in metrics.splitlines() if ln.startswith("immich_aio_requests_in_flight "))
            return float(line.split()[1])

        with ThreadPoolExecutor(10) as pool:
            futures = [pool.submit(post) for _ in range(10)]
            # all ten admitted: one run at a time cannot finish ten 1440-px OCRs within the 0.5 s grace
            wait_for(lambda: in_flight() >= 10, "ten requests in flight", 30)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            late = post()
            results = [f.result(120) for f in futures]
        code = proc.wait(60)
        out = proc.stdout.read().decode(errors="replace")
    assert code == 0, out
    assert "Traceback" not in out
    statuses = [r.status_code for r in results]
    assert set(statuses) <= {200, 503} and 503 in statuses, statuses
    for r in results:
        if r.status_code == 503:
            assert r.headers["content-type"] == "application/json" and "Shutting down" in r.json()["detail"]
    assert isinstance(late, httpx.HTTPError) or (late.status_code == 503 and "Shutting down" in late.json()["detail"])
    assert "Stopped: requests finished, models unloaded" in out
