"""Per-channel PRelu written as depthwise convolutions (graph_prelu.py): no PRelu left, the same outputs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from immich_aio import ort_pack
from immich_aio.graph_prelu import rewrite_prelu

RNG = np.random.default_rng(3)
C = 16


def const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def block(slope_shape: tuple[int, ...] = (C, 1, 1), *, after: str = "conv", slope_is_input: bool = False):
    """IResNet's pattern: conv → PRelu (one slope per channel) → padded conv, with the PRelu's value also an output
    (so both the PRelu and what reads it are compared). `after`: what feeds the PRelu — a convolution, a batch
    normalisation after one, or an Add (no channel count its constants say)."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["y"], name="c1", pads=[1] * 4)]
    inits = [const("w1", RNG.standard_normal((C, 3, 3, 3)) * 0.5), const("b1", RNG.standard_normal(C) * 0.1)]
    feed = "y"
    if after == "bn":
        nodes.append(helper.make_node("BatchNormalization", ["y", "g", "be", "mu", "var"], ["yb"], epsilon=1e-5))
        inits += [
            const("g", 1 + RNG.standard_normal(C) * 0.1),
            const("be", RNG.standard_normal(C) * 0.1),
            const("mu", RNG.standard_normal(C) * 0.1),
            const("var", 1 + np.abs(RNG.standard_normal(C)) * 0.1),
        ]
        feed = "yb"
    elif after == "add":
        nodes.append(helper.make_node("Add", ["y", "y"], ["ya"]))
        feed = "ya"
    nodes += [
        helper.make_node("PRelu", [feed, "slope"], ["p"], name="prelu"),
        helper.make_node("Conv", ["p", "w2"], ["out"], name="c2", pads=[1] * 4),
    ]
    slope = const("slope", np.full(slope_shape, 0.25, np.float32) + RNG.standard_normal(slope_shape) * 0.1)
    inits += [slope, const("w2", RNG.standard_normal((C, C, 3, 3)) * 0.2)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])]
    if slope_is_input:
        inputs.append(helper.make_tensor_value_info("slope", TensorProto.FLOAT, list(slope_shape)))
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("out", "p")],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


def run(model: onnx.ModelProto, x: np.ndarray, level: ort.GraphOptimizationLevel) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def optimised_ops(model: onnx.ModelProto, tmp_path: Path, name: str) -> Counter[str]:
    """The node types of ONNX Runtime's optimised graph of the model, as the server's sessions run it."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return ops(onnx.load(str(tmp_path / f"{name}.onnx")))


@pytest.mark.parametrize("slope_shape", [(C, 1, 1), (1, C, 1, 1), (1,), ()])
@pytest.mark.parametrize("after", ["conv", "bn"])
def test_prelu_becomes_convolutions_and_computes_the_same(slope_shape, after):
    source = block(slope_shape, after=after)
    rewritten = block(slope_shape, after=after)
    rewritten.CopyFrom(source)
    assert rewrite_prelu(rewritten) == 1
    assert ops(rewritten)["PRelu"] == 0 and ops(rewritten)["Conv"] == 5
    x = RNG.standard_normal((2, 3, 12, 12)).astype(np.float32)
    plain = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want, got = run(source, x, plain), run(rewritten, x, plain)
    assert (want[1] < 0).any() and (want[1] > 0).any()  # both sides of the PRelu are exercised
    # Relu(y) + (-a) * Relu(-y) is a * y or y with PRelu's own rounding: the PRelu's value is bit for bit the same
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    optimised = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # as the server runs it: ONNX Runtime's fusions move rounding
    for w, g in zip(run(source, x, optimised), run(rewritten, x, optimised), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))


def test_the_rewritten_graph_stays_in_the_cpus_blocked_layout(tmp_path):
    """The point of the rewrite: ONNX Runtime reorders out of its NCHWc layout around a PRelu, not around the
    convolutions that replace it."""
    source = block()
    rewritten = block()
    rewritten.CopyFrom(source)
    rewrite_prelu(rewritten)
    before, after = optimised_ops(source, tmp_path, "source"), optimised_ops(rewritten, tmp_path, "rewritten")
    reorders = [before["ReorderInput"] + before["ReorderOutput"], after["ReorderInput"] + after["ReorderOutput"]]
    if reorders[0] == 0:
        pytest.skip("this CPU's ONNX Runtime does not use the NCHWc layout here")  # e.g. an ARM host
    assert before["PRelu"] == 1 and after["PRelu"] == 0
    assert reorders[1] < reorders[0]


@pytest.mark.parametrize(
    "case",
    [
        {"slope_shape": (C,)},  # broadcast against the last axis (width), not the channels
        {"slope_shape": (C, 12, 12)},  # one slope per element
        {"slope_shape": (2,)},
        {"after": "add"},  # the input's channel count is not known from constants
        {"slope_is_input": True},  # a default the caller may replace: not a constant
    ],
)
def test_what_is_not_a_per_channel_prelu_after_a_convolution_is_left(case):
    model = block(**case)
    before = model.SerializeToString()
    assert rewrite_prelu(model) == 0
    assert model.SerializeToString() == before


def test_graphs_with_subgraphs_are_left_alone():
    model = block()
    branch = helper.make_graph([], "b", [], [helper.make_tensor_value_info("p", TensorProto.FLOAT, None)])
    model.graph.node.append(
        helper.make_node("If", ["cond"], ["q"], then_branch=branch, else_branch=branch)  # reads the outer "p"
    )
    assert rewrite_prelu(model) == 0


def test_new_names_never_collide_with_the_graphs_own():
    model = block()
    taken = [f"prelu/{part}_{i}" for part in ("w", "conv", "pos", "neg", "scaled", "relu", "add") for i in range(12)]
    model.graph.node.extend(
        helper.make_node("Identity", ["x"], [name], name=name)
        for name in taken  # dead nodes holding the names
    )
    rewrite_prelu(model)
    names = [o for n in model.graph.node for o in n.output] + [t.name for t in model.graph.initializer]
    assert len(names) == len(set(names))


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def test_the_cache_child_saves_the_rewritten_graph_and_says_so(tmp_path):
    source = save(block(), tmp_path / "recogniser.onnx")
    folder = tmp_path / "entry"
    folder.mkdir()
    assert ort_pack.main(["entry", str(source), str(folder)]) == 0
    assert json.loads((folder / ort_pack.REWRITES).read_text()) == {"folded": 1, "prelu": 1, "depthwise": 0}
    saved = onnx.load(str(folder / ort_pack.GRAPH), load_external_data=False)
    assert ops(saved)["PRelu"] == 0


def test_a_rewrite_that_changes_the_values_is_not_saved(tmp_path, monkeypatch):
    """The child runs the rewritten graph beside the source's, the PRelu's own value compared too: a wrong slope
    (here +a for -a) leaves the source's graph."""
    import immich_aio.graph_prelu as graph_prelu

    real = graph_prelu.rewrite_prelu

    def wrong_sign(model: onnx.ModelProto) -> int:
        count = real(model)
        for t in model.graph.initializer:
            if t.name.startswith("prelu/w") and (numpy_helper.to_array(t) < 0).all():
                values = numpy_helper.to_array(t)
                if not np.all(values == -1):  # the -a weights, not the -1 ones
                    t.CopyFrom(numpy_helper.from_array(-values, t.name))
        return count

    monkeypatch.setattr(graph_prelu, "rewrite_prelu", wrong_sign)
    model = block()
    model.graph.output.pop()  # only the final output: the PRelu's own value is what the child adds to compare
    source = save(model, tmp_path / "recogniser.onnx")
    rewritten, said = ort_pack.folded(source)
    assert rewritten is None and said["folded"] == 0 and "differs from the source's" in str(said["why"])


@pytest.mark.parametrize(
    ("written", "logged"),
    [
        ('{"folded": 25, "prelu": 25}', " (25 PRelus written as convolutions)"),
        (
            '{"folded": 30, "prelu": 25}',
            " (5 constant scales and shifts folded into its convolutions, 25 PRelus written as convolutions)",
        ),
        ('{"folded": 3, "prelu": 9}', " (3 constant scales and shifts folded into its convolutions)"),  # not ours
    ],
)
def test_the_saved_copys_log_line_says_what_was_rewritten(tmp_path, written, logged):
    from immich_aio.ort_cache import _rewrites

    (tmp_path / ort_pack.REWRITES).write_text(written)
    assert _rewrites(tmp_path) == logged


def test_an_arcface_iresnet50_has_every_prelu_rewritten_and_embeds_the_same(tmp_path):
    """The benchmark's ArcFace-R50 stand-in (insightface's IResNet-50 topology, as buffalo_l's recogniser): the cache
    child rewrites all 25 PRelus and its copy embeds faces as the model's own file does (cosine >= 0.9999 against
    the unoptimised graph)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench_models import arcface_r50_class

    source = arcface_r50_class(tmp_path / "w600k_r50.onnx")
    folder = tmp_path / "entry"
    folder.mkdir()
    assert ort_pack.main(["entry", str(source), str(folder)]) == 0
    assert json.loads((folder / ort_pack.REWRITES).read_text()) == {"folded": 25, "prelu": 25, "depthwise": 0}
    faces = RNG.integers(0, 256, (3, 3, 112, 112)).astype(np.float32) / 127.5 - 1
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(str(source), plain, providers=["CPUExecutionProvider"]).run(None, {"input.1": faces})[0]
    got = ort.InferenceSession(str(folder / ort_pack.GRAPH), plain, providers=["CPUExecutionProvider"]).run(
        None, {"input.1": faces}
    )[0]
    cosines = (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
    assert cosines.min() >= 0.9999


def test_the_cache_child_offers_itself_to_the_oom_killer_first():
    """A rewrite holds a recogniser several times over: if memory runs out, the child goes, not the server."""
    import subprocess
    import sys

    code = "from immich_aio.ort_pack import first_to_go; first_to_go(); print(open('/proc/self/oom_score_adj').read())"
    if not Path("/proc/self/oom_score_adj").exists():
        pytest.skip("no /proc here")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "1000"
