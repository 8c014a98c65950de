"""Immich-format CLIP models of every family, built at test time: real tokenizers, random-weight towers.

Each family gets what Immich's own export gives it (immich-protocol.md §5.1-5.3): `config.json`,
`visual/model.onnx` + `visual/preprocess_cfg.json`, `textual/model.onnx` + `textual/tokenizer.json` +
`textual/tokenizer_config.json`, with the inputs, dtypes, context lengths, pad tokens and cleaning of its
family. The towers are small, but sensitive to what matters: the image tower to every pixel position, the
text tower to every token and its position (so a wrong pad, truncation or mask changes the vector).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS = [
    "a photo of a cat sleeping on the sofa",
    "sunset at the beach with palm trees",
    "birthday cake with candles",
    "海边的日落",
    "一只猫在沙发上睡觉",
    "雪山 徒步 旅行",
    "地铁站的人群",
    "Immich 照片服务器 2024年",
    "发票 合计 ¥128.00",
    "the quick brown fox jumps over the lazy dog",
    "Katze auf dem Sofa, Sonnenuntergang am Strand",
    "日本の桜と富士山",
    "サンセットビーチ",
]
FLORES = ["eng_Latn", "zho_Hans", "zho_Hant", "deu_Latn", "jpn_Hira", "por_Latn", "fra_Latn"]


@dataclass(frozen=True)
class Family:
    name: str  # the Immich name the folder is installed under
    dim: int
    tokenizer: str  # bpe (OpenAI CLIP), t5 (SigLIP), xlmr (M-CLIP), nllb
    pad_token: str
    context_length: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    canonicalize: bool = False
    mclip: bool = False
    fixed_batch_1: bool = False
    int64_ids: bool = False
    extra_text_cfg: dict = field(default_factory=dict)


OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
FAMILIES = {
    "openclip": Family("ViT-B-32__openai", 512, "bpe", "<|endoftext|>", 77, 48, *OPENAI),
    "siglip": Family(
        "ViT-B-16-SigLIP__webli", 768, "t5", "<pad>", 64, 40, (0.5,) * 3, (0.5,) * 3, canonicalize=True,
        fixed_batch_1=True,
    ),
    "siglip2": Family(
        "ViT-B-16-SigLIP2__webli", 768, "t5", "<pad>", 64, 36, (0.5,) * 3, (0.5,) * 3, canonicalize=True,
        int64_ids=True,
    ),
    "mclip": Family("XLM-Roberta-Large-Vit-B-32", 512, "xlmr", "<pad>", 77, 48, *OPENAI, mclip=True),
    "nllb": Family("nllb-clip-base-siglip__v1", 768, "nllb", "<pad>", 77, 40, (0.5,) * 3, (0.5,) * 3),
}  # fmt: skip


def build_tokenizer(kind: str) -> Tokenizer:
    if kind == "bpe":  # OpenAI CLIP: lower-cased byte-level BPE, <|startoftext|> ... <|endoftext|>
        tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = ["<|startoftext|>", "<|endoftext|>"]
        trainer = trainers.BpeTrainer(
            vocab_size=700, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator(CORPUS, trainer)
        template = "<|startoftext|> $A <|endoftext|>"
    else:  # sentencepiece-style unigram: T5 (SigLIP), XLM-R (M-CLIP), NLLB
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        specials = {"t5": ["<pad>", "</s>", "<unk>"], "xlmr": ["<s>", "<pad>", "</s>", "<unk>"]}.get(
            kind, ["<s>", "<pad>", "</s>", "<unk>"]
        )
        trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=specials, unk_token="<unk>")
        tok.train_from_iterator(CORPUS, trainer)
        template = {"t5": "$A </s>", "xlmr": "<s> $A </s>"}.get(kind, "$A </s>")
        if kind == "nllb":
            tok.add_special_tokens(FLORES)  # language codes are whole tokens, as in NLLB's tokenizer
    ids = [(t, tok.token_to_id(t)) for t in template.split() if t != "$A"]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=ids)
    return tok


class _Graph:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def const(self, array: np.ndarray) -> str:
        self.n += 1
        name = f"w{self.n}"
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        self.n += 1
        out = out or f"{op_type.lower()}{self.n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def normalised(self, x: str, out: str) -> str:
        norm = self.op("ReduceL2", [x], keepdims=1, axes=[1])
        return self.op("Div", [x, norm], out)

    def save(self, path: Path, inputs, outputs) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        model = helper.make_model(
            helper.make_graph(self.nodes, path.stem, inputs, outputs, self.inits),
            opset_imports=[helper.make_opsetid("", 13)],
            ir_version=8,
        )
        onnx.save(model, str(path))
        return path


def _visual(path: Path, fam: Family, seed: int) -> Path:
    g = _Graph(seed)
    s = fam.image_size
    batch = 1 if fam.fixed_batch_1 else "batch"
    w = g.const((g.rng.normal(0, 0.4, (8, 3, 4, 4))).astype(np.float32))
    conv = g.op("Conv", ["image", w], kernel_shape=[4, 4], strides=[4, 4])
    flat = g.op("Flatten", [g.op("Tanh", [conv])], axis=1)
    proj = g.const(g.rng.normal(0, 0.1, (8 * (s // 4) ** 2, fam.dim)).astype(np.float32))
    g.normalised(g.op("MatMul", [flat, proj]), "embedding")
    return g.save(
        path,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, s, s])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, fam.dim])],
    )


def _textual(path: Path, fam: Family, vocab: int, pad_id: int, seed: int) -> Path:
    g = _Graph(seed)
    ctx, width = fam.context_length, 24
    batch = 1 if fam.fixed_batch_1 else "batch"
    id_type = TensorProto.INT64 if fam.int64_ids else TensorProto.INT32
    # The pad token embeds to zero, so the real tokens decide the vector; padding with any other id shows.
    table = g.rng.normal(0, 0.3, (vocab, width)).astype(np.float32)
    table[pad_id] = 0
    table = g.const(table)
    position = g.const(g.rng.normal(1, 0.5, (ctx, width)).astype(np.float32))
    names = ["input_ids", "attention_mask"] if fam.mclip else ["text"]
    tokens = g.op("Gather", [table, g.op("Cast", [names[0]], to=TensorProto.INT64)], axis=0)  # [B, ctx, width]
    tokens = g.op("Mul", [tokens, position])
    if fam.mclip:  # masked mean pool, as M-CLIP does
        mask = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT), g.const(np.array([2]))])
        summed = g.op("ReduceSum", [g.op("Mul", [tokens, mask]), g.const(np.array([1]))], keepdims=0)
        count = g.op("ReduceSum", [mask, g.const(np.array([1]))], keepdims=0)
        pooled = g.op("Div", [summed, count])
    else:
        pooled = g.op("ReduceSum", [tokens, g.const(np.array([1]))], keepdims=0)
    proj = g.const(g.rng.normal(0, 0.3, (width, fam.dim)).astype(np.float32))
    g.normalised(g.op("MatMul", [g.op("Tanh", [pooled]), proj]), "embedding")
    return g.save(
        path,
        [helper.make_tensor_value_info(n, id_type, [batch, ctx]) for n in names],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, fam.dim])],
    )


def write_files(folder: Path, fam: Family) -> Tokenizer:
    """Everything of Immich's CLIP layout but the two towers: config.json, the image preprocessing, the tokenizer
    and its config. Returns the tokenizer, whose ids the text tower must take."""
    text_cfg = {"context_length": fam.context_length, **fam.extra_text_cfg}
    if fam.canonicalize:
        text_cfg["tokenizer_kwargs"] = {"clean": "canonicalize"}
    (folder / "visual").mkdir(parents=True, exist_ok=True)
    (folder / "textual").mkdir(exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps({"embed_dim": fam.dim, "vision_cfg": {"image_size": fam.image_size}, "text_cfg": text_cfg})
    )
    (folder / "visual" / "preprocess_cfg.json").write_text(
        json.dumps({"size": [fam.image_size, fam.image_size], "mode": "RGB", "mean": fam.mean, "std": fam.std,
                    "interpolation": "bicubic", "resize_mode": "squash" if fam.tokenizer == "t5" else "shortest"})
    )  # fmt: skip
    tok = build_tokenizer(fam.tokenizer)
    tok.save(str(folder / "textual" / "tokenizer.json"))
    pad = {"content": fam.pad_token, "special": True} if fam.mclip else fam.pad_token  # both forms occur
    (folder / "textual" / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad}))
    return tok


def install(store: Path, family: str, seed: int = 0, name: str | None = None) -> Path:
    """An Immich ML cache folder `<store>/clip/<name>/` for one family; returns the folder."""
    fam = FAMILIES[family]
    folder = store / "clip" / (name or fam.name)
    tok = write_files(folder, fam)
    _visual(folder / "visual" / "model.onnx", fam, seed)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    _textual(folder / "textual" / "model.onnx", fam, vocab, tok.token_to_id(fam.pad_token), seed + 1)
    return folder
