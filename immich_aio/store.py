"""The model store on disk, in Immich ML's layout `<root>/<task>/<name>/<type>/model.onnx`.

Every name that reaches the filesystem goes through `clean_name` and `ModelStore.path`, which
refuse anything that could resolve outside the store.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from immich_aio.errors import BadRequest

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+\-]*$")


def clean_name(name: str) -> str:
    """Clean a model name exactly as Immich ML does: last `/` segment, `:` and `\\` to `_`, no dots."""
    cleaned = name.split("/")[-1].replace(":", "_").replace("\\", "_").replace(".", "")
    if not _SAFE_NAME.match(cleaned) or len(cleaned) > 200:
        raise BadRequest(
            f"Model name {name!r} is not a valid model name (letters, digits, '_', '-', '+'; an optional 'org/' prefix)"
        )
    return cleaned


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    sha256: str

    def as_dict(self) -> dict[str, object]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def path(self, *parts: str) -> Path:
        """A path inside the store; raises if the parts would leave it."""
        candidate = self.root.joinpath(*parts).resolve()
        if not candidate.is_relative_to(self.root):
            raise BadRequest(f"Path {'/'.join(parts)!r} is outside the model store")
        return candidate

    def model_dir(self, task: str, name: str) -> Path:
        return self.path(task, clean_name(name))

    def names(self, task: str) -> list[str]:
        """Folder names present under a task, in sorted order."""
        task_dir = self.path(task)
        if not task_dir.is_dir():
            return []
        return sorted(p.name for p in task_dir.iterdir() if p.is_dir() and _SAFE_NAME.match(p.name))

    def describe(self, path: Path) -> FileInfo:
        """Path (inside the store where possible), size and sha256 of a model file, cached by mtime.

        The sha256 comes from the install manifest when that is newer than the file, else it is computed.
        """
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            digest = self._hashes.get(key)
        if digest is None:
            digest = _from_manifest(path, stat) or sha256_file(path)
            with self._lock:
                self._hashes[key] = digest
        resolved = path.resolve()
        shown = str(resolved.relative_to(self.root)) if resolved.is_relative_to(self.root) else str(resolved)
        return FileInfo(shown, stat.st_size, digest)


def _from_manifest(path: Path, stat) -> str | None:
    """sha256 recorded by `immich-aio models` for this file, if the file has not changed since."""
    for folder in path.parents:
        manifest = folder / "manifest.json"
        if manifest.is_file():
            try:
                if manifest.stat().st_mtime_ns <= stat.st_mtime_ns:  # changed since (or too close to tell)
                    return None
                entry = json.loads(manifest.read_text())["files"].get(str(path.relative_to(folder)))
            except (OSError, ValueError, KeyError, AttributeError):
                return None
            if entry and entry.get("size") == stat.st_size:
                return entry.get("sha256")
            return None
        if folder.name in {"clip", "facial-recognition", "ocr"}:
            return None
    return None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
