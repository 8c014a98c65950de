"""Getting Chinese-CLIP-architecture models: OFA-Sys's weights as ready ONNX (transformers.js's exports, split
into towers: no torch), CN-CLIP (OFA-Sys) and QA-CLIP (TencentARC) checkpoints from Hugging Face / ModelScope
exported to ONNX with torch, or ready-made official-format ONNX files imported after validation.

QA-CLIP keeps Chinese-CLIP's architecture, tokenizer and checkpoint format, so it is fetched, exported and
served exactly like CN-CLIP, under its own names (QA-CLIP-<arch>).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from immich_aio.download import hf
from immich_aio.download.fetch import (
    DOWNLOAD_RECORDS,
    DownloadError,
    download,
    forget,
    modelscope_listing,
    modelscope_url,
    say,
)
from immich_aio.download.install import staged
from immich_aio.download.validate import torch_checkpoint, vocabulary
from immich_aio.names.fetchable import CHINESE_ONNX_REPOS
from immich_aio.store import ModelStore, clean_name
from immich_aio.tasks import CLIP


@dataclass(frozen=True)
class Release:
    family: str  # the served name's prefix: CN-CLIP or QA-CLIP
    arch: str  # cn_clip's architecture name (model_configs)
    hf_repo: str
    checkpoint: str  # file in the repo
    image_size: int
    embed_dim: int
    modelscope_repo: str | None = None


def _cn(arch: str, repo: str, ckpt: str, size: int, dim: int) -> Release:
    return Release("CN-CLIP", arch, f"OFA-Sys/{repo}", ckpt, size, dim, f"AI-ModelScope/{repo}")


def _qa(arch: str, ckpt: str, size: int, dim: int) -> Release:
    return Release("QA-CLIP", arch, "TencentARC/QA-CLIP", ckpt, size, dim)


RELEASES: dict[str, dict[str, Release]] = {
    "cn-clip": {
        "ViT-B-16": _cn("ViT-B-16", "chinese-clip-vit-base-patch16", "clip_cn_vit-b-16.pt", 224, 512),
        "ViT-L-14": _cn("ViT-L-14", "chinese-clip-vit-large-patch14", "clip_cn_vit-l-14.pt", 224, 768),
        "ViT-L-14-336": _cn(
            "ViT-L-14-336", "chinese-clip-vit-large-patch14-336px", "clip_cn_vit-l-14-336.pt", 336, 768
        ),
        "ViT-H-14": _cn("ViT-H-14", "chinese-clip-vit-huge-patch14", "clip_cn_vit-h-14.pt", 224, 1024),
        "RN50": _cn("RN50", "chinese-clip-rn50", "clip_cn_rn50.pt", 224, 1024),
    },
    "qa-clip": {
        "ViT-B-16": _qa("ViT-B-16", "QA-CLIP-base.pt", 224, 512),
        "ViT-L-14": _qa("ViT-L-14", "QA-CLIP-large.pt", 224, 768),
        "ViT-L-14-336": _qa("ViT-L-14-336", "QA-CLIP-large-336.pt", 336, 768),
        "RN50": _qa("RN50", "QA-CLIP-RN50.pt", 224, 1024),
    },
}
# Every release shares BERT-Chinese's vocabulary; it is fetched from the CN-CLIP ViT-B-16 repository.
VOCAB = RELEASES["cn-clip"]["ViT-B-16"]


@dataclass(frozen=True)
class OnnxRelease:
    """transformers.js's ONNX export of OFA-Sys's own weights (one graph for both towers)."""

    repo: str
    revision: str  # a commit, so the files never change under a name; "main" where no commit id was confirmed
    image_size: int
    embed_dim: int


# Commits: the ones the Hub showed for the ViT-L repos' `onnx/` folders (2025). For ViT-B-16 only an abbreviated
# id (3100d72) could be read from here; it follows `main`, and the commit fetched is recorded in config.json.
ONNX_RELEASES: dict[str, OnnxRelease] = {
    "ViT-B-16": OnnxRelease(CHINESE_ONNX_REPOS["ViT-B-16"], "main", 224, 512),
    "ViT-L-14": OnnxRelease(CHINESE_ONNX_REPOS["ViT-L-14"], "d5830db712737ffee8eb3e4511b4153891da323a", 224, 768),
    "ViT-L-14-336": OnnxRelease(
        CHINESE_ONNX_REPOS["ViT-L-14-336"], "c1fa1b6a8082d7fdde95bd87d763448249cbfe46", 336, 768
    ),
}
# Which file of the export each precision takes; fp32 is the default because only it gives cn_clip's vectors.
PRECISIONS = {"fp32": "onnx/model.onnx", "fp16": "onnx/model_fp16.onnx", "int8": "onnx/model_quantized.onnx"}


def served_name(arch: str, family: str = "cn-clip") -> str:
    return f"{RELEASES[family][arch].family}-{arch}"


def _fetch(store: ModelStore, release: Release, filename: str, source: str, validate) -> Path:
    """One file of a release from Hugging Face (huggingface_hub, verified) or ModelScope (own client)."""
    if source == "modelscope":
        if release.modelscope_repo is None:
            raise DownloadError(f"{release.family} is not on ModelScope; use --source hf (HF_ENDPOINT for a mirror)")
        listed = modelscope_listing(release.modelscope_repo).get(filename, {})
        sha, size = listed.get("sha256"), listed.get("size")
        sha = sha if isinstance(sha, str) else None
        size = size if isinstance(size, int) else None
        dest = store.root / ".downloads" / "modelscope" / release.modelscope_repo.replace("/", "--") / filename
        return download(modelscope_url(release.modelscope_repo, filename), dest, sha, size=size, validate=validate)
    snapshot = hf.fetch(store.root, release.hf_repo, (filename,))
    path = snapshot.path(filename)
    try:
        validate(path)
    except ValueError as e:
        hf.forget(snapshot.folder, filename)
        raise DownloadError(f"{filename} from {release.hf_repo} is not usable: {e}; deleted it, run again") from e
    return path


def fetch_vocab(store: ModelStore, source: str) -> Path:
    return _fetch(store, VOCAB, "vocab.txt", source, vocabulary)


def fetch_and_export(
    store: ModelStore,
    arch: str,
    source: str = "hf",
    fp16: bool = False,
    name: str | None = None,
    family: str = "cn-clip",
) -> Path:
    """Download `<checkpoint>.pt` (+ vocab), export both towers, install as <family>-<arch>."""
    from immich_aio.download import clip_export

    clip_export.require()
    release = RELEASES[family][arch]
    where = "ModelScope" if source == "modelscope" else hf.endpoint()
    say(f"Fetching {release.checkpoint} ({release.family} {arch}) from {where}")
    checkpoint = _fetch(store, release, release.checkpoint, source, torch_checkpoint)
    vocab = fetch_vocab(store, source)
    say(f"Exporting {release.family} {arch} to ONNX{' (fp16)' if fp16 else ''}")
    try:
        model = clip_export.model_from_checkpoint(checkpoint, clip_export.arch_config(arch))
    except (RuntimeError, KeyError, ValueError, EOFError) as e:
        forget(checkpoint)
        hf.forget(checkpoint.parent, release.checkpoint)
        raise DownloadError(
            f"{release.checkpoint} could not be read as a {release.family} {arch} checkpoint ({e}); "
            "deleted it, run the command again"
        ) from e
    target = name or served_name(arch, family)
    with staged(store, CLIP, target) as stage:
        config = clip_export.export(model, stage, release.image_size, fp16=fp16)
        config["family"] = release.family
        (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shutil.copyfile(vocab, stage / "textual" / "vocab.txt")
    say(f"Installed {target} ({config['embed_dim']}-d) in {store.model_dir(CLIP, target)}")
    return store.model_dir(CLIP, target)


def fetch_onnx(store: ModelStore, arch: str, precision: str = "fp32", name: str | None = None) -> Path:
    """OFA-Sys's weights from transformers.js's export, split into the store's towers: no torch anywhere."""
    from immich_aio.download.clip_split import SplitError, split_in_child

    if arch not in ONNX_RELEASES:
        raise ValueError(
            f"no ready ONNX export of CN-CLIP {arch}; one of {', '.join(ONNX_RELEASES)} "
            f"(or export the checkpoint with torch: --export)"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
    release = ONNX_RELEASES[arch]
    graph_file = PRECISIONS[precision]
    say(f"Fetching {release.repo} ({graph_file}, {precision}) from {hf.endpoint()}")
    snapshot = hf.fetch(store.root, release.repo, (graph_file, "vocab.txt"), revision=release.revision)
    vocab = snapshot.path("vocab.txt")
    try:
        vocabulary(vocab)
    except ValueError as e:
        hf.forget(snapshot.folder, "vocab.txt")
        raise DownloadError(f"vocab.txt from {release.repo} is not usable: {e}; deleted it, run again") from e
    target = name or served_name(arch)
    say(f"Splitting {graph_file} into the image and text towers")
    with staged(store, CLIP, target) as stage:
        try:
            result = split_in_child(snapshot.path(graph_file), stage, vocab, release.image_size)
        except SplitError as e:
            hf.forget(snapshot.folder, graph_file)
            raise DownloadError(
                f"{graph_file} from {release.repo} could not be split: {e}; deleted it, run again"
            ) from e
        if result["embed_dim"] != release.embed_dim:
            raise DownloadError(f"{release.repo} gives {result['embed_dim']}-d vectors, not {release.embed_dim}")
        shutil.copyfile(vocab, stage / "textual" / "vocab.txt")
        config = {
            "model_type": "cn-clip",
            "family": "CN-CLIP",
            "embed_dim": release.embed_dim,
            "image_size": release.image_size,
            "context_length": 52,
            "precision": precision,
            "source": f"{release.repo}@{snapshot.commit} ({graph_file}), split into towers",
        }
        (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    hf.discard(snapshot)
    say(f"Installed {target} ({release.embed_dim}-d, {precision}) in {store.model_dir(CLIP, target)}")
    return store.model_dir(CLIP, target)


class InvalidModel(ValueError):
    pass


IMMICH_PATTERNS = ("config.json", "visual/*", "textual/*")


def fetch_immich(store: ModelStore, requested: str) -> Path:
    """Immich's own CLIP model `immich-app/<name>` from Hugging Face (HF_ENDPOINT honoured), checked, whole."""
    from immich_aio.names.catalog import IMMICH_CLIP_DIMS

    name = clean_name(requested)
    if name not in IMMICH_CLIP_DIMS:
        raise InvalidModel(f"{requested!r} is not one of the CLIP names the Immich server accepts (see README)")
    repo = f"immich-app/{name}"
    snapshot = hf.fetch(store.root, repo, IMMICH_PATTERNS)
    try:
        files = check_immich_clip(snapshot.folder, IMMICH_CLIP_DIMS[name])
    except InvalidModel as e:
        hf.discard(snapshot)
        raise InvalidModel(f"{repo} from {hf.endpoint()}: {e}; deleted the download, run again") from e
    with staged(store, CLIP, name) as stage:
        for rel in files:
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(snapshot.folder / rel, stage / rel)
    hf.discard(snapshot)
    say(f"Installed Immich's {name} ({IMMICH_CLIP_DIMS[name]}-d) in {store.model_dir(CLIP, name)}")
    return store.model_dir(CLIP, name)


def check_immich_clip(folder: Path, dim: int) -> list[str]:
    """The files of an Immich CLIP folder that form the model, after checking that each is what it should be."""
    from tokenizers import Tokenizer

    from immich_aio.download.validate import load_onnx
    from immich_aio.models.clip_immich import TEXTUAL_FILES, VISUAL_FILES, Preprocess

    rel = [
        str(p.relative_to(folder))
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".cache" not in p.parts and not p.name.endswith(DOWNLOAD_RECORDS)
    ]
    needed = ["config.json", *(f"visual/{f}" for f in VISUAL_FILES), *(f"textual/{f}" for f in TEXTUAL_FILES)]
    missing = [f for f in needed if f not in rel]
    if missing:
        raise InvalidModel(f"missing {', '.join(missing)}")
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
        Preprocess.read(folder / "visual" / "preprocess_cfg.json")
        Tokenizer.from_file(str(folder / "textual" / "tokenizer.json"))
        json.loads((folder / "textual" / "tokenizer_config.json").read_text(encoding="utf-8"))["pad_token"]
    except Exception as e:  # tokenizers raises its own exception type for a bad tokenizer.json
        raise InvalidModel(f"a configuration or tokenizer file is not usable ({e})") from e
    for tower in ("visual", "textual"):
        try:
            session = load_onnx(folder / tower / "model.onnx")
        except ValueError as e:
            raise InvalidModel(f"{tower}/model.onnx: {e}") from e
        out = session.get_outputs()[0].shape[-1]
        if isinstance(out, int) and out != dim:
            raise InvalidModel(f"{tower}/model.onnx gives {out}-d vectors; Immich expects {dim}")
    return rel


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
        vocab = fetch_vocab(store, source)  # every release shares this vocabulary
    try:
        vocabulary(vocab)
    except ValueError as e:
        raise InvalidModel(f"{vocab}: {e}") from e

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
    say(f"Installed {clean_name(name)} ({image_dim}-d, {size}px) in {store.model_dir(CLIP, name)}")
    return store.model_dir(CLIP, name)
