"""Downloads against a bad mirror (issue #11, classes 8-11): nothing bad is ever kept, credentials stay with
their host, installs are whole or nothing, and Ctrl-C says how to resume."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from conftest import FIXTURES, OCR_ENTRIES, predict, settings_for
from face_models import make_arcface, make_scrfd
from fakehub import RAPIDOCR_BASE, FakeHub, rapidocr_hub
from starlette.testclient import TestClient

from immich_aio.app import create_app
from immich_aio.download import fetch as fetch_module
from immich_aio.download.cli import main as models_main
from immich_aio.models.ocr import bundled_model_dir

ROOT = Path(__file__).resolve().parent.parent
ZIP = "/releases/antelopev2.zip"


def pack_zip(tmp_path: Path, with_models: bool = True, padding: int = 0) -> bytes:
    det = make_scrfd(tmp_path / "src" / "scrfd_10g_bnkps.onnx")
    rec = make_arcface(tmp_path / "src" / "glintr100.onnx", batch=1)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        if with_models:
            zf.write(det, "antelopev2/scrfd_10g_bnkps.onnx")
            zf.write(rec, "antelopev2/glintr100.onnx")
        zf.writestr("antelopev2/README.txt", "some other file")
        if padding:
            zf.writestr("antelopev2/padding.bin", os.urandom(padding), compress_type=zipfile.ZIP_STORED)
    return buf.getvalue()


def faces_cli(store: Path, source: str = "insightface") -> list[str]:
    return ["--store", str(store), "faces", "--pack", "antelopev2", "--source", source]


def leftovers(store: Path) -> list[Path]:
    downloads = store / ".downloads"
    return (
        [p for p in downloads.rglob("*") if p.is_file() and not p.name.startswith(".lock")]
        if downloads.exists()
        else []
    )


# --- class 8: a bad download is never kept --------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "says"),
    [
        ("html", "HTML page"),
        ("random", "not an intact zip"),
        ("no_length", "not an intact zip"),
        ("without_models", "lacks glintr100.onnx, scrfd_10g_bnkps.onnx"),
    ],
)
def test_bad_release_download_is_deleted_and_the_next_run_starts_afresh(tmp_path, monkeypatch, capsys, fault, says):
    good = pack_zip(tmp_path)
    store = tmp_path / "models"
    with FakeHub() as hub:
        monkeypatch.setenv("INSIGHTFACE_RELEASES_URL", hub.url + "/releases")
        hub.files[ZIP] = pack_zip(tmp_path, with_models=False) if fault == "without_models" else good
        if fault != "without_models":
            hub.faults[ZIP] = fault
        for _run in range(2):  # the same failure each time, never a cached bad file
            assert models_main(faces_cli(store)) == 1
            err = capsys.readouterr().err
            assert says in err and "Traceback" not in err and "BadZipFile" not in err
            assert leftovers(store) == []
            assert not (store / "facial-recognition" / "antelopev2").exists()
        hub.faults.pop(ZIP, None)
        hub.files[ZIP] = good  # the mirror is fixed
        assert models_main(faces_cli(store)) == 0
    assert (store / "facial-recognition" / "antelopev2" / "recognition" / "model.onnx").is_file()


def test_a_file_left_in_the_download_folder_is_not_trusted(tmp_path, monkeypatch):
    store = tmp_path / "models"
    stale = store / ".downloads" / "antelopev2" / "antelopev2.zip"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"<html>an old error page saved under the final name</html>")
    with FakeHub() as hub:
        hub.files[ZIP] = pack_zip(tmp_path)
        monkeypatch.setenv("INSIGHTFACE_RELEASES_URL", hub.url + "/releases")
        assert models_main(faces_cli(store)) == 0
        assert [r.path for r in hub.requests] == [ZIP]  # fetched again instead of trusting the stale file


def test_sizes_and_hashes_published_by_modelscope_are_checked(tmp_path, monkeypatch, capsys):
    from cnclip_ref import import_cn_clip

    import_cn_clip()  # the export tools are checked before any download

    repo = "AI-ModelScope/chinese-clip-vit-base-patch16"
    real = b"PK\x03\x04" + os.urandom(50_000)  # stands for the checkpoint: only its hash matters here
    with FakeHub() as hub:
        base = f"/models/{repo}/resolve/master"
        hub.files[f"{base}/clip_cn_vit-b-16.pt"] = real
        listing = (
            '{"Code":200,"Success":true,"Data":{"Files":[{"Path":"clip_cn_vit-b-16.pt","Type":"blob",'
            f'"Size":{len(real)},"Sha256":"{hashlib.sha256(real).hexdigest()}"}}]}}}}'
        )
        hub.files[f"/api/v1/models/{repo}/repo/files"] = listing.encode()
        hub.faults[f"{base}/clip_cn_vit-b-16.pt"] = "random"  # a mirror serving other bytes of the same size
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub.url)
        assert models_main(["--store", str(tmp_path), "clip", "--arch", "ViT-B-16", "--source", "modelscope"]) == 1
    err = capsys.readouterr().err
    assert "sha256" in err and "does not match" in err and hashlib.sha256(real).hexdigest() in err
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("fault", ["random", "html"])
def test_hugging_face_files_are_checked_against_the_hub_hashes(tmp_path, monkeypatch, capsys, fault):
    det = make_scrfd(tmp_path / "src" / "det.onnx").read_bytes()
    rec = make_arcface(tmp_path / "src" / "rec.onnx").read_bytes()
    repo = "immich-app/antelopev2"
    store = tmp_path / "models"
    with FakeHub() as hub:
        hub.add_hf_repo(
            repo, {"detection/model.onnx": det, "recognition/model.onnx": rec}, lfs={"recognition/model.onnx"}
        )
        bad = hub.served_path(repo, "recognition/model.onnx" if fault == "random" else "detection/model.onnx")
        hub.faults[bad] = fault
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert models_main(faces_cli(store, "hf")) == 1
        err = capsys.readouterr().err
        expected = "does not match the expected" if fault == "random" else "answered with an HTML page"
        assert expected in err and "Traceback" not in err
        assert not (store / "facial-recognition" / "antelopev2").exists()
        hub.faults.clear()
        assert models_main(faces_cli(store, "hf")) == 0
    assert (store / "facial-recognition" / "antelopev2" / "recognition" / "model.onnx").read_bytes() == rec


# --- class 9: credentials stay with their host ----------------------------------------------------


def test_hf_token_goes_to_the_hub_only_never_to_the_cdn(tmp_path, monkeypatch):
    det = make_scrfd(tmp_path / "src" / "det.onnx").read_bytes()
    rec = make_arcface(tmp_path / "src" / "rec.onnx").read_bytes()
    with FakeHub() as hub:
        hub.add_hf_repo("immich-app/buffalo_l", {"detection/model.onnx": det, "recognition/model.onnx": rec})
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
        assert models_main(["--store", str(tmp_path / "models"), "faces", "--pack", "buffalo_l"]) == 0
        to_hub = [r for r in hub.requests if r.server == "hub"]
        to_cdn = [r for r in hub.requests if r.server == "cdn"]
    assert to_cdn, "the LFS files came from the CDN"
    assert all(r.authorization == "Bearer hf_secret_token" for r in to_hub)
    assert all(r.authorization is None for r in to_cdn)


def test_own_client_drops_credentials_on_a_redirect_to_another_origin():
    with FakeHub() as hub:
        hub.files["/file"] = b"data"
        hub.files["/blobs/x"] = b"data"
        hub.redirects["/away"] = hub.cdn_url + "/blobs/x"  # another port: another origin
        hub.redirects["/here"] = hub.url + "/file"
        hub._blobs["/blobs/x"] = b"data"
        for path in ("/away", "/here"):
            req = urllib.request.Request(hub.url + path, headers={"Authorization": "Bearer s3cret"})
            with fetch_module._opener().open(req, timeout=10) as r:
                assert r.read() == b"data"
    final = {r.server: r.authorization for r in hub.requests if r.path in ("/blobs/x", "/file")}
    assert final == {"cdn": None, "hub": "Bearer s3cret"}


# --- class 10: an OCR model is installed whole or not at all --------------------------------------


@pytest.fixture
def ocr_hub(monkeypatch):
    det = (bundled_model_dir() / "PP-OCRv6_det_small.onnx").read_bytes()
    rec = (bundled_model_dir() / "PP-OCRv6_rec_small.onnx").read_bytes()
    files = {"det/ch_PP-OCRv5_det_mobile": det, "rec/korean_PP-OCRv5_rec_mobile": rec}
    with rapidocr_hub(monkeypatch, files) as (hub, _registry):
        yield hub, f"{RAPIDOCR_BASE}/rec/korean_PP-OCRv5_rec_mobile.onnx"


def test_failed_recogniser_leaves_no_detector_behind(tmp_path, ocr_hub, capsys):
    hub, rec_path = ocr_hub
    hub.faults[rec_path] = 404
    store = tmp_path / "models"
    assert models_main(["--store", str(store), "ocr", "--name", "KOREAN__PP-OCRv5_mobile"]) == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert not (store / "ocr" / "PP-OCRv5_mobile").exists()  # the good detector was not installed alone
    entries = {"ocr": {t: {**v, "modelName": "KOREAN__PP-OCRv5_mobile"} for t, v in OCR_ENTRIES["ocr"].items()}}
    with TestClient(create_app(settings_for(store))) as client:
        # the bundled model cannot read Hangul: never served in its place
        r = predict(client, entries, image=(FIXTURES / "ocr" / "sign.jpg").read_bytes())
        assert r.status_code == 400 and "immich-aio models ocr --name KOREAN__PP-OCRv5_mobile" in r.json()["detail"]
        assert client.get("/info").json()["models"] == []
    hub.faults.clear()
    assert models_main(["--store", str(store), "ocr", "--name", "KOREAN__PP-OCRv5_mobile"]) == 0
    assert (store / "ocr" / "KOREAN__PP-OCRv5_mobile" / "recognition" / "model.onnx").is_file()


def test_a_half_present_install_in_the_store_is_not_used(store, client):
    """A detector without its recogniser (an interrupted copy, say) is never paired with another model."""
    det = store / "ocr" / "PP-OCRv5_mobile" / "detection" / "model.onnx"
    det.parent.mkdir(parents=True)
    det.write_bytes((bundled_model_dir() / "PP-OCRv6_det_small.onnx").read_bytes())
    assert predict(client, OCR_ENTRIES, image=(FIXTURES / "ocr" / "sign.jpg").read_bytes()).status_code == 200
    served = {(m["type"], m["name"]) for m in client.get("/info").json()["models"]}
    assert served == {("detection", "PP-OCRv6_small"), ("recognition", "PP-OCRv6_small")}


# --- class 11: Ctrl-C ------------------------------------------------------------------------------


def test_ctrl_c_says_how_to_resume_and_the_next_run_resumes(tmp_path, monkeypatch):
    store = tmp_path / "models"
    data = pack_zip(tmp_path, padding=4_000_000)
    with FakeHub() as hub:
        hub.files[ZIP] = data
        hub.faults[ZIP] = "slow"
        env = dict(os.environ, INSIGHTFACE_RELEASES_URL=hub.url + "/releases")
        proc = subprocess.Popen(
            [sys.executable, "-m", "immich_aio", "models", *faces_cli(store)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # as from a terminal: a suite started in the background (`cmd &`) passes SIGINT on ignored, and Python
            # then never turns it into KeyboardInterrupt (the download ran to the end and exited 0)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        part = store / ".downloads" / "antelopev2" / "antelopev2.zip.part"
        deadline = time.monotonic() + 60
        while (not part.exists() or part.stat().st_size < 200_000) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "interrupted; run the same command again to resume" in err and "Traceback" not in err
        have = part.stat().st_size
        assert 0 < have < len(data)
        hub.faults.clear()
        monkeypatch.setenv("INSIGHTFACE_RELEASES_URL", hub.url + "/releases")
        assert models_main(faces_cli(store)) == 0
        assert [r.range for r in hub.requests][-1] == f"bytes={have}-"


def test_two_installs_of_one_model_do_not_run_at_once(tmp_path, capsys):
    """A sibling of class 8: two runs would append to the same partial download and race on the renames."""
    from immich_aio.download.install import install_lock
    from immich_aio.store import ModelStore

    store = tmp_path / "models"
    with install_lock(ModelStore(store), "facial-recognition/antelopev2"):
        proc = subprocess.run(
            [sys.executable, "-m", "immich_aio", "models", *faces_cli(store)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1
    assert f"pid {os.getpid()}" in proc.stderr and "wait for it to finish" in proc.stderr


def test_an_install_removes_what_a_killed_install_of_the_same_model_left(tmp_path):
    from immich_aio.download.install import staged
    from immich_aio.store import ModelStore

    store = ModelStore(tmp_path / "models")
    clip = tmp_path / "models" / "clip"
    stale = [clip / ".staging-CN-CLIP-ViT-B-16-abcd1234", clip / ".old-CN-CLIP-ViT-B-16-xyz_5678"]
    kept = [clip / ".staging-CN-CLIP-ViT-B-16-fresh123", clip / ".staging-CN-CLIP-ViT-B-16-x-abcd1234"]
    for folder in stale + kept:
        (folder / "visual").mkdir(parents=True)
        (folder / "visual" / "model.onnx").write_bytes(b"x" * 1000)
    for folder in [*stale, kept[1]]:
        os.utime(folder, (time.time() - 3600, time.time() - 3600))  # killed an hour ago (the second: another model)
    with staged(store, "clip", "CN-CLIP-ViT-B-16") as stage:
        (stage / "config.json").write_text("{}")
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
    assert (clip / "CN-CLIP-ViT-B-16" / "config.json").is_file()


def _install(store, text: str) -> None:
    from immich_aio.download.install import staged

    with staged(store, "clip", "CN-CLIP-ViT-B-16") as stage:
        (stage / "visual").mkdir()
        (stage / "visual" / "model.onnx").write_text(text)


def test_a_reinstall_swaps_the_folders_in_one_step(tmp_path, monkeypatch):
    """Two renames left a moment with no model folder, and a request then was refused as if none were installed."""
    from immich_aio.store import ModelStore

    store = ModelStore(tmp_path / "models")
    _install(store, "old")

    def two_steps(self, dest):
        raise AssertionError(f"{self} renamed to {dest}: a moment without the model's folder")

    monkeypatch.setattr(Path, "rename", two_steps)
    _install(store, "new")
    clip = tmp_path / "models" / "clip"
    assert (clip / "CN-CLIP-ViT-B-16" / "visual" / "model.onnx").read_text() == "new"
    assert sorted(p.name for p in clip.iterdir()) == ["CN-CLIP-ViT-B-16"]  # the old folder gone, no stage left


def test_a_reinstall_where_folders_cannot_be_exchanged_falls_back_to_two_renames(tmp_path, monkeypatch):
    from immich_aio.download import install
    from immich_aio.store import ModelStore

    store = ModelStore(tmp_path / "models")
    _install(store, "old")
    monkeypatch.setattr(install, "_exchange", lambda a, b: False)
    _install(store, "new")
    clip = tmp_path / "models" / "clip"
    assert (clip / "CN-CLIP-ViT-B-16" / "visual" / "model.onnx").read_text() == "new"
    assert sorted(p.name for p in clip.iterdir()) == ["CN-CLIP-ViT-B-16"]


def test_the_exchange_reports_what_it_could_not_do(tmp_path):
    from immich_aio.download.install import _exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "x").write_text("a")
    assert _exchange(a, b) is False  # nothing to exchange with: nothing moved
    assert (a / "x").read_text() == "a" and not b.exists()
    b.mkdir()
    assert _exchange(a, b) is True
    assert (b / "x").read_text() == "a" and not (a / "x").exists()


def test_the_downloaders_import_no_model_code():
    """`immich-aio models` and the name catalogues load neither ONNX Runtime nor OpenCV (issue 18's layering)."""
    modules = ["cli", "clip", "ocr", "faces", "hf", "fetch", "install", "validate"]
    code = (
        "import sys\n"
        + "".join(f"import immich_aio.download.{m}\n" for m in modules)
        + "import immich_aio.names.catalog, immich_aio.names.fetchable\n"
        + "heavy = [m for m in ('onnxruntime', 'cv2', 'torch') if m in sys.modules]\n"
        + "print(heavy)\nsys.exit(1 if heavy else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
