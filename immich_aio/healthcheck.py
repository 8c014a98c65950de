"""`python -m immich_aio.healthcheck`: exit 0 when this machine's server answers /ping, else 1.

The container's HEALTHCHECK (Immich ML's contract: /ping on IMMICH_HOST:IMMICH_PORT within 2 s).
Standard library only, so it costs a few milliseconds and no model imports.
"""

from __future__ import annotations

import os
import sys
import urllib.request

ALL_INTERFACES = {"", "[::]", "::", "0.0.0.0"}


def url() -> str:
    host = os.environ.get("IMMICH_HOST", "").strip()
    host = "127.0.0.1" if host in ALL_INTERFACES else host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{os.environ.get('IMMICH_PORT', '3003').strip() or '3003'}/ping"


def main() -> int:
    try:
        with urllib.request.urlopen(url(), timeout=2) as r:
            return 0 if r.status == 200 and r.read(16) == b"pong" else 1
    except OSError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
