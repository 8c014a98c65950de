"""Resumable HTTP downloads with progress, for model hubs and their mirrors.

A download goes to `<dest>.part` and is renamed only when complete (and verified when a sha256
is known), so a half-written file is never used; an interrupted download resumes with a Range
request next time.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CHUNK = 1 << 20

MIRROR_HELP = (
    "If Hugging Face is unreachable from here, use a mirror: HF_ENDPOINT=https://hf-mirror.com, "
    "or --source modelscope (MODELSCOPE_ENDPOINT to override https://www.modelscope.cn)"
)


class DownloadError(RuntimeError):
    pass


def hf_url(repo: str, filename: str, revision: str = "main") -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{repo}/resolve/{revision}/{filename}"


def modelscope_url(repo: str, filename: str, revision: str = "master") -> str:
    endpoint = os.environ.get("MODELSCOPE_ENDPOINT", "https://www.modelscope.cn").rstrip("/")
    return f"{endpoint}/models/{repo}/resolve/{revision}/{filename}"


def _headers(url: str) -> dict[str, str]:
    headers = {"User-Agent": "immich-aio-downloader"}
    token = os.environ.get("HF_TOKEN")
    hf_host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if token and url.startswith(hf_host):
        headers["Authorization"] = f"Bearer {token}"
    return headers


class Progress:
    """One line on stderr, rewritten at most a few times a second."""

    def __init__(self, label: str, total: int | None, done: int = 0, stream=None) -> None:
        self.label, self.total, self.done, self.stream = label, total, done, stream or sys.stderr
        self.start, self.last, self.start_done = time.monotonic(), 0.0, done

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= 0.25:
            self.last = now
            self._print(end="\r")

    def finish(self) -> None:
        self._print(end="\n")

    def _print(self, end: str) -> None:
        rate = (self.done - self.start_done) / max(time.monotonic() - self.start, 1e-6) / 1e6
        size = f"{self.done / 1e6:.1f}" + (f"/{self.total / 1e6:.1f} MB" if self.total else " MB")
        pct = f" {100 * self.done / self.total:5.1f}%" if self.total else ""
        print(f"  {self.label}:{pct} {size} {rate:.1f} MB/s", end=end, file=self.stream, flush=True)


def download(url: str, dest: Path, sha256: str | None = None, timeout: float = 30, hint: str = MIRROR_HELP) -> Path:
    """Fetch url to dest (resuming dest.part), verify, rename into place; returns dest.

    `hint` is appended to network errors: how to reach this source through a mirror.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and (sha256 is None or _sha256(dest) == sha256.lower()):
        return dest  # complete from an earlier run (only finished downloads are ever renamed to dest)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = _headers(url)
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part file is already complete
            response = None
        else:
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}. {hint}") from e
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise DownloadError(f"Could not reach {url} ({getattr(e, 'reason', e)}). {hint}") from e

    if response is not None:
        with response:
            resumed = response.status == 206
            if not resumed:
                have = 0
            length = response.headers.get("Content-Length")
            total = have + int(length) if length and length.isdigit() else None
            progress = Progress(dest.name + (" (resumed)" if resumed else ""), total, have)
            try:
                with part.open("ab" if resumed else "wb") as f:
                    while block := response.read(CHUNK):
                        f.write(block)
                        progress.update(len(block))
            except (OSError, TimeoutError, http.client.HTTPException) as e:
                raise DownloadError(f"Download of {url} broke off ({e}); run the command again to resume") from e
            progress.finish()
            if total is not None and part.stat().st_size != total:
                raise DownloadError(
                    f"Download of {url} ended at {part.stat().st_size} of {total} bytes; "
                    "run the command again to resume"
                )
    if sha256:
        digest = _sha256(part)
        if digest != sha256.lower():
            part.unlink()
            raise DownloadError(f"{dest.name}: sha256 {digest} does not match the expected {sha256}; removed it")
    part.replace(dest)
    return dest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()
