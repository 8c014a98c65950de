"""Chinese-CLIP towers in the official ONNX export format.

Folder `<root>/clip/<name>/`: `config.json` (`model_type: cn-clip`, `embed_dim`, `image_size`,
`context_length`), `visual/model.onnx` (`image` float32 [N,3,S,S]), `textual/model.onnx` (`text`
int64 [N,L]) and `textual/vocab.txt`. Preprocessing follows Chinese-CLIP's own: a bicubic squash to
S×S (no crop) and CLIP mean/std; text is BERT WordPiece with one token per CJK character.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from immich_aio.errors import BadRequest
from immich_aio.imaging import resize_bicubic
from immich_aio.jobs import Job
from immich_aio.models.base import Model
from immich_aio.payload import Payload
from immich_aio.protocol import vector_string
from immich_aio.sessions import SessionProfile
from immich_aio.tasks import CLIP, INTERACTIVE, TEXTUAL, VISUAL

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
MODEL_TYPE = "cn-clip"


@dataclass(frozen=True)
class ClipConfig:
    embed_dim: int
    image_size: int
    context_length: int = 52

    @classmethod
    def read(cls, model_dir: Path) -> ClipConfig:
        data = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        if data.get("model_type") != MODEL_TYPE:
            raise ValueError(
                f"{model_dir / 'config.json'} is not a CN-CLIP config (model_type {data.get('model_type')!r})"
            )
        return cls(int(data["embed_dim"]), int(data["image_size"]), int(data.get("context_length", 52)))


def is_cn_clip(model_dir: Path) -> bool:
    try:
        return json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def preprocess_image(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """RGB image -> float32 3xSxS, exactly Chinese-CLIP's transform (squash, bicubic, CLIP norm)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    resized = resize_bicubic(image, (size, size))
    x = np.asarray(resized, dtype=np.float32) / 255.0
    return ((x - MEAN) / STD).transpose(2, 0, 1)


def make_tokenizer(vocab: Path, context_length: int):
    """HF `tokenizers` WordPiece that reproduces cn_clip's FullTokenizer + tokenize() ids.

    Built from parts rather than with BertWordPieceTokenizer: that one registers [CLS], [SEP] etc.
    as special tokens and would match them inside user text, which cn_clip splits like any word.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    vocab_ids = WordPiece.read_file(str(vocab))
    tok = Tokenizer(WordPiece(vocab_ids, unk_token="[UNK]", max_input_chars_per_word=200))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.BertProcessing(("[SEP]", vocab_ids["[SEP]"]), ("[CLS]", vocab_ids["[CLS]"]))
    tok.enable_truncation(max_length=context_length)
    tok.enable_padding(length=context_length, pad_id=vocab_ids["[PAD]"], pad_token="[PAD]")
    return tok


class ClipTower(Model):
    """One CLIP encoder: prepared items (one array per model input) batched across requests, L2-normalised out
    (Immich's own towers, which normalise inside the graph, send the row as it is: clip_immich.py).

    Image towers run in the background lane; text towers (a person searching) are interactive and never wait
    for a background slot. A model exported with a fixed batch of 1 runs its items one by one.
    """

    task = CLIP

    def open_session(self, path: Path, embed_dim: int | None) -> None:
        self.session = self.open(path, SessionProfile(dynamic_shapes=True))  # batches of 1 to 16 across requests
        inputs = self.session.get_inputs()
        self.input_names = [i.name for i in inputs]
        self.fixed_batch_1 = inputs[0].shape[0] == 1
        out_dim = self.session.get_outputs()[0].shape[-1]
        if embed_dim is not None and isinstance(out_dim, int) and out_dim != embed_dim:
            raise ValueError(f"model output has {out_dim} dims but config.json says embed_dim {embed_dim}")
        self.batcher = self.batcher_for(
            lambda items: list(self.embed(items)),
            1 if self.fixed_batch_1 else None,
            suffix=self.type,
            interactive=self.type == INTERACTIVE,
        )

    def input_dtype(self, index: int = 0) -> type[np.integer]:
        assert self.session is not None
        return np.int32 if "int32" in self.session.get_inputs()[index].type else np.int64

    def embed(self, items: Sequence[tuple[np.ndarray, ...]]) -> np.ndarray:
        """Run prepared items (any number) and return the model's rows as they come out.

        The raw rows are the output: Immich's answer L2-normalises them (`response`, except for Immich's own
        towers); the MT Photos API sends them as the official service does, un-normalised.
        """
        assert self.session is not None
        if self.fixed_batch_1 and len(items) > 1:
            out = np.concatenate([self.infer(self._feeds([item]))[0] for item in items])
        else:
            out = self.infer(self._feeds(items))[0]
        return out.reshape(len(items), -1).astype(np.float32)

    def _feeds(self, items: Sequence[tuple[np.ndarray, ...]]) -> dict[str, np.ndarray]:
        return {name: np.stack([item[i] for item in items]) for i, name in enumerate(self.input_names)}

    @staticmethod
    def decode_side(image_size: int) -> int:
        """The shorter side a reduced JPEG decode must keep, where one is allowed (IMMICH_AIO_CLIP_REDUCED_DECODE:
        the pipeline marks the payload, which decodes in full otherwise).

        Twice the model's input: the bicubic resize after it still averages at least 2×2 decoded pixels per
        input pixel. Off by default, because the vectors are then close to, not identical with, a full
        decode's (Immich ML's, the official services').
        """
        return 2 * image_size

    def image_for(self, payload: Payload, options: dict[str, Any], image_size: int) -> Image.Image:
        """The RGB image, or (option `swapRB`) with red and blue swapped, as some MT Photos images embedded."""
        swap = options.get("swapRB", False)
        if not isinstance(swap, bool):
            raise BadRequest(f"option 'swapRB' must be true or false, got {swap!r}")
        image = payload.pil(self.decode_side(image_size))
        return Image.merge("RGB", image.split()[::-1]) if swap else image

    def encode_image(self, payload: Payload, options: dict[str, Any], image_size: int) -> np.ndarray:
        """Prepare the model input, let the decoded image go, then wait for the (batched) run."""
        item = self.prepare(self.image_for(payload, options, image_size))
        payload.done_with_image()
        return self.encode(item, payload.job)

    def prepare(self, source: Any) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def encode(self, item: tuple[np.ndarray, ...], job: Job) -> np.ndarray:
        assert self.batcher is not None
        return self.batcher.map([item], job)[0]

    def response(self, output: np.ndarray, options: dict[str, Any]) -> str:
        return vector_string(l2_normalise(output))


class CnClipVisual(ClipTower):
    type = VISUAL

    def load(self) -> None:
        self.config = ClipConfig.read(self.files["model"].parent.parent)
        self.open_session(self.files["model"], self.config.embed_dim)

    def prepare(self, image: Image.Image | np.ndarray) -> tuple[np.ndarray]:
        return (preprocess_image(image, self.config.image_size),)

    def predict(self, payload: Payload, options: dict[str, Any]) -> np.ndarray:
        return self.encode_image(payload, options, self.config.image_size)


class CnClipTextual(ClipTower):
    type = TEXTUAL

    def load(self) -> None:
        self.config = ClipConfig.read(self.files["model"].parent.parent)
        self.open_session(self.files["model"], self.config.embed_dim)
        vocab = self.files.get("vocab")
        if vocab is None or not vocab.is_file():
            raise ValueError(f"missing tokenizer vocabulary {vocab}")
        self.tokenizer = make_tokenizer(vocab, self.config.context_length)
        self.id_dtype = self.input_dtype()

    def prepare(self, text: str) -> tuple[np.ndarray]:
        return (np.asarray(self.tokenizer.encode(text).ids, dtype=self.id_dtype),)

    def predict(self, payload: Payload, options: dict[str, Any]) -> np.ndarray:
        # `language` is accepted and ignored: CN-CLIP reads Chinese and English alike.
        assert payload.text is not None
        return self.encode(self.prepare(payload.text), payload.job)
