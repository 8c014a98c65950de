"""Every setting is validated at start: a bad value is a one-line error naming its variable (issue #11, class 12)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from immich_aio.config import ConfigError, Settings

ROOT = Path(__file__).resolve().parent.parent

BAD_VALUES = [
    ("IMMICH_PORT", "99999"),
    ("IMMICH_PORT", "0"),
    ("IMMICH_PORT", "-1"),
    ("IMMICH_PORT", "3003.5"),
    ("IMMICH_PORT", "http"),
    ("MACHINE_LEARNING_MODEL_TTL", "nan"),
    ("MACHINE_LEARNING_MODEL_TTL", "inf"),
    ("MACHINE_LEARNING_MODEL_TTL", "1e400"),
    ("MACHINE_LEARNING_MODEL_TTL__CLIP__TEXTUAL", "soon"),
    ("MACHINE_LEARNING_MODEL_TTL__SOMETHING__ELSE", "0"),
    ("MACHINE_LEARNING_MODEL_TTL_POLL_S", "-5"),
    ("MACHINE_LEARNING_REQUEST_THREADS", "100000"),
    ("MACHINE_LEARNING_MODEL_INTRA_OP_THREADS", "-2"),
    ("MACHINE_LEARNING_MODEL_INTER_OP_THREADS", "4.5"),
    ("MACHINE_LEARNING_DEVICE_ID", "-1"),
    ("MACHINE_LEARNING_MAX_BATCH_SIZE__OCR", "0"),
    ("MACHINE_LEARNING_MAX_BATCH_SIZE__FACIAL_RECOGNITION", "100000"),
    ("MACHINE_LEARNING_HTTP_KEEPALIVE_TIMEOUT_S", "-1"),
    ("IMMICH_AIO_MAX_UPLOAD_MB", "0"),
    ("IMMICH_AIO_MAX_UPLOAD_MB", "1e12"),
    ("IMMICH_AIO_MAX_PIXELS", "10"),
    ("IMMICH_AIO_DECODE_BUDGET_MP", "0.5"),
    ("IMMICH_AIO_DECODE_BUDGET_MP", "-1"),
    ("IMMICH_AIO_ALLOCATOR", "tcmalloc"),
    ("IMMICH_AIO_CLIP_REDUCED_DECODE", "sometimes"),
    ("IMMICH_AIO_OCR_MAX_SIDE", "16"),
    ("IMMICH_AIO_BATCH_MAX_SIZE", "-3"),
    ("IMMICH_AIO_BATCH_MAX_WAIT_MS", "100000"),
    ("IMMICH_AIO_CONCURRENT_RUNS", "1000"),
    ("IMMICH_AIO_BACKGROUND_NICE", "20"),
    ("IMMICH_AIO_BACKGROUND_NICE", "-1"),
    ("IMMICH_AIO_HEADER_TIMEOUT_S", "0"),
    ("IMMICH_AIO_BODY_TIMEOUT_S", "abc"),
    ("IMMICH_AIO_SHUTDOWN_GRACE_S", "-1"),
    ("IMMICH_AIO_ACCESS_LOG", "maybe"),
    ("IMMICH_AIO_CLIP_ALIASES", "ViT-B-32__openai=my model"),
    ("IMMICH_AIO_OCR_MODEL", "bad name\n"),
    ("MACHINE_LEARNING_PRELOAD__CLIP__TEXTUAL", "ok,../"),
    ("IMMICH_HOST", "not a host!"),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_bad_value_names_its_variable(name, value):
    with pytest.raises(ConfigError) as err:
        Settings.from_env({name: value})
    assert name in str(err.value)
    assert "\n" not in str(err.value)


def test_server_refuses_bad_port_with_one_line_and_no_traceback(tmp_path):
    env = dict(os.environ, IMMICH_PORT="99999", MACHINE_LEARNING_CACHE_FOLDER=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "immich_aio"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "IMMICH_PORT" in lines[0] and "Traceback" not in proc.stderr


def test_good_values_are_taken():
    s = Settings.from_env(
        {
            "IMMICH_PORT": "65535",
            "MACHINE_LEARNING_MODEL_TTL": "-1",  # upstream: <= 0 disables unloading
            "MACHINE_LEARNING_MODEL_TTL__CLIP__TEXTUAL": "0",
            "MACHINE_LEARNING_MODEL_TTL__ocr__detection": "30",
            "IMMICH_AIO_ACCESS_LOG": "true",
        }
    )
    assert s.port == 65535 and s.model_ttl == 0
    assert s.ttl_for("clip", "textual") == 0
    assert s.ttl_for("ocr", "detection") == 30
    assert s.ttl_for("clip", "visual") == 0  # the default, which is disabled here
    assert s.access_log is True


def test_each_default_is_stated_once():
    """An empty environment gives exactly the dataclass's defaults: the two cannot drift apart (issue 18)."""
    from immich_aio.config import Settings

    assert Settings.from_env({}) == Settings()
