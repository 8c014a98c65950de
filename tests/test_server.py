"""The real server process: concurrent requests, /ping while busy, SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import FIXTURES, OCR_ENTRIES
from live import free_port, server_process

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def server(tmp_path, request):
    level, host = getattr(request, "param", ("warn", "127.0.0.1"))
    env = {"IMMICH_HOST": host, "MACHINE_LEARNING_REQUEST_THREADS": "2", "IMMICH_LOG_LEVEL": level}
    with server_process(tmp_path / "models", **env) as (url, proc):
        yield url, proc


def post(url: str, name: str) -> httpx.Response:
    files = {"image": ("blob", (FIXTURES / "ocr" / name).read_bytes(), "application/octet-stream")}
    return httpx.post(url + "/predict", data={"entries": json.dumps(OCR_ENTRIES)}, files=files, timeout=120)


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
    """Five pings answered while more requests are in flight than there are request threads (two here).

    The load runs until the pings are done, and each ping is taken between two readings of /metrics that both
    show the server busy, so no timing decides whether the test saw a busy server.
    """
    url, _ = server
    post(url, "sign.jpg")  # models loaded
    stop, answers = threading.Event(), []

    def hammer():
        while not stop.is_set():
            answers.append(post(url, "small_text_1440.jpg").status_code)

    def in_flight() -> float:
        body = httpx.get(url + "/metrics", timeout=10).text
        return float(re.search(r"^immich_aio_requests_in_flight (\S+)$", body, re.M).group(1))

    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(hammer)
        try:
            pongs, deadline = [], time.monotonic() + 120
            while len(pongs) < 5 and time.monotonic() < deadline:
                before = in_flight()
                pong = httpx.get(url + "/ping", timeout=5).text
                if before >= 3 and in_flight() >= 3:
                    pongs.append(pong)
        finally:
            stop.set()
    assert pongs == ["pong"] * 5, "fewer than five pings were taken while the server was busy"
    assert answers and set(answers) == {200}


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
