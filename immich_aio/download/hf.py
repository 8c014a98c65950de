"""Hugging Face downloads: the Hub API through `huggingface_hub`, the files through our resuming client.

`huggingface_hub` answers what a repo holds at a commit: the file list with sizes and hashes (sha256 for
LFS files, the git blob hash for small ones), `HF_ENDPOINT` (e.g. https://hf-mirror.com) and `HF_TOKEN`.
The bytes come through `fetch.download` from `<endpoint>/<repo>/resolve/<commit>/<file>` instead of
`hf_hub_download`, because the library does not resume across runs: it writes to a per-process temporary
file, deletes it when interrupted, and resumes within one run only from whole 10 MiB chunks. Ours keeps
`<file>.part` (with a record of which version it belongs to) across runs and server restarts, resumes it
with a Range request, and checks the published hash at the end; a file that does not match is deleted
before anything uses it. `HF_TOKEN` goes to the endpoint's own origin only, never to the CDN or storage
host a file redirects to.

Files land in `<store>/.downloads/hf/<org>--<repo>/`, outside the served folders; installs copy from
there into a staged folder (see install.py).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from immich_aio.download.fetch import DownloadError, download
from immich_aio.download.fetch import forget as forget_file

HF_HINT = (
    "If Hugging Face is unreachable from here, use a mirror: HF_ENDPOINT=https://hf-mirror.com "
    "(or --source modelscope, where a model offers it)"
)
IGNORED = ("*.armnn", "*.rknn", ".gitattributes", "README.md", "*.md")


@dataclass(frozen=True)
class Snapshot:
    repo: str
    commit: str
    folder: Path  # holds the requested files at their repo paths

    def path(self, file: str) -> Path:
        return self.folder / file


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def _error(repo: str, e: Exception) -> DownloadError:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        FileMetadataError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain: list[BaseException] = []
    cause: BaseException | None = e
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(c, FileMetadataError) for c in chain):
        return DownloadError(
            f"{endpoint()} answered a request for {repo} with something that is not a Hugging Face file (an HTML error "
            f"page, or a proxy that is not a Hub mirror); nothing was kept. {HF_HINT}"
        )
    if isinstance(e, GatedRepoError):
        return DownloadError(f"{repo} on {endpoint()} needs an accepted licence and HF_TOKEN ({e.__class__.__name__})")
    if isinstance(e, RepositoryNotFoundError | RevisionNotFoundError):
        return DownloadError(f"{repo} was not found on {endpoint()}. {HF_HINT}")
    if isinstance(e, LocalEntryNotFoundError) or any("connect" in type(c).__name__.lower() for c in chain):
        return DownloadError(f"Could not reach {endpoint()} for {repo}. {HF_HINT}")
    if isinstance(e, EntryNotFoundError):
        return DownloadError(f"{repo} on {endpoint()} lacks a file this model needs ({e}). {HF_HINT}")
    return DownloadError(f"Download of {repo} from {endpoint()} failed: {e}. {HF_HINT}")


def fetch(root: Path, repo: str, patterns: tuple[str, ...], revision: str = "main") -> Snapshot:
    """Download the repo files matching `patterns` at `revision` (resuming), verified against the hub's hashes."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=endpoint(), token=_token())
    folder = root / ".downloads" / "hf" / repo.replace("/", "--")
    try:
        commit = api.repo_info(repo, revision=revision).sha or revision
        listing = {
            f.path: f
            for f in api.list_repo_tree(repo, recursive=True, revision=commit)
            if isinstance(f, RepoFile)
            and any(fnmatch.fnmatch(f.path, p) for p in patterns)
            and not any(fnmatch.fnmatch(f.path, p) for p in IGNORED)
        }
    except DownloadError:
        raise
    except Exception as e:  # the client's own HTTP and hub errors, across its versions
        raise _error(repo, e) from e
    missing = [p for p in patterns if "*" not in p and p not in listing]
    if missing:
        raise DownloadError(f"{repo} on {endpoint()} has no {', '.join(missing)}. {HF_HINT}")
    if not listing:
        raise DownloadError(f"{repo} on {endpoint()} has no files matching {', '.join(patterns)}. {HF_HINT}")
    auth = {"Authorization": f"Bearer {_token()}"} if _token() else {}
    for name in sorted(listing):
        entry = listing[name]
        if ".." in Path(name).parts or name.startswith("/"):
            raise DownloadError(f"{repo} on {endpoint()} lists a file outside the repository ({name!r})")
        url = f"{endpoint()}/{repo}/resolve/{commit}/{urllib.parse.quote(name)}"
        download(
            url,
            folder / name,
            sha256=entry.lfs.sha256 if entry.lfs else None,
            git_sha1=None if entry.lfs else entry.blob_id,
            size=entry.lfs.size if entry.lfs else entry.size,
            hint=HF_HINT,
            headers=auth,
            timeout=60,
        )
    return Snapshot(repo, commit, folder)


def forget(folder: Path, name: str) -> None:
    """Delete a downloaded file and its records, so the next run downloads it again."""
    forget_file(folder / name)


def discard(snapshot: Snapshot) -> None:
    """Remove a snapshot once installed: the store holds the copy that is served."""
    shutil.rmtree(snapshot.folder, ignore_errors=True)
