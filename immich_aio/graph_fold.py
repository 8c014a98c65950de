"""Constant scales and shifts folded into the convolutions beside them: an offline rewrite of a model's graph.

PP-OCR's PP-LCNet backbones (every PP-OCRv5 and v6 detector and recogniser) follow each convolution with a learnable
affine block, `x * s + b` with a constant scalar s and b, once before the activation and once after it. ONNX
Runtime's own fusions leave them (the constant comes first in the `Mul`, and a scalar is not a per-channel weight to
them), so each is two more passes over a full feature map, and they break the CPU kernels' blocked (NCHWc) layout
into reorders around them: a third of the PP-OCRv5 detector's time on this project's 2-core machine.

Three rewrites, all exact in real arithmetic (float results move by rounding only, checked where they are used):
- forward: a `Conv` whose output only feeds a `Mul` or `Add` by a constant (a scalar or one value per output
  channel) takes it into its weights and bias: `(W*x + B) * s + b = (s*W)*x + (s*B + b)`;
- backward: a `Mul` or `Add` by a scalar constant after an activation, whose output only feeds convolutions
  without padding, goes into them: `W*(s*x + b) + B = (s*W)*x + (B + b*sum(W))`. With zero padding the border would
  see `b` where the original saw 0, so padded convolutions are left alone;
- depthwise: a scale or shift after an activation that went into neither (it feeds a padded convolution: PP-LCNet's
  depthwise 3×3 and 5×5) becomes a depthwise 1×1 convolution of its own, one weight per channel, and the shift after
  it then folds forward into that. ONNX Runtime runs such a convolution in the blocked layout, so the reorders out
  of it and back, and the two passes of the `Mul` and `Add`, become one pass that stays blocked.

Measured on this machine (ONNX Runtime 1.31, 2 threads; README, "Memory and runtime settings"): the PP-OCRv5 mobile
detector at 736×992 and its recogniser at 5×48×320 run in about 0.79 of their time, outputs within 4e-6, by the first
two rewrites; the third took another 4 % off the detector and 13 % off the recogniser (at 8×48×320).
Graphs with subgraphs (`If`, `Loop`, `Scan`) or anything but float32 convolutions are left as they are.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, NamedTuple

import numpy as np
import onnx
from onnx import numpy_helper

FOLDABLE = ("Mul", "Add")
# What a scale or shift folded backward may follow: an activation (PP-LCNet's affine block after it), or another
# scale or shift by a constant in the same chain. After anything else it may be the tail of a pattern ONNX Runtime
# fuses itself (GELU ends in `Mul(0.5)`): taken away, PP-OCRv6's GELUs stayed unfused and it ran 15 % slower.
ACTIVATIONS = frozenset({"Relu", "HardSwish", "HardSigmoid", "Sigmoid", "Clip", "LeakyRelu", "Tanh", "Softplus"})


class Folded(NamedTuple):
    """What `fold_affine` did: the `Mul`/`Add` nodes that went (folded, or now a convolution of their own), and how
    many of them are now depthwise convolutions of their own."""

    nodes: int
    depthwise: int


def fold_affine(model: onnx.ModelProto, *, depthwise: bool = True) -> Folded:
    """Fold constant scales and shifts into convolutions, in place (and, with `depthwise`, write the ones that fold
    nowhere as depthwise 1×1 convolutions)."""
    graph = model.graph
    if has_subgraphs(graph):
        return Folded(0, 0)
    folder = _Folder(graph)
    folder.drop_identities()
    return folder.run(depthwise)


def has_subgraphs(graph: onnx.GraphProto) -> bool:
    """Whether a node holds a subgraph (`If`, `Loop`, `Scan`): it may read any outer name, so renaming values under it
    is not worth the risk, and this module's rewrites and graph_prelu.py's leave such graphs alone."""
    kinds = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return any(a.type in kinds for n in graph.node for a in n.attribute)


def constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """The initializers a rewrite may treat as constants. One that is also a graph input is only a default: a caller
    may feed another value (ONNX Runtime's own constant folding leaves those too)."""
    fed = {i.name for i in graph.input}
    return {t.name: t for t in graph.initializer if t.name not in fed}


def prune_initializers(graph: onnx.GraphProto) -> None:
    """Drop the initializers no node reads any more (a rewrite's replaced weights); graph inputs' defaults stay."""
    used = {x for n in graph.node for x in n.input} | {o.name for o in graph.output} | {i.name for i in graph.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


class FreshNames:
    """New value, initializer and node names that collide with none of the graph's."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.taken = {t.name for t in graph.initializer} | {x for n in graph.node for x in (*n.input, *n.output)}
        self.taken |= {n.name for n in graph.node}
        self.made = 0

    def __call__(self, stem: str) -> str:
        while True:
            self.made += 1
            name = f"{stem}_{self.made}"
            if name not in self.taken:
                self.taken.add(name)
                return name


class _Folder:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.init = constants(graph)
        self.outputs = {o.name for o in graph.output}
        self._fresh = FreshNames(graph)
        self.arrays: dict[str, np.ndarray] = {}

    def _array(self, name: str) -> np.ndarray:
        """An initializer's value, converted once (a convolution's weights are looked at in every pass)."""
        if name not in self.arrays:
            self.arrays[name] = numpy_helper.to_array(self.init[name])
        return self.arrays[name]

    def drop_identities(self) -> None:
        """Identity nodes between a convolution and its affine block (exporters put them there) hide the pattern."""
        alias: dict[str, str] = {}
        kept = []
        for node in self.graph.node:
            if node.op_type == "Identity" and node.output[0] not in self.outputs:
                alias[node.output[0]] = node.input[0]
            else:
                kept.append(node)
        if not alias:
            return
        for node in kept:
            for i, name in enumerate(node.input):
                while name in alias:
                    name = alias[name]
                node.input[i] = name
        del self.graph.node[:]
        self.graph.node.extend(kept)

    def run(self, depthwise: bool) -> Folded:
        """Passes over the nodes until one folds nothing (three for PP-LCNet's chains): linear in the graph's size
        per pass, the maps of who reads and writes each value kept up to date as nodes go. Only then are the scales
        and shifts left written as convolutions (a scale that a later pass could still fold is not one to keep), and
        the passes run again to fold the shifts after them."""
        nodes = list(self.graph.node)
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in nodes:
            for name in node.input:
                self.consumers[name].append(node)
            for name in node.output:
                self.producer[name] = node
        gone: set[int] = set()
        self._passes(nodes, gone)
        made = 0
        if depthwise:
            made = sum(1 for node in nodes if id(node) not in gone and self._as_depthwise(node))
            if made:
                self._passes(nodes, gone)
        if gone:
            kept_nodes = [n for n in nodes if id(n) not in gone]
            del self.graph.node[:]
            self.graph.node.extend(kept_nodes)
        if gone or made:
            prune_initializers(self.graph)
        return Folded(len(gone) + made, made)

    def _passes(self, nodes: list[onnx.NodeProto], gone: set[int]) -> None:
        """Fold forward and backward until a pass folds nothing; what went is added to `gone`."""
        while True:
            before = len(gone)
            for node in nodes:
                if id(node) in gone:
                    continue
                if node.op_type == "Conv":
                    while (folded := self._forward(node)) is not None:
                        gone.add(id(folded))
                elif node.op_type in FOLDABLE and self._backward(node):
                    gone.add(id(node))
            if len(gone) == before:
                break

    def _forward(self, conv: onnx.NodeProto) -> onnx.NodeProto | None:
        """The `Mul`/`Add` folded into this convolution, or None."""
        out = conv.output[0]
        after = self.consumers.get(out, [])
        if out in self.outputs or len(after) != 1 or after[0].op_type not in FOLDABLE:
            return None
        node = after[0]
        if (weights := self._weights(conv)) is None or not self._fold_forward(conv, weights, node):
            return None
        del self.consumers[out]
        self._forget_reads(node)
        self.producer.pop(out, None)
        self.producer[conv.output[0]] = conv
        return node

    def _backward(self, node: onnx.NodeProto) -> bool:
        """Whether this `Mul`/`Add` went into the convolutions after it."""
        out = node.output[0]
        after = list(self.consumers.get(out, []))
        if out in self.outputs or not after or not self._after_activation(node) or not self._fold_backward(node, after):
            return False
        del self.consumers[out]
        self._forget_reads(node)
        self.consumers[node.input[0] if node.input[0] not in self.init else node.input[1]].extend(after)
        self.producer.pop(out, None)
        return True

    def _as_depthwise(self, node: onnx.NodeProto) -> bool:
        """Whether this `Mul`/`Add` by a scalar after an activation is now a depthwise 1×1 convolution (the node
        itself, rewritten in place: its output and readers stay)."""
        if node.op_type not in FOLDABLE or node.output[0] in self.outputs or not self._after_activation(node):
            return False
        split = self._constant_operand(node)
        if split is None or split[0].size != 1 or split[0].ndim > 4:
            return False  # more dimensions would broadcast the NCHW value to a larger one
        value, source = split
        if (channels := self._channels(source)) is None:
            return False
        scalar = np.float32(value.reshape(()))
        scale = np.full(channels, scalar if node.op_type == "Mul" else 1.0, np.float32)
        shift = np.full(channels, 0.0 if node.op_type == "Mul" else scalar, np.float32)
        self._forget_reads(node)
        node.op_type = "Conv"
        del node.input[:]
        node.input.extend([source, "", ""])
        self._set_weights(node, scale.reshape(channels, 1, 1, 1), shift)
        node.attribute.extend(
            [onnx.helper.make_attribute("group", channels), onnx.helper.make_attribute("kernel_shape", [1, 1])]
        )
        self.consumers[source].append(node)
        return True

    def _channels(self, name: str) -> int | None:
        """The channel count of an NCHW value made by a 2-D convolution, through the activations, batch
        normalisations and scalar scales and shifts after it (none changes the shape); None when not so."""
        for _ in range(16):
            node = self.producer.get(name)
            if node is None or len(node.output) != 1:
                return None
            if node.op_type == "Conv":
                weights = self._weights(node)
                return int(weights[0].shape[0]) if weights is not None and weights[0].ndim == 4 else None
            if node.op_type in ACTIVATIONS or node.op_type == "BatchNormalization":
                name = node.input[0]
            elif node.op_type in FOLDABLE and (split := self._constant_operand(node)) and split[0].size == 1:
                name = split[1]
            else:
                return None
        return None

    def _forget_reads(self, node: onnx.NodeProto) -> None:
        for name in node.input:
            readers = self.consumers.get(name)
            if readers is not None:
                readers[:] = [r for r in readers if r is not node]

    def _fold_forward(self, conv: onnx.NodeProto, weights: tuple[np.ndarray, np.ndarray], node: onnx.NodeProto) -> bool:
        if (split := self._constant_operand(node)) is None:
            return False
        value, _ = split
        w, b = weights
        if value.ndim > w.ndim:
            return False  # broadcasting would add dimensions to the convolution's output
        shape = (1,) * (w.ndim - value.ndim) + value.shape
        channels = w.shape[0]
        if all(d == 1 for d in shape):
            per_channel = np.full(channels, value.reshape(()), np.float32)
        elif shape == (1, channels) + (1,) * (w.ndim - 2):
            per_channel = value.reshape(channels)
        else:
            return False
        if node.op_type == "Mul":
            w = w * per_channel.reshape(-1, *([1] * (w.ndim - 1)))
            b = b * per_channel
        else:
            b = b + per_channel
        self._set_weights(conv, w, b)
        conv.output[0] = node.output[0]
        return True

    def _fold_backward(self, node: onnx.NodeProto, convs: list[onnx.NodeProto]) -> bool:
        split = self._constant_operand(node)
        if split is None or split[0].size != 1:
            return False
        value, source = split
        targets = []
        for conv in convs:
            weights = self._weights(conv)
            if conv.op_type != "Conv" or weights is None or conv.input[0] != node.output[0] or _padded(conv):
                return False
            targets.append((conv, weights))
        scalar = float(value.reshape(()))
        for conv, (w, b) in targets:
            if node.op_type == "Mul":
                w = w * np.float32(scalar)
            else:
                b = b + np.float32(scalar) * w.reshape(w.shape[0], -1).sum(axis=1, dtype=np.float64).astype(np.float32)
            self._set_weights(conv, w, b)
            conv.input[0] = source
        return True

    def _after_activation(self, node: onnx.NodeProto) -> bool:
        """Whether the node follows an activation, directly or through other scales and shifts by constants."""
        seen = 0
        while (split := self._constant_operand(node)) is not None and split[1] in self.producer and seen < 16:
            node, seen = self.producer[split[1]], seen + 1
            if node.op_type in ACTIVATIONS:
                return True
            if node.op_type not in FOLDABLE:
                return False
        return False

    def _constant_operand(self, node: onnx.NodeProto) -> tuple[np.ndarray, str] | None:
        """A two-input node's float32 constant and its other (computed) input, or None."""
        if len(node.input) != 2 or len(node.output) != 1:
            return None
        constant = [x for x in node.input if x in self.init]
        computed = [x for x in node.input if x not in self.init]
        if len(constant) != 1 or len(computed) != 1:
            return None
        value = self._array(constant[0])
        if value.dtype != np.float32 or not np.all(np.isfinite(value)):
            return None
        return value, computed[0]

    def _weights(self, conv: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
        """A convolution's constant float32 weights and bias (zeros when it has none), or None."""
        if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in self.init:
            return None
        w = self._array(conv.input[1])
        if w.dtype != np.float32 or w.ndim < 3:
            return None
        if len(conv.input) > 2 and conv.input[2]:
            if conv.input[2] not in self.init:
                return None
            b = self._array(conv.input[2])
            if b.dtype != np.float32 or b.shape != (w.shape[0],):
                return None
        else:
            b = np.zeros(w.shape[0], np.float32)
        return w, b

    def _set_weights(self, conv: onnx.NodeProto, w: np.ndarray, b: np.ndarray) -> None:
        """New initializers (the old ones may be shared with other nodes)."""
        names = []
        for part, array in (("W", w), ("B", b)):
            name = self._fresh(f"{conv.name or conv.output[0]}/folded_{part}")
            self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name))
            self.init[name] = self.graph.initializer[-1]
            names.append(name)
        conv.input[1] = names[0]
        if len(conv.input) > 2:
            conv.input[2] = names[1]
        else:
            conv.input.append(names[1])


def _padded(conv: onnx.NodeProto) -> bool:
    attrs: dict[str, Any] = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    if auto_pad not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        return True
    return any(p != 0 for p in attrs.get("pads", ()))
