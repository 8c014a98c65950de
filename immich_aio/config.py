"""All configuration, read once from the environment.

Immich ML's own variables (`MACHINE_LEARNING_*`, `IMMICH_*`) keep their meaning so an existing
deployment can switch over unchanged; immich-aio's additions use the `IMMICH_AIO_` prefix.
Like pydantic-settings in upstream, `MACHINE_LEARNING_*` names are matched case-insensitively.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# (task, type) pairs that can be preloaded, with the env suffix upstream uses for each.
PRELOAD_KEYS: dict[tuple[str, str], str] = {
    ("clip", "textual"): "CLIP__TEXTUAL",
    ("clip", "visual"): "CLIP__VISUAL",
    ("facial-recognition", "detection"): "FACIAL_RECOGNITION__DETECTION",
    ("facial-recognition", "recognition"): "FACIAL_RECOGNITION__RECOGNITION",
    ("ocr", "detection"): "OCR__DETECTION",
    ("ocr", "recognition"): "OCR__RECOGNITION",
}

_LOG_LEVELS = {
    "verbose": "debug",
    "debug": "debug",
    "log": "info",
    "info": "info",
    "warn": "warning",
    "warning": "warning",
    "error": "error",
    "fatal": "critical",
}


class ConfigError(ValueError):
    """A variable holds a value that cannot be used."""


def _env_reader(environ: Mapping[str, str]):
    upper = {k.upper(): v for k, v in environ.items()}

    def get(name: str, default: str | None = None) -> str | None:
        value = upper.get(name.upper())
        return default if value is None or value.strip() == "" else value.strip()

    return get


def _as_float(get, name: str, default: float) -> float:
    raw = get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError as e:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from e


def _as_int(get, name: str, default: int) -> int:
    return int(_as_float(get, name, default))


def _as_bool(get, name: str, default: bool) -> bool:
    raw = get(name)
    if raw is None:
        return default
    if raw.lower() in {"1", "true", "yes", "on"}:
        return True
    if raw.lower() in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _as_list(raw: str | None) -> list[str]:
    return [part.strip() for part in (raw or "").split(",") if part.strip()]


def _parse_aliases(raw: str | None) -> dict[str, str]:
    aliases: dict[str, str] = {}
    for pair in _as_list(raw):
        immich_name, sep, served = pair.partition("=")
        if not sep or not immich_name.strip() or not served.strip():
            raise ConfigError(f"IMMICH_AIO_CLIP_ALIASES entries look like immich_name=served_name, got {pair!r}")
        aliases[immich_name.strip()] = served.strip()
    return aliases


@dataclass(frozen=True)
class Settings:
    host: str = "[::]"
    port: int = 3003
    log_level: str = "info"
    cache_folder: Path = Path("models")
    model_ttl: float = 300.0
    model_ttl_poll_s: float = 10.0
    request_threads: int = 16
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    model_arena: bool = False
    device_id: int = 0
    providers: tuple[str, ...] = ()
    preload: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    max_upload_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 100_000_000
    ocr_default_model: str = "PP-OCRv6_small"
    ocr_max_batch: int = 16
    face_max_batch: int = 32
    clip_aliases: dict[str, str] = field(default_factory=dict)
    batch_max_size: int = 0  # 0: 4 on CPU, 16 with CUDA
    batch_max_wait_ms: float = 0.0
    concurrent_runs: int = 0  # 0: cores // intra-op threads on CPU, 2 with CUDA
    keepalive_s: float = 2.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        get = _env_reader(os.environ if environ is None else environ)
        cpu_count = os.cpu_count() or 2
        log_level = (get("IMMICH_LOG_LEVEL", "info") or "info").lower()
        if log_level not in _LOG_LEVELS:
            raise ConfigError(f"IMMICH_LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, got {log_level!r}")
        preload = {
            key: tuple(_as_list(get(f"MACHINE_LEARNING_PRELOAD__{suffix}")))
            for key, suffix in PRELOAD_KEYS.items()
            if get(f"MACHINE_LEARNING_PRELOAD__{suffix}")
        }
        return cls(
            host=get("IMMICH_HOST", "[::]") or "[::]",
            port=_as_int(get, "IMMICH_PORT", 3003),
            log_level=_LOG_LEVELS[log_level],
            cache_folder=Path(get("MACHINE_LEARNING_CACHE_FOLDER", "models") or "models").expanduser(),
            model_ttl=_as_float(get, "MACHINE_LEARNING_MODEL_TTL", 300.0),
            model_ttl_poll_s=_as_float(get, "MACHINE_LEARNING_MODEL_TTL_POLL_S", 10.0),
            # Request threads mostly wait on batched runs, so there are more of them than cores.
            request_threads=max(2, _as_int(get, "MACHINE_LEARNING_REQUEST_THREADS", max(16, 4 * cpu_count))),
            intra_op_threads=_as_int(get, "MACHINE_LEARNING_MODEL_INTRA_OP_THREADS", 0),
            inter_op_threads=_as_int(get, "MACHINE_LEARNING_MODEL_INTER_OP_THREADS", 0),
            model_arena=_as_bool(get, "MACHINE_LEARNING_MODEL_ARENA", False),
            device_id=_as_int(get, "MACHINE_LEARNING_DEVICE_ID", 0),
            providers=tuple(_as_list(get("IMMICH_AIO_PROVIDERS"))),
            preload=preload,
            max_upload_bytes=int(_as_float(get, "IMMICH_AIO_MAX_UPLOAD_MB", 64) * 1024 * 1024),
            max_pixels=_as_int(get, "IMMICH_AIO_MAX_PIXELS", 100_000_000),
            ocr_default_model=get("IMMICH_AIO_OCR_MODEL", "PP-OCRv6_small") or "PP-OCRv6_small",
            ocr_max_batch=max(1, _as_int(get, "MACHINE_LEARNING_MAX_BATCH_SIZE__OCR", 16)),
            face_max_batch=max(1, _as_int(get, "MACHINE_LEARNING_MAX_BATCH_SIZE__FACIAL_RECOGNITION", 32)),
            clip_aliases=_parse_aliases(get("IMMICH_AIO_CLIP_ALIASES")),
            batch_max_size=max(0, _as_int(get, "IMMICH_AIO_BATCH_MAX_SIZE", 0)),
            batch_max_wait_ms=max(0.0, _as_float(get, "IMMICH_AIO_BATCH_MAX_WAIT_MS", 0.0)),
            concurrent_runs=max(0, _as_int(get, "IMMICH_AIO_CONCURRENT_RUNS", 0)),
            keepalive_s=_as_float(get, "MACHINE_LEARNING_HTTP_KEEPALIVE_TIMEOUT_S", 2.0),
        )

    @property
    def bind_host(self) -> str:
        """The host for the socket: `[::]` loses its brackets; IPv6-less hosts fall back to 0.0.0.0."""
        host = self.host.strip("[]")
        if host == "::" and not _ipv6_available():
            return "0.0.0.0"
        return host


def _ipv6_available() -> bool:
    import socket

    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::", 0))
        return True
    except OSError:
        return False
