"""A large model's graph cut in two, so that a first load builds its two halves' sessions at once, one per core.

Building an ONNX Runtime session is one thread's work: optimising the graph, then packing every weight for the CPU
kernels. On a first load of a file never seen (before ort_cache.py has saved its copy) that is most of a first
request: the ViT-B/16 image tower's mapped build (mapped_load.py) took 615-645 ms from the page cache, its two halves
built side by side 391-417 ms, and from a paged-out disk 708-769 against 506-574 ms, with the same outputs to the
bit and runs as fast (README, "Memory and runtime settings").

The cut falls between two nodes of the graph's (topological) order, near the middle of its weights, where at most
MAX_CROSSING computed tensors cross it. Each half is optimised by ONNX Runtime on its own, so the cut must leave both
with what the whole graph's optimiser would see:
- each tensor that crosses feeds two or more nodes: fusions take chains whose inner tensors feed one node each;
- the node that makes it could not be folded into the node before it (ONNX Runtime never folds away a node that makes
  a graph output, as it does in the first half): every computed input of that node feeds two or more nodes too, or it
  is a Cast to the type it already has (cn_clip's layer norms), a no-op whether kept or removed;
- no node that reads it is one ONNX Runtime's CPU layout (NCHWc) rewrites by where its input comes from (convolutions,
  batch norms, pooling): the tensor reaches the second half in plain layout, and an IResNet cut at a residual sum (its
  next block's batch norm and sum then computed apart from the convolutions) answered up to 4e-5 off;
- it is not made by a layer norm (fusions of what follows are found from these) or an operator of another domain;
- if it is computed from inputs of wholly fixed shape (an export with a fixed batch, as Immich's own are), the graph
  declares its shape dimension by dimension: ONNX Runtime knows every shape of such a whole graph, folds its Shape
  nodes and fuses its reshaped MatMuls into Gemms by them, and a second half told only the tensor's type does none of
  that (a CN-CLIP tower with its batch fixed at 1 answered 1.4e-6 off, with 30 more MatMuls unfused). With a dynamic
  batch, the whole graph knows no more than the half; the tests compare the two.
Constants the second half needs (initializers, `Constant` nodes and what is computed from them alone) are given to it
again rather than passed across. A graph with subgraphs (If, Loop, Scan), sparse initializers or no such cut is built
whole.

The graph is read and written at the protobuf level (onnx_walk.py), never parsed whole: its weights are already out of
it (external data at their place in the file), and importing the onnx package costs a server 0.8 s.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from immich_aio.onnx_walk import LENGTH_DELIMITED, fields, length_field, messages, varint, varint_field

log = logging.getLogger(__name__)

MIN_WEIGHT_BYTES = 64 << 20  # smaller models build in a tenth of a second or less: not worth a second thread
MAX_CROSSING = 4  # tensors passed from the first half to the second
BALANCE = (0.3, 0.7)  # the first half's share of the weights, where a cut may fall
RANDOM_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)
# Never the maker of a crossing tensor: fusions of what follows are found from these (attention after a layer norm)
ANCHORS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization"})
# ONNX's operators whose attributes are read: a Cast's type, a Constant's, and the only ones with subgraphs (any other
# domain's are read too)
READ_ATTRIBUTES = frozenset({"Cast", "Constant", "If", "Loop", "Scan", "SequenceMap"})
# Operators whose output has the element type of their first input: a tensor's type that the graph does not declare
# is worked out from these (any other maker leaves it unknown)
SAME_TYPE = frozenset(
    {"Abs", "Add", "AveragePool", "BatchNormalization", "Ceil", "Clip", "Concat", "Conv", "ConvTranspose", "Div",
     "Dropout", "Elu", "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather", "GatherElements", "Gelu", "Gemm",
     "GlobalAveragePool", "GlobalMaxPool", "HardSigmoid", "HardSwish", "Identity", "InstanceNormalization",
     "LayerNormalization", "LeakyRelu", "Log", "MatMul", "Max", "MaxPool", "Mean", "Min", "Mish", "Mul", "Neg", "Pad",
     "Pow", "PRelu", "Reciprocal", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum", "Relu", "Reshape", "Resize",
     "Round", "Selu", "Sigmoid", "Sign", "Slice", "Softmax", "Softplus", "Split", "Sqrt", "Squeeze", "Sub", "Sum",
     "Tanh", "Tile", "Transpose", "Unsqueeze"}
)  # fmt: skip
# Readers that ONNX Runtime rewrites on the CPU by the layout their input arrives in (NCHWc, from a convolution): a
# crossing tensor reaches the second half in plain layout, so they would run otherwise there
LAYOUT_READERS = frozenset(
    {"AveragePool", "BatchNormalization", "Conv", "ConvTranspose", "GlobalAveragePool", "GlobalMaxPool",
     "InstanceNormalization", "LpPool", "MaxPool", "Resize", "Upsample"}
)  # fmt: skip
# ONNX field numbers: ModelProto.graph; GraphProto; NodeProto; AttributeProto; TensorProto; ValueInfoProto/TypeProto
MODEL_GRAPH = 7
GRAPH_NODE, GRAPH_NAME, GRAPH_INITIALIZER, GRAPH_SPARSE = 1, 2, 5, 15
GRAPH_INPUT, GRAPH_OUTPUT, GRAPH_VALUE_INFO = 11, 12, 13
NODE_INPUT, NODE_OUTPUT, NODE_OP_TYPE, NODE_ATTRIBUTE, NODE_DOMAIN = 1, 2, 4, 5, 7
ATTR_NAME, ATTR_INT, ATTR_TENSOR, ATTR_GRAPH, ATTR_GRAPHS = 1, 3, 5, 6, 11
TENSOR_DATA_TYPE, TENSOR_NAME, TENSOR_RAW, TENSOR_EXTERNAL = 2, 8, 9, 13
VALUE_NAME, VALUE_TYPE, TYPE_TENSOR, TENSOR_TYPE_ELEM, TENSOR_TYPE_SHAPE = 1, 2, 1, 1, 2
SHAPE_DIM, DIM_VALUE = 1, 1


@dataclass(frozen=True)
class Halves:
    """The two halves' model bytes and the tensors the first hands to the second, in the first's output order."""

    first: bytes
    second: bytes
    crossing: tuple[str, ...]


@dataclass
class _Node:
    raw: bytes  # the node's field as written
    op: str = ""
    domain: str = ""
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    subgraph: bool = False
    cast_to: int = 0  # a Cast's `to`
    value_type: int = 0  # a Constant's tensor's element type


@dataclass
class _Graph:
    model_rest: list[bytes] = field(default_factory=list)  # the model's other fields, as written
    name: bytes = b""
    nodes: list[_Node] = field(default_factory=list)
    initializers: dict[str, tuple[bytes, int, int]] = field(default_factory=dict)  # field, bytes, element type
    inputs: dict[str, bytes] = field(default_factory=dict)  # ValueInfoProto payloads
    outputs: dict[str, bytes] = field(default_factory=dict)
    value_info: dict[str, bytes] = field(default_factory=dict)
    sparse: bool = False


def _text(buf: bytes, f: Any) -> str:
    return buf[f.value : f.end].decode("utf-8", "replace")


def _submessages(buf: bytes, start: int, end: int, number: int) -> Iterator[Any]:
    for f in fields(buf, start, end):
        if f.number == number and f.wire == LENGTH_DELIMITED:
            yield f


def _read(buf: bytes) -> _Graph | None:
    g = _Graph()
    graph = None
    for f in fields(buf, 0, len(buf)):
        if f.number == MODEL_GRAPH and f.wire == LENGTH_DELIMITED:
            graph = f
        else:
            g.model_rest.append(buf[f.start : f.end])
    if graph is None:
        return None
    for f in fields(buf, graph.value, graph.end):
        if f.wire != LENGTH_DELIMITED:
            continue
        if f.number == GRAPH_NODE:
            g.nodes.append(_node(buf, f))
        elif f.number == GRAPH_NAME:
            g.name = buf[f.start : f.end]
        elif f.number == GRAPH_INITIALIZER:
            name, size, elem = _tensor(buf, f.value, f.end)
            g.initializers[name] = (buf[f.start : f.end], size, elem)
        elif f.number in (GRAPH_INPUT, GRAPH_OUTPUT, GRAPH_VALUE_INFO):
            name = next((_text(buf, v) for v in _submessages(buf, f.value, f.end, VALUE_NAME)), "")
            target = {GRAPH_INPUT: g.inputs, GRAPH_OUTPUT: g.outputs, GRAPH_VALUE_INFO: g.value_info}[f.number]
            target[name] = buf[f.value : f.end]
        elif f.number == GRAPH_SPARSE:
            g.sparse = True
    return g


def _node(buf: bytes, f: Any) -> _Node:
    node = _Node(buf[f.start : f.end])
    attributes: list[tuple[int, int]] = []
    for number, start, end in messages(buf, f.value, f.end):
        if number == NODE_INPUT:
            node.inputs.append(buf[start:end].decode("utf-8", "replace"))
        elif number == NODE_OUTPUT:
            node.outputs.append(buf[start:end].decode("utf-8", "replace"))
        elif number == NODE_OP_TYPE:
            node.op = buf[start:end].decode("utf-8", "replace")
        elif number == NODE_DOMAIN:
            node.domain = buf[start:end].decode("utf-8", "replace")
        elif number == NODE_ATTRIBUTE:
            attributes.append((start, end))
    if node.domain in ("", "ai.onnx") and node.op not in READ_ATTRIBUTES:
        return node  # (walking every node's attributes was most of the time)
    for start, end in attributes:
        name = ""
        for x in fields(buf, start, end):
            if x.number == ATTR_NAME and x.wire == LENGTH_DELIMITED:
                name = _text(buf, x)
            elif x.number in (ATTR_GRAPH, ATTR_GRAPHS):
                node.subgraph = True
            elif x.number == ATTR_INT and x.wire == 0 and name == "to":
                node.cast_to = varint(buf, x.value)[0]
            elif x.number == ATTR_TENSOR and x.wire == LENGTH_DELIMITED:
                node.value_type = _tensor(buf, x.value, x.end)[2]
    return node


def _tensor(buf: bytes, start: int, end: int) -> tuple[str, int, int]:
    """A TensorProto's name, data size (its external length where it has one) and element type."""
    name, size, elem = "", 0, 0
    for f in fields(buf, start, end):
        if f.number == TENSOR_NAME and f.wire == LENGTH_DELIMITED:
            name = _text(buf, f)
        elif f.number == TENSOR_DATA_TYPE and f.wire == 0:
            elem = varint(buf, f.value)[0]
        elif f.number == TENSOR_RAW and f.wire == LENGTH_DELIMITED:
            size = f.end - f.value
        elif f.number == TENSOR_EXTERNAL and f.wire == LENGTH_DELIMITED:
            entry = {x.number: _text(buf, x) for x in fields(buf, f.value, f.end) if x.wire == LENGTH_DELIMITED}
            if entry.get(1) == "length" and entry.get(2, "").isdigit():
                size = int(entry[2])
    return name, size or end - start, elem


def _tensor_type(payload: bytes) -> int:
    """A ValueInfoProto's tensor element type (0: not declared)."""
    for t in _submessages(payload, 0, len(payload), VALUE_TYPE):
        for tt in _submessages(payload, t.value, t.end, TYPE_TENSOR):
            for e in fields(payload, tt.value, tt.end):
                if e.number == TENSOR_TYPE_ELEM and e.wire == 0:
                    return varint(payload, e.value)[0]
    return 0


def _static(payload: bytes) -> bool:
    """Whether a ValueInfoProto declares its tensor's shape with a number for every dimension."""
    for t in _submessages(payload, 0, len(payload), VALUE_TYPE):
        for tt in _submessages(payload, t.value, t.end, TYPE_TENSOR):
            for shape in _submessages(payload, tt.value, tt.end, TENSOR_TYPE_SHAPE):
                return all(
                    any(x.number == DIM_VALUE and x.wire == 0 for x in fields(payload, d.value, d.end))
                    for d in _submessages(payload, shape.value, shape.end, SHAPE_DIM)
                )
    return False


def split(graph_bytes: bytes) -> Halves | None:
    """The model cut in two as the module says, or None where it is not (too small, no cut, an unusual graph)."""
    g = _read(graph_bytes)
    if g is None or g.sparse or len(g.nodes) < 4 or any(n.subgraph for n in g.nodes):
        return None
    total = sum(size for _, size, _ in g.initializers.values())
    if total < MIN_WEIGHT_BYTES:
        return None
    nodes = g.nodes
    last = len(nodes)
    outputs = set(g.outputs)

    constant = set(g.initializers)  # the same in every run: initializers, Constant nodes, what is made from them
    made_by: dict[str, int] = {}
    for k, n in enumerate(nodes):
        used = [i for i in n.inputs if i]
        if n.op not in RANDOM_OPS and (n.op == "Constant" or (used and all(i in constant for i in used))):
            constant.update(o for o in n.outputs if o)
        made_by.update((o, k) for o in n.outputs if o)
    # Tensors computed from an input whose shape is not wholly fixed; the others ONNX Runtime knows the whole shape
    # of in the whole graph (and folds their Shape nodes, fuses their MatMuls into Gemms by it)
    varying = {name for name, v in g.inputs.items() if name not in g.initializers and not _static(v)}
    for n in nodes:
        if any(i in varying for i in n.inputs):
            varying.update(o for o in n.outputs if o)
    readers: dict[str, set[int]] = {}
    first_read: dict[str, int] = {}  # each initializer's
    for k, n in enumerate(nodes):
        for i in n.inputs:
            if i:
                readers.setdefault(i, set()).add(k)
                if i in g.initializers:
                    first_read.setdefault(i, k)

    def branches(name: str) -> bool:
        """Whether a tensor feeds two or more nodes (a graph output counts as one)."""
        return len(readers.get(name, ())) + (name in outputs) >= 2

    def may_cross(name: str) -> bool:
        maker = nodes[made_by[name]]
        return (
            branches(name)
            and (name in varying or _static(g.value_info.get(name, b"")))
            and not any(nodes[k].op in LAYOUT_READERS for k in readers.get(name, ()))
            and maker.domain in ("", "ai.onnx")
            and maker.op not in ANCHORS
            and (
                _no_op_cast(g, maker, made_by)
                or all(i in constant or i not in made_by or branches(i) for i in maker.inputs if i)
            )
        )

    # A tensor made at node p and last read at node q (a graph output: after the last node) crosses every cut k
    # (the first half: nodes[:k]) with p < k <= q; counted for all cuts at once, and apart for those that may not
    crossing = np.zeros(last + 2, dtype=np.int64)
    barred = np.zeros(last + 2, dtype=np.int64)
    for name, p in made_by.items():
        if name in constant:
            continue
        q = last if name in outputs else max(readers.get(name, ()), default=-1)
        if q <= p:
            continue
        crossing[p + 1] += 1
        crossing[q + 1] -= 1
        if not may_cross(name):
            barred[p + 1] += 1
            barred[q + 1] -= 1
    crossing, barred = np.cumsum(crossing), np.cumsum(barred)
    share = np.zeros(last + 1, dtype=np.float64)
    for name, k in first_read.items():
        share[k + 1] += g.initializers[name][1]
    share = np.cumsum(share) / total
    outputs_from = min((made_by.get(o, -1) for o in outputs), default=-1)  # every graph output in the second half

    best: tuple[int, float, int] | None = None
    for k in range(1, min(last, outputs_from + 1)):
        if BALANCE[0] <= share[k] <= BALANCE[1] and 0 < crossing[k] <= MAX_CROSSING and not barred[k]:
            key = (int(crossing[k]), abs(float(share[k]) - 0.5), k)
            best = key if best is None or key < best else best
    return None if best is None else _halves(g, best[2], constant, made_by)


def _halves(g: _Graph, cut: int, constant: set[str], made_by: dict[str, int]) -> Halves | None:
    nodes = g.nodes
    second = nodes[cut:]
    needed = {i for n in second for i in n.inputs if i}
    crossing = [o for n in nodes[:cut] for o in n.outputs if o in needed and o not in constant]
    # The first half's constant nodes that the second reads, and those they are made from, given to it again
    again: set[int] = set()
    todo = [made_by[t] for t in needed if t in constant and made_by.get(t, cut) < cut]
    while todo:
        k = todo.pop()
        if k not in again:
            again.add(k)
            todo.extend(made_by[i] for i in nodes[k].inputs if made_by.get(i, cut) < cut)
    second = [nodes[k] for k in sorted(again)] + second

    # Each crossing tensor as the graph declares it, or with its element type worked out (no shape)
    declared: dict[str, bytes] = {}
    for name in crossing:
        if _tensor_type(g.value_info.get(name, b"")):
            declared[name] = g.value_info[name]
        elif elem := _infer_type(g, name, made_by):
            declared[name] = _typed(name, elem)
        else:
            return None
    first_inputs = {n: v for n, v in g.inputs.items() if n not in g.initializers}
    return Halves(
        _part(g, nodes[:cut], first_inputs, {n: declared[n] for n in crossing}),
        _part(g, second, first_inputs | declared, g.outputs),
        tuple(crossing),
    )


def _no_op_cast(g: _Graph, node: _Node, made_by: dict[str, int]) -> bool:
    """A Cast to the type its input has already: the value passes unchanged, whether the Cast is kept (it makes the
    first half's output) or removed (ONNX Runtime does that in the whole graph)."""
    return (
        node.op == "Cast"
        and len(node.inputs) == 1
        and node.cast_to != 0
        and node.cast_to == _infer_type(g, node.inputs[0], made_by)
    )


def _infer_type(g: _Graph, name: str, made_by: dict[str, int]) -> int:
    """A tensor's element type: as the graph declares it, else followed back through its makers (a loop, not
    recursion: a ViT's stream goes back through every block to its input); 0 if unknown."""
    for _ in range(len(g.nodes) + 1):  # a graph whose makers form a cycle is not one to follow further
        if name in g.initializers:
            return g.initializers[name][2]
        if elem := _tensor_type(g.inputs.get(name) or g.value_info.get(name, b"")):
            return elem
        if name not in made_by:
            return 0
        n = g.nodes[made_by[name]]
        if n.domain not in ("", "ai.onnx"):
            return 0
        if n.op == "Cast":
            return n.cast_to
        if n.op == "Constant":
            return n.value_type
        if not (n.op in SAME_TYPE and n.inputs and n.inputs[0] and (n.op == "Split" or name == n.outputs[0])):
            return 0
        name = n.inputs[0]
    return 0


def _typed(name: str, elem: int) -> bytes:
    """A ValueInfoProto payload: a tensor of that element type, its shape left to ONNX Runtime."""
    return length_field(VALUE_NAME, name.encode()) + length_field(
        VALUE_TYPE, length_field(TYPE_TENSOR, varint_field(TENSOR_TYPE_ELEM, elem))
    )


def _part(g: _Graph, nodes: list[_Node], inputs: dict[str, bytes], outputs: dict[str, bytes]) -> bytes:
    """One half as a model of its own: its nodes, the initializers and inputs they read, the model's other fields."""
    read = {i for n in nodes for i in n.inputs if i}
    made = {o for n in nodes for o in n.outputs if o}
    pieces: list[bytes] = [g.name]
    pieces += (n.raw for n in nodes)
    pieces += (g.initializers[i][0] for i in g.initializers if i in read)
    pieces += _fields(GRAPH_INPUT, (v for n, v in inputs.items() if n in read))
    pieces += _fields(GRAPH_OUTPUT, outputs.values())
    pieces += _fields(GRAPH_VALUE_INFO, (v for n, v in g.value_info.items() if n in made and n not in outputs))
    return b"".join(g.model_rest) + length_field(MODEL_GRAPH, b"".join(pieces))


def _fields(number: int, payloads: Iterable[bytes]) -> list[bytes]:
    return [length_field(number, p) for p in payloads]


class Chain(ort.InferenceSession):
    """Two sessions run one after the other and seen as one: the first's outputs are fed to the second.

    Not an ONNX Runtime session itself (the base class is not initialised): only what the models call is
    provided: run, the inputs and outputs, the metadata (OCR's charset) and providers (/info).
    """

    def __init__(self, first: ort.InferenceSession, second: ort.InferenceSession) -> None:
        self.first, self.second = first, second
        self._passed = [o.name for o in first.get_outputs()]
        self._first_inputs = [i.name for i in first.get_inputs()]
        self._second_inputs = [i.name for i in second.get_inputs() if i.name not in self._passed]
        only_second = set(self._second_inputs) - set(self._first_inputs)
        self._inputs = [*first.get_inputs(), *(i for i in second.get_inputs() if i.name in only_second)]

    def get_inputs(self) -> list[Any]:
        return list(self._inputs)

    def get_outputs(self) -> list[Any]:
        return self.second.get_outputs()

    def get_modelmeta(self) -> Any:
        return self.first.get_modelmeta()

    def get_providers(self) -> list[str]:
        return self.first.get_providers()

    def run(self, output_names: Any, input_feed: dict[str, Any], run_options: Any = None) -> Any:
        middle = self.first.run(None, {k: input_feed[k] for k in self._first_inputs}, run_options)
        feeds = dict(zip(self._passed, middle, strict=True))
        feeds.update((k, input_feed[k]) for k in self._second_inputs)
        return self.second.run(output_names, feeds, run_options)
