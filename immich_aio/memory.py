"""glibc allocator settings that keep a many-threaded inference server's RSS down (Linux only).

Every thread that allocates gets its own malloc arena by default (up to 8 per core), and freed
model memory can stay mapped; both show up as RSS that never goes down.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)
M_ARENA_MAX = -8


def _libc():
    name = ctypes.util.find_library("c")
    if not name or os.uname().sysname != "Linux":
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def limit_arenas(arenas: int = 2) -> bool:
    """Cap malloc arenas (unless MALLOC_ARENA_MAX already did); call before worker threads start."""
    libc = _libc()
    if libc is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(libc.mallopt(M_ARENA_MAX, arenas))


def trim() -> None:
    """Return freed heap pages to the OS, e.g. after a model is unloaded."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
