"""Chinese-CLIP with no torch: transformers.js's combined export, split into towers, equals cn_clip's own export.

The reference side is computed in the test: a random-weight `ChineseCLIPModel` exported the way transformers.js
exports it, and cn_clip's CLIP holding the same weights exported by the project's torch exporter.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort
import pytest
from cnclip_ref import vocab_path
from conftest import encode, predict, settings_for
from fakehub import FakeHub
from starlette.testclient import TestClient
from xenova_clip import IMAGE_SIZE, as_cn_clip, combined_export, quantized, tiny_hf_model

from immich_aio.download import clip as clip_download
from immich_aio.download import clip_export
from immich_aio.download.cli import main as models_main
from immich_aio.download.clip_split import SplitError, split_in_child
from immich_aio.models.clip import make_tokenizer, preprocess_image

REPO = "Xenova/chinese-clip-vit-base-patch16"
TEXTS = ["海边的日落", "一只猫", "Immich 照片 2024年", "[CLS] 不是特殊符号", "a dog on the beach", " "]


def photos() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    gradient = np.linspace(0, 255, 80 * 120 * 3).reshape(80, 120, 3).astype(np.uint8)
    return [gradient, rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), np.full((50, 90, 3), 200, np.uint8)]


def unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model()


@pytest.fixture(scope="module")
def combined(hf_model, tmp_path_factory):
    return combined_export(hf_model, tmp_path_factory.mktemp("xenova") / "onnx" / "model.onnx")


@pytest.fixture(scope="module")
def split(combined, tmp_path_factory):
    out = tmp_path_factory.mktemp("split")
    assert split_in_child(combined, out, vocab_path(), IMAGE_SIZE) == {"embed_dim": 512}
    return out


def token_ids(texts: list[str]) -> np.ndarray:
    tokenizer = make_tokenizer(vocab_path(), 52)
    return np.stack([np.asarray(tokenizer.encode(t).ids, dtype=np.int64) for t in texts])


def pixels(images: list[np.ndarray]) -> np.ndarray:
    return np.stack([preprocess_image(img, IMAGE_SIZE) for img in images]).astype(np.float32)


def test_split_towers_equal_the_combined_graph(combined, split):
    ids, px = token_ids(TEXTS), pixels(photos())
    whole = session(combined)
    image_embeds, text_embeds = whole.run(
        ["image_embeds", "text_embeds"],
        {"pixel_values": px, "input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)},
    )
    visual, textual = session(split / "visual" / "model.onnx"), session(split / "textual" / "model.onnx")
    assert [i.name for i in visual.get_inputs()] == ["image"] and [i.name for i in textual.get_inputs()] == ["text"]
    got_images = visual.run(None, {"image": px})[0]
    got_texts = textual.run(None, {"text": ids})[0]
    # raw projections out (MT Photos sends them), normalised by the caller
    assert not np.allclose(np.linalg.norm(got_images, axis=-1), 1.0)
    assert (unit(got_images) * unit(image_embeds)).sum(-1).min() >= 0.99999
    assert (unit(got_texts) * unit(text_embeds)).sum(-1).min() >= 0.99999


def test_split_towers_equal_cn_clips_own_export_of_the_same_weights(hf_model, split, tmp_path):
    import torch

    twin = as_cn_clip(hf_model)
    clip_export.export(twin, tmp_path, IMAGE_SIZE)
    ids, px = token_ids(TEXTS), pixels(photos())
    for tower, name, x in (("visual", "image", px), ("textual", "text", ids)):
        ours = session(split / tower / "model.onnx").run(None, {name: x})[0]
        theirs = session(tmp_path / tower / "model.onnx").run(None, {name: x})[0]
        assert (unit(ours) * unit(theirs)).sum(-1).min() >= 0.9999, tower
    with torch.no_grad():  # and the torch model itself, for the text tower's padding and mask
        ref = twin.encode_text(torch.from_numpy(ids)).numpy()
    ours = session(split / "textual" / "model.onnx").run(None, {"text": ids})[0]
    assert (unit(ours) * unit(ref)).sum(-1).min() >= 0.9999


def test_a_graph_that_is_not_a_combined_chinese_clip_is_refused(tmp_path, split):
    with pytest.raises(SplitError, match="not a combined Chinese-CLIP graph"):
        split_in_child(split / "visual" / "model.onnx", tmp_path, vocab_path(), IMAGE_SIZE)
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07junk" * 100)
    with pytest.raises(SplitError, match="not a readable ONNX model"):
        split_in_child(tmp_path / "junk.onnx", tmp_path, vocab_path(), IMAGE_SIZE)


@pytest.fixture
def xenova_repo(monkeypatch, combined, tmp_path):
    """The tiny export published as the Xenova repo, with its own image size."""
    monkeypatch.setitem(
        clip_download.ONNX_RELEASES, "ViT-B-16", clip_download.OnnxRelease(REPO, "main", IMAGE_SIZE, 512)
    )
    files = {
        "onnx/model.onnx": combined.read_bytes(),
        "onnx/model_quantized.onnx": quantized(combined, tmp_path / "q.onnx").read_bytes(),
        "vocab.txt": vocab_path().read_bytes(),
        "config.json": b"{}",
    }
    return files


def test_models_clip_takes_the_ready_export_by_default_and_serves_cn_clips_vectors(
    tmp_path, monkeypatch, xenova_repo, hf_model, capsys
):
    import torch

    store = tmp_path / "models"
    with FakeHub() as hub:
        hub.add_hf_repo(REPO, xenova_repo)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setitem(sys.modules, "torch", None)  # no torch anywhere on this path
        assert models_main(["--store", str(store), "clip", "--arch", "ViT-B-16"]) == 0
        monkeypatch.setitem(sys.modules, "torch", torch)
        fetched = {r.path for r in hub.requests if r.method == "GET" and "/resolve/" in r.path}
    assert not any("quantized" in p for p in fetched)  # fp32 by default: only the file asked for
    folder = store / "clip" / "CN-CLIP-ViT-B-16"
    config = json.loads((folder / "config.json").read_text())
    assert config["precision"] == "fp32" and config["embed_dim"] == 512 and REPO in config["source"]
    assert not (store / ".downloads" / "hf" / REPO.replace("/", "--")).exists()  # the download went once installed
    twin = as_cn_clip(hf_model)
    with TestClient(create_app_for(store)) as client:
        for rgb in photos():
            body = predict(client, clip_entries("visual"), image=encode(rgb, "PNG")).json()
            got = np.array(json.loads(body["clip"]))
            x = torch.from_numpy(preprocess_image(rgb, IMAGE_SIZE)[None])
            with torch.no_grad():
                ref = unit(twin.encode_image(x).numpy()[0])
            assert float(got @ ref) >= 0.9999
        body = predict(client, clip_entries("textual"), text="海边的日落").json()
        with torch.no_grad():
            ref = unit(twin.encode_text(torch.from_numpy(token_ids(["海边的日落"]))).numpy()[0])
        assert float(np.array(json.loads(body["clip"])) @ ref) >= 0.9999


def test_int8_on_request(tmp_path, monkeypatch, xenova_repo):
    store = tmp_path / "models"
    with FakeHub() as hub:
        hub.add_hf_repo(REPO, xenova_repo)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert models_main(["--store", str(store), "clip", "--arch", "ViT-B-16", "--precision", "int8"]) == 0
    config = json.loads((store / "clip" / "CN-CLIP-ViT-B-16" / "config.json").read_text())
    assert config["precision"] == "int8" and "model_quantized.onnx" in config["source"]
    with TestClient(create_app_for(store)) as client:
        r = predict(client, clip_entries("textual"), text="一只猫")
        assert r.status_code == 200 and len(json.loads(r.json()["clip"])) == 512


def test_a_damaged_export_is_deleted_and_nothing_is_installed(tmp_path, monkeypatch, xenova_repo, capsys):
    store = tmp_path / "models"
    data = xenova_repo["onnx/model.onnx"]
    with FakeHub() as hub:  # the hub lists the cut file's own hash: only the split can tell
        hub.add_hf_repo(REPO, {**xenova_repo, "onnx/model.onnx": data[: len(data) * 3 // 5]})
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert models_main(["--store", str(store), "clip", "--arch", "ViT-B-16"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert not (store / "clip" / "CN-CLIP-ViT-B-16").exists()
    leftovers = [p for p in (store / ".downloads").rglob("model.onnx*")]
    assert leftovers == []


def create_app_for(store):
    from immich_aio.app import create_app

    return create_app(settings_for(store))


def clip_entries(type_: str) -> dict:
    return {"clip": {type_: {"modelName": "ViT-B-32__openai", "options": {}}}}
