"""Chinese-CLIP without torch: transformers.js's ONNX export of OFA-Sys's weights, split into the store's towers.

`Xenova/chinese-clip-vit-*` hold one graph for both towers (inputs `pixel_values`, `input_ids`,
`attention_mask`; outputs `logits_per_image`, `logits_per_text`, `text_embeds`, `image_embeds`, the embeds
L2-normalised as in transformers' `ChineseCLIPModel.forward`). Serving one tower from that graph would
run both, so it is split with ONNX's own extractor into the store's format:

- `visual/model.onnx`: `image` float [N,3,S,S] -> the image projection, taken before the normalisation;
- `textual/model.onnx`: `text` int64 [N,L] -> the text projection, likewise. The attention mask is computed
  inside from the ids (`text != [PAD]`), as cn_clip does, so the tower has the official export's one input.

The raw projections are what MT Photos sends; Immich's answer normalises them. Before anything is kept, the
split towers are run against the combined graph on the same inputs (1 - cosine <= 1e-5 for fp32 files).

Memory: the weights are first moved to external data, so the extractor (which runs shape inference on a
serialised copy) works on a graph of kilobytes; each tower's weights are then loaded into it alone. The peak
is about the combined file's size, in a child process (`python -m immich_aio.download.clip_split`) that
gives it all back when it exits: neither the CLI nor the server keeps that memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

PASSTHROUGH = ("Identity", "Cast")  # fp16 exports cast their outputs back to float32
TOWERS = {"visual": ("image_embeds", ("pixel_values",), "image"), "textual": ("text_embeds", ("input_ids",), "text")}


class SplitError(ValueError):
    pass


def _unnormalised(graph, output: str) -> str:
    """The tensor `output` is the L2 normalisation of: the first input of the Div that produces it."""
    producers = {o: n for n in graph.node for o in n.output}
    name = output
    for _ in range(8):
        node = producers.get(name)
        if node is None:
            break
        if node.op_type == "Div":
            return node.input[0]
        if node.op_type not in PASSTHROUGH:
            break
        name = node.input[0]
    raise SplitError(f"{output!r} is not produced by a normalising Div: not a transformers.js Chinese-CLIP export")


def _rename_input(model, old: str, new: str) -> None:
    for value in model.graph.input:
        if value.name == old:
            value.name = new
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _rename_output(model, old: str, new: str) -> None:
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for value in model.graph.output:
        if value.name == old:
            value.name = new


def _mask_from_ids(model, ids: str, pad_id: int) -> None:
    """Replace the graph input `attention_mask` by `Cast(Not(Equal(ids, pad_id)), int64)`."""
    from onnx import TensorProto, helper

    graph = model.graph
    mask_inputs = [v for v in graph.input if v.name == "attention_mask"]
    if not mask_inputs:
        return  # the extracted tower does not read the mask (never the case for transformers' BERT)
    mask_type = mask_inputs[0].type.tensor_type.elem_type
    graph.input.remove(mask_inputs[0])
    pad = helper.make_tensor("split/pad_id", TensorProto.INT64, [], [pad_id])
    nodes = [
        helper.make_node("Equal", [ids, "split/pad_id"], ["split/is_pad"]),
        helper.make_node("Not", ["split/is_pad"], ["split/is_token"]),
        helper.make_node("Cast", ["split/is_token"], ["attention_mask"], to=mask_type),
    ]
    graph.initializer.append(pad)
    for i, node in enumerate(nodes):
        graph.node.insert(i, node)


def pad_id(vocab: Path) -> int:
    for i, token in enumerate(vocab.read_text(encoding="utf-8").splitlines()):
        if token.strip() == "[PAD]":
            return i
    raise SplitError(f"{vocab} has no [PAD] token")


def split(combined: Path, out_dir: Path, vocab: Path, image_size: int) -> dict[str, int]:
    """Write `visual/model.onnx` and `textual/model.onnx` into out_dir; returns {"embed_dim": D}."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data, load_external_data_for_model
    from onnx.utils import Extractor

    try:
        model = onnx.load(str(combined))
    except Exception as e:  # protobuf and onnx raise several types for a damaged file
        raise SplitError(f"{combined.name} is not a readable ONNX model ({e})") from e
    outputs = {o.name for o in model.graph.output}
    inputs = {i.name for i in model.graph.input}
    if not {"image_embeds", "text_embeds"} <= outputs or not {"pixel_values", "input_ids"} <= inputs:
        raise SplitError(
            f"{combined.name} is not a combined Chinese-CLIP graph (inputs {sorted(inputs)}, outputs {sorted(outputs)})"
        )
    with tempfile.TemporaryDirectory(prefix="clip-split-", dir=out_dir) as tmp:
        light = Path(tmp) / "combined.onnx"
        convert_model_to_external_data(model, all_tensors_to_one_file=True, location="weights.bin")
        onnx.save(model, str(light))
        del model
        graph = onnx.load(str(light), load_external_data=False)
        extractor = Extractor(onnx.shape_inference.infer_shapes(graph))  # the extractor needs value infos
        for folder, (embeds, tower_inputs, new_input) in TOWERS.items():
            raw = _unnormalised(graph.graph, embeds)
            reads_mask = folder == "textual" and "attention_mask" in inputs
            tower = extractor.extract_model([*tower_inputs, *(["attention_mask"] if reads_mask else [])], [raw])
            if folder == "textual":
                _mask_from_ids(tower, tower_inputs[0], pad_id(vocab))
            _rename_input(tower, tower_inputs[0], new_input)
            _rename_output(tower, raw, f"unnorm_{new_input}_features")
            load_external_data_for_model(tower, tmp)
            for tensor in tower.graph.initializer:  # weights back inside the tower's own file
                tensor.ClearField("data_location")
                del tensor.external_data[:]
            path = out_dir / folder / "model.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            onnx.save(tower, str(path))
            del tower
    try:
        return {"embed_dim": check(combined, out_dir, pad_id(vocab), image_size)}
    except SplitError:
        raise
    except Exception as e:  # ONNX Runtime's own error types
        raise SplitError(f"the split towers could not be checked against {combined.name}: {e}") from e


def check(combined: Path, out_dir: Path, pad: int, size: int) -> int:
    """Run the towers and the combined graph on the same inputs; their embeddings must agree."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    whole = ort.InferenceSession(str(combined), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, 3, size, size)).astype(np.float32)
    ids = np.full((2, 12), pad, dtype=np.int64)
    ids[0, :5] = (101, 2769, 4263, 1266, 102)
    ids[1, :8] = (101, 3173, 1921, 4638, 3221, 671, 702, 102)
    feeds = {"pixel_values": image, "input_ids": ids, "attention_mask": (ids != pad).astype(np.int64)}
    feeds = {i.name: feeds[i.name] for i in whole.get_inputs()}
    expected = dict(
        zip(["image_embeds", "text_embeds"], whole.run(["image_embeds", "text_embeds"], feeds), strict=True)
    )
    del whole
    fp32 = all(
        i.type == "tensor(float)"
        for i in ort.InferenceSession(
            str(out_dir / "visual" / "model.onnx"), opts, providers=["CPUExecutionProvider"]
        ).get_inputs()
    )
    limit = 1e-5 if fp32 else 1e-3
    dim = 0
    for folder, (embeds, _inputs, new_input) in TOWERS.items():
        session = ort.InferenceSession(str(out_dir / folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        x: np.ndarray = image if folder == "visual" else ids
        x = x.astype(np.float16) if session.get_inputs()[0].type == "tensor(float16)" else x
        got = session.run(None, {new_input: x})[0].astype(np.float32)
        got = got / np.linalg.norm(got, axis=-1, keepdims=True)
        ref = expected[embeds].astype(np.float32)
        ref = ref / np.linalg.norm(ref, axis=-1, keepdims=True)
        worst = float(1 - (got * ref).sum(-1).min())
        if not np.isfinite(worst) or worst > limit:
            raise SplitError(f"the split {folder} tower disagrees with the combined graph (1 - cosine = {worst:.2e})")
        dim = got.shape[-1]
    return dim


def split_in_child(
    combined: Path, out_dir: Path, vocab: Path, image_size: int, timeout: float = 3600
) -> dict[str, int]:
    """`split` in a child process: the parent never holds the combined graph's memory."""
    args = [str(combined), str(out_dir), str(vocab), str(image_size)]
    proc = subprocess.run(
        [sys.executable, "-m", "immich_aio.download.clip_split", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise SplitError(lines[-1] if lines else f"splitting {combined.name} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    import immich_aio  # noqa: F401  (telemetry off before onnxruntime loads)

    try:
        result = split(Path(argv[0]), Path(argv[1]), Path(argv[2]), int(argv[3]))
    except SplitError as e:
        print(f"{e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
