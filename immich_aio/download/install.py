"""Atomic installation of a model folder into the store, with a sha256 manifest.

Files are assembled in a staging folder beside the target and swapped in with one exchange of the two folders
(Linux's renameat2 RENAME_EXCHANGE), so the server (which may be running) sees either the old complete model or
the new one: never a mix, and never neither (two renames left a moment without the folder, in which a request
was refused as if no model were installed). A filesystem that cannot exchange gets the two renames.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from immich_aio.store import ModelStore, clean_name, sha256_file

MANIFEST = "manifest.json"


def write_manifest(folder: Path) -> dict[str, dict[str, object]]:
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=2) + "\n")
    return files


def verify_manifest(folder: Path) -> list[str]:
    """Relative paths whose size or sha256 differ from the manifest (empty when all is well)."""
    files = json.loads((folder / MANIFEST).read_text())["files"]
    bad = []
    for rel, meta in files.items():
        p = folder / rel
        if not p.is_file() or p.stat().st_size != meta["size"] or sha256_file(p) != meta["sha256"]:
            bad.append(rel)
    return bad


@contextlib.contextmanager
def staged(store: ModelStore, task: str, name: str, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a staging folder; on success it becomes `<root>/<task>/<name>` atomically.

    With keep_existing the stage starts as a copy of the current folder, for folders that several
    installs add to (e.g. the OCR detector shared by every language).
    """
    target = store.model_dir(task, clean_name(name))
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target)
    stage = Path(tempfile.mkdtemp(prefix=f".staging-{target.name}-", dir=target.parent))
    try:
        if keep_existing and target.is_dir():
            shutil.copytree(target, stage, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST))
        yield stage
        write_manifest(stage)
        if target.exists() and _exchange(stage, target):
            return  # the old folder is now at the stage's path, removed below
        old = None
        if target.exists():
            old = target.with_name(f".old-{target.name}-{stage.name[-8:]}")
            target.rename(old)
        stage.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step; False where the C library or the filesystem cannot (then nothing moved)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a C library without it
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


STALE_S = 600  # a stage this old belongs to an install that was killed (installs of one model never overlap)


def _remove_leftovers(target: Path) -> None:
    """Stages and swapped-out folders of this model left by a killed install: they only take disk space."""
    pattern = re.compile(rf"\.(staging|old)-{re.escape(target.name)}-[A-Za-z0-9_]{{8}}")
    for entry in target.parent.iterdir():
        if not pattern.fullmatch(entry.name) or entry.is_symlink():
            continue
        try:
            if time.time() - entry.stat().st_mtime > STALE_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


class InstallBusy(RuntimeError):
    """Another process is installing the same model into this store."""


@contextlib.contextmanager
def install_lock(
    store: ModelStore, key: str, wait: Callable[[str], bool] | None = None, poll_s: float = 1.0
) -> Iterator[None]:
    """One install of a model at a time, across processes (the CLI and the server's fetches on first use).

    Two installs of one model would append to the same partial download and race on the renames; installs of
    different models run side by side. Without `wait`, a held lock raises InstallBusy at once; with it, the
    lock is polled while `wait(holder)` returns True.
    """
    import fcntl

    folder = store.root / ".downloads"
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / f".lock-{re.sub(r'[^A-Za-z0-9_+-]', '_', key)}"
    with lock.open("a+") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                if wait is None or not wait(holder):
                    raise InstallBusy(
                        f"another install of {key} ({holder}) is running in {store.root}; wait for it to finish"
                    ) from None
                time.sleep(poll_s)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)
