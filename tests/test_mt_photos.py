"""One server for the whole Chinese photo stack (issue #9): the OCR fork of Immich on /predict, and the MT-Photos
AI API with its face service's /represent, on the same port, models and machinery.

The shapes are those of mt-photos-api.md (§6 is the checklist these tests follow).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from cnclip_ref import install_tiny, tiny_model
from conftest import FIXTURES, OCR_ENTRIES, encode, predict
from face_models import install_pack
from live import captured_logs
from PIL import Image
from test_faces import photo_files

from immich_aio.config import ConfigError, Settings
from immich_aio.store import ModelStore

KEY = "mt_photos_ai_extra"
H = {"api-key": KEY}
SIGN = (FIXTURES / "ocr" / "sign.jpg").read_bytes()
FORK = {"ocr": {"recognition": {"modelName": "ocr"}}}


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=5)


@pytest.fixture
def mt(store, make_client, tiny):
    install_tiny(ModelStore(store), tiny)
    install_pack(store, "buffalo_l")
    return make_client(MT_PHOTOS_API_KEY=KEY, MACHINE_LEARNING_REQUEST_THREADS="8")


def upload(data: bytes, name: str = "photo.jpg") -> dict:
    return {"file": (name, data, "image/jpeg")}


def torch_features(model, rgb: np.ndarray) -> np.ndarray:
    """The official service's vector: cn_clip's encode_image output, un-normalised."""
    import torch

    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    resized = Image.fromarray(rgb).resize((32, 32), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float() / 255.0
    with torch.no_grad():
        return model.encode_image(((x - mean) / std)[None])[0].numpy()


# --- authentication ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/check", "/ocr", "/clip/img", "/clip/txt", "/represent", "/restart", "/restart_v2"])
def test_every_route_needs_the_key(mt, path):
    missing = mt.post(path)
    assert missing.status_code == 422
    assert missing.json() == {
        "detail": [{"type": "missing", "loc": ["header", "api-key"], "msg": "Field required", "input": None}]
    }
    wrong = mt.post(path, headers={"api-key": "not-the-key"}, files=upload(SIGN))
    assert (wrong.status_code, wrong.json()) == (401, {"detail": "Invalid API key"})  # before the body is read


def test_check_answers_pass_with_the_informational_keys(mt):
    body = mt.post("/check", headers=H).json()
    assert body["result"] == "pass" and body["title"] == "mt-photos-ai服务"
    assert body["help"] == "https://mtmt.tech/docs/advanced/ocr_api"
    assert (
        body["device"] == "cpu"
        and body["detector_backend"] == "insightface"
        and body["recognition_model"] == "buffalo_l"
    )


def test_the_api_is_off_without_a_key(make_client):
    client = make_client()
    r = client.post("/check", headers=H)
    assert r.status_code == 404 and "MT_PHOTOS_API_KEY" in r.json()["detail"]
    assert client.get("/ping").text == "pong"


def test_the_key_is_never_logged(mt, store):
    with captured_logs() as logs:
        for key in (KEY, KEY + "x", KEY[:-1], "x" * 300):
            mt.post("/check", headers={"api-key": key})
    text = "\n".join(r.getMessage() for r in logs.records)
    assert KEY[:10] not in text and "xxxx" not in text


def test_the_key_is_read_from_either_name_and_checked_at_start():
    assert Settings.from_env({"API_AUTH_KEY": KEY}).mt_api_key == KEY
    assert Settings.from_env({"MT_PHOTOS_API_KEY": "another-key", "API_AUTH_KEY": KEY}).mt_api_key == "another-key"
    assert Settings.from_env({}).mt_api_key is None  # no default key: off
    for bad in ("short", "has a space in it", "ключ-ключ-ключ"):
        with pytest.raises(ConfigError) as err:
            Settings.from_env({"MT_PHOTOS_API_KEY": bad})
        assert bad not in str(err.value) and "MT_PHOTOS_API_KEY" in str(err.value)
    assert "another-key" not in repr(Settings.from_env({"MT_PHOTOS_API_KEY": "another-key"}))


# --- CLIP ----------------------------------------------------------------------------------------


def strings(body: dict) -> np.ndarray:
    values = body["result"]
    assert all(isinstance(v, str) and re.fullmatch(r"-?\d+\.\d{16}", v) for v in values), values[:3]
    return np.array([float(v) for v in values], dtype=np.float64)


def test_clip_img_is_the_official_vector_and_differs_from_predict_only_by_normalisation(mt, tiny):
    rgb = np.asarray(Image.open(io.BytesIO(SIGN)).convert("RGB"))
    mt_vec = strings(mt.post("/clip/img", headers=H, files=upload(SIGN)).json())
    official = torch_features(tiny, rgb)
    assert mt_vec.shape == (512,)
    np.testing.assert_allclose(mt_vec, official, rtol=1e-3, atol=1e-4)  # un-normalised, as the official service
    assert abs(np.linalg.norm(mt_vec) - 1) > 0.01
    immich = np.array(
        json.loads(predict(mt, {"clip": {"visual": {"modelName": "ViT-B-32__openai"}}}, image=SIGN).json()["clip"])
    )
    np.testing.assert_allclose(mt_vec / np.linalg.norm(mt_vec), immich, atol=1e-6)


def test_clip_txt_json_body_and_its_errors(mt):
    a = strings(mt.post("/clip/txt", headers=H, json={"text": "海边的日落"}).json())
    no_type = mt.post("/clip/txt", headers=H, content=json.dumps({"text": "海边的日落"}).encode())
    np.testing.assert_allclose(strings(no_type.json()), a)
    immich = np.array(
        json.loads(
            predict(mt, {"clip": {"textual": {"modelName": "ViT-B-32__openai"}}}, text="海边的日落").json()["clip"]
        )
    )
    np.testing.assert_allclose(a / np.linalg.norm(a), immich, atol=1e-6)
    assert len(strings(mt.post("/clip/txt", headers=H, json={"text": ""}).json())) == 512  # empty is valid
    for kwargs, loc in (
        ({"json": {}}, ["body", "text"]),
        ({"json": {"text": 5}}, ["body", "text"]),
        ({"content": b"{not json"}, ["body"]),
        ({"content": b'{"text": "x"}', "headers": {**H, "content-type": "text/plain"}}, ["body"]),
    ):
        r = mt.post("/clip/txt", **({"headers": H} | kwargs))
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == loc, r.text


def test_clip_model_for_mt_is_configurable(store, make_client, tiny):
    install_tiny(ModelStore(store), tiny)
    install_tiny(ModelStore(store), tiny_model(seed=6), name="CN-CLIP-ViT-L-14")  # another 512-d model, by name
    default = make_client(MT_PHOTOS_API_KEY=KEY)
    chosen = make_client(MT_PHOTOS_API_KEY=KEY, IMMICH_AIO_MT_CLIP_MODEL="CN-CLIP-ViT-L-14")
    official_name = make_client(API_AUTH_KEY=KEY, CLIP_MODEL="ViT-L-14")  # the official service's variables
    a = strings(default.post("/clip/txt", headers=H, json={"text": "猫"}).json())
    b = strings(chosen.post("/clip/txt", headers=H, json={"text": "猫"}).json())
    c = strings(official_name.post("/clip/txt", headers=H, json={"text": "猫"}).json())
    assert float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)) < 0.99
    np.testing.assert_allclose(b, c)


def test_swap_rb_reproduces_the_bgr_images_of_mt_photos_onnx_and_openvino_services(store, make_client, tiny):
    install_tiny(ModelStore(store), tiny)
    rgb = np.asarray(Image.open(io.BytesIO(SIGN)).convert("RGB"))
    swapped = make_client(MT_PHOTOS_API_KEY=KEY, IMMICH_AIO_MT_CLIP_SWAP_RB="true")
    got = strings(swapped.post("/clip/img", headers=H, files=upload(encode(rgb, "PNG"))).json())
    np.testing.assert_allclose(got, torch_features(tiny, np.ascontiguousarray(rgb[..., ::-1])), rtol=1e-3, atol=1e-4)


# --- OCR -----------------------------------------------------------------------------------------


def test_ocr_shape_strings_and_reading_order(mt):
    body = mt.post("/ocr", headers=H, files=upload(SIGN)).json()["result"]
    assert body["texts"] == ["海边咖啡馆", "OPEN 24 HOURS", "欢迎光临"]
    assert all(re.fullmatch(r"[01]\.\d\d", s) and float(s) >= 0.5 for s in body["scores"])
    for box in body["boxes"]:
        assert set(box) == {"x", "y", "width", "height"}
        assert all(isinstance(v, str) and re.fullmatch(r"\d+\.\d{1,2}", v) for v in box.values()), box
    tops = [float(b["y"]) for b in body["boxes"]]
    assert tops == sorted(tops)
    blank = mt.post("/ocr", headers=H, files=upload(encode(np.full((400, 600, 3), 255, np.uint8)))).json()
    assert blank == {"result": {"texts": [], "scores": [], "boxes": []}}


def test_fork_and_upstream_and_mt_ocr_agree_on_the_same_image(mt):
    """Three protocols, one pipeline: the same lines with the same scores and boxes."""
    mt_body = mt.post("/ocr", headers=H, files=upload(SIGN)).json()["result"]
    fork = predict(mt, FORK, image=SIGN).json()
    entries = {"ocr": {"detection": {"modelName": "PP-OCRv6_small", "options": {"minScore": 0.5, "maxResolution": 736}},
                       "recognition": {"modelName": "PP-OCRv6_small", "options": {"minScore": 0.499999}}}}  # fmt: skip
    upstream = predict(mt, entries, image=SIGN).json()
    assert fork["ocr"] == " ".join(upstream["ocr"]["text"]) == " ".join(mt_body["texts"])
    assert fork["result"]["texts"] == upstream["ocr"]["text"] == mt_body["texts"]
    assert fork["result"]["scores"] == [f"{s:.2f}" for s in upstream["ocr"]["textScore"]] == mt_body["scores"]
    w, h = upstream["imageWidth"], upstream["imageHeight"]
    assert (fork["imageWidth"], fork["imageHeight"]) == (w, h)
    quads = np.array(upstream["ocr"]["box"]).reshape(-1, 4, 2) * [w, h]
    for quad, fb, mb in zip(quads, fork["result"]["boxes"], mt_body["boxes"], strict=True):
        x1, y1, x2, y2 = quad[:, 0].min(), quad[:, 1].min(), quad[:, 0].max(), quad[:, 1].max()
        np.testing.assert_allclose([fb["x1"], fb["y1"], fb["x2"], fb["y2"]], [x1, y1, x2, y2], atol=1.0)  # corners
        assert float(mb["x"]) == fb["x1"] and float(mb["width"]) == pytest.approx(fb["x2"] - fb["x1"], abs=0.011)


def test_fork_ocr_finds_nothing_as_an_empty_string_and_stays_apart_from_upstream(mt):
    blank = predict(mt, FORK, image=encode(np.full((300, 500, 3), 255, np.uint8)))
    assert blank.status_code == 200
    assert blank.json() == {
        "ocr": "",
        "result": {"texts": [], "scores": [], "boxes": []},
        "imageHeight": 300,
        "imageWidth": 500,
    }
    upstream_shape = predict(mt, OCR_ENTRIES, image=SIGN).json()
    assert isinstance(upstream_shape["ocr"], dict) and "result" not in upstream_shape
    with_detection = {"ocr": {"detection": {"modelName": "ocr"}, "recognition": {"modelName": "ocr"}}}
    assert predict(mt, with_detection, image=SIGN).status_code == 400  # an entry with detection is upstream's
    mixed = {"ocr": {"recognition": {"modelName": "ocr"}}, "clip": {"visual": {"modelName": "ViT-B-32__openai"}}}
    assert predict(mt, mixed, image=SIGN).status_code == 400


def png_of_size(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buf, "PNG", optimize=True)
    return buf.getvalue()


@pytest.mark.parametrize("path", ["/ocr", "/clip/img", "/represent"])
def test_soft_failures_are_http_200_with_a_message(mt, path):
    for data, says in (
        (b"not an image at all", "not a valid image" if path == "/represent" else "could not be decoded"),
    ):
        r = mt.post(path, headers=H, files=upload(data, "x.jpg"))
        assert r.status_code == 200 and r.json()["result"] == [] and says in r.json()["msg"], r.text
    if path != "/clip/img":  # the official /clip/img has no size guard
        r = mt.post(path, headers=H, files=upload(png_of_size(10_001, 8)))
        assert (r.status_code, r.json()) == (200, {"result": [], "msg": "height or width out of range"})
    missing = mt.post(path, headers=H, files={"other": ("x", b"x")})
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "file"]
    assert mt.get("/ping").text == "pong"


# --- faces -----------------------------------------------------------------------------------------


def test_represent_shape_and_numbers(mt):
    r = mt.post("/represent", headers=H, files=upload(photo_files()["astronaut"], "astronaut.png"))
    body = r.json()
    assert body["detector_backend"] == "insightface" and body["recognition_model"] == "buffalo_l"
    assert body["result"], body
    immich = predict(mt, {"facial-recognition": {"detection": {"modelName": "buffalo_l", "options": {"minScore": 0.65}},
                                                  "recognition": {"modelName": "buffalo_l"}}},
                     image=photo_files()["astronaut"]).json()["facial-recognition"]  # fmt: skip
    assert len(body["result"]) == len(immich)
    for face, ref in zip(body["result"], immich, strict=True):
        emb = np.array(face["embedding"])
        assert len(emb) == 512 and abs(np.linalg.norm(emb) - 1) < 1e-5  # L2-normalised, JSON numbers
        raw = np.array(json.loads(ref["embedding"]))
        np.testing.assert_allclose(emb, raw / np.linalg.norm(raw), atol=1e-6)
        area = face["facial_area"]
        assert set(area) == {"x", "y", "w", "h"} and all(isinstance(v, int) for v in area.values())
        box = ref["boundingBox"]
        assert abs(area["x"] - box["x1"]) <= 1 and abs(area["w"] - (box["x2"] - box["x1"])) <= 2
        assert face["face_confidence"] >= 0.65 and face["face_confidence"] == pytest.approx(ref["score"], abs=1e-6)
    blank = encode(np.full((400, 400, 3), 128, np.uint8))  # the synthetic detector answers to contrast
    nobody = mt.post("/represent", headers=H, files=upload(blank)).json()
    assert nobody == {"detector_backend": "insightface", "recognition_model": "buffalo_l", "result": []}


def test_face_pack_and_threshold_are_configurable(store, make_client):
    install_pack(store, "buffalo_s")
    strict = make_client(MT_PHOTOS_API_KEY=KEY, IMMICH_AIO_MT_FACE_MODEL="buffalo_s", DETECTION_THRESH="0.99")
    body = strict.post("/represent", headers=H, files=upload(photo_files()["astronaut"])).json()
    assert body["recognition_model"] == "buffalo_s" and all(f["face_confidence"] >= 0.99 for f in body["result"])


# --- restart ---------------------------------------------------------------------------------------


def test_restart_unloads_models_and_answers(mt):
    assert mt.post("/ocr", headers=H, files=upload(SIGN)).status_code == 200
    runtime = mt.app.state.runtime
    assert runtime.registry.loaded()
    for path in ("/restart", "/restart_v2"):
        assert mt.post(path, headers=H).json() == {"result": "pass"}
        assert runtime.registry.loaded() == []
    assert mt.post("/ocr", headers=H, files=upload(SIGN)).json()["result"]["texts"]  # loads again on demand


# --- the same machinery ----------------------------------------------------------------------------


def test_mt_requests_are_counted_and_logged_like_every_other(mt):
    with captured_logs() as logs:
        mt.post("/ocr", headers=H, files=upload(b"garbage"))
    [line] = [r.getMessage() for r in logs.records if r.name == "immich_aio.edge"]
    assert line.startswith("POST /ocr -> 400") and "answered 200" in line
    mt.post("/clip/txt", headers=H, json={"text": "猫"})
    metrics = mt.get("/metrics").text
    assert 'endpoint="/ocr"' in metrics and 'endpoint="/clip/txt",model="CN-CLIP-ViT-B-16"' in metrics.replace(
        '",task="clip",type="textual"', ""
    )


def test_search_from_mt_photos_takes_the_interactive_lane(mt, monkeypatch):
    """The route marks its job interactive: its work goes to the search pool, never behind the image backlog."""
    runtime = mt.app.state.runtime
    lanes: list[bool] = []
    real_run = runtime.run

    async def spy(fn, *args, interactive=False):
        lanes.append(interactive)
        return await real_run(fn, *args, interactive=interactive)

    monkeypatch.setattr(runtime, "run", spy)
    assert mt.post("/clip/txt", headers=H, json={"text": "猫"}).status_code == 200
    assert lanes and all(lanes), lanes
    textual = next(e.model for e in runtime.registry.loaded() if e.spec.type == "textual")
    assert textual.batcher._interactive


@pytest.mark.slow
def test_both_protocols_at_once_share_models_and_answer_correctly(mt):
    """Immich, its OCR fork and MT Photos hammering one server: every answer equals the one it gets alone."""
    images = [SIGN, (FIXTURES / "ocr" / "receipt.jpg").read_bytes(), photo_files()["astronaut"]]
    calls = []
    visual = {"clip": {"visual": {"modelName": "ViT-B-32__openai"}}}
    textual = {"clip": {"textual": {"modelName": "ViT-B-32__openai"}}}
    for i, img in enumerate(images):
        calls += [
            ("immich-clip", lambda img=img: predict(mt, visual, image=img).json()["clip"]),
            ("mt-clip", lambda img=img: mt.post("/clip/img", headers=H, files=upload(img)).json()["result"]),
            ("fork-ocr", lambda img=img: predict(mt, FORK, image=img).json()["ocr"]),
            ("mt-ocr", lambda img=img: mt.post("/ocr", headers=H, files=upload(img)).json()["result"]["texts"]),
            ("immich-ocr", lambda img=img: predict(mt, OCR_ENTRIES, image=img).json()["ocr"]["text"]),
            ("mt-faces", lambda img=img: len(mt.post("/represent", headers=H, files=upload(img)).json()["result"])),
            ("mt-search", lambda i=i: mt.post("/clip/txt", headers=H, json={"text": f"海边 {i}"}).json()["result"]),
            ("immich-search", lambda i=i: predict(mt, textual, text=f"海边 {i}").json()["clip"]),
        ]  # fmt: skip
    alone = [fn() for _, fn in calls]
    barrier = threading.Barrier(8)

    def go(fn):
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(5)
        return fn()

    with captured_logs() as logs, ThreadPoolExecutor(8) as pool:
        together = list(pool.map(go, [fn for _, fn in calls] * 2))
    assert not logs.lines(logging.WARNING)
    for (name, _), a, b1, b2 in zip(calls, alone, together[: len(calls)], together[len(calls) :], strict=True):
        for b in (b1, b2):
            if isinstance(a, str) and a.startswith("["):
                np.testing.assert_allclose(json.loads(a), json.loads(b), atol=1e-5, err_msg=name)
            elif isinstance(a, list) and a and isinstance(a[0], str) and re.fullmatch(r"-?\d+\.\d{16}", a[0]):
                np.testing.assert_allclose(
                    [float(x) for x in a], [float(x) for x in b], rtol=1e-4, atol=1e-5, err_msg=name
                )
            else:
                assert a == b, name
    loaded = {(e.spec.task, e.spec.type): e.spec.name for e in mt.app.state.runtime.registry.loaded()}
    assert loaded[("clip", "visual")] == "CN-CLIP-ViT-B-16"  # one model serves Immich and MT Photos
    assert len(mt.app.state.runtime.registry.loaded()) == 6
