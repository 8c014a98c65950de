"""CPU priority per thread: the backlog's threads yield the cores to a person's search (Linux).

A search skips the run gate (batching.py), so it runs beside the backlog's runs, and the kernel shares the cores
evenly among every runnable thread: on 2 cores a search's two threads got half of them while two image runs
went on, and took twice as long as alone. With the threads that do background work (image requests' decoding
and runs, the image models' batchers and the sessions they build) at a higher nice value, the kernel gives the
search's threads the cores whenever they want them and the backlog everything else, so the backlog loses only
the time the search takes. Nothing else changes: with no search, the background threads compete only with each
other at the same nice value.

Linux keeps a nice value per thread, and a thread starts with its creator's; an unprivileged process can raise
it but never lower it again. So the background threads are raised once, when each starts, and the threads that
serve a search (the event loop, the search pool, a text tower's batcher and the session threads ONNX Runtime
creates while building a text tower) are made from threads that never were: a text tower asked for by a
background thread is loaded on a thread of the registry's made at start (ModelRegistry).
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

LOWEST = 19
_base: int | None = None  # the server's own nice value, a search's threads keep it; set once at start (configure)
_target: int | None = None  # a background thread's nice value
_refused = False


def configure(background_nice: int) -> None:
    """Background threads run `background_nice` above the configuring thread's nice value (Settings.background_nice;
    0: as it). Absolute, not relative to each thread's own: a thread made by a background thread starts raised."""
    global _base, _target
    _base = nice()
    _target = None if _base is None or background_nice <= 0 else min(LOWEST, _base + background_nice)


def levels() -> tuple[int | None, int | None]:
    """(a search's nice value, a background thread's): None where not known, the second also when it is off."""
    return _base, _target


def background() -> None:
    """The calling thread at background priority (a thread's initializer, or the start of its loop)."""
    if _target is not None:
        _raise_to(_target)


def lowered() -> bool:
    """Whether the calling thread runs below the server's own priority (a background thread, or one made by one)."""
    current = nice()
    return _base is not None and current is not None and current > _base


def lowest() -> None:
    """The calling thread at the lowest priority (work no request waits for: hashing model files)."""
    _raise_to(LOWEST)


def nice() -> int | None:
    """The calling thread's nice value (None where it cannot be read per thread)."""
    if sys.platform != "linux":
        return None
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except OSError:
        return None


def _raise_to(value: int) -> None:
    # Only on Linux is PRIO_PROCESS with a thread id one thread; elsewhere it would lower the whole process.
    global _refused
    current = nice()
    if current is None or current >= value:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), value)
    except OSError as e:  # raising one's own nice value is always allowed; a sandbox may still say no
        if not _refused:
            _refused = True
            log.info("Could not lower a background thread's CPU priority (%s); searches share the CPU evenly", e)
