"""The allocator the server runs on (issue 13): jemalloc preloaded by restarting itself, never in a loop,
the user's choice respected, and a clear refusal when the allocator asked for is not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import OCR_ENTRIES, MissingTool, encode
from live import ROOT, server_process

from immich_aio import memory
from immich_aio.config import ConfigError, Settings

ALLOC = Path(__file__).parent / ".vendor" / "alloc"
JEMALLOC, MIMALLOC = ALLOC / "libjemalloc.so.2", ALLOC / "libmimalloc.so.2"


@pytest.fixture(autouse=True)
def _libraries():
    if not (JEMALLOC.is_file() and MIMALLOC.is_file()):
        raise MissingTool(f"the allocator libraries in {ALLOC}", "it unpacks them")


def served(url: str) -> str:
    image = encode(np.full((64, 64, 3), 255, "uint8"))
    r = httpx.post(url + "/predict", data={"entries": json.dumps(OCR_ENTRIES)}, files={"image": image}, timeout=60)
    assert r.status_code == 200, r.text
    return httpx.get(url + "/info", timeout=10).json()["allocator"]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in {"LD_PRELOAD", memory.REEXEC_MARK}}


@pytest.fixture(autouse=True)
def _no_preload(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(memory.REEXEC_MARK, raising=False)


def test_the_server_starts_itself_again_on_jemalloc(store):
    with server_process(store, IMMICH_AIO_ALLOCATOR=str(JEMALLOC)) as (url, proc):
        assert served(url) == "jemalloc"
        maps = Path(f"/proc/{proc.pid}/maps").read_text()  # same process: exec keeps the pid Docker watches
        assert str(JEMALLOC) in maps
        log = _log_so_far(proc, url)
        assert "memory allocator jemalloc" in log and "could not be preloaded" not in log


def test_a_library_the_loader_refuses_is_tried_once_then_glibc(store, tmp_path):
    broken = tmp_path / "libjemalloc.so.2"
    broken.write_bytes(b"not an ELF file")
    with server_process(store, IMMICH_AIO_ALLOCATOR=str(broken)) as (url, proc):
        assert served(url) == "glibc"
        log = _log_so_far(proc, url)
    assert log.count("memory allocator glibc") == 1  # one start after the one retry, no loop
    assert "Running on glibc malloc, not jemalloc" in log  # the operator learns the choice did not take


def test_an_allocator_the_user_preloaded_stands(store):
    with server_process(store, LD_PRELOAD=str(MIMALLOC)) as (url, _):
        assert served(url) == "mimalloc"
    with server_process(store, IMMICH_AIO_ALLOCATOR="glibc") as (url, _):
        assert served(url) == "glibc"


def test_an_allocator_that_is_not_installed_is_refused_at_start(store, monkeypatch):
    monkeypatch.setattr(memory, "_search_dirs", lambda: [Path("/nonexistent")])
    with pytest.raises(ValueError, match=r"apt install libmimalloc2\.0"):
        memory.wanted("mimalloc")
    assert memory.wanted("auto") in {("glibc", None), (memory.active(), None)}
    with pytest.raises(ValueError, match="not a jemalloc or mimalloc library"):
        memory.wanted("/etc/hostname")
    with pytest.raises(ConfigError, match="IMMICH_AIO_ALLOCATOR must be one of"):
        Settings.from_env({"IMMICH_AIO_ALLOCATOR": "tcmalloc"})
    env = dict(clean_env(), IMMICH_AIO_ALLOCATOR="/nowhere/libjemalloc.so.2", MACHINE_LEARNING_CACHE_FOLDER=str(store))
    done = subprocess.run([sys.executable, "-m", "immich_aio"], cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert done.returncode == 2 and b"not a jemalloc or mimalloc library" in done.stderr


def test_glibc_helpers(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    if memory.active() == "glibc":
        assert memory.limit_arenas(2) is True  # glibc on Linux accepts the cap
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert memory.limit_arenas(2) is False  # the user's own setting wins
    memory.trim()


def _log_so_far(proc: subprocess.Popen, url: str) -> str:
    """The server's output up to now: stop it (SIGTERM drains and exits) and read everything it wrote."""
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    return out.decode(errors="replace")


def test_memory_goes_back_when_the_server_falls_quiet_never_while_it_works(make_client, monkeypatch):
    from immich_aio import runtime
    from immich_aio.models.ocr import OcrRecognizer

    trims: list[float] = []
    monkeypatch.setattr(runtime, "IDLE_TRIM_S", 0.3)
    monkeypatch.setattr(runtime, "BUSY_TRIM_S", 1000.0)  # its own test below
    monkeypatch.setattr(memory, "trim", lambda: trims.append(time.monotonic()))
    release, entered = threading.Event(), threading.Event()
    real = OcrRecognizer.predict

    def held(self, payload, options):
        if payload.size == (64, 65):  # the slow request
            entered.set()
            assert release.wait(30)
        return real(self, payload, options)

    monkeypatch.setattr(OcrRecognizer, "predict", held)
    client = make_client()
    white = np.full((64, 64, 3), 255, "uint8")
    wide = np.full((64, 65, 3), 255, "uint8")
    data = {"entries": json.dumps(OCR_ENTRIES)}
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(client.post, "/predict", data=data, files={"image": encode(wide)})
        assert entered.wait(30)
        settled = client.app.state.runtime.settled  # what background work (packing) waits for
        assert not settled.is_set()
        for _ in range(3):  # answered while the slow one is still in flight: the server is not quiet
            assert client.post("/predict", data=data, files={"image": encode(white)}).status_code == 200
        time.sleep(0.8)
        assert trims == [] and not settled.is_set()
        finished = time.monotonic()
        release.set()
        assert slow.result(30).status_code == 200
    deadline = time.monotonic() + 10
    while not trims and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(trims) == 1 and trims[0] - finished >= 0.3
    assert settled.is_set()
    time.sleep(0.6)
    assert len(trims) == 1  # once per quiet spell


def test_memory_goes_back_every_so_often_while_the_server_stays_busy(make_client, monkeypatch):
    """Issue 19: freed pages are kept for the next requests, but not for ever: under steady work they go back
    every BUSY_TRIM_S, so a burst (a library's OCR pass) does not set the memory of everything after it."""
    from immich_aio import runtime
    from immich_aio.models.ocr import OcrRecognizer

    trims: list[float] = []
    monkeypatch.setattr(runtime, "IDLE_TRIM_S", 1000.0)  # only the busy trim can happen here
    monkeypatch.setattr(runtime, "BUSY_TRIM_S", 0.2)
    monkeypatch.setattr(memory, "trim", lambda: trims.append(time.monotonic()))
    release, entered = threading.Event(), threading.Event()
    real = OcrRecognizer.predict

    def held(self, payload, options):
        entered.set()
        assert release.wait(30)
        return real(self, payload, options)

    monkeypatch.setattr(OcrRecognizer, "predict", held)
    client = make_client()
    data = {"entries": json.dumps(OCR_ENTRIES)}
    with ThreadPoolExecutor(1) as pool:
        image = encode(np.full((64, 64, 3), 255, "uint8"))
        busy = pool.submit(client.post, "/predict", data=data, files={"image": image})
        assert entered.wait(30)
        deadline = time.monotonic() + 10
        while len(trims) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(trims) >= 2  # while the request was in flight
        release.set()
        assert busy.result(30).status_code == 200
    quiet_since = len(trims)
    time.sleep(0.6)
    assert len(trims) <= quiet_since + 1  # nothing in flight: the busy trim stops (at most one already due)
