"""Name cleaning, the store boundary, and environment parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from immich_aio.config import ConfigError, Settings
from immich_aio.errors import BadRequest
from immich_aio.store import ModelStore, clean_name


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("ViT-B-32__openai", "ViT-B-32__openai"),
        ("immich-app/ViT-B-32__openai", "ViT-B-32__openai"),
        ("ViT-B-16-plus-240:laion400m_e31", "ViT-B-16-plus-240_laion400m_e31"),
        ("nllb-clip-base-siglip__v1.0", "nllb-clip-base-siglip__v10"),
        ("org/sub/buffalo_l", "buffalo_l"),
    ],
)
def test_clean_name_as_immich_ml(raw, clean):
    assert clean_name(raw) == clean


@pytest.mark.parametrize("raw", ["..", "../..", "a/../..", "", "x/", "-rf", "a b", "a\x00b", "x" * 201])
def test_clean_name_refuses_unsafe(raw):
    with pytest.raises(BadRequest):
        clean_name(raw)


def test_store_paths_stay_inside(tmp_path: Path):
    store = ModelStore(tmp_path)
    assert store.model_dir("ocr", "immich-app/PP-OCRv5_mobile") == tmp_path.resolve() / "ocr" / "PP-OCRv5_mobile"
    with pytest.raises(BadRequest):
        store.path("ocr", "..", "..", "etc")
    (tmp_path / "outside").mkdir()
    (tmp_path / "ocr").mkdir()
    (tmp_path / "ocr" / "link").symlink_to(tmp_path.parent)
    with pytest.raises(BadRequest):
        store.model_dir("ocr", "link")


def test_settings_read_immich_variables_case_insensitively(tmp_path):
    s = Settings.from_env(
        {
            "IMMICH_HOST": "127.0.0.1",
            "IMMICH_PORT": "4000",
            "IMMICH_LOG_LEVEL": "verbose",
            "machine_learning_cache_folder": str(tmp_path),
            "MACHINE_LEARNING_MODEL_TTL": "0",
            "MACHINE_LEARNING_PRELOAD__OCR__DETECTION": "PP-OCRv5_mobile, PP-OCRv6_small",
            "MACHINE_LEARNING_PRELOAD__CLIP__TEXTUAL": "ViT-B-32__openai",
            "IMMICH_AIO_MAX_UPLOAD_MB": "2",
            "IMMICH_AIO_CLIP_ALIASES": "ViT-B-32__openai=CN-CLIP-ViT-B-16",
        }
    )
    assert (s.bind_host, s.port, s.log_level) == ("127.0.0.1", 4000, "debug")
    assert s.cache_folder == tmp_path and s.model_ttl == 0
    assert s.preload[("ocr", "detection")] == ("PP-OCRv5_mobile", "PP-OCRv6_small")
    assert s.preload[("clip", "textual")] == ("ViT-B-32__openai",)
    assert s.max_upload_bytes == 2 * 1024 * 1024
    assert s.clip_aliases == {"ViT-B-32__openai": "CN-CLIP-ViT-B-16"}


def test_settings_defaults():
    s = Settings.from_env({})
    assert s.port == 3003 and s.host == "[::]" and s.model_ttl == 300
    assert s.bind_host in ("::", "0.0.0.0")
    assert s.max_pixels == 100_000_000 and s.max_upload_bytes == 64 * 1024 * 1024


@pytest.mark.parametrize(
    "env",
    [
        {"IMMICH_PORT": "http"},
        {"IMMICH_LOG_LEVEL": "loud"},
        {"IMMICH_AIO_CLIP_ALIASES": "oops"},
        {"MACHINE_LEARNING_MODEL_ARENA": "maybe"},
    ],
)
def test_bad_settings_are_refused(env):
    with pytest.raises(ConfigError):
        Settings.from_env(env)


# --- sha256 records: a restart does not hash every model file again ------------------------------


def _no_hashing(monkeypatch) -> None:
    from immich_aio import store as store_module

    def refuse(path, chunk=0):
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(store_module, "sha256_file", refuse)


def test_a_files_sha256_is_recorded_for_the_next_start_and_redone_when_it_changes(tmp_path: Path, monkeypatch):
    import hashlib
    import os

    from immich_aio.store import HASHES

    model = tmp_path / "clip" / "m" / "visual" / "model.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"weights one")
    assert ModelStore(tmp_path).describe(model).sha256 == hashlib.sha256(b"weights one").hexdigest()
    [record] = (tmp_path / HASHES).iterdir()
    with monkeypatch.context() as m:
        _no_hashing(m)
        assert ModelStore(tmp_path).describe(model).sha256 == hashlib.sha256(b"weights one").hexdigest()
    staged = model.with_name("staged")
    staged.write_bytes(b"weights two")
    os.replace(staged, model)  # a reinstall: another inode
    assert ModelStore(tmp_path).describe(model).sha256 == hashlib.sha256(b"weights two").hexdigest()
    assert list((tmp_path / HASHES).iterdir()) == [record]  # one record per file, rewritten
    with open(model, "r+b") as f:  # rewritten in place, same size: another modification time
        f.write(b"W")
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert ModelStore(tmp_path).describe(model).sha256 == hashlib.sha256(b"Weights two").hexdigest()


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda r: "not json",
        lambda r: {**r, "sha256": "../../etc"},
        lambda r: {**r, "identity": [0, 0, 0, 0], "sha256": "0" * 64},  # another version of the file
        lambda r: {**r, "path": "/elsewhere/model.onnx", "sha256": "0" * 64},  # another file's
        lambda r: [r],
    ],
)
def test_a_damaged_or_foreign_sha256_record_is_not_believed(tmp_path: Path, corrupt):
    import hashlib
    import json

    from immich_aio.store import HASHES

    model = tmp_path / "ocr" / "m" / "detection" / "model.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"detector")
    ModelStore(tmp_path).describe(model)
    [record] = (tmp_path / HASHES).iterdir()
    bad = corrupt(json.loads(record.read_text()))
    record.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    assert ModelStore(tmp_path).describe(model).sha256 == hashlib.sha256(b"detector").hexdigest()
    assert json.loads(record.read_text())["sha256"] == hashlib.sha256(b"detector").hexdigest()  # mended


def test_a_read_only_store_keeps_no_records_and_still_describes(tmp_path: Path):
    import hashlib
    import os

    from immich_aio.store import HASHES

    model = tmp_path / "ocr" / "m" / "detection" / "model.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"detector")
    (tmp_path / HASHES).write_text("a file where the folder would go")  # as unwritable as it gets for root
    os.chmod(tmp_path, 0o555)
    try:
        assert ModelStore(tmp_path).describe(model).sha256 == hashlib.sha256(b"detector").hexdigest()
    finally:
        os.chmod(tmp_path, 0o755)
    assert (tmp_path / HASHES).is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".sha256.")]


def test_records_of_files_that_are_gone_are_swept_at_start(store: Path, make_client):
    import json

    from immich_aio.store import HASHES

    kept, gone = (store / "ocr" / n / "detection" / "model.onnx" for n in ("kept", "gone"))
    for f in (kept, gone):
        f.parent.mkdir(parents=True)
        f.write_bytes(f.parent.parent.name.encode())
        ModelStore(store).describe(f)
    (store / HASHES / ".partial.1.2").write_text("{")  # left by a process that died while writing
    gone.unlink()
    assert len(list((store / HASHES).iterdir())) == 3
    make_client()
    [left] = (store / HASHES).iterdir()
    assert json.loads(left.read_text())["path"] == str(kept)
