"""Faces: the server's answers equal insightface's (as Immich ML used it) on real photos, plus store,
batching, errors and downloads."""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import encode, loaded_model, predict, settings_for
from face_models import install_pack, make_arcface, make_scrfd
from fakehub import FakeHub
from PIL import Image
from starlette.testclient import TestClient

from immich_aio.app import create_app
from immich_aio.download.cli import main as models_main
from immich_aio.download.install import verify_manifest
from immich_aio.jobs import Job
from immich_aio.models.faces import nms, similarity_transform

VENDOR = Path(__file__).parent / ".vendor"


def insightface():
    if str(VENDOR) not in sys.path:
        sys.path.insert(0, str(VENDOR))
    import insightface.model_zoo as zoo
    from insightface.utils import face_align

    return zoo, face_align


def photo_files() -> dict[str, bytes]:
    import skimage

    data = Path(skimage.__file__).parent / "data"
    return {
        "group_t1": (VENDOR / "insightface" / "data" / "images" / "t1.jpg").read_bytes(),  # six people
        "astronaut": (data / "astronaut.png").read_bytes(),  # one person
        "coffee": (data / "coffee.png").read_bytes(),  # no person
        "portrait_tall": encode(np.asarray(Image.open(data / "astronaut.png").convert("RGB"))[:, 100:400]),
    }


def face_entries(name: str = "buffalo_l", min_score: float = 0.7) -> dict:
    return {
        "facial-recognition": {
            "detection": {"modelName": name, "options": {"minScore": min_score}},
            "recognition": {"modelName": name},
        }
    }


def reference(pack: Path, rgb: np.ndarray, min_score: float, batched_outputs: bool, batch1_rec: bool):
    """insightface as Immich ML used it: RetinaFace at 640×640 with det_thresh=minScore on BGR, boxes
    rounded, norm_crop per face, ArcFaceONNX.get_feat on the crops. RetinaFace has no batch-axis
    support, so for detectors with batched outputs the equivalent SCRFD class is the reference."""
    zoo, face_align = insightface()
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    det_path, rec_path = str(pack / "detection" / "model.onnx"), str(pack / "recognition" / "model.onnx")
    if batched_outputs:
        det = zoo.SCRFD(model_file=det_path, static_shape_sessions=False)
    else:
        det = zoo.RetinaFace(model_file=det_path)
    det.prepare(-1, input_size=(640, 640), det_thresh=min_score)
    boxes, kpss = det.detect(bgr, input_size=(640, 640))
    rec = zoo.ArcFaceONNX(model_file=rec_path)
    rec.prepare(-1)
    crops = [face_align.norm_crop(bgr, k) for k in kpss]
    if not crops:
        emb = np.zeros((0, 512))
    elif batch1_rec:
        emb = np.concatenate([rec.get_feat([c]) for c in crops])
    else:
        emb = rec.get_feat(crops)
    return boxes[:, :4].round(), boxes[:, 4], emb


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(
    ("batched_outputs", "batch1_rec"), [(False, False), (True, True)], ids=["plain", "batch-axis+batch1-arcface"]
)
def test_equal_to_insightface_on_real_photos(store, batched_outputs, batch1_rec):
    pack = install_pack(store, "buffalo_l", batch_axis=batched_outputs, arcface_batch=1 if batch1_rec else None)
    rec_bytes = (pack / "recognition" / "model.onnx").read_bytes()
    with TestClient(create_app(settings_for(store))) as client:
        for name, data in photo_files().items():
            rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            r = predict(client, face_entries(), image=data)
            assert r.status_code == 200, r.text
            body = r.json()
            assert (body["imageHeight"], body["imageWidth"]) == rgb.shape[:2]
            faces = body["facial-recognition"]
            ref_boxes, ref_scores, ref_emb = reference(pack, rgb, 0.7, batched_outputs, batch1_rec)
            assert len(faces) == len(ref_boxes) > 0, name
            boxes = np.array([[f["boundingBox"][k] for k in ("x1", "y1", "x2", "y2")] for f in faces])
            assert np.abs(boxes - ref_boxes).max() <= 1, name
            assert (boxes == boxes.round()).all()
            scores = np.array([f["score"] for f in faces])
            assert np.abs(scores - ref_scores).max() <= 1e-3
            assert (np.diff(scores) <= 0).all()  # descending
            emb = np.array([json.loads(f["embedding"]) for f in faces])
            assert emb.shape == (len(faces), 512)
            cos = (emb * ref_emb).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref_emb, axis=1)
            assert cos.min() >= 0.999, (name, cos.min())
            # raw (un-normalised) values are what Immich stores: magnitudes must agree too
            ratio = np.linalg.norm(emb, axis=1) / np.linalg.norm(ref_emb, axis=1)
            assert np.abs(ratio - 1).max() <= 1e-3, (name, ratio)
            assert not np.allclose(np.linalg.norm(emb, axis=1), 1.0)  # returned un-normalised
    # the user's batch-1 file was never rewritten
    assert (pack / "recognition" / "model.onnx").read_bytes() == rec_bytes


def test_min_score_is_honoured(make_client, store):
    install_pack(store)
    client = make_client()
    data = photo_files()["group_t1"]
    counts = []
    for score in (0.6, 0.7, 0.8, 0.95):
        faces = predict(client, face_entries(min_score=score), image=data).json()["facial-recognition"]
        assert all(f["score"] >= score for f in faces)
        counts.append(len(faces))
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]


def test_no_faces_is_empty_200(make_client, store):
    install_pack(store)
    client = make_client()
    r = predict(client, face_entries(), image=encode(np.full((480, 640, 3), 128, np.uint8)))
    assert r.status_code == 200
    assert r.json() == {"facial-recognition": [], "imageHeight": 480, "imageWidth": 640}


def test_detection_only_returns_raw_detections(make_client, store):
    install_pack(store)
    client = make_client()
    entries = {"facial-recognition": {"detection": {"modelName": "buffalo_l", "options": {"minScore": 0.7}}}}
    body = predict(client, entries, image=photo_files()["astronaut"]).json()["facial-recognition"]
    assert set(body) == {"boxes", "scores", "landmarks"}
    assert np.array(body["landmarks"]).shape == (len(body["scores"]), 5, 2)


def test_all_faces_embedded_in_one_batched_run(make_client, store):
    install_pack(store)
    client = make_client(MACHINE_LEARNING_MAX_BATCH_SIZE__FACIAL_RECOGNITION="64")
    runtime = client.app.state.runtime
    predict(client, face_entries(), image=photo_files()["group_t1"])
    model = loaded_model(runtime, "recognition")
    calls = []
    real_run = model.session.run
    model.session.run = lambda *a, **k: calls.append(a[1]["input.1"].shape[0]) or real_run(*a, **k)
    faces = predict(client, face_entries(), image=photo_files()["group_t1"]).json()["facial-recognition"]
    assert calls == [len(faces)] and len(faces) > 1


def test_on_the_cpu_a_recognition_run_takes_at_most_8_faces_unless_told(make_client, store):
    """Batching barely pays on the CPU and each face holds ~10 MB of activations in its run: runs are capped at 8."""
    install_pack(store)
    client = make_client()
    runtime = client.app.state.runtime
    predict(client, face_entries(), image=photo_files()["group_t1"])
    model = loaded_model(runtime, "recognition")
    assert model.batcher.policy.max_size == 8
    calls = []
    real_run = model.session.run
    model.session.run = lambda *a, **k: calls.append(a[1]["input.1"].shape[0]) or real_run(*a, **k)
    crops = [np.full((112, 112, 3), i, np.uint8) for i in range(19)]
    embeddings = model.batcher.map(crops, Job())
    assert len(embeddings) == 19 and sum(calls) == 19 and max(calls) <= 8 and len(calls) >= 3


def test_detector_without_landmarks_fails_recognition_clearly(make_client, store):
    install_pack(store, landmarks=False)
    client = make_client()
    r = predict(client, face_entries(), image=photo_files()["astronaut"])
    assert r.status_code == 500 and "landmarks" in r.json()["detail"]
    assert client.get("/ping").text == "pong"


def test_missing_pack_names_the_command(client):
    r = predict(client, face_entries("antelopev2"), image=photo_files()["astronaut"])
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert "immich-aio models faces --pack antelopev2" in detail and "non-commercial" in detail
    r = predict(client, face_entries("nope"), image=photo_files()["astronaut"])
    assert r.status_code == 400 and "buffalo_l" in r.json()["detail"]


def test_bad_images_are_handled_as_in_the_core(make_client, store):
    install_pack(store)
    client = make_client()
    assert predict(client, face_entries(), image=b"not an image").status_code == 400
    tiny = predict(client, face_entries(), image=encode(np.zeros((1, 1, 3), np.uint8), "PNG"))
    assert tiny.status_code == 200 and tiny.json()["facial-recognition"] == []
    entries = face_entries()
    entries["facial-recognition"]["detection"]["options"]["minScore"] = 7
    assert predict(client, entries, image=photo_files()["astronaut"]).status_code == 400


def test_nms_and_similarity_transform_units():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=np.float32)
    assert nms(boxes, np.array([0.9, 0.95, 0.5], np.float32)) == [1, 2]
    src = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [0.5, 0.5]])
    angle, scale, shift = 0.3, 2.5, np.array([4.0, -1.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rot.T + shift
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], shift, atol=1e-9)


# --- downloads -----------------------------------------------------------------------------------


def test_fetch_pack_from_hf_endpoint(tmp_path, monkeypatch, capsys):
    src = install_pack(tmp_path / "src", "buffalo_l")
    with FakeHub() as hub:
        hub.add_hf_repo(
            "immich-app/buffalo_s",
            {f"{t}/model.onnx": (src / t / "model.onnx").read_bytes() for t in ("detection", "recognition")},
        )
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        store = tmp_path / "models"
        assert models_main(["--store", str(store), "faces", "--pack", "buffalo_s"]) == 0
    assert "non-commercial" in capsys.readouterr().out
    folder = store / "facial-recognition" / "buffalo_s"
    assert verify_manifest(folder) == []
    with TestClient(create_app(settings_for(store))) as client:
        r = predict(client, face_entries("buffalo_s"), image=photo_files()["astronaut"])
        assert r.status_code == 200 and len(r.json()["facial-recognition"]) > 0


def test_fetch_pack_from_insightface_zip(tmp_path, monkeypatch):
    det = make_scrfd(tmp_path / "src" / "scrfd_10g_bnkps.onnx")
    rec = make_arcface(tmp_path / "src" / "glintr100.onnx", batch=1)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.write(det, "antelopev2/scrfd_10g_bnkps.onnx")
        zf.write(rec, "antelopev2/glintr100.onnx")
        zf.writestr("../../evil.onnx", b"never extracted by name")
    with FakeHub() as hub:
        hub.files["/releases/antelopev2.zip"] = buf.getvalue()
        monkeypatch.setenv("INSIGHTFACE_RELEASES_URL", hub.url + "/releases")
        store = tmp_path / "models"
        assert models_main(["--store", str(store), "faces", "--pack", "antelopev2", "--source", "insightface"]) == 0
    folder = store / "facial-recognition" / "antelopev2"
    assert (folder / "detection" / "model.onnx").read_bytes() == det.read_bytes()
    assert (folder / "recognition" / "model.onnx").read_bytes() == rec.read_bytes()
    assert not (tmp_path / "evil.onnx").exists() and not list(tmp_path.rglob("evil.onnx"))


def test_fetch_pack_refuses_files_that_are_not_face_models(tmp_path, monkeypatch, capsys):
    src = install_pack(tmp_path / "src", "buffalo_l")
    with FakeHub() as hub:
        swapped = {  # detector and recogniser swapped
            "detection/model.onnx": (src / "recognition" / "model.onnx").read_bytes(),
            "recognition/model.onnx": (src / "detection" / "model.onnx").read_bytes(),
        }
        hub.add_hf_repo("immich-app/buffalo_l", swapped)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert models_main(["--store", str(tmp_path / "models"), "faces", "--pack", "buffalo_l"]) == 1
    assert "not an SCRFD detector" in capsys.readouterr().err
    assert not (tmp_path / "models" / "facial-recognition" / "buffalo_l").exists()


def test_existing_immich_cache_layout_is_served(tmp_path):
    """An Immich ML cache folder (facial-recognition/<pack>/{detection,recognition}/model.onnx) works as is."""
    cache = tmp_path / "immich-ml-cache"
    install_pack(cache, "buffalo_l")
    os.makedirs(cache / "clip" / "ViT-B-32__openai" / "visual", exist_ok=True)  # an OpenCLIP model beside it
    with TestClient(create_app(settings_for(cache))) as client:
        r = predict(client, face_entries(), image=photo_files()["group_t1"])
        assert r.status_code == 200 and r.json()["facial-recognition"]


def test_fp16_recogniser_with_fp16_io_is_accepted(store):
    """A half-precision model whose inputs and outputs are fp16 too is fed fp16 and answers float32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    pack = install_pack(store, "buffalo_l")
    with TestClient(create_app(settings_for(store))) as client:
        fp32 = predict(client, face_entries(), image=photo_files()["astronaut"]).json()["facial-recognition"]
    rec = pack / "recognition" / "model.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(rec)), keep_io_types=False), str(rec))
    with TestClient(create_app(settings_for(store))) as client:
        fp16 = predict(client, face_entries(), image=photo_files()["astronaut"]).json()["facial-recognition"]
    assert len(fp16) == len(fp32) > 0
    a = np.array([json.loads(f["embedding"]) for f in fp32])
    b = np.array([json.loads(f["embedding"]) for f in fp16])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.99


def test_unreachable_release_host_names_its_own_mirror_option(tmp_path, monkeypatch, capsys):
    from live import free_port

    closed = free_port()  # nothing listens there
    monkeypatch.setenv("INSIGHTFACE_RELEASES_URL", f"http://127.0.0.1:{closed}/releases")
    assert models_main(["--store", str(tmp_path), "faces", "--pack", "buffalo_s", "--source", "insightface"]) == 1
    assert "INSIGHTFACE_RELEASES_URL" in capsys.readouterr().err


def test_one_request_with_every_task(store):
    """CLIP visual, faces and OCR in one request: one decode, each answer under its task key."""
    from cnclip_ref import install_tiny, tiny_model

    from immich_aio.store import ModelStore

    install_pack(store)
    install_tiny(ModelStore(store), tiny_model())
    entries = {
        **face_entries(),
        "clip": {"visual": {"modelName": "ViT-B-32__openai"}},
        "ocr": {
            "detection": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.5, "maxResolution": 736}},
            "recognition": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.8}},
        },
    }
    from conftest import FIXTURES

    with TestClient(create_app(settings_for(store))) as client:
        body = predict(client, entries, image=(FIXTURES / "ocr" / "sign.jpg").read_bytes()).json()
    assert set(body) == {"clip", "facial-recognition", "ocr", "imageHeight", "imageWidth"}
    assert len(json.loads(body["clip"])) == 512
    assert body["ocr"]["text"] == ["海边咖啡馆", "OPEN 24 HOURS", "欢迎光临"]
    assert isinstance(body["facial-recognition"], list)


def _mxnet_style(path: Path) -> Path:
    """An ArcFace whose graph normalises its input itself, as MXNet exports do: a Sub and a Mul up front."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(make_arcface(path)))
    graph = model.graph
    graph.initializer.extend(
        [numpy_helper.from_array(np.float32(127.5), "mean"), numpy_helper.from_array(np.float32(1 / 127.5), "scale")]
    )
    graph.node[0].input[0] = "scaled"
    graph.node.insert(0, helper.make_node("Mul", ["centred", "scale"], ["scaled"], name="_mul0"))
    sub = helper.make_node("Sub", ["input.1", "mean"], ["centred"], name="_minus0", doc_string="x" * 300)
    graph.node.insert(0, sub)
    onnx.save(model, str(path))
    return path


def test_recogniser_reads_its_first_node_names_without_parsing_weights(tmp_path, monkeypatch):
    """The normalisation rule reads the first node names from the protobuf directly (onnx.load of a real
    recogniser took half a second of a first request); same names as onnx, same mean/std choice."""
    import onnx

    from immich_aio.config import Settings
    from immich_aio.models import faces
    from immich_aio.sessions import SessionFactory

    plain = make_arcface(tmp_path / "plain.onnx")
    mxnet = _mxnet_style(tmp_path / "mxnet.onnx")
    for path in (plain, mxnet):
        expected = [n.name for n in onnx.load(str(path)).graph.node]
        assert faces.leading_node_names(path, 8) == expected[:8]
        assert faces.leading_node_names(path, 2) == expected[:2]
    factory = SessionFactory(Settings.from_env({"MACHINE_LEARNING_CACHE_FOLDER": str(tmp_path)}))

    def normalisation(path: Path) -> tuple[float, float]:
        rec = faces.FaceRecognizer("buffalo_l", {"model": path}, factory)
        rec.load()
        return rec.mean, rec.std

    assert normalisation(plain) == (127.5, 127.5)
    assert normalisation(mxnet) == (0.0, 1.0)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x3a\xff\xff\xff\xff\x0f" + bytes(10))  # field 7 (graph) claiming 4 GiB
    with pytest.raises(ValueError, match="truncated"):
        faces.leading_node_names(junk, 8)
    # a protobuf the reader does not follow: the library reads the names instead, same choice
    monkeypatch.setattr(faces, "leading_node_names", lambda *a: (_ for _ in ()).throw(ValueError("odd")))
    assert normalisation(mxnet) == (0.0, 1.0)
