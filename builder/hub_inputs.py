"""What a Hub dataset input is: the commit `datasets` read, and what at that commit made the rows.

`datasets` names the rows it loads from a Hub dataset (their `_fingerprint`) by the repo's
commit, so any commit, a README edit too, would make the same rows another input. The content
hash here covers what `datasets` reads to make the rows of the split: its data files in the order
it reads them, each by its path and the id the Hub keys its bytes by (an LFS file's sha256, else
its git blob id), and what the dataset card says of the configuration besides its data files (the
settings of its `configs` entry, such as a JSON `field` or a CSV `sep`, and the features its
`dataset_info` declares, to which the rows are cast). Online the ids come from the Hub at the
commit read; offline, from the local Hub cache, whose blobs are named by the same ids; the card
from the local Hub cache either way, where `datasets` downloaded it. Each hash is noted beside
the rows `datasets` cached, so that offline it is still told once the Hub cache's copy is deleted.
Where `datasets` typed a column as Json, which changes text, the JSON data files are read again row
by row (see json_data_files), and the content hash marks it (read_row_by_row).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import unquote

from .errors import InputError

log = logging.getLogger(__name__)

# How `datasets` names a Hub data file it resolved: hf://datasets/{repo_id}@{quoted revision}/{path}
HF_DATA_FILE = re.compile(r"hf://datasets/(?P<repo>[^@]+)@(?P<revision>[^/]+)/(?P<path>.+)")
PATHS_PER_REQUEST = 100
# The dataset card, and the YAML file `datasets` reads over its header.
CARD_FILES = ("README.md", ".huggingface.yaml")
# The keys of a card's `configs` entry that name its data files (hashed by their ids) or the entry itself.
NOT_SETTINGS = frozenset({"config_name", "data_files", "data_dir", "default"})


@dataclass(frozen=True)
class HubSource:
    commit: str | None  # the dataset commit read (None where `datasets` does not say)
    content_hash: str | None  # of what made the split's rows (None where that cannot be told)
    # What a build may have recorded for the same rows at this commit: the data files' hash alone, as a
    # version before the card was hashed recorded it, bound to the commit (see bound_to_commit).
    earlier_hashes: tuple[str, ...] = ()
    read: ReadInput | None = field(default=None, compare=False)  # the files and card it was told from, where they were


@dataclass(frozen=True)
class ReadInput:
    """What `datasets` read to make a split's rows at one commit."""

    commit: str
    files: tuple[tuple[str, str], ...]  # (repo path, id of its bytes), in the order `datasets` reads them
    card: dict  # what the card says of the configuration besides its data files

    def source(self) -> HubSource:
        described = {"files": [list(f) for f in self.files], "card": _with_text_keys(self.card)}
        content_hash = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()
        return HubSource(self.commit, content_hash, (bound_to_commit(files_hash(dict(self.files)), self.commit),), self)


def _with_text_keys(value):
    """YAML mappings keyed by numbers too (a class label's `names`), with every key as text: sortable as JSON."""
    if isinstance(value, dict):
        return {str(k): _with_text_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_text_keys(v) for v in value]
    return value


def hub_source(builder, repo_id: str, config: str, split: str, rows_fingerprint: str) -> HubSource:
    """The commit and content hash of `split` of `config` as `builder` read it: from the files it resolved
    (online), else (offline, a cached copy) from the local Hub cache's snapshot of its commit, else from
    the note an earlier run left beside the cached rows (`rows_fingerprint`: `datasets`' name for them)."""
    commit = builder.hash if is_commit(builder.hash) else None
    if not is_cached_copy(builder):
        read = _read_online(builder, config, split)
    else:  # the dataset's cache folder is named by the commit
        read = _read_from_hub_cache(repo_id, commit, config, split) if commit is not None else None
    if read is not None:
        source = read.source()
        _write_note(rows_fingerprint, source)
        return source
    noted = _read_note(rows_fingerprint)
    if noted is not None and noted.commit == commit:
        return noted
    log.warning(
        "--input-data: what the rows of Hub dataset %r (split %s) were made from could not be told (offline, the local "
        "Hub cache holds no copy of its files); the rows are named by the commit `datasets` read, so the resume of a "
        "build that read them online is refused: reach the Hub (unset HF_HUB_OFFLINE) to name them",
        repo_id,
        split,
    )
    return HubSource(commit, None)


# Notes of the content hash of rows `datasets` cached, by their fingerprint (which names the dataset, configuration,
# commit and split): the Hub cache's copy of the files they were read from may be deleted while they stay cached.
# The folder names the way the hash is computed: a note of another one is not taken.
NOTES_FOLDER = "eagle3_cache_inputs/hub_content_hashes_v2"


def _note_path(rows_fingerprint: str) -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / NOTES_FOLDER / f"{rows_fingerprint}.json"


def _write_note(rows_fingerprint: str, source: HubSource) -> None:
    from .files import write_json_atomic

    path = _note_path(rows_fingerprint)
    note = {"commit": source.commit, "content_hash": source.content_hash, "earlier_hashes": list(source.earlier_hashes)}
    try:
        write_json_atomic(path, note)
    except OSError as err:  # a read-only cache: the hash is only not told offline without the Hub cache's copy
        log.debug("could not note the content hash of %s in %s: %r", rows_fingerprint, path, err)


def _read_note(rows_fingerprint: str) -> HubSource | None:
    path = _note_path(rows_fingerprint)
    try:
        note = json.loads(path.read_text(encoding="utf-8"))
        return HubSource(note["commit"], note["content_hash"], tuple(note["earlier_hashes"]))
    except (OSError, ValueError, KeyError, TypeError):  # none, or damaged: as if none
        return None


def _read_online(builder, config: str, split: str) -> ReadInput | None:
    files = _split_files(builder.config.data_files or {}, split)
    remote = [HF_DATA_FILE.fullmatch(f) for f in files]
    if not files or not all(m and is_commit(unquote(m["revision"])) for m in remote) or len({m["revision"] for m in remote}) > 1:
        return None
    repo_id, commit, paths = remote[0]["repo"], unquote(remote[0]["revision"]), [m["path"] for m in remote]
    ids = _hub_file_ids(repo_id, commit, [*paths, *CARD_FILES], required=paths)
    card = _card(repo_id, commit, [name for name in CARD_FILES if name in ids])
    return ReadInput(commit, tuple((path, ids[path]) for path in paths), card_settings(card, config))


def files_hash(ids: dict[str, str]) -> str:
    """The split's data files alone, by repo path and the id of their bytes, sorted: the content hash
    of a version that did not hash the card, nor the order the files are read in."""
    h = hashlib.sha256()
    for path, blob in sorted(ids.items()):
        h.update(f"{path}\0{blob}\n".encode())
    return h.hexdigest()


def bound_to_commit(content_hash: str, commit: str) -> str:
    """A hash that names the input only as read at `commit`, as `content_hash@commit`: the data files'
    hash alone does not tell a card edit that changed the rows, so it is taken only where the build
    read the same commit (see accepted_hashes)."""
    return f"{content_hash}@{commit}"


def accepted_hashes(hashes, commit_read: str | None) -> frozenset[str]:
    """Of `hashes` (a HubSource's earlier_hashes, with `datasets`' fingerprint of the rows), those a build
    that read `commit_read` may have recorded: a bound one only where its commit is that one."""
    accepted = set()
    for h in hashes:
        content_hash, _, commit = h.partition("@")
        if not commit or commit == commit_read:
            accepted.add(content_hash)
    return frozenset(accepted)


def card_settings(card: dict, config: str) -> dict:
    """What `card` (its YAML) says of `config` besides its data files: the other settings of its `configs`
    entry and the features its `dataset_info` declares. A card edit that leaves them as they are (its
    prose, another configuration) leaves them as they are."""
    entry = _config_entry(card.get("configs"), config)
    features = _config_entry(card.get("dataset_info"), config).get("features")
    return {"settings": {k: v for k, v in entry.items() if k not in NOT_SETTINGS}, "features": features}


def _config_entry(entries, config: str) -> dict:
    """The entry of `configs` or `dataset_info` (a list of them, or one) for `config` (one without a name is `default`)."""
    entries = entries if isinstance(entries, list) else [entries]
    return next((e for e in entries if isinstance(e, dict) and e.get("config_name", "default") == config), {})


def _card(repo_id: str, commit: str, names: list[str]) -> dict:
    """The YAML of the card files `names` at `commit`, merged as `datasets` merges them (the standalone YAML
    over the README's header): downloaded with the rows, so from the local Hub cache."""
    card: dict = {}
    for name in names:
        card.update(_card_yaml(_download(repo_id, commit, name), name))
    return card


def _card_yaml(path: Path, name: str) -> dict:
    import yaml
    from huggingface_hub import DatasetCard

    if name == "README.md":
        return DatasetCard.load(path).data.to_dict()
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _download(repo_id: str, commit: str, name: str) -> Path:
    import datasets
    from huggingface_hub import HfApi

    from .hub import HubError, Retry

    api = HfApi(endpoint=datasets.config.HF_ENDPOINT)
    fetch = partial(api.hf_hub_download, repo_id, name, repo_type="dataset", revision=commit)
    try:
        return Path(Retry()(f"read {name}", fetch, repo_id))
    except HubError as err:
        raise _hub_failed(repo_id, commit, f"the {name}", err) from None


def is_commit(name) -> bool:
    return isinstance(name, str) and re.fullmatch(r"[0-9a-f]{40}", name) is not None


def _split_files(data_files, split: str) -> list[str]:
    return next((list(files) for name, files in data_files.items() if str(name) == split), [])


def _hub_file_ids(repo_id: str, commit: str, paths: list[str], required: list[str]) -> dict[str, str]:
    """{path: id of its bytes} of those of `paths` there are at `commit`, as the Hub lists them; a transient
    failure is retried as every other Hub call is, and one that outlasts the retries stops the build
    before any GPU time."""
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
            raise _hub_failed(repo_id, commit, "the list of data files", err) from None
    missing = sorted(set(required) - set(ids))
    if missing:  # `datasets` just read them at this commit
        raise InputError(
            f"--input-data: the Hub lists no {', '.join(missing[:3])} in dataset {repo_id!r} at commit {commit}, which "
            "`datasets` read them from; expected the files it read: try again, or pin the dataset with --input-revision"
        )
    return ids


def _hub_failed(repo_id: str, commit: str, what: str, err: Exception) -> InputError:
    cause = err.__cause__ or err
    return InputError(
        f"--input-data: the Hub did not give {what} of dataset {repo_id!r} at commit {commit}, which `datasets` read, and "
        f"the input is named by them ({type(cause).__name__}: {_one_line(cause)}); expected an answer: re-run the same "
        "command once the Hub answers again, or offline (HF_HUB_OFFLINE=1), where the local caches name the input"
    )


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


def _read_from_hub_cache(repo_id: str, commit: str, config: str, split: str) -> ReadInput | None:
    """Offline: the split's data files in the local Hub cache's snapshot of `commit`, resolved there as
    `datasets` resolves them (the card's `configs`, else split names), by the blobs they link to, which
    the cache names by the ids the Hub lists, and the card there. None where the snapshot does not hold them."""
    import datasets

    snapshot = snapshot_folder(repo_id, commit)
    if not snapshot.is_dir():
        return None
    try:
        files = _split_files(datasets.load_dataset_builder(str(snapshot), name=config).config.data_files or {}, split)
    except (ValueError, FileNotFoundError) as err:  # no data files there, or not this configuration
        log.debug("could not resolve the data files of %s in %s: %r", repo_id, snapshot, err)
        return None
    blobs = [(Path(f).relative_to(snapshot).as_posix(), Path(f).resolve()) for f in files]
    if not blobs or any(blob.parent.name != "blobs" for _, blob in blobs):  # a copy, not a link to a blob
        return None
    # `datasets` downloads the card files a commit has with its rows: one not in the snapshot is not in the commit
    card = {}
    for name in CARD_FILES:
        if (snapshot / name).is_file():
            card.update(_card_yaml(snapshot / name, name))
    return ReadInput(commit, tuple((path, blob.name) for path, blob in blobs), card_settings(card, config))


def is_cached_copy(builder) -> bool:
    """`datasets` offline (or with the Hub out of reach) reads the latest copy in its cache, which lists no files."""
    from datasets.packaged_modules.cache.cache import Cache

    return isinstance(builder, Cache)


def copy_at_revision(builder, repo_id: str, config: str | None, revision: str | None):
    """`builder`, or, where it is the newest cached copy `datasets` reads whatever revision is asked for
    (offline, or with the Hub out of reach), the cached copy of the commit --input-revision names:
    refused, saying so, where the cache holds none."""
    if revision is None or not is_cached_copy(builder):
        return builder
    commit = revision if is_commit(revision) else _cached_ref(repo_id, revision)
    if commit == builder.hash:
        return builder
    rows_folder = Path(builder.cache_dir).parents[2]  # {datasets cache}/{dataset}/{config}/{version}/{commit}
    copies = _cached_copies(rows_folder, config)
    pinned = [copy for copy in copies if copy.name == commit]
    if len(pinned) > 1:  # several configurations: the one `datasets` took, as without a revision
        pinned = [copy for copy in pinned if copy.parts[-3] == builder.config.name] or pinned
    if len(pinned) != 1:
        raise _no_cached_copy(repo_id, revision, commit, sorted({copy.name for copy in copies}), several=len(pinned) > 1)
    from datasets.packaged_modules.cache.cache import Cache

    name, version = pinned[0].parts[-3:-1]
    return Cache(repo_id=repo_id, dataset_name=repo_id.split("/")[-1], config_name=name, version=version, hash=commit)


def _cached_copies(rows_folder: Path, config: str | None) -> list[Path]:
    """The folders of the cached copies of a Hub dataset's rows (of `config`), as `datasets` finds them: those of
    a configuration by its name alone (others were loaded with settings of their own)."""
    return [
        folder
        for folder in rows_folder.glob("*/*/*")
        if is_commit(folder.name) and _copy_config(folder) == folder.parts[-3] and config in (None, folder.parts[-3])
    ]


def _copy_config(folder: Path) -> str | None:
    info = folder / "dataset_info.json"
    return json.loads(info.read_text(encoding="utf-8")).get("config_name") if info.is_file() else None


def _no_cached_copy(repo_id: str, revision: str, commit: str | None, cached: list[str], several: bool) -> InputError:
    if several:
        found = f"holds copies of commit {commit} in several configurations"
        fix = "pass --input-config to name one"
    else:
        named = f"commit {commit}" if commit else "a name the local Hub cache does not know"
        asked = f"commit {commit}" if commit == revision else f"revision {revision!r} ({named})"
        found = f"holds no copy of {asked}, only of {', '.join(cached) or 'none'}"
        fix = "unset HF_HUB_OFFLINE (or reach the Hub) to download it, or pass one of the cached commits as --input-revision"
    return InputError(
        f"--input-revision: Hub dataset {repo_id!r} is read from the local cache (HF_HUB_OFFLINE is set, or the Hub cannot "
        f"be reached), which {found}; expected a cached copy of that revision: {fix}"
    )


def _cached_ref(repo_id: str, revision: str) -> str | None:
    ref = snapshot_folder(repo_id, "x").parent.parent / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None


# ---- columns `datasets` types as Json: the JSON data files read again, row by row ----------------------------
#
# `datasets` types a JSON column whose rows hold values of several types (a message's `content` text in some rows,
# a list of parts in others) as Json, which stores a string that parses as JSON as that JSON: a reply `"Hello"`,
# quotes included, is read back as Hello, and a reply `42` as the number 42. What the text was is lost in its
# table, so such a split's JSON data files are read again with the reader of local files, which keeps each row's
# text as written. The rule is the Json type, not the files being JSON: only that type changes values, and the
# rows `datasets` makes of every other JSON split stay the input they were (caches built from them resume).

# JSON loader settings under which `datasets` reads the files' rows as the row-by-row reader does (how much it
# reads at a time, what it does with mixed types, which is what made the Json column); any other (a `field`, an
# encoding other than UTF-8) reads other rows or other text.
ROW_BY_ROW_SETTINGS = frozenset({"chunksize", "block_size", "use_threads", "on_mixed_types", "parse_agent_traces", "encoding"})
JSON_SUFFIXES = (".json", ".jsonl")
READ_ROW_BY_ROW = "JSON data files read row by row"


def json_columns(features) -> list[str]:
    """The columns `features` types as `datasets`' Json, nested ones included (`messages[].content`)."""
    return _json_columns(features.to_dict() if features is not None else {}, "")


def _json_columns(feature, path: str) -> list[str]:
    if isinstance(feature, list):  # an older `datasets`' list of one feature
        return [c for f in feature for c in _json_columns(f, f"{path}[]")]
    if not isinstance(feature, dict):
        return []
    if "_type" not in feature:  # columns, or the fields of a struct
        return [c for name, f in feature.items() for c in _json_columns(f, f"{path}.{name}" if path else str(name))]
    if feature["_type"] == "Json":
        return [path]
    return _json_columns(feature["feature"], f"{path}[]") if "feature" in feature else []


def read_row_by_row(content_hash: str) -> str:
    """The content hash of rows read again row by row: another input than the rows `datasets` made of the same
    files, whose text it changed, so that a build of those is not resumed with these."""
    return hashlib.sha256(f"{content_hash}|{READ_ROW_BY_ROW}".encode()).hexdigest()


def json_data_files(repo_id: str, split: str, source: HubSource, columns: list[str]) -> list[Path] | None:
    """The local copies, in the order `datasets` read them, of the JSON data files of `split`, whose `columns`
    `datasets` typed as Json: to be read row by row. None where they are not JSON (a Parquet file stores a Json
    column as JSON text, which reads back as it was written). Refused where they cannot be read as `datasets`
    was told to (a card setting such as `field`), or, offline, where no copy of them is at hand."""
    read = source.read
    typed = _typed_as_json(repo_id, split, columns)
    if read is None:
        raise InputError(
            f"{typed}; the rows are then read again row by row from its data files, and offline the local Hub cache "
            f"holds no copy of them{f' at commit {source.commit}' if source.commit else ''} (deleted since `datasets` "
            "read them); expected the data files at hand: reach the Hub (unset HF_HUB_OFFLINE) to download them again"
        )
    paths = [path for path, _ in read.files]
    if not any(_json_suffix(path) for path in paths):
        return None
    unread = [path for path in paths if Path(path).suffix not in JSON_SUFFIXES]
    if unread:
        raise InputError(
            f"{typed}; the rows are then read again row by row from its data files, which reads .json/.jsonl files as "
            f"they are, and {', '.join(unread[:3])}{' ...' if len(unread) > 3 else ''} are not (compressed); expected "
            f"JSON files as they are: download them (`hf download {repo_id} --repo-type dataset --local-dir DIR`), "
            "decompress them and give DIR as --input-data"
        )
    _refuse_settings_not_applied(typed, read.card.get("settings") or {})
    return [_local_copy(repo_id, read.commit, path) for path in paths]


def _typed_as_json(repo_id: str, split: str, columns: list[str]) -> str:
    names = ", ".join(columns[:3]) + (" ..." if len(columns) > 3 else "")
    return (
        f"--input-data: `datasets` typed column {names} of Hub dataset {repo_id!r} (split {split}) as Json, which can "
        'change text that parses as JSON (a reply `"Hello"` loses its quotes, a reply `42` becomes a number)'
    )


def _json_suffix(path: str) -> bool:
    """A JSON data file, compressed or not (`datasets` decompresses it)."""
    from .files import COMPRESSED_SUFFIXES

    suffixes = Path(path).suffixes
    if len(suffixes) > 1 and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in JSON_SUFFIXES


def _refuse_settings_not_applied(typed: str, settings: dict) -> None:
    """The card's settings for the JSON loader that the row-by-row reader does not apply (a `field`): with them
    the rows it reads would not be the dataset's, so none is read. The features a card declares are not among
    them: they type the rows, and read row by row the files' values are taken as written, as a local file's are."""
    not_applied = {k: v for k, v in settings.items() if k not in ROW_BY_ROW_SETTINGS or (k == "encoding" and not _is_utf8(v))}
    if not_applied:
        raise InputError(
            f"{typed}; the rows are then read again row by row from its data files, as local files are, and the card's "
            f"`configs` entry holds settings ({json.dumps(not_applied, default=str)}) that change how `datasets` reads "
            "those files, which that reader does not apply; expected data files read as they are: write the "
            "conversations the dataset should hold as JSON Lines (one object per line, each text as meant) and give "
            "that file as --input-data (or push it without those settings)"
        )


def _is_utf8(encoding) -> bool:
    import codecs

    try:
        return codecs.lookup(str(encoding)).name in ("utf-8", "utf-8-sig")
    except LookupError:
        return False


def _local_copy(repo_id: str, commit: str, path: str) -> Path:
    """The file as the local Hub cache holds it at `commit`, where `datasets` downloaded it; downloaded again where
    that copy was deleted, which only happens online (offline, a snapshot without it gives no ReadInput)."""
    local = snapshot_folder(repo_id, commit) / path
    return local if local.is_file() else _download(repo_id, commit, path)
