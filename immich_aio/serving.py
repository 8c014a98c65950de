"""The HTTP server around the app: read timeouts, a graceful drain on SIGTERM, and the listening socket.

uvicorn times out idle keep-alive connections but not a client that never finishes its request
headers, so the protocol below closes such connections. On SIGTERM (docker stop) or Ctrl-C the
server drains: new work is refused with a JSON 503, work already admitted gets the grace period to
finish, whatever is still queued after it is answered with a JSON 503, and the process exits 0.
A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from immich_aio.config import Settings

log = logging.getLogger(__name__)


class TimedH11Protocol(H11Protocol):
    """Closes a connection whose request headers have not all arrived within `header_timeout` seconds."""

    header_timeout = 30.0

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()  # the request line and headers are in
        elif self._header_timer is None and not self.transport.is_closing():
            self._arm_header_timer()  # the first bytes of the next request on this connection: the same deadline

    # Between requests the connection is idle and uvicorn's keep-alive closes it, after the time every response says
    # (server_config): a header deadline armed there closed it sooner, against what the client was told.

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _header_timed_out(self) -> None:
        self._header_timer = None
        idle = self.cycle is None or self.cycle.response_complete
        if self.conn.their_state is h11.IDLE and idle and not self.transport.is_closing():
            log.info(
                "Closed a connection from %s that sent no complete request in %g s (IMMICH_AIO_HEADER_TIMEOUT_S)",
                f"{self.client[0]}:{self.client[1]}" if self.client else "?",
                self.header_timeout,
            )
            self.transport.close()


def protocol_class(settings: Settings) -> type[H11Protocol]:
    return type("TimedH11Protocol", (TimedH11Protocol,), {"header_timeout": settings.header_timeout_s})


class Server(uvicorn.Server):
    """uvicorn's server with a drain instead of an abrupt stop, and exit status 0 after it."""

    def __init__(self, config: uvicorn.Config, app: Any, grace_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._grace_s = grace_s
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the captured signal after shutting down, which makes the exit status 143;
        # a drained shutdown is a clean one, so it exits 0.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._draining or self._loop is None:
            self.should_exit = True
            self.force_exit = self._draining  # a second signal: stop now
            return
        self._draining = True
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain(signal.Signals(sig).name)))

    async def _drain(self, why: str) -> None:
        runtime = getattr(self._app.state, "runtime", None)
        if runtime is not None:
            await runtime.drain(self._grace_s, why)
        self.should_exit = True


def dual_stack_socket(port: int) -> socket.socket:
    """asyncio makes IPv6 listeners IPv6-only; "all interfaces" must take IPv4 clients too."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    sock.set_inheritable(True)
    return sock


def server_config(settings: Settings, app: Any, host: str | None = None) -> uvicorn.Config:
    """uvicorn's settings for this app (`host`: a test's own, instead of the configured one).

    Every response says how long an idle connection stays open (`Keep-Alive: timeout=N`). Immich's server posts with
    Node's fetch (undici), which otherwise keeps an idle connection 4 s and sends the next request on it even when
    the server has just closed it: that request fails ("other side closed", EPIPE) and Immich drops its job. Told
    N, undici lets the connection go 2 s before the server does (at N <= 2 it does not reuse it at all)."""
    keep = max(1, round(settings.keepalive_s))  # whole seconds: what uvicorn holds and every response says
    return uvicorn.Config(
        app,
        host=host or settings.bind_host,
        port=settings.port,
        http=protocol_class(settings),
        log_level=settings.log_level,
        timeout_keep_alive=keep,
        headers=[("Keep-Alive", f"timeout={keep}")],
        timeout_graceful_shutdown=5,
        limit_concurrency=settings.max_connections,
        access_log=False,  # our own, opt-in: IMMICH_AIO_ACCESS_LOG
        log_config=None,  # logging is configured once, by the CLI
    )


def serve(settings: Settings, app: Any) -> None:
    config = server_config(settings, app)
    server = Server(config, app, settings.shutdown_grace_s)
    if settings.bind_host == "::":
        server.run(sockets=[dual_stack_socket(settings.port)])
    else:
        server.run()
