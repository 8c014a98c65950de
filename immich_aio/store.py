"""The model store on disk, in Immich ML's layout `<root>/<task>/<name>/<type>/model.onnx`.

Every name that reaches the filesystem goes through `clean_name` and `ModelStore.path`, which
refuse anything that could resolve outside the store. A store entry that is itself bad (a folder
that is a symlink leaving the store, say) is skipped, logged once and listed, and affects nothing
else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from immich_aio.errors import BadRequest, shown
from immich_aio.tasks import ModelType, Task

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+\-]*")
MAX_NAME = 200
TASKS: tuple[Task, ...] = tuple(Task)
MODEL_TYPES: tuple[ModelType, ...] = tuple(ModelType)


def clean_name(name: str) -> str:
    """Clean a model name exactly as Immich ML does: last `/` segment, `:` and `\\` to `_`, no dots."""
    cleaned = name.split("/")[-1].replace(":", "_").replace("\\", "_").replace(".", "")
    if len(cleaned) > MAX_NAME or not _SAFE_NAME.fullmatch(cleaned):
        raise BadRequest(
            f"Model name {shown(name)!r} is not a valid model name "
            "(letters, digits, '_', '-', '+'; an optional 'org/' prefix)"
        )
    return cleaned


FileIdentity = tuple[int, int, int, int] | None


def file_identity(path: Path) -> FileIdentity:
    """(device, inode, size, mtime): changes when a file is replaced or rewritten; None when missing."""
    try:
        return stat_identity(os.stat(path))
    except OSError:
        return None


def stat_identity(st: os.stat_result) -> FileIdentity:
    """The identity of a file already stat'ed (or fstat'ed through a descriptor held open)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def identity(paths: Iterable[Path]) -> tuple[FileIdentity, ...]:
    """The installation identity of a model: a few stat calls, cheap enough for every request."""
    return tuple(file_identity(p) for p in paths)


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    sha256: str | None  # None: the file changed before it could be hashed (ModelRegistry._describe)

    def as_dict(self) -> dict[str, object]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


HASHES = ".sha256"  # under the store root: each model file's sha256 with the identity it was computed for


class ModelStore:
    HASH_CACHE = 256  # file versions whose sha256 is remembered in memory

    def __init__(self, root: Path, revision: str = "main") -> None:
        self.root = root.expanduser().resolve()
        # Immich 3.3's MACHINE_LEARNING_MODEL_REVISION: any revision but `main` keeps its files one folder level
        # down, `<task>/<name>/<revision>/...`; that folder is served when present, the unversioned one otherwise.
        self.revision = revision
        self._hashes: OrderedDict[tuple, str] = OrderedDict()
        self._lock = threading.Lock()
        self._skipped: dict[str, str] = {}  # "task/name" -> why, for /info (bounded by what is on disk)

    def path(self, *parts: str) -> Path:
        """A path inside the store; raises if the parts would leave it."""
        candidate = self.root.joinpath(*parts).resolve()
        if not candidate.is_relative_to(self.root):
            raise BadRequest(f"Path {'/'.join(parts)!r} is outside the model store")
        return candidate

    def model_dir(self, task: str, name: str) -> Path:
        return self.path(task, clean_name(name))

    def folder(self, task: str, name: str) -> Path:
        """The folder a model is served from: its revision's (MACHINE_LEARNING_MODEL_REVISION) if present."""
        plain = self.path(task, clean_name(name))
        if self.revision != "main":
            versioned = self.path(task, clean_name(name), self.revision)
            if any((versioned / t).is_dir() for t in MODEL_TYPES):  # laid out as the unversioned folder is
                return versioned
        return plain

    def names(self, task: str) -> list[str]:
        """Usable folder names under a task, sorted; bad entries are skipped and reported once."""
        task_dir = self.path(task)
        if not task_dir.is_dir():
            return []
        out = []
        for entry in sorted(task_dir.iterdir()):
            if entry.name.startswith("."):
                continue  # staging and download folders
            why = None
            if not _SAFE_NAME.fullmatch(entry.name) or len(entry.name) > MAX_NAME:
                why = "the folder name is not a model name"
            else:
                try:
                    resolved = entry.resolve()
                except OSError as e:
                    why = f"cannot be resolved ({e})"
                else:
                    if not resolved.is_relative_to(self.root):
                        why = f"it leads outside the store (to {resolved})"
            if why is None:
                if entry.is_dir():
                    out.append(entry.name)
                continue
            key = f"{task}/{entry.name[:MAX_NAME]}"
            with self._lock:
                new = key not in self._skipped
                self._skipped[key] = why
            if new:
                log.warning("Skipping %s in the model store: %s", key, why)
        return out

    def skipped(self) -> dict[str, str]:
        """Store entries that are ignored, with the reason, for /info."""
        with self._lock:
            return dict(self._skipped)

    def describe(self, path: Path) -> FileInfo:
        """Path (inside the store where possible), size and sha256 of a model file, cached by file identity.

        The sha256 comes from the install manifest when that is newer than the file, else from the record a
        previous load left under `.sha256/` for this same file identity, else it is computed and recorded: without
        the record every start hashed each model file again, reading a 344 MB file from disk beside the load."""
        stat = path.stat()
        key = (str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            digest = self._hashes.get(key)
            if digest is not None:
                self._hashes.move_to_end(key)
        if digest is None:
            digest = _from_manifest(path, stat) or self._recorded(key)
            if digest is None:
                digest = sha256_file(path)
                self._record(key, digest)
            with self._lock:
                self._hashes[key] = digest
                while len(self._hashes) > self.HASH_CACHE:
                    self._hashes.popitem(last=False)
        return FileInfo(self._shown(path), stat.st_size, digest)

    def undescribed(self, path: Path, size: int) -> FileInfo:
        """A file as loaded that was replaced or removed before it could be hashed: its size then, no sha256."""
        return FileInfo(self._shown(path), size, None)

    def _shown(self, path: Path) -> str:
        """The path inside the store where possible."""
        resolved = path.resolve()
        return str(resolved.relative_to(self.root)) if resolved.is_relative_to(self.root) else str(resolved)

    def _record_path(self, file: str) -> Path:
        """One record per model file (a new version overwrites it): as many records as files, never more."""
        return self.root / HASHES / (hashlib.sha256(file.encode()).hexdigest()[:32] + ".json")

    def _recorded(self, key: tuple) -> str | None:
        try:
            record = json.loads(self._record_path(key[0]).read_text())
            if record["path"] == key[0] and record["identity"] == list(key[1:]):
                digest = record["sha256"]
                if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest):
                    return digest
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none yet, or unreadable: hashed again and rewritten
        return None

    def _record(self, key: tuple, digest: str) -> None:
        """Written whole under another name and renamed, so a reader never sees half of one; a read-only store
        keeps none (its files are hashed at each start, as before)."""
        target = self._record_path(key[0])
        partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            target.parent.mkdir(exist_ok=True)
            partial.write_text(json.dumps({"path": key[0], "identity": list(key[1:]), "sha256": digest}) + "\n")
            os.replace(partial, target)
        except OSError as e:
            log.debug("not recording the sha256 of %s: %s", key[0], e)
            with contextlib.suppress(OSError):
                partial.unlink()

    def sweep_records(self) -> int:
        """Remove the sha256 records of files that are gone (and partial ones left by a process that died)."""
        removed = 0
        with contextlib.suppress(OSError):
            for record in (self.root / HASHES).iterdir():
                try:
                    gone = record.name.startswith(".") or not Path(json.loads(record.read_text())["path"]).exists()
                except (OSError, ValueError, KeyError, TypeError):
                    gone = True
                if gone:
                    with contextlib.suppress(OSError):
                        record.unlink()
                        removed += 1
        return removed


def _from_manifest(path: Path, stat: os.stat_result) -> str | None:
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
        if folder.name in TASKS:
            return None
    return None


def per_file_folder(root: Path, source: Path) -> Path:
    """The folder under a cache of derived copies (`root`: ONNX Runtime's, OpenVINO's) that holds one model file's
    copies, whatever its versions."""
    return root / hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]


def sweep_per_file(root: Path, about: str) -> int:
    """Remove the per-file folders under `root` whose model files are gone, as `<folder>/*/<about>` names them
    ({"source": path}); a folder with no readable note is left (its writer may be another server, still at it)."""
    removed = 0
    with contextlib.suppress(OSError):
        for folder in list(root.iterdir()):
            sources = set()
            for note in folder.glob(f"*/{about}"):
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    sources.add(json.loads(note.read_text())["source"])
            if sources and not any(Path(s).exists() for s in sources):
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
    return removed


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
