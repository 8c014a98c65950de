"""ONNX Runtime's optimised graphs, kept beside the model store, so that a model loads in a fraction of the time.

Creating a session optimises the graph (fusions, and on the CPU the NCHWc layout with its weights reordered)
and copies every weight out of the parsed file. After a model's first load, once the server is quiet, a child
process (ort_pack.py, idle priority, one at a time) saves that optimised graph with its weights in a file of their
own, so no request ever waits for the disk; later sessions (each start, each reload after the idle TTL) open the
saved graph with optimisation off, and ONNX Runtime maps the weights file instead of copying it. Measured on the
benchmark's models (2 cores): an ArcFace-R50 loads in 0.08 s instead of 0.55 s, a ViT-B/16 in 0.5 s instead
of 1.1 s, a BERT-base in 0.5 s instead of 0.9 s, with identical outputs (README, "Memory and runtime settings").

The saved graph holds optimisations for this CPU's instruction set, so an entry is keyed by everything it
depends on: the source file's identity (device, inode, size, modification time, as the registry watches it for
reinstalls), ONNX Runtime's version, the providers and the CPU's model and flags. A changed source, an upgraded
ONNX Runtime or another machine reading the same volume finds no entry and makes its own. An entry is written
into a temporary folder and renamed into place complete, so a half-written one is never opened; one that fails
to open is removed and the model loads from its own file. Entries of a source's earlier versions are removed
when a new one is made, and those of sources that are gone at each start (`sweep`). Only files on disk are
cached (not graphs rewritten in memory), and only on the CPU: the GPU providers could not be measured here.

An entry can also hold the weights as the CPU kernels repack them (`packed/`, a ViT-B/16 loads in 0.24 s instead of
0.40 s). ONNX Runtime has crashed on opening such a copy, so the server never makes or opens one unchecked: the
child that makes it also reopens and runs it, and only a copy that ran and agreed there is used; one that
crashed, disagreed or timed out leaves a `not-packed` note and is not tried again.

Each copy is made from the model's graph with its constant scales and shifts folded into its convolutions
(graph_fold.py: PP-OCR's models run in about 0.8 of their time) and its per-channel PRelus written as convolutions
(graph_prelu.py: an ArcFace IResNet-50 in about 0.9), where the child finds it gives the same outputs; a CLIP image
tower's copy does its last block's row-by-row work for the one row its output reads (graph_pool.py: a ViT-B/16 in
about 0.95), where the child finds its outputs the same to the bit.

Each copy is saved with its read order (ort_pack.READ_ORDER), so that a load from a paged-out disk asks the kernel
for its weights in the order ONNX Runtime reads them, while the session is built (`read_ahead`); a model's own file
is asked for whole (`read_ahead_file`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import onnxruntime as ort

from immich_aio import mapped_load, ort_pack
from immich_aio.ort_pack import GRAPH, READ_ORDER, WEIGHTS
from immich_aio.store import file_identity, per_file_folder, sweep_per_file

log = logging.getLogger(__name__)

FOLDER = ".ort-cache"  # under the model store; the store's task folders never have this name
# bump when what an entry holds changes (2: ort_pack.READ_ORDER; 3: graph_fold.py; 4: graph_prelu.py; 5: graph_fold's
# depthwise convolutions; 6: graph_pool.py)
FORMAT = 6
ABOUT = "source.json"
PACKED = "packed"  # an entry's folder of the same graph with packed weights, made and checked by ort_pack.py
NOT_PACKED = "not-packed"  # an entry's note of why its packed copy was refused: it is not tried again
PACK_TIMEOUT_S = 900
PACKER = (sys.executable, "-m", "immich_aio.ort_pack")  # run with entry SOURCE FOLDER | pack SOURCE FOLDER ENTRY
DISK_MARGIN = 256 << 20  # bytes left free on the store's disk after saving an optimised copy
READ_AHEAD_PIECE = 4 << 20  # bytes asked for at a time, in read order
MAX_READ_ORDER = 100_000  # ranges: a read order longer than this is not one ort_pack.py wrote
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

    def __init__(self, store_root: Path, packed: bool = True) -> None:
        self.root = store_root / FOLDER
        self.packed = packed
        self._unwritable_logged = False
        self._lock = threading.Lock()
        self._writing: dict[Path, subprocess.Popen[str] | None] = {}  # entry -> its child; one per model file
        self._turn = threading.Lock()  # one child at a time: each holds about twice its model in memory
        self._closed = False
        # Set by the server while no request is in flight: writing waits for it, so that it never competes with the
        # first requests after a start (a packing child beside them made the first face request 0.3 s slower).
        self.quiet: threading.Event | None = None

    def sweep(self) -> int:
        """Remove the entries of model files that no longer exist (a deleted model's copy would stay forever)."""
        removed = sweep_per_file(self.root, ABOUT)
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
        return per_file_folder(self.root, source)

    def saved(self, source: Path, providers: Sequence[Any]) -> bool:
        """Whether this file's optimised copy is written (a session would open it, not the file)."""
        key = self.key(source, providers)
        entry = self.folder(source) / key if key is not None else None
        return entry is not None and any((saved / GRAPH).is_file() for saved in (entry / PACKED, entry))

    def session(
        self,
        source: Path,
        options: Callable[[], ort.SessionOptions],
        providers: Sequence[Any],
    ) -> ort.InferenceSession:
        key = self.key(source, providers)
        if key is None:  # the source is gone: ONNX Runtime's own error says so
            return plain_session(source, options, providers)
        entry = self.folder(source) / key
        for saved in (entry / PACKED, entry):
            if (saved / GRAPH).is_file() and (session := self._open(saved, source, options, providers)) is not None:
                if saved == entry:
                    self._later(source, entry, session)
                return session
        # Nothing saved yet: the model's own file, as without the cache; the copy is written later, by a child
        # process once the server is quiet, so that no request waits for the disk (on a first start, writing the
        # copies on the requests' path made CLIP's first request 28 s behind a busy disk).
        session = plain_session(source, options, providers)
        self._later(source, entry, session)
        return session

    def _open(
        self, saved: Path, source: Path, options: Callable[[], ort.SessionOptions], providers: Sequence[Any]
    ) -> ort.InferenceSession | None:
        opts = options()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # already optimised
        try:
            read_ahead(saved)
            return ort.InferenceSession(str(saved / GRAPH), sess_options=opts, providers=providers)
        except Exception as e:  # ONNX Runtime raises its own types; the source itself is still good
            log.warning("Optimised copy of %s unusable (%s): removed; loading it otherwise", source, e)
            shutil.rmtree(saved, ignore_errors=True)
            if saved.name == PACKED:
                _note(saved.parent, f"could not be opened: {e}")
            return None

    def _later(self, source: Path, entry: Path, session: ort.InferenceSession) -> None:
        """Have child processes save what the entry still lacks: the optimised copy, then (if the model's shapes
        allow) its packed weights, each once."""
        packable = (
            self.packed
            and not (entry / PACKED).exists()
            and not (entry / NOT_PACKED).exists()
            and ort_pack.batch_only(session.get_inputs())  # free image sizes (OCR, face detection): never packed
        )
        if self._closed or ((entry / GRAPH).is_file() and not packable):
            return
        with self._lock:
            if entry in self._writing:
                return
            self._writing[entry] = None
        threading.Thread(target=self._save, args=(source, entry, packable), name="ort-cache", daemon=True).start()

    def _save(self, source: Path, entry: Path, packable: bool) -> None:
        try:
            with self._turn:
                if self.quiet is not None:
                    while not self.quiet.wait(1.0):
                        if self._closed:
                            return
                if not (entry / GRAPH).is_file() and not self._save_entry(source, entry):
                    return
                if packable:
                    self._save_packed(source, entry)
        finally:
            with self._lock:
                self._writing.pop(entry, None)

    def _save_entry(self, source: Path, entry: Path) -> bool:
        """The optimised copy, written by a child into a temporary folder and renamed into place complete."""
        partial = entry.parent / f".{entry.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
        try:
            if not self._room(source, partial):
                return False
            if self._child("entry", source, partial, entry) is not None:
                return False  # the model loads from its own file, as it did; tried again at its next load
            (partial / ABOUT).write_text(json.dumps({"source": str(source), "onnxruntime": ort.__version__}) + "\n")
            partial.rename(entry)  # complete, or not there at all
        except OSError as e:  # another process made the same entry meanwhile, or the disk is full: no harm done
            log.debug("saving %s: %s", source, e)
            return False
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        self._prune(entry)
        log.info("Saved the optimised copy of %s%s: its next loads are faster", source, _rewrites(entry))
        return True

    def _save_packed(self, source: Path, entry: Path) -> None:
        partial = entry / f".{PACKED}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
        try:
            _clear_stale(entry)
            if not (entry / GRAPH).is_file() or not self._room(source, partial):
                return  # replaced by a newer version meanwhile, or no room: no note, it may work another time
            error = self._child("pack", source, partial, entry)
            if error is None:
                partial.rename(entry / PACKED)
                log.info("Saved the packed weights of %s: its next loads are faster", source)
            elif not self._closed:
                _note(entry, error)
                log.warning("Not keeping packed weights for %s: %s. It loads from its optimised copy", source, error)
        except OSError as e:  # the entry was replaced meanwhile, or the disk is full: nothing is lost
            log.debug("packing %s: %s", source, e)
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def _room(self, source: Path, partial: Path) -> bool:
        """Make the temporary folder if the store can take a copy: never the store's last free space."""
        try:
            partial.mkdir(parents=True)
            size = source.stat().st_size
            if shutil.disk_usage(partial).free < 2 * size + DISK_MARGIN:
                raise OSError(f"too little free disk to save {size >> 20} MB")
        except OSError as e:
            if not self._unwritable_logged:
                self._unwritable_logged = True
                log.info("Not keeping an optimised copy of %s in %s (%s); models load from their own files",
                         source.name, self.root, e.strerror or e)  # fmt: skip
            return False
        return True

    def _child(self, mode: str, source: Path, folder: Path, entry: Path) -> str | None:
        """Run ort_pack.py; None when it succeeded, else why not (the server stopping counts as failing)."""
        with self._lock:
            if self._closed:
                return "stopped"
            child = subprocess.Popen(
                [*PACKER, mode, str(source), str(folder), *([str(entry)] if mode == "pack" else [])],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env=_child_env(),
            )
            self._writing[entry] = child
        try:
            _, err = child.communicate(timeout=PACK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            _, err = child.communicate()
            err += f"\nno answer in {PACK_TIMEOUT_S} s"
        if child.returncode == 0:
            return None
        if child.returncode < 0:
            return f"crashed (signal {-child.returncode})"
        lines = [line for line in err.strip().splitlines() if line.strip()]
        return lines[-1] if lines else f"exited with {child.returncode}"

    def wait_written(self, timeout: float) -> bool:
        """Whether all saving under way has ended within `timeout` seconds (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while self._writing:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def close(self) -> None:
        """Stop saving (the server is stopping): children are killed and their temporary folders removed."""
        with self._lock:
            self._closed = True
            children = [c for c in self._writing.values() if c is not None]
        for child in children:
            child.kill()
        self.wait_written(5)  # the threads remove the folders; a daemon thread would not get to it at exit

    def _prune(self, keep: Path) -> None:
        """Entries of the source's earlier versions, and temporary folders of writers that died."""
        now = time.time()
        for other in keep.parent.iterdir():
            if other == keep:
                continue
            if other.name.endswith(".partial") and not _stale(other, now):
                continue  # another process may be writing it now
            # A running session may still map an old entry's weights: unlinking leaves its mapping valid.
            shutil.rmtree(other, ignore_errors=True)


def read_ahead(saved: Path) -> threading.Thread | None:
    """Ask the kernel for a copy's weights file, in the order ONNX Runtime will read it, while it builds the session.

    Mapped weights are faulted in a few pages at a time: paged out on a slow disk, a ViT-B/16 copy took 2.6 s that
    way and 1.4 s read in one pass first; but reading first in this process cost more than it saved on a fast disk.
    Asked for asynchronously (POSIX_FADV_WILLNEED) the disk reads while the session is built, and the order
    matters: a packed copy holds each initializer as stored, which the session build reads, and its packed form,
    which the first run reads, side by side. Asked for as one whole file, the packed forms came in the way of the
    initializers the build was waiting for (0.83 s for a ViT-B/16, against 0.62 s in read order and 0.54-0.58 s
    from the page cache). So a thread asks for the ranges of the copy's read order (ort_pack.READ_ORDER) in
    pieces, then for the whole file (a copy without a usable read order gets only that)."""
    return _in_background(saved / WEIGHTS, lambda size: _read_order(saved, size))


def read_ahead_file(model: Path) -> threading.Thread | None:
    """Ask the kernel for a model's own file, whole, while ONNX Runtime parses it (a first load, or no copies).

    ONNX Runtime reads a model file front to back in small reads, each waiting for the disk behind the kernel's
    128 KB read-ahead: paged out, a ViT-B/16 (345 MB) took 1.9 s to load and run once, and 1.2 s with the file
    asked for first (1.15 s from the page cache); a BERT-base text tower 1.5 s against 0.96 s, an ArcFace-R50
    0.64 s against 0.53 s. Its whole file is what it reads, so no order is needed."""
    return _in_background(model, lambda size: [])


def _in_background(path: Path, order: Callable[[int], list[tuple[int, int]]]) -> threading.Thread | None:
    if not hasattr(os, "posix_fadvise"):
        return None
    thread = threading.Thread(target=_advise, args=(path, order), name="read-ahead", daemon=True)
    thread.start()
    return thread


def _advise(path: Path, order: Callable[[int], list[tuple[int, int]]]) -> None:
    with contextlib.suppress(OSError):  # unreadable or missing: ONNX Runtime's own error says so
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO in the store must not hold this thread for good
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return
            for offset, length in order(info.st_size):
                end = offset + length
                while offset < end:  # in pieces: asked for in larger ones, the order was lost (16 MB: 0.86 s)
                    piece = min(READ_AHEAD_PIECE, end - offset)
                    os.posix_fadvise(fd, offset, piece, os.POSIX_FADV_WILLNEED)
                    offset += piece
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)  # and whatever the order left out
        finally:
            os.close(fd)


def _read_order(saved: Path, size: int) -> list[tuple[int, int]]:
    """The copy's read order, or nothing when it has none or one that does not fit its weights file."""
    try:
        with (saved / READ_ORDER).open("rb") as f:
            text = f.read(MAX_READ_ORDER * 64 + 1)  # a range is at most ~45 bytes of JSON: never a huge file whole
        ranges = json.loads(text) if len(text) <= MAX_READ_ORDER * 64 else None
    except (OSError, ValueError):
        return []
    if not isinstance(ranges, list) or len(ranges) > MAX_READ_ORDER:
        return []
    out = []
    for item in ranges:
        if not (isinstance(item, list) and len(item) == 2 and all(type(v) is int for v in item)):
            return []
        offset, length = item
        if offset < 0 or length <= 0 or offset + length > size:
            return []
        out.append((offset, length))
    return out


def _rewrites(entry: Path) -> str:
    """What ort_pack.py said it did to the graph, for the log: a note, or nothing."""
    said = ort_pack.entry_said(entry)
    if said is None:
        return ""
    if isinstance(folded := said["folded"], int) and folded > 0:
        prelu, depthwise = (_count(said.get(key), folded) for key in ("prelu", "depthwise"))
        if prelu + depthwise > folded:
            prelu = depthwise = 0  # not what ort_pack.py writes: the total alone
        kinds = (
            (folded - prelu - depthwise, "constant scales and shifts folded into its convolutions"),
            (depthwise, "scales and shifts written as depthwise convolutions"),
            (prelu, "PRelus written as convolutions"),
        )
        return f" ({', '.join(f'{n} {what}' for n, what in kinds if n)})"
    pooled = said.get("pooled")
    if type(pooled) is int and pooled > 0:  # (a bool is an int to isinstance)
        return f" (its last {pooled} row-by-row nodes computed for the row its output reads alone)"
    why = said.get("why")
    return f" (not folded: {why})" if isinstance(why, str) and why != "nothing to fold" else ""


def _count(value: object, most: int) -> int:
    return value if isinstance(value, int) and 0 <= value <= most else 0


def _note(entry: Path, reason: str) -> None:
    with contextlib.suppress(OSError):  # the entry itself is gone: nothing to remember
        (entry / NOT_PACKED).write_text(reason[:500] + "\n")


def _clear_stale(entry: Path) -> None:
    """Temporary folders of packings whose server died: another server's may be in progress, so only old ones."""
    now = time.time()
    for other in entry.glob(f".{PACKED}.*.partial"):
        if _stale(other, now):
            shutil.rmtree(other, ignore_errors=True)


def _stale(partial: Path, now: float) -> bool:
    """A temporary folder this old was left by a process that died while writing it (gone already: not stale)."""
    try:
        return now - partial.stat().st_mtime >= STALE_PARTIAL_S
    except OSError:
        return False


def _child_env() -> dict[str, str]:
    """This process's environment, with the package importable in the child however the server was started."""
    package_root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=package_root + (os.pathsep + path if path else ""))


def plain_session(
    source: Path, options: Callable[[], ort.SessionOptions], providers: Sequence[Any]
) -> ort.InferenceSession:
    """The session from the model's own file, as without the cache (and where there is none), read ahead whole;
    on the CPU with its large weights packed from the file where they lie (mapped_load.py), not copied first: the
    file is asked for once that walk has found them, so that its reads do not queue behind the whole file's."""
    asked: list[object] = []
    mapped = mapped_load.session(source, options, providers, walked=lambda: asked.append(read_ahead_file(source)))
    if mapped is not None:
        return mapped
    if not asked:
        read_ahead_file(source)
    return ort.InferenceSession(str(source), sess_options=options(), providers=providers)
