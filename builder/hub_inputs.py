"""What a Hub dataset input is: the commit `datasets` read and the data files of the split.

`datasets` names the rows it loads from a Hub dataset (their `_fingerprint`) by the repo's
commit, so any commit, a README edit too, would make the same rows another input. The content
hash here covers what was read: each data file of the split by its path and the id the Hub
keys its bytes by (an LFS file's sha256, else its git blob id). Online they come from the Hub
at the commit read; offline, from the local Hub cache, whose blobs are named by the same ids.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import unquote

from .errors import InputError

log = logging.getLogger(__name__)

# How `datasets` names a Hub data file it resolved: hf://datasets/{repo_id}@{quoted revision}/{path}
HF_DATA_FILE = re.compile(r"hf://datasets/(?P<repo>[^@]+)@(?P<revision>[^/]+)/(?P<path>.+)")
PATHS_PER_REQUEST = 100


@dataclass(frozen=True)
class HubSource:
    commit: str | None  # the dataset commit read (None where `datasets` does not say)
    content_hash: str | None  # of the split's data files (None where they cannot be told)


def hub_source(builder, repo_id: str, split: str) -> HubSource:
    """The commit and data files' hash of `split` as `builder` read it: from the files it resolved
    (online), else (offline, a cached copy) from the local Hub cache's snapshot of its commit."""
    commit = builder.hash if is_commit(builder.hash) else None
    if not is_cached_copy(builder):
        files = _split_files(builder.config.data_files or {}, split)
        remote = [HF_DATA_FILE.fullmatch(f) for f in files]
        if files and all(m and is_commit(unquote(m["revision"])) for m in remote) and len({m["revision"] for m in remote}) == 1:
            commit = unquote(remote[0]["revision"])
            return HubSource(commit, files_hash(_hub_file_ids(remote[0]["repo"], commit, [m["path"] for m in remote])))
    elif commit is not None:  # the dataset's cache folder is named by the commit
        ids = _cached_file_ids(repo_id, commit, builder.config.name, split)
        if ids is not None:
            return HubSource(commit, files_hash(ids))
    log.warning(
        "--input-data: the data files of Hub dataset %r (split %s) could not be told; the rows are named by the "
        "commit `datasets` read, so a resume after any new commit to the dataset is refused",
        repo_id,
        split,
    )
    return HubSource(commit, None)


def files_hash(ids: dict[str, str]) -> str:
    """The split's data files, by repo path and the id of their bytes: a commit that leaves them as they are
    (a README or another split edited) leaves it as it is."""
    h = hashlib.sha256()
    for path, blob in sorted(ids.items()):
        h.update(f"{path}\0{blob}\n".encode())
    return h.hexdigest()


def is_commit(name) -> bool:
    return isinstance(name, str) and re.fullmatch(r"[0-9a-f]{40}", name) is not None


def _split_files(data_files, split: str) -> list[str]:
    return next((list(files) for name, files in data_files.items() if str(name) == split), [])


def _hub_file_ids(repo_id: str, commit: str, paths: list[str]) -> dict[str, str]:
    """{path: id of its bytes} at `commit`, as the Hub lists them; a transient failure is retried as
    every other Hub call is, and one that outlasts the retries stops the build before any GPU time."""
    import datasets
    from huggingface_hub import HfApi

    from .hub import HubError, Retry

    api = HfApi(endpoint=datasets.config.HF_ENDPOINT)
    ids = {}
    for start in range(0, len(paths), PATHS_PER_REQUEST):
        batch = paths[start : start + PATHS_PER_REQUEST]
        try:
            ids.update(Retry()("list the data files", partial(_listed_ids, api, repo_id, commit, batch), repo_id))
        except HubError as err:
            cause = err.__cause__ or err
            raise InputError(
                f"--input-data: the Hub did not list the data files of dataset {repo_id!r} at commit {commit}, which `datasets` "
                f"read, and the input is named by them ({type(cause).__name__}: {_one_line(cause)}); expected their listing: "
                "re-run the same command once the Hub answers again, or offline (HF_HUB_OFFLINE=1), where the local caches name them"
            ) from None
    missing = sorted(set(paths) - set(ids))
    if missing:  # `datasets` just read them at this commit
        raise InputError(
            f"--input-data: the Hub lists no {', '.join(missing[:3])} in dataset {repo_id!r} at commit {commit}, which "
            "`datasets` read them from; expected the files it read: try again, or pin the dataset with --input-revision"
        )
    return ids


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _listed_ids(api, repo_id: str, commit: str, paths: list[str]) -> dict[str, str]:
    from huggingface_hub.hf_api import RepoFile

    entries = api.get_paths_info(repo_id, paths, revision=commit, repo_type="dataset")
    return {e.path: e.lfs.sha256 if e.lfs is not None else e.blob_id for e in entries if isinstance(e, RepoFile)}


def snapshot_folder(repo_id: str, commit: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="dataset") / "snapshots" / commit


def _cached_file_ids(repo_id: str, commit: str, config: str, split: str) -> dict[str, str] | None:
    """Offline: the split's data files in the local Hub cache's snapshot of `commit`, resolved there as
    `datasets` resolves them (the card's `configs`, else split names), by the blobs they link to, which
    the cache names by the ids the Hub lists. None where the snapshot does not hold them."""
    import datasets

    snapshot = snapshot_folder(repo_id, commit)
    if not snapshot.is_dir():
        return None
    try:
        files = _split_files(datasets.load_dataset_builder(str(snapshot), name=config).config.data_files or {}, split)
    except (ValueError, FileNotFoundError) as err:  # no data files there, or not this configuration
        log.debug("could not resolve the data files of %s in %s: %r", repo_id, snapshot, err)
        return None
    blobs = {Path(f).relative_to(snapshot).as_posix(): Path(f).resolve() for f in files}
    if not blobs or any(blob.parent.name != "blobs" for blob in blobs.values()):  # a copy, not a link to a blob
        return None
    return {path: blob.name for path, blob in blobs.items()}


def is_cached_copy(builder) -> bool:
    """`datasets` offline (or with the Hub out of reach) reads the latest copy in its cache, which lists no files."""
    from datasets.packaged_modules.cache.cache import Cache

    return isinstance(builder, Cache)


def check_cached_revision(builder, repo_id: str, revision: str | None) -> None:
    """A cached copy is read whatever revision is asked for: refuse one of another commit than
    --input-revision names."""
    if revision is None or not is_cached_copy(builder):
        return
    commit = builder.hash if is_commit(builder.hash) else None
    wanted = revision if is_commit(revision) else _cached_ref(repo_id, revision)
    if wanted is None or wanted != commit:
        found = f"the cached copy is of commit {commit}" if commit else "the commit of the cached copy is not known"
        known = f" (commit {wanted})" if wanted else ", which the local Hub cache does not know"
        raise InputError(
            f"--input-revision: Hub dataset {repo_id!r} is read from the local cache (HF_HUB_OFFLINE is set, or the Hub "
            f"cannot be reached), where {found}, not revision {revision!r}{known}; expected a cached copy of that "
            "revision: unset HF_HUB_OFFLINE (or reach the Hub) to download it, or pass the commit of the cached copy"
        )


def _cached_ref(repo_id: str, revision: str) -> str | None:
    ref = snapshot_folder(repo_id, "x").parent.parent / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None
