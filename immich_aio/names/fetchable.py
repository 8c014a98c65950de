"""What is fetched for a name that has no model in the store: the rule, as data (no download code here).

- CLIP: by default the Chinese-CLIP of the name's dimension, from a ready ONNX export (no torch): 512-d ->
  CN-CLIP ViT-B-16, 768-d -> CN-CLIP ViT-L-14. Other dimensions have no torch-free Chinese-CLIP, so they
  get Immich's own model for the name, as does every name with IMMICH_AIO_AUTO_FETCH_CLIP=immich (exact
  upstream vectors). A name whose files exist is never answered by a fetched other model (the resolver
  prefers its own files).
- Faces: Immich's copy of the InsightFace pack, `immich-app/<pack>` on Hugging Face, as Immich ML does.
- OCR: a name the bundled model cannot read (its script is missing from the charset) gets its own files,
  PP-OCRv5 from RapidOCR's ModelScope repository, laid out as Immich ML does.

A plan names a fixed install target from these catalogues, never a client string, so the downloads a
client can start are bounded by the catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass

from immich_aio.tasks import CLIP, FACES, OCR

# The dimensions a ready, torch-free Chinese-CLIP exists for, and the one fetched (the cheaper of the two
# 768-d models: ViT-L-14-336 costs 2.3x the compute per image for a small gain).
CHINESE_ONNX_ARCH = {512: "ViT-B-16", 768: "ViT-L-14"}
CHINESE_ONNX_REPOS = {
    "ViT-B-16": "Xenova/chinese-clip-vit-base-patch16",
    "ViT-L-14": "Xenova/chinese-clip-vit-large-patch14",
    "ViT-L-14-336": "Xenova/chinese-clip-vit-large-patch14-336px",
}
CLIP_CHOICES = ("chinese", "immich")


@dataclass(frozen=True)
class FetchPlan:
    task: str
    target: str  # the store folder it installs: the single-flight and lock key
    kind: str  # "cn-clip-onnx" | "immich-clip" | "faces" | "ocr"
    arg: str  # the architecture, Immich name or pack the installer takes
    source: str  # where from, for /info and the log
    command: str  # the same install by hand

    @property
    def key(self) -> str:
        return f"{self.task}/{self.target}"

    @property
    def lock(self) -> str:
        return lock_key(self.task, self.target)


def lock_key(task: str, target: str) -> str:
    """What an install locks: its folder, or all of OCR (every language shares the detector's folder)."""
    return task if task == OCR else f"{task}/{target}"


def chinese_clip(arch: str) -> FetchPlan:
    return FetchPlan(
        CLIP,
        f"CN-CLIP-{arch}",
        "cn-clip-onnx",
        arch,
        f"Hugging Face {CHINESE_ONNX_REPOS[arch]} (ONNX, split into towers)",
        f"immich-aio models clip --arch {arch}",
    )


def immich_clip(name: str) -> FetchPlan:
    return FetchPlan(
        CLIP,
        name,
        "immich-clip",
        name,
        f"Hugging Face immich-app/{name}",
        f"immich-aio models clip --immich {name}",
    )


def clip_for(name: str, dim: int, choice: str) -> FetchPlan:
    """What is fetched for an Immich CLIP name of `dim` dimensions that no installed model can answer."""
    if choice == "chinese" and dim in CHINESE_ONNX_ARCH:
        return chinese_clip(CHINESE_ONNX_ARCH[dim])
    return immich_clip(name)


def faces(pack: str) -> FetchPlan:
    return FetchPlan(
        FACES,
        pack,
        "faces",
        pack,
        f"Hugging Face immich-app/{pack}",
        f"immich-aio models faces --pack {pack}",
    )


def ocr(name: str) -> FetchPlan:
    return FetchPlan(
        OCR,
        name,
        "ocr",
        name,
        "ModelScope RapidAI/RapidOCR (PP-OCRv5)",
        f"immich-aio models ocr --name {name}",
    )
