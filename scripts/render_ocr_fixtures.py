"""Render the OCR test fixtures (committed under tests/fixtures/ocr, so tests need no CJK font).

Run once on a machine with a CJK font, e.g. Debian's fonts-wqy-zenhei:
    python scripts/render_ocr_fixtures.py [--font /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc]
Writes one JPEG per scene (quality 80, as Immich previews) and truth.json with the lines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "ocr"


def photo_background(w: int, h: int, seed: int) -> Image.Image:
    """A photo-like backdrop: smooth gradients, soft shapes and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [
            90 + 60 * np.sin(x / w * 3.1 + 0.5) + 40 * y / h,
            120 + 50 * np.cos(y / h * 2.7) + 20 * x / w,
            150 + 60 * np.sin((x + y) / (w + h) * 4.0),
        ],
        axis=-1,
    )
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(h // 20, h // 5)
        color = tuple(int(c) for c in rng.integers(30, 220, 3))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    img = img.filter(ImageFilter.GaussianBlur(6))
    noisy = np.asarray(img, np.float32) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def text_lines(draw: ImageDraw.ImageDraw, font_path: str, lines, fill=(20, 20, 20)) -> None:
    for (x, y), size, text in lines:
        draw.text((x, y), text, font=ImageFont.truetype(font_path, size), fill=fill)


def receipt(font: str) -> tuple[Image.Image, list[str]]:
    lines = ["超市购物小票", "苹果 2斤 12.50元", "牛奶 1盒 6.80元", "合计 19.30元", "发票 Thank you"]
    img = photo_background(1080, 1440, 1)
    paper = Image.new("RGB", (760, 1100), (246, 244, 236))
    d = ImageDraw.Draw(paper)
    text_lines(d, font, [((60, 80 + 180 * i), 52, t) for i, t in enumerate(lines)])
    img.paste(paper, (160, 170))
    return img, lines


def sign(font: str) -> tuple[Image.Image, list[str]]:
    lines = ["海边咖啡馆", "OPEN 24 HOURS", "欢迎光临"]
    img = photo_background(1920, 1440, 2)
    board = Image.new("RGB", (900, 560), (180, 30, 35))
    d = ImageDraw.Draw(board)
    text_lines(
        d,
        font,
        [((120, 60), 110, lines[0]), ((110, 230), 90, lines[1]), ((230, 390), 100, lines[2])],
        fill=(250, 240, 200),
    )
    img.paste(board, (500, 300))
    return img, lines


def small_text(font: str) -> tuple[Image.Image, list[str]]:
    lines = ["发票号码 12345678", "开票日期 2024年5月1日", "购买方 上海照片有限公司"]
    img = photo_background(1920, 1440, 3)
    card = Image.new("RGB", (560, 200), (250, 250, 250))
    d = ImageDraw.Draw(card)
    text_lines(d, font, [((24, 20 + 60 * i), 34, t) for i, t in enumerate(lines)])
    img.paste(card, (1280, 1160))
    return img, lines


def rotated(font: str) -> tuple[Image.Image, list[str]]:
    lines = ["我爱北京天安门", "Immich 照片服务器 2024年", "中文识别测试"]
    canvas = Image.new("RGB", (1100, 600), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    text_lines(d, font, [((80, 120 + 130 * i), 60, t) for i, t in enumerate(lines)])
    canvas = canvas.rotate(4, resample=Image.BICUBIC, expand=True, fillcolor=(255, 255, 255))
    img = photo_background(1440, 1080, 4)
    img.paste(canvas.resize((1240, 760)), (100, 160))
    return img, lines


SCENES = {"receipt": receipt, "sign": sign, "small_text_1440": small_text, "rotated": rotated}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--font", default="/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    truth = {}
    for name, scene in SCENES.items():
        img, lines = scene(args.font)
        img.save(OUT / f"{name}.jpg", quality=80)
        truth[f"{name}.jpg"] = lines
    (OUT / "truth.json").write_text(json.dumps(truth, ensure_ascii=False, indent=2) + "\n")
    print(f"wrote {len(truth)} fixtures to {OUT}")


if __name__ == "__main__":
    main()
