"""cn_clip as the reference implementation, for tests only.

cn_clip is installed without dependencies into tests/.vendor (scripts/test.sh). Its package imports
`torchvision.transforms` names at import time, and there is no working torchvision for the CPU torch
build, so a stub providing just those names is registered before the import. Nothing here is used
by the server.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path

VENDOR = Path(__file__).parent / ".vendor"

# A tiny CN-CLIP: real architecture code, random weights, the real 21128-token vocabulary.
TINY_CONFIG = {
    "embed_dim": 512,  # ViT-B-16's size, so Immich's 512-d names resolve to it
    "image_resolution": 32,
    "vision_layers": 2,
    "vision_width": 64,
    "vision_patch_size": 16,
    "vision_head_width": 32,
    "vocab_size": 21128,
    "text_attention_probs_dropout_prob": 0.1,
    "text_hidden_act": "gelu",
    "text_hidden_dropout_prob": 0.1,
    "text_hidden_size": 64,
    "text_initializer_range": 0.02,
    "text_intermediate_size": 128,
    "text_max_position_embeddings": 512,
    "text_num_attention_heads": 2,
    "text_num_hidden_layers": 2,
    "text_type_vocab_size": 2,
}


def _stub_torchvision() -> None:
    if "torchvision" in sys.modules:
        return
    tv = types.ModuleType("torchvision")
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    transforms = types.ModuleType("torchvision.transforms")
    transforms.__spec__ = importlib.machinery.ModuleSpec("torchvision.transforms", None)

    def _unavailable(*args, **kwargs):
        raise RuntimeError("torchvision transforms are stubbed in tests; preprocessing is computed separately")

    for name in ("Compose", "ToTensor", "Normalize", "Resize"):
        setattr(transforms, name, _unavailable)
    transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic", BILINEAR="bilinear")
    tv.transforms = transforms
    sys.modules["torchvision"] = tv
    sys.modules["torchvision.transforms"] = transforms


def import_cn_clip():
    """Return the `cn_clip.clip` package (model code + tokenizer)."""
    if not (VENDOR / "cn_clip").is_dir():
        from conftest import MissingTool

        raise MissingTool("cn_clip in tests/.vendor", "it installs the reference implementations")
    if str(VENDOR) not in sys.path:
        sys.path.insert(0, str(VENDOR))
    _stub_torchvision()
    import cn_clip.clip
    import cn_clip.clip.model

    return cn_clip.clip


def vocab_path() -> Path:
    return VENDOR / "cn_clip" / "clip" / "vocab.txt"


def tiny_model(seed: int = 0):
    import torch

    clip = import_cn_clip()
    torch.manual_seed(seed)
    return widen(clip.model.CLIP(**TINY_CONFIG).float().eval())


def widen(model):
    """Weight matrices drawn wide enough that different inputs give clearly different embeddings
    (at the default 0.02 init every text embeds to nearly the same vector, which proves nothing)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
            else:
                p.add_(torch.randn_like(p) * 0.02)
    return model


def install_tiny(store, model, name: str = "CN-CLIP-ViT-B-16") -> Path:
    """Export a tiny CN-CLIP into the store as an installed model (atomically, with a manifest)."""
    import shutil

    from immich_aio.download import clip_export
    from immich_aio.download.install import staged

    with staged(store, "clip", name) as stage:
        clip_export.export(model, stage, TINY_CONFIG["image_resolution"])
        shutil.copyfile(vocab_path(), stage / "textual" / "vocab.txt")
    return store.model_dir("clip", name)
