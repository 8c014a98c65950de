"""Immich's own CLIP models (OpenCLIP, SigLIP and SigLIP2, M-CLIP, NLLB-CLIP), as Immich ML serves them.

Folder `<root>/clip/<name>/` in Immich ML's cache layout: `config.json` (open_clip's model config),
`visual/model.onnx` + `visual/preprocess_cfg.json`, `textual/model.onnx` + `textual/tokenizer.json` +
`textual/tokenizer_config.json`. The numerics are Immich ML's, so a library embedded by Immich ML keeps
its vector space:

- image: the shorter side resized to `size` with PIL bicubic (the other side `int(other / short * size)`),
  a centre crop `size`×`size` (left `int(w/2 - size/2)`, top likewise), `x/255`, then `(x - mean) / std`;
  `resize_mode` in the config is ignored, as Immich ML ignores it;
- text: whitespace runs collapsed (and, for the SigLIP family's `clean: canonicalize`, ASCII punctuation
  removed and lower-cased); the tokenizer from `tokenizer.json`, padded with `tokenizer_config.json`'s pad
  token and truncated to `text_cfg.context_length` (77 unless set); NLLB models get the FLORES-200 code of
  the request's `language` prepended without a separator; OpenCLIP takes `text`, M-CLIP `input_ids` and
  `attention_mask`, in the integer type the model declares;
- output: the model's row as it comes out (Immich's exports normalise inside the graph), not normalised again.
"""

from __future__ import annotations

import json
import logging
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from immich_aio.errors import BadRequest
from immich_aio.imaging import resize_bicubic
from immich_aio.models.clip import ClipTower
from immich_aio.payload import Payload
from immich_aio.protocol import vector_string
from immich_aio.tasks import TEXTUAL, VISUAL

log = logging.getLogger(__name__)

# Weblate locale (what Immich's web sends as `language`) to FLORES-200, for NLLB-CLIP.
WEBLATE_TO_FLORES200 = {
    "af": "afr_Latn", "ar": "arb_Arab", "az": "azj_Latn", "be": "bel_Cyrl", "bg": "bul_Cyrl", "ca": "cat_Latn",
    "cs": "ces_Latn", "da": "dan_Latn", "de": "deu_Latn", "el": "ell_Grek", "en": "eng_Latn", "es": "spa_Latn",
    "et": "est_Latn", "fa": "pes_Arab", "fi": "fin_Latn", "fr": "fra_Latn", "he": "heb_Hebr", "hi": "hin_Deva",
    "hr": "hrv_Latn", "hu": "hun_Latn", "hy": "hye_Armn", "id": "ind_Latn", "it": "ita_Latn", "ja": "jpn_Hira",
    "kmr": "kmr_Latn", "ko": "kor_Hang", "lb": "ltz_Latn", "lt": "lit_Latn", "lv": "lav_Latn", "mfa": "zsm_Latn",
    "mk": "mkd_Cyrl", "mn": "khk_Cyrl", "mr": "mar_Deva", "ms": "zsm_Latn", "nb-NO": "nob_Latn", "nn": "nno_Latn",
    "nl": "nld_Latn", "pl": "pol_Latn", "pt-BR": "por_Latn", "pt": "por_Latn", "ro": "ron_Latn", "ru": "rus_Cyrl",
    "sk": "slk_Latn", "sl": "slv_Latn", "sr-Cyrl": "srp_Cyrl", "sv": "swe_Latn", "ta": "tam_Taml", "te": "tel_Telu",
    "th": "tha_Thai", "tr": "tur_Latn", "uk": "ukr_Cyrl", "ur": "urd_Arab", "vi": "vie_Latn", "zh-CN": "zho_Hans",
    "zh-Hans": "zho_Hans", "zh-TW": "zho_Hant",
}  # fmt: skip
_PUNCTUATION = str.maketrans("", "", string.punctuation)
VISUAL_FILES = ("model.onnx", "preprocess_cfg.json")
TEXTUAL_FILES = ("model.onnx", "tokenizer.json", "tokenizer_config.json")


def is_immich_clip(folder: Path) -> bool:
    """An Immich ML CLIP folder: open_clip's config.json beside at least one tower (a CN-CLIP config is not one)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict) or config.get("model_type") == "cn-clip":
        return False
    return (folder / VISUAL / "model.onnx").is_file() or (folder / TEXTUAL / "model.onnx").is_file()


def embed_dim(folder: Path) -> int | None:
    try:
        value = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("embed_dim")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


@dataclass(frozen=True)
class Preprocess:
    size: int
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def read(cls, path: Path) -> Preprocess:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        size = cfg["size"][0] if isinstance(cfg["size"], list) else cfg["size"]
        return cls(int(size), np.asarray(cfg["mean"], np.float32), np.asarray(cfg["std"], np.float32))

    def __call__(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """RGB image -> float32 3xSxS: shorter side to S (bicubic), centre crop, scale, normalise."""
        img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
        w, h = img.size
        if w < h:
            img = resize_bicubic(img, (self.size, int(h / w * self.size)))
        else:
            img = resize_bicubic(img, (int(w / h * self.size), self.size))
        left, top = int(img.size[0] / 2 - self.size / 2), int(img.size[1] / 2 - self.size / 2)
        img = img.crop((left, top, left + self.size, top + self.size))
        x = np.asarray(img, dtype=np.float32) / 255.0
        return np.divide(x - self.mean, self.std, dtype=np.float32).transpose(2, 0, 1)


def clean_text(text: str, canonicalize: bool) -> str:
    text = " ".join(text.split())
    return text.translate(_PUNCTUATION).lower() if canonicalize else text


def flores_code(language: str) -> str:
    """FLORES-200 code for a Weblate locale; the base language if the locale is unknown; English otherwise."""
    code = WEBLATE_TO_FLORES200.get(language) or WEBLATE_TO_FLORES200.get(language.split("-")[0])
    if code is None:
        log.warning("Language %r has no FLORES-200 code for NLLB-CLIP; searching as English", language[:40])
        return "eng_Latn"
    return code


class ImmichTower(ClipTower):
    """A tower of Immich's own export, which L2-normalises inside the graph (`encode_*(normalize=True)`)."""

    def response(self, output: np.ndarray, options: dict[str, Any]) -> str:
        """The row as the model gives it, as Immich ML sends it: normalising an already unit vector again moves
        its components by up to a float32 rounding (1e-7), and the vectors would no longer be Immich ML's to the
        bit."""
        return vector_string(output)


class ImmichClipVisual(ImmichTower):
    type = VISUAL

    def load(self) -> None:
        self.preprocess = Preprocess.read(self.files["preprocess"])
        self.open_session(self.files["model"], embed_dim(self.files["model"].parent.parent))

    def prepare(self, image: Image.Image | np.ndarray) -> tuple[np.ndarray]:
        return (self.preprocess(image),)

    def predict(self, payload: Payload, options: dict[str, Any]) -> np.ndarray:
        return self.encode_image(payload, options, self.preprocess.size)


class ImmichClipTextual(ImmichTower):
    type = TEXTUAL

    def load(self) -> None:
        from tokenizers import Tokenizer

        folder = self.files["model"].parent.parent
        text_cfg = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("text_cfg", {})
        self.context_length = int(text_cfg.get("context_length", 77))
        self.canonicalize = (text_cfg.get("tokenizer_kwargs") or {}).get("clean") == "canonicalize"
        self.nllb = self.name.startswith("nllb")
        pad = json.loads(self.files["tokenizer_config"].read_text(encoding="utf-8")).get("pad_token")
        pad_token = pad.get("content") if isinstance(pad, dict) else pad
        tokenizer = Tokenizer.from_file(str(self.files["tokenizer"]))
        pad_id = tokenizer.token_to_id(pad_token) if isinstance(pad_token, str) else None
        if pad_id is None:
            raise ValueError(f"tokenizer_config.json's pad_token {pad_token!r} is not in tokenizer.json")
        tokenizer.enable_padding(length=self.context_length, pad_id=pad_id, pad_token=pad_token)
        tokenizer.enable_truncation(max_length=self.context_length)
        self.tokenizer = tokenizer
        self.open_session(self.files["model"], embed_dim(folder))
        if set(self.input_names) == {"input_ids", "attention_mask"}:
            self.mclip = True  # M-CLIP: both inputs, ids first
            self.input_names = ["input_ids", "attention_mask"]
        elif len(self.input_names) == 1:
            self.mclip = False
        else:
            raise ValueError(
                f"unexpected text model inputs {self.input_names}; expected `text`, or `input_ids` + `attention_mask`"
            )
        self.id_dtype = self.input_dtype()

    def prepare(self, text: str, language: str | None = None) -> tuple[np.ndarray, ...]:
        text = clean_text(text, self.canonicalize)
        if self.nllb and language:
            text = flores_code(language) + text
        encoding = self.tokenizer.encode(text)
        ids = np.asarray(encoding.ids, dtype=self.id_dtype)
        if self.mclip:
            return ids, np.asarray(encoding.attention_mask, dtype=self.id_dtype)
        return (ids,)

    def predict(self, payload: Payload, options: dict[str, Any]) -> np.ndarray:
        assert payload.text is not None
        language = options.get("language")
        if language is not None and not isinstance(language, str):
            raise BadRequest(f"option 'language' must be a string such as 'zh-CN', got {language!r}")
        return self.encode(self.prepare(payload.text, language), payload.job)
