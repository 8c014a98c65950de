"""The container files that CI does not run: the compose example and its CUDA override keep Immich's service shape.

(The images themselves are built and run by scripts/container_check.sh, from .ci/run.)
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_compose_is_immichs_ml_service_with_only_the_image_swapped():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["immich-machine-learning"]
    assert service["container_name"] == "immich_machine_learning"
    assert service["image"] == "immich-aio:latest"
    assert service["volumes"] == ["model-cache:/cache"]
    assert service["restart"] == "always" and service["env_file"] == [".env"]
    assert "model-cache" in compose["volumes"]


def test_cuda_override_reserves_the_gpu():
    override = yaml.safe_load((ROOT / "docker-compose.cuda.yml").read_text())
    service = override["services"]["immich-machine-learning"]
    assert service["image"] == "immich-aio:cuda"
    [device] = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_dockerfile_keeps_immich_mls_contract():
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and "# syntax=" not in text and "<<" not in text  # older builders
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in text and "FROM ${BASE_IMAGE}" in text
    assert "EXPOSE 3003" in text and "MACHINE_LEARNING_CACHE_FOLDER=/cache" in text
    assert 'CMD ["/opt/venv/bin/python", "-m", "immich_aio.healthcheck"]' in text
    assert "USER 1000:1000" in text and "ORT_DISABLE_TELEMETRY=1" in text
    assert "libjemalloc2=" in text and "IMMICH_AIO_ALLOCATOR=jemalloc" in text  # issue 13: the measured choice
    assert text.rstrip().splitlines()[-2].startswith("FROM runtime AS cpu")  # CPU is the default target


def test_healthcheck_url_follows_immich_host_and_port(monkeypatch):
    from immich_aio import healthcheck

    for host, port, expected in [
        ("[::]", "3003", "http://127.0.0.1:3003/ping"),
        ("0.0.0.0", "4000", "http://127.0.0.1:4000/ping"),
        ("10.0.0.5", "3003", "http://10.0.0.5:3003/ping"),
        ("::1", "3003", "http://[::1]:3003/ping"),
    ]:
        monkeypatch.setenv("IMMICH_HOST", host)
        monkeypatch.setenv("IMMICH_PORT", port)
        assert healthcheck.url() == expected


def test_healthcheck_exit_codes(store):
    import subprocess
    import sys

    from conftest import settings_for
    from live import InProcessServer, free_port

    port = free_port()
    with InProcessServer(settings_for(store, IMMICH_PORT=str(port))):
        env = {"IMMICH_HOST": "[::]", "IMMICH_PORT": str(port), "PATH": "/usr/bin:/bin"}
        ok = subprocess.run([sys.executable, "-m", "immich_aio.healthcheck"], cwd=ROOT, env=env, timeout=30)
    down = subprocess.run([sys.executable, "-m", "immich_aio.healthcheck"], cwd=ROOT, env=env, timeout=30)
    assert (ok.returncode, down.returncode) == (0, 1)


def test_cuda_errors_are_reduced_to_their_telling_part():
    from immich_aio.sessions import _cuda_error

    printed = (
        "EP Error /onnxruntime_src/.../cuda_execution_provider_info.cc:60 ... Parse Failed to parse provider option "
        '"device_id": CUDA failure 35: CUDA driver version is insufficient for CUDA runtime version ; GPU=-1 ; ...'
    )
    assert _cuda_error(printed) == "CUDA failure 35: CUDA driver version is insufficient for CUDA runtime version"
    assert _cuda_error("libcuda.so.1: cannot open shared object file: No such file or directory").startswith(
        "libcuda.so.1"
    )
    assert _cuda_error("something else") is None
