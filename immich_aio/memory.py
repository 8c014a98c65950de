"""The process's memory allocator: which one runs, and when freed memory goes back to the system.

An inference server frees large buffers all the time (decoded photos, model inputs, ONNX Runtime's
intermediate tensors) from many threads. Two costs pull against each other: memory handed back at
once has to be faulted in again on the next request (measured: an OCR request 12 % slower), memory
kept shows up as RSS. The policy here is to keep it while the server works and give it all back
when it falls idle, after a model loads and when one unloads (`trim`).

jemalloc does this best (README, "Memory and runtime settings"): told never to purge on its own
(`MALLOC_CONF`), it reuses its pages while busy, holds less than glibc's fragmented heaps, and purges
everything on request.
So `immich-aio` runs on it wherever the library is installed: it starts itself again with jemalloc
preloaded (`LD_PRELOAD` only takes effect when a process starts). `IMMICH_AIO_ALLOCATOR` picks
mimalloc or glibc instead; on glibc the arenas are capped and `malloc_trim` gives memory back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform
import sys
from pathlib import Path

log = logging.getLogger(__name__)

M_ARENA_MAX = -8
# Marks the process started again with an allocator preloaded, so it is tried once, never in a loop.
REEXEC_MARK = "IMMICH_AIO_ALLOCATOR_PRELOADED"

# The shared objects each allocator is installed as (Debian/Ubuntu `libjemalloc2`, `libmimalloc2.0`).
LIBRARIES = {
    "jemalloc": ("libjemalloc.so.2",),
    "mimalloc": ("libmimalloc.so.2", "libmimalloc.so"),
}
PACKAGES = {"jemalloc": "libjemalloc2", "mimalloc": "libmimalloc2.0"}


def jemalloc_conf() -> str:
    """Never purge on a timer: pages are reused while requests come, and `trim` purges them when they stop.

    Few arenas, because each keeps its own high-water mark of freed pages (one per 4 cores measured
    as fast as jemalloc's default of 4 per core on 2 cores, with a fifth less peak memory).
    """
    arenas = max(1, (os.cpu_count() or 1) // 4)
    return f"narenas:{arenas},dirty_decay_ms:-1,muzzy_decay_ms:-1"


CHOICES = ("auto", "jemalloc", "mimalloc", "glibc")  # or the path of a jemalloc / mimalloc library


def _search_dirs() -> list[Path]:
    machine = platform.machine()
    triplet = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu", "arm64": "aarch64-linux-gnu"}.get(
        machine, f"{machine}-linux-gnu"
    )
    dirs = [f"/usr/lib/{triplet}", f"/lib/{triplet}", "/usr/lib64", "/usr/lib", "/usr/local/lib", "/lib"]
    return [Path(d) for d in dirs]


def find_library(name: str) -> Path | None:
    """Where the allocator's shared object is installed, if it is."""
    for folder in _search_dirs():
        for filename in LIBRARIES[name]:
            candidate = folder / filename
            if candidate.is_file():
                return candidate
    return None


def allocator_in(pid: int | str = "self") -> str:
    """The allocator a process runs on, from the libraries mapped into it (the benchmark asks about the server)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "unknown"
    for name in (*LIBRARIES, "tcmalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc" if sys.platform.startswith("linux") else "system"


@functools.cache
def active() -> str:
    """The allocator this process runs on (fixed once it has started)."""
    return allocator_in()


def wanted(choice: str) -> tuple[str, Path | None]:
    """The allocator a server should run on for IMMICH_AIO_ALLOCATOR=`choice`, and the library to preload.

    `auto` takes jemalloc when it is installed, else glibc; a path names the library itself (installs
    outside the usual folders). Raises ValueError when the allocator asked for is not there, naming the
    package that provides it.
    """
    if "/" in choice:
        path = Path(choice)
        name = next((n for n in LIBRARIES if f"lib{n}" in path.name), None)
        if name is None or not path.is_file():
            raise ValueError(
                f"IMMICH_AIO_ALLOCATOR={choice} is not a jemalloc or mimalloc library file "
                "(e.g. /usr/lib/x86_64-linux-gnu/libjemalloc.so.2)"
            )
        return name, path
    if choice == "glibc" or not sys.platform.startswith("linux"):
        return ("glibc" if sys.platform.startswith("linux") else "system"), None
    if choice == "auto":
        if active() in LIBRARIES:
            return active(), None  # the user preloaded one already: theirs stands
        found = find_library("jemalloc")
        return ("jemalloc", found) if found is not None else ("glibc", None)
    found = find_library(choice)
    if found is None:
        raise ValueError(
            f"IMMICH_AIO_ALLOCATOR={choice}, but {LIBRARIES[choice][0]} is not installed "
            f"(Debian/Ubuntu: apt install {PACKAGES[choice]}); or set IMMICH_AIO_ALLOCATOR=auto"
        )
    return choice, found


def restart_preloaded(library: Path, argv: list[str]) -> None:
    """Replace this process with the same command, `library` preloaded. Returns only if it cannot."""
    if os.environ.get(REEXEC_MARK):
        return  # already tried: the loader refused it; the server runs on what it has
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(p for p in (str(library), env.get("LD_PRELOAD", "")) if p)
    env[REEXEC_MARK] = "1"
    if "jemalloc" in library.name:
        env.setdefault("MALLOC_CONF", jemalloc_conf())  # the user's own configuration wins
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv], env)
    except OSError as e:
        log.warning("Could not start again with %s preloaded (%s); running on the system allocator", library, e)


def _libc():
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def limit_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (unless MALLOC_ARENA_MAX already did); call before worker threads start."""
    libc = _libc()
    if libc is None or "MALLOC_ARENA_MAX" in os.environ or active() != "glibc":
        return False
    return bool(libc.mallopt(M_ARENA_MAX, arenas))


def trim() -> None:
    """Give the memory freed so far back to the system, whichever allocator holds it."""
    allocator = active()
    try:
        process = ctypes.CDLL(None)
    except OSError:
        return
    if allocator == "jemalloc" and hasattr(process, "mallctl"):
        # every arena (MALLCTL_ARENAS_ALL = 4096) returns its unused pages
        process.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))
    elif allocator == "mimalloc" and hasattr(process, "mi_collect"):
        process.mi_collect(ctypes.c_bool(True))
    elif allocator == "glibc":
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
