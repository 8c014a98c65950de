"""Immich 3.3's MACHINE_LEARNING_MODEL_REVISION: a `v2` cache keeps each model one folder level down."""

from __future__ import annotations

import json

import pytest
from conftest import settings_for
from face_models import make_arcface, make_scrfd
from starlette.testclient import TestClient

from immich_aio.app import create_app
from immich_aio.config import ConfigError

FACES = {"facial-recognition": {"detection": {"modelName": "buffalo_l", "options": {"minScore": 0.5}}}}


def lay_out(folder):
    make_scrfd(folder / "detection" / "model.onnx")
    make_arcface(folder / "recognition" / "model.onnx")


def served_file(client) -> str:
    client.post("/predict", data={"entries": json.dumps(FACES)}, files={"image": ("blob", PNG)})
    (model,) = client.get("/info").json()["models"]
    return model["files"]["model"]["path"]


def png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 90, 60)).save(buf, "PNG")
    return buf.getvalue()


PNG = png()


def test_a_v2_cache_is_served_as_immich_3_3_lays_it_out(store):
    lay_out(store / "facial-recognition" / "buffalo_l" / "v2")
    with TestClient(create_app(settings_for(store, MACHINE_LEARNING_MODEL_REVISION="v2"))) as client:
        assert served_file(client) == "facial-recognition/buffalo_l/v2/detection/model.onnx"
    with TestClient(create_app(settings_for(store))) as client:  # main: the unversioned folder, which is absent
        r = client.post("/predict", data={"entries": json.dumps(FACES)}, files={"image": ("blob", PNG)})
        assert r.status_code == 400 and "immich-aio models faces" in r.json()["detail"]


def test_the_unversioned_folder_still_answers_under_a_revision(store):
    lay_out(store / "facial-recognition" / "buffalo_l")
    with TestClient(create_app(settings_for(store, MACHINE_LEARNING_MODEL_REVISION="v2"))) as client:
        assert served_file(client) == "facial-recognition/buffalo_l/detection/model.onnx"


@pytest.mark.parametrize("bad", ["../x", "v2/../../etc", "a b", ".."])
def test_a_revision_never_leaves_the_store(store, bad):
    with pytest.raises(ConfigError, match="MACHINE_LEARNING_MODEL_REVISION"):
        settings_for(store, MACHINE_LEARNING_MODEL_REVISION=bad)
