"""CLIP names: CN-CLIP folders under their own names, and the names the Immich server accepts.

The Immich server only saves CLIP model names from its fixed list, each with a fixed embedding
size (the size of its pgvector column). A whitelisted name is therefore served by an installed
CN-CLIP model of the same dimension; a name whose dimension differs is refused, since the server's
database writes would fail.
"""

from __future__ import annotations

from pathlib import Path

from immich_aio.errors import BadRequest, ModelMissing
from immich_aio.models.base import ModelSpec, Resolver
from immich_aio.models.clip import ClipConfig, CnClipTextual, CnClipVisual, is_cn_clip
from immich_aio.protocol import CLIP, TEXTUAL, VISUAL
from immich_aio.sessions import SessionFactory
from immich_aio.store import ModelStore, clean_name

_BY_DIM = {
    512: "RN101__openai RN101__yfcc15m ViT-B-16__laion400m_e31 ViT-B-16__laion400m_e32 ViT-B-16__openai "
    "ViT-B-32__laion2b-s34b-b79k ViT-B-32__laion2b_e16 ViT-B-32__laion400m_e31 ViT-B-32__laion400m_e32 "
    "ViT-B-32__openai XLM-Roberta-Base-ViT-B-32__laion5b_s13b_b90k XLM-Roberta-Large-Vit-B-32",
    640: "RN50x4__openai ViT-B-16-plus-240__laion400m_e31 ViT-B-16-plus-240__laion400m_e32 "
    "XLM-Roberta-Large-Vit-B-16Plus",
    768: "LABSE-Vit-L-14 RN50x16__openai ViT-B-16-SigLIP-256__webli ViT-B-16-SigLIP-384__webli "
    "ViT-B-16-SigLIP-512__webli ViT-B-16-SigLIP-i18n-256__webli ViT-B-16-SigLIP__webli ViT-L-14-336__openai "
    "ViT-L-14-quickgelu__dfn2b ViT-L-14__laion2b-s32b-b82k ViT-L-14__laion400m_e31 ViT-L-14__laion400m_e32 "
    "ViT-L-14__openai XLM-Roberta-Large-Vit-L-14 nllb-clip-base-siglip__mrl nllb-clip-base-siglip__v1 "
    "ViT-B-16-SigLIP2__webli ViT-B-32-SigLIP2-256__webli",
    1024: "RN50__cc12m RN50__openai RN50__yfcc15m RN50x64__openai ViT-H-14-378-quickgelu__dfn5b "
    "ViT-H-14-quickgelu__dfn5b ViT-H-14__laion2b-s32b-b79k ViT-L-16-SigLIP-256__webli ViT-L-16-SigLIP-384__webli "
    "ViT-g-14__laion2b-s12b-b42k XLM-Roberta-Large-ViT-H-14__frozen_laion5b_s13b_b90k ViT-L-16-SigLIP2-256__webli "
    "ViT-L-16-SigLIP2-384__webli ViT-L-16-SigLIP2-512__webli",
    1152: "ViT-SO400M-14-SigLIP-384__webli nllb-clip-large-siglip__mrl nllb-clip-large-siglip__v1 "
    "ViT-SO400M-14-SigLIP2__webli ViT-SO400M-14-SigLIP2-378__webli ViT-SO400M-16-SigLIP2-256__webli "
    "ViT-SO400M-16-SigLIP2-384__webli ViT-SO400M-16-SigLIP2-512__webli",
    1536: "ViT-gopt-16-SigLIP2-256__webli ViT-gopt-16-SigLIP2-384__webli",
}
# Immich server's CLIP_MODEL_INFO: every accepted name (as the ML cleans it) and its dimension.
IMMICH_CLIP_DIMS: dict[str, int] = {clean_name(n): dim for dim, names in _BY_DIM.items() for n in names.split()}

# Which downloaded CN-CLIP answers a whitelisted name of each dimension, best first.
PREFERRED = {
    512: ("CN-CLIP-ViT-B-16",),
    768: ("CN-CLIP-ViT-L-14-336", "CN-CLIP-ViT-L-14"),
    1024: ("CN-CLIP-ViT-H-14", "CN-CLIP-RN50"),
}
ARCH_FOR_DIM = {512: "ViT-B-16", 768: "ViT-L-14", 1024: "ViT-H-14"}


def fetch_hint(dim: int | None) -> str:
    arch = ARCH_FOR_DIM.get(dim or 512, "ViT-B-16")
    return f"install one with `immich-aio models clip --arch {arch}` (see README, 'Smart search')"


class ClipResolver(Resolver):
    task = CLIP

    def __init__(self, store: ModelStore, factory: SessionFactory, aliases: dict[str, str]) -> None:
        self.store = store
        self.factory = factory
        self.explicit = {clean_name(k): clean_name(v) for k, v in aliases.items()}

    def installed(self) -> dict[str, int]:
        """Installed CN-CLIP folders and their dimensions."""
        out = {}
        for name in self.store.names(CLIP):
            folder = self.store.path(CLIP, name)
            if is_cn_clip(folder):
                try:
                    out[name] = ClipConfig.read(folder).embed_dim
                except (OSError, ValueError, KeyError):
                    continue
        return out

    def _installed_text(self, installed: dict[str, int]) -> str:
        return ", ".join(f"{n} ({d}-d)" for n, d in sorted(installed.items())) or "none"

    def served_by(self, requested: str) -> str:
        """The installed CN-CLIP folder that answers a (cleaned) name, or a 400 that says why not."""
        installed = self.installed()
        immich_dim = IMMICH_CLIP_DIMS.get(requested)
        served = self.explicit.get(requested)
        if served is None and requested in installed:
            served = requested
        if served is None and immich_dim is not None:
            candidates = [n for n in PREFERRED.get(immich_dim, ()) if n in installed]
            candidates += sorted(n for n, d in installed.items() if d == immich_dim and n not in candidates)
            if candidates:
                served = candidates[0]
            elif installed:
                raise BadRequest(
                    f"CLIP model {requested!r} is {immich_dim}-d in Immich, but no installed CN-CLIP model has "
                    f"{immich_dim} dimensions (installed: {self._installed_text(installed)}). Choose an Immich "
                    f"name of the installed model's dimension, or {fetch_hint(immich_dim)}"
                )
            else:
                raise ModelMissing(f"No CN-CLIP model is installed to answer {requested!r}; {fetch_hint(immich_dim)}")
        if served is None:
            raise BadRequest(
                f"Unknown CLIP model {requested!r}; installed CN-CLIP models: {self._installed_text(installed)}, "
                f"and Immich's CLIP names of those dimensions"
            )
        if served not in installed:
            raise ModelMissing(
                f"CLIP model {requested!r} maps to {served!r} (IMMICH_AIO_CLIP_ALIASES), which is not installed "
                f"in {self.store.root / CLIP}; installed: {self._installed_text(installed)}; {fetch_hint(immich_dim)}",
                served=served,
            )
        if immich_dim is not None and installed[served] != immich_dim:
            raise BadRequest(
                f"CLIP model {requested!r} is {immich_dim}-d in Immich, but it would be served by {served!r}, "
                f"which is {installed[served]}-d: Immich's database would reject those embeddings. Use an Immich "
                f"name of {installed[served]} dimensions (e.g. {self.example_name(installed[served])})",
                served=served,
            )
        return served

    @staticmethod
    def example_name(dim: int) -> str:
        preferred = {512: "ViT-B-32__openai", 768: "ViT-L-14__openai", 1024: "ViT-H-14__laion2b-s32b-b79k"}
        return preferred.get(dim) or next((n for n, d in IMMICH_CLIP_DIMS.items() if d == dim), "none")

    def resolve(self, type_: str, requested: str) -> ModelSpec:
        name = clean_name(requested)
        served = self.served_by(name)
        folder = self.store.model_dir(CLIP, served)
        files = {"model": folder / type_ / "model.onnx"}
        if type_ != VISUAL:
            files["vocab"] = folder / type_ / "vocab.txt"
        missing = [str(p.relative_to(self.store.root)) for p in files.values() if not p.is_file()]
        if missing:
            raise ModelMissing(
                f"CN-CLIP model {served!r} is incomplete: {', '.join(missing)} missing; {fetch_hint(None)}",
                served=served,
            )
        cls = CnClipVisual if type_ == VISUAL else CnClipTextual
        # Both towers watch the whole installation, so a reinstall switches them together.
        watch = (
            folder / "config.json",
            folder / VISUAL / "model.onnx",
            folder / TEXTUAL / "model.onnx",
            folder / TEXTUAL / "vocab.txt",
        )
        return ModelSpec(CLIP, type_, served, lambda: cls(served, files, self.factory), name, watch=watch)

    def files(self, served: str) -> dict[str, Path]:
        folder = self.store.model_dir(CLIP, served)
        return {t: folder / t / "model.onnx" for t in ("visual", "textual") if (folder / t / "model.onnx").is_file()}

    def aliases(self) -> dict[str, str]:
        out = {}
        for name in [*self.explicit, *IMMICH_CLIP_DIMS]:
            try:
                out[name] = self.served_by(name)
            except BadRequest:
                continue
        return out
