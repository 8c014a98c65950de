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
