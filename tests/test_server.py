"""The real server process: concurrent requests, /ping while busy, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import FIXTURES, OCR_ENTRIES

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path, request):
    level, host = getattr(request, "param", ("warn", "127.0.0.1"))
    port = free_port()
    env = dict(
        os.environ,
        IMMICH_HOST=host,
        IMMICH_PORT=str(port),
        MACHINE_LEARNING_CACHE_FOLDER=str(tmp_path / "models"),
        MACHINE_LEARNING_REQUEST_THREADS="2",
        IMMICH_LOG_LEVEL=level,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "immich_aio"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ping", timeout=1).text == "pong":
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("server did not start: " + proc.stdout.read().decode(errors="replace"))
    yield url, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def post(url: str, name: str) -> httpx.Response:
    files = {"image": ("blob", (FIXTURES / "ocr" / name).read_bytes(), "application/octet-stream")}
    return httpx.post(url + "/predict", data={"entries": json.dumps(OCR_ENTRIES)}, files=files, timeout=120)


@pytest.mark.slow
def test_concurrent_requests_all_answered(server):
    url, _ = server
    names = ["receipt.jpg", "sign.jpg", "small_text_1440.jpg", "rotated.jpg"] * 3
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda n: post(url, n), names))
    assert all(r.status_code == 200 for r in results)
    # identical inputs give identical answers however requests interleave
    by_name: dict[str, set[str]] = {}
    for n, r in zip(names, results, strict=True):
        by_name.setdefault(n, set()).add(json.dumps(r.json(), sort_keys=True))
    assert all(len(v) == 1 for v in by_name.values())


@pytest.mark.slow
def test_ping_answers_while_every_worker_is_busy(server):
    url, _ = server
    post(url, "sign.jpg")  # models loaded
    done = threading.Event()
    pongs_while_busy = []

    def hammer():
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: post(url, "small_text_1440.jpg"), range(8)))
        done.set()

    t = threading.Thread(target=hammer)
    t.start()
    time.sleep(0.3)
    while not done.is_set() and len(pongs_while_busy) < 5:
        r = httpx.get(url + "/ping", timeout=5)
        if not done.is_set():
            pongs_while_busy.append(r.text)
        time.sleep(0.05)
    t.join(120)
    assert pongs_while_busy and set(pongs_while_busy) == {"pong"}


@pytest.mark.parametrize("server", [("info", "127.0.0.1")], indirect=True)
def test_sigterm_shuts_down_gracefully(server):
    url, proc = server
    assert post(url, "rotated.jpg").status_code == 200
    proc.send_signal(signal.SIGTERM)
    # a drained shutdown is a clean one: exit status 0 (uvicorn alone re-raised the signal: 143)
    assert proc.wait(30) == 0
    out = proc.stdout.read().decode(errors="replace")
    assert "Stopped: requests finished, models unloaded" in out
    assert "Traceback" not in out


@pytest.mark.parametrize("server", [("warn", "[::]")], indirect=True)
def test_default_all_interfaces_bind_takes_ipv4_and_ipv6(server):
    """IMMICH_HOST's default [::] must accept IPv4 clients too (the Immich server often connects by IPv4)."""
    url, _ = server
    port = url.rsplit(":", 1)[1]
    assert httpx.get(f"http://127.0.0.1:{port}/ping", timeout=5).text == "pong"
    from immich_aio.config import _ipv6_available

    if _ipv6_available():
        assert httpx.get(f"http://[::1]:{port}/ping", timeout=5).text == "pong"


def test_unavailable_provider_is_a_clear_startup_error(tmp_path):
    env = dict(
        os.environ,
        IMMICH_AIO_PROVIDERS="TensorrtExecutionProvider",
        IMMICH_PORT=str(free_port()),
        MACHINE_LEARNING_CACHE_FOLDER=str(tmp_path),
    )
    out = subprocess.run(
        [sys.executable, "-m", "immich_aio"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "TensorrtExecutionProvider" in out.stderr and "CPUExecutionProvider" in out.stderr
    assert "Traceback" not in out.stderr
