"""OCR names: Immich's PP-OCR names, the bundled PP-OCRv6 small pair, and store folders.

Immich's server sends `PP-OCRv5_mobile` (or a language-prefixed name) in both entries. A name is
served by its own files only when its detector *and* its recogniser are both in the store; otherwise
the configured default answers both entries, which out of the box is the PP-OCRv6 small pair
bundled in the rapidocr wheel (no download). A detector is never paired with another model's
recogniser: a half-present install is treated as absent.

The default never answers a name for a script it cannot read: a language prefix whose sample characters
are missing from the default recogniser's charset (Korean, Thai, Greek and Cyrillic for PP-OCRv6, which
reads Chinese, Japanese and Latin scripts) needs the name's own files; without them the request is
refused with the command that fetches them (or they are fetched on first use).
"""

from __future__ import annotations

import threading
from pathlib import Path

from immich_aio.errors import BadRequest, ModelMissing
from immich_aio.models.base import Model, ModelSpec, Resolver
from immich_aio.models.ocr import OcrDetector, OcrRecognizer, bundled_model_dir
from immich_aio.names import fetchable
from immich_aio.names.catalog import BUNDLED, IMMICH_NAMES, store_folder
from immich_aio.sessions import SessionFactory
from immich_aio.store import FileIdentity, ModelStore, clean_name, file_identity
from immich_aio.tasks import DETECTION, OCR, RECOGNITION, ModelType

Pair = dict[ModelType, Path]  # a name's detector and recogniser files

BUNDLED_FILES = {DETECTION: "PP-OCRv6_det_small.onnx", RECOGNITION: "PP-OCRv6_rec_small.onnx"}

# Sample text of each language prefix Immich uses: the script a recogniser must hold to answer the name.
SCRIPT_SAMPLES = {
    "CH": ("Chinese", "中文识别"),
    "EN": ("English", "Immich"),
    "LATIN": ("Latin-script", "àéîõüçñß"),
    "KOREAN": ("Korean", "한국어"),
    "TH": ("Thai", "ภาษาไทย"),
    "EL": ("Greek", "ελληνικά"),
    "ESLAV": ("Cyrillic (East Slavic)", "русский"),
}


def _charset(path: Path) -> frozenset[str]:
    """A PP-OCR recogniser's characters from its ONNX metadata (no session: the file's header is read)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "character" in meta:
        return frozenset(meta["character"].splitlines())
    beside = path.with_name("charset.txt")
    return frozenset(beside.read_text(encoding="utf-8").splitlines()) if beside.is_file() else frozenset()


class OcrResolver(Resolver):
    task = OCR

    def __init__(self, store: ModelStore, factory: SessionFactory, default: str, max_batch: int, max_side: int) -> None:
        self.store = store
        self.factory = factory
        self.default = clean_name(default)
        self.max_batch = max_batch
        self.max_side = max_side
        self._charsets: dict[str, tuple[FileIdentity, frozenset[str]]] = {}  # per recogniser path: bounded
        self._lock = threading.Lock()

    def reads(self, recogniser: Path, language: str) -> bool:
        """Whether a recogniser holds every sample character of a language prefix (unknown prefixes: no)."""
        if language not in SCRIPT_SAMPLES:
            return False
        identity = file_identity(recogniser)
        with self._lock:
            cached = self._charsets.get(str(recogniser))
        if cached is None or cached[0] != identity:
            try:
                cached = (identity, _charset(recogniser))
            except Exception:  # an unreadable file: the load will say why; here it just reads nothing
                cached = (identity, frozenset())
            with self._lock:
                self._charsets[str(recogniser)] = cached
        return all(c in cached[1] for c in SCRIPT_SAMPLES[language][1])

    def pair(self, name: str) -> Pair | None:
        """A name's detector and recogniser files, or None unless both are present."""
        if name == BUNDLED:
            stored = {t: self.store.folder(OCR, BUNDLED) / t / "model.onnx" for t in (DETECTION, RECOGNITION)}
            if all(p.is_file() for p in stored.values()):
                return stored
            return {t: bundled_model_dir() / f for t, f in BUNDLED_FILES.items()}
        files = {t: self.store.folder(OCR, store_folder(name, t)) / t / "model.onnx" for t in (DETECTION, RECOGNITION)}
        return files if all(p.is_file() for p in files.values()) else None

    def _build(self, type_: ModelType, served: str, path: Path) -> Model:
        if type_ == DETECTION:
            return OcrDetector(served, {"model": path}, self.factory, max_side=self.max_side)
        return OcrRecognizer(served, {"model": path}, self.factory, max_batch=self.max_batch)

    def _spec(self, type_: ModelType, served: str, files: Pair, requested: str) -> ModelSpec:
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

    def resolve(self, type_: ModelType, requested: str) -> ModelSpec:
        name = clean_name(requested)
        files = self.pair(name)
        if files is not None:
            return self._spec(type_, name, files, name)
        if name in IMMICH_NAMES or name == self.default:
            files = self.pair(self.default)
            language = name.split("__")[0] if "__" in name else None
            if files is not None and language is not None and not self.reads(files[RECOGNITION], language):
                script = SCRIPT_SAMPLES.get(language, (language, ""))[0]
                raise ModelMissing(
                    f"OCR model {requested!r} reads {script} text, which the default {self.default!r} cannot read; "
                    f"its own files are not in the store {self.store.root}. Fetch them with "
                    f"`immich-aio models ocr --name {name}`",
                    served=name,
                    plan=fetchable.ocr(name),
                )
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
        out: dict[str, Path] = {}
        for t in (DETECTION, RECOGNITION):
            p = self.store.folder(OCR, store_folder(served, t)) / t / "model.onnx"
            if p.is_file():
                out[t] = p
        return out

    def aliases(self) -> dict[str, str]:
        out = {}
        for name in IMMICH_NAMES:
            for type_ in (DETECTION, RECOGNITION):
                try:
                    spec = self.resolve(type_, name)
                except BadRequest:  # ModelMissing too: a script the default cannot read
                    continue
                out[f"{name} ({type_})"] = spec.name
        return out
