"""OCR names: Immich's PP-OCRv5 names, the bundled PP-OCRv6 small pair, and store folders.

Immich's server sends `PP-OCRv5_mobile` (or a language-prefixed name) in both entries. Those
are served by that model when its files are in the store, otherwise by the configured default,
which out of the box is the PP-OCRv6 small pair bundled in the rapidocr wheel (no download).
"""

from __future__ import annotations

from pathlib import Path

from immich_aio.errors import BadRequest
from immich_aio.models.base import ModelSpec, Resolver
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
)


def store_folder(name: str, type_: str) -> str:
    """Immich's layout: detection drops the language prefix (shared detector), recognition keeps it."""
    return name.split("__")[-1] if type_ == DETECTION else name


class OcrResolver(Resolver):
    task = OCR

    def __init__(self, store: ModelStore, factory: SessionFactory, default: str, max_batch: int) -> None:
        self.store = store
        self.factory = factory
        self.default = default
        self.max_batch = max_batch

    def _file(self, name: str, type_: str) -> Path | None:
        if name == BUNDLED:
            stored = self.store.path(OCR, BUNDLED, type_, "model.onnx")
            return stored if stored.is_file() else bundled_model_dir() / BUNDLED_FILES[type_]
        path = self.store.path(OCR, store_folder(name, type_), type_, "model.onnx")
        return path if path.is_file() else None

    def _spec(self, type_: str, served: str, path: Path, requested: str) -> ModelSpec:
        cls = OcrDetector if type_ == DETECTION else OcrRecognizer
        served_key = store_folder(served, type_) if served != BUNDLED else served
        return ModelSpec(
            OCR,
            type_,
            served_key,
            lambda: cls(served_key, {"model": path}, self.factory, max_batch=self.max_batch),
            requested,
        )

    def resolve(self, type_: str, requested: str) -> ModelSpec:
        name = clean_name(requested)
        path = self._file(name, type_)
        if path is not None:
            return self._spec(type_, name, path, requested)
        if name in IMMICH_NAMES or name == clean_name(self.default):
            default = clean_name(self.default)
            path = self._file(default, type_)
            if path is None:
                raise BadRequest(
                    f"OCR model {requested!r} is served by the default {default!r} (IMMICH_AIO_OCR_MODEL), "
                    f"but {OCR}/{store_folder(default, type_)}/{type_}/model.onnx is not in the store "
                    f"{self.store.root}; unset IMMICH_AIO_OCR_MODEL to use the bundled {BUNDLED}"
                )
            return self._spec(type_, default, path, requested)
        known = sorted({BUNDLED, *IMMICH_NAMES, *self.store.names(OCR)})
        raise BadRequest(f"Unknown OCR model {requested!r}; known: {', '.join(known)}")

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
