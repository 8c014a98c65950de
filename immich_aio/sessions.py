"""The one ONNX Runtime session factory every model uses.

Centralising providers, threads and arenas is what lets all models share one process and,
on a GPU host, one CUDA context, with settings tuned in one place.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnxruntime as ort

from immich_aio import mapped_load, openvino
from immich_aio.batching import BatchPolicy, RunGate
from immich_aio.config import Settings
from immich_aio.ort_cache import OrtCache, plain_session

if TYPE_CHECKING:
    from immich_aio.metrics import Metrics

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
OPENVINO = openvino.PROVIDER


@dataclass(frozen=True)
class SessionProfile:
    """Per-model knobs.

    dynamic_shapes: input shapes change from run to run (batches across requests, image-dependent sizes), so cuDNN
    picks convolution algorithms by heuristic: its exhaustive search runs again for every new shape.
    cpu: the CPU provider even where the others run on a GPU (OCR on a CUDA host: SessionFactory.ocr_on_cpu).
    """

    dynamic_shapes: bool = False
    cpu: bool = False


class SessionFactory:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        available = ort.get_available_providers()
        ov_devices = openvino.devices() if openvino.PROVIDER in available else []
        if settings.providers:
            unknown = [p for p in settings.providers if p not in available]
            if unknown:
                raise ValueError(
                    f"IMMICH_AIO_PROVIDERS names {', '.join(unknown)}, not available in this ONNX Runtime "
                    f"({', '.join(available)})"
                )
            self.providers = list(settings.providers)
        elif CUDA in available and cuda_usable(settings.device_id):
            self.providers = [CUDA, CPU]
        elif OPENVINO in available and openvino.gpus(ov_devices):
            self.providers = [OPENVINO, CPU]  # the `openvino` extra on a host with an Intel GPU: what it is for
        else:
            if OPENVINO in available:
                _no_intel_gpu()
            self.providers = [CPU]
        self.cpu_only = self.providers == [CPU]
        self.on_cuda = CUDA in self.providers  # what MT Photos calls "cuda" (an Intel GPU through OpenVINO is not)
        self.openvino_device = (
            openvino.device_type(settings.device_id, ov_devices) if OPENVINO in self.providers else None
        )
        # OpenVINO compiles a model for a GPU for seconds, and its cache saves that; on the CPU device its cache saved
        # 0.1 of a ViT-B/16's 1.9 s load and took 900 MB for the benchmark's models, so it is kept for GPUs only
        self.openvino_cache = (
            openvino.CompiledCache(settings.cache_folder.expanduser())
            if self.openvino_device not in (None, "CPU")
            else None
        )
        # OpenVINO on the CPU device runs on the CPU's cores: the CPU's thread budget and batch size apply
        on_cpu = self.cpu_only or self.openvino_device == "CPU"
        cores = mapped_load.cores()
        # Thread budget: each background run gets `intra_threads` cores and at most `slots` runs go at
        # once, so concurrent requests never oversubscribe the CPU. With CUDA the GPU does the work and
        # two slots let one request's pre/post-processing overlap another's run.
        # A CPU run's threads: every run on a CPU host, OCR's on a GPU host (below)
        self.cpu_threads = settings.intra_op_threads or min(cores, 4)
        self.intra_threads = self.cpu_threads if on_cpu else (settings.intra_op_threads or 2)
        # OCR on the CPU of a CUDA host (IMMICH_AIO_OCR_DEVICE=auto): PP-OCR's inputs change shape with every photo
        # and every batch of lines, and on CUDA each new shape costs far more than the run (README, "GPU hosts
        # (NVIDIA)": measured on an H200, OCR took 1.8 s a photo on CUDA). Its runs get CPU threads and a gate
        # of their own, so they never hold a GPU run's slot.
        self.ocr_on_cpu = not self.cpu_only and (
            settings.ocr_device == "cpu" or (settings.ocr_device == "auto" and self.on_cuda)
        )
        slots = settings.concurrent_runs or (max(1, cores // self.intra_threads) if on_cpu else 2)
        # IMMICH_AIO_SPLIT_RUNS: under a backlog a slot's threads run two runs of half as many each, on a second
        # session per model that is only made once such a run comes (README, "Memory and runtime settings")
        split = (
            2
            if on_cpu
            and self.openvino_device is None
            and settings.split_runs
            and not settings.short_runs_lane
            and self.intra_threads >= 2
            else 1
        )
        self.narrow_threads = self.intra_threads // split
        on_wait = metrics.gate_wait.observe if metrics else None
        self.gate = RunGate(slots, on_wait=on_wait, split=split)
        # OCR's short runs (OcrDetector/OcrRecognizer.short_runs) go through `short_gate`, the shared gate unless:
        self.short_gate = self.gate
        if on_cpu and settings.short_runs_lane and not settings.concurrent_runs:
            # IMMICH_AIO_SHORT_RUNS_LANE: OCR's chain of short runs, each queued behind CLIP and face runs, gets a
            # slot of its own. In Immich's mix on 2 cores OCR went from 0.65 to 2.15 requests/s, CLIP and faces lost
            # a third: for an OCR backlog (a library's first OCR pass), not the default (README, "Memory and runtime
            # settings").
            self.short_gate = RunGate(1, on_wait=on_wait)
        elif self.ocr_on_cpu:
            # OCR on the CPU of a GPU host: its own runs, a core's worth left for decoding and feeding the GPU
            self.short_gate = RunGate(max(1, cores // self.cpu_threads - 1), on_wait=on_wait)
        self.batch_size = settings.batch_max_size or (4 if on_cpu else 16)
        # Faces per recognition run. On the CPU batching saves an IResNet-50 at most 4 % (CPU time per face 181 ms
        # alone, 176 at 8, 173 at 32), while each face in a run holds about 10 MB of activations at its peak: at 32,
        # Immich's mix peaked 130-170 MB higher than at 8, for no more work (README, "Memory and runtime settings").
        # A GPU's batches pay.
        self.face_batch = settings.face_max_batch or (8 if on_cpu else 32)
        # Saved optimised graphs load in a fraction of the time (ort_cache.py), and PP-OCR's are folded (graph_fold.py,
        # a fifth faster); CPU sessions only, as measured: every session on a CPU-only host, OCR's on a GPU host.
        self.ort_cache = (
            OrtCache(settings.cache_folder.expanduser(), packed=settings.ort_cache_packed)
            if settings.ort_cache and (self.cpu_only or self.ocr_on_cpu)
            else None
        )

    def gate_for(self, short_runs: bool) -> RunGate:
        return self.short_gate if short_runs else self.gate

    @property
    def short_lane(self) -> bool:
        """Whether OCR's short runs have a gate of their own (IMMICH_AIO_SHORT_RUNS_LANE)."""
        return self.short_gate is not self.gate

    @property
    def run_slots(self) -> int:
        """Slots, every lane counted (a slot split in two under a backlog counts once: see the decode budget)."""
        return self.gate.slots + (self.short_gate.slots if self.short_lane else 0)

    @property
    def split(self) -> bool:
        """Whether a backlog's runs go two to a slot, each on half the threads (IMMICH_AIO_SPLIT_RUNS)."""
        return self.gate.split > 1

    def policy(self, max_size: int | None = None) -> BatchPolicy:
        return BatchPolicy(max_size or self.batch_size, self.settings.batch_max_wait_ms / 1000)

    def batch_observer(self, name: str) -> Callable[[int], None] | None:
        return self.metrics.batch_observer(name) if self.metrics is not None else None

    def options(self, threads: int | None = None, cpu: bool = False) -> ort.SessionOptions:
        """`cpu`: for a CPU-provider session on a GPU host (SessionProfile.cpu)."""
        s = self.settings
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        opts.enable_cpu_mem_arena = s.model_arena
        # ONNX Runtime's memory pattern plans one block per input shape for a run's intermediate tensors. Measured on
        # the CPU, one thread, per run: as fast without it, with a lower peak (OCR recogniser 16 lines 96 vs 144 MB,
        # OCR detector 114 vs 152 MB, CLIP ViT-B/16 at 4 images 26 vs 40 MB; ArcFace 84 vs 80) - and two runs go
        # side by side under a backlog (README, "Memory and runtime settings").
        opts.enable_mem_pattern = not (self.cpu_only or cpu)
        opts.intra_op_num_threads = threads or (self.cpu_threads if cpu else self.intra_threads)
        if s.inter_op_threads > 1:
            opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
            opts.inter_op_num_threads = s.inter_op_threads
        else:
            opts.inter_op_num_threads = 1
        # Threads that spin while idle steal cores from the other models' runs.
        # Measured on 2 cores (README, "Memory and runtime settings"): spinning makes a lone request ~5 % faster
        # but a search under load 40 % slower and the mix no faster.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts

    def provider_list(
        self, profile: SessionProfile, source: Path | None = None
    ) -> list[str | tuple[str, dict[str, str]]]:
        if profile.cpu:
            return [CPU]
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
            elif p == OPENVINO:
                options = {
                    "device_type": self.openvino_device or "CPU",
                    "precision": self.settings.openvino_precision,
                    "num_of_threads": str(self.intra_threads),
                }
                folder = self.openvino_cache.folder(source) if source and self.openvino_cache else None
                if folder is not None:
                    options["cache_dir"] = folder  # compiled once per model file, not at every load
                out.append((OPENVINO, options))
            else:
                out.append(p)
        return out

    def create(
        self, model: Path | bytes, profile: SessionProfile | None = None, threads: int | None = None
    ) -> ort.InferenceSession:
        """A session for a file, or for model bytes derived in memory (never written over the user's file)."""
        profile = profile or SessionProfile()
        options = functools.partial(self.options, threads, profile.cpu)
        providers = self.provider_list(profile, model if isinstance(model, Path) else None)
        # the cache keeps CPU-provider graphs only (ort_cache.py): every session on a CPU-only host, OCR's on a GPU one
        if isinstance(model, Path) and self.ort_cache is not None and providers == [CPU]:
            return self.ort_cache.session(model, options, providers)
        if isinstance(model, Path):
            return plain_session(model, options, providers)
        return ort.InferenceSession(model, sess_options=options(), providers=providers)

    def narrow_ready(self, model: Path) -> bool:
        """Whether a second, narrow session of this file costs little memory: a small file (its copy is a few MB),
        or a saved optimised copy (both sessions map its weights, so the pages are shared: ViT-B/16 +37 MB).
        A large file with neither would be packed into memory a second time (+ its whole size)."""
        if not self.split:
            return False
        try:
            if model.stat().st_size < mapped_load.MIN_FILE_BYTES:
                return True
        except OSError:
            return False
        return self.ort_cache is not None and self.ort_cache.saved(model, self.provider_list(SessionProfile()))


@functools.cache
def _no_intel_gpu() -> None:
    """Said once per process (the command line checks the providers before the server makes its own factory)."""
    log.info(
        "OpenVINO lists no Intel GPU here: serving with ONNX Runtime's CPU provider (on the CPU, OpenVINO measured "
        "10-15 %s more throughput for 2-2.4x the memory and 2-3x slower first requests; "
        "IMMICH_AIO_PROVIDERS=OpenVINOExecutionProvider,CPUExecutionProvider chooses it anyway)",
        "%",
    )


_cuda_checked: dict[int, bool] = {}


def cuda_usable(device_id: int) -> bool:
    """Whether CUDA sessions can run here, tried once with a one-node model.

    The CUDA and cuDNN libraries come from the pip packages (onnxruntime-gpu[cuda,cudnn]) and are loaded
    first (`preload_dlls`); only the driver, libcuda.so.1, has to come from the host. Without a usable
    GPU (no driver, no `--gpus`, a driver too old) ONNX Runtime would print an error block at every model
    load and fall back; instead this says so once, and the server runs CPU-only with the CPU thread budget.
    """
    if device_id in _cuda_checked:
        return _cuda_checked[device_id]
    from onnx import TensorProto, helper

    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as e:  # a missing library shows in the probe's error below
            log.debug("preload_dlls: %s", e)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    # IR 8: readable by every ONNX Runtime this project supports (onnx stamps its own, newer, by default)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    ort.set_default_logger_severity(4)  # the probe's failure is reported below, once, in one line
    printed = io.StringIO()  # ONNX Runtime's Python wrapper prints its fallback ("EP Error ...") to stdout
    try:
        with contextlib.redirect_stdout(printed):
            session = ort.InferenceSession(
                model.SerializeToString(),
                opts,
                providers=[(CUDA, {"device_id": str(device_id)})],
            )
        ok = CUDA in session.get_providers()
        reason = _cuda_error(printed.getvalue()) or "CUDA was not enabled for the session"
    except Exception as e:  # ONNX Runtime raises its own exception types
        ok, reason = False, _cuda_error(str(e)) or str(e).strip().splitlines()[-1][:300]
    finally:
        ort.set_default_logger_severity(3)
    if not ok:
        log.warning(
            "CUDA is installed but cannot run here (%s): serving on the CPU. For the GPU, start the container "
            "with it (docker compose: the GPU override; docker run: --gpus all) and check the host driver "
            "(the CUDA 12 image needs NVIDIA driver 525 or newer).",
            reason,
        )
    _cuda_checked[device_id] = ok
    return ok


def _cuda_error(text: str) -> str | None:
    """The telling part of ONNX Runtime's CUDA error, e.g. 'CUDA driver version is insufficient for CUDA runtime'."""
    match = re.search(r"(CUDA failure \d+: [^;]+|libcuda[^;\n]*|cannot open shared object file[^;\n]*)", text)
    return match.group(1).strip() if match else None
