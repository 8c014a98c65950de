"""immich-aio: one ONNX Runtime process that serves Immich's machine-learning protocol."""

import os

# ONNX Runtime >= 1.29 uploads telemetry unless this is set before its first import; every
# entry point imports this package first, so setting it here covers the server and tools.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
