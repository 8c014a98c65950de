"""A local stand-in for Hugging Face, ModelScope and GitHub releases (127.0.0.1 only).

Two kinds of content:
- plain files (`hub.files[path] = bytes`), served with Range support, as ModelScope or a release host;
- Hugging Face repos (`hub.add_hf_repo(...)`), with the parts of the Hub API huggingface_hub uses: repo
  info, the recursive tree listing with sizes and hashes (sha256 for LFS files, the git blob sha1 for the
  others), and `resolve` URLs that redirect LFS files to a CDN on *another origin* (a second port).

Faults can be injected per path (`hub.faults[path] = ...`) to act like a bad mirror, and every request
is recorded with its Range and Authorization headers, so tests can see resumption and where tokens went.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HTML = b"<!DOCTYPE html><html><body><h1>Error 503</h1><p>Mirror temporarily unavailable.</p></body></html>\n"


@dataclass
class Request:
    server: str  # "hub" or "cdn"
    method: str
    path: str
    range: str | None
    authorization: str | None

    def __iter__(self):  # old tests unpack (path, range)
        return iter((self.path, self.range))


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut_after: dict[str, int] = {}  # path -> bytes to send before dropping the connection (once)
        # path -> "html" (200 with an HTML page) | "random" (other bytes, same length) | "no_length"
        # (no Content-Length, and the body cut short) | "slow" (about 1 MB/s) | int HTTP status
        self.faults: dict[str, object] = {}
        self.redirects: dict[str, str] = {}  # path -> absolute URL answered with a 302
        # path -> (bytes, event): send that many bytes, then wait for the event before the rest (a slow hub
        # whose progress a test can watch, released when the test says so)
        self.holds: dict[str, tuple[int, threading.Event]] = {}
        self.requests: list[Request] = []
        self.repos: dict[str, dict[str, bytes]] = {}
        self.lfs: set[tuple[str, str]] = set()
        self._blobs: dict[str, bytes] = {}  # cdn path -> bytes
        self._blob_names: dict[
            str, str
        ] = {}  # cdn path -> file name (sent as Content-Disposition, as the Hub's CDN does)
        self.hub = self._server("hub")
        self.cdn = self._server("cdn")
        self.url = f"http://127.0.0.1:{self.hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_address[1]}"
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self.hub, self.cdn)]

    # -- Hugging Face repos ----------------------------------------------------------------------------

    def add_hf_repo(self, repo: str, files: dict[str, bytes], lfs: set[str] | None = None) -> None:
        """Files of a repo; `lfs` names the ones stored in LFS (default: those over 10 kB)."""
        self.repos[repo] = dict(files)
        for path, data in files.items():
            if (lfs is None and len(data) > 10_000) or (lfs is not None and path in lfs):
                self.lfs.add((repo, path))
                self._blobs[f"/blobs/{hashlib.sha256(data).hexdigest()}"] = data
                self._blob_names[f"/blobs/{hashlib.sha256(data).hexdigest()}"] = path.rsplit("/", 1)[-1]

    def served_path(self, repo: str, file: str) -> str:
        """Where a repo file's bytes are served from (for faults and cuts): the CDN for LFS files."""
        data = self.repos[repo][file]
        if (repo, file) in self.lfs:
            return f"/blobs/{hashlib.sha256(data).hexdigest()}"
        return f"/{repo}/resolve/main/{file}"

    def _tree(self, repo: str) -> list[dict]:
        entries, folders = [], set()
        for path, data in sorted(self.repos[repo].items()):
            parts = path.split("/")
            for i in range(1, len(parts)):
                folders.add("/".join(parts[:i]))
            entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
            if (repo, path) in self.lfs:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)] + entries

    # -- serving ---------------------------------------------------------------------------------------

    def _server(self, name: str) -> ThreadingHTTPServer:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._handle(head=True)

            def do_GET(self) -> None:
                self._handle(head=False)

            def _record(self, path: str) -> None:
                hub.requests.append(
                    Request(name, self.command, path, self.headers.get("Range"), self.headers.get("Authorization"))
                )

            def _json(self, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _missing(self) -> None:
                self.send_response(404)
                self.send_header("Content-Type", "application/json")
                body = b'{"error":"Entry not found"}'
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Error-Code", "EntryNotFound")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self, head: bool) -> None:
                url = urlsplit(self.path)
                path = unquote(url.path)
                self._record(path)
                if name == "cdn":
                    data = hub._blobs.get(path)
                    return self._missing() if data is None else self._send(path, data, head)
                if path.startswith("/api/models/"):
                    return self._api(path[len("/api/models/") :], parse_qs(url.query))
                for repo, files in hub.repos.items():
                    prefix = f"/{repo}/resolve/"
                    if path.startswith(prefix):
                        _rev, _, file = path[len(prefix) :].partition("/")
                        data = files.get(file)
                        if data is None:
                            return self._missing()
                        return self._resolve(repo, file, data, head)
                if path in hub.redirects:
                    self.send_response(302)
                    self.send_header("Location", hub.redirects[path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = hub.files.get(path)
                if data is None:
                    return self._missing()
                self._send(path, data, head)

            def _api(self, rest: str, query: dict) -> None:
                for repo in hub.repos:
                    if rest.startswith(f"{repo}/revision/"):
                        siblings = [{"rfilename": p} for p in sorted(hub.repos[repo])]
                        return self._json({"id": repo, "sha": COMMIT, "siblings": siblings})
                    if rest.startswith(f"{repo}/tree/"):
                        return self._json(hub._tree(repo))
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.send_header("X-Error-Code", "RepoNotFound")
                self.end_headers()

            def _resolve(self, repo: str, file: str, data: bytes, head: bool) -> None:
                if (repo, file) in hub.lfs:
                    sha = hashlib.sha256(data).hexdigest()
                    self.send_response(302)
                    self.send_header("Location", f"{hub.cdn_url}/blobs/{sha}")
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("X-Linked-Etag", f'"{sha}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                    self.send_header("ETag", f'"{git_blob_sha1(data)}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._send(f"/{repo}/resolve/main/{file}", data, head, etag=git_blob_sha1(data))

            def _send(self, path: str, data: bytes, head: bool, etag: str | None = None) -> None:
                fault = hub.faults.get(path)
                if isinstance(fault, int):
                    self.send_response(fault)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fault == "html":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(HTML)))
                    self.end_headers()
                    if not head:
                        self.wfile.write(HTML)
                    return
                if fault == "random":
                    data = os.urandom(len(data))
                rng = self.headers.get("Range")
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(data) and rng:
                    self.send_response(416)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                self.send_header("Content-Type", "application/octet-stream")
                if path in hub._blob_names:
                    self.send_header("Content-Disposition", f'attachment; filename="{hub._blob_names[path]}";')
                if etag:
                    self.send_header("ETag", f'"{etag}"')
                    self.send_header("X-Repo-Commit", COMMIT)
                body = data[start:]
                if fault == "no_length":
                    self.send_header("Connection", "close")
                    self.end_headers()
                    if not head:
                        self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.send_header("Content-Length", str(len(body)))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if head:
                    return
                if fault == "slow":
                    try:
                        for i in range(0, len(body), 32 * 1024):
                            self.wfile.write(body[i : i + 32 * 1024])
                            self.wfile.flush()
                            time.sleep(0.03)
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the client went away (Ctrl-C)
                    return
                hold = hub.holds.get(path)
                if hold is not None:
                    first, release = hold
                    try:
                        self.wfile.write(body[:first])
                        self.wfile.flush()
                        release.wait(60)
                        self.wfile.write(body[first:])
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
                cut = hub.cut_after.pop(path, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        return ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def __enter__(self) -> FakeHub:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        for s in (self.hub, self.cdn):
            s.shutdown()
            s.server_close()


RAPIDOCR_BASE = "/models/RapidAI/RapidOCR/resolve/v3.10.0/onnx/PP-OCRv5"


@contextmanager
def rapidocr_hub(monkeypatch, files: dict[str, bytes]) -> Iterator[tuple[FakeHub, dict[str, dict[str, str]]]]:
    """PP-OCR files (`det/<key>`, `rec/<key>` -> bytes) served where RapidOCR's ModelScope repository has them, with
    the wheel's model registry replaced by one listing them: yields (hub, registry)."""
    from immich_aio.download import ocr as ocr_download

    registry = {
        path.split("/")[1]: {
            "model_dir": f"{ocr_download.OFFICIAL}{RAPIDOCR_BASE}/{path}.onnx",
            "SHA256": hashlib.sha256(data).hexdigest(),
        }
        for path, data in files.items()
    }
    monkeypatch.setattr(ocr_download, "registry", lambda: registry)
    with FakeHub() as hub:
        for path, data in files.items():
            hub.files[f"{RAPIDOCR_BASE}/{path}.onnx"] = data
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub.url)
        yield hub, registry
