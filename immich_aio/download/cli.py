"""`immich-aio models ...` / `python scripts/download_models.py ...`: put models into the store."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import immich_aio  # noqa: F401  (telemetry off before onnxruntime loads)
from immich_aio.download.fetch import MIRROR_HELP, DownloadError
from immich_aio.download.install import install_lock
from immich_aio.store import ModelStore


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="immich-aio models",
        description="Fetch, export or import models into the store (MACHINE_LEARNING_CACHE_FOLDER). " + MIRROR_HELP,
    )
    ap.add_argument(
        "--store", type=Path, default=None, help="model store (default: MACHINE_LEARNING_CACHE_FOLDER or ./models)"
    )
    sub = ap.add_subparsers(dest="command", required=True)

    listing = sub.add_parser("list", help="installed models")
    listing.add_argument("--verify", action="store_true", help="check every file against its install manifest")

    clip = sub.add_parser(
        "clip", help="Chinese-CLIP: ready ONNX (no torch), a checkpoint exported with torch, or ONNX files to import"
    )
    clip.add_argument(
        "--arch", default="ViT-B-16", help="ViT-B-16 (512-d), ViT-L-14, ViT-L-14-336 (768-d), ViT-H-14, RN50 (1024-d)"
    )
    clip.add_argument(
        "--family",
        choices=["cn-clip", "qa-clip"],
        default="cn-clip",
        help="cn-clip: OFA-Sys Chinese-CLIP; qa-clip: TencentARC QA-CLIP (same architecture; no ViT-H-14)",
    )
    clip.add_argument("--source", choices=["hf", "modelscope"], default="hf", help="hub (hf honours HF_ENDPOINT)")
    clip.add_argument(
        "--precision",
        choices=["fp32", "fp16", "int8"],
        default="fp32",
        help="which file of the ready ONNX export: fp32 (default, cn_clip's exact vectors), fp16 (half the size, for "
        "GPUs), int8 (a quarter, quantised: close, not equal vectors)",
    )
    clip.add_argument(
        "--export",
        action="store_true",
        help="download the torch checkpoint and export it (needs the `export` extra); the default for ViT-H-14, RN50 "
        "and QA-CLIP, which have no ready ONNX export, and for --source modelscope",
    )
    clip.add_argument("--fp16", action="store_true", help="with --export: fp16 weights (for GPU hosts)")
    clip.add_argument("--name", help="store folder name (default CN-CLIP-<arch>)")
    clip.add_argument(
        "--immich",
        metavar="NAME",
        help="Immich's own CLIP model by its Immich name (e.g. ViT-B-32__openai, XLM-Roberta-Large-Vit-B-16Plus), "
        "from immich-app/<NAME> on Hugging Face, ready to serve (no export)",
    )
    clip.add_argument("--onnx-image", type=Path, help="official-format image tower (*.img.fp32.onnx) to import")
    clip.add_argument("--onnx-text", type=Path, help="official-format text tower (*.txt.fp32.onnx) to import")
    clip.add_argument("--vocab", type=Path, help="vocab.txt for imports (default: fetched from the hub)")

    ocr = sub.add_parser("ocr", help="PP-OCRv5 models behind Immich's OCR names (from RapidOCR's ModelScope repo)")
    ocr.add_argument("--name", default="PP-OCRv5_mobile", help="e.g. PP-OCRv5_server, KOREAN__PP-OCRv5_mobile")

    faces = sub.add_parser("faces", help="InsightFace pack (non-commercial research licence)")
    faces.add_argument("--pack", default="buffalo_l", help="buffalo_l, buffalo_m, buffalo_s or antelopev2")
    faces.add_argument(
        "--source",
        choices=["hf", "insightface"],
        default="hf",
        help="hf: immich-app/<pack> (honours HF_ENDPOINT); insightface: its GitHub release zip",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root = args.store or Path(os.environ.get("MACHINE_LEARNING_CACHE_FOLDER") or "models")
    store = ModelStore(root)
    try:
        if args.command == "list":
            return _list(store, args.verify)
        with install_lock(store, lock_key(args)):
            return _install(store, args)
    except KeyboardInterrupt:
        print("\nimmich-aio models: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except PermissionError as e:
        print(
            f"immich-aio models: cannot write into {store.root} ({e.strerror}: {e.filename}). In the container the "
            "server runs as uid 1000; a volume written by Immich ML's root container needs `docker compose exec -u "
            "root ...` once, or `chown -R 1000:1000` on it (README, Docker)",
            file=sys.stderr,
        )
        return 1
    except (DownloadError, RuntimeError, ValueError, OSError) as e:
        print(f"immich-aio models: {e}", file=sys.stderr)
        return 1


def lock_key(args: argparse.Namespace) -> str:
    """The model an install writes (names/fetchable.lock_key), so installs of different models run side by side."""
    from immich_aio.names.fetchable import lock_key as key
    from immich_aio.store import clean_name

    if args.command == "clip":
        if args.immich:
            return key("clip", clean_name(args.immich))
        return key(
            "clip", clean_name(args.name or f"{'QA-CLIP' if args.family == 'qa-clip' else 'CN-CLIP'}-{args.arch}")
        )
    if args.command == "faces":
        return key("facial-recognition", clean_name(args.pack))
    return key("ocr", clean_name(args.name))


def _install(store: ModelStore, args: argparse.Namespace) -> int:
    if args.command == "clip":
        return _clip(store, args)
    if args.command == "ocr":
        from immich_aio.download.ocr import fetch

        fetch(store, args.name)
        return 0
    if args.command == "faces":
        from immich_aio.download.faces import fetch_pack

        fetch_pack(store, args.pack, args.source)
        return 0
    return 2


def _clip(store: ModelStore, args: argparse.Namespace) -> int:
    from immich_aio.download import clip

    if args.immich:
        clip.fetch_immich(store, args.immich)
        print("Immich's own model serves that name again, with the vectors your library already has.")
        return 0
    releases = clip.RELEASES[args.family]
    if args.arch not in releases:
        print(
            f"immich-aio models: {args.family} has no --arch {args.arch!r}; one of {', '.join(releases)}",
            file=sys.stderr,
        )
        return 2
    if bool(args.onnx_image) != bool(args.onnx_text):
        print("immich-aio models: --onnx-image and --onnx-text go together", file=sys.stderr)
        return 2
    if args.onnx_image:
        clip.import_onnx(
            store,
            args.onnx_image,
            args.onnx_text,
            args.name or clip.served_name(args.arch, args.family),
            vocab=args.vocab,
            source=args.source,
        )
    elif (
        args.export
        or args.fp16
        or args.family != "cn-clip"
        or args.source != "hf"
        or args.arch not in clip.ONNX_RELEASES
    ):
        clip.fetch_and_export(store, args.arch, args.source, args.fp16, args.name, args.family)
    else:
        clip.fetch_onnx(store, args.arch, args.precision, args.name)
    print("Next: set Immich's Smart Search model to a name of the same dimension (ViT-B-32__openai for 512-d),")
    print("restart the Immich server (it caches query vectors) and run Smart Search for all assets.")
    return 0


def _list(store: ModelStore, verify: bool = False) -> int:
    from immich_aio.download.install import MANIFEST, verify_manifest
    from immich_aio.models.clip import ClipConfig, is_cn_clip

    damaged = 0
    for task in ("clip", "facial-recognition", "ocr"):
        for name in store.names(task):
            folder = store.path(task, name)
            extra = f" ({ClipConfig.read(folder).embed_dim}-d CN-CLIP)" if task == "clip" and is_cn_clip(folder) else ""
            state = ""
            if verify:
                if not (folder / MANIFEST).is_file():
                    state = "  [no manifest]"
                elif bad := verify_manifest(folder):
                    state = f"  [MODIFIED: {', '.join(bad)}]"
                    damaged += 1
                else:
                    state = "  [ok]"
            print(f"{task}/{name}{extra}{state}")
    return 1 if damaged else 0
