"""Real servers for tests: a subprocess (signals, exit codes, logs) or uvicorn on a thread (instrumentable).

Both listen on 127.0.0.1 only and are stopped by the tests that start them.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_ping(url: str, seconds: float = 60, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ping", timeout=1).text == "pong":
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"server at {url} did not answer /ping in {seconds} s")


@contextmanager
def server_process(store: Path, **env: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m immich_aio` on a free port; yields (url, process); output is in process.stdout."""
    port = free_port()
    full = dict(
        os.environ,
        IMMICH_HOST="127.0.0.1",
        IMMICH_PORT=str(port),
        MACHINE_LEARNING_CACHE_FOLDER=str(store),
        MACHINE_LEARNING_REQUEST_THREADS="4",
        IMMICH_LOG_LEVEL="info",
    )
    full.update(env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "immich_aio"], cwd=ROOT, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for_ping(url, proc=proc)
        except RuntimeError:
            proc.kill()
            raise RuntimeError("server did not start: " + proc.stdout.read().decode(errors="replace")) from None
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


class InProcessServer:
    """The app under the project's own uvicorn server, on a thread, so tests can reach into its runtime."""

    def __init__(self, settings) -> None:
        from immich_aio.app import create_app
        from immich_aio.serving import Server, server_config

        self.app = create_app(settings)
        self.server = Server(server_config(settings, self.app, "127.0.0.1"), self.app, settings.shutdown_grace_s)
        self.url = f"http://127.0.0.1:{settings.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def runtime(self):
        return self.app.state.runtime

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        wait_for_ping(self.url, 30)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self, level: int = logging.DEBUG) -> list[str]:
        return [f"{r.levelname} {r.getMessage()}" for r in self.records if r.levelno >= level]


@contextmanager
def captured_logs(name: str = "immich_aio") -> Iterator[LogCapture]:
    handler = LogCapture()
    logger = logging.getLogger(name)
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
