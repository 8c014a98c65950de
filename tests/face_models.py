"""Synthetic SCRFD- and ArcFace-shaped ONNX models built with onnx.helper (no weights download).

The fake SCRFD scores each anchor from the local mean and variance of the input (so textured
regions score high, flat ones and the letterbox padding low, and scores rarely tie), and predicts
box distances and 5 landmarks from the same features: enough to exercise decoding, NMS,
alignment and batching against insightface on real photos. The fake ArcFace keeps spatial layout
(strided conv -> flatten -> dense), so its embedding depends on how the face was aligned.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from immich_aio.models.base import Model

STRIDES = (8, 16, 32)
ANCHORS = 2
VAR_GAIN = 2.0
SCORE_BIAS = -2.5


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_scrfd(path: Path, batch_axis: bool = False, seed: int = 0, landmarks: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    nodes, inits, outputs = [], [], []
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "h", "w"])
    nodes.append(helper.make_node("Mul", ["input.1", "input.1"], ["sq"]))
    heads = {"score": (1, []), "bbox": (4, []), "kps": (10, [])}
    for s in STRIDES:
        nodes += [
            helper.make_node("AveragePool", ["input.1"], [f"m{s}"], kernel_shape=[s, s], strides=[s, s]),
            helper.make_node("AveragePool", ["sq"], [f"q{s}"], kernel_shape=[s, s], strides=[s, s]),
            helper.make_node("Mul", [f"m{s}", f"m{s}"], [f"mm{s}"]),
            helper.make_node("Sub", [f"q{s}", f"mm{s}"], [f"v{s}"]),  # local variance
            helper.make_node("Concat", [f"m{s}", f"v{s}"], [f"f{s}"], axis=1),
        ]
        for head, (width, names) in heads.items():
            if head == "kps" and not landmarks:
                continue
            channels = width * ANCHORS
            w = rng.normal(0, 1.0, (channels, 6, 1, 1))
            b = rng.normal(0, 0.3, channels)
            if head == "score":
                w[:, 3:] = np.abs(w[:, 3:]) * VAR_GAIN  # variance drives the score
                w[:, :3] *= 0.5
                b += SCORE_BIAS
            elif head == "bbox":
                b += 1.5
            inits += [_const(f"{head}{s}_w", w), _const(f"{head}{s}_b", b)]
            conv = f"{head}{s}_conv"
            nodes.append(helper.make_node("Conv", [f"f{s}", f"{head}{s}_w", f"{head}{s}_b"], [conv]))
            act = conv
            if head == "score":
                act = f"{head}{s}_sig"
                nodes.append(helper.make_node("Sigmoid", [conv], [act]))
            elif head == "bbox":
                act = f"{head}{s}_sp"
                nodes.append(helper.make_node("Softplus", [conv], [act]))
            nodes.append(helper.make_node("Transpose", [act], [f"{head}{s}_t"], perm=[0, 2, 3, 1]))
            shape = np.array([1, -1, width] if batch_axis else [-1, width], dtype=np.int64)
            inits.append(numpy_helper.from_array(shape, f"{head}{s}_shape"))
            out = f"{head}_{s}"
            nodes.append(helper.make_node("Reshape", [f"{head}{s}_t", f"{head}{s}_shape"], [out]))
            names.append(out)
    for head in ("score", "bbox", "kps"):
        for out in heads[head][1]:
            dims = [1, None, heads[head][0]] if batch_axis else [None, heads[head][0]]
            outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, dims))
    return _save(helper.make_graph(nodes, "fake_scrfd", [inp], outputs, inits), path)


def make_arcface(path: Path, batch: int | None = None, seed: int = 1) -> Path:
    """Input `input.1` [batch|N, 3, 112, 112] -> [N, 512]; batch=1 mimics files without a batch axis."""
    rng = np.random.default_rng(seed)
    dim0 = batch if batch is not None else "N"
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [dim0, 3, 112, 112])
    out = helper.make_tensor_value_info("683", TensorProto.FLOAT, [dim0, 512])
    inits = [
        _const("conv_w", rng.normal(0, 0.3, (8, 3, 8, 8))),
        _const("conv_b", rng.normal(0, 0.1, 8)),
        _const("fc_w", rng.normal(0, 0.05, (8 * 14 * 14, 512))),
        _const("fc_b", rng.normal(0, 0.1, 512)),
    ]
    nodes = [
        helper.make_node("Conv", ["input.1", "conv_w", "conv_b"], ["c"], strides=[8, 8]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["683"]),
    ]
    return _save(helper.make_graph(nodes, "fake_arcface", [inp], [out], inits), path)


def install_pack(
    store: Path,
    name: str = "buffalo_l",
    batch_axis: bool = False,
    arcface_batch: int | None = None,
    landmarks: bool = True,
) -> Path:
    folder = store / "facial-recognition" / name
    make_scrfd(folder / "detection" / "model.onnx", batch_axis=batch_axis, landmarks=landmarks)
    make_arcface(folder / "recognition" / "model.onnx", batch=arcface_batch)
    return folder


class BareRecognizer(Model):
    """A model over one ArcFace-shaped file with nothing around its runs: for the tests of `Model.run` itself (its
    slot, its narrow session), without a pipeline's pre- and post-processing."""

    task, type = "facial-recognition", "recognition"

    def load(self) -> None:
        self.session = self.open(self.files["model"])

    def predict(self, payload, options):  # pragma: no cover - not used
        raise NotImplementedError
