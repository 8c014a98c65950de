"""Getting the PP-OCR models behind Immich's OCR names (PP-OCRv5, PP-OCRv6 tiers) from RapidOCR's ModelScope.

The addresses and sha256 sums come from the model registry shipped inside the installed rapidocr
wheel. Files are laid out as Immich ML does: the detector (shared by all languages) in
`ocr/PP-OCRv5_<tier>/detection/model.onnx`, the recogniser in `ocr/<name>/recognition/model.onnx`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from immich_aio.download.fetch import download, forget, say
from immich_aio.download.install import staged
from immich_aio.download.validate import load_onnx
from immich_aio.names.catalog import IMMICH_NAMES, store_folder
from immich_aio.store import ModelStore, sha256_file
from immich_aio.tasks import DETECTION, OCR, RECOGNITION

OFFICIAL = "https://www.modelscope.cn"
HINT = "Set MODELSCOPE_ENDPOINT to a reachable ModelScope mirror, or copy the files into the store by hand"


def registry() -> dict[str, dict[str, str]]:
    """RapidOCR's PP-OCRv5 and PP-OCRv6 ONNX entries: model key -> {model_dir (URL), SHA256}."""
    import rapidocr
    import yaml

    data = yaml.safe_load((Path(rapidocr.__file__).parent / "default_models.yaml").read_text(encoding="utf-8"))
    out: dict[str, dict[str, str]] = {}
    for version in ("PP-OCRv5", "PP-OCRv6"):
        section = data["onnxruntime"].get(version, {})
        out.update(section.get("det", {}))
        out.update(section.get("rec", {}))
    return out


def model_keys(name: str) -> dict[str, str]:
    """Immich name -> RapidOCR model keys, e.g. EN__PP-OCRv5_mobile -> det ch_..._mobile, rec en_..._mobile."""
    if name not in IMMICH_NAMES:
        raise ValueError(f"unknown OCR model {name!r}; one of {', '.join(IMMICH_NAMES)}")
    lang, _, base = name.rpartition("__")
    if base.startswith("PP-OCRv6_"):
        tier = base.removeprefix("PP-OCRv6_")
        return {DETECTION: f"multi_PP-OCRv6_det_{tier}", RECOGNITION: f"multi_PP-OCRv6_rec_{tier}"}
    tier = "server" if base.endswith("server") else "mobile"
    return {
        DETECTION: f"ch_PP-OCRv5_det_{tier}",
        RECOGNITION: f"{(lang or 'CH').lower()}_PP-OCRv5_rec_{tier}",
    }


def _url(official: str) -> str:
    mirror = os.environ.get("MODELSCOPE_ENDPOINT")
    return mirror.rstrip("/") + official[len(OFFICIAL) :] if mirror and official.startswith(OFFICIAL) else official


def validator(type_: str):
    def check(path: Path) -> None:
        session = load_onnx(path)
        if len(session.get_inputs()[0].shape) != 4:
            raise ValueError(f"not a PP-OCR model (input {session.get_inputs()[0].shape})")
        if type_ == RECOGNITION and "character" not in session.get_modelmeta().custom_metadata_map:
            raise ValueError("no 'character' metadata: not a PP-OCR ONNX recogniser")

    return check


def fetch(store: ModelStore, name: str) -> dict[str, Path]:
    """Download and check both models first; install them only when both are good (never half a model)."""
    entries = registry()
    downloaded, fetched = {}, []
    for type_, key in model_keys(name).items():
        entry = entries[key]
        installed = store.path(OCR, store_folder(name, type_), type_, "model.onnx")
        if installed.is_file() and sha256_file(installed) == entry["SHA256"].lower():
            downloaded[type_] = installed  # e.g. the detector shared with another language: already there
            continue
        fetched.append(type_)
        downloaded[type_] = download(
            _url(entry["model_dir"]),
            store.root / ".downloads" / f"{key}.onnx",
            sha256=entry["SHA256"],
            validate=validator(type_),
            hint=HINT,
        )
    # The detector first: the server uses a name's files only once its recogniser is there too.
    for type_ in fetched:
        folder = store_folder(name, type_)
        with staged(store, OCR, folder, keep_existing=True) as stage:
            (stage / type_).mkdir(exist_ok=True)
            shutil.copyfile(downloaded[type_], stage / type_ / "model.onnx")
        where = store.path(OCR, folder, type_, "model.onnx").relative_to(store.root)
        say(f"Installed {model_keys(name)[type_]} as {where}")
    for type_ in fetched:
        forget(downloaded[type_])
    return {t: store.path(OCR, store_folder(name, t), t, "model.onnx") for t in (DETECTION, RECOGNITION)}
