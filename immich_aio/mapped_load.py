"""A session built from a model's own file with its large weights mapped from the file, not copied.

A first load of a model file never seen (before ort_cache.py has saved its copy; always with that cache off) is
ONNX Runtime parsing the file: every weight is copied out of the protobuf into a tensor, then packed for the CPU
kernels from that copy. Given the same graph with each large weight marked as external data at the offset where
it already lies in the file, ONNX Runtime maps the file and packs from the mapping: the ViT-B/16 image tower
builds in 0.85-0.91 s instead of 1.38-1.45 s and holds 140 MB less after it, an ArcFace-R50 in 0.31-0.33 s
instead of 0.70-0.78 s (README, "Memory and runtime settings"). The weights are the file's own bytes, so the
outputs are identical.

Only weights whose every use is one that the CPU kernels pack (a MatMul's or Gemm's second input, a Conv's
filter) are mapped: ONNX Runtime then keeps the packed form and lets the mapping go, so once the session is built
the server holds no mapping of the user's file, and replacing or rewriting the file later cannot touch a running
session. That is checked after every build (/proc/self/maps), as is that the path still names the file that was
read: a session that kept a mapping, or a file replaced meanwhile, is dropped and the model is loaded the usual
way. CPU provider only (the GPU providers could not be measured here), Linux only, files of 32 MB and more (a
small model's copy costs little). A large graph is built as two halves at once, one per core (graph_split.py).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort

from immich_aio import graph_split
from immich_aio.onnx_walk import (
    LENGTH_DELIMITED,
    Buffer,
    Field,
    encode_varint,
    fields,
    length_field,
    messages,
    varint_field,
)
from immich_aio.store import FileIdentity, file_identity, stat_identity

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
MIN_FILE_BYTES = 32 << 20
MAX_FIELDS = 2_000_000  # fields walked at most (about a second); a larger walk gives up and the usual load runs
# A graph that keeps more than this in itself loads the usual way: the BERT text tower (its 65 MB word table is a
# Gather's, not packed) loaded mapped in 2.4-4.6 s after the disk cache had been evicted (the usual way: 1.5-2.8 s)
MAX_GRAPH_BYTES = 8 << 20
MIN_WEIGHT_BYTES = 4096  # a smaller tensor stays in the graph: a mapping per bias is not worth its page
FOLDER_KEY = "session.model_external_initializers_file_folder_path"  # where a graph given as bytes finds its data
# ONNX field numbers: ModelProto.graph; GraphProto.node / initializer; NodeProto.input / op_type / domain;
# TensorProto.segment / name / raw_data / external_data / data_location.
MODEL_GRAPH, GRAPH_NODE, GRAPH_INITIALIZER = 7, 1, 5
NODE_INPUT, NODE_OP_TYPE, NODE_DOMAIN = 1, 4, 7
TENSOR_SEGMENT, TENSOR_NAME, TENSOR_RAW, TENSOR_EXTERNAL, TENSOR_LOCATION = 3, 8, 9, 13, 14
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
# ONNX's own op -> the input the CPU kernels pack (and then release) when it is constant
PACKED_INPUT = {b"MatMul": 1, b"Gemm": 1, b"Conv": 1}


def session(
    source: Path,
    options: Callable[[], ort.SessionOptions],
    providers: Sequence[Any],
    walked: Callable[[], object] | None = None,
) -> ort.InferenceSession | None:
    """The session with the file's packable weights mapped, or None where the usual load is the one to use.

    `walked` is called once the graph has been read, before ONNX Runtime builds the session (where the caller asks
    for the whole file): asked for first, the disk read the file front to back and the walk waited behind it for
    each tensor's header."""
    if sys.platform != "linux" or any(p != CPU for p in providers):
        return None
    try:
        path = source.resolve()  # ONNX Runtime finds the weights beside the graph only in the file's real folder
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO in the store must not hold a loader thread
    except (OSError, RuntimeError):  # missing, unreadable, a symlink loop: ONNX Runtime's own load says what is wrong
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size < MIN_FILE_BYTES:
            return None
        read = stat_identity(info)
        graph, mapped = walk_file(fd, path.name)
    except (OSError, ValueError, IndexError, BufferError) as e:  # not a protobuf this walk follows: the usual load
        log.debug("%s: loading its weights by copy (%s)", source, e)
        return None
    finally:
        os.close(fd)
    if not mapped:
        return None
    if walked is not None:
        walked()
    try:
        built = _build(graph, path, options, providers)
    except Exception as e:  # ONNX Runtime raises its own types; a broken file gets its error from the usual load
        log.info("%s: mapping its weights failed (%s); loading it by copy", source, e)
        return None
    if file_identity(path) != read:
        log.info("%s changed while it loaded; loading it again", source)
        return None
    if kept := mappings_of(read, path.name):
        log.info("%s: ONNX Runtime kept %d of its weights mapped from the file; loading it by copy", source, kept)
        return None
    log.debug("%s: %d MB of weights packed from the file, not copied", source, mapped >> 20)
    return built


def _build(
    graph: bytes, path: Path, options: Callable[[], ort.SessionOptions], providers: Sequence[Any]
) -> ort.InferenceSession:
    """The session of the mapped graph: a large one cut in two (graph_split.py) and its halves built at once on two
    threads where there are two cores for them, else whole."""

    def build(model: bytes) -> ort.InferenceSession:
        opts = options()
        opts.add_session_config_entry(FOLDER_KEY, str(path.parent))
        return ort.InferenceSession(model, sess_options=opts, providers=list(providers))

    halves = None
    if cores() >= 2:
        try:
            halves = graph_split.split(graph)
        except Exception as e:  # a graph the walk does not follow (or a fault in the cut): it is built whole
            log.info("%s: not cut in two (%s)", path, e)
    if halves is None:
        return build(graph)
    try:
        built = _build_halves(halves, build)
        log.debug("%s: built as two halves at once (%d tensors passed between them)", path, len(halves.crossing))
        return built
    except Exception as e:  # ONNX Runtime raises its own types: the whole graph gives the error, if it has one
        log.info("%s: its halves failed to build (%s); building it whole", path, e)
        return build(graph)


def _build_halves(halves: graph_split.Halves, build: Callable[[bytes], ort.InferenceSession]) -> ort.InferenceSession:
    """The second half built on a thread started here, the first on this one. A thread, not a pool's: Linux threads
    take their creator's nice value, and so do the ONNX Runtime threads of the session each one builds (priority.py)."""
    second: list[ort.InferenceSession | Exception] = []

    def build_second() -> None:
        try:
            second.append(build(halves.second))
        except Exception as e:  # raised by this thread, once the first half is built
            second.append(e)

    helper = threading.Thread(target=build_second, name="build-half", daemon=True)
    helper.start()
    try:
        first = build(halves.first)
    finally:
        helper.join()
    if isinstance(second[0], Exception):
        raise second[0]
    return graph_split.Chain(first, second[0])


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def walk_file(fd: int, name: str) -> tuple[bytes, int]:
    """graph_with_mapped_weights of an open file, mapped for the walk and unmapped after it. A file the walk cannot
    take raises ValueError with the walk's reason (its traceback, which holds a view of the mapping, let go first:
    closing the mapping under it raised BufferError instead)."""
    with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as buf:
        try:
            _random_access(buf)
            return graph_with_mapped_weights(buf, name)
        except (ValueError, IndexError) as e:
            failed = ValueError(str(e) or type(e).__name__)
    raise failed


def _random_access(buf: mmap.mmap) -> None:
    """The walk reads one tensor header after another across the file: told so, the kernel reads each header's
    page alone rather than the 128 KB around it (paged out, the ViT-B/16's walk took 59-100 ms instead of
    276-353 ms; README, "Memory and runtime settings")."""
    if hasattr(mmap, "MADV_RANDOM"):
        with contextlib.suppress(OSError):
            buf.madvise(mmap.MADV_RANDOM)


def graph_with_mapped_weights(buf: Buffer, location: str) -> tuple[bytes, int]:
    """The model's protobuf with each packable weight's bytes replaced by where they lie in the file (`location`,
    the file's name beside the graph), and how many bytes that is. Every other field is kept as written, copied
    once, and only if they come to at most MAX_GRAPH_BYTES (else ValueError, before anything is copied)."""
    walk = _Walk(buf)
    view = memoryview(buf)
    pieces: list[bytes | memoryview] = []
    graph: list[bytes | memoryview] = []
    mapped = kept = 0

    def keep(piece: bytes | memoryview, into: list[bytes | memoryview]) -> None:
        nonlocal kept
        kept += len(piece)
        if kept > MAX_GRAPH_BYTES:  # said as soon as it shows: the rest of the file is not walked for nothing
            raise ValueError(f"its graph keeps over {MAX_GRAPH_BYTES >> 20} MB in itself")
        into.append(piece)

    try:
        for f in walk.fields(0, len(buf)):
            if f.number != MODEL_GRAPH or f.wire != LENGTH_DELIMITED:
                keep(view[f.start : f.end], pieces)
                continue
            packable = _packable_inputs(walk, f.value, f.end)
            graph.clear()
            for g in walk.fields(f.value, f.end):
                tensor = _mapped_tensor(walk, g, location, packable) if g.number == GRAPH_INITIALIZER else None
                if tensor is None:
                    keep(view[g.start : g.end], graph)
                else:
                    keep(length_field(GRAPH_INITIALIZER, tensor[0]), graph)
                    mapped += tensor[1]
            size = sum(len(p) for p in graph)
            keep(encode_varint(MODEL_GRAPH << 3 | LENGTH_DELIMITED) + encode_varint(size), pieces)
            pieces.extend(graph)
        return b"".join(pieces), mapped
    finally:
        pieces.clear()  # the views into a mapped file go before the file is closed, an error's traceback or not
        graph.clear()
        view.release()


class _Walk:
    """The fields of one file, counted: a file with more than any model's graph has is not walked to its end at
    Python's pace (the ViT-B/16 image tower has about 15,000 in all)."""

    def __init__(self, buf: Buffer) -> None:
        self.buf = buf
        self.left = MAX_FIELDS

    def fields(self, start: int, end: int) -> Iterator[Field]:
        for f in fields(self.buf, start, end):
            self.left -= 1
            if self.left < 0:
                raise ValueError(f"more than {MAX_FIELDS} protobuf fields")
            yield f

    def messages(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """The length-delimited fields of one message, counted like the rest (a node's: onnx_walk.messages)."""
        found = messages(self.buf, start, end)
        self.left -= len(found)
        if self.left < 0:
            raise ValueError(f"more than {MAX_FIELDS} protobuf fields")
        return found

    def bytes(self, f: Field) -> bytes:
        return bytes(self.buf[f.value : f.end])


def _packable_inputs(walk: _Walk, start: int, end: int) -> set[bytes]:
    """Names used only as inputs that the CPU kernels pack (in the main graph; a subgraph's use is not seen
    here, and a weight it kept mapped is caught after the build)."""
    packed: set[bytes] = set()
    other: set[bytes] = set()
    for node in walk.fields(start, end):
        if node.number != GRAPH_NODE or node.wire != LENGTH_DELIMITED:
            continue
        inputs: list[bytes] = []
        op = domain = b""
        for number, value, end_ in walk.messages(node.value, node.end):
            if number == NODE_INPUT:
                inputs.append(walk.buf[value:end_])
            elif number == NODE_OP_TYPE:
                op = walk.buf[value:end_]
            elif number == NODE_DOMAIN:
                domain = walk.buf[value:end_]
        packs = PACKED_INPUT.get(op) if domain in (b"", b"ai.onnx") else None
        for i, name in enumerate(inputs):
            (packed if i == packs else other).add(name)
    return packed - other


def _mapped_tensor(walk: _Walk, tensor: Field, location: str, packable: set[bytes]) -> tuple[bytes, int] | None:
    """The TensorProto with its raw bytes replaced by their place in the file, or None to keep it as written."""
    kept = bytearray()
    raw: Field | None = None
    name = b""
    for f in walk.fields(tensor.value, tensor.end):
        if f.number in (TENSOR_EXTERNAL, TENSOR_LOCATION, TENSOR_SEGMENT):
            return None  # already external, or split in segments: left to ONNX Runtime
        if f.number == TENSOR_RAW and f.wire == LENGTH_DELIMITED:
            raw = f  # protobuf keeps the last of a repeated field: so does this
            continue
        if f.number == TENSOR_NAME and f.wire == LENGTH_DELIMITED:
            name = walk.bytes(f)
        kept += walk.buf[f.start : f.end]
    if raw is None or raw.end - raw.value < MIN_WEIGHT_BYTES or name not in packable:
        return None
    place = (("location", location), ("offset", str(raw.value)), ("length", str(raw.end - raw.value)))
    for key, value in place:
        kept += length_field(TENSOR_EXTERNAL, length_field(1, key.encode()) + length_field(2, value.encode()))
    kept += varint_field(TENSOR_LOCATION, EXTERNAL)
    return bytes(kept), raw.end - raw.value


def mappings_of(file: FileIdentity, name: str) -> int:
    """How many of this process's mappings are of that file, as /proc/self/maps lists them: its inode, on its device
    or under its name (on overlayfs a mapping may list the layer's device)."""
    if file is None:
        return 0
    dev, ino = file[0], str(file[1])
    device = f"{os.major(dev):02x}:{os.minor(dev):02x}"
    count = 0
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) >= 5 and parts[4] == ino:
                    pathname = parts[5].strip() if len(parts) == 6 else ""
                    count += parts[3] == device or pathname.removesuffix(" (deleted)").endswith("/" + name)
    except OSError:
        return 0
    return count
