"""A tower's last row-by-row work done for the one row its output reads: the same outputs to the bit, only where
every node taken works row by row, and the saved copies made from such a graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cnclip_ref import install_tiny, tiny_model
from onnx import TensorProto, helper, numpy_helper

from immich_aio import graph_pool, ort_pack
from immich_aio.store import ModelStore

CPU = ["CPUExecutionProvider"]
RNG = np.random.default_rng(11)
T, D = 5, 8  # tokens and width of the small graphs


def run(model: onnx.ModelProto | bytes | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, opts, providers=CPU).run(None, feeds)


@pytest.fixture(scope="module")
def cn_clip_visual(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = ModelStore(tmp_path_factory.mktemp("models"))
    return install_tiny(store, tiny_model(seed=5)) / "visual" / "model.onnx"


def test_a_cn_clip_image_tower_computes_its_last_mlp_for_the_class_row_alone(cn_clip_visual):
    source = onnx.load(str(cn_clip_visual))
    model = onnx.load(str(cn_clip_visual))
    count = graph_pool.pool_tail(model)
    assert count >= 8  # the residual sum, the layer norm and its Casts, the MLP's MatMuls, activation, sum, Transpose
    rows = [n for n in model.graph.node if n.output[0].endswith(graph_pool.ROW)]
    assert len(rows) == 2  # the stream before the last attention's sum, and the attention's output
    assert all(helper.get_attribute_value(n.attribute[0]) == 0 for n in rows)  # cn_clip's blocks: tokens first
    size = source.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    for batch in (1, 2, 3):
        image = RNG.standard_normal((batch, 3, size, size)).astype(np.float32)
        assert np.array_equal(run(model, {"image": image})[0], run(source, {"image": image})[0])


def test_the_saved_copies_hold_the_pooled_graph_and_answer_the_same(cn_clip_visual, tmp_path):
    entry, packed = tmp_path / "entry", tmp_path / "packed"
    entry.mkdir()
    packed.mkdir()
    assert ort_pack.main(["entry", str(cn_clip_visual), str(entry)]) == 0
    said = json.loads((entry / ort_pack.REWRITES).read_text())
    assert said["pooled"] >= 8
    assert ort_pack.main(["pack", str(cn_clip_visual), str(packed), str(entry)]) == 0
    assert json.loads((packed / ort_pack.REWRITES).read_text())["pooled"] == said["pooled"]
    size = onnx.load(str(cn_clip_visual)).graph.input[0].type.tensor_type.shape.dim[2].dim_value
    image = RNG.standard_normal((2, 3, size, size)).astype(np.float32)
    want = run(str(cn_clip_visual), {"image": image})[0]
    for folder in (entry, packed):
        saved = onnx.load(str(folder / ort_pack.GRAPH), load_external_data=False)
        assert any(n.op_type == "Gather" and graph_pool.ROW in n.name for n in saved.graph.node)
        assert np.array_equal(run(str(folder / ort_pack.GRAPH), {"image": image})[0], want)


def test_a_pooled_graph_that_would_answer_otherwise_is_not_used(cn_clip_visual, tmp_path, monkeypatch):
    real = graph_pool.pool_tail

    def wrong(model):  # the rewrite, then the output scaled: a graph that answers otherwise
        count = real(model)
        out = model.graph.output[0].name
        maker = next(n for n in model.graph.node if out in n.output)
        maker.output[list(maker.output).index(out)] = "before_scale"
        model.graph.initializer.append(numpy_helper.from_array(np.array(1.5, np.float32), "scale_by"))
        model.graph.node.append(helper.make_node("Mul", ["before_scale", "scale_by"], [out]))
        return count

    monkeypatch.setattr(graph_pool, "pool_tail", wrong)
    assert ort_pack.pooled(cn_clip_visual) == (None, 0)
    assert ort_pack.main(["entry", str(cn_clip_visual), str(tmp_path)]) == 0
    assert "pooled" not in json.loads((tmp_path / ort_pack.REWRITES).read_text())


def tail_graph(mixer: str = "", position_table: bool = False) -> onnx.ModelProto:
    """x [N, T, D] -> (a node that mixes rows, if asked) -> LayerNorm -> MatMul -> Relu -> MatMul -> sum with its
    input -> Gather of row 0 on the token axis -> y [N, D]."""
    inits = [
        numpy_helper.from_array(RNG.standard_normal((D, 4 * D)).astype(np.float32), "w1"),
        numpy_helper.from_array(RNG.standard_normal((4 * D, D)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.ones(D, np.float32), "scale"),
        numpy_helper.from_array(np.zeros(D, np.float32), "bias"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(RNG.standard_normal((T, D)).astype(np.float32), "positions"),
        numpy_helper.from_array(np.array([1], np.int64), "token_axis"),
    ]
    nodes, x = [], "x"
    if mixer == "softmax":  # along the tokens: every row of its output reads every row of its input
        nodes.append(helper.make_node("Softmax", ["x"], ["mixed"], axis=1))
        x = "mixed"
    elif mixer == "mean":  # the tokens' mean, kept as a dimension of 1 and added back
        nodes.append(helper.make_node("ReduceMean", ["x", "token_axis"], ["mean"], keepdims=1))
        nodes.append(helper.make_node("Add", ["x", "mean"], ["mixed"]))
        x = "mixed"
    elif mixer == "norm_over_tokens":
        nodes.append(helper.make_node("LayerNormalization", ["x", "scale_td", "bias_td"], ["mixed"], axis=1))
        inits.append(numpy_helper.from_array(np.ones((T, D), np.float32), "scale_td"))
        inits.append(numpy_helper.from_array(np.zeros((T, D), np.float32), "bias_td"))
        x = "mixed"
    elif mixer == "scores":  # x xᵀ x: rows mixed by a MatMul of two computed tensors
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]))
        nodes.append(helper.make_node("MatMul", ["x", "xt"], ["scores"]))
        nodes.append(helper.make_node("MatMul", ["scores", "x"], ["mixed"]))
        x = "mixed"
    if position_table:  # a constant that differs from row to row
        nodes.append(helper.make_node("Add", [x, "positions"], ["placed"]))
        x = "placed"
    nodes += [
        helper.make_node("LayerNormalization", [x, "scale", "bias"], ["n"], axis=-1),
        helper.make_node("MatMul", ["n", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["m"]),
        helper.make_node("Add", [x, "m"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tail",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", D])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


@pytest.mark.parametrize("mixer", ["", "softmax", "mean", "norm_over_tokens", "scores"])
@pytest.mark.parametrize("position_table", [False, True])
def test_only_row_by_row_nodes_take_the_row_alone(mixer, position_table):
    source = tail_graph(mixer, position_table)
    model = onnx.ModelProto()
    model.CopyFrom(source)
    count = graph_pool.pool_tail(model)
    taken = {n.op_type for n in model.graph.node if any(graph_pool.ROW in i for i in n.input)}
    # the LayerNorm, both MatMuls, the Relu, the sum; and the sum of the tokens' mean, whose one row is every row
    assert count == (6 if mixer == "mean" and not position_table else 5)
    assert "Softmax" not in taken and "ReduceMean" not in taken and "Transpose" not in taken
    if position_table:  # the table's own rows are needed, so the sum that reads it keeps every row
        assert not any(n.op_type == "Add" and "positions" in n.input and any(graph_pool.ROW in i for i in n.input)
                       for n in model.graph.node)  # fmt: skip
    x = RNG.standard_normal((3, T, D)).astype(np.float32)
    assert np.array_equal(run(model, {"x": x})[0], run(source, {"x": x})[0]), (mixer, position_table)


def test_a_tail_read_elsewhere_or_of_another_row_is_left_alone():
    model = tail_graph()
    model.graph.output.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", T, 4 * D]))
    source = onnx.ModelProto()
    source.CopyFrom(model)
    assert graph_pool.pool_tail(model) == 2  # the last MatMul and the sum: the Relu's every row is an output
    x = RNG.standard_normal((2, T, D)).astype(np.float32)
    assert all(np.array_equal(g, w) for g, w in zip(run(model, {"x": x}), run(source, {"x": x}), strict=True))
    other = tail_graph()
    next(i for i in other.graph.initializer if i.name == "zero").CopyFrom(numpy_helper.from_array(np.array(2), "zero"))
    assert graph_pool.pool_tail(other) == 0  # row 2, not the class row: not this rewrite's case


def test_an_initializer_a_caller_may_feed_is_not_a_constant():
    """An initializer also declared as a graph input is only a default (graph_fold.constants): the row read, or a
    weight, may be fed otherwise, so nothing that depends on it being as stored is rewritten."""
    model = tail_graph()
    model.graph.input.append(helper.make_tensor_value_info("zero", TensorProto.INT64, []))
    assert graph_pool.pool_tail(model) == 0  # the row read may not be row 0
    model = tail_graph()
    model.graph.input.append(helper.make_tensor_value_info("w2", TensorProto.FLOAT, [4 * D, D]))
    # the walk stops at the last MatMul, whose weight may be fed: the sum alone is left, no product worth a rewrite
    assert graph_pool.pool_tail(model) == 0
