"""The `openvino` extra: ONNX Runtime's OpenVINO provider serves on an Intel GPU, or on the CPU when named, with a
GPU's compiled models kept per model file. The provider itself runs in the container check's OpenVINO image, where
every OCR fixture must read as on the CPU provider (this test environment holds the CPU distribution: only one
ONNX Runtime may be installed)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnxruntime as ort
import pytest
from conftest import settings_for

from immich_aio import openvino
from immich_aio.config import ConfigError, Settings
from immich_aio.sessions import CPU, OPENVINO, SessionFactory, SessionProfile


@pytest.mark.parametrize(
    ("device_id", "listed", "chosen"),
    [
        (0, [], "CPU"),
        (0, ["CPU"], "CPU"),
        (0, ["CPU", "GPU"], "GPU"),
        (0, ["CPU", "GPU.0", "GPU.1"], "GPU.0"),
        (1, ["CPU", "GPU.0", "GPU.1"], "GPU.1"),
        (3, ["CPU", "GPU.0", "GPU.1"], "GPU.0"),  # not there: the first, with a warning
    ],
)
def test_the_device_is_an_intel_gpu_when_openvino_lists_one(device_id, listed, chosen, caplog):
    with caplog.at_level(logging.WARNING):
        assert openvino.device_type(device_id, listed) == chosen
    assert ("MACHINE_LEARNING_DEVICE_ID=3" in caplog.text) == (device_id == 3)


@pytest.fixture
def with_openvino(monkeypatch):
    """This ONNX Runtime as if it were the OpenVINO build, with OpenVINO listing the CPU only."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [OPENVINO, CPU])
    monkeypatch.setattr(openvino, "devices", lambda: ["CPU"])


@pytest.fixture
def with_intel_gpu(with_openvino, monkeypatch):
    monkeypatch.setattr(openvino, "devices", lambda: ["CPU", "GPU.0"])


def _options(factory: SessionFactory, source: Path | None) -> dict[str, str]:
    [(name, options), cpu] = factory.provider_list(SessionProfile(), source)
    assert name == OPENVINO and cpu == CPU
    return options


def test_without_an_intel_gpu_the_cpu_provider_serves_and_says_why_once(tmp_path, with_openvino, caplog):
    from immich_aio import sessions

    sessions._no_intel_gpu.cache_clear()
    with caplog.at_level(logging.INFO):
        factory = SessionFactory(settings_for(tmp_path / "store"))
        SessionFactory(settings_for(tmp_path / "store"))  # the command line's check, then the server's own
    assert factory.providers == [CPU] and factory.openvino_device is None and factory.ort_cache is not None
    [said] = [r.getMessage() for r in caplog.records if "OpenVINO lists no Intel GPU here" in r.getMessage()]
    assert "10-15 % more throughput" in said and "IMMICH_AIO_PROVIDERS=" in said


def test_named_it_runs_on_the_cpu_with_the_cpu_thread_budget(tmp_path, with_openvino):
    model = tmp_path / "store" / "ocr" / "m" / "detection" / "model.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"onnx")
    factory = SessionFactory(settings_for(tmp_path / "store", IMMICH_AIO_PROVIDERS=f"{OPENVINO},{CPU}"))
    cpu_factory = SessionFactory(settings_for(tmp_path / "store"))
    assert factory.providers == [OPENVINO, CPU] and factory.openvino_device == "CPU"
    assert cpu_factory.providers == [CPU] and cpu_factory.openvino_device is None
    assert factory.ort_cache is None  # ONNX Runtime's saved graphs are CPU-provider graphs
    assert (factory.intra_threads, factory.gate.slots, factory.batch_size) == (
        cpu_factory.intra_threads,
        cpu_factory.gate.slots,
        cpu_factory.batch_size,
    )
    options = _options(factory, model)
    assert options == {"device_type": "CPU", "precision": "FP32", "num_of_threads": str(factory.intra_threads)}
    assert not (tmp_path / "store" / openvino.FOLDER).exists()  # no compiled copies for the CPU: 900 MB for 0.1 s


def test_on_an_intel_gpu_it_gets_a_gpu_budget_and_its_compiled_models_are_kept(tmp_path, with_intel_gpu):
    model = tmp_path / "store" / "ocr" / "m" / "detection" / "model.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"onnx")
    factory = SessionFactory(settings_for(tmp_path / "store", MACHINE_LEARNING_OPENVINO_PRECISION="FP16"))
    assert factory.openvino_device == "GPU.0" and (factory.intra_threads, factory.gate.slots) == (2, 2)
    options = _options(factory, model)
    assert options["device_type"] == "GPU.0" and options["precision"] == "FP16"
    assert Path(options["cache_dir"]).is_relative_to(tmp_path / "store" / openvino.FOLDER)
    assert "cache_dir" not in _options(factory, None)  # a graph made in memory has no file to key it by


def test_ocr_stays_on_an_intel_gpu_unless_named_for_the_cpu(tmp_path, with_intel_gpu):
    """IMMICH_AIO_OCR_DEVICE=auto moves OCR off CUDA only (measured there); `cpu` moves it off an Intel GPU too."""
    auto = SessionFactory(settings_for(tmp_path / "store"))
    assert auto.openvino_device == "GPU.0" and not auto.ocr_on_cpu and auto.gate_for(True) is auto.gate
    named = SessionFactory(settings_for(tmp_path / "store", IMMICH_AIO_OCR_DEVICE="cpu"))
    assert named.ocr_on_cpu and named.gate_for(True) is not named.gate
    assert named.provider_list(SessionProfile(dynamic_shapes=True, cpu=True)) == [CPU]
    [(name, _), _] = named.provider_list(SessionProfile(dynamic_shapes=True))
    assert name == OPENVINO


def test_compiled_models_are_kept_per_model_version_and_swept_when_gone(tmp_path, with_intel_gpu):
    store = tmp_path / "store"
    model = store / "clip" / "m" / "visual" / "model.onnx"
    other = store / "clip" / "n" / "visual" / "model.onnx"
    for f in (model, other):
        f.parent.mkdir(parents=True)
        f.write_bytes(b"onnx")
    factory = SessionFactory(settings_for(store))
    first = Path(_options(factory, model)["cache_dir"])
    (first / "blob").write_bytes(b"compiled")  # what OpenVINO writes there
    assert Path(_options(factory, model)["cache_dir"]) == first and (first / "blob").exists()  # kept for next load
    staged = model.with_name("staged")
    staged.write_bytes(b"onnx, reinstalled")
    os.replace(staged, model)
    second = Path(_options(factory, model)["cache_dir"])
    assert second != first and second.parent == first.parent and not first.exists()  # the old version's went
    elsewhere = Path(_options(factory, other)["cache_dir"])
    other.unlink()
    assert factory.openvino_cache is not None and factory.openvino_cache.sweep() == 1
    assert second.exists() and not elsewhere.parent.exists()


def test_a_store_that_cannot_take_the_compiled_models_still_loads(tmp_path, with_intel_gpu):
    store = tmp_path / "store"
    model = store / "ocr" / "m" / "detection" / "model.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"onnx")
    (store / openvino.FOLDER).write_text("a file where the folder would go")
    assert "cache_dir" not in _options(SessionFactory(settings_for(store)), model)


def test_precision_is_immich_mls_variable(tmp_path):
    assert Settings.from_env({"MACHINE_LEARNING_OPENVINO_PRECISION": "fp16"}).openvino_precision == "FP16"
    assert Settings.from_env({}).openvino_precision == "FP32"
    with pytest.raises(ConfigError, match="MACHINE_LEARNING_OPENVINO_PRECISION"):
        Settings.from_env({"MACHINE_LEARNING_OPENVINO_PRECISION": "int8"})


def test_the_startup_summary_and_info_name_the_openvino_device(store, make_client, with_intel_gpu, caplog):
    with caplog.at_level(logging.INFO):
        client = make_client()  # models load on their first request: no session is made here
    info = client.get("/info").json()
    assert info["providers"] == [OPENVINO, CPU] and info["openvinoDevice"] == "GPU.0"
    assert "(OpenVINO on GPU.0, FP32)" in caplog.text


def test_mt_photos_check_says_cpu_for_an_intel_gpu_too(store, make_client, with_intel_gpu):
    """mt-photos-ai's /check names "cuda" or "cpu" only; OpenVINO is not CUDA."""
    client = make_client(MT_PHOTOS_API_KEY="openvino-key")
    assert client.post("/check", headers={"api-key": "openvino-key"}).json()["device"] == "cpu"
