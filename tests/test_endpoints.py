"""GET endpoints and URL prefixes."""

from __future__ import annotations

from conftest import OCR_ENTRIES, predict

import immich_aio


def test_root(client):
    r = client.get("/")
    assert r.status_code == 200
    assert r.json() == {"message": "Immich ML"}


def test_ping(client):
    r = client.get("/ping")
    assert r.status_code == 200
    assert r.text == "pong"
    assert r.headers["content-type"].startswith("text/plain")


def test_prefixed_routes(client):
    # Immich v3 resolves `ping`/`predict` relative to a configured URL such as http://host/ml/
    assert client.get("/ml/ping").text == "pong"
    r = predict(client, OCR_ENTRIES, image=(immich_aio.__file__ and b"not an image"), path="/ml/predict")
    assert r.status_code == 400


def test_info_lists_loaded_models_with_files(client):
    before = client.get("/info").json()
    assert before["version"] == immich_aio.__version__
    assert "CPUExecutionProvider" in before["providers"]
    assert before["models"] == []
    from conftest import FIXTURES

    img = (FIXTURES / "ocr" / "sign.jpg").read_bytes()
    assert predict(client, OCR_ENTRIES, image=img).status_code == 200
    info = client.get("/info").json()
    by_type = {m["type"]: m for m in info["models"] if m["task"] == "ocr"}
    assert set(by_type) == {"detection", "recognition"}
    for m in by_type.values():
        assert m["name"] == "PP-OCRv6_small"
        assert m["answersTo"] == ["PP-OCRv5_mobile"]
        f = m["files"]["model"]
        assert f["size"] > 1_000_000 and len(f["sha256"]) == 64 and f["path"].endswith(".onnx")
        assert m["providers"] == ["CPUExecutionProvider"]
    assert info["aliases"]["ocr"]["PP-OCRv5_mobile (recognition)"] == "PP-OCRv6_small"
