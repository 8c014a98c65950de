"""Getting the PP-OCRv5 models behind Immich's OCR names, from RapidOCR's ModelScope repository.

The addresses and sha256 sums come from the model registry shipped inside the installed rapidocr
wheel. Files are laid out as Immich ML does: the detector (shared by all languages) in
`ocr/PP-OCRv5_<tier>/detection/model.onnx`, the recogniser in `ocr/<name>/recognition/model.onnx`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from immich_aio.download.fetch import download
from immich_aio.download.install import staged
from immich_aio.names.ocr import IMMICH_NAMES, store_folder
from immich_aio.protocol import DETECTION, OCR, RECOGNITION
from immich_aio.store import ModelStore

OFFICIAL = "https://www.modelscope.cn"
HINT = "Set MODELSCOPE_ENDPOINT to a reachable ModelScope mirror, or copy the files into the store by hand"


def registry() -> dict[str, dict[str, str]]:
    """RapidOCR's PP-OCRv5 ONNX entries: model key -> {model_dir (URL), SHA256}."""
    import rapidocr
    import yaml

    data = yaml.safe_load((Path(rapidocr.__file__).parent / "default_models.yaml").read_text(encoding="utf-8"))
    v5 = data["onnxruntime"]["PP-OCRv5"]
    return {**v5["det"], **v5["rec"]}


def model_keys(name: str) -> dict[str, str]:
    """Immich name -> RapidOCR model keys, e.g. EN__PP-OCRv5_mobile -> det ch_..._mobile, rec en_..._mobile."""
    if name not in IMMICH_NAMES:
        raise ValueError(f"unknown OCR model {name!r}; one of {', '.join(IMMICH_NAMES)}")
    lang, _, base = name.rpartition("__")
    tier = "server" if base.endswith("server") else "mobile"
    return {
        DETECTION: f"ch_PP-OCRv5_det_{tier}",
        RECOGNITION: f"{(lang or 'CH').lower()}_PP-OCRv5_rec_{tier}",
    }


def _url(official: str) -> str:
    mirror = os.environ.get("MODELSCOPE_ENDPOINT")
    return mirror.rstrip("/") + official[len(OFFICIAL) :] if mirror and official.startswith(OFFICIAL) else official


def validate(type_: str, path: Path) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if len(session.get_inputs()[0].shape) != 4:
        raise ValueError(f"{path.name} is not a PP-OCR model (input {session.get_inputs()[0].shape})")
    if type_ == RECOGNITION and "character" not in session.get_modelmeta().custom_metadata_map:
        raise ValueError(f"{path.name} has no 'character' metadata: not a PP-OCR ONNX recogniser")


def fetch(store: ModelStore, name: str) -> dict[str, Path]:
    entries = registry()
    installed = {}
    for type_, key in model_keys(name).items():
        entry = entries[key]
        path = download(
            _url(entry["model_dir"]), store.root / ".downloads" / f"{key}.onnx", sha256=entry["SHA256"], hint=HINT
        )
        validate(type_, path)
        folder = store_folder(name, type_)
        with staged(store, OCR, folder, keep_existing=True) as stage:
            (stage / type_).mkdir(exist_ok=True)
            shutil.copyfile(path, stage / type_ / "model.onnx")
        installed[type_] = store.path(OCR, folder, type_, "model.onnx")
        print(f"Installed {key} as {installed[type_].relative_to(store.root)}")
    return installed
