"""A first load's graph cut in two and its halves built at once: the same outputs to the bit, cuts only where no
fusion is broken, and the whole graph wherever a cut cannot be promised."""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cnclip_ref import install_tiny, tiny_model
from onnx import TensorProto, helper, numpy_helper

from immich_aio import graph_split, mapped_load
from immich_aio.store import ModelStore

CPU = ["CPUExecutionProvider"]
RNG = np.random.default_rng(5)


def options() -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    return opts


@pytest.fixture(autouse=True)
def any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mapped_load, "MIN_FILE_BYTES", 0)  # the test models are small
    monkeypatch.setattr(graph_split, "MIN_WEIGHT_BYTES", 0)
    monkeypatch.setattr(mapped_load, "cores", lambda: 2)


@pytest.fixture(scope="module")
def cn_clip_visual(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CN-CLIP (cn_clip's own architecture, random weights) as immich-aio's exporter writes its image tower."""
    store = ModelStore(tmp_path_factory.mktemp("models"))
    return install_tiny(store, tiny_model(seed=3)) / "visual" / "model.onnx"


def mapped_graph(path: Path) -> bytes:
    with open(path, "rb") as f:
        return mapped_load.graph_with_mapped_weights(f.read(), path.name)[0]


def whole(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), options(), providers=CPU)


def test_a_cn_clip_image_tower_is_built_in_two_halves_at_once_with_the_same_outputs(cn_clip_visual, monkeypatch):
    built: list[tuple[str, int]] = []
    real = mapped_load.ort.InferenceSession

    def recording(model, sess_options=None, providers=None):
        built.append((threading.current_thread().name, len(model)))
        return real(model, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(mapped_load.ort, "InferenceSession", recording)
    session = mapped_load.session(cn_clip_visual, options, CPU)
    assert isinstance(session, graph_split.Chain)
    # two halves, each smaller than the whole graph, the second on a thread of its own
    graph = mapped_graph(cn_clip_visual)
    assert len(built) == 2 and all(size < len(graph) for _, size in built)
    assert sorted(name for name, _ in built) == sorted(["build-half", threading.current_thread().name])
    reference = whole(cn_clip_visual)
    assert [(i.name, i.type, i.shape) for i in session.get_inputs()] == [
        (i.name, i.type, i.shape) for i in reference.get_inputs()
    ]
    assert [(o.name, o.type, o.shape) for o in session.get_outputs()] == [
        (o.name, o.type, o.shape) for o in reference.get_outputs()
    ]
    images = RNG.standard_normal((3, 3, 32, 32)).astype(np.float32)
    want = reference.run(None, {"image": images})[0]
    got = session.run(None, {"image": images})[0]
    assert np.array_equal(got, want)
    assert not mapped_load.mappings_of(mapped_load.file_identity(cn_clip_visual), cn_clip_visual.name)


def test_the_cut_passes_the_residual_stream_between_two_layers(cn_clip_visual):
    """One tensor crosses: the stream between the two transformer layers (a Cast to its own type, which ONNX Runtime
    removes in the whole graph and which changes nothing where it is kept)."""
    halves = graph_split.split(mapped_graph(cn_clip_visual))
    assert halves is not None
    assert len(halves.crossing) == 1 and "resblocks.1" in halves.crossing[0]
    first, second = onnx.load_from_string(halves.first), onnx.load_from_string(halves.second)
    assert [o.name for o in first.graph.output] == list(halves.crossing)
    assert [i.name for i in second.graph.input] == list(halves.crossing)
    assert second.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    # every weight is in one half or the other, still mapped from the file, none copied into the graph
    mapped = {t.name for t in onnx.load_from_string(mapped_graph(cn_clip_visual)).graph.initializer if t.external_data}
    halves_mapped = {t.name for m in (first, second) for t in m.graph.initializer if t.external_data}
    assert halves_mapped == mapped


@pytest.fixture(scope="module")
def iresnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The benchmark's ArcFace stand-in (insightface's IResNet-50 topology, random weights)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench_models import arcface_r50_class

    return arcface_r50_class(tmp_path_factory.mktemp("iresnet") / "w600k_r50.onnx")


def test_an_iresnet_is_built_whole(iresnet):
    """Its block boundaries are residual sums, each of which its convolution absorbs: no cut is offered."""
    assert graph_split.split(mapped_graph(iresnet)) is None
    assert not isinstance(mapped_load.session(iresnet, options, CPU), graph_split.Chain)


def test_a_tensor_that_convolutions_and_batch_norms_read_is_never_cut(iresnet, tmp_path, monkeypatch):
    """With each residual sum passed through a Cast to its own type (so that only the readers could bar a cut), a cut
    would hand the second half the stream in plain layout; its first batch norm and sum then run apart from the
    convolutions that ONNX Runtime's NCHWc rewrite folds them into in the whole graph, and the embeddings move."""
    model = onnx.load(str(iresnet))
    nodes = []
    for n in model.graph.node:
        nodes.append(n)
        if n.op_type == "Add":
            nodes.append(helper.make_node("Cast", [f"{n.output[0]}_sum"], [n.output[0]], to=TensorProto.FLOAT))
            n.output[0] = f"{n.output[0]}_sum"
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    path = tmp_path / "cast.onnx"
    onnx.save(model, str(path))
    graph = mapped_graph(path)
    assert graph_split.split(graph) is None
    monkeypatch.setattr(graph_split, "LAYOUT_READERS", frozenset())
    halves = graph_split.split(graph)
    assert halves is not None

    def build(model: bytes) -> ort.InferenceSession:
        opts = options()
        opts.add_session_config_entry(mapped_load.FOLDER_KEY, str(tmp_path))
        return ort.InferenceSession(model, opts, providers=CPU)

    faces = RNG.standard_normal((2, 3, 112, 112)).astype(np.float32)
    want = whole(path).run(None, {"input.1": faces})[0]
    got = graph_split.Chain(build(halves.first), build(halves.second)).run(None, {"input.1": faces})[0]
    assert not np.array_equal(got, want)


def test_a_tower_of_fixed_shape_is_left_whole_when_its_stream_is_not_declared(cn_clip_visual, tmp_path, monkeypatch):
    """An export with a fixed batch (Immich's own have one) lets ONNX Runtime know every shape in the whole graph: it
    folds the Shape nodes and fuses reshaped MatMuls into Gemms by them. A second half told only its input's type
    knows none of that and answers otherwise (2e-6 off here), so such a tower is built whole."""
    model = onnx.load(str(cn_clip_visual))
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    batch.Clear()
    batch.dim_value = 1
    path = tmp_path / "fixed.onnx"
    onnx.save(model, str(path))
    assert graph_split.split(mapped_graph(path)) is None
    session = mapped_load.session(path, options, CPU)
    assert not isinstance(session, graph_split.Chain)

    # what that keeps away: the cut taken anyway, the stream counted as declared
    monkeypatch.setattr(graph_split, "_static", lambda payload: True)
    halves = graph_split.split(path.read_bytes())
    assert halves is not None
    build = lambda part: ort.InferenceSession(part, options(), providers=CPU)  # noqa: E731
    image = RNG.standard_normal(session.get_inputs()[0].shape).astype(np.float32)
    got = graph_split.Chain(build(halves.first), build(halves.second)).run(None, {"image": image})[0]
    assert not np.array_equal(got, whole(path).run(None, {"image": image})[0])


def test_a_stream_of_fixed_shape_crosses_only_declared_dimension_by_dimension(tmp_path):
    path = mlp(tmp_path / "fixed.onnx", rows=5, declared_rows=5)
    assert graph_split.split(mapped_graph(path)).crossing == ("s2",)
    session = mapped_load.session(path, options, CPU)
    assert isinstance(session, graph_split.Chain)
    feeds = {"x": RNG.standard_normal((5, 32)).astype(np.float32), "scale": np.array([1.5], np.float32)}
    assert np.array_equal(session.run(None, feeds)[0], whole(path).run(None, feeds)[0])
    # declared with a symbolic first dimension: the whole graph would know it is 5, the second half would not
    assert graph_split.split(mapped_graph(mlp(tmp_path / "loose.onnx", rows=5, declared_rows="N"))) is None


def mlp(
    path: Path,
    *,
    early_output: bool = False,
    loop: bool = False,
    custom: bool = False,
    casts: bool = True,
    changing_casts: bool = False,
    chain: int = 0,
    rows: int | str = "N",
    declared_rows: int | str = "N",
) -> Path:
    """Residual MatMul blocks whose stream passes through a Cast to its own type (as cn_clip's layer norms have it);
    a second input read only at the end, a Constant made at the start and read at the end. `rows`: the first
    dimension of the input, `declared_rows`: of the tensors the graph declares."""
    nodes, inits = [], []
    for i in range(4):
        inits.append(numpy_helper.from_array(RNG.normal(0, 0.2, (32, 32)).astype(np.float32), f"w{i}"))
    nodes.append(helper.make_node("Constant", [], ["shift"], value=numpy_helper.from_array(np.float32(0.5))))
    t = "x"
    for i in range(4):
        stream = f"s{i}" if casts else t
        if casts:
            to = TensorProto.DOUBLE if changing_casts and i % 2 else TensorProto.FLOAT
            nodes.append(helper.make_node("Cast", [t], [stream], to=to))
        nodes.append(helper.make_node("MatMul", [stream, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"a{i}"]))
        nodes.append(helper.make_node("Add", [f"a{i}", stream], [f"r{i}"]))
        t = f"r{i}"
        if i == 1:  # a long stretch of the stream, none of it declared, before the Cast the cut passes through
            for j in range(chain):
                nodes.append(helper.make_node("Relu", [t], [f"chain{j}"]))
                t = f"chain{j}"
    nodes.append(helper.make_node("Mul", [t, "scale"], ["scaled"]))
    nodes.append(helper.make_node("Add", ["scaled", "shift"], ["y"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, 32])]
    if early_output:
        outputs.append(helper.make_tensor_value_info("a0", TensorProto.FLOAT, ["N", 32]))
    if custom:  # a maker outside ONNX's domain for the stream's Casts
        for n in nodes:
            if n.op_type == "Cast":
                n.domain = "com.example"
    declared = [
        helper.make_tensor_value_info(o, TensorProto.FLOAT, [declared_rows, 32])
        for n in nodes[1:]
        for o in n.output
        if not o.startswith("chain")
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, 32]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1]),
        ],
        outputs,
        inits,
        value_info=[] if changing_casts else [v for v in declared if v.name not in {o.name for o in outputs}],
    )
    if loop:
        body = helper.make_graph(
            [helper.make_node("Identity", ["c"], ["c_out"])],
            "body",
            [helper.make_tensor_value_info(n, TensorProto.INT64 if n == "i" else TensorProto.BOOL, []) for n in "ic"],
            [helper.make_tensor_value_info("c_out", TensorProto.BOOL, [])],
        )
        graph.node.append(helper.make_node("Loop", ["", "cond"], [], body=body))
        graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    path.write_bytes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()
    )
    return path


def test_inputs_and_constants_the_second_half_reads_are_given_to_it(tmp_path):
    path = mlp(tmp_path / "mlp.onnx")
    session = mapped_load.session(path, options, CPU)
    assert isinstance(session, graph_split.Chain)
    second = onnx.load_from_string(graph_split.split(mapped_graph(path)).second)
    assert "Constant" in [n.op_type for n in second.graph.node]  # made again, not passed across
    assert {i.name for i in second.graph.input} == {"scale", *graph_split.split(mapped_graph(path)).crossing}
    assert [i.name for i in session.get_inputs()] == ["x", "scale"]
    feeds = {"x": RNG.standard_normal((5, 32)).astype(np.float32), "scale": np.array([1.5], np.float32)}
    assert np.array_equal(session.run(None, feeds)[0], whole(path).run(None, feeds)[0])
    assert np.array_equal(session.run(["y"], feeds)[0], whole(path).run(["y"], feeds)[0])


def test_a_type_is_followed_back_through_a_long_undeclared_stretch(tmp_path):
    """Whether the Cast the cut passes through is a no-op is known from its input's type, followed back maker by
    maker: here through 3,000 nodes the graph declares nothing for (far deeper than Python's recursion)."""
    path = mlp(tmp_path / "long.onnx", chain=3000)
    halves = graph_split.split(mapped_graph(path))
    assert halves is not None and halves.crossing == ("s2",)
    session = mapped_load.session(path, options, CPU)
    assert isinstance(session, graph_split.Chain)
    feeds = {"x": RNG.standard_normal((2, 32)).astype(np.float32), "scale": np.array([0.5], np.float32)}
    assert np.array_equal(session.run(None, feeds)[0], whole(path).run(None, feeds)[0])


def test_graphs_that_cannot_be_cut_as_promised_are_left_whole(tmp_path):
    # a graph output made early: every cut must come before it, and none there may be made
    assert graph_split.split(mapped_graph(mlp(tmp_path / "early.onnx", early_output=True))) is None
    # a subgraph may read tensors of the graph around it
    assert graph_split.split(mapped_graph(mlp(tmp_path / "loop.onnx", loop=True))) is None
    # the stream made by the residual sums themselves, each of which could be folded into what made its other input
    # (a sum that makes the first half's output never is)
    assert graph_split.split(mapped_graph(mlp(tmp_path / "sums.onnx", casts=False))) is None
    # Casts that change the type (the graph is not run): what they do is a real computation, foldable like a sum
    assert graph_split.split(mapped_graph(mlp(tmp_path / "changing.onnx", changing_casts=True))) is None
    # another domain's operator makes the stream: what it does is not known here
    assert graph_split.split(mapped_graph(mlp(tmp_path / "custom.onnx", custom=True))) is None
    # and the same graph with none of those: cut after the second block's Cast, half the weights on each side
    assert graph_split.split(mapped_graph(mlp(tmp_path / "plain.onnx"))).crossing == ("s2",)


def test_small_models_and_one_core_build_whole(tmp_path, monkeypatch):
    path = mlp(tmp_path / "mlp.onnx")
    monkeypatch.setattr(mapped_load, "cores", lambda: 1)
    assert not isinstance(mapped_load.session(path, options, CPU), graph_split.Chain)
    monkeypatch.setattr(mapped_load, "cores", lambda: 2)
    monkeypatch.setattr(graph_split, "MIN_WEIGHT_BYTES", path.stat().st_size)
    assert not isinstance(mapped_load.session(path, options, CPU), graph_split.Chain)


def test_halves_that_fail_to_build_leave_the_whole_graph_built(tmp_path, monkeypatch, caplog):
    path = mlp(tmp_path / "mlp.onnx")
    real = graph_split.split

    def broken(graph: bytes) -> graph_split.Halves | None:
        halves = real(graph)
        assert halves is not None
        return graph_split.Halves(halves.first, b"not a model", halves.crossing)

    monkeypatch.setattr(graph_split, "split", broken)
    with caplog.at_level(logging.INFO, logger="immich_aio.mapped_load"):
        session = mapped_load.session(path, options, CPU)
    assert session is not None and not isinstance(session, graph_split.Chain)
    assert "halves failed to build" in caplog.text
    feeds = {"x": RNG.standard_normal((2, 32)).astype(np.float32), "scale": np.array([2.0], np.float32)}
    assert np.array_equal(session.run(None, feeds)[0], whole(path).run(None, feeds)[0])


@pytest.mark.skipif(sys.platform != "linux", reason="nice values are per thread on Linux only")
def test_both_halves_are_built_at_the_priority_of_the_thread_that_asked(tmp_path, monkeypatch):
    """A background load (priority.py: nice raised) builds both halves there: the helper thread takes its creator's
    nice value, and so do the ONNX Runtime threads each session starts."""
    path = mlp(tmp_path / "mlp.onnx")
    seen: list[int] = []
    real = mapped_load.ort.InferenceSession

    def recording(model, sess_options=None, providers=None):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return real(model, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(mapped_load.ort, "InferenceSession", recording)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    result: list[object] = []

    def background_load() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, base + 3))
        result.append(mapped_load.session(path, options, CPU))

    worker = threading.Thread(target=background_load)
    worker.start()
    worker.join(60)
    assert not worker.is_alive()
    assert isinstance(result[0], graph_split.Chain)
    assert seen == [min(19, base + 3)] * 2
