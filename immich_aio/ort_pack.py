"""The child process that writes the optimised-model cache's copies (ort_cache.py), beside the server.

`entry`: the optimised graph with its weights in a file of their own, as ONNX Runtime saves it. Written here, at
idle priority once the server is quiet, rather than while a request waits for its model: on a busy disk that
write made a first request 28 s long.

`pack`: the same with the weights as the CPU kernels repack them, which cuts a large model's load by about 40 % (a
ViT-B/16 from 0.40 to 0.24 s), but a saved graph of that kind has crashed the process that opened it (the
PP-OCRv6 recogniser, ONNX Runtime 1.31: SIGSEGV on its first run). So the server never makes or tries one itself:
this child saves the packed copy, opens it again, runs it at several batch sizes beside the session it was made
from, and exits 0 only if every output agrees. Only models whose sole free dimension is the batch are packed, so
those runs are the shapes the server will run.

Both also write the copy's read order (`READ_ORDER`): the ranges of its weights file in the order ONNX Runtime reads
them, which the server asks the kernel for ahead of a load (ort_cache.read_ahead).

Usage: python -m immich_aio.ort_pack entry|pack SOURCE FOLDER
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort  # after the package's __init__, which turns ONNX Runtime's telemetry off

GRAPH, WEIGHTS = "model.onnx", "weights.bin"  # an entry's files (ort_cache.py)
READ_ORDER = "read-order.json"  # [[offset, length], ...] of WEIGHTS, in the order a session reads them
BATCHES = (1, 2, 5)  # single, even and above the CPU batch size: the crash seen came at every shape
EXIT_DISAGREES = 3


def options(level: ort.GraphOptimizationLevel) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = 1  # beside a serving process: one core, at low priority
    opts.log_severity_level = 3
    return opts


def saving(opts: ort.SessionOptions, folder: Path, packed: bool) -> ort.SessionOptions:
    """`opts`, set so that its session saves the optimised graph into `folder` with the weights in a file of
    their own, and with `packed` the weights as the CPU kernels repack them too."""
    opts.optimized_model_filepath = str(folder / GRAPH)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", WEIGHTS)
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    if packed:
        opts.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    return opts


def batch_only(inputs: list[ort.NodeArg]) -> bool:
    """Whether every input's shape is fixed but for its first (batch) dimension."""
    return fixed_but_batch([i.shape for i in inputs])


def fixed_but_batch(shapes: list[list[object]]) -> bool:
    """The rule itself, on shapes as lists of dimensions (an int when fixed): the benchmark reads them from a graph."""
    return all(len(shape) >= 1 and all(isinstance(d, int) and d > 0 for d in shape[1:]) for shape in shapes)


def feeds(inputs: list[ort.NodeArg], batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for i in inputs:
        shape = (batch, *i.shape[1:])
        if "float16" in i.type:
            out[i.name] = rng.standard_normal(shape).astype(np.float16)
        elif "float" in i.type:
            out[i.name] = rng.standard_normal(shape).astype(np.float32)
        else:  # token ids, masks: zeros are valid for every vocabulary
            out[i.name] = np.zeros(shape, np.int32 if "int32" in i.type else np.int64)
    return out


def read_order(folder: Path) -> list[tuple[int, int]]:
    """The weights file's ranges in the order ONNX Runtime reads them: every initializer as stored while the session
    is built (it reads those of packed weights too), then the packed weights, which the first run reads.

    Measured on a ViT-B/16's packed copy paged out (2 cores): asked for in this order the load and first run took
    0.62 s (median of 8), asked for as one whole-file read-ahead 0.83 s, as in the page cache 0.54-0.58 s.
    The packed weights' place is read from ONNX Runtime's own notes in the graph ("prepacked_*" entries of
    external data: "kernel|offset;length;..."); a note it words otherwise is skipped, and the server asks for
    the whole file after these ranges anyway."""
    import onnx  # here, not at the top: only this child needs it

    model = onnx.load(str(folder / GRAPH), load_external_data=False)
    built: list[tuple[int, int]] = []
    first_run: list[tuple[int, int]] = []
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        if info.get("location") != WEIGHTS or "length" not in info:
            continue
        built.append((int(info.get("offset", "0")), int(info["length"])))
        for key, value in info.items():
            if key.startswith("prepacked"):
                for part in value.split("|")[1:]:
                    fields = part.split(";")
                    if len(fields) >= 2 and fields[0].isdigit() and fields[1].isdigit():
                        first_run.append((int(fields[0]), int(fields[1])))
    return sorted(built) + sorted(first_run)


def write_read_order(folder: Path) -> None:
    (folder / READ_ORDER).write_text(json.dumps(read_order(folder)) + "\n")


def main(argv: list[str]) -> int:
    mode, source, folder = argv[0], Path(argv[1]), Path(argv[2])
    saving_opts = saving(options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL), folder, packed=mode == "pack")
    reference = ort.InferenceSession(str(source), saving_opts, providers=["CPUExecutionProvider"])  # saves it
    write_read_order(folder)
    if mode == "entry":
        return 0
    if not batch_only(reference.get_inputs()):
        print("not packed: an input has a free dimension other than the batch", file=sys.stderr)
        return EXIT_DISAGREES
    reopened = ort.InferenceSession(
        str(folder / GRAPH), options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    for batch in BATCHES:
        sample = feeds(reference.get_inputs(), batch, rng)
        for want, got in zip(reference.run(None, sample), reopened.run(None, sample), strict=True):
            if want.shape != got.shape or not np.allclose(want, got, rtol=1e-4, atol=1e-5):
                print(f"not packed: its outputs differ at batch {batch}", file=sys.stderr)
                return EXIT_DISAGREES
    return 0


def idle_priority() -> None:
    """Run only on CPU time the server leaves unused (Linux SCHED_IDLE; elsewhere the lowest nice)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


if __name__ == "__main__":
    idle_priority()
    sys.exit(main(sys.argv[1:]))
