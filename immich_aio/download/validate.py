"""Checks that a downloaded file is what it should be, before it is kept or installed.

Each validator raises ValueError saying what the file is instead ("an HTML page", "not a zip", ...),
which the downloader turns into a message and a deleted file.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from pathlib import Path

from immich_aio.download.fetch import Validator


def _sniff_html(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        raise ValueError("it is an HTML page (an error or login page), not the file")


def load_onnx(path: Path):
    """A CPU session for the file, or ValueError saying why it is not a usable ONNX model."""
    import onnxruntime as ort

    _sniff_html(path)
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises several of its own exception types
        raise ValueError(f"ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]})") from e


def zip_with(names: Iterable[str]) -> Validator:
    """A zip archive holding members with these file names (at any depth), intact."""
    wanted = set(names)

    def check(path: Path) -> None:
        _sniff_html(path)
        try:
            with zipfile.ZipFile(path) as zf:
                members = {i.filename.replace("\\", "/").rsplit("/", 1)[-1]: i for i in zf.infolist() if not i.is_dir()}
                missing = sorted(wanted - set(members))
                if missing:
                    raise ValueError(f"the archive lacks {', '.join(missing)}")
                for name in wanted:
                    with zf.open(members[name]) as member:
                        while member.read(1 << 20):
                            pass  # reading checks each member's CRC
        except zipfile.BadZipFile as e:
            raise ValueError(f"it is not an intact zip archive ({e})") from e

    return check


def vocabulary(path: Path) -> None:
    """A BERT WordPiece vocabulary: UTF-8 text, one token per line, thousands of lines."""
    _sniff_html(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError("it is not UTF-8 text") from e
    if len(lines) < 1000 or "[CLS]" not in lines or "[SEP]" not in lines:
        raise ValueError(f"it does not look like a BERT vocabulary ({len(lines)} lines)")


def torch_checkpoint(path: Path) -> None:
    """A file torch.load can read: a zip-format checkpoint, or a legacy pickle."""
    _sniff_html(path)
    if zipfile.is_zipfile(path):
        return
    with path.open("rb") as f:
        if f.read(1) == b"\x80":  # pickle protocol marker
            return
    raise ValueError("it is neither a zip-format torch checkpoint nor a pickle")
