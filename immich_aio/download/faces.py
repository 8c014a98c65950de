"""Getting InsightFace packs: Immich's Hugging Face copies (`immich-app/<pack>`) or InsightFace's
release zips, validated and laid out as Immich ML does.

The weights are licensed for non-commercial research use only; they are fetched on request and
never shipped with immich-aio. A pack is installed whole (detector and recogniser together) or not
at all.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

from immich_aio.download import hf
from immich_aio.download.fetch import download, forget, say
from immich_aio.download.install import staged
from immich_aio.download.validate import load_onnx, zip_with
from immich_aio.store import ModelStore
from immich_aio.tasks import DETECTION, FACES, RECOGNITION, ModelType

# Detector and recogniser inside each InsightFace zip.
PACK_FILES = {
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
    "buffalo_m": ("det_2.5g.onnx", "w600k_r50.onnx"),
    "buffalo_s": ("det_500m.onnx", "w600k_mbf.onnx"),
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
}
DEFAULT_RELEASES = "https://github.com/deepinsight/insightface/releases/download/v0.7"
LICENCE = "InsightFace models are licensed for non-commercial research purposes only."
RELEASES_HINT = (
    "Set INSIGHTFACE_RELEASES_URL to a mirror of InsightFace's release files, or use --source hf "
    "(with HF_ENDPOINT=https://hf-mirror.com if needed)"
)


def validate(detector: Path, recognizer: Path) -> None:
    """Refuse files that are not an SCRFD detector and a 512-d ArcFace recogniser."""
    det, rec = load_onnx(detector), load_onnx(recognizer)
    if len(det.get_outputs()) not in (6, 9, 10, 15) or len(det.get_inputs()[0].shape) != 4:
        raise ValueError(f"{detector.name} is not an SCRFD detector ({len(det.get_outputs())} outputs)")
    shape, out = rec.get_inputs()[0].shape, rec.get_outputs()[0].shape
    if shape[2:] != [112, 112] or out[-1] != 512:
        raise ValueError(f"{recognizer.name} is not a 512-d ArcFace recogniser (input {shape}, output {out})")


def fetch_pack(store: ModelStore, pack: str, source: str = "hf") -> Path:
    if pack not in PACK_FILES:
        raise ValueError(f"unknown pack {pack!r}; one of {', '.join(PACK_FILES)}")
    say(LICENCE)
    if source == "hf":
        snapshot = hf.fetch(store.root, f"immich-app/{pack}", (f"{DETECTION}/model.onnx", f"{RECOGNITION}/model.onnx"))
        files = {t: snapshot.path(f"{t}/model.onnx") for t in (DETECTION, RECOGNITION)}
        try:
            validate(files[DETECTION], files[RECOGNITION])
        except ValueError as e:
            hf.discard(snapshot)
            raise ValueError(f"immich-app/{pack} from {hf.endpoint()}: {e}; deleted the download, run again") from e
        _install(store, pack, files)
        hf.discard(snapshot)
    else:
        base = os.environ.get("INSIGHTFACE_RELEASES_URL", DEFAULT_RELEASES).rstrip("/")
        downloads = store.root / ".downloads" / pack
        archive = download(
            f"{base}/{pack}.zip", downloads / f"{pack}.zip", validate=zip_with(PACK_FILES[pack]), hint=RELEASES_HINT
        )
        files = _unzip(archive, pack, downloads)
        try:
            validate(files[DETECTION], files[RECOGNITION])
        except ValueError as e:
            forget(archive)
            raise ValueError(f"{pack}.zip from {base}: {e}; deleted the download, run again") from e
        _install(store, pack, files)
        forget(archive)
        shutil.rmtree(downloads, ignore_errors=True)
    say(f"Installed {pack} in {store.model_dir(FACES, pack)}")
    return store.model_dir(FACES, pack)


def _install(store: ModelStore, pack: str, files: dict[ModelType, Path]) -> None:
    with staged(store, FACES, pack) as stage:
        for type_, src in files.items():
            (stage / type_).mkdir()
            shutil.copyfile(src, stage / type_ / "model.onnx")


def _unzip(archive: Path, pack: str, into: Path) -> dict[ModelType, Path]:
    """Extract just the two models, matched by file name; member paths are never used as paths."""
    wanted = dict(zip(PACK_FILES[pack], (DETECTION, RECOGNITION), strict=True))
    found: dict[ModelType, Path] = {}
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            base = info.filename.replace("\\", "/").rsplit("/", 1)[-1]
            if base in wanted and not info.is_dir():
                out = into / f"{wanted[base]}.onnx"
                with zf.open(info) as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
                found[wanted[base]] = out
    return found
