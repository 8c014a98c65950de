"""A CLIP tower's last row-by-row work done for the one row its output reads.

A tower's output is one token's row of its last block: the class token (`x[:, 0]` in the export, a Gather of index 0
on the token axis). The nodes before that Gather back to the last attention work row by row: the layer norms, the
MLP's MatMuls, its activation, the residual sums, Transposes. So they may take row 0 alone: a Gather of that row is
put on each tensor entering them, the rest of the graph unchanged. ONNX Runtime's MatMul and Gemm give each row the
same bits whatever the number of rows, so the outputs are the same to the bit, which ort_pack.py checks before a
saved copy is made from such a graph; a ViT-B/16's run takes about 0.95 of its time (README, "One CLIP request").

Which nodes: walking back from the Gather in the graph's (topological) order, a node joins when every reader of its
outputs has joined and it is one this module can follow row by row (`_row_inputs`): its other operands constants that
do not vary along the token axis, the token axis followed through Transposes and never an axis the node reduces,
normalises or contracts. A Shape node, a Reshape, an attention's mixing of rows or a second output stops the walk
where it reads. Ranks come from ONNX's shape inference; a graph it cannot follow is left as it is.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from immich_aio.graph_fold import constants
from immich_aio.graph_split import RANDOM_OPS

UNARY = frozenset(
    {"Abs", "Cast", "Elu", "Erf", "Exp", "Gelu", "HardSigmoid", "HardSwish", "Identity", "LeakyRelu", "Log", "Neg",
     "Reciprocal", "Relu", "Sigmoid", "Softplus", "Sqrt", "Tanh"}
)  # fmt: skip
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})
REDUCE = frozenset({"ReduceMean", "ReduceSum", "ReduceL2", "ReduceMax", "ReduceMin"})
WORTH = frozenset({"MatMul", "Gemm"})  # a tail without one saves nothing worth a rewrite
ROW = "immich_aio_pooled_row"  # the initializer [0] the inserted Gathers read


class _Graph:
    """What the walk reads of a model: makers, readers, constants with their shapes, ranks."""

    def __init__(self, model: Any) -> None:
        import onnx
        from onnx import numpy_helper

        graph = model.graph
        self.nodes = list(graph.node)
        self.outputs = {o.name for o in graph.output}
        self.readers: dict[str, list[int]] = {}
        self.made_by: dict[str, int] = {}
        for k, n in enumerate(self.nodes):
            for i in n.input:
                if i:
                    self.readers.setdefault(i, []).append(k)
            self.made_by.update((o, k) for o in n.output if o)
        self.shapes: dict[str, list[int | None]] = {}  # every tensor with a declared or inferred rank
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            t = v.type.tensor_type
            if t.HasField("shape"):
                self.shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        self.values: dict[str, np.ndarray | None] = {}  # constants: their value where it is inline, else None
        for t in constants(graph).values():  # not an initializer that is also an input: a caller may feed another
            self.shapes[t.name] = list(t.dims)
            inline = t.data_location != onnx.TensorProto.EXTERNAL and np.prod(t.dims) <= 64
            self.values[t.name] = numpy_helper.to_array(t) if inline else None
        for n in self.nodes:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                value = next((a.t for a in n.attribute if a.name == "value"), None)
                if value is not None:
                    self.shapes[n.output[0]] = list(value.dims)
                    self.values[n.output[0]] = numpy_helper.to_array(value) if np.prod(value.dims) <= 64 else None
            elif n.input and all(i in self.values for i in n.input if i) and n.op_type not in RANDOM_OPS:
                self.values.update((o, None) for o in n.output if o)  # made from constants alone: constant

    def constant(self, name: str) -> bool:
        return name in self.values

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _broadcasts_over(g: _Graph, name: str, axis: int, rank: int) -> bool:
    """Whether a constant operand is the same for every row along `axis` of a rank-`rank` result."""
    shape = g.shapes.get(name)
    if shape is None or len(shape) > rank:
        return False
    at = axis - (rank - len(shape))  # numpy's broadcasting aligns the shapes at their ends
    return at < 0 or shape[at] == 1


def _row_inputs(g: _Graph, node: Any, axis: int) -> dict[str, int] | None:
    """The computed inputs of `node` and their token axes when its output's token axis is `axis`, if the node works
    row by row along it; None otherwise."""
    if node.domain not in ("", "ai.onnx") or not node.output:
        return None
    rank = g.rank(node.output[0])
    if rank is None or not 0 <= axis < rank:
        return None
    op, inputs = node.op_type, [i for i in node.input if i]
    computed = [i for i in inputs if not g.constant(i)]
    if op in UNARY or op in BINARY or op == "Clip":
        if op == "Clip" and computed != [inputs[0]]:  # its bounds constants
            return None
        if any(g.rank(i) != rank for i in computed):
            return None
        if any(not _broadcasts_over(g, i, axis, rank) for i in inputs if g.constant(i)):
            return None
        return dict.fromkeys(computed, axis)
    if op == "MatMul":  # rows of a constant 2-D weight's product: every axis of A but its last is a row axis
        if len(inputs) != 2 or computed != [inputs[0]] or g.rank(inputs[1]) != 2 or g.rank(inputs[0]) != rank:
            return None
        return {inputs[0]: axis} if axis != rank - 1 else None
    if op == "Gemm":
        if _attr(node, "transA", 0) or computed != [inputs[0]] or axis != 0:
            return None
        if len(inputs) > 2 and not _broadcasts_over(g, inputs[2], 0, 2):
            return None
        return {inputs[0]: 0}
    if op == "LayerNormalization":
        if computed != [inputs[0]] or any(o and o in g.readers for o in node.output[1:]):
            return None
        return {inputs[0]: axis} if axis < _attr(node, "axis", -1) % rank else None
    if op == "Transpose":
        perm = list(_attr(node, "perm", list(range(rank))[::-1]))
        return {inputs[0]: perm[axis]} if computed == [inputs[0]] and len(perm) == rank else None
    if op in REDUCE:
        if computed != [inputs[0]] or not _attr(node, "keepdims", 1) or g.rank(inputs[0]) != rank:
            return None
        axes = _attr(node, "axes", None)
        if axes is None and len(inputs) > 1:
            value = g.values.get(inputs[1])
            axes = None if value is None else value.reshape(-1).tolist()
        if not axes or axis in [a % rank for a in axes]:
            return None  # every axis reduced (or not known which): not row by row
        return {inputs[0]: axis}
    if op in ("Softmax", "LogSoftmax"):
        return {inputs[0]: axis} if computed == [inputs[0]] and _attr(node, "axis", -1) % rank != axis else None
    return None


def _pool(g: _Graph, node: Any) -> tuple[str, int] | None:
    """The tensor and token axis of a Gather of row 0 (a scalar index), if `node` is one."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    data, index = node.input
    value = g.values.get(index)
    rank = g.rank(data)
    if g.constant(data) or value is None or value.shape != () or int(value) != 0 or rank is None:
        return None
    return data, _attr(node, "axis", 0) % rank


def pool_tail(model: Any) -> int:
    """Rewrite `model` (an onnx ModelProto, in place) so that the row-by-row work before its output's Gather of
    row 0 takes that row alone; the number of nodes that now do, 0 where nothing was rewritten."""
    import onnx

    g = _Graph(model)
    for p, pool_node in enumerate(g.nodes):
        found = _pool(g, pool_node)
        if found is None:
            continue
        tail, token = _tail(g, p, *found)
        if not any(g.nodes[k].op_type in WORTH for k in tail):
            continue
        frontier = sorted(
            {i for k in tail for i in g.nodes[k].input if i and not g.constant(i) and g.made_by.get(i) not in tail}
        )
        if any(g.rank(t) is None for t in frontier):
            continue
        before: dict[int, list[Any]] = {}
        renamed = {t: f"{t}/{ROW}" for t in frontier}
        for t in frontier:
            first = min(k for k in g.readers[t] if k in tail)
            gather = onnx.helper.make_node("Gather", [t, ROW], [renamed[t]], axis=token[t], name=f"{t}/{ROW}")
            before.setdefault(first, []).append(gather)
        for k in tail:
            node = g.nodes[k]
            for j, i in enumerate(node.input):
                if i in renamed:
                    node.input[j] = renamed[i]
        new_nodes = [n for k, node in enumerate(g.nodes) for n in [*before.get(k, []), node]]
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([0], np.int64), ROW))
        return len(tail)
    return 0


def _tail(g: _Graph, pool: int, data: str, axis: int) -> tuple[set[int], dict[str, int]]:
    """The nodes before node `pool` (which reads row 0 of `data` along `axis`) that may take that row alone, and the
    token axis of each tensor they read."""
    token = {data: axis}
    joined = {pool}  # the tail and the Gather that reads it
    start = g.made_by.get(data)
    if start is None:
        return set(), token
    for k in range(start, -1, -1):
        node = g.nodes[k]
        outs = [o for o in node.output if o and (o in g.readers or o in g.outputs)]
        if not outs or any(o not in token or o in g.outputs for o in outs):
            continue
        if any(r not in joined for o in outs for r in g.readers[o]) or len(outs) != 1:
            continue
        mapped = _row_inputs(g, node, token[outs[0]])
        if mapped is None or any(token.get(i, a) != a for i, a in mapped.items()):
            continue
        token.update(mapped)
        joined.add(k)
    return joined - {pool}, token
