"""The one ONNX Runtime session factory every model uses.

Centralising providers, threads and arenas is what lets all models share one process and,
on a GPU host, one CUDA context, with settings tuned in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnxruntime as ort

from immich_aio.batching import BatchPolicy, RunGate
from immich_aio.config import Settings

if TYPE_CHECKING:
    from immich_aio.metrics import Metrics

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class SessionProfile:
    """Per-model knobs: dynamic input shapes want cuDNN's heuristic search, not a re-tune per shape."""

    dynamic_shapes: bool = False


class SessionFactory:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        available = ort.get_available_providers()
        if settings.providers:
            unknown = [p for p in settings.providers if p not in available]
            if unknown:
                raise ValueError(
                    f"IMMICH_AIO_PROVIDERS names {', '.join(unknown)}, not available in this ONNX Runtime "
                    f"({', '.join(available)})"
                )
            self.providers = list(settings.providers)
        else:
            self.providers = [CUDA, CPU] if CUDA in available else [CPU]
        self.cpu_only = self.providers == [CPU]
        cores = _cpu_count()
        # Thread budget: each background run gets `intra_threads` cores and at most `slots` runs go at
        # once, so concurrent requests never oversubscribe the CPU. With CUDA the GPU does the work and
        # two slots let one request's pre/post-processing overlap another's run.
        self.intra_threads = settings.intra_op_threads or (min(cores, 4) if self.cpu_only else 2)
        slots = settings.concurrent_runs or (max(1, cores // self.intra_threads) if self.cpu_only else 2)
        self.gate = RunGate(slots, on_wait=metrics.gate_wait.observe if metrics else None)
        self.batch_size = settings.batch_max_size or (4 if self.cpu_only else 16)

    def policy(self, max_size: int | None = None) -> BatchPolicy:
        return BatchPolicy(max_size or self.batch_size, self.settings.batch_max_wait_ms / 1000)

    def batch_observer(self, name: str) -> Callable[[int], None] | None:
        return self.metrics.batch_observer(name) if self.metrics is not None else None

    def options(self) -> ort.SessionOptions:
        s = self.settings
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        opts.enable_cpu_mem_arena = s.model_arena
        opts.intra_op_num_threads = self.intra_threads
        if s.inter_op_threads > 1:
            opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
            opts.inter_op_num_threads = s.inter_op_threads
        else:
            opts.inter_op_num_threads = 1
        # Threads that spin while idle steal cores from the other models' runs.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts

    def provider_list(self, profile: SessionProfile) -> list[str | tuple[str, dict[str, str]]]:
        out: list[str | tuple[str, dict[str, str]]] = []
        for p in self.providers:
            if p == CUDA:
                out.append(
                    (
                        CUDA,
                        {
                            "device_id": str(self.settings.device_id),
                            "arena_extend_strategy": "kSameAsRequested",
                            "cudnn_conv_algo_search": "HEURISTIC" if profile.dynamic_shapes else "EXHAUSTIVE",
                        },
                    )
                )
            else:
                out.append(p)
        return out

    def create(self, model: Path | bytes, profile: SessionProfile | None = None) -> ort.InferenceSession:
        """A session for a file, or for model bytes derived in memory (never written over the user's file)."""
        profile = profile or SessionProfile()
        source = str(model) if isinstance(model, Path) else model
        return ort.InferenceSession(source, sess_options=self.options(), providers=self.provider_list(profile))


def _cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
