"""ONNX Runtime's optimised graphs, kept beside the model store, so that a model loads in a fraction of the time.

Creating a session optimises the graph (fusions, and on the CPU the NCHWc layout with its weights reordered)
and copies every weight out of the parsed file. The first session of a model saves that optimised graph with its
weights in a file of their own; later sessions (each start, each reload after the idle TTL) open the saved
graph with optimisation off, and ONNX Runtime maps the weights file instead of copying it. Measured on the
benchmark's models (2 cores): an ArcFace-R50 loads in 0.08 s instead of 0.55 s, a ViT-B/16 in 0.5 s instead
of 1.1 s, a BERT-base in 0.5 s instead of 0.9 s, with identical outputs (README, "Memory and runtime settings").

The saved graph holds optimisations for this CPU's instruction set, so an entry is keyed by everything it
depends on: the source file's identity (device, inode, size, modification time, as the registry watches it for
reinstalls), ONNX Runtime's version, the providers and the CPU's model and flags. A changed source, an upgraded
ONNX Runtime or another machine reading the same volume finds no entry and makes its own. An entry is written
into a temporary folder and renamed into place complete, so a half-written one is never opened; one that fails
to open is removed and the model loads from its own file. Entries of a source's earlier versions are removed
when a new one is made, and those of sources that are gone at each start (`sweep`). Only files on disk are
cached (not graphs rewritten in memory), and only on the CPU: the GPU providers could not be measured here."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import onnxruntime as ort

from immich_aio.store import file_identity

log = logging.getLogger(__name__)

FOLDER = ".ort-cache"  # under the model store; the store's task folders never have this name
FORMAT = 1  # bump when what an entry holds changes
GRAPH, WEIGHTS, ABOUT = "model.onnx", "weights.bin", "source.json"
DISK_MARGIN = 256 << 20  # bytes left free on the store's disk after saving an optimised copy
STALE_PARTIAL_S = 3600  # a temporary folder this old was left by a process that died while writing


@cache
def cpu_fingerprint() -> str:
    """The CPU's model name and instruction-set flags: what the saved NCHWc layout and fused kernels depend on."""
    model = flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = " ".join(sorted(value.split()))
            if model and flags:
                break
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()}|{model}|{flags}".encode()).hexdigest()[:16]


class OrtCache:
    """Saved optimised graphs under `<store>/.ort-cache/<source>/<key>/`."""

    def __init__(self, store_root: Path) -> None:
        self.root = store_root / FOLDER
        self._unwritable_logged = False

    def sweep(self) -> int:
        """Remove the entries of model files that no longer exist (a deleted model's copy would stay forever)."""
        removed = 0
        try:
            folders = list(self.root.iterdir())
        except OSError:
            return 0
        for folder in folders:
            sources = set()
            for about in folder.glob(f"*/{ABOUT}"):
                try:
                    sources.add(json.loads(about.read_text())["source"])
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # unreadable: left to the next load of its source, which replaces it
            if sources and not any(Path(s).exists() for s in sources):
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        if removed:
            log.info("Removed the optimised copies of %d model file(s) that are no longer in the store", removed)
        return removed

    def key(self, source: Path, providers: Sequence[Any]) -> str | None:
        identity = file_identity(source)  # what the registry watches for reinstalls
        if identity is None:
            return None
        parts = {
            "format": FORMAT,
            "source": [str(source.resolve()), *identity],
            "onnxruntime": ort.__version__,
            "providers": [p if isinstance(p, str) else [p[0], sorted(p[1].items())] for p in providers],
            "cpu": cpu_fingerprint(),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    def folder(self, source: Path) -> Path:
        """One folder per source file, whatever its versions: a new entry replaces the old ones in it."""
        return self.root / hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]

    def session(
        self,
        source: Path,
        options: Callable[[], ort.SessionOptions],
        providers: Sequence[Any],
    ) -> ort.InferenceSession:
        key = self.key(source, providers)
        if key is None:  # the source is gone: ONNX Runtime's own error says so
            return _plain(source, options, providers)
        entry = self.folder(source) / key
        if (entry / GRAPH).is_file():
            opts = options()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # already optimised
            try:
                return ort.InferenceSession(str(entry / GRAPH), sess_options=opts, providers=providers)
            except Exception as e:  # ONNX Runtime raises its own types; the source itself is still good
                log.warning("Optimised copy of %s unusable (%s): removed; loading the file itself", source, e)
                shutil.rmtree(entry, ignore_errors=True)
        return self._make(source, entry, options, providers)

    def _make(
        self, source: Path, entry: Path, options: Callable[[], ort.SessionOptions], providers: Sequence[Any]
    ) -> ort.InferenceSession:
        """The session for the source, saving its optimised graph on the way (the one load that pays for it)."""
        partial = entry.parent / f".{entry.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
        try:
            partial.mkdir(parents=True)
            # the saved graph is about the size of the source: never let it take the store's last free space
            size = source.stat().st_size
            if shutil.disk_usage(partial).free < 2 * size + DISK_MARGIN:
                raise OSError(f"too little free disk to save {size >> 20} MB")
        except OSError as e:
            shutil.rmtree(partial, ignore_errors=True)
            if not self._unwritable_logged:
                self._unwritable_logged = True
                log.info("Not keeping an optimised copy of %s in %s (%s); models load from their own files",
                         source.name, self.root, e.strerror or e)  # fmt: skip
            return _plain(source, options, providers)
        opts = options()
        opts.optimized_model_filepath = str(partial / GRAPH)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", WEIGHTS)
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        # Not saved: the weights as the CPU kernels repack them ("session.save_external_prepacked_constant_
        # initializers"). It would cut a ViT's load from 0.5 to 0.35 s, but with ONNX Runtime 1.31 the saved
        # PP-OCRv6 recogniser crashes the process when opened again (tests/test_ort_cache.py runs that case).
        try:
            session = ort.InferenceSession(str(source), sess_options=opts, providers=providers)
        except Exception:
            shutil.rmtree(partial, ignore_errors=True)
            return _plain(source, options, providers)  # a bad model file: its error, without the saving part
        try:
            (partial / ABOUT).write_text(json.dumps({"source": str(source), "onnxruntime": ort.__version__}) + "\n")
            partial.rename(entry)  # complete, or not there at all
        except OSError:  # another process made the same entry meanwhile, or the disk is full: no harm done
            shutil.rmtree(partial, ignore_errors=True)
        else:
            self._prune(entry)
        return session

    def _prune(self, keep: Path) -> None:
        """Entries of the source's earlier versions, and temporary folders of writers that died."""
        now = time.time()
        for other in keep.parent.iterdir():
            if other == keep:
                continue
            if other.name.endswith(".partial"):
                try:
                    if now - other.stat().st_mtime < STALE_PARTIAL_S:
                        continue  # another process may be writing it now
                except OSError:
                    continue
            # A running session may still map an old entry's weights: unlinking leaves its mapping valid.
            shutil.rmtree(other, ignore_errors=True)


def _plain(source: Path, options: Callable[[], ort.SessionOptions], providers: Sequence[Any]) -> ort.InferenceSession:
    """The session from the model's own file, as without the cache."""
    return ort.InferenceSession(str(source), sess_options=options(), providers=providers)
