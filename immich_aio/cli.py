"""Command line: `immich-aio` serves; `immich-aio models ...` fetches and imports models."""

from __future__ import annotations

import logging
import sys

import immich_aio  # noqa: F401  (sets ORT_DISABLE_TELEMETRY before onnxruntime is imported)


def serve() -> int:
    from immich_aio.config import ConfigError, Settings

    try:
        settings = Settings.from_env()
    except ConfigError as e:
        print(f"immich-aio: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
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
    import uvicorn

    from immich_aio.app import create_app
    from immich_aio.memory import limit_arenas
    from immich_aio.sessions import SessionFactory

    try:
        SessionFactory(settings)  # refuses providers this ONNX Runtime lacks, before anything starts
    except ValueError as e:
        print(f"immich-aio: {e}", file=sys.stderr)
        return 2

    limit_arenas()

    config = uvicorn.Config(
        create_app(settings),
        host=settings.bind_host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_keep_alive=int(max(1, settings.keepalive_s)),
        timeout_graceful_shutdown=10,
        access_log=settings.log_level == "debug",
    )
    server = uvicorn.Server(config)
    if settings.bind_host == "::":
        # asyncio makes IPv6 listeners IPv6-only; "all interfaces" must take IPv4 clients too.
        server.run(sockets=[dual_stack_socket(settings.port)])
    else:
        server.run()
    return 0


def dual_stack_socket(port: int):
    import socket

    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
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
    return serve()
