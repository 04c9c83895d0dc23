"""The Hugging Face Hub client: endpoint and token, retries of transient failures, revision
resolution and downloads of a pinned commit, listings, and errors that say what to do.

The token comes from `HF_TOKEN` or the saved `hf auth login`; the endpoint from `HF_ENDPOINT`.
Transient failures (connection errors, 408/429/5xx) are retried with exponential backoff, and so
are the 409/412 answers to a commit that names no parent commit (another commit to the branch was
under way); anything else fails at once with what to do. Pushing a cache is `builder.push`.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import Eagle3CacheError

log = logging.getLogger(__name__)

REPO_TYPE = "dataset"
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# The Hub's answers to a commit racing another on the same branch: 409 while that one is in progress,
# 412 when it landed meanwhile. Every rank of a build commits its shards to one branch.
CONFLICT_STATUS = frozenset({409, 412})
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
RERUN = "re-run the same command once it answers again"  # what to do when the Hub kept failing


class HubError(Eagle3CacheError):
    """A Hub operation failed; the message says what was expected, found, and what to do."""


class Cancelled(Exception):
    """A retried Hub call given up because its caller cancelled it (an interrupted build): what it
    was sending is sent again by a resume."""


# ---- where and who ------------------------------------------------------------------------


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_api(token: str | None = None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_endpoint(), token=token, library_name="eagle3-cache")


def is_hub_location(location) -> bool:
    """A repo id ("user/name") that is not also a local path."""
    return not Path(str(location)).exists() and has_repo_id_shape(location)


def has_repo_id_shape(location) -> bool:
    """Whether `location` is written as a repo id ("user/name"), whatever the disk holds."""
    return re.fullmatch(rf"{NAME_PATTERN}/{NAME_PATTERN}", str(location)) is not None


# ---- retries and errors -----------------------------------------------------------------


def http_status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def retry_after(err: BaseException) -> float | None:
    """Seconds a 429/503 answer asked us to wait (Retry-After), capped at 15 minutes."""
    response = getattr(err, "response", None)
    value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    try:
        return min(float(value), 900.0) if value is not None else None
    except ValueError:
        return None


def is_transient(err: BaseException, *, conflicts: bool = False, busy: bool = False) -> bool:
    """Worth retrying: the connection broke or timed out, or the server said "later" (408/429/5xx;
    `conflicts`: also 409/412, for a commit that names no parent commit; `busy`: also 409, another
    commit under way, for a commit that names its parent, which a 412 refuses instead). The client
    wraps upload failures (RuntimeError from ...), so the cause chain is searched."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    transport = _transport_errors()
    retried = TRANSIENT_STATUS | CONFLICT_STATUS if conflicts else TRANSIENT_STATUS | {409} if busy else TRANSIENT_STATUS
    while err is not None:
        if isinstance(err, OfflineModeIsEnabled):  # a ConnectionError, but retrying cannot help
            return False
        if isinstance(err, transport) or http_status(err) in retried:
            return True
        err = err.__cause__ or err.__context__
    return False


def _transport_errors() -> tuple[type[BaseException], ...]:
    import importlib

    classes: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(classes)


def explain(err: BaseException, what: str, repo_id: str, *, rerun: str = RERUN, conflicts: bool = False, busy: bool = False) -> HubError:
    """A user-facing error for a failed Hub call (`rerun`: what to do once the Hub answers again, if it
    kept failing; `conflicts`: a commit naming no parent commit, whose 409/412 answers were retried)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    status = http_status(err)
    if isinstance(err, OfflineModeIsEnabled):
        hint = "offline mode is enabled (HF_HUB_OFFLINE=1): unset it to reach the Hub"
    elif status == 401:
        hint = "the Hub did not accept the token: set HF_TOKEN to a token with write access (or run `hf auth login`)"
    elif status == 403:
        hint = f"the token has no write access to {repo_id}: use a write token of a member of its namespace"
    elif status == 404:
        hint = f"{repo_id} (or the revision) does not exist on {hub_endpoint()}, or it is private and the token cannot see it"
    elif status == 412 and not conflicts:
        hint = "the branch moved while pushing (someone else committed): re-run to push on top of it"
    elif is_transient(err, conflicts=conflicts, busy=busy) and not answered(err):  # a wrong HF_ENDPOINT never answers
        hint = f"no answer from the Hub at {hub_endpoint()} ({err}): check the network connection and HF_ENDPOINT; {rerun}"
    elif is_transient(err, conflicts=conflicts, busy=busy):
        hint = f"the Hub kept failing ({err}); {rerun}"
    else:
        hint = str(err)
    return HubError(f"{what} on {repo_id} failed: {hint}")


def answered(err: BaseException | None) -> bool:
    """Whether the Hub answered the failed request at all (an HTTP status anywhere in the cause chain)."""
    while err is not None:
        if http_status(err) is not None:
            return True
        err = err.__cause__ or err.__context__
    return False


@dataclass
class Retry:
    retries: int = 4
    backoff: float = 1.0  # seconds before the first retry; doubles each time, up to `max_wait`
    max_wait: float = 30.0

    def wait(self, attempt: int) -> float:
        return min(self.backoff * 2**attempt, self.max_wait)

    def total_wait(self) -> float:
        """How long a failure may last before it is given up (without Retry-After answers)."""
        return sum(self.wait(attempt) for attempt in range(self.retries))

    def __call__(
        self,
        what: str,
        fn,
        repo_id: str = "",
        *,
        explain_permanent: bool = True,
        rerun: str = RERUN,
        conflicts: bool = False,
        busy: bool = False,
        cancel: threading.Event | None = None,
    ):
        """`fn()`, again after each transient failure. A failure that outlasts the retries, or is not
        transient, is raised as a `HubError` saying what to do (`explain_permanent=False`: one that
        is not transient is raised as it is, for callers whose errors already say it; `rerun`:
        what the error tells to do once the Hub answers again, where it kept failing; `conflicts`: `fn` is a commit naming no
        parent commit, so a 409/412 only says another commit was under way and is retried too. A
        commit that names its parent is refused on them: it was checked against that parent; `busy`:
        such a commit, retried on a 409 alone, another commit under way, as its parent stays pinned).
        `cancel`: once set, no further try is made and a wait before one ends at once, raising
        `Cancelled` (a try under way ends first)."""
        for attempt in range(self.retries + 1):
            if cancel is not None and cancel.is_set():
                raise Cancelled(what)
            try:
                return fn()
            except (HubError, FileNotFoundError):  # already clear, or an answer ("no such file"), not a failure
                raise
            except Exception as err:  # noqa: BLE001 - classified right below
                transient = is_transient(err, conflicts=conflicts, busy=busy)
                if not transient and not explain_permanent:
                    raise
                if not transient or attempt == self.retries:
                    raise explain(err, what, repo_id, rerun=rerun, conflicts=conflicts, busy=busy) from err
                wait = retry_after(err)
                wait = self.wait(attempt) if wait is None else wait  # "Retry-After: 0" means now
                if conflicts or busy:  # ranks whose commits raced must not retry in lockstep, and race again
                    wait *= 1 + random.random()
                log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(err).__name__, err, attempt + 1, self.retries, wait)
                if pause(wait, cancel):
                    raise Cancelled(what) from err


def pause(seconds: float, cancel: threading.Event | None) -> bool:
    """The wait before a retry; True as soon as `cancel` is set: an interrupted build stops at once
    instead of sleeping out an outage's backoff (up to a minute a try)."""
    if cancel is None:
        time.sleep(seconds)
        return False
    return cancel.wait(seconds)


# ---- reading ------------------------------------------------------------------------------


def no_cache_at(location: str, err: BaseException, command: str = "") -> HubError:
    """A location that is no local directory, where the Hub gave no repo of that id either (`err`:
    why). A mistyped local path of the form `a/b` reads as a repo id, so the error names both, and
    what to do about each. `command`: the word the message begins with (as in "verify: ...")."""
    from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError

    endpoint = hub_endpoint()
    if isinstance(err, OfflineModeIsEnabled):
        hub = (
            "the Hub cannot be asked: offline mode is enabled. Pass an existing cache directory, or unset HF_HUB_OFFLINE "
            "to read from the Hub."
        )
    elif isinstance(err, RepositoryNotFoundError):
        hub = f"no dataset repo on {endpoint} (or it is private and no token with access is set: set HF_TOKEN)"
    elif http_status(err) is not None:
        hub = f"the Hub at {endpoint} kept failing ({err}): check the path, or re-run once the Hub answers again"
    else:
        hub = f"the Hub at {endpoint} could not be reached ({err}): check the path, or the network connection and HF_ENDPOINT"
    return HubError(f"{command + ': ' if command else ''}{location}: no local directory of that name, and {hub}")


def resolve_commit(repo_id: str, revision: str | None = None, token: str | None = None, retry: Retry | None = None) -> str:
    """The commit a revision (branch, tag or commit) points at now: pin every read to it so the
    card, the vocab and the shards all come from one version even if the branch moves. A transient
    failure is retried (`retry`, else the default), so one 429 or 503 does not stop a training start."""
    api = hub_api(token)
    look_up = functools.partial(_commit_of, api, repo_id, revision)
    try:
        return (retry or Retry())(f"look up revision {revision or 'main'!r}", look_up, repo_id, explain_permanent=False)
    except HubError as err:
        if is_transient(err.__cause__):  # the retries ran out: maybe a mistyped local path, maybe no network
            raise no_cache_at(repo_id, err.__cause__) from err.__cause__
        raise


def _commit_of(api, repo_id: str, revision: str | None) -> str:
    from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return api.dataset_info(repo_id, revision=revision).sha
    except (OfflineModeIsEnabled, RepositoryNotFoundError) as err:
        raise no_cache_at(repo_id, err) from None
    except RevisionNotFoundError:
        refs = api.list_repo_refs(repo_id, repo_type=REPO_TYPE)  # a transient failure here retries the whole look-up
        known = [b.name for b in refs.branches] + [t.name for t in refs.tags]
        raise HubError(
            f"{repo_id}: no revision {revision!r}; branches and tags: {known}. Pass one of them as --revision (revision= in Python)."
        ) from None


def revision_kind(repo_id: str, revision: str, token: str | None = None) -> str | None:
    """ "branch" or "tag" where `revision` names one of the repo's; None where it names neither (a commit) or the
    Hub cannot be asked (offline, an outage): it only shapes advice, so it is never an error."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        refs = hub_api(token).list_repo_refs(repo_id, repo_type=REPO_TYPE)
    except (HfHubHTTPError, *_transport_errors()):
        return None
    if any(branch.name == revision for branch in refs.branches):
        return "branch"
    return "tag" if any(tag.name == revision for tag in refs.tags) else None


def download_file(repo_id: str, path: str, commit: str, token: str | None = None) -> Path:
    """One file of a pinned commit, through the local Hugging Face cache. `FileNotFoundError` only
    when the Hub answers that the file is not there: the client reports a file it could not ask
    about (its look-up kept failing: a 5xx, a dropped connection) as not found locally, which is a
    failure to retry, not an answer."""
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    try:
        return Path(hub_api(token).hf_hub_download(repo_id, path, repo_type=REPO_TYPE, revision=commit))
    except RemoteEntryNotFoundError:
        raise FileNotFoundError(f"{repo_id}@{commit[:12]} has no {path}") from None
    except LocalEntryNotFoundError as err:
        if err.__cause__ is None:
            raise HubError(
                f"{repo_id}@{commit[:12]}: {path} is not in the local Hugging Face cache, and the Hub was not asked: {err}"
            ) from err
        raise err.__cause__ from None  # what stopped the look-up: `Retry` retries it, or says the Hub kept failing


SHARD_FILE = "eagle3_cache_shard_file"  # the attribute of an error that names the shard file it was read from


def failed_path(err: BaseException) -> str | None:
    """The repo file a failed read asked for: the `.../resolve/<revision>/<path>` URL found in the
    error's cause chain (the client keeps the request or response on its errors), or the `hf://` file
    the reader names on an error Parquet raised (`SHARD_FILE`)."""
    from urllib.parse import unquote

    while err is not None:
        shard = re.match(r"hf://datasets/[^/]+/[^/@]+@[^/]+/(.+)", getattr(err, SHARD_FILE, ""))
        if shard:
            return unquote(shard.group(1))
        for text in (_url_of(err, "response"), _url_of(err, "request"), str(err)):
            match = re.search(r"/resolve/[^/\s]+/([^?#\s'\"]+)", text)
            if match:
                return unquote(match.group(1))
        err = err.__cause__ or err.__context__
    return None


def _url_of(err: BaseException, attribute: str) -> str:
    try:  # httpx raises RuntimeError, not AttributeError, for an error that has no request
        return str(getattr(getattr(err, attribute, None), "url", "") or "")
    except RuntimeError:
        return ""


def read_error(err: BaseException, repo_id: str, revision: str | None, commit: str, reopened: int) -> HubError:
    """A user-facing error for a streaming read that failed for good: which file, which version, why."""
    path = failed_path(err) or "a data file"
    err, status = answer_behind(err)
    if status == 404:
        hint = "the file is not in that commit any more (deleted, or the history was rewritten): open a revision that holds it"
    elif status in (401, 403):
        hint = "the token cannot read it: set HF_TOKEN to a token with read access to the repo"
    elif is_transient(err):
        hint = (
            f"the Hub kept failing ({err}) after {reopened} reopening(s); keep `dataset.state_dict()` "
            "and resume from it with `load_state_dict()` once the Hub answers again"
        )
    else:
        hint = str(err)
    return HubError(f"streaming {repo_id}: reading {path} at {read_version(revision, commit)} failed: {hint}")


def answer_behind(err: BaseException) -> tuple[BaseException, int | None]:
    """The error in `err`'s cause chain that carries the Hub's HTTP status, and that status; `err` and None
    where no answer is behind it (`datasets` wraps the client's error)."""
    status = http_status(err)
    while status is None and err.__cause__ is not None:
        err = err.__cause__
        status = http_status(err)
    return err, status


def undecodable(err: BaseException) -> bool:
    """A read that failed on the bytes it got, not on the Hub's answer or the connection: Parquet's error."""
    import pyarrow as pa

    err, status = answer_behind(err)
    return status is None and not is_transient(err) and isinstance(err, (OSError, pa.ArrowException))


def read_version(revision: str | None, commit: str) -> str:
    return f"revision {revision!r} (commit {commit[:12]})" if revision else f"commit {commit[:12]} of the default branch"


def remote_file_sizes(repo_id: str, revision: str, folder: str, token: str | None = None) -> dict[str, tuple[int, str | None]]:
    """{file name: (size, sha256 of an LFS file, else None)} of the files directly in `folder` at
    `revision` (one listing request)."""
    from huggingface_hub.errors import EntryNotFoundError

    folder = folder.rstrip("/")
    try:
        entries = hub_api(token).list_repo_tree(repo_id, path_in_repo=folder or None, revision=revision, repo_type=REPO_TYPE)
        return {e.path.rsplit("/", 1)[-1]: (e.size, e.lfs.sha256 if e.lfs else None) for e in entries if hasattr(e, "blob_id")}
    except EntryNotFoundError:
        return {}


def remote_files(api, repo_id: str, revision: str, prefix: str = "") -> dict[str, str]:
    """{path: sha256 (LFS) or git blob id} of every file under `prefix` at `revision`."""
    from huggingface_hub.errors import EntryNotFoundError

    try:
        entries = api.list_repo_tree(
            repo_id, path_in_repo=prefix.rstrip("/") or None, recursive=True, revision=revision, repo_type=REPO_TYPE
        )
        return {e.path: (e.lfs.sha256 if e.lfs else e.blob_id) for e in entries if hasattr(e, "blob_id")}
    except EntryNotFoundError:
        return {}


def remote_paths(api, repo_id: str, revision: str, paths: list[str]) -> set[str]:
    """Which of these file paths exist at `revision` (one request, however many files the repo holds)."""
    entries = api.get_paths_info(repo_id, paths, revision=revision, repo_type=REPO_TYPE)
    return {e.path for e in entries if hasattr(e, "blob_id")}
