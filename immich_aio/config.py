"""All configuration, read once from the environment and validated before anything starts.

Immich ML's own variables (`MACHINE_LEARNING_*`, `IMMICH_*`) keep their meaning so an existing
deployment can switch over unchanged; immich-aio's additions use the `IMMICH_AIO_` prefix. Like
pydantic-settings in upstream, names are matched case-insensitively. A bad value stops the server
with one line naming the variable, never a traceback from deep inside.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from immich_aio import memory
from immich_aio.errors import BadRequest
from immich_aio.names.fetchable import CLIP_CHOICES
from immich_aio.store import clean_name
from immich_aio.tasks import TASK_TYPES, ModelType, Task

# (task, type) pairs with the env suffix upstream uses for each (preload, per-model TTL).
MODEL_KEYS: dict[tuple[Task, ModelType], str] = {
    (task, type_): f"{task.value.upper().replace('-', '_')}__{type_.value.upper()}"
    for task, types in TASK_TYPES.items()
    for type_ in types
}
TTL_PREFIX = "MACHINE_LEARNING_MODEL_TTL__"

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
_HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def default_request_threads() -> int:
    """Request threads mostly wait on batched runs, so there are more of them than cores."""
    return max(16, 4 * (os.cpu_count() or 2))


class ConfigError(ValueError):
    """A variable holds a value that cannot be used; the message names it and says what is accepted."""


class _Env:
    """Case-insensitive, typed, range-checked access to the environment."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.values = {k.upper(): v.strip() for k, v in environ.items() if v is not None and v.strip()}

    def raw(self, name: str) -> str | None:
        return self.values.get(name.upper())

    def number(self, name: str, default: float, lo: float, hi: float, integer: bool = False) -> float:
        raw = self.raw(name)
        if raw is None:
            return default
        what = "a whole number" if integer else "a number"
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be {what} from {lo:g} to {hi:g}, got {raw!r}") from None
        if not math.isfinite(value) or not lo <= value <= hi or (integer and not value.is_integer()):
            raise ConfigError(f"{name} must be {what} from {lo:g} to {hi:g}, got {raw!r}")
        return value

    def integer(self, name: str, default: int, lo: int, hi: int) -> int:
        return int(self.number(name, default, lo, hi, integer=True))

    def boolean(self, name: str, default: bool) -> bool:
        raw = self.raw(name)
        if raw is None:
            return default
        if raw.lower() in {"1", "true", "yes", "on"}:
            return True
        if raw.lower() in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{name} must be true or false, got {raw!r}")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        raw = self.raw(name)
        if raw is None:
            return default
        if raw.lower() not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
        return raw.lower()

    def model_name(self, name: str, value: str) -> str:
        try:
            return clean_name(value)
        except BadRequest:
            raise ConfigError(
                f"{name} holds {value!r}, which is not a model name (letters, digits, '_', '-', '+')"
            ) from None

    def names(self, name: str) -> tuple[str, ...]:
        return tuple(self.model_name(name, part) for part in _as_list(self.raw(name)))


def _as_list(raw: str | None) -> list[str]:
    return [part.strip() for part in (raw or "").split(",") if part.strip()]


def _parse_aliases(env: _Env) -> dict[str, str]:
    aliases: dict[str, str] = {}
    var = "IMMICH_AIO_CLIP_ALIASES"
    for pair in _as_list(env.raw(var)):
        immich_name, sep, served = pair.partition("=")
        if not sep or not immich_name.strip() or not served.strip():
            raise ConfigError(f"{var} entries look like immich_name=served_name, got {pair!r}")
        aliases[env.model_name(var, immich_name.strip())] = env.model_name(var, served.strip())
    return aliases


def _parse_allocator(env: _Env, default: str) -> str:
    """auto, jemalloc, mimalloc, glibc, or an absolute path to the library (checked when the server starts)."""
    raw = env.raw("IMMICH_AIO_ALLOCATOR")
    if raw is not None and raw.startswith("/"):
        return raw
    return env.choice("IMMICH_AIO_ALLOCATOR", default, memory.CHOICES)


def _parse_api_key(env: _Env) -> str | None:
    """The MT Photos API key: MT_PHOTOS_API_KEY, or API_AUTH_KEY as the official service names it. Never echoed."""
    for var in ("MT_PHOTOS_API_KEY", "API_AUTH_KEY"):
        key = env.raw(var)
        if key is None:
            continue
        if not 8 <= len(key) <= 256 or not all(33 <= ord(c) < 127 for c in key):
            raise ConfigError(
                f"{var} must be 8 to 256 visible ASCII characters (no spaces), as an HTTP header carries it; "
                f"the value set has {len(key)} characters"
            )
        return key
    return None


_CN_CLIP_ARCHS = {"ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "RN50"}


def _mt_clip_model(env: _Env, default: str) -> str:
    """Which CLIP model answers MT Photos: a name resolved as Immich's are; cn_clip's arch names (the official
    service's CLIP_MODEL values, e.g. ViT-B-16) mean the CN-CLIP model of that arch."""
    for var in ("IMMICH_AIO_MT_CLIP_MODEL", "CLIP_MODEL"):
        raw = env.raw(var)
        if raw is not None:
            return f"CN-CLIP-{raw}" if raw in _CN_CLIP_ARCHS else env.model_name(var, raw)
    return default  # what answers Immich by default


def _parse_revision(env: _Env, default: str) -> str:
    """Immich 3.3's model revision: `main` (the exports every earlier release used) or e.g. `v2`, a folder level."""
    raw = env.raw("MACHINE_LEARNING_MODEL_REVISION") or default
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", raw) or ".." in raw:
        raise ConfigError(f"MACHINE_LEARNING_MODEL_REVISION must be a revision name such as main or v2, got {raw!r}")
    return raw


def _parse_host(env: _Env, default: str) -> str:
    host = env.raw("IMMICH_HOST") or default
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(bare)
        return host
    except ValueError:
        pass
    if _HOSTNAME.fullmatch(bare):
        return host
    raise ConfigError(f"IMMICH_HOST must be an IP address or host name (e.g. [::], 0.0.0.0), got {host!r}")


def _parse_ttls(env: _Env, default: float) -> dict[tuple[str, str], float]:
    """Per-model TTL overrides, e.g. MACHINE_LEARNING_MODEL_TTL__CLIP__TEXTUAL=0 keeps the search encoder warm."""
    by_suffix = {suffix: key for key, suffix in MODEL_KEYS.items()}
    ttls: dict[tuple[str, str], float] = {}
    for var in env.values:
        if not var.startswith(TTL_PREFIX):
            continue
        suffix = var[len(TTL_PREFIX) :]
        if suffix not in by_suffix:
            known = ", ".join(TTL_PREFIX + s for s in by_suffix)
            raise ConfigError(f"{var} is not a model TTL setting; known: {known}")
        ttls[by_suffix[suffix]] = max(0.0, env.number(var, default, -1e9, 1e9))
    return ttls


@dataclass(frozen=True)
class Settings:
    host: str = "[::]"
    port: int = 3003
    log_level: str = "info"
    access_log: bool = False
    cache_folder: Path = Path("models")
    model_ttl: float = 300.0
    model_ttls: dict[tuple[str, str], float] = field(default_factory=dict)
    model_ttl_poll_s: float = 10.0
    request_threads: int = field(default_factory=lambda: default_request_threads())
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    model_arena: bool = False
    device_id: int = 0
    providers: tuple[str, ...] = ()
    openvino_precision: str = "FP32"  # Immich ML's MACHINE_LEARNING_OPENVINO_PRECISION (the `openvino` extra)
    preload: dict[tuple[Task, ModelType], tuple[str, ...]] = field(default_factory=dict)
    max_upload_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 100_000_000
    decode_budget_pixels: int = 0  # 0: DECODE_MP_PER_RUN per concurrent run (Runtime)
    decode_wait_s: float = 120.0
    ocr_default_model: str = "PP-OCRv6_small"
    ocr_max_side: int = 2560
    ocr_max_batch: int = 16
    ocr_device: str = "auto"  # auto: the CPU on a CUDA host (SessionFactory.ocr_on_cpu), else the models' device
    face_max_batch: int = 0  # 0: 8 on the CPU, 32 with a GPU (SessionFactory.face_batch)
    clip_aliases: dict[str, str] = field(default_factory=dict)
    batch_max_size: int = 0  # 0: 4 on CPU, 16 with CUDA
    batch_max_wait_ms: float = 0.0
    concurrent_runs: int = 0  # 0: cores // intra-op threads on CPU, 2 with CUDA
    short_runs_lane: bool = False  # CPU: OCR's short runs get a slot of their own beside concurrent_runs
    split_runs: bool = True  # CPU: under a backlog two runs of half the threads share a slot (SessionFactory)
    background_nice: int = 10  # how much lower the backlog's threads run than a search's (priority.py)
    keepalive_s: float = 5.0  # Immich ML's is 2; above undici's own 4 s, so that Immich's server lets go first
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 1000
    max_queued: int = 0  # 0: admitted by what the machine can hold (admission.py), not by a count
    shutdown_grace_s: float = 8.0
    mt_api_key: str | None = field(default=None, repr=False)  # the MT Photos API is off without it
    mt_clip_model: str = "ViT-B-32__openai"
    mt_clip_swap_rb: bool = False
    mt_face_model: str = "buffalo_l"
    mt_face_threshold: float = 0.65
    mt_ocr_model: str = "PP-OCRv6_small"
    clip_reduced_decode: bool = False
    ort_cache: bool = True  # keep ONNX Runtime's optimised graphs in <store>/.ort-cache (ort_cache.py)
    ort_cache_packed: bool = True  # and their weights as the CPU kernels pack them, checked in a child (ort_pack.py)
    allocator: str = "auto"  # auto | jemalloc | mimalloc | glibc
    memory_reserve_bytes: int = 64 * 1024 * 1024  # admission: memory always left free
    disk_reserve_bytes: int = 64 * 1024 * 1024  # admission: spool disk always left free
    auto_fetch: bool = True  # missing models are downloaded on first use (off with HF_HUB_OFFLINE=1 too)
    auto_fetch_clip: str = "chinese"  # chinese | immich: what a CLIP name with no model gets
    fetch_wait_s: float = 240.0  # an image request waits this long for its model's download
    fetch_wait_text_s: float = 20.0  # a text search, likewise
    model_revision: str = "main"  # MACHINE_LEARNING_MODEL_REVISION: Immich 3.3's `v2` exports live in <model>/v2/

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = _Env(os.environ if environ is None else environ)
        log_level = (env.raw("IMMICH_LOG_LEVEL") or cls.log_level).lower()
        if log_level not in _LOG_LEVELS:
            raise ConfigError(f"IMMICH_LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, got {log_level!r}")
        preload = {
            key: names
            for key, suffix in MODEL_KEYS.items()
            if (names := env.names(f"MACHINE_LEARNING_PRELOAD__{suffix}"))
        }
        # Upstream: a TTL <= 0 disables unloading.
        model_ttl = max(0.0, env.number("MACHINE_LEARNING_MODEL_TTL", cls.model_ttl, -1e9, 1e9))
        max_pixels = env.integer("IMMICH_AIO_MAX_PIXELS", cls.max_pixels, 1024, 1_000_000_000)
        budget_mp = env.number("IMMICH_AIO_DECODE_BUDGET_MP", cls.decode_budget_pixels / 1e6, 0, 10_000)
        if 0 < budget_mp < 1:
            raise ConfigError(f"IMMICH_AIO_DECODE_BUDGET_MP must be 0 (automatic) or at least 1, got {budget_mp:g}")
        return cls(
            host=_parse_host(env, cls.host),
            port=env.integer("IMMICH_PORT", cls.port, 1, 65535),
            log_level=_LOG_LEVELS[log_level],
            access_log=env.boolean("IMMICH_AIO_ACCESS_LOG", cls.access_log),
            cache_folder=Path(env.raw("MACHINE_LEARNING_CACHE_FOLDER") or cls.cache_folder).expanduser(),
            model_ttl=model_ttl,
            model_ttls=_parse_ttls(env, model_ttl),
            model_ttl_poll_s=env.number("MACHINE_LEARNING_MODEL_TTL_POLL_S", cls.model_ttl_poll_s, 0.01, 86400),
            request_threads=env.integer("MACHINE_LEARNING_REQUEST_THREADS", default_request_threads(), 1, 1024),
            intra_op_threads=env.integer("MACHINE_LEARNING_MODEL_INTRA_OP_THREADS", cls.intra_op_threads, 0, 1024),
            inter_op_threads=env.integer("MACHINE_LEARNING_MODEL_INTER_OP_THREADS", cls.inter_op_threads, 0, 1024),
            model_arena=env.boolean("MACHINE_LEARNING_MODEL_ARENA", cls.model_arena),
            device_id=env.integer("MACHINE_LEARNING_DEVICE_ID", cls.device_id, 0, 1024),
            providers=tuple(_as_list(env.raw("IMMICH_AIO_PROVIDERS"))),
            openvino_precision=env.choice("MACHINE_LEARNING_OPENVINO_PRECISION", "fp32", ("fp32", "fp16")).upper(),
            preload=preload,
            max_upload_bytes=int(
                env.number("IMMICH_AIO_MAX_UPLOAD_MB", cls.max_upload_bytes / 2**20, 0.01, 1024) * 2**20
            ),
            max_pixels=max_pixels,
            # Decoded images held at once; one image larger than the budget still runs, alone.
            decode_budget_pixels=round(budget_mp * 1_000_000),
            decode_wait_s=env.number("IMMICH_AIO_DECODE_WAIT_S", cls.decode_wait_s, 0.1, 3600),
            ocr_default_model=env.model_name(
                "IMMICH_AIO_OCR_MODEL", env.raw("IMMICH_AIO_OCR_MODEL") or cls.ocr_default_model
            ),
            ocr_max_side=env.integer("IMMICH_AIO_OCR_MAX_SIDE", cls.ocr_max_side, 256, 16384),
            ocr_max_batch=env.integer("MACHINE_LEARNING_MAX_BATCH_SIZE__OCR", cls.ocr_max_batch, 1, 1024),
            ocr_device=env.choice("IMMICH_AIO_OCR_DEVICE", cls.ocr_device, ("auto", "cpu", "gpu")),
            face_max_batch=env.integer(
                "MACHINE_LEARNING_MAX_BATCH_SIZE__FACIAL_RECOGNITION", cls.face_max_batch, 0, 1024
            ),
            clip_aliases=_parse_aliases(env),
            batch_max_size=env.integer("IMMICH_AIO_BATCH_MAX_SIZE", cls.batch_max_size, 0, 1024),
            batch_max_wait_ms=env.number("IMMICH_AIO_BATCH_MAX_WAIT_MS", cls.batch_max_wait_ms, 0, 1000),
            concurrent_runs=env.integer("IMMICH_AIO_CONCURRENT_RUNS", cls.concurrent_runs, 0, 256),
            short_runs_lane=env.boolean("IMMICH_AIO_SHORT_RUNS_LANE", cls.short_runs_lane),
            split_runs=env.boolean("IMMICH_AIO_SPLIT_RUNS", cls.split_runs),
            background_nice=env.integer("IMMICH_AIO_BACKGROUND_NICE", cls.background_nice, 0, 19),
            keepalive_s=env.number("MACHINE_LEARNING_HTTP_KEEPALIVE_TIMEOUT_S", cls.keepalive_s, 0.1, 3600),
            header_timeout_s=env.number("IMMICH_AIO_HEADER_TIMEOUT_S", cls.header_timeout_s, 0.1, 3600),
            body_timeout_s=env.number("IMMICH_AIO_BODY_TIMEOUT_S", cls.body_timeout_s, 0.1, 3600),
            max_connections=env.integer("IMMICH_AIO_MAX_CONNECTIONS", cls.max_connections, 8, 100_000),
            # An optional cap on requests admitted at once; by default admission goes by memory and disk left.
            max_queued=env.integer("IMMICH_AIO_MAX_QUEUED", cls.max_queued, 0, 1_000_000),
            # Low on purpose: a queued request holds at most 2 MB of memory, and a small NAS runs with little
            # memory available; below this the kernel's OOM killer is near, and refusing is the kinder answer.
            memory_reserve_bytes=int(
                env.number("IMMICH_AIO_MEMORY_RESERVE_MB", cls.memory_reserve_bytes / 2**20, 0, 1 << 20) * 2**20
            ),
            disk_reserve_bytes=int(
                env.number("IMMICH_AIO_DISK_RESERVE_MB", cls.disk_reserve_bytes / 2**20, 0, 1 << 30) * 2**20
            ),
            shutdown_grace_s=env.number("IMMICH_AIO_SHUTDOWN_GRACE_S", cls.shutdown_grace_s, 0, 3600),
            clip_reduced_decode=env.boolean("IMMICH_AIO_CLIP_REDUCED_DECODE", cls.clip_reduced_decode),
            ort_cache=env.boolean("IMMICH_AIO_ORT_CACHE", cls.ort_cache),
            ort_cache_packed=env.boolean("IMMICH_AIO_ORT_CACHE_PACKED", cls.ort_cache_packed),
            auto_fetch=env.boolean("IMMICH_AIO_AUTO_FETCH", cls.auto_fetch)
            and not env.boolean("HF_HUB_OFFLINE", False),
            auto_fetch_clip=env.choice("IMMICH_AIO_AUTO_FETCH_CLIP", cls.auto_fetch_clip, CLIP_CHOICES),
            # Below the Immich server's 300 s (undici's headers timeout): room for the load and the run after it.
            fetch_wait_s=env.number("IMMICH_AIO_FETCH_WAIT_S", cls.fetch_wait_s, 1, 290),
            fetch_wait_text_s=env.number("IMMICH_AIO_FETCH_WAIT_TEXT_S", cls.fetch_wait_text_s, 1, 290),
            model_revision=_parse_revision(env, cls.model_revision),
            allocator=_parse_allocator(env, cls.allocator),
            mt_api_key=_parse_api_key(env),
            mt_clip_model=_mt_clip_model(env, cls.mt_clip_model),
            mt_clip_swap_rb=env.boolean("IMMICH_AIO_MT_CLIP_SWAP_RB", cls.mt_clip_swap_rb),
            mt_face_model=env.model_name(
                "IMMICH_AIO_MT_FACE_MODEL",
                env.raw("IMMICH_AIO_MT_FACE_MODEL") or env.raw("RECOGNITION_MODEL") or cls.mt_face_model,
            ),
            mt_face_threshold=env.number(
                "IMMICH_AIO_MT_FACE_THRESHOLD",
                env.number("DETECTION_THRESH", cls.mt_face_threshold, 0.0, 1.0),
                0.0,
                1.0,
            ),
            mt_ocr_model=env.model_name(
                "IMMICH_AIO_MT_OCR_MODEL",
                env.raw("IMMICH_AIO_MT_OCR_MODEL") or env.raw("IMMICH_AIO_OCR_MODEL") or cls.mt_ocr_model,
            ),
        )

    def ttl_for(self, task: str, type_: str) -> float:
        """Seconds idle before this kind of model unloads; 0 keeps it loaded."""
        return self.model_ttls.get((task, type_), self.model_ttl)

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
