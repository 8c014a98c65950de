"""Hugging Face downloads through `huggingface_hub`, the ecosystem's own client.

It brings what users of mirrors need: `HF_ENDPOINT` (e.g. https://hf-mirror.com), `HF_TOKEN` sent only
to the endpoint and the Hub's own hosts (never to the CDN a file redirects to), resumable downloads,
Xet storage and progress bars. On top of it, every file is checked against the sizes and hashes the hub
publishes (sha256 for LFS files, the git blob hash for small ones) with `verify_repo_checksums`; a file
that does not match is deleted before anything uses it, so a rerun fetches it afresh.

Files land in `<store>/.downloads/hf/<org>--<repo>/`, outside the served folders; installs copy from
there into a staged folder (see install.py).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from immich_aio.download.fetch import DownloadError

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

    chain, cause = [], e
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
    """Download the repo files matching `patterns` (resuming), verified against the hub's hashes."""
    from huggingface_hub import HfApi, hf_hub_download
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
        missing = [p for p in patterns if "*" not in p and p not in listing]
        if missing:
            raise DownloadError(f"{repo} on {endpoint()} has no {', '.join(missing)}. {HF_HINT}")
        if not listing:
            raise DownloadError(f"{repo} on {endpoint()} has no files matching {', '.join(patterns)}. {HF_HINT}")
        folder.mkdir(parents=True, exist_ok=True)
        for name in sorted(listing):
            hf_hub_download(
                repo,
                name,
                revision=commit,
                local_dir=folder,
                endpoint=endpoint(),
                token=_token(),
                tqdm_class=_progress_class(),
            )
        verification = api.verify_repo_checksums(repo, revision=commit, local_dir=folder)
    except DownloadError:
        raise
    except Exception as e:  # the client's own HTTP, hub and file errors, across its versions
        raise _error(repo, e) from e
    bad = [m for m in verification.mismatches if m["path"] in listing]
    for m in bad:
        forget(folder, m["path"])
    if bad:
        detail = "; ".join(
            f"{m['path']}: {m['algorithm']} {m['actual'][:12]}… is not the hub's {m['expected'][:12]}…" for m in bad
        )
        raise DownloadError(
            f"{repo}: downloaded files do not match the hashes {endpoint()} publishes ({detail}). "
            "They were deleted; run the command again to download them afresh."
        )
    return Snapshot(repo, commit, folder)


def _progress_class():
    """huggingface_hub's bar, shown even when stderr is not a terminal (docker logs, CI): long work shows progress."""
    from huggingface_hub.utils import tqdm

    class Progress(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            kwargs["disable"] = False
            kwargs.setdefault("mininterval", 0.5)
            super().__init__(*args, **kwargs)

    return Progress


def forget(folder: Path, name: str) -> None:
    """Delete a downloaded file and huggingface_hub's record of it, so the next run downloads it again."""
    (folder / name).unlink(missing_ok=True)
    meta = folder / ".cache" / "huggingface" / "download" / f"{name}.metadata"
    meta.unlink(missing_ok=True)


def discard(snapshot: Snapshot) -> None:
    """Remove a snapshot once installed: the store holds the copy that is served."""
    shutil.rmtree(snapshot.folder, ignore_errors=True)
