"""PP-OCR text detection (DB) and recognition (CTC) on sessions from our factory.

RapidOCR supplies two well-tested pieces, the DB box extraction and the CTC decoder; the
pre-processing, cropping, batching and ordering are ours, and RapidOCR is never handed a string
(its pipeline fetches strings that look like URLs).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from immich_aio.errors import BadRequest
from immich_aio.jobs import Job
from immich_aio.models.base import Model
from immich_aio.models.outputs import TextBoxes, TextLines
from immich_aio.payload import Payload
from immich_aio.protocol import option_float
from immich_aio.sessions import SessionFactory, SessionProfile
from immich_aio.tasks import DETECTION, OCR, RECOGNITION

REC_HEIGHT = 48
# Line images are padded to one of a few canvas widths, so a GPU sees few distinct shapes and lines
# from different requests can share a run. Wider lines keep their own width.
REC_BUCKETS = (320, 480, 640, 960, 1280, 1920, 2560)
# Wider lines are squeezed to this width: a line tensor is at most 3×48×8192 floats (4.7 MB),
# however wide a panorama is.
REC_MAX_WIDTH = 8192
LINE_GAP_PX = 10  # boxes whose tops differ by less than this are one line of text


def bundled_model_dir() -> Path:
    import rapidocr

    return Path(rapidocr.__file__).parent / "models"


def detector_input_size(height: int, width: int, max_resolution: int, max_side: int) -> tuple[int, int]:
    """Scale the shorter side down (never up) to max_resolution, and the longer side to at most max_side.

    Both sides become multiples of 32. The long-side bound keeps a thin panorama (62500×1600, say) from
    reaching the detector at 736×28736: its working size, and so its memory, is bounded whatever the input.
    """
    ratio = min(max_resolution / min(height, width), max_side / max(height, width), 1.0)
    return (max(32, round(height * ratio / 32) * 32), max(32, round(width * ratio / 32) * 32))


def detector_blob(planes: np.ndarray) -> np.ndarray:
    """PP-OCR's 1×3×H×W float input from uint8 BGR planes, ((x / 255) - 0.5) / 0.5, made in place (one float copy,
    4x the planes' bytes, only once the run has its slot)."""
    blob = planes.astype(np.float32)
    blob /= 255.0
    blob -= 0.5
    blob /= 0.5
    return blob[None]


def reading_order(boxes: np.ndarray) -> np.ndarray:
    """Indices top-to-bottom, then left-to-right within a line (lines split at gaps >= LINE_GAP_PX)."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    tops = boxes[:, 0, 1]
    by_top = np.argsort(tops, kind="stable")
    line = np.concatenate([[0], np.cumsum(np.diff(tops[by_top]) >= LINE_GAP_PX)])
    return by_top[np.lexsort((boxes[by_top, 0, 0], line))]


def crop_quad(image: np.ndarray, quad: np.ndarray) -> np.ndarray | None:
    """Rectify one detected quadrilateral (TL, TR, BR, BL) into an upright line image."""
    quad = quad.astype(np.float32)
    width = int(max(np.linalg.norm(quad[0] - quad[1]), np.linalg.norm(quad[2] - quad[3])))
    height = int(max(np.linalg.norm(quad[0] - quad[3]), np.linalg.norm(quad[1] - quad[2])))
    if width < 1 or height < 1:
        return None
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float32)
    matrix = cv2.getPerspectiveTransform(quad, target)
    crop = cv2.warpPerspective(image, matrix, (width, height), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    if height / width >= 1.5:  # vertical text: read it as a horizontal line
        crop = np.ascontiguousarray(np.rot90(crop))
    return crop


def charset(model: Path, metadata: dict[str, str]) -> list[str]:
    """The recogniser's characters: PP-OCR ONNX exports carry them as metadata; others beside the model."""
    if "character" in metadata:
        return metadata["character"].splitlines()
    beside = model.with_name("charset.txt")
    if beside.is_file():
        return beside.read_text(encoding="utf-8").splitlines()
    raise ValueError(
        "the recognition model has no 'character' metadata (the PP-OCR ONNX charset) and no charset.txt beside it"
    )


def import_post_processing() -> None:
    """Import rapidocr's DB post-processing and CTC decoder (about 0.6 s: importing the package parses its
    YAML configuration). The server does it once at start, off the request path, so that the first OCR
    request after a start does not pay it; the models import the same modules, which is then free."""
    import rapidocr.ch_ppocr_det.utils
    import rapidocr.ch_ppocr_rec.utils  # noqa: F401


class OcrDetector(Model):
    task, type = OCR, DETECTION
    short_runs = True
    solo_runs = True

    def __init__(self, name: str, files: dict[str, Path], factory: SessionFactory, max_side: int) -> None:
        super().__init__(name, files, factory)
        self.max_side = max_side  # IMMICH_AIO_OCR_MAX_SIDE: the detector input's longest side

    def load(self) -> None:
        from rapidocr.ch_ppocr_det.utils import DBPostProcess

        self._post = DBPostProcess
        profile = SessionProfile(dynamic_shapes=True, cpu=self.factory.ocr_on_cpu)
        self.session = self.open(self.files["model"], profile)
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, payload: Payload, options: dict[str, Any]) -> TextBoxes:
        min_score = option_float(options, "minScore", 0.5, 0.0, 1.0)
        max_res = option_float(options, "maxResolution", 736, 1, 100_000)
        score_mode = options.get("scoreMode", "fast")
        if score_mode not in ("fast", "slow"):
            raise BadRequest(f"option 'scoreMode' must be 'fast' or 'slow', got {score_mode!r}")
        assert payload.size is not None
        height, width = payload.size
        empty = TextBoxes(np.zeros((0, 4, 2), np.float32), np.zeros(0, np.float32))
        if height < 32 or width < 32:
            return empty
        in_h, in_w = detector_input_size(height, width, int(max_res), self.max_side)
        interp = cv2.INTER_AREA if in_h < height else cv2.INTER_LINEAR
        # PP-OCR reads BGR: the channels are swapped on the small resized image, which equals resizing a
        # swapped copy of the whole photo (resizing treats channels independently) without making one.
        resized = cv2.cvtColor(cv2.resize(payload.image, (in_w, in_h), interpolation=interp), cv2.COLOR_RGB2BGR)
        planes = np.ascontiguousarray(resized.transpose(2, 0, 1))  # uint8 while it waits for its slot
        del resized
        payload.done_with_image()  # a detection-only request needs no more of it
        prob = self.run(lambda: {self.input_name: detector_blob(planes)}, payload.job)[0]
        post = self._post(
            thresh=0.3,
            box_thresh=min_score,
            max_candidates=1000,
            unclip_ratio=1.6,
            use_dilation=True,
            score_mode=score_mode,
        )
        boxes, scores = post(prob, (height, width))
        if len(boxes) == 0:
            return empty
        boxes = np.asarray(boxes, dtype=np.float32)
        order = reading_order(boxes)
        return TextBoxes(boxes[order], np.asarray(scores, dtype=np.float32)[order])

    def response(self, output: TextBoxes, options: dict[str, Any]) -> dict[str, Any]:
        return {"boxes": output.quads.tolist(), "scores": output.scores.tolist()}


class OcrRecognizer(Model):
    task, type = OCR, RECOGNITION
    short_runs = True

    def load(self) -> None:
        from rapidocr.ch_ppocr_rec.utils import CTCLabelDecode

        profile = SessionProfile(dynamic_shapes=True, cpu=self.factory.ocr_on_cpu)
        self.session = self.open(self.files["model"], profile)
        self.input_name = self.session.get_inputs()[0].name
        chars = charset(self.files["model"], self.session.get_modelmeta().custom_metadata_map)
        classes = self.session.get_outputs()[0].shape[-1]
        if isinstance(classes, int) and classes != len(chars) + 2:  # + CTC blank + space
            raise ValueError(f"the charset has {len(chars)} characters but the model predicts {classes} classes")
        self.decoder = CTCLabelDecode(character=chars)
        self.batcher = self.batcher_for(self._run_lines, self.max_batch, suffix="rec", key=lambda line: line.shape[2])

    @staticmethod
    def prepare_line(crop: np.ndarray) -> np.ndarray:
        """BGR line crop -> normalised 3×48×bucket tensor, zero-padded on the right."""
        width = min(math.ceil(REC_HEIGHT * crop.shape[1] / crop.shape[0]), REC_MAX_WIDTH)
        bucket = next((b for b in REC_BUCKETS if b >= width), width)
        line = cv2.resize(crop, (width, REC_HEIGHT)).astype(np.float32)
        canvas = np.zeros((3, REC_HEIGHT, bucket), dtype=np.float32)
        canvas[:, :, :width] = ((line / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
        return canvas

    def _run_lines(self, lines: list[np.ndarray]) -> list[np.ndarray]:
        """The batched ONNX Runtime run: per line, its CTC probabilities (decoded by the caller)."""
        return list(self.infer({self.input_name: np.stack(lines)})[0])

    def recognize(self, crops: list[np.ndarray], job: Job) -> list[tuple[str, float]]:
        """Recognise line images; lines of one width bucket share runs, across requests too.

        CTC decoding happens here, on the request's thread, so the shared run slot is held only
        for the ONNX Runtime run itself.
        """
        assert self.batcher is not None
        probs = self.batcher.map([self.prepare_line(c) for c in crops], job)
        return [(text, float(score)) for p in probs for text, score in self.decoder(p[None], False)[0]]

    def predict(self, payload: Payload, options: dict[str, Any]) -> TextLines:
        min_score = option_float(options, "minScore", 0.9, 0.0, 1.0)
        det = payload.output(OCR, DETECTION, TextBoxes)
        boxes, box_scores = det.quads, det.scores
        crops, kept = [], []
        if len(boxes):
            image = payload.image
            for i, quad in enumerate(boxes):
                crop = crop_quad(image, quad)
                if crop is not None:
                    crops.append(cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))  # BGR, as PP-OCR reads
                    kept.append(i)
            del image
        payload.done_with_image()  # the line crops are all recognition needs
        recognised = self.recognize(crops, payload.job) if crops else []
        assert payload.size is not None
        height, width = payload.size
        scale = np.array([width, height], dtype=np.float32)
        text, keep, text_score = [], [], []
        for i, (line, score) in zip(kept, recognised, strict=True):
            if line and score > min_score:  # strict, as upstream
                text.append(line)
                keep.append(i)
                text_score.append(round(score, 5))
        # float32 so the JSON carries float32's shortest repr, like upstream's numpy output
        box = (boxes[keep] / scale).astype(np.float32).reshape(-1) if keep else np.zeros(0, np.float32)
        box_score = [round(float(s), 5) for s in box_scores[keep]] if keep else []
        quads = boxes[keep] if keep else np.zeros((0, 4, 2), np.float32)  # pixels, for the MT Photos shapes
        return TextLines(text=text, box=box, box_score=box_score, text_score=text_score, quads=quads)

    def response(self, output: TextLines, options: dict[str, Any]) -> dict[str, Any]:
        return {"text": output.text, "box": output.box, "boxScore": output.box_score, "textScore": output.text_score}
