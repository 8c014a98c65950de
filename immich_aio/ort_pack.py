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

Both start from the source graph rewritten for the CPU's kernels: its constant scales and shifts folded into its
convolutions (graph_fold.py; PP-OCR's detectors and recognisers run in about 0.8 of their time) and its per-channel
PRelus written as convolutions (graph_prelu.py; an ArcFace IResNet-50 in about 0.9), but only after this child has
run the rewritten graph beside the source's on the same inputs and found them equal; otherwise from the source as it
is. A CLIP image tower, which has nothing to fold, gets its last block's row-by-row work done for the one row its
output reads (graph_pool.py: a ViT-B/16 runs in about 0.95 of its time), on its mapped graph (mapped_load.py, so
the tower is not parsed whole here), and only where its outputs stay the source's to the bit. What was done is
written to `REWRITES`; `pack` reads the entry's and rewrites only when the entry's child did, so
that both copies hold one graph and a model with nothing to rewrite is not read twice.

Usage: python -m immich_aio.ort_pack entry SOURCE FOLDER | pack SOURCE FOLDER ENTRY
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort  # after the package's __init__, which turns ONNX Runtime's telemetry off

from immich_aio import mapped_load
from immich_aio.mapped_load import FOLDER_KEY

GRAPH, WEIGHTS = "model.onnx", "weights.bin"  # an entry's files (ort_cache.py)
READ_ORDER = "read-order.json"  # [[offset, length], ...] of WEIGHTS, in the order a session reads them
# {"folded": n, "prelu": p, "depthwise": d} or {"folded": 0, "why": ...}: what was rewritten in the source; n counts
# every rewritten node, p the PRelus and d the scales and shifts written as convolutions of their own among them;
# with "pooled": k when k nodes of an unfolded graph's tail take its output's row alone (graph_pool.py)
REWRITES = "rewrites.json"
FOLD_MAX_BYTES = 256 << 20  # a graph rewritten in memory is held several times over (an IResNet-50's 174 MB: 1.2 GB)
FREE_DIM = 64  # a free dimension's size when the folded graph is checked (a multiple of the detectors' stride)
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


def feeds(
    inputs: list[ort.NodeArg], batch: int, rng: np.random.Generator, free: int = FREE_DIM
) -> dict[str, np.ndarray]:
    """Random inputs at `batch`; other free dimensions at `free` (where the model allows them)."""
    out = {}
    for i in inputs:
        shape = (batch, *(d if isinstance(d, int) and d > 0 else free for d in i.shape[1:]))
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


def folded(source: Path) -> tuple[bytes | None, dict[str, object]]:
    """The source graph rewritten (its constant scales and shifts folded, graph_fold.py; its per-channel PRelus as
    convolutions, graph_prelu.py), if anything was and the rewritten graph computes what the source does; else
    None. The second value says which, for `REWRITES`.

    Checked on the values the rewritten nodes write as well as the graph's outputs: each is one the source computes
    under the same name, and comparing those (not only the outputs, which a detector's sigmoid can flatten on random
    inputs) catches a wrong rewrite anywhere in the graph."""
    import onnx

    from immich_aio.graph_fold import fold_affine
    from immich_aio.graph_prelu import rewrite_prelu

    if source.stat().st_size > FOLD_MAX_BYTES:
        return None, {"folded": 0, "why": "too large to fold in memory"}
    try:
        model = onnx.load(str(source), load_external_data=False)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            return None, {"folded": 0, "why": "weights in external files"}
        computed = {name for node in model.graph.node for name in node.output}  # the source's values, by name
        ends = {o.name for o in model.graph.output}
        prelu_outputs = {n.output[0] for n in model.graph.node if n.op_type == "PRelu" and n.output}
        affine = fold_affine(model)
        prelu = rewrite_prelu(model)
        count = affine.nodes + prelu
        if count == 0:
            return None, {"folded": 0, "why": "nothing to fold"}
        data = model.SerializeToString()
        inner = [
            n.output[0]
            for n in model.graph.node
            if (n.op_type == "Conv" or n.output[0] in prelu_outputs) and n.output[0] in computed - ends
        ]
        # Each graph is held as a protobuf only until it is bytes (a face recogniser's 174 MB, several times over)
        model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in inner)
        rewritten_bytes = model.SerializeToString()
        del model
        probe = onnx.load(str(source), load_external_data=False)  # the source again, only for a graph that folded
        probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in inner)
        source_bytes = probe.SerializeToString()
        del probe
        why = disagreement(source_bytes, rewritten_bytes)
        del source_bytes, rewritten_bytes
    except Exception as e:  # a graph onnx or the fold cannot take is saved as ONNX Runtime optimises it, unfolded
        why = f"could not be folded ({type(e).__name__}: {str(e)[:200]})"
    if why is not None:
        print(f"not folded: {why}", file=sys.stderr)
        return None, {"folded": 0, "why": why}
    return data, {"folded": count, "prelu": prelu, "depthwise": affine.depthwise}


def pooled(source: Path) -> tuple[bytes | None, int]:
    """The source's mapped graph (mapped_load.py: its weights where they lie in the source file) with the row-by-row
    work before its output's Gather of row 0 taking that row alone (graph_pool.py), and how many nodes do, where
    there are such nodes and the outputs stay the source's to the bit; else None."""
    import onnx

    from immich_aio.graph_pool import pool_tail

    try:
        graph = _mapped_graph(source)
        model = onnx.load_from_string(graph)
        count = pool_tail(model)
        if not count:
            return None, 0
        rewritten = model.SerializeToString()
        del model
        why = inexact(source, rewritten)
    except Exception as e:  # a graph the walk or the rewrite cannot take is saved as it is
        why = f"could not be rewritten ({type(e).__name__}: {str(e)[:200]})"
    if why is not None:
        print(f"not pooled: {why}", file=sys.stderr)
        return None, 0
    return rewritten, count


def _mapped_graph(source: Path) -> bytes:
    """mapped_load's graph of the file, its weights referred to where they lie (ValueError where the walk cannot
    take it: a text tower's word table kept in the graph is over its limit)."""
    path = source.resolve()  # the weights are referred to beside the real file (FOLDER_KEY: its folder)
    with open(path, "rb") as f:
        return mapped_load.walk_file(f.fileno(), path.name)[0]


def inexact(source: Path, rewritten: bytes) -> str | None:
    """Why the rewritten mapped graph's outputs are not the source's to the bit (batches 1 and 2 where the batch is
    free), or None."""
    outputs: list[list[np.ndarray]] = []
    for model in (str(source), rewritten):  # one session at a time, each let go before the next
        opts = options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        opts.add_session_config_entry(FOLDER_KEY, str(source.resolve().parent))
        session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        inputs = session.get_inputs()
        batches = (1, 2) if not isinstance(inputs[0].shape[0], int) else (1,)
        outputs.append([o for b in batches for o in session.run(None, feeds(inputs, b, np.random.default_rng(b)))])
        del session
    for i, (want, got) in enumerate(zip(*outputs, strict=True)):
        if want.shape != got.shape or not np.array_equal(want, got):
            return f"output {i} differs from the source's"
    return None


def disagreement(source: bytes, rewritten: bytes) -> str | None:
    """Why the rewritten graph's outputs are not the source's (batch 1, free dimensions FREE_DIM), or None.

    Random inputs drive some models where their outputs are tiny and touchy (a text detector's probabilities near
    1e-6 move by 5 % between ONNX Runtime's optimised and unoptimised runs of the same file), so the rewritten graph
    may differ from the source as much as ONNX Runtime's own optimisations make it differ, and no more."""
    levels = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    outputs: list[list[np.ndarray]] = []
    try:
        # one session at a time, each let go before the next: a face recogniser's three held at once took 2 GB
        for graph, level in ((source, levels[0]), (source, levels[1]), (rewritten, levels[0])):
            session = ort.InferenceSession(graph, options(level), providers=["CPUExecutionProvider"])
            sample = feeds(session.get_inputs(), 1, np.random.default_rng(0))
            outputs.append([np.asarray(o) for o in session.run(None, sample)])
            del session
    except Exception as e:  # ONNX Runtime raises its own types: a graph it cannot run is not used
        return f"the folded graph could not be run beside the source ({type(e).__name__})"
    for i, (want, unoptimised, got) in enumerate(zip(*outputs, strict=True)):
        if not agree(want, got, unoptimised):
            return f"output {i} differs from the source's"  # the graph's outputs first, then the convolutions'
    return None


def agree(want: np.ndarray, got: np.ndarray, unoptimised: np.ndarray | None = None) -> bool:
    """`got` is `want` up to float rounding: within 1e-4 of the output's largest magnitude, or within four times
    what ONNX Runtime's optimisations alone moved it (`unoptimised`: the same graph run unoptimised)."""
    if want.shape != got.shape or want.dtype != got.dtype:
        return False
    if not np.issubdtype(want.dtype, np.floating):
        return bool(np.array_equal(want, got))
    finite = np.isfinite(want)
    if not np.array_equal(finite, np.isfinite(got)) or not finite.any():
        return bool(np.array_equal(finite, np.isfinite(got)))
    want64 = want[finite].astype(np.float64)
    noise = 0.0
    if unoptimised is not None and unoptimised.shape == want.shape and np.isfinite(unoptimised[finite]).all():
        noise = float(np.abs(want64 - unoptimised[finite]).max())
    return float(np.abs(want64 - got[finite]).max()) <= max(1e-4 * float(np.abs(want64).max()), 4 * noise)


def entry_said(entry: Path) -> dict[str, object] | None:
    """What the entry's child did to the graph (`REWRITES`), if it says so readably."""
    try:
        said = json.loads((entry / REWRITES).read_text())
    except (OSError, ValueError):
        return None
    return said if isinstance(said, dict) and isinstance(said.get("folded"), int) else None


def main(argv: list[str]) -> int:
    mode, source, folder = argv[0], Path(argv[1]), Path(argv[2])
    said = entry_said(Path(argv[3])) if mode == "pack" and len(argv) > 3 else None
    if said is not None and said["folded"] == 0:
        # the entry's child found nothing to fold (or no fold it could use): the packed copy is made from the same
        # graph without parsing and checking it again (a face recogniser: 0.8 s and 330 MB of this child's memory)
        rewritten, rewrites = None, said
    else:  # a folded entry: its packed copy must be the same folded graph, checked again here
        rewritten, rewrites = folded(source)
    saving_opts = saving(options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL), folder, packed=mode == "pack")
    if rewritten is None and (said is None or said.get("pooled")):  # the entry's packed copy: its graph again
        rewritten, count = pooled(source)
        if count:
            rewrites = {**rewrites, "pooled": count}
            saving_opts.add_session_config_entry(FOLDER_KEY, str(source.resolve().parent))  # weights: the source's
        elif said is not None:
            print("not packed: the entry's pooled graph could not be made again", file=sys.stderr)
            return EXIT_DISAGREES
    model = rewritten if rewritten is not None else str(source)
    reference = ort.InferenceSession(model, saving_opts, providers=["CPUExecutionProvider"])  # saves it
    del rewritten, model
    (folder / REWRITES).write_text(json.dumps(rewrites) + "\n")
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


def first_to_go() -> None:
    """Offer this child to the kernel's OOM killer before anything else, the server beside it above all: a rewrite
    holds a face recogniser's graph several times over (1.2 GB for a 174 MB IResNet-50)."""
    with contextlib.suppress(OSError):  # not Linux, or no /proc: nothing to offer
        Path("/proc/self/oom_score_adj").write_text("1000\n")


def idle_priority() -> None:
    """Run only on CPU time the server leaves unused (Linux SCHED_IDLE; elsewhere the lowest nice)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


if __name__ == "__main__":
    idle_priority()
    first_to_go()
    sys.exit(main(sys.argv[1:]))
