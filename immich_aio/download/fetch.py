"""Resumable HTTP downloads with progress, for sources that are not Hugging Face (ModelScope, release zips).

Hugging Face goes through `huggingface_hub` (hf.py). For the rest, a small client on the standard
library: those sources are plain HTTPS files, and this keeps the server's dependencies unchanged.

The rules, learned from a faulty mirror:
- a download goes to `<dest>.part` and becomes `<dest>` only when complete and validated: its size is
  the one announced (Content-Length / Content-Range, or the hub's listing), its sha256 the expected one
  when known, and its content passes a check of what it should be (an ONNX model, a zip with the
  members needed, a text vocabulary). What fails is deleted, with a message saying what was wrong;
- a finished file is trusted on a later run only through the record written when it was validated
  (`<dest>.verified`, holding its size, mtime and sha256), never just because it exists;
- an interrupted download resumes with a Range request, across runs and server restarts: the partial file
  stays as `<dest>.part` beside a record of what it is a part of (`<dest>.part.json`: the expected hash and
  size), and a part of another version of the file is discarded instead of being completed with new bytes;
- an HTML page served with status 200 (a login or error page from a mirror) is recognised as such;
- credentials go only in headers the caller passes for its own host, and never follow a redirect to another
  origin.

Progress goes to stderr as one rewritten line, or, in the server, to the reporter the fetching thread set
(`reporting`), which turns it into /info figures and a few log lines.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from immich_aio.store import sha256_file

CHUNK = 1 << 20

MIRROR_HELP = (
    "If Hugging Face is unreachable from here, use a mirror: HF_ENDPOINT=https://hf-mirror.com, "
    "or --source modelscope (MODELSCOPE_ENDPOINT to override https://www.modelscope.cn)"
)

DOWNLOAD_RECORDS = (".part", ".part.json", ".verified")  # what the downloader keeps beside a file
Validator = Callable[[Path], None]  # raises ValueError saying what the file is not


class DownloadError(RuntimeError):
    pass


def modelscope_url(repo: str, filename: str, revision: str = "master") -> str:
    endpoint = (os.environ.get("MODELSCOPE_ENDPOINT") or "https://www.modelscope.cn").rstrip("/")
    return f"{endpoint}/models/{repo}/resolve/{revision}/{filename}"


def modelscope_listing(repo: str, revision: str = "master") -> dict[str, dict[str, object]]:
    """Sizes and sha256 sums ModelScope publishes for a repo's files (empty if the listing is unavailable)."""
    endpoint = (os.environ.get("MODELSCOPE_ENDPOINT") or "https://www.modelscope.cn").rstrip("/")
    url = f"{endpoint}/api/v1/models/{repo}/repo/files?Revision={revision}&Recursive=true"
    try:
        with _opener().open(urllib.request.Request(url, headers=_HEADERS), timeout=30) as r:
            data = json.loads(r.read(8 << 20))
        files = data["Data"]["Files"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        return {}
    out: dict[str, dict[str, object]] = {}
    for f in files if isinstance(files, list) else []:
        if isinstance(f, dict) and isinstance(f.get("Path"), str) and f.get("Type") != "tree":
            out[f["Path"]] = {"size": f.get("Size"), "sha256": f.get("Sha256")}
    return out


_HEADERS = {"User-Agent": "immich-aio-downloader"}
_SENSITIVE = ("authorization", "cookie", "proxy-authorization")


class _SameOriginCredentials(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never carry credentials to another origin (scheme, host, port)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[override]
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(req.full_url) != _origin(newurl):
            for name in list(new.headers):
                if name.lower() in _SENSITIVE:
                    del new.headers[name]
            for name in list(new.unredirected_hdrs):
                if name.lower() in _SENSITIVE:
                    del new.unredirected_hdrs[name]
        return new


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urllib.parse.urlsplit(url)
    return (p.scheme, (p.hostname or "").lower(), p.port or {"http": 80, "https": 443}.get(p.scheme))


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_SameOriginCredentials)


Reporter = Callable[[str, int, int | None], None]  # (file, bytes done, bytes in all or None)
Step = Callable[[str], None]  # a step of an install ("Splitting ...", "Installed ...")
_reporter: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("download_reporter", default=None)
_step: contextvars.ContextVar[Step | None] = contextvars.ContextVar("install_step", default=None)


@contextlib.contextmanager
def reporting(reporter: Reporter, step: Step) -> Iterator[None]:
    """Within the block (in this thread), downloads report to `reporter` and install steps to `step`, instead of
    drawing a line on stderr and printing."""
    tokens = _reporter.set(reporter), _step.set(step)
    try:
        yield
    finally:
        _reporter.reset(tokens[0])
        _step.reset(tokens[1])


def say(message: str) -> None:
    """A step of an install: printed for the CLI, reported to the server's fetcher (its /info and log) there."""
    step = _step.get()
    if step is None:
        print(message, flush=True)
    else:
        step(message)


class Progress:
    """One line on stderr, rewritten at most a few times a second (or the thread's reporter, if one is set)."""

    def __init__(self, label: str, total: int | None, done: int = 0, stream=None) -> None:
        self.label, self.total, self.done, self.stream = label, total, done, stream or sys.stderr
        self.start, self.last, self.start_done = time.monotonic(), 0.0, done
        self.reporter = _reporter.get()
        if self.reporter is not None:
            self.reporter(label, done, total)

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= 0.25:
            self.last = now
            if self.reporter is not None:
                self.reporter(self.label, self.done, self.total)
            else:
                self._print(end="\r")

    def finish(self) -> None:
        if self.reporter is not None:
            self.reporter(self.label, self.done, self.total)
        else:
            self._print(end="\n")

    def _print(self, end: str) -> None:
        rate = (self.done - self.start_done) / max(time.monotonic() - self.start, 1e-6) / 1e6
        size = f"{self.done / 1e6:.1f}" + (f"/{self.total / 1e6:.1f} MB" if self.total else " MB")
        pct = f" {100 * self.done / self.total:5.1f}%" if self.total else ""
        print(f"  {self.label}:{pct} {size} {rate:.1f} MB/s", end=end, file=self.stream, flush=True)


def _record_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".verified")


def _part_record_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part.json")


def _trusted(dest: Path, sha256: str | None, git_sha1: str | None = None) -> bool:
    """A finished download whose validation record still describes it (and the hash wanted, if any)."""
    try:
        record = json.loads(_record_path(dest).read_text())
        st = dest.stat()
    except (OSError, ValueError):
        return False
    if record.get("size") != st.st_size or record.get("mtime_ns") != st.st_mtime_ns:
        return False
    if git_sha1 is not None and record.get("git_sha1") != git_sha1.lower():
        return False
    return sha256 is None or record.get("sha256") == sha256.lower()


def forget(dest: Path) -> None:
    """Delete a download and everything about it (the next run starts from scratch)."""
    for p in (dest, dest.with_name(dest.name + ".part"), _record_path(dest), _part_record_path(dest)):
        p.unlink(missing_ok=True)


def _keep_or_drop_part(dest: Path, part: Path, expected: Mapping[str, object]) -> int:
    """Bytes of `part` to resume from: kept only when it was started for the same file (hash and size)."""
    record = _part_record_path(dest)
    if part.exists():
        try:
            started_for = json.loads(record.read_text())
        except (OSError, ValueError):
            started_for = None
        known = {k: v for k, v in expected.items() if v is not None}
        if started_for is not None and any(started_for.get(k) not in (None, v) for k, v in known.items()):
            part.unlink(missing_ok=True)  # a part of another version of the file: never finish it with new bytes
    if not part.exists():
        record.write_text(json.dumps(expected))
        return 0
    return part.stat().st_size


def git_blob_sha1(path: Path) -> str:
    """The git blob hash the Hugging Face Hub publishes for files not stored in LFS."""
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def download(
    url: str,
    dest: Path,
    sha256: str | None = None,
    *,
    size: int | None = None,
    validate: Validator | None = None,
    timeout: float = 30,
    hint: str = MIRROR_HELP,
    git_sha1: str | None = None,
    headers: dict[str, str] | None = None,
) -> Path:
    """Fetch url to dest (resuming dest.part), check it, rename it into place; returns dest.

    `hint` is appended to network errors: how to reach this source through a mirror. `git_sha1` is the git
    blob hash to check instead of (or beside) `sha256`; `headers` are sent to `url`'s own origin only.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        if _trusted(dest, sha256, git_sha1):
            return dest  # validated by an earlier run and unchanged since
        forget(dest)  # unknown provenance: never trusted just because it exists
    part = dest.with_name(dest.name + ".part")
    expected = {"sha256": sha256.lower() if sha256 else None, "git_sha1": git_sha1, "size": size}
    have = _keep_or_drop_part(dest, part, expected)
    headers = {**_HEADERS, **(headers or {})}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = _opener().open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part file is already complete
            response = None
        else:
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}. {hint}") from e
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise DownloadError(f"Could not reach {url} ({getattr(e, 'reason', e)}). {hint}") from e

    total = size
    if response is not None:
        with response:
            if response.headers.get_content_type() == "text/html":
                forget(dest)
                raise DownloadError(
                    f"{url} answered with an HTML page (status {response.status}), not the file: a login, error or "
                    f"captcha page from the server or a mirror. Nothing was kept. {hint}"
                )
            resumed = response.status == 206
            if not resumed:
                have = 0
            announced = _announced_total(response, have, resumed)
            if total is not None and announced is not None and announced != total:
                forget(dest)
                raise DownloadError(
                    f"{url} announces {announced} bytes but the source lists {total}: the file changed or the mirror "
                    f"serves another one. Nothing was kept. {hint}"
                )
            total = total or announced
            progress = Progress(dest.name + (" (resumed)" if resumed else ""), total, have)
            try:
                with part.open("ab" if resumed else "wb") as f:
                    while block := response.read(CHUNK):
                        f.write(block)
                        progress.update(len(block))
                        if total is not None and progress.done > total:
                            break
            except (OSError, TimeoutError, http.client.HTTPException) as e:
                raise DownloadError(f"Download of {url} broke off ({e}); run the command again to resume") from e
            progress.finish()
    got = part.stat().st_size if part.exists() else 0
    if total is not None and got < total:
        raise DownloadError(f"Download of {url} ended at {got} of {total} bytes; run the command again to resume")
    if total is not None and got > total:
        forget(dest)
        raise DownloadError(f"Download of {url} is longer than the {total} bytes announced; deleted it. {hint}")
    digest = sha256_file(part)
    if sha256 and digest != sha256.lower():
        forget(dest)
        raise DownloadError(
            f"{dest.name}: sha256 {digest} does not match the expected {sha256}; deleted it. Run the command again; "
            f"if this repeats, the source or mirror serves another file. {hint}"
        )
    blob = git_blob_sha1(part) if git_sha1 else None
    if git_sha1 and blob != git_sha1.lower():
        forget(dest)
        raise DownloadError(
            f"{dest.name}: git hash {blob} does not match the {git_sha1} the hub lists; deleted it. Run the command "
            f"again; if this repeats, the source or mirror serves another file. {hint}"
        )
    if validate is not None:
        try:
            validate(part)
        except (ValueError, OSError) as e:
            forget(dest)
            raise DownloadError(
                f"{dest.name} from {url} is not usable: {e}. It was deleted; run the command again. If this repeats, "
                f"the source or mirror serves something else. {hint}"
            ) from e
    part.replace(dest)
    _part_record_path(dest).unlink(missing_ok=True)
    st = dest.stat()
    _record_path(dest).write_text(
        json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest, "git_sha1": blob, "url": url})
    )
    return dest


def _announced_total(response, have: int, resumed: bool) -> int | None:
    if resumed:
        content_range = response.headers.get("Content-Range", "")
        total = content_range.rpartition("/")[2]
        if total.isdigit():
            return int(total)
    length = response.headers.get("Content-Length")
    return have + int(length) if length and length.isdigit() else None
