"""Getting CN-CLIP models: official checkpoints from Hugging Face / ModelScope exported to ONNX, or
ready-made official-format ONNX files imported after validation."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from immich_aio.download.fetch import download, hf_url, modelscope_url
from immich_aio.download.install import staged
from immich_aio.protocol import CLIP
from immich_aio.store import ModelStore, clean_name


@dataclass(frozen=True)
class Release:
    repo: str  # same repository name under OFA-Sys (Hugging Face) and AI-ModelScope (ModelScope)
    checkpoint: str
    image_size: int
    embed_dim: int


RELEASES = {
    "ViT-B-16": Release("chinese-clip-vit-base-patch16", "clip_cn_vit-b-16.pt", 224, 512),
    "ViT-L-14": Release("chinese-clip-vit-large-patch14", "clip_cn_vit-l-14.pt", 224, 768),
    "ViT-L-14-336": Release("chinese-clip-vit-large-patch14-336px", "clip_cn_vit-l-14-336.pt", 336, 768),
    "ViT-H-14": Release("chinese-clip-vit-huge-patch14", "clip_cn_vit-h-14.pt", 224, 1024),
    "RN50": Release("chinese-clip-rn50", "clip_cn_rn50.pt", 224, 1024),
}


def served_name(arch: str) -> str:
    return f"CN-CLIP-{arch}"


def hub_url(release: Release, filename: str, source: str) -> str:
    if source == "modelscope":
        return modelscope_url(f"AI-ModelScope/{release.repo}", filename)
    return hf_url(f"OFA-Sys/{release.repo}", filename)


def fetch_vocab(store: ModelStore, release: Release, source: str) -> Path:
    return download(hub_url(release, "vocab.txt", source), store.root / ".downloads" / f"{release.repo}-vocab.txt")


def fetch_and_export(
    store: ModelStore, arch: str, source: str = "hf", fp16: bool = False, name: str | None = None
) -> Path:
    """Download `clip_cn_<arch>.pt` (+ vocab), export both towers, install as CN-CLIP-<arch>."""
    from immich_aio.download import clip_export

    clip_export.require()
    release = RELEASES[arch]
    print(f"Fetching {release.checkpoint} from {'ModelScope' if source == 'modelscope' else 'Hugging Face'}")
    checkpoint = download(hub_url(release, release.checkpoint, source), store.root / ".downloads" / release.checkpoint)
    vocab = fetch_vocab(store, release, source)
    print(f"Exporting {arch} to ONNX{' (fp16)' if fp16 else ''}")
    model = clip_export.model_from_checkpoint(checkpoint, clip_export.arch_config(arch))
    target = name or served_name(arch)
    with staged(store, CLIP, target) as stage:
        config = clip_export.export(model, stage, release.image_size, fp16=fp16)
        shutil.copyfile(vocab, stage / "textual" / "vocab.txt")
    print(f"Installed {target} ({config['embed_dim']}-d) in {store.model_dir(CLIP, target)}")
    return store.model_dir(CLIP, target)


class InvalidModel(ValueError):
    pass


def _inspect(path: Path, expect_input: str, rank: int):
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise InvalidModel(f"{path} is not a loadable ONNX model: {e}") from e
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or inputs[0].name != expect_input or len(inputs[0].shape) != rank:
        got = [(i.name, i.shape) for i in inputs]
        raise InvalidModel(f"{path.name}: expected one input {expect_input!r} of rank {rank}, got {got}")
    if len(outputs[0].shape) != 2:
        raise InvalidModel(f"{path.name}: expected an output [N, D], got {outputs[0].shape}")
    return session


def import_onnx(
    store: ModelStore,
    image_file: Path,
    text_file: Path,
    name: str,
    vocab: Path | None = None,
    source: str = "hf",
    context_length: int | None = None,
) -> Path:
    """Validate official-format ONNX towers and install them (with any external-data file) as `name`."""
    visual = _inspect(image_file, "image", 4)
    textual = _inspect(text_file, "text", 2)
    shape = visual.get_inputs()[0].shape
    if shape[1] != 3 or not isinstance(shape[2], int) or shape[2] != shape[3]:
        raise InvalidModel(f"{image_file.name}: expected image input [N, 3, S, S] with a fixed S, got {shape}")
    size = int(shape[2])
    text_shape = textual.get_inputs()[0].shape
    length = context_length or (text_shape[1] if isinstance(text_shape[1], int) else 52)
    if "int" not in textual.get_inputs()[0].type:
        raise InvalidModel(
            f"{text_file.name}: text input must be integer token ids, got {textual.get_inputs()[0].type}"
        )
    ids = np.zeros((1, length), dtype=np.int32 if "int32" in textual.get_inputs()[0].type else np.int64)
    ids[0, :3] = (101, 679, 102)
    image_dim = visual.run(None, {"image": np.zeros((1, 3, size, size), np.float32)})[0].shape[-1]
    text_dim = textual.run(None, {"text": ids})[0].shape[-1]
    if image_dim != text_dim:
        raise InvalidModel(f"image tower gives {image_dim}-d features but text tower {text_dim}-d: not a pair")
    if vocab is None:
        vocab = fetch_vocab(store, RELEASES["ViT-B-16"], source)  # all CN-CLIP releases share this vocabulary
    if len(vocab.read_text(encoding="utf-8").splitlines()) < 1000:
        raise InvalidModel(f"{vocab} does not look like a BERT vocabulary")

    with staged(store, CLIP, name) as stage:
        for folder, src in (("visual", image_file), ("textual", text_file)):
            (stage / folder).mkdir()
            shutil.copyfile(src, stage / folder / "model.onnx")
            # Official fp16 exports keep weights in `<file>.extra_file`, referenced by that name.
            for extra in (src.with_name(src.name + ".extra_file"), src.with_name(src.name + ".data")):
                if extra.is_file():
                    shutil.copyfile(extra, stage / folder / extra.name)
        shutil.copyfile(vocab, stage / "textual" / "vocab.txt")
        config = {
            "model_type": "cn-clip",
            "embed_dim": int(image_dim),
            "image_size": size,
            "context_length": int(length),
            "imported_from": [image_file.name, text_file.name],
        }
        (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"Installed {clean_name(name)} ({image_dim}-d, {size}px) in {store.model_dir(CLIP, name)}")
    return store.model_dir(CLIP, name)
