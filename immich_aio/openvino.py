"""ONNX Runtime's OpenVINO execution provider: which device it runs on, and where its compiled models are kept.

Installed with the `openvino` extra (the `onnxruntime-openvino` distribution instead of `onnxruntime`), it is used
by default when OpenVINO lists an Intel GPU (`GPU.<MACHINE_LEARNING_DEVICE_ID>`, as Immich ML picks it). Without
one the server keeps ONNX Runtime's CPU provider: in the server, on Immich's job mix (2 cores), OpenVINO's CPU
device gave 10-15 % more throughput for 2-2.4x the memory and 2-3x slower first requests, so it runs on the CPU only
when IMMICH_AIO_PROVIDERS names it (README, "Intel GPUs: the OpenVINO image").

Compiling a model for a GPU takes seconds, so for a GPU the compiled model is kept (OpenVINO's `cache_dir`) in a
folder per model file under the store, keyed by the file's identity like the optimised-model cache: a reinstalled
model gets a new folder and the old one is removed, and the folders of model files that are gone are removed at
start. On the CPU device that cache saved 0.1 s of a ViT-B/16's 1.9 s load and took 900 MB for the benchmark's
five models, so it is not used there."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from pathlib import Path

import onnxruntime as ort

from immich_aio.store import file_identity, per_file_folder, sweep_per_file

log = logging.getLogger(__name__)

PROVIDER = "OpenVINOExecutionProvider"
FOLDER = ".openvino-cache"  # under the model store
ABOUT = "source.json"


def devices() -> list[str]:
    """The devices OpenVINO can run on here, e.g. ['CPU', 'GPU.0']; empty without the OpenVINO build."""
    with contextlib.suppress(AttributeError, RuntimeError):
        return list(ort.capi._pybind_state.get_available_openvino_device_ids())
    return []


def gpus(available: list[str]) -> list[str]:
    return sorted(d for d in available if d.startswith("GPU"))


def device_type(device_id: int, available: list[str]) -> str:
    """An Intel GPU when there is one (the one MACHINE_LEARNING_DEVICE_ID names), else the CPU."""
    gpus_ = gpus(available)
    if not gpus_:
        return "CPU"
    wanted = f"GPU.{device_id}"
    if wanted in gpus_ or (device_id == 0 and gpus_ == ["GPU"]):
        return wanted if wanted in gpus_ else "GPU"
    log.warning("MACHINE_LEARNING_DEVICE_ID=%d: OpenVINO lists %s; using %s", device_id, ", ".join(gpus_), gpus_[0])
    return gpus_[0]


class CompiledCache:
    """`<store>/.openvino-cache/<source>/<identity>/`: OpenVINO's cache_dir for one version of one model file."""

    def __init__(self, store_root: Path) -> None:
        self.root = store_root / FOLDER

    def folder(self, source: Path) -> str | None:
        """The cache_dir for this model file, made if need be; None when the store cannot take it (loads still
        work, compiling each time)."""
        identity = file_identity(source)
        if identity is None:
            return None
        resolved = str(source.resolve())
        per_source = per_file_folder(self.root, source)
        key = hashlib.sha256(json.dumps([resolved, *identity, ort.__version__]).encode()).hexdigest()[:16]
        entry = per_source / key
        try:
            if not (entry / ABOUT).is_file():
                entry.mkdir(parents=True, exist_ok=True)
                (entry / ABOUT).write_text(json.dumps({"source": resolved}) + "\n")
            for other in per_source.iterdir():
                if other != entry:  # an earlier version's compiled model: never used again
                    shutil.rmtree(other, ignore_errors=True)
        except OSError as e:
            log.info("Not keeping OpenVINO's compiled copy of %s (%s): it is compiled at each load", source, e)
            return None
        return str(entry)

    def sweep(self) -> int:
        """Remove the folders of model files that are no longer in the store."""
        return sweep_per_file(self.root, ABOUT)
