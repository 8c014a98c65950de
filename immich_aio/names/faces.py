"""Face names: InsightFace packs in Immich ML's layout, `facial-recognition/<name>/{detection,recognition}/model.onnx`.

Pointing MACHINE_LEARNING_CACHE_FOLDER at an existing Immich ML cache serves its packs as they are.
"""

from __future__ import annotations

from pathlib import Path

from immich_aio.errors import BadRequest, ModelMissing
from immich_aio.models.base import ModelSpec, Resolver
from immich_aio.models.faces import FaceDetector, FaceRecognizer
from immich_aio.names import fetchable
from immich_aio.names.catalog import PACKS
from immich_aio.sessions import SessionFactory
from immich_aio.store import ModelStore, clean_name
from immich_aio.tasks import DETECTION, FACES, RECOGNITION, ModelType


def fetch_hint(pack: str) -> str:
    pack = pack if pack in PACKS else "buffalo_l"
    return (
        f"fetch it with `immich-aio models faces --pack {pack}` (InsightFace models are for non-commercial "
        f"research use only), or point MACHINE_LEARNING_CACHE_FOLDER at an existing Immich ML cache"
    )


class FaceResolver(Resolver):
    task = FACES

    def __init__(self, store: ModelStore, factory: SessionFactory, max_batch: int) -> None:
        self.store = store
        self.factory = factory
        self.max_batch = max_batch

    def resolve(self, type_: ModelType, requested: str) -> ModelSpec:
        name = clean_name(requested)
        path = self._model(name, type_)
        if not path.is_file():
            installed = [n for n in self.store.names(FACES) if self._model(n, type_).is_file()]
            listing = ", ".join(installed) or "none"
            if name in PACKS:
                raise ModelMissing(
                    f"Face model {requested!r} is not installed (installed: {listing}); {fetch_hint(name)}",
                    served=name,
                    plan=fetchable.faces(name),
                )
            raise BadRequest(f"Unknown face model {requested!r}; installed: {listing}; known packs: {', '.join(PACKS)}")
        cls = FaceDetector if type_ == DETECTION else FaceRecognizer
        # A pack is one installation: replacing it switches detector and recogniser together.
        watch = tuple(self._model(name, t) for t in (DETECTION, RECOGNITION))
        return ModelSpec(
            FACES,
            type_,
            name,
            lambda: cls(name, {"model": path}, self.factory, max_batch=self.max_batch),
            name,
            watch=watch,
        )

    def _model(self, pack: str, type_: str) -> Path:
        """A pack's model file as served (a revision's folder where present)."""
        return self.store.folder(FACES, pack) / type_ / "model.onnx"

    def installed(self) -> list[str]:
        """Packs in the store with both models."""
        return [
            n for n in self.store.names(FACES) if all(self._model(n, t).is_file() for t in (DETECTION, RECOGNITION))
        ]

    def aliases(self) -> dict[str, str]:
        return {name: name for name in self.installed()}

    def explain(self) -> dict[str, dict[str, str]]:
        """Each installed pack answers its own name (for /info and the startup banner)."""
        return {name: {"servedBy": name, "why": "its own files"} for name in self.installed()}

    def files(self, served: str) -> dict[str, Path]:
        return {t: self._model(served, t) for t in (DETECTION, RECOGNITION) if self._model(served, t).is_file()}
