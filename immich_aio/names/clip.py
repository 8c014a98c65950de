"""CLIP names: which installed model answers each name the Immich server may send, and why.

The Immich server only saves CLIP model names from its fixed list, each with a fixed embedding size (the
size of its pgvector column). A requested name is answered by, in this order:

1. `IMMICH_AIO_CLIP_ALIASES`, when it names the request: the operator's explicit choice;
2. the name's own files in the store: Immich's own model (`clip/ViT-B-32__openai/...` from an Immich ML
   cache or `immich-aio models clip --immich`), so an existing library keeps its vector space; or a
   CN-CLIP / QA-CLIP folder of that name;
3. for a whitelisted name without files of its own: an installed Chinese-CLIP-architecture model (CN-CLIP,
   then QA-CLIP) of the same dimension.

A name whose dimension differs from the model that would serve it is refused (Immich's database would
reject the vectors), and a model with files of its own never has one tower answered by another model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from immich_aio.errors import BadRequest, ModelMissing
from immich_aio.models.base import ModelSpec, Resolver
from immich_aio.models.clip import ClipConfig, ClipTower, CnClipTextual, CnClipVisual, is_cn_clip
from immich_aio.models.clip_immich import (
    TEXTUAL_FILES,
    VISUAL_FILES,
    ImmichClipTextual,
    ImmichClipVisual,
    embed_dim,
    is_immich_clip,
)
from immich_aio.names import fetchable
from immich_aio.names.catalog import IMMICH_CLIP_DIMS
from immich_aio.sessions import SessionFactory
from immich_aio.store import ModelStore, clean_name, identity
from immich_aio.tasks import CLIP, TEXTUAL, VISUAL, ModelType

# Which Chinese-CLIP-architecture model answers a whitelisted name of each dimension, best first: CN-CLIP
# before QA-CLIP, so installing QA-CLIP beside CN-CLIP never silently changes an existing library's space.
PREFERRED = {
    512: ("CN-CLIP-ViT-B-16", "QA-CLIP-ViT-B-16"),
    768: ("CN-CLIP-ViT-L-14-336", "CN-CLIP-ViT-L-14", "QA-CLIP-ViT-L-14-336", "QA-CLIP-ViT-L-14"),
    1024: ("CN-CLIP-ViT-H-14", "CN-CLIP-RN50", "QA-CLIP-RN50"),
}
ARCH_FOR_DIM = {512: "ViT-B-16", 768: "ViT-L-14", 1024: "ViT-H-14"}
OWN, CHINESE, ALIAS = "its own files", "Chinese-CLIP of the same dimension", "IMMICH_AIO_CLIP_ALIASES"


def fetch_hint(dim: int | None, name: str | None = None) -> str:
    arch = ARCH_FOR_DIM.get(dim or 512, "ViT-B-16")
    immich = f", or Immich's own model with `immich-aio models clip --immich {name}`" if name else ""
    return f"install one with `immich-aio models clip --arch {arch}`{immich} (see README, 'Smart search')"


@dataclass(frozen=True)
class Installed:
    kind: str  # "cn-clip" (CN-CLIP or QA-CLIP) or "immich"
    dim: int | None


class ClipResolver(Resolver):
    task = CLIP

    def __init__(
        self,
        store: ModelStore,
        factory: SessionFactory,
        aliases: dict[str, str],
        fetch_clip: str = "chinese",
    ) -> None:
        self.store = store
        self.factory = factory
        self._installed: tuple[tuple, dict[str, Installed]] | None = None  # (store key, listing)
        self.explicit = {clean_name(k): clean_name(v) for k, v in aliases.items()}
        self.fetch_clip = fetch_clip  # what a name with no model gets on first use (names/fetchable.py)

    @staticmethod
    def refetch_plan(served: str) -> fetchable.FetchPlan | None:
        """How an installed-by-name model could be fetched again (CN-CLIP with a ready export, Immich's own)."""
        arch = served.removeprefix("CN-CLIP-")
        if served.startswith("CN-CLIP-") and arch in fetchable.CHINESE_ONNX_REPOS:
            return fetchable.chinese_clip(arch)
        if served in IMMICH_CLIP_DIMS:
            return fetchable.immich_clip(served)
        return None

    def installed(self) -> dict[str, Installed]:
        """CLIP folders in the store that hold a model, with their kind and dimension (do not modify the result).

        Every request asks this, so the answer is kept until the store changes: the key is the folder listing and
        the identity (a stat) of each folder's config.json and tower models, so an installed, removed or replaced
        model is seen on the next request, while the configs are read and parsed only when one of them changed.
        """
        folders = {name: self.store.folder(CLIP, name) for name in self.store.names(CLIP)}
        key = tuple(
            (
                name,
                str(folder),
                identity((folder / "config.json", *(folder / t / "model.onnx" for t in (VISUAL, TEXTUAL)))),
            )
            for name, folder in folders.items()
        )
        cached = self._installed
        if cached is not None and cached[0] == key:
            return cached[1]
        out = self._read_installed(folders)
        self._installed = (key, out)  # one tuple: a reader on another thread sees the old pair or the new one
        return out

    @staticmethod
    def _read_installed(folders: dict[str, Path]) -> dict[str, Installed]:
        out = {}
        for name, folder in folders.items():
            if is_cn_clip(folder):
                try:
                    out[name] = Installed("cn-clip", ClipConfig.read(folder).embed_dim)
                except (OSError, ValueError, KeyError):
                    continue
            elif is_immich_clip(folder):
                out[name] = Installed("immich", embed_dim(folder) or IMMICH_CLIP_DIMS.get(name))
        return out

    @staticmethod
    def _installed_text(installed: dict[str, Installed]) -> str:
        return ", ".join(f"{n} ({i.dim}-d)" for n, i in sorted(installed.items())) or "none"

    def served_by(self, requested: str, installed: dict[str, Installed] | None = None) -> tuple[str, str]:
        """(the installed folder that answers a cleaned name, why), or a 400 that says why none does."""
        installed = self.installed() if installed is None else installed
        immich_dim = IMMICH_CLIP_DIMS.get(requested)
        if requested in self.explicit:
            served, why = self.explicit[requested], ALIAS
            if served not in installed:
                raise ModelMissing(
                    f"CLIP model {requested!r} maps to {served!r} (IMMICH_AIO_CLIP_ALIASES), which is not installed "
                    f"in {self.store.root / CLIP}; installed: {self._installed_text(installed)}; "
                    f"{fetch_hint(immich_dim)}",
                    served=served,
                    plan=self.refetch_plan(served),
                )
        elif requested in installed:
            served, why = requested, OWN
        elif immich_dim is not None:
            chinese = {n: i for n, i in installed.items() if i.kind == "cn-clip"}
            candidates = [n for n in PREFERRED.get(immich_dim, ()) if n in chinese]
            candidates += sorted(n for n, i in chinese.items() if i.dim == immich_dim and n not in candidates)
            if not candidates:
                plan = fetchable.clip_for(requested, immich_dim, self.fetch_clip)
                if chinese:
                    raise ModelMissing(
                        f"CLIP model {requested!r} is {immich_dim}-d in Immich, but no installed Chinese-CLIP model "
                        f"has {immich_dim} dimensions and {requested!r} has no files of its own (installed: "
                        f"{self._installed_text(installed)}). Choose an Immich name of an installed model's "
                        f"dimension, or {fetch_hint(immich_dim, requested)}",
                        plan=plan,
                    )
                raise ModelMissing(
                    f"No model is installed to answer {requested!r}; {fetch_hint(immich_dim, requested)}", plan=plan
                )
            served, why = candidates[0], f"{CHINESE} ({immich_dim})"
        else:
            raise BadRequest(
                f"Unknown CLIP model {requested!r}; installed: {self._installed_text(installed)}, and Immich's CLIP "
                "names of those dimensions"
            )
        served_dim = installed[served].dim
        if immich_dim is not None and served_dim is not None and served_dim != immich_dim:
            raise BadRequest(
                f"CLIP model {requested!r} is {immich_dim}-d in Immich, but it would be served by {served!r}, which is "
                f"{served_dim}-d: Immich's database would reject those embeddings. Use an Immich name of {served_dim} "
                f"dimensions (e.g. {self.example_name(served_dim)})",
                served=served,
            )
        return served, why

    @staticmethod
    def example_name(dim: int) -> str:
        preferred = {512: "ViT-B-32__openai", 768: "ViT-L-14__openai", 1024: "ViT-H-14__laion2b-s32b-b79k"}
        return preferred.get(dim) or next((n for n, d in IMMICH_CLIP_DIMS.items() if d == dim), "none")

    def _files(self, served: str, kind: str, type_: ModelType) -> dict[str, Path]:
        folder = self.store.folder(CLIP, served)
        if kind == "cn-clip":
            files = {"model": folder / type_ / "model.onnx"}
            if type_ == TEXTUAL:
                files["vocab"] = folder / type_ / "vocab.txt"
            return files
        names: dict[str, dict[str, str]] = {
            VISUAL: {"model": "model.onnx", "preprocess": "preprocess_cfg.json"},
            TEXTUAL: {
                "model": "model.onnx",
                "tokenizer": "tokenizer.json",
                "tokenizer_config": "tokenizer_config.json",
            },
        }
        return {role: folder / type_ / f for role, f in names[type_].items()}

    def _watch(self, served: str, kind: str) -> tuple[Path, ...]:
        """Every file of the installation: a change to either tower switches both."""
        folder = self.store.folder(CLIP, served)
        if kind == "cn-clip":
            towers = {VISUAL: ("model.onnx",), TEXTUAL: ("model.onnx", "vocab.txt")}
        else:
            towers = {VISUAL: VISUAL_FILES, TEXTUAL: TEXTUAL_FILES}
        return (folder / "config.json", *(folder / t / f for t, names in towers.items() for f in names))

    def resolve(self, type_: ModelType, requested: str) -> ModelSpec:
        name = clean_name(requested)
        installed = self.installed()
        served, _why = self.served_by(name, installed)
        kind = installed[served].kind
        files = self._files(served, kind, type_)
        missing = [str(p.relative_to(self.store.root)) for p in files.values() if not p.is_file()]
        if missing:
            hint = (
                f"fetch it again with `immich-aio models clip --immich {served}`"
                if kind == "immich"
                else fetch_hint(None)
            )
            raise ModelMissing(
                f"CLIP model {served!r} is incomplete: {', '.join(missing)} missing; {hint}",
                served=served,
                plan=self.refetch_plan(served),
            )
        cls: type[ClipTower]
        if kind == "immich":
            cls = ImmichClipVisual if type_ == VISUAL else ImmichClipTextual
        else:
            cls = CnClipVisual if type_ == VISUAL else CnClipTextual
        return ModelSpec(
            CLIP,
            type_,
            served,
            lambda: cls(served, files, self.factory),
            name,
            watch=self._watch(served, kind),
        )

    def files(self, served: str) -> dict[str, Path]:
        folder = self.store.folder(CLIP, served)
        return {t: folder / t / "model.onnx" for t in (VISUAL, TEXTUAL) if (folder / t / "model.onnx").is_file()}

    def explain(self) -> dict[str, dict[str, str]]:
        """Every name this task answers now: the model that serves it, and why (for /info and the banner)."""
        installed = self.installed()
        out = {}
        for name in dict.fromkeys([*self.explicit, *installed, *IMMICH_CLIP_DIMS]):
            try:
                served, why = self.served_by(name, installed)
            except BadRequest:
                continue
            out[name] = {"servedBy": served, "why": why}
        return out

    def aliases(self) -> dict[str, str]:
        return {name: e["servedBy"] for name, e in self.explain().items()}
