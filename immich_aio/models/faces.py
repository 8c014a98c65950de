"""InsightFace face detection (SCRFD) and recognition (ArcFace) in numpy + OpenCV.

Reproduces the numerics Immich ML got from insightface's RetinaFace / ArcFaceONNX / norm_crop:
a 640×640 top-left letterbox, SCRFD anchor decoding, NMS at IoU 0.4 with insightface's "+1" pixel
areas, a 5-point similarity transform to the ArcFace template, and un-normalised 512-d
embeddings. insightface itself is never imported at serve time.
"""

from __future__ import annotations

import logging
import mmap
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from immich_aio.jobs import Job
from immich_aio.models.base import Model
from immich_aio.models.outputs import DetectedFaces, RecognisedFaces
from immich_aio.onnx_walk import messages
from immich_aio.payload import Payload
from immich_aio.protocol import option_float, vector_string
from immich_aio.sessions import SessionProfile
from immich_aio.tasks import DETECTION, FACES, RECOGNITION

log = logging.getLogger(__name__)

DET_SIZE = 640
NMS_IOU = 0.4
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


def letterbox(image: np.ndarray, size: int = DET_SIZE) -> tuple[np.ndarray, float]:
    """Resize to fit size×size keeping aspect, pasted top-left on black; returns (canvas, scale)."""
    h, w = image.shape[:2]
    if h / w > 1:
        new_h, new_w = size, int(size / (h / w))
    else:
        new_w, new_h = size, int(size * (h / w))
    new_w, new_h = max(new_w, 1), max(new_h, 1)
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))
    return canvas, new_h / h


def anchor_centres(size: int, stride: int, anchors: int) -> np.ndarray:
    """Cell corners (col·s, row·s), row-major, each repeated per anchor."""
    n = size // stride
    rows, cols = np.mgrid[:n, :n]
    centres = (np.stack([cols, rows], axis=-1).reshape(-1, 2) * stride).astype(np.float32)
    return np.repeat(centres, anchors, axis=0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float = NMS_IOU) -> list[int]:
    """Greedy NMS in descending score order (stable), areas with insightface's +1 pixel convention."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= iou]
    return keep


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) src -> dst (Umeyama), as 2×3."""
    src, dst = src.astype(np.float64), dst.astype(np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    cov = dc.T @ sc / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[-1] = -1
    rank = np.linalg.matrix_rank(cov)
    if rank == 0:  # all landmarks on one point: nothing to align
        raise ValueError("degenerate face landmarks")
    if rank == 1:  # collinear landmarks: pick the proper rotation of the two candidates
        rot = u @ vt if np.linalg.det(u) * np.linalg.det(vt) > 0 else u @ np.diag([1.0, -1.0]) @ vt
    else:
        rot = u @ np.diag(d) @ vt
    scale = (s * d).sum() / ((sc**2).sum() / len(src))
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])


def align(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    matrix = similarity_transform(landmarks, ARCFACE_TEMPLATE * (size / 112))
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)


class FaceDetector(Model):
    task, type = FACES, DETECTION

    def load(self) -> None:
        self.session = self.open(self.files["model"])
        outputs = self.session.get_outputs()
        count = len(outputs)
        if count not in (6, 9, 10, 15):
            raise ValueError(f"not an SCRFD detector: {count} outputs (expected 6, 9, 10 or 15)")
        self.levels = 3 if count in (6, 9) else 5
        self.strides = [8, 16, 32, 64, 128][: self.levels]
        self.anchors = 2 if self.levels == 3 else 1
        self.has_landmarks = count in (9, 15)
        self.input_name = self.session.get_inputs()[0].name
        self.centres = {s: anchor_centres(DET_SIZE, s, self.anchors) for s in self.strides}

    @staticmethod
    def prepare(image: np.ndarray) -> tuple[np.ndarray, float]:
        """RGB image -> the 3×640×640 uint8 letterboxed canvas (a quarter of the float input, kept while the run
        waits for its slot) and the letterbox scale."""
        canvas, scale = letterbox(image)
        return np.ascontiguousarray(canvas.transpose(2, 0, 1)), scale

    @staticmethod
    def blob(planes: np.ndarray) -> np.ndarray:
        """The detector's 1×3×640×640 float input, (x - 127.5) / 128, made in place: one float copy at a time."""
        blob = planes.astype(np.float32)
        blob -= 127.5
        blob /= 128.0
        return blob[None]

    def detect(self, image: np.ndarray, min_score: float, job: Job | None = None) -> DetectedFaces:
        planes, scale = self.prepare(image)
        return self.find(planes, scale, min_score, job or Job())

    def find(self, planes: np.ndarray, scale: float, min_score: float, job: Job) -> DetectedFaces:
        """Run the detector on a prepared canvas and decode its boxes, scores and landmarks."""
        outs = self.run(lambda: {self.input_name: self.blob(planes)}, job)
        outs = [o[0] if o.ndim == 3 else o for o in outs]  # tolerate a leading batch axis
        boxes, scores, points = [], [], []
        for level, stride in enumerate(self.strides):
            score = outs[level].reshape(-1)
            keep = np.nonzero(score >= min_score)[0]
            centres = self.centres[stride][keep]
            dist = outs[level + self.levels][keep] * stride
            boxes.append(np.hstack([centres - dist[:, :2], centres + dist[:, 2:4]]))
            scores.append(score[keep])
            if self.has_landmarks:
                offsets = outs[level + 2 * self.levels][keep].reshape(-1, 5, 2) * stride
                points.append(centres[:, None, :] + offsets)
        box = np.concatenate(boxes).astype(np.float32) / scale
        score = np.concatenate(scores).astype(np.float32)
        marks = np.concatenate(points).astype(np.float32) / scale if self.has_landmarks else None
        kept = nms(box, score)
        return DetectedFaces(
            boxes=box[kept],
            scores=score[kept],
            landmarks=marks[kept] if marks is not None else np.zeros((len(kept), 0, 2), np.float32),
        )

    def predict(self, payload: Payload, options: dict[str, Any]) -> DetectedFaces:
        min_score = option_float(options, "minScore", 0.7, 0.0, 1.0)
        planes, scale = self.prepare(payload.image)
        payload.done_with_image()  # a detection-only request needs no more of it
        return self.find(planes, scale, min_score, payload.job)

    def response(self, output: DetectedFaces, options: dict[str, Any]) -> dict[str, Any]:
        return {
            "boxes": output.boxes.round().tolist(),
            "scores": output.scores.tolist(),
            "landmarks": output.landmarks.tolist(),
        }


def leading_node_names(path: Path, count: int) -> list[str]:
    """The names of an ONNX graph's first nodes, read from the file without parsing its weights.

    `onnx.load` of a 170 MB recogniser takes about half a second and as much memory again, only to read a few
    names; this walks the protobuf instead (ModelProto.graph = 7, GraphProto.node = 1, NodeProto.name = 3,
    and protobuf writes the nodes before the initializers).
    """
    names: list[str] = []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for field, start, end in messages(buf, 0, len(buf)):
            if field != 7:
                continue
            for node_field, n_start, n_end in messages(buf, start, end):
                if node_field != 1:
                    continue
                name = next((buf[a:b] for f, a, b in messages(buf, n_start, n_end) if f == 3), b"")
                names.append(name.decode("utf-8", "replace"))
                if len(names) == count:
                    return names
    return names


class FaceRecognizer(Model):
    task, type = FACES, RECOGNITION

    def load(self) -> None:
        path = self.files["model"]
        # first: ONNX Runtime's error names what is wrong with a bad file. Dynamic: a run's faces come from one or
        # several photos, so its batch size changes from run to run
        self.session = self.open(path, SessionProfile(dynamic_shapes=True))
        try:
            first = leading_node_names(path, 8)
        except (ValueError, IndexError):  # a protobuf this reader does not follow: the library reads it
            import onnx

            first = [n.name for n in onnx.load(str(path)).graph.node[:8]]
        # insightface's rule: MXNet exports normalise inside the graph (a Sub and a Mul up front).
        builtin = any(n.startswith(("Sub", "_minus")) for n in first) and any(
            n.startswith(("Mul", "_mul")) for n in first
        )
        self.mean, self.std = (0.0, 1.0) if builtin else (127.5, 127.5)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.size = int(inp.shape[2]) if isinstance(inp.shape[2], int) else 112
        self.batched = not isinstance(inp.shape[0], int) or inp.shape[0] != 1
        if not self.batched:
            import onnx

            self._add_batch_axis(onnx.load(str(path)))
        # Faces from all concurrent requests share runs; a model stuck at batch 1 goes face by face.
        self.batcher = self.batcher_for(
            lambda crops: list(self.embed(np.stack(crops))), self.max_batch if self.batched else 1, suffix="arcface"
        )

    def _add_batch_axis(self, model) -> None:
        """Give a batch-1 model a symbolic batch axis in memory (the user's file is never touched)."""
        for value in [*model.graph.input, *model.graph.output]:
            dims = value.type.tensor_type.shape.dim
            if dims:
                dims[0].ClearField("dim_value")
                dims[0].dim_param = "batch"
        try:
            session = self.factory.create(model.SerializeToString())
            halves = session.get_inputs()[0].type == "tensor(float16)"
            probe = np.zeros((2, 3, self.size, self.size), np.float16 if halves else np.float32)
            if session.run(None, {self.input_name: probe})[0].shape[0] == 2:
                # the file itself has batch 1: no narrow session from it (runs go on this one)
                self.session, self.batched, self._source = session, True, None
                return
        except Exception as e:  # a graph with the batch baked into a Reshape: run faces one by one
            log.info("%s keeps batch 1 (%s)", self.name, e)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """crops: N×112×112×3 uint8 RGB -> N×512 raw embeddings, in one run."""
        assert self.session is not None
        blob = ((crops.astype(np.float32) - self.mean) / self.std).transpose(0, 3, 1, 2)
        return self.infer({self.input_name: np.ascontiguousarray(blob)})[0].reshape(len(blob), -1)

    def predict(self, payload: Payload, options: dict[str, Any]) -> RecognisedFaces:
        """The detector's boxes and scores with one raw (un-normalised) embedding per face."""
        det = payload.output(FACES, DETECTION, DetectedFaces)
        if len(det.boxes) == 0:
            return RecognisedFaces(det.boxes, det.scores, np.zeros((0, 512), np.float32))
        if det.landmarks.shape[1] != 5:
            raise ValueError("the detector gives no landmarks, so faces cannot be aligned for recognition")
        assert self.batcher is not None
        image = payload.image
        crops = [align(image, marks, self.size) for marks in det.landmarks]
        del image
        payload.done_with_image()  # the crops are all recognition needs: the photo is let go before the run
        embeddings = np.stack(self.batcher.map(crops, payload.job)).astype(np.float32)
        return RecognisedFaces(det.boxes, det.scores, embeddings)

    def response(self, output: RecognisedFaces, options: dict[str, Any]) -> list[dict[str, Any]]:
        """Immich's faces: integral boxes (as floats), raw 512-d embeddings as strings, by descending score."""
        return [
            {
                "boundingBox": dict(zip(("x1", "y1", "x2", "y2"), map(float, box.round()), strict=True)),
                "embedding": vector_string(emb),
                "score": float(score),
            }
            for box, emb, score in zip(output.boxes, output.embeddings, output.scores, strict=True)
        ]
