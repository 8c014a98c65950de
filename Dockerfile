# immich-aio: a drop-in replacement for Immich's `immich-machine-learning` container.
#
#   docker build -t immich-aio .                       CPU image (the default target)
#   docker build --target cuda -t immich-aio:cuda .    NVIDIA image: CUDA 12 (host driver >= 525), CUDA and cuDNN
#                                                      from pip; only the driver comes from the host
#   docker build --target openvino -t immich-aio:openvino .
#                                                      Intel image: ONNX Runtime's OpenVINO build, on the CPU, or
#                                                      on an Intel GPU passed in with --device /dev/dri
#   --build-arg BASE_IMAGE=...                         any Debian-based Python 3.11 image (default: the official slim)
#
# Immich ML's container contract: port 3003, models in /cache (the `model-cache` volume), the same
# MACHINE_LEARNING_* / IMMICH_* variables, a HEALTHCHECK on /ping. OCR works with no download (the PP-OCR
# models ship in the rapidocr wheel); `immich-aio models ...` fetches the rest into /cache.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- the project and its dependencies, in a virtual environment ---------------------------------------
FROM ${BASE_IMAGE} AS build
# A PyPI mirror for the build, e.g. --build-arg PIP_INDEX_URL=https://pypi.tuna.tsinghua.edu.cn/simple
ARG PIP_INDEX_URL
ENV PIP_INDEX_URL=${PIP_INDEX_URL:-https://pypi.org/simple} \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY immich_aio ./immich_aio
RUN python -m venv /opt/venv

# pip and setuptools are not needed to run, so they leave the environment once it is checked.
FROM build AS build-cpu
RUN /opt/venv/bin/pip install --no-cache-dir "/src[cpu]" \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools

FROM build AS build-cuda
RUN /opt/venv/bin/pip install --no-cache-dir "/src[gpu]" \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools

FROM build AS build-openvino
RUN /opt/venv/bin/pip install --no-cache-dir "/src[openvino]" \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools

# ---- what the images share ---------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
# jemalloc: the server starts itself with it preloaded (immich_aio/memory.py); it measured the smallest
# footprint on Immich's job mix (README, Memory).
# A user of its own: the server needs no privileges. An existing /cache volume written by Immich ML's root
# container stays readable (its files are world-readable); `immich-aio models` needs write access (README).
RUN apt-get update \
 && apt-get install --yes --no-install-recommends libjemalloc2=5.3.0-1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 1000 immich \
 && useradd --system --uid 1000 --gid immich --home-dir /home/immich --create-home --shell /usr/sbin/nologin immich \
 && mkdir -p /cache \
 && chown immich:immich /cache
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ORT_DISABLE_TELEMETRY=1 \
    IMMICH_AIO_ALLOCATOR=jemalloc \
    MACHINE_LEARNING_CACHE_FOLDER=/cache \
    IMMICH_HOST=[::] \
    IMMICH_PORT=3003 \
    HF_HOME=/home/immich/.cache/huggingface
WORKDIR /home/immich
USER 1000:1000
EXPOSE 3003
VOLUME ["/cache"]
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/venv/bin/python", "-m", "immich_aio.healthcheck"]
CMD ["immich-aio"]

# ---- NVIDIA: `docker build --target cuda` -------------------------------------------------------------
FROM runtime AS cuda
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=build-cuda /opt/venv /opt/venv

# ---- Intel: `docker build --target openvino` --------------------------------------------------------------
# OpenVINO runs on the CPU as it is; for an Intel GPU it needs Intel's OpenCL driver (Debian's
# intel-opencl-icd) and the host's /dev/dri with its render group (README, "Intel GPUs: the OpenVINO image").
FROM runtime AS openvino
USER 0:0
RUN apt-get update \
 && apt-get install --yes --no-install-recommends intel-opencl-icd=22.43.24595.41-1 \
 && rm -rf /var/lib/apt/lists/*
USER 1000:1000
COPY --from=build-openvino /opt/venv /opt/venv

# ---- CPU: the default target (last) -------------------------------------------------------------------
FROM runtime AS cpu
COPY --from=build-cpu /opt/venv /opt/venv
