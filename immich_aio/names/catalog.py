"""The names clients may send, per task: Immich's fixed lists, as data.

A leaf module (it imports no model code, so no ONNX Runtime or OpenCV): the resolvers in names/ and the
downloaders in download/ both read it.
"""

from __future__ import annotations

from immich_aio.store import clean_name
from immich_aio.tasks import DETECTION

# --- CLIP -----------------------------------------------------------------------------------------

_BY_DIM = {
    512: "RN101__openai RN101__yfcc15m ViT-B-16__laion400m_e31 ViT-B-16__laion400m_e32 ViT-B-16__openai "
    "ViT-B-32__laion2b-s34b-b79k ViT-B-32__laion2b_e16 ViT-B-32__laion400m_e31 ViT-B-32__laion400m_e32 "
    "ViT-B-32__openai XLM-Roberta-Base-ViT-B-32__laion5b_s13b_b90k XLM-Roberta-Large-Vit-B-32",
    640: "RN50x4__openai ViT-B-16-plus-240__laion400m_e31 ViT-B-16-plus-240__laion400m_e32 "
    "XLM-Roberta-Large-Vit-B-16Plus",
    768: "LABSE-Vit-L-14 RN50x16__openai ViT-B-16-SigLIP-256__webli ViT-B-16-SigLIP-384__webli "
    "ViT-B-16-SigLIP-512__webli ViT-B-16-SigLIP-i18n-256__webli ViT-B-16-SigLIP__webli ViT-L-14-336__openai "
    "ViT-L-14-quickgelu__dfn2b ViT-L-14__laion2b-s32b-b82k ViT-L-14__laion400m_e31 ViT-L-14__laion400m_e32 "
    "ViT-L-14__openai XLM-Roberta-Large-Vit-L-14 nllb-clip-base-siglip__mrl nllb-clip-base-siglip__v1 "
    "ViT-B-16-SigLIP2__webli ViT-B-32-SigLIP2-256__webli",
    1024: "RN50__cc12m RN50__openai RN50__yfcc15m RN50x64__openai ViT-H-14-378-quickgelu__dfn5b "
    "ViT-H-14-quickgelu__dfn5b ViT-H-14__laion2b-s32b-b79k ViT-L-16-SigLIP-256__webli ViT-L-16-SigLIP-384__webli "
    "ViT-g-14__laion2b-s12b-b42k XLM-Roberta-Large-ViT-H-14__frozen_laion5b_s13b_b90k ViT-L-16-SigLIP2-256__webli "
    "ViT-L-16-SigLIP2-384__webli ViT-L-16-SigLIP2-512__webli",
    1152: "ViT-SO400M-14-SigLIP-384__webli nllb-clip-large-siglip__mrl nllb-clip-large-siglip__v1 "
    "ViT-SO400M-14-SigLIP2__webli ViT-SO400M-14-SigLIP2-378__webli ViT-SO400M-16-SigLIP2-256__webli "
    "ViT-SO400M-16-SigLIP2-384__webli ViT-SO400M-16-SigLIP2-512__webli",
    1536: "ViT-gopt-16-SigLIP2-256__webli ViT-gopt-16-SigLIP2-384__webli",
}
# Immich server's CLIP_MODEL_INFO: every accepted name (as the ML cleans it) and its dimension.
IMMICH_CLIP_DIMS: dict[str, int] = {clean_name(n): dim for dim, names in _BY_DIM.items() for n in names.split()}

# --- faces ----------------------------------------------------------------------------------------

PACKS = ("buffalo_l", "buffalo_m", "buffalo_s", "antelopev2")

# --- OCR ------------------------------------------------------------------------------------------

BUNDLED = "PP-OCRv6_small"

IMMICH_NAMES = (
    "PP-OCRv5_server",
    "PP-OCRv5_mobile",
    "CH__PP-OCRv5_server",
    "CH__PP-OCRv5_mobile",
    "EL__PP-OCRv5_mobile",
    "EN__PP-OCRv5_mobile",
    "ESLAV__PP-OCRv5_mobile",
    "KOREAN__PP-OCRv5_mobile",
    "LATIN__PP-OCRv5_mobile",
    "TH__PP-OCRv5_mobile",
    # Immich's PP-OCRv6 work (closed upstream, and its model-export repository) uses these names.
    "PP-OCRv6_tiny",
    "PP-OCRv6_small",
    "PP-OCRv6_medium",
)


def store_folder(name: str, type_: str) -> str:
    """Immich's layout: detection drops the language prefix (shared detector), recognition keeps it."""
    return name.split("__")[-1] if type_ == DETECTION else name
