"""The opt-in access log (IMMICH_AIO_ACCESS_LOG): one line per HTTP request, with its status and duration.

uvicorn's own access log has no duration; this one has, and it stays off unless asked for, since
Immich pings every 30 s and sends thousands of requests per library scan.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("immich_aio.access")


class AccessLog:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [0]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            client = scope.get("client")
            who = f"{client[0]}:{client[1]}" if client else "-"
            log.info(
                '%s "%s %s" %s %.0f ms',
                who,
                scope["method"],
                scope["path"],
                status[0] or "-",
                (time.perf_counter() - started) * 1000,
            )
