"""OCR names: Immich's PP-OCR names, the bundled PP-OCRv6 small pair, and store folders.

Immich's server sends `PP-OCRv5_mobile` (or a language-prefixed name) in both entries. A name is
served by its own files only when its detector *and* its recogniser are both in the store; otherwise
the configured default answers both entries, which out of the box is the PP-OCRv6 small pair
bundled in the rapidocr wheel (no download). A detector is never paired with another model's
recogniser: a half-present install is treated as absent.
"""

from __future__ import annotations

from pathlib import Path

from immich_aio.errors import BadRequest
from immich_aio.models.base import Model, ModelSpec, Resolver
from immich_aio.models.ocr import OcrDetector, OcrRecognizer, bundled_model_dir
from immich_aio.protocol import DETECTION, OCR, RECOGNITION
from immich_aio.sessions import SessionFactory
from immich_aio.store import ModelStore, clean_name

BUNDLED = "PP-OCRv6_small"
BUNDLED_FILES = {DETECTION: "PP-OCRv6_det_small.onnx", RECOGNITION: "PP-OCRv6_rec_small.onnx"}

IMMICH_NAMES = (
    "PP-OCRv5_server",
    "PP-OCRv5_mobile",
    "CH__PP-OCRv5_server",
    "CH__PP-OCRv5_mobile",
    "EL__PP-OCRv5_mobile",
    "EN__PP-OCRv5_mobile",
    "ESLAV__PP-OCRv5_mobile",
    "KOREAN__PP-OCRv5_mobile",
    "LATIN__PP-OCRv5_mobile",
    "TH__PP-OCRv5_mobile",
    # Immich's PP-OCRv6 work (closed upstream, and its model-export repository) uses these names.
    "PP-OCRv6_tiny",
    "PP-OCRv6_small",
    "PP-OCRv6_medium",
)


def store_folder(name: str, type_: str) -> str:
    """Immich's layout: detection drops the language prefix (shared detector), recognition keeps it."""
    return name.split("__")[-1] if type_ == DETECTION else name


class OcrResolver(Resolver):
    task = OCR

    def __init__(
        self, store: ModelStore, factory: SessionFactory, default: str, max_batch: int, max_side: int = 2560
    ) -> None:
        self.store = store
        self.factory = factory
        self.default = clean_name(default)
        self.max_batch = max_batch
        self.max_side = max_side

    def pair(self, name: str) -> dict[str, Path] | None:
        """A name's detector and recogniser files, or None unless both are present."""
        if name == BUNDLED:
            stored = {t: self.store.path(OCR, BUNDLED, t, "model.onnx") for t in (DETECTION, RECOGNITION)}
            if all(p.is_file() for p in stored.values()):
                return stored
            return {t: bundled_model_dir() / f for t, f in BUNDLED_FILES.items()}
        files = {t: self.store.path(OCR, store_folder(name, t), t, "model.onnx") for t in (DETECTION, RECOGNITION)}
        return files if all(p.is_file() for p in files.values()) else None

    def _build(self, type_: str, served: str, path: Path) -> Model:
        if type_ == DETECTION:
            model: Model = OcrDetector(served, {"model": path}, self.factory)
            model.max_side = self.max_side
            return model
        return OcrRecognizer(served, {"model": path}, self.factory, max_batch=self.max_batch)

    def _spec(self, type_: str, served: str, files: dict[str, Path], requested: str) -> ModelSpec:
        key = store_folder(served, type_) if served != BUNDLED else served
        path = files[type_]
        return ModelSpec(
            OCR,
            type_,
            key,
            lambda: self._build(type_, key, path),
            requested,
            watch=(files[DETECTION], files[RECOGNITION]),
        )

    def resolve(self, type_: str, requested: str) -> ModelSpec:
        name = clean_name(requested)
        files = self.pair(name)
        if files is not None:
            return self._spec(type_, name, files, name)
        if name in IMMICH_NAMES or name == self.default:
            files = self.pair(self.default)
            if files is None:
                raise BadRequest(
                    f"OCR model {requested!r} is served by the default {self.default!r} (IMMICH_AIO_OCR_MODEL), but "
                    f"its detector and recogniser are not both in the store {self.store.root}; "
                    f"fetch it with `immich-aio models ocr --name {self.default}` or unset IMMICH_AIO_OCR_MODEL "
                    f"to use the bundled {BUNDLED}",
                    served=self.default,
                )
            return self._spec(type_, self.default, files, name)
        known = sorted({BUNDLED, *IMMICH_NAMES, *self.store.names(OCR)})
        raise BadRequest(f"Unknown OCR model {requested!r}; known: {', '.join(known)}")

    def files(self, served: str) -> dict[str, Path]:
        pair = self.pair(served) if served == BUNDLED else None
        if pair is not None:
            return {t: pair[t] for t in (DETECTION, RECOGNITION)}
        out = {}
        for t in (DETECTION, RECOGNITION):
            p = self.store.path(OCR, store_folder(served, t), t, "model.onnx")
            if p.is_file():
                out[t] = p
        return out

    def aliases(self) -> dict[str, str]:
        out = {}
        for name in IMMICH_NAMES:
            for type_ in (DETECTION, RECOGNITION):
                try:
                    spec = self.resolve(type_, name)
                except BadRequest:
                    continue
                out[f"{name} ({type_})"] = spec.name
        return out
