"""Build state: what an unfinished build keeps in `.eagle3_build/` so it can be resumed.

The identity (everything that shapes a cache's bytes) is recorded in `.eagle3_build/identity.json` before the first shard is written,
so an interrupted build can be resumed (and a mismatched resume refused) before the card,
which is written last, exists. Each finished shard leaves a small sidecar record there too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .errors import ConfigError, ResumeMismatch

log = logging.getLogger(__name__)

BUILD_STATE_DIR = ".eagle3_build"
BUILD_STATE_FILE = f"{BUILD_STATE_DIR}/identity.json"
# What the build read beyond its identity: the commit of a Hub dataset input (whose data files the identity hashes).
INPUT_SOURCE_FILE = f"{BUILD_STATE_DIR}/input.json"
# A random token rank 0 of a run on several processes writes once it holds the lock: a rank that does not
# find it there sees another directory (a node-local path, a relative one typed in another working directory).
# It marks no build (`holds_cache` ignores it), and each run writes its own over the last.
RUN_TOKEN_FILE = f"{BUILD_STATE_DIR}/run-token.json"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# Fields added to the identity after caches were already being built: a build that started before
# records none, and resuming it compares the rest (saying so) rather than refusing it. Where this
# run's value is None there is nothing an earlier build could have differed in (a Hub target has no
# weights fingerprint; a target naming no code of its own ran none), and nothing goes unchecked.
ADDED_FIELDS = ("target.weights_sample_sha256", "target.weights_files", "target.remote_code", "target.code_sha256")


# Fields holding a path as it was typed: another spelling of the same local file or folder (a
# trailing slash, `..`, a symlink) names the same input, whose content the other fields hash.
PATH_FIELDS = ("target.model", "input.data")
# The content digests the identity records for each path field's local file or folder.
PATH_CONTENT_FIELDS = {
    "target.model": ("target.config_sha256", "target.weights_sample_sha256"),
    "input.data": ("input.content_hash",),
}

# Fields earlier versions recorded as given, None where a flag was left to its default, and this one
# records as resolved (the input's default configuration by name): a None recorded then is the same
# setting where the content digests, which follow what it resolved to, are equal.
RESOLVED_FIELDS = {"input.config": ("input.content_hash",)}


def identity_differences(
    stored: dict, current: dict, tokenizer_hashes: frozenset[str] = frozenset(), input_hashes: frozenset[str] = frozenset()
) -> dict:
    """`{field: (stored, current)}` for every differing identity field, dotted names. `tokenizer_hashes`:
    those this run's tokenizer may have been recorded under (tokenize.recorded_tokenizer_hashes);
    `input_hashes`: those this run's input may have been recorded under (a Hub input: the rows' fingerprint
    at the commit read, and the data files' hash alone where the build read this commit, which earlier
    versions recorded; see hub_inputs.accepted_hashes)."""
    a, b = flatten(stored), flatten(current)
    if a.get(TOKENIZER_FIELD) in tokenizer_hashes:
        b[TOKENIZER_FIELD] = a[TOKENIZER_FIELD]
    if a.get(INPUT_HASH_FIELD) in input_hashes:
        b[INPUT_HASH_FIELD] = a[INPUT_HASH_FIELD]
    for field in ADDED_FIELDS:
        if field not in a and field in b and b.pop(field) is not None:
            log.warning("the build being resumed predates %s: that field is not checked", field)
    for field in PATH_FIELDS:
        if a.get(field) != b.get(field) and (same_local_path(a.get(field), b.get(field)) or same_recorded_content(field, a, b)):
            b[field] = a[field]
    for field, digests in RESOLVED_FIELDS.items():
        if a.get(field) is None and b.get(field) is not None and same_digests(digests, a, b):
            b[field] = a[field]
    if recorded_with_earlier_fingerprint(a, b):
        b[WEIGHTS_FIELD] = a[WEIGHTS_FIELD]
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


WEIGHTS_FIELD = "target.weights_sample_sha256"
TOKENIZER_FIELD = "tokenizer_sha256"
INPUT_HASH_FIELD = "input.content_hash"


def recorded_with_earlier_fingerprint(stored: dict, current: dict) -> bool:
    """A build begun by an earlier version (it recorded no `target.weights_files`) fingerprinted other
    files of the same folder (see fingerprints.earlier_weights_sample_hashes): the same weights,
    fingerprinted the earlier way."""
    if None in (stored.get(WEIGHTS_FIELD), current.get(WEIGHTS_FIELD)) or stored[WEIGHTS_FIELD] == current[WEIGHTS_FIELD]:
        return False
    if "target.weights_files" in stored or not isinstance(current.get("target.model"), str):
        return False
    from .embedded import resolve_target
    from .fingerprints import same_weights

    return same_weights(stored[WEIGHTS_FIELD], resolve_target(current["target.model"]), by_an_earlier_version=True)


def same_local_path(first, second) -> bool:
    if not (isinstance(first, str) and isinstance(second, str)):
        return False
    first, second = Path(first).expanduser(), Path(second).expanduser()
    return first.exists() and second.exists() and first.resolve() == second.resolve()


def same_recorded_content(field: str, stored: dict, current: dict) -> bool:
    """Where the stored path leads nowhere from here (a relative path typed in another working
    directory, a folder moved since), this run's local path names the same input when the content
    digests recorded for it are equal. A stored path that still leads to a folder is compared as a path."""
    first, second = stored.get(field), current.get(field)
    if not (isinstance(first, str) and isinstance(second, str)):
        return False
    if Path(first).expanduser().exists() or not Path(second).expanduser().exists():
        return False
    return same_digests(PATH_CONTENT_FIELDS[field], stored, current)


def same_digests(digests: tuple[str, ...], stored: dict, current: dict) -> bool:
    return all(stored.get(d) is not None and stored.get(d) == current.get(d) for d in digests)


def holds_cache(out: Path) -> bool:
    """A build here wrote what a new one would lose: its card, shards, or shard records (an upload may have
    deleted the shard). Its state alone, written as it started, holds nothing of that: a start that failed
    before its first shard (a target that would not load, its memory) is started over by the same command,
    fixed, where --resume would refuse the fix (other weights, another --dtype) as another build."""
    out = Path(out)
    return is_cache_card(out / "README.md") or any(out.glob("data/*.parquet")) or holds_shard_records(out)


def holds_shard_records(out: Path) -> bool:
    return any((Path(out) / BUILD_STATE_DIR / "shards").glob("*.parquet.json"))


def is_cache_card(path: Path) -> bool:
    """An eagle3-cache card (a README.md whose front matter holds the manifest), not someone else's README."""
    if not path.is_file():
        return False
    from .manifest import CARD_KEY, card_data_of

    try:
        return CARD_KEY in card_data_of(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):  # no readable front matter (a ManifestError): not a card of ours
        return False


def read_identity(output_dir: Path) -> dict | None:
    return read_build_state(output_dir, BUILD_STATE_FILE, "identity")


def read_build_state(output_dir: Path, relative: str, what: str) -> dict | None:
    """A file of the build's state, None where there is none; one damaged since the build wrote it is refused:
    without it this run cannot be checked against the build."""
    path = Path(output_dir) / relative
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:  # not JSON, or not text
        raise ConfigError(
            "--output-dir",
            str(output_dir),
            f"an interrupted build to resume, with its {what} ({relative}) as the build wrote it",
            f"{path} is damaged ({err}), so this run's settings cannot be checked against the build's and nothing "
            "was changed. Build again into a new --output-dir.",
        ) from err


def check_resume(
    output_dir: Path,
    identity: dict,
    tokenizer_hashes: frozenset[str] = frozenset(),
    input_hashes: frozenset[str] = frozenset(),
    altered_input_hashes: frozenset[str] = frozenset(),
) -> dict:
    """The identity the resumed build goes on with: refused (changing nothing) when the stored one differs
    from this run's. Where they agree, the stored one, as recorded: fields an earlier version recorded
    otherwise (a path's spelling, the tokenizer's hash as loaded) or not at all name the same build, whose
    fingerprint, which its Hub tag and readers' `expect` pin, must not change with the version resuming it.
    `altered_input_hashes`: those of rows of this Hub input whose text `datasets` changed, which this run reads
    row by row (inputs.Prepared.altered_input_hashes): a build of them is refused, saying so."""
    refuse_resume_without_build_state(output_dir)
    stored = read_identity(output_dir)
    if stored is None:
        return identity  # nothing written yet (a start that failed): the run starts the build
    from .hub_inputs import accepted_hashes

    commit_read = (read_input_source(output_dir) or {}).get("revision")
    input_hashes = accepted_hashes(input_hashes, commit_read)
    differences = identity_differences(stored, identity, tokenizer_hashes, input_hashes)
    if differences:
        # A Hub input whose content hash could not be told is named by `datasets`' fingerprint of its rows, one of input_hashes
        untold = flatten(identity).get(INPUT_HASH_FIELD) in input_hashes
        altered = flatten(stored).get(INPUT_HASH_FIELD) in accepted_hashes(altered_input_hashes, commit_read)
        hint = hub_input_hint(output_dir, stored, differences, untold, altered)
        if not holds_cache(output_dir):
            hint = " ".join(filter(None, (hint, STARTED_OVER_HINT)))
        raise ResumeMismatch(differences, hint)
    return stored


STARTED_OVER_HINT = "The build begun there wrote no shard yet: run without --resume to start it over with these settings."


def hub_input_hint(output_dir: Path, stored: dict, differences: dict, untold: bool = False, altered: bool = False) -> str:
    """Where only what a Hub input's rows were made from differs: the dataset commit the build read, to resume
    from; where this run could not tell what they were made from (`untold`), that it could not, and what to do;
    where the build read rows whose text `datasets` changed, which this run reads as written (`altered`), that."""
    commit = (read_input_source(output_dir) or {}).get("revision")
    same_input = not {"input.data", "input.config", "input.split"} & set(differences)
    if INPUT_HASH_FIELD not in differences or not same_input:
        return ""
    if altered:
        return (
            f"The build read the rows of Hub dataset {stored['input']['data']!r} as `datasets` made them, with a column "
            "typed as Json, which changed text that parses as JSON; this version reads its JSON data files row by row, "
            "keeping that text as written, so the shards written hold other text than the rest would: build the cache "
            "anew in another --output-dir (or remove this one)."
        )
    if untold:
        return (
            f"This run could not tell what the rows of Hub dataset {stored['input']['data']!r} were made from (offline, "
            "neither the local Hub cache's copy of its files nor a note of them beside the cached rows was found), so "
            "not whether they are the build's: resume where the Hub can be reached (unset HF_HUB_OFFLINE), which names them."
        )
    if commit is None:
        return ""
    return (
        f"The data files of Hub dataset {stored['input']['data']!r}, or what its card says of them, have changed since "
        f"commit {commit}, which the build read: pass --input-revision {commit} to continue it from that commit."
    )


def read_run_token(output_dir: Path) -> str | None:
    """The run token this process finds in `output_dir` (RUN_TOKEN_FILE); None where there is none to read."""
    try:
        return json.loads((Path(output_dir) / RUN_TOKEN_FILE).read_text()).get("token")
    except (OSError, ValueError):
        return None


def read_input_source(output_dir: Path) -> dict | None:
    return read_build_state(output_dir, INPUT_SOURCE_FILE, "record of the input commit read")


def refuse_resume_without_build_state(output_dir: Path) -> None:
    """--resume on a cache (a card, or shards) that came without its `.eagle3_build` folder, say copied or
    downloaded: its build cannot be checked against this run's settings, so it is not continued."""
    output_dir = Path(output_dir)
    if read_identity(output_dir) is not None or not holds_cache(output_dir):
        return
    if is_cache_card(output_dir / "README.md"):
        found = "a finished cache (its card, README.md)"
        hint = (
            "The cache is complete: read it, or check it with `eagle3-cache verify`, as it is. "
            "To build it again, choose a new --output-dir."
        )
    else:
        found = "shards (data/*.parquet)"
        hint = "To build this cache, choose a new --output-dir."
    raise ConfigError(
        "--output-dir",
        str(output_dir),
        f"an interrupted build to resume, with its build state ({BUILD_STATE_DIR})",
        f"It holds {found} without its build state, so there is nothing to resume. {hint}",
    )


def sidecar_path(output_dir: Path, shard_name: str) -> Path:
    return output_dir / BUILD_STATE_DIR / "shards" / f"{shard_name}.json"


def read_sidecar(output_dir: Path, shard_name: str) -> dict | None:
    """A shard's build record; None where it has none, or one that no longer decodes (damaged since it was
    written, say cut short or zeroed): its shard is then not known to be complete, and a resume rebuilds it
    as it rebuilds a shard without a record, rather than stop on a JSON error."""
    path = sidecar_path(output_dir, shard_name)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:  # not JSON, or not text
        log.warning("the build record %s of shard %s is damaged (%s); it counts as missing", path, shard_name, err)
        return None
