"""CN-CLIP: parity with cn_clip's torch model and tokenizer, export, import, download, Immich names."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cnclip_ref import TINY_CONFIG, import_cn_clip, install_tiny, tiny_model, vocab_path
from conftest import FIXTURES, OCR_ENTRIES, encode, predict, require_module, settings_for, temp_settings
from fakehub import FakeHub
from PIL import Image
from starlette.testclient import TestClient

from immich_aio.app import create_app
from immich_aio.download import clip as clip_download
from immich_aio.download import clip_export
from immich_aio.download.cli import main as models_main
from immich_aio.download.install import verify_manifest
from immich_aio.models import clip as clip_model
from immich_aio.models.clip import make_tokenizer
from immich_aio.store import ModelStore, sha256_file

torch = require_module("torch")  # a test dependency: missing, the run fails saying how to install it

SIZE = TINY_CONFIG["image_resolution"]
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
NAME = "CN-CLIP-ViT-B-16"


def photos() -> dict[str, np.ndarray]:
    out = {p.stem: np.asarray(Image.open(p).convert("RGB")) for p in sorted((FIXTURES / "ocr").glob("*.jpg"))}
    rng = np.random.default_rng(5)
    out["noise_portrait"] = rng.integers(0, 255, (900, 600, 3), dtype=np.uint8)
    out["flat_wide"] = np.full((300, 1200, 3), (30, 120, 200), np.uint8)
    return out


TEXTS = ["海边的日落", "发票", "一只猫在沙发上睡觉", "sunset at the beach", "Immich 照片 2024年", "", "😀🌅"]


def torch_image(model, rgb: np.ndarray) -> np.ndarray:
    """The reference: PIL bicubic squash (what torchvision's Resize does on PIL images), then torch."""
    resized = Image.fromarray(rgb).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float() / 255.0
    with torch.no_grad():
        f = model.encode_image(((x - MEAN) / STD)[None])
    return torch.nn.functional.normalize(f, dim=-1)[0].numpy()


def torch_text(model, text: str) -> np.ndarray:
    clip = import_cn_clip()
    with torch.no_grad():
        f = model.encode_text(clip.tokenize([text], context_length=52))
    return torch.nn.functional.normalize(f, dim=-1)[0].numpy()


def vec(body: dict) -> np.ndarray:
    assert isinstance(body["clip"], str)
    return np.array(json.loads(body["clip"]), dtype=np.float32)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


@pytest.fixture(scope="module")
def served(model):
    with temp_settings() as settings:
        install_tiny(ModelStore(settings.cache_folder), model)
        with TestClient(create_app(settings)) as client:
            yield client


def clip_entries(type_: str, name: str = "ViT-B-32__openai", options: dict | None = None) -> dict:
    return {"clip": {type_: {"modelName": name, **({"options": options} if options is not None else {})}}}


# --- tokenizer -------------------------------------------------------------------------------


def varied_strings() -> list[str]:
    rng = random.Random(7)
    zh = ["海边的日落", "发票", "猫咪", "北京天安门", "生日蛋糕", "雪山", "地铁站", "火锅", "樱花", "婚礼"]
    en = ["sunset", "Invoice", "CAT", "birthday cake", "snowy mountains", "Hot-Pot", "cherry blossom"]
    extras = [
        "，",
        "。",
        "！",
        "？",
        "（",
        "）",
        "、",
        "《",
        "》",
        ",",
        ".",
        "!",
        "?",
        "...",
        "--",
        "#",
        "@",
        "😀",
        "🌅",
        "👨‍👩‍👧",
        "café",
        "naïve",
        "ÉCOLE",
        "Zürich",
        "São Paulo",
        "한국어",
        "日本語です",
        "ｆｕｌｌ",
        "１２３",
        "2024年5月1日",
        "\u200b",
        "\t",
        "  ",
        "\n",
        "ß",
        "İstanbul",
        "Ω≈ç√",
        "x86_64",
        "e-mail",
    ]
    out = [
        "",
        " ",
        "a",
        "中",
        "[CLS]",
        "[UNK] [PAD]",
        "[SEP]猫[MASK]",
        "0" * 80,
        "b" * 150,
        "c" * 250,
        "长" * 60,
        "word " * 40,
    ]
    while len(out) < 240:
        parts = [rng.choice(rng.choice([zh, en, extras])) for _ in range(rng.randint(1, 8))]
        out.append(rng.choice(["", " "]).join(parts))
    return out


def test_tokenizer_ids_identical_to_cn_clip():
    clip = import_cn_clip()
    tok = make_tokenizer(vocab_path(), 52)
    strings = varied_strings()
    assert len(strings) >= 200
    expected = clip.tokenize(strings, context_length=52).numpy()
    got = np.array([tok.encode(s).ids for s in strings], dtype=np.int64)
    mismatched = [strings[i] for i in np.nonzero((expected != got).any(axis=1))[0]]
    assert not mismatched, mismatched[:5]
    assert (got[:, 0] == 101).all() and got.shape == (len(strings), 52)


# --- embeddings vs the torch reference --------------------------------------------------------


def test_visual_embeddings_match_torch(served, model):
    for name, rgb in photos().items():
        r = predict(served, clip_entries("visual"), image=encode(rgb, "PNG"))
        assert r.status_code == 200, r.text
        body = r.json()
        got = vec(body)
        assert got.shape == (512,) and abs(np.linalg.norm(got) - 1) < 1e-5
        assert (body["imageHeight"], body["imageWidth"]) == rgb.shape[:2]
        cos = float(got @ torch_image(model, rgb))
        assert cos >= 0.9999, (name, cos)


def test_reduced_jpeg_decoding_is_an_option_and_only_for_clip_only_requests(tmp_path, model, monkeypatch):
    """IMMICH_AIO_CLIP_REDUCED_DECODE: off, CLIP sees the full decode; on, a CLIP-only request's JPEG is decoded
    at a DCT scale that keeps twice the model's side; a request that also needs the photo whole decodes it whole."""
    photo = next(iter(photos().values()))
    data = encode(np.asarray(Image.fromarray(photo).resize((1600, 1200), Image.Resampling.BICUBIC)), quality=90)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    drafted = Image.open(io.BytesIO(data))
    drafted.draft("RGB", (2 * SIZE, 2 * SIZE))
    reduced = np.asarray(drafted.convert("RGB"))
    assert min(reduced.shape[:2]) >= 2 * SIZE and reduced.shape[0] < full.shape[0]
    seen: list[tuple[int, int]] = []
    real = clip_model.preprocess_image

    def spy(image, size):
        seen.append(image.size if isinstance(image, Image.Image) else image.shape[1::-1])
        return real(image, size)

    monkeypatch.setattr(clip_model, "preprocess_image", spy)
    store = tmp_path / "models"
    install_tiny(ModelStore(store), model)
    both = {**clip_entries("visual"), **OCR_ENTRIES}
    for env, expected in (({}, full), ({"IMMICH_AIO_CLIP_REDUCED_DECODE": "true"}, reduced)):
        with TestClient(create_app(settings_for(store, **env))) as client:
            seen.clear()
            body = predict(client, clip_entries("visual"), image=data).json()
            assert seen == [expected.shape[1::-1]], env
            assert (body["imageHeight"], body["imageWidth"]) == (1200, 1600)  # the size as sent, either way
            assert float(vec(body) @ torch_image(model, expected)) >= 0.9999
            seen.clear()
            body = predict(client, both, image=data).json()
            assert seen == [(1600, 1200)] and "text" in body["ocr"], env  # OCR needs it whole: decoded whole
            assert float(vec(body) @ torch_image(model, full)) >= 0.9999


def test_text_embeddings_match_torch(served, model):
    for text in TEXTS:
        r = predict(served, clip_entries("textual", options={"language": "zh-CN"}), text=text or " ")
        assert r.status_code == 200, r.text
        assert set(r.json()) == {"clip"}
        cos = float(vec(r.json()) @ torch_text(model, text or " "))
        assert cos >= 0.9999, (text, cos)


@pytest.mark.packs
def test_saved_optimised_graphs_answer_as_torch_does(tmp_path, model):
    """The ViT and BERT towers opened from ONNX Runtime's saved optimised graphs (ort_cache.py), as every start
    after the first does, still match the torch model (cos >= 0.9999)."""
    from conftest import loaded_model

    store = tmp_path / "models"
    install_tiny(ModelStore(store), model)
    rgb = next(iter(photos().values()))
    for start in ("first", "later"):
        with TestClient(create_app(settings_for(store))) as client:
            image = vec(predict(client, clip_entries("visual"), image=encode(rgb, "PNG")).json())
            text = vec(predict(client, clip_entries("textual"), text=TEXTS[1]).json())
            runtime = client.app.state.runtime
            opened = {t: loaded_model(runtime, t).session._model_path for t in ("visual", "textual")}
            assert runtime.factory.ort_cache.wait_written(180)  # written once the server is quiet
        assert all((".ort-cache" in path) == (start == "later") for path in opened.values()), (start, opened)
        assert float(image @ torch_image(model, rgb)) >= 0.9999
        assert float(text @ torch_text(model, TEXTS[1])) >= 0.9999


def test_distinct_inputs_give_distinct_embeddings(served):
    a = vec(predict(served, clip_entries("textual"), text="海边的日落").json())
    b = vec(predict(served, clip_entries("textual"), text="发票").json())
    assert float(a @ b) < 0.9  # the parity checks below mean something only if inputs matter
    rgbs = list(photos().values())
    x = vec(predict(served, clip_entries("visual"), image=encode(rgbs[0], "PNG")).json())
    y = vec(predict(served, clip_entries("visual"), image=encode(rgbs[1], "PNG")).json())
    assert float(x @ y) < 0.9


def test_batched_run_equals_single_runs(served):
    runtime = served.app.state.runtime
    spec = runtime.registry.resolve("clip", "visual", "ViT-B-32__openai")
    with runtime.registry.use(spec) as m:
        items = [m.prepare(i) for i in list(photos().values())[:4]]
        together = m.embed(items)
        alone = np.concatenate([m.embed([item]) for item in items])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_serving_never_imports_torch_cn_clip_or_insightface(tmp_path, model):
    install_tiny(ModelStore(tmp_path), model)
    code = f"""
import json, sys
from starlette.testclient import TestClient
from immich_aio.app import create_app
from immich_aio.config import Settings
sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import encode, predict
import numpy as np
s = Settings.from_env({{"MACHINE_LEARNING_CACHE_FOLDER": {str(tmp_path)!r}}})
with TestClient(create_app(s)) as c:
    assert predict(c, {{"clip": {{"textual": {{"modelName": "ViT-B-32__openai"}}}}}}, text="猫").status_code == 200
    img = encode(np.zeros((50, 50, 3), np.uint8))
    assert predict(c, {{"clip": {{"visual": {{"modelName": "ViT-B-32__openai"}}}}}}, image=img).status_code == 200
heavy = ("torch", "cn_clip", "torchvision", "insightface")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# --- Immich names, aliases, dimension guard ---------------------------------------------------


def fake_installed(store: Path, name: str, dim: int) -> None:
    folder = store / "clip" / name
    for t in ("visual", "textual"):
        (folder / t).mkdir(parents=True)
        (folder / t / "model.onnx").write_bytes(b"")
    (folder / "textual" / "vocab.txt").write_text("[PAD]\n")
    (folder / "config.json").write_text(json.dumps({"model_type": "cn-clip", "embed_dim": dim, "image_size": 224}))


def resolver(store: Path, aliases: dict[str, str] | None = None):
    from immich_aio.names.clip import ClipResolver

    return ClipResolver(ModelStore(store), None, aliases or {})  # type: ignore[arg-type]


def test_whitelisted_names_resolve_by_dimension(tmp_path):
    for name, dim in [
        ("CN-CLIP-ViT-B-16", 512),
        ("CN-CLIP-ViT-L-14", 768),
        ("CN-CLIP-ViT-L-14-336", 768),
        ("CN-CLIP-RN50", 1024),
        ("my-own-cnclip", 512),
    ]:
        fake_installed(tmp_path, name, dim)
    r = resolver(tmp_path)
    assert r.resolve("visual", "ViT-B-32__openai").name == "CN-CLIP-ViT-B-16"
    assert r.resolve("textual", "immich-app/ViT-B-32__openai").name == "CN-CLIP-ViT-B-16"  # cleaned as Immich ML
    assert r.resolve("visual", "XLM-Roberta-Large-Vit-B-32").name == "CN-CLIP-ViT-B-16"
    assert r.resolve("visual", "ViT-L-14__openai").name == "CN-CLIP-ViT-L-14-336"  # 336 preferred
    assert r.resolve("visual", "ViT-H-14__laion2b-s32b-b79k").name == "CN-CLIP-RN50"  # no ViT-H-14 installed
    assert r.resolve("visual", "my-own-cnclip").name == "my-own-cnclip"  # any folder under its own name
    assert r.resolve("visual", "CN-CLIP-ViT-L-14").name == "CN-CLIP-ViT-L-14"
    fake_installed(tmp_path, "CN-CLIP-ViT-H-14", 1024)
    assert r.resolve("visual", "RN50__openai").name == "CN-CLIP-ViT-H-14"
    assert r.aliases()["ViT-B-32__openai"] == "CN-CLIP-ViT-B-16"


def test_explicit_aliases_and_dimension_guard(tmp_path):
    from immich_aio.errors import BadRequest

    fake_installed(tmp_path, "CN-CLIP-ViT-B-16", 512)
    fake_installed(tmp_path, "CN-CLIP-ViT-L-14", 768)
    r = resolver(
        tmp_path,
        {
            "ViT-B-16__openai": "CN-CLIP-ViT-B-16",
            "ViT-L-14__openai": "CN-CLIP-ViT-B-16",
            "custom-search": "CN-CLIP-ViT-L-14",
        },
    )
    assert r.resolve("visual", "ViT-B-16__openai").name == "CN-CLIP-ViT-B-16"
    assert r.resolve("textual", "custom-search").name == "CN-CLIP-ViT-L-14"
    with pytest.raises(BadRequest, match=r"768-d in Immich.*512-d"):
        r.resolve("visual", "ViT-L-14__openai")  # explicit alias to a model of the wrong size
    with pytest.raises(BadRequest, match=r"1152-d in Immich.*no installed Chinese-CLIP model has 1152"):
        r.resolve("visual", "ViT-SO400M-14-SigLIP-384__webli")
    with pytest.raises(BadRequest, match=r"Unknown CLIP model 'nonsense'.*CN-CLIP-ViT-B-16 \(512-d\)"):
        r.resolve("visual", "nonsense")


def test_folder_with_an_immich_name_but_other_dimension_is_refused(tmp_path):
    from immich_aio.errors import BadRequest

    fake_installed(tmp_path, "ViT-B-32__openai", 768)
    with pytest.raises(BadRequest, match="512-d in Immich"):
        resolver(tmp_path).resolve("visual", "ViT-B-32__openai")


def test_nothing_installed_names_the_fetch_command(client):
    r = predict(client, clip_entries("textual"), text="猫")
    assert r.status_code == 400
    assert "immich-aio models clip --arch ViT-B-16" in r.json()["detail"]
    r = predict(client, clip_entries("visual", "ViT-L-14__openai"), image=encode(np.zeros((40, 40, 3), np.uint8)))
    assert "--arch ViT-L-14" in r.json()["detail"]


def test_info_shows_which_model_and_file_answers(served):
    predict(served, clip_entries("textual"), text="猫")
    info = served.get("/info").json()
    m = next(m for m in info["models"] if m["task"] == "clip" and m["type"] == "textual")
    assert m["name"] == NAME and "ViT-B-32__openai" in m["answersTo"]
    root = Path(info["modelStore"])
    assert m["files"]["model"]["sha256"] == sha256_file(root / m["files"]["model"]["path"])
    assert m["files"]["model"]["path"] == f"clip/{NAME}/textual/model.onnx"
    assert info["aliases"]["clip"]["ViT-B-32__openai"] == NAME
    served = info["servedFiles"]["clip"][NAME]
    assert served["visual"]["sha256"] == sha256_file(root / served["visual"]["path"])
    assert served["textual"] == m["files"]["model"]


def test_served_files_use_the_manifest_until_a_file_changes(tmp_path, model):
    from immich_aio.store import ModelStore as Store

    folder = install_tiny(ModelStore(tmp_path), model)
    visual = folder / "visual" / "model.onnx"
    store = Store(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert store.describe(visual).sha256 == manifest["visual/model.onnx"]["sha256"] == sha256_file(visual)
    data = bytearray(visual.read_bytes())
    data[-1] ^= 0xFF  # same size, different content, newer than the manifest
    visual.write_bytes(bytes(data))
    assert Store(tmp_path).describe(visual).sha256 == sha256_file(visual) != manifest["visual/model.onnx"]["sha256"]


# --- importing official-format (batch 1) files ------------------------------------------------


def official_export(model, folder: Path) -> tuple[Path, Path]:
    """What cn_clip/deploy/pytorch_to_onnx.py writes: model(image, None) / model(None, text), static batch 1."""
    folder.mkdir(parents=True, exist_ok=True)
    img, txt = folder / "tiny.img.fp32.onnx", folder / "tiny.txt.fp32.onnx"
    with torch.no_grad():
        torch.onnx.export(
            model,
            (torch.randn(1, 3, SIZE, SIZE), None),
            str(img),
            input_names=["image"],
            output_names=["unnorm_image_features"],
            opset_version=14,
            do_constant_folding=False,
            dynamo=False,
        )
        torch.onnx.export(
            model,
            (None, torch.ones(1, 52, dtype=torch.long)),
            str(txt),
            input_names=["text"],
            output_names=["unnorm_text_features"],
            opset_version=14,
            dynamo=False,
        )
    return img, txt


def test_import_batch1_official_files(tmp_path, model):
    img, txt = official_export(model, tmp_path / "downloads")
    store = tmp_path / "models"
    rc = models_main(
        ["--store", str(store), "clip", "--onnx-image", str(img), "--onnx-text", str(txt), "--vocab", str(vocab_path())]
    )
    assert rc == 0
    folder = store / "clip" / NAME
    assert verify_manifest(folder) == []
    assert json.loads((folder / "config.json").read_text())["embed_dim"] == 512
    with TestClient(create_app(settings_for(store))) as client:
        for rgb in list(photos().values())[:3]:
            got = vec(predict(client, clip_entries("visual"), image=encode(rgb, "PNG")).json())
            assert float(got @ torch_image(model, rgb)) >= 0.9999
        got = vec(predict(client, clip_entries("textual"), text="海边的日落").json())
        assert float(got @ torch_text(model, "海边的日落")) >= 0.9999
        runtime = client.app.state.runtime
        spec = runtime.registry.resolve("clip", "visual", "ViT-B-32__openai")
        with runtime.registry.use(spec) as m:
            assert m.fixed_batch_1
            items = [m.prepare(i) for i in list(photos().values())[:3]]
            assert m.embed(items).shape == (3, 512)  # run item by item


def test_import_refuses_wrong_files(tmp_path, model, capsys):
    img, txt = official_export(model, tmp_path / "downloads")
    store = tmp_path / "models"
    rc = models_main(
        ["--store", str(store), "clip", "--onnx-image", str(txt), "--onnx-text", str(img), "--vocab", str(vocab_path())]
    )
    assert rc == 1
    assert "expected one input 'image'" in capsys.readouterr().err
    assert not (store / "clip" / NAME).exists()


# --- downloading through a hub (local stand-in) -----------------------------------------------


@pytest.fixture
def tiny_release(monkeypatch, model):
    """Make --arch ViT-B-16 build the tiny architecture, so the real fetch + export path runs quickly."""
    monkeypatch.setitem(
        clip_download.RELEASES["cn-clip"],
        "ViT-B-16",
        clip_download._cn("ViT-B-16", "chinese-clip-vit-base-patch16", "clip_cn_vit-b-16.pt", SIZE, 512),
    )
    monkeypatch.setattr(clip_export, "arch_config", lambda arch: dict(TINY_CONFIG))
    import io

    buf = io.BytesIO()
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, buf)
    return buf.getvalue()


def test_qa_clip_is_fetched_exported_and_served_like_cn_clip(tmp_path, monkeypatch, tiny_release, model):
    """QA-CLIP: TencentARC's checkpoint in Chinese-CLIP's format, the shared vocabulary from OFA-Sys."""
    monkeypatch.setitem(
        clip_download.RELEASES["qa-clip"], "ViT-B-16", clip_download._qa("ViT-B-16", "QA-CLIP-base.pt", SIZE, 512)
    )
    store = tmp_path / "models"
    with FakeHub() as hub:
        hub.add_hf_repo("TencentARC/QA-CLIP", {"QA-CLIP-base.pt": tiny_release, "README.md": b"# QA-CLIP"})
        hub.add_hf_repo("OFA-Sys/chinese-clip-vit-base-patch16", {"vocab.txt": vocab_path().read_bytes()})
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert models_main(["--store", str(store), "clip", "--arch", "ViT-B-16", "--family", "qa-clip"]) == 0
        assert models_main(["--store", str(store), "clip", "--arch", "ViT-H-14", "--family", "qa-clip"]) == 2
    folder = store / "clip" / "QA-CLIP-ViT-B-16"
    config = json.loads((folder / "config.json").read_text())
    assert config["family"] == "QA-CLIP" and config["model_type"] == "cn-clip" and verify_manifest(folder) == []
    with TestClient(create_app(settings_for(store))) as client:
        rgb = photos()["sign"]
        own = vec(predict(client, clip_entries("visual", "QA-CLIP-ViT-B-16"), image=encode(rgb, "PNG")).json())
        assert float(own @ torch_image(model, rgb)) >= 0.9999
        by_dim = vec(predict(client, clip_entries("textual"), text="海边的日落").json())  # ViT-B-32__openai, 512-d
        assert float(by_dim @ torch_text(model, "海边的日落")) >= 0.9999
        answers = client.get("/info").json()["answers"]["clip"]
    assert answers["ViT-B-32__openai"]["servedBy"] == "QA-CLIP-ViT-B-16"


def test_download_via_hf_endpoint_with_interruption_and_resume(tmp_path, monkeypatch, tiny_release, model, capsys):
    store = tmp_path / "models"
    repo = "OFA-Sys/chinese-clip-vit-base-patch16"
    command = ["--store", str(store), "clip", "--arch", "ViT-B-16", "--export"]
    with FakeHub() as hub:
        hub.add_hf_repo(repo, {"clip_cn_vit-b-16.pt": tiny_release, "vocab.txt": vocab_path().read_bytes()})
        blob = hub.served_path(repo, "clip_cn_vit-b-16.pt")
        cut = len(tiny_release) // 3
        hub.cut_after[blob] = cut  # the connection drops a third of the way in
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert models_main(command) == 1
        assert "run the command again to resume" in capsys.readouterr().err
        assert models_main(command) == 0  # the next run goes on from the cut, not from byte 0
        gets = [r for r in hub.requests if r.path == blob and r.method == "GET"]
        assert [r.range for r in gets] == [None, f"bytes={cut}-"]
    out = capsys.readouterr()
    assert "clip_cn_vit-b-16.pt" in out.err and "%" in out.err  # progress shown
    folder = store / "clip" / NAME
    assert verify_manifest(folder) == []
    assert not list((store / "clip").glob(".staging-*"))
    with TestClient(create_app(settings_for(store))) as client:
        rgb = photos()["sign"]
        got = vec(predict(client, clip_entries("visual"), image=encode(rgb, "PNG")).json())
        assert float(got @ torch_image(model, rgb)) >= 0.9999


def test_download_from_modelscope(tmp_path, monkeypatch, tiny_release, model):
    store = tmp_path / "models"
    with FakeHub() as hub:
        base = "/models/AI-ModelScope/chinese-clip-vit-base-patch16/resolve/master"
        hub.files[f"{base}/clip_cn_vit-b-16.pt"] = tiny_release
        hub.files[f"{base}/vocab.txt"] = vocab_path().read_bytes()
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub.url)
        assert (
            models_main(["--store", str(store), "clip", "--arch", "ViT-B-16", "--source", "modelscope", "--fp16"]) == 0
        )
    config = json.loads((store / "clip" / NAME / "config.json").read_text())
    assert config["precision"] == "fp16"
    with TestClient(create_app(settings_for(store))) as client:  # fp16 weights, float32 I/O: served as is
        got = vec(predict(client, clip_entries("textual"), text="海边的日落").json())
        assert float(got @ torch_text(model, "海边的日落")) >= 0.99


def test_unreachable_hub_names_the_mirror_options(tmp_path, monkeypatch, capsys):
    from live import free_port

    closed = free_port()  # nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed}")
    assert models_main(["--store", str(tmp_path), "clip", "--arch", "ViT-B-16"]) == 1
    err = capsys.readouterr().err
    assert "Could not reach" in err and "HF_ENDPOINT=https://hf-mirror.com" in err and "--source modelscope" in err


def test_missing_export_tools_fail_before_downloading(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cn_clip.clip.model", None)  # as if cn_clip were not installed
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert models_main(["--store", str(tmp_path), "clip", "--arch", "ViT-B-16", "--export"]) == 1
        assert hub.requests == []
    assert "pip install --no-deps cn_clip" in capsys.readouterr().err


def test_the_clip_listing_is_read_once_per_store_change(tmp_path, monkeypatch):
    """Every request resolves its CLIP name; the configs are parsed again only when the store changed (issue 18)."""
    import os

    from immich_aio.errors import BadRequest
    from immich_aio.names import clip as clip_names

    def install(name: str, dim: int) -> None:
        folder = tmp_path / "clip" / name
        for tower in ("visual", "textual"):
            (folder / tower).mkdir(parents=True, exist_ok=True)
            (folder / tower / "model.onnx").write_bytes(b"stand-in")
        (folder / "textual" / "vocab.txt").write_text("[PAD]\n")
        staged = folder / ".config.json.new"  # replaced the way installs do it: a new file renamed over the old
        staged.write_text(json.dumps({"model_type": "cn-clip", "embed_dim": dim, "image_size": 224}))
        os.replace(staged, folder / "config.json")

    reads: list[Path] = []
    real = clip_names.ClipConfig.read
    monkeypatch.setattr(clip_names.ClipConfig, "read", classmethod(lambda cls, d: reads.append(d) or real(d)))
    install("CN-CLIP-ViT-B-16", 512)
    resolver = clip_names.ClipResolver(ModelStore(tmp_path), None, {})
    for _ in range(5):
        assert resolver.resolve("visual", "ViT-B-32__openai").name == "CN-CLIP-ViT-B-16"
    assert len(reads) == 1
    install("CN-CLIP-ViT-L-14", 768)  # a new model is seen by the next request
    assert resolver.resolve("textual", "ViT-L-14__openai").name == "CN-CLIP-ViT-L-14"
    install("CN-CLIP-ViT-B-16", 768)  # a config replaced under the same name too
    with pytest.raises(BadRequest, match="which is 768-d"):
        resolver.resolve("visual", "ViT-B-32__openai")
    count = len(reads)
    resolver.resolve("visual", "ViT-L-14__openai")
    assert len(reads) == count  # and it is kept again
