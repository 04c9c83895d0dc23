"""Where a cache's files are: a local folder, or a Hub repo pinned to one commit."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from dataset_card import data_prefix

from .files import expand_home
from .hub import Retry, download_file, is_hub_location, resolve_commit


@dataclass
class CacheSource:
    """Where a cache's pieces are: local folder, or a Hub repo pinned to one commit."""

    location: str
    prefix: str  # the config's folder ("" for a cache at the root)
    name: str | None
    commit: str | None = None  # Hub only
    token: str | None = field(default=None, repr=False)  # never in logs or tracebacks
    retry: Retry | None = field(default=None, repr=False)  # Hub only; None: the default
    revision: str | None = None  # Hub only: the branch, tag or commit asked for (None: the default branch), pinned as `commit`

    @property
    def on_hub(self) -> bool:
        return self.commit is not None

    def file(self, relative: str) -> Path:
        """A file of the cache's folder (on the Hub: downloaded, a file it lacks raising FileNotFoundError)."""
        if self.on_hub:
            return self.repo_file(f"{self.prefix}{relative}")
        return Path(self.location) / self.prefix / relative

    def repo_file(self, path: str) -> Path:
        """A file of the pinned commit, by its path in the repo. The client itself retries a download
        only after 408/429: a 5xx, or a dropped connection, is retried here."""
        fetch = functools.partial(download_file, self.location, path, self.commit, self.token)
        return (self.retry or Retry())(f"read {path} at commit {self.commit[:12]}", fetch, self.location, explain_permanent=False)

    def describe(self) -> str:
        where = f"{self.location}@{self.commit[:12]}" if self.on_hub else self.location
        return f"{where} (config {self.name})" if self.name else where


def open_source(
    location: str | Path, *, revision: str | None = None, name: str | None = None, token: str | None = None, retry=None
) -> CacheSource:
    """`retry`: a `builder.hub.Retry` for the Hub's answer (None: the default)."""
    location = expand_home(location)
    if is_hub_location(location):
        commit = resolve_commit(str(location), revision, token, retry)
        return CacheSource(str(location), data_prefix(name), name, commit, token, retry, revision)
    if revision is not None:
        raise ValueError(f"revision={revision!r}: only a Hub repo id has revisions, {location} is a local path")
    return CacheSource(str(location), data_prefix(name), name)
