"""Export a Chinese-CLIP torch model to the store's ONNX format (needs the `export` extra, never the server).

Same I/O as the official export (`image` / `text` in, unnormalised features out) but with a
dynamic batch axis, so the server can batch requests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

# cn_clip's released architectures: vision + text config files (cn_clip/clip/model_configs). Image sizes
# and hub locations live with the downloader (download/clip.py RELEASES).
ARCH_STRUCTS = {
    "ViT-B-16": ("ViT-B-16", "RoBERTa-wwm-ext-base-chinese"),
    "ViT-L-14": ("ViT-L-14", "RoBERTa-wwm-ext-base-chinese"),
    "ViT-L-14-336": ("ViT-L-14-336", "RoBERTa-wwm-ext-base-chinese"),
    "ViT-H-14": ("ViT-H-14", "RoBERTa-wwm-ext-large-chinese"),
    "RN50": ("RN50", "RBT3-chinese"),
}

EXPORT_HELP = (
    "Exporting a checkpoint needs torch and Chinese-CLIP's model code: "
    "pip install 'immich-aio[export]' torchvision && pip install --no-deps cn_clip==1.6.0 "
    "(or import ready-made ONNX files with --onnx-image/--onnx-text, which needs neither)"
)


def _cn_clip():
    try:
        import cn_clip.clip.model as model_module
        import torch  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"{EXPORT_HELP} ({e})") from e
    return model_module


def require() -> None:
    """Fail before a long download when the export tools are missing."""
    _cn_clip()


def arch_config(arch: str) -> dict[str, Any]:
    """cn_clip's vision + text config for a released architecture, read from its package."""
    vision, text = ARCH_STRUCTS[arch]
    configs = Path(_cn_clip().__file__).parent / "model_configs"
    cfg = json.loads((configs / f"{vision}.json").read_text())
    cfg.update(json.loads((configs / f"{text}.json").read_text()))
    if isinstance(cfg["vision_layers"], str):  # RN50 stores "[3, 4, 6, 3]"
        cfg["vision_layers"] = json.loads(cfg["vision_layers"])
    return cfg


def model_from_checkpoint(checkpoint: Path, config: dict[str, Any]):
    """Build cn_clip's CLIP in fp32 and load a `clip_cn_*.pt` state dict into it."""
    import torch

    model = _cn_clip().CLIP(**config)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items() if "bert.pooler" not in k}
    model.load_state_dict(state)
    return model.float().eval()


def export(model, out_dir: Path, image_size: int, context_length: int = 52, fp16: bool = False) -> dict[str, Any]:
    """Write config.json, visual/model.onnx and textual/model.onnx into out_dir; returns the config.

    The vocabulary (textual/vocab.txt) is the caller's to place: it comes with the checkpoint.
    """
    import torch

    class Tower(torch.nn.Module):
        """One encoder of the CLIP model as a module of its own (the official export's I/O)."""

        def __init__(self, encode: str) -> None:
            super().__init__()
            self.clip, self.encode = model, encode

        def forward(self, x):
            return getattr(self.clip, self.encode)(x)

    image = torch.randn(2, 3, image_size, image_size)
    text = torch.zeros(2, context_length, dtype=torch.long)
    text[:, 0], text[:, 1:6], text[:, 6] = 101, torch.arange(670, 675), 102
    towers = {
        "visual": (Tower("encode_image").eval(), image, "image", "unnorm_image_features"),
        "textual": (Tower("encode_text").eval(), text, "text", "unnorm_text_features"),
    }
    embed_dim = 0
    for folder, (wrapper, example, in_name, out_name) in towers.items():
        path = out_dir / folder / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            expected = wrapper(example).float().numpy()
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                input_names=[in_name],
                output_names=[out_name],
                dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        if fp16:
            _to_fp16(path)
        _check(path, in_name, example.numpy(), expected, tol=5e-2 if fp16 else 1e-3)
        embed_dim = expected.shape[-1]
    config = {
        "model_type": "cn-clip",
        "embed_dim": int(embed_dim),
        "image_size": image_size,
        "context_length": context_length,
        "precision": "fp16" if fp16 else "fp32",
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def _to_fp16(path: Path) -> None:
    """fp16 weights with float32/int64 I/O (ONNX Runtime's converter; onnxconverter-common's breaks the text tower)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), str(path))


def _check(path: Path, in_name: str, example: np.ndarray, expected: np.ndarray, tol: float) -> None:
    import onnxruntime as ort

    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {in_name: example})[0]
    a = got / np.linalg.norm(got, axis=-1, keepdims=True)
    b = expected / np.linalg.norm(expected, axis=-1, keepdims=True)
    worst = float(1 - (a * b).sum(-1).min())
    if worst > tol:
        raise RuntimeError(f"exported {path.name} disagrees with torch (1 - cosine = {worst:.2e})")
