"""No job refused because others are waiting (issue 17, point 4): admission goes by what a request costs.

Immich drops a job that gets a non-2xx, so 200 requests at once must all get their 200, and clients that
trickle their bodies must not take the place of a real request. Only a machine short of memory or spool
disk refuses, saying which.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import FIXTURES, OCR_ENTRIES
from live import server_process
from PIL import Image

from immich_aio import admission
from immich_aio.admission import Admission
from immich_aio.errors import ServiceUnavailable

DEADLINE_S = 120


def small_text_image() -> bytes:
    """The sign fixture scaled down: real text, cheap enough to OCR 200 times on two cores."""
    image = Image.open(FIXTURES / "ocr" / "sign.jpg").convert("RGB")
    image.thumbnail((360, 360))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def ocr(url: str, image: bytes) -> int:
    data = {"entries": json.dumps(OCR_ENTRIES)}
    files = {"image": ("blob", image, "application/octet-stream")}
    return httpx.post(url + "/predict", data=data, files=files, timeout=DEADLINE_S).status_code


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


class Pinger(threading.Thread):
    """/ping every 0.2 s while the load runs; records every answer (or failure) for the test's own thread."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop, self.answers = url, threading.Event(), []

    def run(self) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                self.answers.append(httpx.get(self.url + "/ping", timeout=5).text)
            except httpx.HTTPError as e:
                self.answers.append(f"failed: {e!r}")
            self.stop.wait(0.2)


@pytest.mark.slow
def test_200_concurrent_requests_are_all_answered_200(store):
    image = small_text_image()
    with server_process(store, MACHINE_LEARNING_REQUEST_THREADS="8") as (url, proc):
        assert ocr(url, image) == 200  # the model loaded: what follows measures the queue alone
        # a small backlog first: each model's second session for split runs (IMMICH_AIO_SPLIT_RUNS) is part of
        # loading it under load, made once, not something the queue's length grows
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(lambda _: ocr(url, image), range(16))) == [200] * 16
        before = peak_rss_mb(proc.pid)
        pinger = Pinger(url)
        pinger.start()
        with ThreadPoolExecutor(200) as pool:
            statuses = list(pool.map(lambda _: ocr(url, image), range(200)))
        pinger.stop.set()
        pinger.join(10)
        after = peak_rss_mb(proc.pid)
    assert statuses == [200] * 200
    assert pinger.answers and all(a == "pong" for a in pinger.answers), pinger.answers
    assert after - before < 400, f"peak RSS grew {after - before:.0f} MB under 200 queued requests"


@pytest.mark.slow
def test_slow_clients_trickling_bodies_do_not_take_a_real_requests_place(store):
    image = small_text_image()
    boundary = "slowclient"
    with server_process(store, IMMICH_AIO_BODY_TIMEOUT_S="30") as (url, _proc):
        host, port = url.removeprefix("http://").split(":")
        slow: list[socket.socket] = []
        try:
            for _ in range(150):
                s = socket.create_connection((host, int(port)), timeout=10)
                s.sendall(
                    (
                        f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; "
                        f"boundary={boundary}\r\nContent-Length: 100000\r\n\r\n--{boundary}\r\n"
                    ).encode()
                )
                slow.append(s)
            stop = threading.Event()

            def trickle() -> None:  # a few bytes per client per second, until the real request is answered
                deadline = time.monotonic() + DEADLINE_S
                while not stop.is_set() and time.monotonic() < deadline:
                    for s in slow:
                        with contextlib.suppress(OSError):
                            s.send(b"x")
                    stop.wait(0.5)

            trickler = threading.Thread(target=trickle, daemon=True)
            trickler.start()
            time.sleep(1.0)  # every slow body is being read
            try:
                assert ocr(url, image) == 200
                info = httpx.get(url + "/metrics", timeout=10).text
            finally:
                stop.set()
                trickler.join(10)
            in_flight = next(line for line in info.splitlines() if line.startswith("immich_aio_requests_in_flight "))
            assert float(in_flight.split()[1]) >= 150  # they were all admitted, and still the real one ran
        finally:
            for s in slow:
                s.close()


def test_refused_only_when_memory_or_disk_is_short_and_says_why(monkeypatch, tmp_path):
    gate = Admission(
        max_upload_bytes=64 << 20, memory_reserve=256 << 20, disk_reserve=256 << 20, spool_dir=str(tmp_path)
    )
    monkeypatch.setattr(admission, "available_memory", lambda: 8 << 30)
    gate.check(10_000)  # ten thousand waiting requests are no reason to refuse
    gate._sampled_at = -1.0
    monkeypatch.setattr(admission, "available_memory", lambda: 100 << 20)
    with pytest.raises(ServiceUnavailable, match=r"100 MB of memory left.*IMMICH_AIO_MEMORY_RESERVE_MB"):
        gate.check(3)
    gate._sampled_at = -1.0
    monkeypatch.setattr(admission, "available_memory", lambda: 8 << 30)
    monkeypatch.setattr(admission.shutil, "disk_usage", lambda path: type("U", (), {"free": 200 << 20})())
    with pytest.raises(ServiceUnavailable, match=rf"200 MB free in {tmp_path}.*TMPDIR"):
        gate.check(3)
    capped = Admission(64 << 20, 0, 0, max_count=5, spool_dir=str(tmp_path))
    with pytest.raises(ServiceUnavailable, match="IMMICH_AIO_MAX_QUEUED=5"):
        capped.check(5)


def test_a_cgroup_limit_lowers_the_memory_seen(monkeypatch, tmp_path):
    files = {
        "/proc/meminfo": "MemTotal: 32000000 kB\nMemAvailable: 30000000 kB\n",
        "/sys/fs/cgroup/memory.max": "1073741824\n",
        "/sys/fs/cgroup/memory.current": "805306368\n",
    }
    real_open = open

    def fake_open(path, *args, **kwargs):
        return io.StringIO(files[path]) if path in files else real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: files.get(str(self), ""))
    assert admission.available_memory() == 1073741824 - 805306368
