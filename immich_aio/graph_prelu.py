"""PRelu with one slope per channel rewritten into convolutions the CPU runs in its blocked layout: an offline rewrite.

ArcFace recognisers (insightface's IResNet: buffalo_l's `w600k_r50`, antelopev2's `glintr100`) put a PRelu after the
first convolution of every residual block. ONNX Runtime's CPU provider runs convolutions in a blocked layout (NCHWc)
but has no PRelu for it, so each PRelu is a reorder out of that layout, the PRelu on plain NCHW (one thread's worth of
memory traffic) and a reorder back: on this project's 2-core machine 13 % of an IResNet-50's time.

    PRelu(y) = Relu(y) + (-a) * Relu(-y)

is exact, not only in real arithmetic: for y > 0 the second term is (-a) * 0 = 0 and Relu(y) = y; for y < 0,
Relu(y) = 0 and (-a) * (-y) is a * y with PRelu's own single rounding. Written as three depthwise 1x1 convolutions
without bias, by 1 and -1 (each with its Relu, which ONNX Runtime fuses into it) and by -a (which it fuses with the
final Add), every piece stays in the blocked layout. Measured (README, "Memory and runtime settings"): an
IResNet-50's packed copy ran in 0.88 of its time at batch 1 and 0.92 at batch 4; the price is memory, its three
values alive at once (a run's activations about 40 % larger), which the CPU's cap on faces per run keeps small.

Only a PRelu whose input comes from a 2-D convolution (or a batch normalisation right after one) is rewritten, so
that the input is NCHW with a known channel count C, and only with a constant float32 slope of C values shaped for
channels ([C, 1, 1] or [1, C, 1, 1]) or a single one. Graphs with subgraphs are left as they are.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from immich_aio.graph_fold import FreshNames, constants, has_subgraphs, prune_initializers


def rewrite_prelu(model: onnx.ModelProto) -> int:
    """Rewrite per-channel PRelu nodes as depthwise convolutions, in place; how many were."""
    graph = model.graph
    if has_subgraphs(graph):
        return 0
    init = constants(graph)
    producer = {out: node for node in graph.node for out in node.output}
    fresh = FreshNames(graph)

    def depthwise(x: str, weights: np.ndarray, out: str, stem: str) -> onnx.NodeProto:
        w = fresh(f"{stem}/w")
        graph.initializer.append(numpy_helper.from_array(weights.reshape(-1, 1, 1, 1).astype(np.float32), w))
        return helper.make_node(
            "Conv", [x, w], [out], name=fresh(f"{stem}/conv"), group=weights.size, kernel_shape=[1, 1]
        )

    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        slope = _slope(node, init, producer)
        if slope is None:
            nodes.append(node)
            continue
        stem = node.name or node.output[0]
        y, out = node.input[0], node.output[0]
        positive, negative, scaled = fresh(f"{stem}/pos"), fresh(f"{stem}/neg"), fresh(f"{stem}/scaled")
        pos_lin, neg_lin = fresh(f"{stem}/pos_linear"), fresh(f"{stem}/neg_linear")
        ones = np.ones(slope.size, np.float32)
        nodes += [
            depthwise(y, ones, pos_lin, stem),
            helper.make_node("Relu", [pos_lin], [positive], name=fresh(f"{stem}/relu")),
            depthwise(y, -ones, neg_lin, stem),
            helper.make_node("Relu", [neg_lin], [negative], name=fresh(f"{stem}/relu")),
            depthwise(negative, -slope, scaled, stem),
            helper.make_node("Add", [scaled, positive], [out], name=fresh(f"{stem}/add")),
        ]
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
        prune_initializers(graph)
    return count


def _slope(
    node: onnx.NodeProto, init: dict[str, onnx.TensorProto], producer: dict[str, onnx.NodeProto]
) -> np.ndarray | None:
    """The PRelu's slopes, one per channel of its NCHW input, when the node is one to rewrite; else None."""
    if node.op_type != "PRelu" or len(node.input) != 2 or len(node.output) != 1 or node.input[1] not in init:
        return None
    channels = _channels(producer.get(node.input[0]), init, producer)
    if channels is None:
        return None
    slope = numpy_helper.to_array(init[node.input[1]])
    if slope.dtype != np.float32 or not np.all(np.isfinite(slope)):
        return None
    if slope.size == 1 and slope.ndim <= 4:
        return np.full(channels, slope.reshape(()), np.float32)
    if slope.size == channels and slope.shape in ((channels, 1, 1), (1, channels, 1, 1)):
        return slope.reshape(channels)
    return None


def _channels(
    node: onnx.NodeProto | None, init: dict[str, onnx.TensorProto], producer: dict[str, onnx.NodeProto]
) -> int | None:
    """The channel count of a 2-D convolution's output (or of a batch normalisation right after one): an NCHW value
    whose channel count its constants say."""
    if node is None or len(node.output) != 1:
        return None
    if node.op_type == "BatchNormalization" and len(node.input) == 5 and node.input[1] in init:
        dims = list(init[node.input[1]].dims)
        before = _channels(producer.get(node.input[0]), init, {})  # one step back, to a convolution only
        return before if len(dims) == 1 and before == dims[0] else None
    if node.op_type == "Conv" and len(node.input) >= 2 and node.input[1] in init:
        dims = list(init[node.input[1]].dims)
        return int(dims[0]) if len(dims) == 4 and dims[0] > 0 else None
    return None
