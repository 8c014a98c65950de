"""`immich-aio models ocr`: PP-OCRv5 files for Immich's OCR names, from a stand-in ModelScope."""

from __future__ import annotations

import pytest
from conftest import FIXTURES, OCR_ENTRIES, predict, settings_for
from fakehub import RAPIDOCR_BASE, rapidocr_hub
from starlette.testclient import TestClient

from immich_aio.app import create_app
from immich_aio.download import ocr as ocr_download
from immich_aio.download.cli import main as models_main
from immich_aio.download.install import verify_manifest
from immich_aio.models.ocr import bundled_model_dir
from immich_aio.names.ocr import IMMICH_NAMES

BASE = RAPIDOCR_BASE


def test_every_immich_name_maps_to_rapidocr_registry_entries():
    entries = ocr_download.registry()  # the real registry shipped in the rapidocr wheel
    for name in IMMICH_NAMES:
        for key in ocr_download.model_keys(name).values():
            assert key in entries and len(entries[key]["SHA256"]) == 64
            assert entries[key]["model_dir"].startswith(ocr_download.OFFICIAL)


@pytest.fixture
def hub(monkeypatch):
    """Serve real PP-OCR files (the bundled v6 pair stands in for v5) where ModelScope would."""
    det = (bundled_model_dir() / "PP-OCRv6_det_small.onnx").read_bytes()
    rec = (bundled_model_dir() / "PP-OCRv6_rec_small.onnx").read_bytes()
    files = {"det/ch_PP-OCRv5_det_mobile": det, "rec/ch_PP-OCRv5_rec_mobile": rec, "rec/en_PP-OCRv5_rec_mobile": rec}
    with rapidocr_hub(monkeypatch, files) as served:
        yield served


def test_fetch_lays_files_out_as_immich_ml_and_serves_them(tmp_path, hub):
    store = tmp_path / "models"
    assert models_main(["--store", str(store), "ocr", "--name", "EN__PP-OCRv5_mobile"]) == 0
    assert models_main(["--store", str(store), "ocr", "--name", "PP-OCRv5_mobile"]) == 0
    shared = store / "ocr" / "PP-OCRv5_mobile"
    assert (shared / "detection" / "model.onnx").is_file() and (shared / "recognition" / "model.onnx").is_file()
    assert (store / "ocr" / "EN__PP-OCRv5_mobile" / "recognition" / "model.onnx").is_file()
    assert verify_manifest(shared) == []
    # the second install downloaded only what it lacked (the detector was complete already)
    fetched = [p for p, _ in hub[0].requests]
    assert sum(p.endswith("det_mobile.onnx") for p in fetched) == 1
    entries = {"ocr": {t: {**v, "modelName": "EN__PP-OCRv5_mobile"} for t, v in OCR_ENTRIES["ocr"].items()}}
    with TestClient(create_app(settings_for(store))) as client:
        body = predict(client, entries, image=(FIXTURES / "ocr" / "sign.jpg").read_bytes()).json()
        assert body["ocr"]["text"] == ["海边咖啡馆", "OPEN 24 HOURS", "欢迎光临"]
        served = {(m["type"], m["name"]) for m in client.get("/info").json()["models"]}
    assert served == {("detection", "PP-OCRv5_mobile"), ("recognition", "EN__PP-OCRv5_mobile")}


def test_checksum_mismatch_installs_nothing(tmp_path, hub, capsys):
    _, registry = hub
    registry["ch_PP-OCRv5_det_mobile"]["SHA256"] = "0" * 64
    store = tmp_path / "models"
    assert models_main(["--store", str(store), "ocr", "--name", "PP-OCRv5_mobile"]) == 1
    assert "does not match" in capsys.readouterr().err
    assert not (store / "ocr").exists() or not any((store / "ocr").iterdir())


def test_unknown_name_is_refused(tmp_path, capsys):
    assert models_main(["--store", str(tmp_path), "ocr", "--name", "PP-OCRv9_giant"]) == 1
    assert "PP-OCRv5_mobile" in capsys.readouterr().err


def test_list_verify_reports_modified_files(tmp_path, hub, capsys):
    store = tmp_path / "models"
    assert models_main(["--store", str(store), "ocr", "--name", "PP-OCRv5_mobile"]) == 0
    capsys.readouterr()
    assert models_main(["--store", str(store), "list", "--verify"]) == 0
    assert "ocr/PP-OCRv5_mobile  [ok]" in capsys.readouterr().out
    with (store / "ocr" / "PP-OCRv5_mobile" / "detection" / "model.onnx").open("ab") as f:
        f.write(b"x")
    assert models_main(["--store", str(store), "list", "--verify"]) == 1
    assert "MODIFIED: detection/model.onnx" in capsys.readouterr().out
