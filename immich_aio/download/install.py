"""Atomic installation of a model folder into the store, with a sha256 manifest.

Files are assembled in a staging folder beside the target and swapped in with renames, so the
server (which may be running) sees either the old complete model or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
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
    stage = Path(tempfile.mkdtemp(prefix=f".staging-{target.name}-", dir=target.parent))
    try:
        if keep_existing and target.is_dir():
            shutil.copytree(target, stage, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST))
        yield stage
        write_manifest(stage)
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
