"""A transformers.js-style Chinese-CLIP export for tests, and the same weights as a cn_clip model.

transformers.js publishes `Xenova/chinese-clip-vit-*` as one ONNX graph for both towers, exported from
transformers' `ChineseCLIPModel` with the zero-shot-image-classification I/O (inputs `input_ids`,
`pixel_values`, `attention_mask`; outputs `logits_per_image`, `logits_per_text`, `text_embeds`, `image_embeds`,
dynamic batch and sequence axes). `combined_export` builds that from a random-weight model at test time, and
`as_cn_clip` loads the same weights into cn_clip's own `CLIP`, so a test can compare the split towers with
cn_clip's export of identical weights.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _import_transformers_model():
    """transformers' ChineseCLIP, imported with cnclip_ref's torchvision stub out of the way (it breaks
    transformers' image utilities, which look for the real package)."""
    stub = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "torchvision" or k.startswith("torchvision.")}
    try:
        from transformers import ChineseCLIPConfig, ChineseCLIPModel
    finally:
        sys.modules.update(stub)
    return ChineseCLIPConfig, ChineseCLIPModel


ChineseCLIPConfig, ChineseCLIPModel = _import_transformers_model()

# cnclip_ref.TINY_CONFIG's architecture in transformers' terms.
IMAGE_SIZE = 32


def tiny_hf_model(seed: int = 0):
    import torch
    from cnclip_ref import widen

    config = ChineseCLIPConfig(
        text_config={
            "vocab_size": 21128,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 128,
            "max_position_embeddings": 512,
            "type_vocab_size": 2,
        },
        vision_config={
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 256,
            "image_size": IMAGE_SIZE,
            "patch_size": 16,
        },
        projection_dim=512,
    )
    config._attn_implementation = "eager"  # the export traces plain attention, as transformers.js's did
    torch.manual_seed(seed)
    return widen(ChineseCLIPModel(config).float().eval())


def combined_export(model, path: Path) -> Path:
    """One graph for both towers, with transformers.js's (optimum's) input and output names and dynamic axes."""
    import torch

    class Both(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, pixel_values, attention_mask):
            out = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
            return out.logits_per_image, out.logits_per_text, out.text_embeds, out.image_embeds

    ids = torch.tensor([[101, 2769, 4263, 1266, 102, 0, 0], [101, 3173, 1921, 102, 0, 0, 0]])
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            Both().eval(),
            (ids, pixels, (ids != 0).long()),
            str(path),
            input_names=["input_ids", "pixel_values", "attention_mask"],
            output_names=["logits_per_image", "logits_per_text", "text_embeds", "image_embeds"],
            dynamic_axes={
                "input_ids": {0: "text_batch_size", 1: "sequence_length"},
                "pixel_values": {0: "image_batch_size", 1: "num_channels", 2: "height", 3: "width"},
                "attention_mask": {0: "text_batch_size", 1: "sequence_length"},
                "logits_per_image": {0: "image_batch_size", 1: "text_batch_size"},
                "logits_per_text": {0: "text_batch_size", 1: "image_batch_size"},
                "text_embeds": {0: "text_batch_size"},
                "image_embeds": {0: "image_batch_size"},
            },
            opset_version=14,
            dynamo=False,
        )
    return path


def quantized(combined: Path, path: Path) -> Path:
    """transformers.js's `model_quantized.onnx`: ONNX Runtime's dynamic int8 quantisation of the same graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(combined), str(path), weight_type=QuantType.QUInt8)
    return path


def as_cn_clip(hf_model):
    """cn_clip's CLIP holding exactly the weights of a transformers ChineseCLIPModel (tiny architecture)."""
    import torch
    from cnclip_ref import TINY_CONFIG, import_cn_clip

    clip = import_cn_clip()
    target = clip.model.CLIP(**TINY_CONFIG).float().eval()
    src = hf_model.state_dict()
    out = {}
    # vision: ViT with one fused qkv projection per block in cn_clip, three in transformers
    v = "vision_model."
    out["visual.class_embedding"] = src[v + "embeddings.class_embedding"]
    out["visual.positional_embedding"] = src[v + "embeddings.position_embedding.weight"]
    out["visual.conv1.weight"] = src[v + "embeddings.patch_embedding.weight"]
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            out[f"visual.{ours}.{p}"] = src[f"{v}{theirs}.{p}"]
    out["visual.proj"] = src["visual_projection.weight"].T
    for i in range(TINY_CONFIG["vision_layers"]):
        a, b = f"visual.transformer.resblocks.{i}.", f"{v}encoder.layers.{i}."
        for p in ("weight", "bias"):
            qkv = [src[f"{b}self_attn.{x}_proj.{p}"] for x in ("q", "k", "v")]
            out[f"{a}attn.in_proj_{p}"] = torch.cat(qkv)
            out[f"{a}attn.out_proj.{p}"] = src[f"{b}self_attn.out_proj.{p}"]
            out[f"{a}ln_1.{p}"] = src[f"{b}layer_norm1.{p}"]
            out[f"{a}ln_2.{p}"] = src[f"{b}layer_norm2.{p}"]
            out[f"{a}mlp.c_fc.{p}"] = src[f"{b}mlp.fc1.{p}"]
            out[f"{a}mlp.c_proj.{p}"] = src[f"{b}mlp.fc2.{p}"]
    # text: the same BERT under another prefix; the pooler is unused by both
    for key, value in src.items():
        if key.startswith("text_model.") and ".pooler." not in key:
            out["bert." + key.removeprefix("text_model.")] = value
    out["text_projection"] = src["text_projection.weight"].T
    out["logit_scale"] = src["logit_scale"]
    wanted = {k for k in target.state_dict() if "bert.pooler" not in k}
    missing = wanted - set(out)
    if missing:
        raise KeyError(f"no transformers weight for {sorted(missing)[:5]}")
    target.load_state_dict({k: v for k, v in out.items() if k in wanted}, strict=False)
    return target
