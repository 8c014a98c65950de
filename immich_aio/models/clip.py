"""Chinese-CLIP towers in the official ONNX export format.

Folder `<root>/clip/<name>/`: `config.json` (`model_type: cn-clip`, `embed_dim`, `image_size`,
`context_length`), `visual/model.onnx` (`image` float32 [N,3,S,S]), `textual/model.onnx` (`text`
int64 [N,L]) and `textual/vocab.txt`. Preprocessing follows Chinese-CLIP's own: a bicubic squash to
S×S (no crop) and CLIP mean/std; text is BERT WordPiece with one token per CJK character.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from immich_aio.models.base import Model, Payload
from immich_aio.protocol import CLIP, TEXTUAL, VISUAL, vector_string

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


def preprocess_image(image: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 HxWx3 -> float32 3xSxS, exactly Chinese-CLIP's transform (squash, bicubic, CLIP norm)."""
    resized = Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC)
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


class _ClipTower(Model):
    task = CLIP

    def _open(self) -> None:
        self.config = ClipConfig.read(self.files["model"].parent.parent)
        self.session = self.factory.create(self.files["model"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        # Official exports fix the batch at 1; re-exports have a symbolic batch axis.
        self.fixed_batch_1 = inp.shape[0] == 1
        out_dim = self.session.get_outputs()[0].shape[-1]
        if isinstance(out_dim, int) and out_dim != self.config.embed_dim:
            raise ValueError(f"model output has {out_dim} dims but config.json says embed_dim {self.config.embed_dim}")
        # Requests arriving together share one run; a batch-1 export runs them one by one. Text
        # (a person searching) is interactive and never waits for a background slot.
        self.batcher = self.batcher_for(
            lambda items: list(self.embed(np.stack(items))),
            1 if self.fixed_batch_1 else None,
            suffix=self.type,
            interactive=self.type == TEXTUAL,
        )

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """Run a prepared batch (any size) and return L2-normalised rows."""
        assert self.session is not None
        if self.fixed_batch_1 and len(batch) > 1:
            out = np.concatenate([self.infer({self.input_name: row[None]})[0] for row in batch])
        else:
            out = self.infer({self.input_name: batch})[0]
        return l2_normalise(out.reshape(len(batch), -1))

    def response(self, output: np.ndarray, options: dict[str, Any]) -> str:
        return vector_string(output)


class CnClipVisual(_ClipTower):
    type = VISUAL

    def load(self) -> None:
        self._open()

    def prepare(self, image: np.ndarray) -> np.ndarray:
        return preprocess_image(image, self.config.image_size)

    def predict(self, payload: Payload, options: dict[str, Any]) -> np.ndarray:
        assert payload.image is not None and self.batcher is not None
        return self.batcher.map([self.prepare(payload.image)], payload.job)[0]


class CnClipTextual(_ClipTower):
    type = TEXTUAL

    def load(self) -> None:
        self._open()
        vocab = self.files.get("vocab")
        if vocab is None or not vocab.is_file():
            raise ValueError(f"missing tokenizer vocabulary {vocab}")
        self.tokenizer = make_tokenizer(vocab, self.config.context_length)
        self.id_dtype = np.int32 if "int32" in self.session.get_inputs()[0].type else np.int64

    def prepare(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text).ids, dtype=self.id_dtype)

    def predict(self, payload: Payload, options: dict[str, Any]) -> np.ndarray:
        # `language` is accepted and ignored: CN-CLIP reads Chinese and English alike.
        assert payload.text is not None and self.batcher is not None
        return self.batcher.map([self.prepare(payload.text)], payload.job)[0]
