"""A new user's first run (issue 17): an empty model volume, Immich's first jobs, and every answer a 200.

Against the local stand-in hub: Chinese-CLIP's ready export (transformers.js layout, tiny random weights) and
Immich's face pack, fetched on the first request for them, once per model, with progress in /info.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from cnclip_ref import vocab_path
from conftest import FIXTURES, OCR_ENTRIES, settings_for
from face_models import make_arcface, make_scrfd
from fakehub import FakeHub, rapidocr_hub
from live import InProcessServer, captured_logs, free_port
from xenova_clip import IMAGE_SIZE, combined_export, tiny_hf_model

from immich_aio.download import clip as clip_download
from immich_aio.download.cli import main as models_main
from immich_aio.models.ocr import bundled_model_dir

XENOVA = "Xenova/chinese-clip-vit-base-patch16"
PACK_REPO = "immich-app/buffalo_l"
IMAGE = (FIXTURES / "ocr" / "sign.jpg").read_bytes()
CLIP_VISUAL = {"clip": {"visual": {"modelName": "ViT-B-32__openai", "options": {}}}}
CLIP_TEXT = {"clip": {"textual": {"modelName": "ViT-B-32__openai", "options": {"language": "zh"}}}}
FACES = {
    "facial-recognition": {
        "detection": {"modelName": "buffalo_l", "options": {"minScore": 0.3}},
        "recognition": {"modelName": "buffalo_l", "options": {}},
    }
}
DEADLINE_S = 60
pytestmark = pytest.mark.slow  # real servers, a stand-in hub, models exported at test time


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    src = tmp_path_factory.mktemp("repos")
    combined = combined_export(tiny_hf_model(), src / "model.onnx")
    return {
        XENOVA: {"onnx/model.onnx": combined.read_bytes(), "vocab.txt": vocab_path().read_bytes()},
        PACK_REPO: {
            "detection/model.onnx": make_scrfd(src / "det.onnx").read_bytes(),
            "recognition/model.onnx": make_arcface(src / "rec.onnx").read_bytes(),
        },
    }


@pytest.fixture
def hub(repos, monkeypatch):
    monkeypatch.setitem(
        clip_download.ONNX_RELEASES, "ViT-B-16", clip_download.OnnxRelease(XENOVA, "main", IMAGE_SIZE, 512)
    )
    with FakeHub() as fake:
        for repo, files in repos.items():
            fake.add_hf_repo(repo, files, lfs={"onnx/model.onnx", "recognition/model.onnx"})
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        yield fake


def server(store: Path, **env: str) -> InProcessServer:
    env = {
        "IMMICH_PORT": str(free_port()),
        "IMMICH_AIO_AUTO_FETCH": "true",
        "MACHINE_LEARNING_REQUEST_THREADS": "4",
    } | env
    return InProcessServer(settings_for(store, **env))


def post(url: str, entries: dict, image: bytes | None = None, text: str | None = None) -> httpx.Response:
    files = {"image": ("blob", image, "application/octet-stream")} if image is not None else None
    data = {"entries": json.dumps(entries)} | ({"text": text} if text is not None else {})
    return httpx.post(url + "/predict", data=data, files=files, timeout=DEADLINE_S * 3)


def gets(hub: FakeHub, path: str) -> list[str | None]:
    return [r.range for r in hub.requests if r.path == path and r.method == "GET"]


def downloads(url: str) -> dict[str, dict]:
    return {d["model"]: d for d in httpx.get(url + "/info", timeout=10).json()["downloads"]}


def wait_until(check, what: str, seconds: float = DEADLINE_S):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {seconds} s")


def vector(body: dict) -> np.ndarray:
    v = np.array(json.loads(body["clip"]))
    return v / np.linalg.norm(v)


def same_faces(a: dict, b: dict) -> bool:
    fa, fb = a["facial-recognition"], b["facial-recognition"]
    if len(fa) != len(fb):
        return False
    for x, y in zip(fa, fb, strict=True):
        if x["boundingBox"] != y["boundingBox"] or abs(x["score"] - y["score"]) > 1e-4:
            return False
        ex, ey = np.array(json.loads(x["embedding"])), np.array(json.loads(y["embedding"]))
        if float(ex @ ey / np.linalg.norm(ex) / np.linalg.norm(ey)) < 0.9999:
            return False
    return True


def test_the_first_upload_burst_on_an_empty_store_is_all_200(tmp_path, hub):
    # What a pre-installed store answers (the same files, fetched by hand)
    reference = tmp_path / "installed"
    assert models_main(["--store", str(reference), "clip", "--arch", "ViT-B-16"]) == 0
    assert models_main(["--store", str(reference), "faces", "--pack", "buffalo_l"]) == 0
    with server(reference, IMMICH_AIO_AUTO_FETCH="false") as srv:
        expected = {
            "clip": vector(post(srv.url, CLIP_VISUAL, IMAGE).json()),
            "text": vector(post(srv.url, CLIP_TEXT, text="海边的日落").json()),
            "faces": post(srv.url, FACES, IMAGE).json(),
        }
    hub.requests.clear()

    # The fresh store: the hub sends a third of each big file, then holds until released
    release = threading.Event()
    blobs = {
        "CN-CLIP-ViT-B-16": hub.served_path(XENOVA, "onnx/model.onnx"),
        "buffalo_l": hub.served_path(PACK_REPO, "recognition/model.onnx"),
    }
    for path in blobs.values():
        hub.holds[path] = (len(hub._blobs[path]) // 3, release)
    store = tmp_path / "fresh"
    with captured_logs() as logs, server(store) as srv, ThreadPoolExecutor(24) as pool:
        try:
            clip = [pool.submit(post, srv.url, CLIP_VISUAL, IMAGE) for _ in range(8)]
            faces = [pool.submit(post, srv.url, FACES, IMAGE) for _ in range(8)]
            ocr = [pool.submit(post, srv.url, OCR_ENTRIES, IMAGE) for _ in range(2)]
            search = pool.submit(post, srv.url, CLIP_TEXT, None, "海边的日落")

            def both_in_progress():
                shown = downloads(srv.url)
                return (
                    all(m in shown and shown[m]["state"] == "downloading" and shown[m]["bytesDone"] > 0 for m in blobs)
                    and shown
                )

            shown = wait_until(both_in_progress, "both downloads shown in progress in /info")
            assert shown["CN-CLIP-ViT-B-16"]["requestedFor"] == "ViT-B-32__openai"
            assert shown["buffalo_l"]["command"] == "immich-aio models faces --pack buffalo_l"
            assert httpx.get(srv.url + "/ping", timeout=5).text == "pong"
            # OCR needs no download: answered while the others wait, its request threads never taken by waiters
            assert [f.result(timeout=DEADLINE_S).status_code for f in ocr] == [200, 200]
            assert not any(f.done() for f in clip + faces)
        finally:
            release.set()
        clip_answers = [f.result(timeout=DEADLINE_S) for f in clip]
        face_answers = [f.result(timeout=DEADLINE_S) for f in faces]
        search_answer = search.result(timeout=DEADLINE_S)
        final = downloads(srv.url)
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
    assert [r.status_code for r in clip_answers + face_answers + [search_answer]] == [200] * 17
    for r in clip_answers:
        assert float(vector(r.json()) @ expected["clip"]) >= 0.99999
    assert float(vector(search_answer.json()) @ expected["text"]) >= 0.99999
    assert all(same_faces(r.json(), expected["faces"]) for r in face_answers)
    for path in blobs.values():
        assert gets(hub, path) == [None]  # one download per model, whatever the number of requests
    assert {m: d["state"] for m, d in final.items()} == {"CN-CLIP-ViT-B-16": "installed", "buffalo_l": "installed"}
    assert 'immich_aio_model_downloads_total{outcome="installed",task="clip"} 1.0' in metrics
    warnings = [line for line in logs.lines(logging.WARNING) if "Smart Search > All" in line]
    assert len(warnings) == 1 and "ViT-B-32__openai" in warnings[0]


def test_a_failing_hub_gets_503s_with_the_reason_then_success_and_is_not_hammered(tmp_path, hub):
    blob = hub.served_path(PACK_REPO, "recognition/model.onnx")
    hub.faults[blob] = 503
    with server(tmp_path / "models") as srv:
        srv.runtime.fetcher.retry_first_s = 3.0
        r = post(srv.url, FACES, IMAGE)
        assert r.status_code == 503
        detail = r.json()["detail"]
        assert "buffalo_l" in detail and "HTTP 503" in detail and "immich-aio models faces --pack buffalo_l" in detail
        attempts = len(gets(hub, blob))
        for _ in range(5):  # within the backoff: answered at once, the hub left alone
            r = post(srv.url, FACES, IMAGE)
            assert r.status_code == 503 and "next attempt" in r.json()["detail"]
        assert len(gets(hub, blob)) == attempts
        assert downloads(srv.url)["buffalo_l"]["lastError"]
        hub.faults.clear()

        def answered():
            r = post(srv.url, FACES, IMAGE)
            assert r.status_code in (200, 503), r.text
            return r.status_code == 200

        wait_until(answered, "the face job succeeding once the hub is back")
        assert downloads(srv.url)["buffalo_l"]["attempts"] == 2


def test_with_fetching_off_a_missing_model_is_the_400_naming_the_command(tmp_path, hub):
    with server(tmp_path / "models", IMMICH_AIO_AUTO_FETCH="false") as srv:
        r = post(srv.url, FACES, IMAGE)
        assert r.status_code == 400 and "immich-aio models faces --pack buffalo_l" in r.json()["detail"]
        r = post(srv.url, CLIP_VISUAL, IMAGE)
        assert r.status_code == 400 and "immich-aio models clip --arch ViT-B-16" in r.json()["detail"]
        assert downloads(srv.url) == {}
    with server(tmp_path / "models", HF_HUB_OFFLINE="1") as srv:  # Hugging Face's own offline switch, too
        assert post(srv.url, FACES, IMAGE).status_code == 400
    assert hub.requests == []


def test_a_wait_past_its_bound_is_a_503_saying_how_far_it_got(tmp_path, hub):
    release = threading.Event()
    blob = hub.served_path(XENOVA, "onnx/model.onnx")
    hub.holds[blob] = (len(hub._blobs[blob]) // 3, release)
    env = {"IMMICH_AIO_FETCH_WAIT_S": "2", "IMMICH_AIO_FETCH_WAIT_TEXT_S": "1"}
    with server(tmp_path / "models", **env) as srv:
        try:
            for entries, image, text in ((CLIP_TEXT, None, "一只猫"), (CLIP_VISUAL, IMAGE, None)):
                r = post(srv.url, entries, image, text)
                assert r.status_code == 503
                detail = r.json()["detail"]
                assert "being fetched on first use" in detail and "MB" in detail
                assert "immich-aio models clip --arch ViT-B-16" in detail
        finally:
            release.set()
        wait_until(lambda: downloads(srv.url)["CN-CLIP-ViT-B-16"]["state"] == "installed", "the download landing")
        assert post(srv.url, CLIP_TEXT, None, "一只猫").status_code == 200
    assert gets(hub, blob) == [None]


def test_a_download_cut_half_way_resumes_with_a_range_request_after_a_restart(tmp_path, hub):
    blob = hub.served_path(XENOVA, "onnx/model.onnx")
    size = len(hub._blobs[blob])
    hub.cut_after[blob] = size // 2
    store = tmp_path / "models"
    with server(store) as srv:
        r = post(srv.url, CLIP_VISUAL, IMAGE)
        assert r.status_code == 503 and f"ended at {size // 2} of {size} bytes" in r.json()["detail"]
    part = store / ".downloads" / "hf" / XENOVA.replace("/", "--") / "onnx" / "model.onnx.part"
    assert part.stat().st_size == size // 2  # kept across the restart
    with server(store) as srv:
        assert post(srv.url, CLIP_VISUAL, IMAGE).status_code == 200
    assert gets(hub, blob) == [None, f"bytes={size // 2}-"]
    assert not part.exists()


def test_a_part_of_another_version_of_the_file_is_never_completed(tmp_path, hub, repos):
    """The hub moved on between two runs: the old part is discarded, not finished with the new file's bytes."""
    blob = hub.served_path(XENOVA, "onnx/model.onnx")
    hub.cut_after[blob] = len(hub._blobs[blob]) // 2
    store = tmp_path / "models"
    assert models_main(["--store", str(store), "clip", "--arch", "ViT-B-16"]) == 1
    newer = combined_export(tiny_hf_model(seed=1), tmp_path / "newer.onnx").read_bytes()
    hub.add_hf_repo(XENOVA, {**repos[XENOVA], "onnx/model.onnx": newer}, lfs={"onnx/model.onnx"})
    new_blob = f"/blobs/{hashlib.sha256(newer).hexdigest()}"
    assert models_main(["--store", str(store), "clip", "--arch", "ViT-B-16"]) == 0
    assert gets(hub, new_blob) == [None]  # from byte 0


def test_an_ocr_name_the_bundled_model_cannot_read_gets_its_own_files(tmp_path, monkeypatch):
    det = (bundled_model_dir() / "PP-OCRv6_det_small.onnx").read_bytes()
    rec = (bundled_model_dir() / "PP-OCRv6_rec_small.onnx").read_bytes()  # stands in for the Korean recogniser
    files = {"det/ch_PP-OCRv5_det_mobile": det, "rec/korean_PP-OCRv5_rec_mobile": rec}
    entries = {"ocr": {t: {**v, "modelName": "KOREAN__PP-OCRv5_mobile"} for t, v in OCR_ENTRIES["ocr"].items()}}
    with rapidocr_hub(monkeypatch, files) as (hub, _registry), server(tmp_path / "models") as srv:
        # Latin and Chinese names stay on the bundled model, with no download
        assert post(srv.url, OCR_ENTRIES, IMAGE).status_code == 200
        assert hub.requests == []
        assert post(srv.url, entries, IMAGE).status_code == 200
        served = {(m["type"], m["name"]) for m in httpx.get(srv.url + "/info", timeout=10).json()["models"]}
    assert ("recognition", "KOREAN__PP-OCRv5_mobile") in served and ("detection", "PP-OCRv5_mobile") in served


def test_a_preloaded_name_with_no_model_starts_its_download_at_startup(tmp_path, hub):
    env = {"MACHINE_LEARNING_PRELOAD__FACIAL_RECOGNITION__DETECTION": "buffalo_l"}
    with server(tmp_path / "models", **env) as srv:

        def preloaded():
            models = httpx.get(srv.url + "/info", timeout=10).json()["models"]
            return [m for m in models if m["name"] == "buffalo_l" and m["preloaded"]]

        wait_until(preloaded, "the preloaded pack fetched and loaded with no request")
        assert downloads(srv.url)["buffalo_l"]["state"] == "installed"


def test_an_install_of_the_same_model_by_the_cli_is_waited_for_not_repeated(tmp_path, hub):
    from immich_aio.download.install import install_lock
    from immich_aio.store import ModelStore

    store = tmp_path / "models"
    with server(store) as srv, ThreadPoolExecutor(1) as pool:
        with install_lock(ModelStore(store), "facial-recognition/buffalo_l"):  # `immich-aio models faces` running
            answer = pool.submit(post, srv.url, FACES, IMAGE)
            shown = wait_until(
                lambda: downloads(srv.url).get("buffalo_l", {}).get("state") == "waiting-for-other-install",
                "the fetch waiting for the other install",
            )
            assert shown and hub.requests == []
        assert answer.result(timeout=DEADLINE_S).status_code == 200


def test_with_immich_as_the_choice_immichs_own_model_is_fetched_for_the_name(tmp_path, monkeypatch):
    from immich_clip_models import install

    src = install(tmp_path / "src", "openclip")
    files = {str(p.relative_to(src)): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    with FakeHub() as hub:
        hub.add_hf_repo("immich-app/ViT-B-32__openai", files)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with server(tmp_path / "models", IMMICH_AIO_AUTO_FETCH_CLIP="immich") as srv:
            got = post(srv.url, CLIP_VISUAL, IMAGE)
            assert got.status_code == 200
            info = httpx.get(srv.url + "/info", timeout=10).json()
    assert info["answers"]["clip"]["ViT-B-32__openai"] == {"servedBy": "ViT-B-32__openai", "why": "its own files"}
    assert set(downloads_of(info)) == {"ViT-B-32__openai"}
    install(tmp_path / "reference", "openclip")  # Immich ML's cache, laid out by hand
    with server(tmp_path / "reference", IMMICH_AIO_AUTO_FETCH="false") as srv:
        want = post(srv.url, CLIP_VISUAL, IMAGE)
    assert float(vector(got.json()) @ vector(want.json())) >= 0.99999


def test_a_name_of_a_dimension_with_no_torch_free_chinese_clip_gets_immichs_own_model(tmp_path, hub):
    # The hub holds no immich-app/ViT-H-14 repo: what is asked for is what matters here.
    with server(tmp_path / "models") as srv:
        entries = {"clip": {"visual": {"modelName": "ViT-H-14__laion2b-s32b-b79k", "options": {}}}}
        answer = post(srv.url, entries, IMAGE)
        assert answer.status_code == 503
        assert "immich-app/ViT-H-14__laion2b-s32b-b79k" in answer.json()["detail"]
        assert "immich-aio models clip --immich ViT-H-14__laion2b-s32b-b79k" in answer.json()["detail"]
    assert not any("Xenova" in r.path for r in hub.requests)


def downloads_of(info: dict) -> dict[str, dict]:
    return {d["model"]: d for d in info["downloads"]}
