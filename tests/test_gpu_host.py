"""A CUDA host as the session factory sees it, simulated on this CPU machine.

Measured on an H200 (scripts/gpu_check.py, README "GPU hosts (NVIDIA)"): PP-OCR's inputs change shape with every
photo and every batch of lines, and on CUDA each new shape cost more than the run, so OCR runs on the CPU of a
CUDA host unless IMMICH_AIO_OCR_DEVICE=gpu; and models whose batches vary get cuDNN's heuristic algorithm choice.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import OCR_ENTRIES, SIGN, loaded_model, predict, settings_for
from face_models import install_pack
from immich_clip_models import install

from immich_aio import sessions
from immich_aio.models.base import Model
from immich_aio.ort_cache import OrtCache
from immich_aio.sessions import CPU, CUDA, SessionFactory, SessionProfile

FACES = {
    "facial-recognition": {
        "detection": {"modelName": "buffalo_l", "options": {"minScore": 0.5}},
        "recognition": {"modelName": "buffalo_l"},
    }
}
CLIP = {"clip": {"visual": {"modelName": "ViT-B-32__openai"}}}


@pytest.fixture
def cuda_host(monkeypatch):
    """This ONNX Runtime as if it were onnxruntime-gpu on a host with a usable GPU and 16 cores."""
    monkeypatch.setattr(sessions.ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(sessions, "cuda_usable", lambda device_id: True)
    monkeypatch.setattr(sessions.mapped_load, "cores", lambda: 16)


def _cudnn_search(factory: SessionFactory, profile: SessionProfile) -> str:
    [(name, options), cpu] = factory.provider_list(profile)
    assert (name, cpu) == (CUDA, CPU)
    return options["cudnn_conv_algo_search"]


def test_ocr_runs_on_the_cpu_of_a_cuda_host_with_cpu_threads_and_a_gate_of_its_own(tmp_path, cuda_host):
    f = SessionFactory(settings_for(tmp_path))
    assert f.on_cuda and f.ocr_on_cpu
    assert f.provider_list(SessionProfile(dynamic_shapes=True, cpu=True)) == [CPU]
    wide, ocr = f.options(), f.options(cpu=True)
    assert (wide.intra_op_num_threads, wide.enable_mem_pattern) == (2, True)  # feeding the GPU
    assert (ocr.intra_op_num_threads, ocr.enable_mem_pattern) == (4, False)  # as on a CPU-only host
    # OCR's runs never hold one of the GPU's two slots: 16 cores / 4 threads, less one for decoding
    assert f.gate_for(True) is not f.gate and (f.gate.slots, f.gate_for(True).slots) == (2, 3)
    assert f.run_slots == 5


def test_named_gpu_ocr_stays_on_cuda_and_a_cpu_host_is_unchanged(tmp_path, cuda_host, monkeypatch):
    gpu = SessionFactory(settings_for(tmp_path, IMMICH_AIO_OCR_DEVICE="gpu"))
    assert gpu.on_cuda and not gpu.ocr_on_cpu and gpu.gate_for(True) is gpu.gate
    assert gpu.ort_cache is None  # no CPU session to keep optimised copies for
    assert _cudnn_search(gpu, SessionProfile(dynamic_shapes=True, cpu=False)) == "HEURISTIC"
    monkeypatch.setattr(sessions.ort, "get_available_providers", lambda: [CPU])
    cpu = SessionFactory(settings_for(tmp_path, IMMICH_AIO_OCR_DEVICE="cpu"))
    assert cpu.cpu_only and not cpu.ocr_on_cpu and cpu.gate_for(True) is cpu.gate
    assert cpu.options(cpu=True).intra_op_num_threads == cpu.options().intra_op_num_threads


def test_a_bad_ocr_device_is_refused_at_start(tmp_path):
    from immich_aio.config import ConfigError

    with pytest.raises(ConfigError, match="IMMICH_AIO_OCR_DEVICE must be one of auto, cpu, gpu"):
        settings_for(tmp_path, IMMICH_AIO_OCR_DEVICE="cuda")


def test_each_model_opens_with_its_profile_on_a_cuda_host(make_client, store, cuda_host, monkeypatch, caplog):
    """OCR on the CPU; CLIP and face recognition, whose batches vary across requests, with cuDNN's heuristic; the
    face detector, always one 640×640 photo, with the exhaustive search that pays once."""
    install_pack(store)
    install(store, "openclip")
    opened: dict[tuple[str, str], SessionProfile] = {}
    open_ = Model.open

    def spy(self, path, profile=None):
        opened[(str(self.task), str(self.type))] = profile or SessionProfile()
        return open_(self, path, profile)  # ONNX Runtime's CPU build serves what names CUDA

    monkeypatch.setattr(Model, "open", spy)
    cached: list[Path] = []
    cache_session = OrtCache.session

    def cache_spy(self, source, options, providers):
        cached.append(source)
        return cache_session(self, source, options, providers)

    monkeypatch.setattr(OrtCache, "session", cache_spy)
    with caplog.at_level(logging.INFO):
        client = make_client()
    runtime = client.app.state.runtime
    assert "OCR on the CPU: 4 threads per run, 3 runs at once" in caplog.text
    assert "(+1 for OCR)" not in caplog.text
    assert runtime.factory.on_cuda and runtime.factory.ocr_on_cpu
    for entries in (OCR_ENTRIES, FACES, CLIP):
        assert predict(client, entries, image=SIGN).status_code == 200
    f = runtime.factory
    assert f.provider_list(opened[("ocr", "detection")]) == [CPU]
    assert f.provider_list(opened[("ocr", "recognition")]) == [CPU]
    assert _cudnn_search(f, opened[("facial-recognition", "detection")]) == "EXHAUSTIVE"
    assert _cudnn_search(f, opened[("facial-recognition", "recognition")]) == "HEURISTIC"
    assert _cudnn_search(f, opened[("clip", "visual")]) == "HEURISTIC"
    # OCR's CPU sessions open through the optimised-model cache (its folded graphs, faster loads); CUDA's never do
    assert f.ort_cache is not None and len(cached) == 2 and not any(store in p.parents for p in cached)
    # /info says where each model runs
    info = client.get("/info").json()
    assert (info["threads"]["ocrOnCpu"], info["threads"]["ocrRuns"], info["threads"]["concurrentRuns"]) == (True, 3, 2)
    by_type = {(m["task"], m["type"]): m for m in info["models"]}
    assert by_type[("ocr", "detection")]["providers"] == [CPU]
    assert loaded_model(runtime, "detection", "ocr").session.get_providers() == [CPU]
