"""Command line: `immich-aio` serves; `immich-aio models ...` fetches and imports models."""

from __future__ import annotations

import logging
import sys

import immich_aio  # noqa: F401  (sets ORT_DISABLE_TELEMETRY before onnxruntime is imported)


def serve(restart_argv: list[str] | None = None) -> int:
    """Start the server; `restart_argv` (the command line, when run as a program) lets it start itself
    again with jemalloc preloaded (immich_aio.memory)."""
    from immich_aio import memory
    from immich_aio.config import ConfigError, Settings

    try:
        settings = Settings.from_env()
        allocator, library = memory.wanted(settings.allocator)
    except (ConfigError, ValueError) as e:
        print(f"immich-aio: {e}", file=sys.stderr)
        return 2
    if library is not None and memory.active() != allocator and restart_argv is not None:
        memory.restart_preloaded(library, restart_argv)  # does not return when it works
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if library is not None and memory.active() != allocator:
        logging.getLogger("immich_aio.memory").warning(
            "Running on %s malloc, not %s: %s could not be preloaded (IMMICH_AIO_ALLOCATOR=%s)",
            memory.active(),
            allocator,
            library,
            settings.allocator,
        )
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print(
            "immich-aio: ONNX Runtime is not installed. Install `immich-aio[cpu]` (onnxruntime) or, "
            "on an NVIDIA host, `immich-aio[gpu]` (onnxruntime-gpu) - not both.",
            file=sys.stderr,
        )
        return 2
    from immich_aio.app import create_app
    from immich_aio.serving import serve as run_server
    from immich_aio.sessions import SessionFactory

    try:
        SessionFactory(settings)  # refuses providers this ONNX Runtime lacks, before anything starts
    except ValueError as e:
        print(f"immich-aio: {e}", file=sys.stderr)
        return 2

    memory.limit_arenas()
    try:
        run_server(settings, create_app(settings))
    except OSError as e:  # the port is taken, the address does not exist here, ...
        print(f"immich-aio: cannot listen on {settings.host}:{settings.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    program = argv is None  # run as `immich-aio` / `python -m immich_aio`, not called from Python
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "models":
        from immich_aio.download.cli import main as models_main

        return models_main(argv[1:])
    if argv and argv[0] in {"-h", "--help"}:
        print(
            "usage: immich-aio            start the server (configured by environment variables)\n"
            "       immich-aio models ...  fetch, export or import models (see `immich-aio models -h`)"
        )
        return 0
    return serve(restart_argv=sys.orig_argv[1:] if program else None)
