"""`eagle3-cache verify`: check a cache against its manifest, and optionally recompute samples live.

Structural checks read every byte once: files present and no strays, sizes, checksums, schema,
row counts, the identity's fingerprint (an edited manifest no longer matches it), what lies
outside it (the shard list: shards 0..N-1 of N, each once; each shard record's counts: its rows';
totals and dataset_info: the sums over the shards, and the coverages and bytes per token the records
and vocab file give; every count a whole number, 0 or more), per-row shapes against the manifest and
finite values, and across shards what no shard shows alone (source_index unique, shard sizes,
failed records). `--recompute N`
reruns the target (refused unless its recorded identity matches) on N random samples,
rebuilding each one's exact forward batch from the cached rows (batches depend only on lengths
and the shard's recorded batching, which a resume may have changed), so fp32 caches must
match bit for bit on a machine that computes as the build's did, and within a few rounding steps
on another machine of its kind where the compute is fp32 (see Tolerance; in bf16 or fp16 so few
steps are too coarse to tell from damage, and such shards are skipped). It also tokenizes the
samples' input rows again (their token ids and loss masks, which the target runs on: a difference is
damage where this run tokenizes with the versions the build recorded, and a warning otherwise), and
for a hidden cache compares the head file and logit terms it is read through with the live target's.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import random
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow.parquet as pq
import torch

from dataset_card import data_prefix
from dataset_card.render import features, shard_files

from .batching import pad_batch, plan_batches, row_windows, window_bytes
from .build_state import read_sidecar
from .errors import ConfigError, Eagle3CacheError
from .files import HASHES, expand_home, file_hash, new_hash
from .formats import Layout, encode_aux, encode_targets
from .manifest import (
    INDEX_KEY,
    VOCAB_FILE,
    argmax_coverage,
    argmax_in_vocab,
    bytes_per_token,
    caches_in_sub_folders,
    card_data_of,
    card_shard_pattern,
    fingerprint,
    layout_column_specs,
    listed_config_without_card,
    manifest_from_card,
    recorded_checksum,
    refuse_damaged_front_matter,
    refuse_damaged_index,
    unfinished_cache,
)
from .reader import RowDecoder, read_vocab
from .repair import LOCAL, Repair
from .shards import RAW, is_card_read, shard_name
from .vocab import vocab_coverage

log = logging.getLogger(__name__)


def verify_cache(
    location: str | Path,
    *,
    recompute: int = 0,
    seed: int | None = None,
    target_model: str | None = None,
    revision: str | None = None,
    name: str | None = None,
    trust_remote_code: bool = False,
) -> list[str]:
    """Every problem found, as `shard/sample: message` lines; empty when the cache is intact.
    A Hub repo id is downloaded first (every byte must be read to check its checksum anyway);
    `name`: the config (sub-folder) of a repo or folder holding several caches, as load_cache's.
    `seed` (default 0) and `target_model` go with `recompute`, `revision` with a repo id;
    `trust_remote_code`: the recompute may run the target's own code, where its build did."""
    if recompute < 0:
        raise ConfigError("--recompute", recompute, "a whole number of samples, 0 or more (0: recompute none)")
    location = expand_home(location)
    refuse_flags_without_use(location, recompute, seed, target_model, revision)
    fix = Repair.of(location, revision, name)
    out, files = cache_folder(location, revision, name, fix)
    manifest = manifest_in(out, files)
    refuse_incomplete_manifest(out, manifest, files, fix)
    refuse_shards_only_on_the_hub(out, manifest)
    problems = check_manifest(out, manifest, fix) + check_shard_list(manifest) + check_totals(out, manifest, fix)
    layout_problems, written = check_columns_and_layout(manifest, fix)
    problems += layout_problems + check_features(out, written, fix)
    readable, in_vocab = [], draft_vocab_mask(out, manifest)
    for shard in manifest["shards"]:  # against the columns the build wrote, whatever the card now says
        file_problems = check_shard_file(out, written, shard, fix)
        problems += file_problems or check_shard_rows(out, written, shard, in_vocab, fix)
        readable += [] if file_problems else [shard["name"]]
    problems += check_across_shards(out, manifest, readable, fix)
    report = Report(problems)
    if recompute and not problems:
        recomputed = recompute_samples(out, manifest, recompute, seed or 0, target_model, trust_remote_code, fix)
        report += recomputed
        report.recomputed = recomputed.recomputed
    return report


def refuse_flags_without_use(
    location: str | Path, recompute: int, seed: int | None, target_model: str | None, revision: str | None
) -> None:
    """A flag given where nothing reads it is refused rather than silently ignored, as build refuses
    them: the user meant a check verify would not make."""
    if revision is not None and Path(location).exists():
        raise ConfigError(
            "--revision",
            revision,
            "a Hub dataset repo id to verify",
            f"{location} is a local directory, which has no revisions, so the flag would be ignored: leave it out, or "
            f"verify the repo the cache was pushed to (eagle3-cache verify REPO_ID --revision {revision})",
        )
    for flag, value, why in (
        ("--seed", seed, "It chooses the samples to recompute."),
        ("--target-model", target_model, "Only a recompute runs the target."),
    ):
        if value is not None and not recompute:
            raise ConfigError(flag, value, "--recompute N as well", f"Without it the flag is ignored. {why}")


class Report(list):
    """The problems found, one line each; `recomputed`: how many samples the recompute compared
    (fewer than asked for where shards cannot be recomputed, or the cache holds fewer)."""

    recomputed = 0


@dataclass(frozen=True)
class CacheFiles:
    """How verify's refusals name the files it reads: a local folder's by their path; a Hub repo's, which it reads
    from the local Hub cache's copy, as the reader and the Hub's messages name them, by the repo at the commit read
    and the path in the repo (the user named the repo, and the copy is no file of theirs to repair)."""

    root: Path  # the directory given, or the snapshot folder of the repo's commit
    repo: str | None = None  # a Hub repo's id

    def name(self, path: Path) -> str:
        if self.repo is None:
            return str(path)
        at, relative = f"{self.repo}@{self.root.name[:12]}", path.relative_to(self.root).as_posix()
        return at if relative == "." else f"{at}: {relative}"


def cache_folder(location: str | Path, revision: str | None, name: str | None, fix: Repair = LOCAL) -> tuple[Path, CacheFiles]:
    """The local folder holding the cache's card, downloading a Hub repo id (its root card first, which
    says whether the repo holds several caches, then the cache: only config `name`'s folder where
    named), and how to name its files; refuses, saying what to do, where there is no finished cache."""
    from .hub import is_hub_location

    on_hub = not Path(location).exists() and is_hub_location(location)
    if Path(location).exists():
        files = CacheFiles(Path(location))
    elif on_hub:
        files = CacheFiles(download(str(location), revision, ["README.md"]), str(location))
    else:
        raise Eagle3CacheError(
            f"verify: {str(location)!r} is neither a directory nor a Hub dataset repo id (user/name): "
            "pass the output directory of `eagle3-cache build`, or the repo a cache was pushed to"
        )
    root = files.root
    refuse_damaged_card(root / "README.md", files, fix)
    refuse_unnamed_cache(files, location, name)
    if name is not None and (root / "README.md").is_file():  # the index `datasets` and load_cache open the config by
        refuse_damaged_index((root / "README.md").read_text(encoding="utf-8"), f"verify: {files.name(root / 'README.md')}", name, fix)
    if on_hub and (name is not None or (root / "README.md").is_file()):
        download(str(location), snapshot_commit(root, revision), None if name is None else ["README.md", f"{data_prefix(name)}**"])
    out = root / data_prefix(name)
    refuse_damaged_card(out / "README.md", files, fix, root=name is None)
    if not (out / "README.md").is_file():
        raise Eagle3CacheError(f"verify: {files.name(out)} has no README.md (the card, with the manifest); {why_no_card(files, name, fix)}")
    return out, files


def manifest_in(out: Path, files: CacheFiles) -> dict:
    """The manifest of the card in `out` (cache_folder refused it damaged), named in refusals as `files` names it."""
    card = out / "README.md"
    return manifest_from_card(card.read_text(encoding="utf-8"), f"verify: {files.name(card)}", None if files.repo else out)


def refuse_unnamed_cache(files: CacheFiles, location: str | Path, name: str | None) -> None:
    """A root card indexing several caches needs one of them named."""
    card = files.root / "README.md"
    index = card_data_of(card.read_text(encoding="utf-8"), f"verify: {files.name(card)}").get(INDEX_KEY) if card.is_file() else None
    if index and (name is None or name not in index):
        raise Eagle3CacheError(
            f"verify: {location} holds several caches {sorted(index)}"
            + (f", not {name!r}" if name is not None else "")
            + ": pass one of them with --name (name=)"
        )


def snapshot_commit(snapshot: Path, revision: str | None) -> str | None:
    """The commit a downloaded snapshot folder is of (the Hub cache names it so): the rest of the repo
    is downloaded at the commit its root card was, whatever the branch has since."""
    return snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else revision


def refuse_damaged_card(card: Path, files: CacheFiles, fix: Repair = LOCAL, root: bool = True) -> None:
    """A card whose YAML front matter begins but is never closed or does not parse (`refuse_damaged_front_matter`).
    `root`: the card is the repo's (or folder's) root card."""
    if card.is_file():
        refuse_damaged_front_matter(card.read_text(encoding="utf-8"), f"verify: {files.name(card)}", fix, root)


# The parts of the manifest verify (its recompute too) and the reader read; every build writes them.
MANIFEST_KEYS = (
    "identity",
    "fingerprint",
    "columns",
    "layout",
    "target_vocab_size",
    "special_token_ids",
    "hidden_size",
    "vocab_file",
    "shards",
    "totals",
    "build",
)
HIDDEN_MANIFEST_KEYS = ("lm_head_file", "head_transform")  # a hidden cache is read through its head rows and logit terms
# The settings a shard's batches are rebuilt from; caches recorded before the sort window had a setting
# of its own have no sort_window_bytes (batching.window_bytes then stands for what they sorted within).
BATCHING_KEYS = ("batch_size", "max_tokens_per_batch", "row_group_bytes")
OPTIONAL_BATCHING_KEYS = ("sort_window_bytes",)


def refuse_incomplete_manifest(out: Path, manifest: dict, files: CacheFiles, fix: Repair = LOCAL) -> None:
    missing, mistyped = missing_manifest_parts(manifest), mistyped_manifest_parts(manifest)
    damage = [f"its manifest has no {', '.join(missing)}"] if missing else []
    damage += [f"its manifest's {'; '.join(mistyped)}"] if mistyped else []
    if damage:
        raise Eagle3CacheError(f"verify: {files.name(out / 'README.md')} is damaged: {'; '.join(damage)}{fix.damaged_card()}")


def missing_manifest_parts(manifest: dict) -> list[str]:
    """The parts a manifest lacks, by name (`shards[NAME].rows`): those of every cache, a hidden cache's
    head parts, the fields of the identity, layout, columns, files and shards that verify reads, the build's
    pad id, and the batching of shards recorded before each shard carried its own (their batches are rebuilt from it)."""
    missing = [key for key in MANIFEST_KEYS if manifest.get(key) is None]
    if "hidden" in (part_of(manifest, "layout.target_format"), part_of(manifest, "identity.target_format")):
        missing += [key for key in (*HIDDEN_MANIFEST_KEYS, "lm_head_file.path") if lacks(manifest, key)]
        missing += missing_checksum(manifest, "lm_head_file", manifest.get("lm_head_file"))
    missing += [f"identity.{key}" for key in IDENTITY_KEYS if lacks(manifest.get("identity"), key)]
    missing += [f"layout.{field.name}" for field in fields(Layout) if lacks(manifest.get("layout"), field.name)]
    missing += missing_checksum(manifest, "vocab_file", manifest.get("vocab_file"))
    missing += missing_column_fields(manifest.get("columns"))
    missing += missing_shard_fields(manifest, manifest.get("shards"))
    failed = manifest.get("failed")
    missing += [
        f"failed[{i}].source_index"
        for i, f in enumerate(failed if isinstance(failed, list) else ())
        if isinstance(f, dict) and f.get("source_index") is None
    ]
    # The id a recompute pads batches with, as the build did: no default, since every cache readers can read records it
    # (builds began to in the version that first wrote the `layout`, without which a card is damaged).
    missing += ["build.pad_token_id"] if lacks(manifest, "build.pad_token_id") else []
    build = manifest.get("build")
    if isinstance(build, dict) and any(isinstance(s, dict) and "batching" not in s for s in manifest.get("shards") or []):
        missing += [f"build.{key}" for key in BATCHING_KEYS if key not in build]
    return [part for part in dict.fromkeys(missing) if not any(part.startswith(f"{whole}.") for whole in missing)]  # a whole, not its parts


# The identity's fields verify reads (the checks of rows and input order, the recompute); the fingerprint
# covers every field, so a field deleted from an identity is damage however it is read.
IDENTITY_KEYS = ("seq_length", "input", "input.data", "input.content_hash", "input.shuffle_seed", "target", "target.model", "aux_layer_ids")
SHARD_KEYS = ("rows", "bytes", "tokens", "loss_tokens", "argmax_in_vocab")  # with a name and a checksum
COLUMN_KEYS = {"binary": ("dtype", "shape")}  # what a reader decodes a tensor column by, beside its Arrow type


def part_of(record, path: str):
    """The value at a dotted path of nested mappings; None where any part of it is missing."""
    for key in path.split("."):
        record = record.get(key) if isinstance(record, dict) else None
    return record


def lacks(record, path: str) -> bool:
    return part_of(record, path) is None


def missing_checksum(manifest: dict, where: str, record) -> list[str]:
    """`where.checksum` where a file's record has none (format version 1 recorded it under the algorithm's
    name); nothing for a record missing whole, which is named itself."""
    if record is None:
        return []
    algorithm = manifest.get("checksum_algorithm", "sha256")
    return [] if any(part_of(record, key) is not None for key in ("checksum", algorithm)) else [f"{where}.checksum"]


def missing_column_fields(columns) -> list[str]:
    if not isinstance(columns, dict):
        return []  # columns missing: named with the manifest's parts
    missing = []
    for name, spec in columns.items():
        arrow = part_of(spec, "arrow")
        missing += [f"columns.{name}.arrow"] if arrow is None else []
        missing += [f"columns.{name}.{key}" for key in COLUMN_KEYS.get(arrow, ()) if lacks(spec, key)]
    return missing


def missing_shard_fields(manifest: dict, shards) -> list[str]:
    missing = []
    for position, shard in enumerate(shards if isinstance(shards, list) else []):
        where = f"shards[{part_of(shard, 'name') or position}]"
        missing += [f"{where}.name"] if lacks(shard, "name") else []
        missing += [f"{where}.{key}" for key in SHARD_KEYS if lacks(shard, key)]
        missing += missing_checksum(manifest, where, shard)
        batching = part_of(shard, "batching")
        missing += [f"{where}.batching.{key}" for key in BATCHING_KEYS if isinstance(batching, dict) and key not in batching]
    return missing


def mistyped_manifest_parts(manifest: dict) -> list[str]:
    """The parts verify sums, walks, hashes by or pads with, and the counts readers report, that hold another kind of
    value than every build writes (a card edited by hand; a count below 0 among them, and a pad id below 0, which a
    recompute would feed to the embedding), each with what it holds and what is expected; a part missing whole is named
    as missing."""
    skipped, failed = manifest.get("skipped"), manifest.get("failed")
    values = [("totals", manifest.get("totals"), dict), ("build.pad_token_id", part_of(manifest, "build.pad_token_id"), TOKEN_ID)]
    values += [("checksum_algorithm", manifest.get("checksum_algorithm"), ALGORITHM), ("columns", manifest.get("columns"), dict)]
    values += [("shards", manifest.get("shards"), list), ("identity.shard_size", part_of(manifest, "identity.shard_size"), COUNT)]
    values += [("failed", failed, list)] + [(f"failed[{i}]", f, dict) for i, f in enumerate(failed if isinstance(failed, list) else ())]
    values += [
        (f"failed[{i}].source_index", part_of(f, "source_index"), COUNT) for i, f in enumerate(failed if isinstance(failed, list) else ())
    ]
    values += [(f"totals.{key}", part_of(manifest, f"totals.{key}"), COUNT) for key in SUMMED]
    values += [("skipped", skipped, dict), ("duplicate_ids", manifest.get("duplicate_ids"), COUNT)]
    values += [(f"skipped.{reason}", count, COUNT) for reason, count in (skipped.items() if isinstance(skipped, dict) else ())]
    for position, shard in enumerate(manifest.get("shards") if isinstance(manifest.get("shards"), list) else []):
        where = f"shards[{part_of(shard, 'name') if isinstance(part_of(shard, 'name'), str) else position}]"
        values += [(f"{where}.{key}", part_of(shard, key), COUNT) for key in SHARD_KEYS] + [(f"{where}.name", part_of(shard, "name"), str)]
    return [
        f"{part} is {FOUND_KIND.get(type(value), 'the value')} {one_line(value)}, where {EXPECTED_KIND[kind]} is expected"
        for part, value, kind in values
        if value is not None and not holds(value, kind)
    ]


COUNT = "count"  # a kind of value: a whole number, 0 or more
TOKEN_ID = "token id"  # the same, an id of the vocabulary
ALGORITHM = "algorithm"  # the name of a checksum algorithm files.HASHES knows


def holds(value, kind) -> bool:
    if kind in (COUNT, TOKEN_ID):
        return holds(value, int) and value >= 0
    if kind == ALGORITHM:
        return isinstance(value, str) and value in HASHES
    return isinstance(value, kind) and not isinstance(value, bool)  # YAML's true is no number


FOUND_KIND = {bool: "the boolean", int: "the number", float: "the number", str: "the string", list: "the list", dict: "the mapping"}
EXPECTED_KIND = {
    COUNT: "a count (a whole number, 0 or more)",
    TOKEN_ID: "a token id (a whole number, 0 or more)",
    ALGORITHM: f"a checksum algorithm ({', '.join(sorted(HASHES))})",
    dict: "a mapping",
    list: "a list",
    str: "a string",
}


def why_no_card(files: CacheFiles, name: str | None, fix: Repair = LOCAL) -> str:
    card = files.root / "README.md"
    index = card_data_of(card.read_text(encoding="utf-8"), f"verify: {files.name(card)}").get(INDEX_KEY) if card.is_file() else None
    if name is not None and isinstance(index, dict) and name in index:
        return listed_config_without_card(files.name(card), name, fix)
    if name is not None and card.is_file():
        return f"the cache is at the root of {files.name(files.root)}, which holds no configs: leave out --name {name}"
    if files.repo is None and name is None:
        return caches_in_sub_folders(files.root) or unfinished_cache(on_hub=False)
    return unfinished_cache(on_hub=files.repo is not None)


def download(repo_id: str, revision: str | None, only: list[str] | None) -> Path:
    """The local snapshot folder of a Hub repo at `revision`, holding the files matching `only` (None: every file)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    from .hub import HubError, no_cache_at

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, allow_patterns=only))
    except RevisionNotFoundError:
        raise HubError(f"verify: {repo_id} has no revision {revision!r}: pass an existing branch, tag or commit with --revision") from None
    except RepositoryNotFoundError as err:
        raise no_cache_at(repo_id, err, "verify") from None
    except LocalEntryNotFoundError as err:  # the Hub could not be asked (why: its cause), and no copy is in the local cache
        raise no_cache_at(repo_id, err.__cause__ or err, "verify") from None


def refuse_shards_only_on_the_hub(out: Path, manifest: dict) -> None:
    """A build that uploaded its shards as it went (--push-to-hub) and deleted them here
    (--delete-local-after-upload) leaves a card and no shards: not damage, but nothing a local
    verify can read. The shard's build record holds the sha256 its upload recorded."""
    missing = [s["name"] for s in manifest["shards"] if not (out / "data" / s["name"]).exists()]
    uploaded = [name for name in missing if (read_sidecar(out, name) or {}).get("sha256")]
    if uploaded:
        raise Eagle3CacheError(
            f"verify: {len(uploaded)} of the {len(manifest['shards'])} shards of {out} are not here but on the Hub "
            f"({examples(uploaded, 3)}): the build uploaded them and then deleted them here (--delete-local-after-upload), "
            "as their build records show. Verify the repo the build pushed to instead: eagle3-cache verify REPO_ID "
            "(the build's --push-to-hub, with --name for its --hub-config)"
        )


def check_manifest(out: Path, manifest: dict, fix: Repair = LOCAL) -> list[str]:
    problems = []
    if fingerprint(manifest["identity"]) != manifest["fingerprint"]:
        problems.append(
            f"README.md: the manifest's identity fields no longer match its fingerprint {manifest['fingerprint']} "
            "(the card was edited); rebuild, or restore the card"
        )
    vocab = out / VOCAB_FILE
    if not vocab.exists():
        problems.append(f"{VOCAB_FILE}: missing; {rewrite(fix, 'it writes the vocab file again, computing no shard')}")
    elif not checksum_matches(vocab, manifest, manifest["vocab_file"]):
        problems.append(
            f"{VOCAB_FILE}: checksum differs from the manifest (the file is damaged); "
            f"{rewrite(fix, 'it writes the vocab file again, computing no shard')}"
        )
    else:
        problems += check_vocab_size(vocab, manifest, fix) + check_special_token_ids(vocab, manifest, fix)
        problems += check_token_coverage(vocab, manifest)
    head = manifest.get("lm_head_file")
    if head is not None and (not (out / head["path"]).exists() or not checksum_matches(out / head["path"], manifest, head)):
        problems.append(
            f"{head['path']}: missing or its checksum differs from the manifest (every hidden-format sample depends on it); "
            f"{fix.head_file(head['path'])}"
        )
    listed = {s["name"] for s in manifest["shards"]}
    files = (out / "data").iterdir() if (out / "data").is_dir() else ()
    pattern = card_shard_pattern((out / "README.md").read_text(encoding="utf-8"))
    strays = sorted(p.name for p in files if p.is_file() and is_card_read(p.name, pattern) and p.name not in listed)
    problems += [
        f"data/{stray}: not in the manifest, but the card reads it as a shard (data/{pattern}): move it out of data/" for stray in strays
    ]
    return problems + check_card_reads_every_shard(out, sorted(listed), fix)


def rewrite(fix: Repair, what_resume_does: str) -> str:
    """How to repair a file a resume writes again as it is (a missing shard, the vocab file): a push for a Hub repo."""
    return (
        f"to repair: {fix.push_again()}" if fix.repo is not None else f"to repair: run the build again with --resume ({what_resume_does})"
    )


def check_vocab_size(vocab: Path, manifest: dict, fix: Repair = LOCAL) -> list[str]:
    if (counted := counted_vocab_size(vocab)) == manifest["target_vocab_size"]:
        return []
    return [
        f"README.md: the manifest's target_vocab_size {manifest['target_vocab_size']} differs from the {counted} tokens "
        f"{VOCAB_FILE} counts: readers would size the draft-to-target mapping wrong. {fix.card()}"
    ]


def check_token_coverage(vocab: Path, manifest: dict) -> list[str]:
    """totals.token_coverage, which the card shows, is the build's share of the loss-masked tokens the vocab file
    counts whose id it selects: computed by the one function the build computes it by, so the two compare exactly."""
    from safetensors.numpy import load_file

    stored = load_file(str(vocab))
    coverage = vocab_coverage(stored["token_counts"], stored["selected_token_ids"])
    if manifest["totals"].get("token_coverage") == coverage:
        return []
    return [
        f"README.md: totals.token_coverage is {manifest['totals'].get('token_coverage')}, the share of the loss-masked tokens "
        f"{VOCAB_FILE} counts whose id is in its draft vocabulary is {coverage}: restore the card, or rebuild"
    ]


def check_special_token_ids(vocab: Path, manifest: dict, fix: Repair = LOCAL) -> list[str]:
    """Readers select a smaller draft vocabulary (reader.draft_selection) from the vocab file's counts and
    the manifest's special_token_ids, which the fingerprint does not cover: they must be token ids, each
    once, and where the stored draft vocabulary is itself a selection (not the whole target vocabulary),
    the ids it was selected with. Caches of earlier versions recorded the specials of their rule (no pad
    id where the tokenizer has none) and selected with those, so they agree too."""
    from safetensors.torch import load_file

    from .vocab import select_draft_vocab

    stored = load_file(str(vocab))
    selected, counts = stored["selected_token_ids"].numpy(), stored["token_counts"].numpy()
    specials = manifest["special_token_ids"]
    if not distinct_token_ids(specials, len(counts)):
        return [
            f"README.md: the manifest's special_token_ids is {one_line(specials)}, where the build records distinct token ids "
            f"within 0..{len(counts) - 1}: readers selecting a smaller draft vocabulary would fail or pick other tokens. {fix.card()}"
        ]
    if len(selected) >= len(counts):
        return []  # the whole vocabulary, in id order: no specials selected it
    reselected = select_draft_vocab(counts, len(selected), specials)
    if np.array_equal(reselected, selected):
        return []
    at = int(np.flatnonzero(reselected != selected)[0])
    return [
        f"README.md: the manifest's special_token_ids {specials} select another draft vocabulary from {VOCAB_FILE}'s counts "
        f"than the {len(selected)} tokens it stores (token {reselected[at]} at position {at}, where it stores "
        f"{selected[at]}): readers selecting a smaller draft vocabulary would pick other tokens. {fix.card()}"
    ]


def distinct_token_ids(ids, vocab_size: int) -> bool:
    """A list of token ids within 0..vocab_size-1, each once (YAML reads `true` as a bool, no id)."""
    if not isinstance(ids, list):
        return False
    return all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids) and len(set(ids)) == len(ids)


def counted_vocab_size(vocab: Path) -> int:
    """The target vocabulary the build counted loss tokens over (the vocab file's `token_counts`, one per token id)."""
    from safetensors import safe_open

    with safe_open(str(vocab), "pt") as f:
        return f.get_slice("token_counts").get_shape()[0]


def check_columns_and_layout(manifest: dict, fix: Repair = LOCAL) -> tuple[list[str], dict]:
    """The manifest's `columns` and `layout` (how readers decode every shard's bytes), outside the
    fingerprint, against those the build writes for the cache its identity describes: a column's
    dtype edited from bf16 to fp16 reads every value wrong, and no checksum or shape shows it.
    Returns the differences and the manifest as the build wrote it, to check the shards against. An
    identity that no longer matches its fingerprint (reported) tells nothing: the shards are then
    checked against the manifest's own columns."""
    if fingerprint(manifest["identity"]) != manifest["fingerprint"]:
        return [], manifest
    layout = identity_layout(manifest)
    columns = layout_column_specs(Layout(**layout), manifest["identity"].get("compression", "none"))  # format 1: raw columns
    recorded = as_read(manifest["columns"])
    differences = spec_differences("layout", manifest["layout"], layout) + [
        difference
        for name in columns.keys() | recorded.keys()
        for difference in spec_differences(f"columns.{name}", recorded.get(name), columns.get(name))
    ]
    problems = [
        f"README.md: the manifest's {difference} {the_cache_described(manifest)}: readers would decode the shards otherwise "
        f"than they were written. {fix.card()}"
        for difference in sorted(differences)
    ]
    return problems, manifest | {"layout": layout, "columns": columns}


def identity_layout(manifest: dict) -> dict:
    """The layout the identity implies (with `hidden_size`, the target's, recorded beside it): the
    formats, dtypes, K and draft vocabulary size it records, and the aux width of its aux layers. A
    field the identity does not settle (one an earlier version did not record; K outside the topk
    format, which stores none) is the layout's own."""
    identity, recorded = manifest["identity"], manifest["layout"]
    hidden = manifest.get("hidden_size", recorded.get("hidden_size"))
    draft_vocab_size, topk = identity.get("draft_vocab_size"), identity.get("topk")
    implied = {
        "target_format": identity.get("target_format"),
        "dtype": identity.get("dtype"),
        "aux_dtype": identity.get("aux_dtype"),
        "topk": min(topk, draft_vocab_size) if identity.get("target_format") == "topk" and None not in (topk, draft_vocab_size) else None,
        "draft_vocab_size": draft_vocab_size,
        "aux_width": len(identity["aux_layer_ids"]) * hidden if identity.get("aux_layer_ids") and hidden else None,
        "hidden_size": hidden,
    }
    return {field: recorded.get(field) if implied[field] is None else implied[field] for field in implied}


def as_read(columns: dict) -> dict:
    """Column specs as readers take them: a tensor column naming no encoding is raw (format version 1 named none)."""
    return {
        name: spec | {"encoding": spec.get("encoding", RAW)} if isinstance(spec, dict) and spec.get("arrow") == "binary" else spec
        for name, spec in columns.items()
    }


def spec_differences(path: str, found: dict | None, expected: dict | None) -> list[str]:
    """How a recorded spec differs from the one the build writes, field by field, in words."""
    if expected is None:
        return [f"{path} is listed; the build writes no such column"]
    if found is None:
        return [f"{path} is missing; the build writes that column"]
    return [
        f"{path}.{field} is {repr(found[field]) if field in found else 'missing'}; the build writes "
        + (repr(expected[field]) if field in expected else "no such field")
        for field in sorted(expected.keys() | found.keys())
        if found.get(field, MISSING) != expected.get(field, MISSING)
    ]


MISSING = object()


def the_cache_described(manifest: dict) -> str:
    identity = manifest["identity"]
    settings = ", ".join(f"{key} {identity[key]}" for key in IDENTITY_LAYOUT_KEYS if identity.get(key) is not None)
    return f"for the cache its identity ({settings}) and hidden_size ({manifest.get('hidden_size')}) describe"


IDENTITY_LAYOUT_KEYS = ("target_format", "dtype", "aux_dtype", "topk", "draft_vocab_size", "compression")


def check_features(out: Path, manifest: dict, fix: Repair = LOCAL) -> list[str]:
    """The card's dataset_info.features against the columns the build wrote (`manifest`, as check_columns_and_layout
    returns it): `datasets`, and load_cache through it, read the shards by these features, so a type edited there
    stops every read (binary read as string) and a column left out or added reads other columns than the shards hold.
    A card without features (`datasets` then reads them from the shards) has nothing to compare."""
    info = card_data_of((out / "README.md").read_text(encoding="utf-8")).get("dataset_info")
    declared = info.get("features") if isinstance(info, dict) else None
    if declared is None:
        return []
    why = f"`datasets` and load_cache read the shards by these features and would fail or misread them. {fix.card()}"
    if not isinstance(declared, list) or not all(isinstance(f, dict) for f in declared):
        return [f"README.md: dataset_info.features is {one_line(declared)}, not a list of columns (name, dtype): {why}"]
    found = {f.get("name"): f.get("dtype") for f in declared}
    written = {f["name"]: f["dtype"] for f in features(manifest)}
    return [
        f"README.md: dataset_info.features gives {declared_type(name, found)}, where {written_type(name, written)}: {why}"
        for name in [*written, *(name for name in found if name not in written)]
        if found.get(name, MISSING) != written.get(name, MISSING)
    ]


def declared_type(name: str, found: dict) -> str:
    return f"column {name} the type {found[name]!r}" if name in found else f"no column {name}"


def written_type(name: str, written: dict) -> str:
    return f"the shards' column is {written[name]!r}" if name in written else "the shards hold no such column"


def check_card_reads_every_shard(out: Path, listed: list[str], fix: Repair = LOCAL) -> list[str]:
    """The card's `configs` name the files `datasets` reads as the train split: a listed shard they do
    not match would be left out by `datasets` (its split sizes then disagree) and by load_cache; configs
    naming no train split (renamed, or its line deleted) leave every shard out, and both refuse the card."""
    configs = card_data_of((out / "README.md").read_text(encoding="utf-8")).get("configs")
    if not configs:
        return []  # no configs: `datasets` reads the folder's default layout
    files = f"data/{shard_files(len(listed))}"
    paths = card_train_paths(configs)
    if not paths:
        return [
            f"README.md: the card's configs ({one_line(configs)}) name no train split with a path, so `datasets` and load_cache "
            f"cannot read the shards (the build writes split train with path {files}). {fix.card()}"
        ]
    return [
        f"data/{name}: listed in the manifest, but the card's data_files ({', '.join(paths)}) do not match it, so readers "
        f"would leave its rows out (the build writes {files}). {fix.card()}"
        for name in listed
        if not any(fnmatch.fnmatchcase(f"data/{name}", path) for path in paths)
    ]


def card_train_paths(configs) -> list[str]:
    """Every path pattern of the train split in the card's `configs`: a `data_files` entry of split
    train (its path a pattern or a list of them), or, as `datasets` reads them, data_files given as a
    pattern or a list of patterns with no split named."""
    paths = []
    for config in configs if isinstance(configs, list) else []:
        files = config.get("data_files") if isinstance(config, dict) else None
        paths += patterns(files)
        for entry in files if isinstance(files, list) else []:
            if isinstance(entry, dict) and entry.get("split") == "train":
                paths += patterns(entry.get("path"))
    return paths


def patterns(value) -> list[str]:
    """The path patterns of a `data_files` value: a pattern, or the patterns of a list (not its entries of splits)."""
    if isinstance(value, str):
        return [value]
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def one_line(value, limit: int = 200) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_shard_list(manifest: dict) -> list[str]:
    """The shard list outside the fingerprint can be edited: a shard dropped with its entry, or
    listed twice, would pass every per-shard check. Names must be exactly shard k of N, k < N."""
    names = [s["name"] for s in manifest["shards"]]
    counts = {int(m.group(1)) for m in (re.search(r"-of-(\d+)\.parquet$", n) for n in names) if m}
    if len(counts) != 1:
        return [f"README.md: the manifest's shard names {names} do not share one -of-N count: restore the card, or rebuild"]
    (total,) = counts
    expected = [shard_name(k, total) for k in range(total)]
    fix = "restore the card (and any shard removed with its entry), or rebuild"
    problems = [
        f"README.md: the manifest lists data/{n} {names.count(n)} times (readers would yield its rows as often): {fix}"
        for n in sorted(set(names))
        if names.count(n) > 1
    ]
    if missing := [f"data/{n}" for n in expected if n not in names]:
        problems.append(f"README.md: the manifest lists no {', '.join(missing)}, though its shards are numbered of {total}: {fix}")
    if unexpected := sorted(set(names) - set(expected)):
        problems.append(f"README.md: the manifest lists {', '.join(unexpected)}, not named as shard k of {total}: {fix}")
    return problems


SUMMED = {"samples": "rows", "tokens": "tokens", "loss_tokens": "loss_tokens", "bytes": "bytes"}  # totals: shard records' field


def check_totals(out: Path, manifest: dict, fix: Repair = LOCAL) -> list[str]:
    """totals and the card's dataset_info (examples and bytes of each split: what the Hub shows, and
    `datasets` reads as the split size) must be the sums over the shards, argmax_coverage the build's share of their
    loss tokens and bytes_per_token their bytes over their tokens, each by the function the build computes it by."""
    totals, shards = manifest["totals"], manifest["shards"]
    sums = {key: sum(s[field] for s in shards) for key, field in SUMMED.items()}
    problems = [
        f"README.md: totals.{key} is {totals.get(key)}, the shards sum to {value}: restore the card, or rebuild"
        for key, value in sums.items()
        if totals.get(key) != value
    ]
    if totals.get("argmax_coverage") != (coverage := argmax_coverage(shards)):
        problems.append(
            f"README.md: totals.argmax_coverage is {totals.get('argmax_coverage')}, the shards' argmax_in_vocab over their "
            f"loss_tokens give {coverage}: restore the card, or rebuild"
        )
    if totals.get("bytes_per_token") != (per_token := bytes_per_token(shards)):
        problems.append(
            f"README.md: totals.bytes_per_token is {totals.get('bytes_per_token')}, the shards' bytes over their tokens give "
            f"{per_token}: restore the card, or rebuild"
        )
    info = card_data_of((out / "README.md").read_text(encoding="utf-8")).get("dataset_info") or {}
    splits = info.get("splits", []) if isinstance(info, dict) else None
    if not isinstance(splits, list) or not all(isinstance(split, dict) for split in splits):
        return problems + [f"README.md: dataset_info.splits is {one_line(splits)}, not a list of splits (name, num_examples). {fix.card()}"]
    for split in splits:
        if split.get("num_examples") != sums["samples"]:
            problems.append(
                f"README.md: dataset_info says {split.get('num_examples')} examples in split {split.get('name')!r}, "
                f"the shards hold {sums['samples']}: restore the card, or rebuild"
            )
        if split.get("num_bytes") != sums["bytes"]:  # the card writes the shards' bytes (totals.bytes) there
            problems.append(
                f"README.md: dataset_info says {split.get('num_bytes')} bytes in split {split.get('name')!r}, "
                f"the shards hold {sums['bytes']}: restore the card, or rebuild"
            )
    return problems


def checksum_matches(path: Path, manifest: dict, record: dict) -> bool:
    algorithm, expected = recorded_checksum(manifest, record)
    return file_hash(path, algorithm) == expected


def check_shard_file(out: Path, manifest: dict, shard: dict, fix: Repair = LOCAL) -> list[str]:
    """The file as recorded: present, its size, checksum, columns and row count."""
    name, path = shard["name"], out / "data" / shard["name"]
    if not path.exists():
        return [f"data/{name}: missing; {rewrite(fix, 'it rebuilds only the missing shards')}"]
    algorithm, expected = recorded_checksum(manifest, shard)
    found = digests(path, {algorithm, "sha256"} if shard.get("sha256") else {algorithm})  # one read for both
    edited = "the file is as its checksum says: the record was edited"
    if path.stat().st_size != shard["bytes"]:
        size = f"data/{name}: {path.stat().st_size} bytes, the manifest says {shard['bytes']}"
        return [
            f"{size} ({edited}). {fix.card()}" if found[algorithm] == expected else f"{size} (truncated or replaced); {fix.shards(name)}"
        ]
    if found[algorithm] != expected:
        return [f"data/{name}: checksum differs from the manifest (the file is damaged); {fix.shards(name)}"]
    parquet = pq.ParquetFile(path)
    expected_columns = list(manifest["columns"])
    if parquet.schema_arrow.names != expected_columns:
        return [f"data/{name}: columns {parquet.schema_arrow.names}, expected {expected_columns} ({edited}). {fix.card()}"]
    if parquet.metadata.num_rows != shard["rows"]:
        return [f"data/{name}: {parquet.metadata.num_rows} rows, the manifest says {shard['rows']} ({edited}). {fix.card()}"]
    if shard.get("sha256") and found["sha256"] != shard["sha256"]:  # a pushed card's: the file's LFS oid
        return [
            f"README.md: shard {name}'s record says sha256 {shard['sha256']}, the file's is {found['sha256']}: load_cache "
            f"refuses a repo whose shard has another sha256 than its card records. {fix.card()}"
        ]
    return []


def digests(path: Path, algorithms: set[str]) -> dict[str, str]:
    """{algorithm: hex digest} of a file's bytes, read once for all of them."""
    hashes = {algorithm: new_hash(algorithm) for algorithm in algorithms}
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            for h in hashes.values():
                h.update(chunk)
    return {algorithm: h.hexdigest() for algorithm, h in hashes.items()}


def check_shard_rows(out: Path, manifest: dict, shard: dict, in_vocab: np.ndarray | None = None, fix: Repair = LOCAL) -> list[str]:
    """Every row's shapes against the manifest, and finite values; the shard record's counts against its rows
    (`in_vocab`, from `draft_vocab_mask`: None where the vocab file cannot tell the argmax rows in the draft vocabulary)."""
    name, parquet = shard["name"], pq.ParquetFile(out / "data" / shard["name"])
    manifest = manifest | {"layout_columns": Layout(**manifest["layout"]).columns()}
    problems, counted = [], {"tokens": 0, "loss_tokens": 0} | ({"argmax_in_vocab": 0} if in_vocab is not None else {})
    try:
        decode = RowDecoder(manifest)
        for batch in parquet.iter_batches(batch_size=64):
            for row in batch.to_pylist():
                decoded = decode(row)
                counted["tokens"] += decoded["num_tokens"]
                counted["loss_tokens"] += int(decoded["loss_mask"].sum())
                if in_vocab is not None:
                    counted["argmax_in_vocab"] += argmax_rows_in_vocab(decoded["target_argmax"].numpy(), in_vocab)
                problems += [f"data/{name}/{row['sample_id']}: {p}" for p in check_row(decoded, manifest)]
    except (ValueError, RuntimeError) as err:  # values of another size or encoding than the columns say
        return problems + [
            f"data/{name}: its rows cannot be decoded as the manifest's columns say ({' '.join(str(err).split())}): the card's "
            f"columns were edited, or the build wrote the shard wrong. {fix.card()}"
        ]
    return problems + check_shard_counts(shard, counted, fix)


def draft_vocab_mask(out: Path, manifest: dict) -> np.ndarray | None:
    """A bool per target token id, True for the draft vocabulary's, from the vocab file the build wrote: what the
    build counted each shard's argmax_in_vocab by. None where the file is missing or damaged (reported)."""
    from safetensors.numpy import load_file

    vocab = out / VOCAB_FILE
    if not vocab.exists() or not checksum_matches(vocab, manifest, manifest["vocab_file"]):
        return None
    stored = load_file(str(vocab))
    in_vocab = np.zeros(len(stored["token_counts"]), dtype=bool)
    in_vocab[stored["selected_token_ids"]] = True
    return in_vocab


def argmax_rows_in_vocab(argmax: np.ndarray, in_vocab: np.ndarray) -> int:
    """A stored row's argmax_in_vocab, counted as the build counts it; an id outside the target vocabulary (no
    build stores one) is in no draft vocabulary."""
    known = argmax[(argmax >= 0) & (argmax < len(in_vocab))]
    return argmax_in_vocab(known, [len(known)], in_vocab)[0]


def check_shard_counts(shard: dict, counted: dict[str, int], fix: Repair = LOCAL) -> list[str]:
    """A shard record's counts against its rows: the totals are checked as their sums, so an edit to a record and
    the totals together would pass that check."""
    return [
        f"README.md: shard {shard['name']}'s record says {shard[key]} {key}, its rows hold {value}. {fix.card()}"
        for key, value in counted.items()
        if shard[key] != value
    ]


# ---- across shards ---------------------------------------------------------------------------


def check_across_shards(out: Path, manifest: dict, readable: list[str], fix: Repair = LOCAL) -> list[str]:
    """What no shard shows alone: a shard replaced by a copy of another (its record updated to agree),
    rows dropped or added, failures recorded in no listed shard. The build gives shard k the input's
    samples k*S to (k+1)*S-1 (S: --shard-size), stored or recorded as failed, so every shard but the
    last holds S of them, and source_index (unlike sample_id) is unique across the cache."""
    problems = check_failed_records(manifest) + check_shard_sizes(manifest, readable, fix)
    indices = stored_source_indices(out, readable)
    duplicates = check_unique_source_indices(manifest, indices, fix)
    if problems or duplicates or len(readable) < len(manifest["shards"]):
        return problems + duplicates  # the input order below is derived from these counts
    return check_input_order(manifest, indices, fix)


def check_failed_records(manifest: dict) -> list[str]:
    listed = {s["name"] for s in manifest["shards"]}
    return [
        f"README.md: failed sample {f.get('sample_id')!r} (source_index {f.get('source_index')}) is recorded in "
        f"data/{f.get('shard')}, which the manifest does not list: restore the card, or rebuild"
        for f in manifest.get("failed", [])
        if f.get("shard") not in listed
    ]


def shard_position(name: str) -> tuple[int, int] | None:
    """(k, N) of a shard named shard k of N; None for another name (check_shard_list reports it)."""
    match = re.search(r"-(\d+)-of-(\d+)\.parquet$", name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def failed_by_shard(manifest: dict) -> dict[str, list[dict]]:
    failed: dict[str, list[dict]] = {}
    for f in manifest.get("failed", []):
        failed.setdefault(f.get("shard"), []).append(f)
    return failed


def check_shard_sizes(manifest: dict, readable: list[str], fix: Repair = LOCAL) -> list[str]:
    """Each readable shard's samples against --shard-size; a shard whose file disagrees with its record (reported)
    is left out: its record's count may be the edited part, and the advice would delete an intact shard."""
    size = manifest["identity"].get("shard_size")
    if size is None:
        return []
    failed, problems = failed_by_shard(manifest), []
    for shard in manifest["shards"]:
        name, position = shard["name"], shard_position(shard["name"])
        if position is None or name not in readable:
            continue
        held = shard["rows"] + len(failed.get(name, []))
        last = position[0] == position[1] - 1
        if (held != size and not last) or not 0 < held <= size:
            counted = f"{held} samples" + (f" ({shard['rows']} stored, {held - shard['rows']} failed)" if held != shard["rows"] else "")
            expected = f"at most {size}" if last else f"{size}, as every shard but the last"
            problems.append(
                f"data/{name}: {counted}, where the build puts {expected} (--shard-size): samples were dropped or added; {fix.shards(name)}"
            )
    return problems


def stored_source_indices(out: Path, readable: list[str]) -> dict[str, np.ndarray]:
    """Each readable shard's source_index column (one small column, not the rows)."""
    return {name: pq.read_table(out / "data" / name, columns=["source_index"]).column(0).to_numpy() for name in readable}


def check_unique_source_indices(manifest: dict, indices: dict[str, np.ndarray], fix: Repair = LOCAL) -> list[str]:
    """One line per set of places holding the same samples (a shard copied over another: one line)."""
    failed = manifest.get("failed", [])
    held = [*indices.values(), *(np.asarray([f.get("source_index", -1)], np.int64) for f in failed)]
    places = [f"data/{name}" for name in indices] + [f"data/{f.get('shard')} (recorded as failed)" for f in failed]
    values = np.concatenate(held) if held else np.zeros(0, np.int64)
    owners = np.repeat(np.arange(len(held)), [len(v) for v in held])
    order = np.argsort(values, kind="stable")
    values, owners = values[order], owners[order]
    repeated = np.flatnonzero(values[1:] == values[:-1]) + 1
    groups: dict[tuple, list[int]] = {}
    for value in np.unique(values[repeated]):
        at = np.flatnonzero(values == value)
        groups.setdefault(tuple(places[k] for k in owners[at]), []).append(int(value))
    return [
        f"{where[-1]}: holds {len(shared)} sample(s) (source_index {examples(shared)}) {held_again(where)}: source_index "
        f"is unique in a cache, so rows were duplicated, and the samples that belong in their place are missing; {fix.duplicates()}"
        for where, shared in groups.items()
    ]


def held_again(where: tuple) -> str:
    others = sorted(set(where) - {where[-1]})
    return f"also held by {', '.join(others)}" if others else "more than once"


def examples(values: list, shown: int = 5) -> str:
    return ", ".join(map(str, values[:shown])) + (", ..." if len(values) > shown else "")


def input_order(manifest: dict) -> np.ndarray | None:
    """The order the build took the input rows in (as inputs.select_rows takes them), where the
    manifest tells how many there were: every row selected was stored, failed or skipped, and
    --max-samples (if any) was more than that. None where --max-samples cut a larger input."""
    selection = manifest["identity"]["input"]
    selected = sum(s["rows"] for s in manifest["shards"]) + len(manifest.get("failed", [])) + sum((manifest.get("skipped") or {}).values())
    if selection.get("max_samples") is not None and selected >= selection["max_samples"]:
        return None
    return np.random.default_rng(selection["shuffle_seed"]).permutation(selected)


def check_input_order(manifest: dict, indices: dict[str, np.ndarray], fix: Repair = LOCAL) -> list[str]:
    """Shards fill in turn along the input's shuffled order (skipped rows left out), so each shard's
    samples come after every sample of the shards before it: a swapped or rewritten shard does not."""
    order = input_order(manifest)
    if order is None:
        return []
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    failed, problems, spans = failed_by_shard(manifest), [], []
    for shard in sorted(manifest["shards"], key=lambda s: shard_position(s["name"]) or (0, 0)):
        name = shard["name"]
        held = np.concatenate([indices[name], np.asarray([f["source_index"] for f in failed.get(name, [])], np.int64)])
        if (outside := held[(held < 0) | (held >= len(order))]).size:
            problems.append(
                f"data/{name}: source_index {examples(outside.tolist())}, outside the {len(order)} input rows the build "
                f"selected: the shard holds samples of another input; {fix.shards(name)}"
            )
        elif held.size:
            spans.append((name, int(rank[held].min()), int(rank[held].max())))
    seed = manifest["identity"]["input"]["shuffle_seed"]
    problems += [
        f"data/{later}: holds samples the build takes before some of data/{earlier}'s (shards fill in turn along the "
        f"input's order of --shuffle-seed {seed}): the two were swapped, or one rewritten with other samples; "
        f"{fix.shards(earlier, later)}"
        for (earlier, _, last_of_earlier), (later, first_of_later, _) in zip(spans, spans[1:])
        if first_of_later < last_of_earlier
    ]
    return problems


def check_row(row: dict, manifest: dict) -> list[str]:
    length, seq_length = row["num_tokens"], manifest["identity"]["seq_length"]
    if not 0 < length <= seq_length:
        return [f"num_tokens {length} outside [1, seq_length {seq_length}]"]
    if row["loss_mask"].numel() != length:
        return [f"loss_mask has {row['loss_mask'].numel()} entries for {length} tokens"]
    rows_per = {"token": length, "loss": int(row["loss_mask"].sum())}
    problems = []
    for name, spec in manifest["layout_columns"].items():
        tensor, want = row[name], rows_per[spec["per"]]
        if tensor.shape[0] != want:
            problems.append(f"{name} has {tensor.shape[0]} rows, expected {want} (one per {spec['per']})")
        elif tensor.is_floating_point() and not bool(torch.isfinite(tensor.float()).all()):
            problems.append(f"{name} has NaN/Inf")
    return problems


# ---- recompute ----------------------------------------------------------------------------


def recompute_samples(
    out: Path, manifest: dict, count: int, seed: int, target_model: str | None, trust_remote_code: bool = False, fix: Repair = LOCAL
) -> Report:
    from .embedded import resolve_target
    from .forward import compute_record
    from .target import Target, compute_device, load_model

    identity = manifest["identity"]
    # A shard with failed (unstored) samples was batched with them: its batches cannot be rebuilt.
    incomplete = {f.get("shard") for f in manifest.get("failed", [])}
    if incomplete:
        log.warning("not recomputing shards with failed samples (their batches cannot be rebuilt): %s", sorted(incomplete))
    here = compute_record()
    comparable = comparable_shards(manifest, here)
    positions = [(s["name"], i) for s in manifest["shards"] if s["name"] in comparable.keys() - incomplete for i in range(s["rows"])]
    if not positions:
        raise Eagle3CacheError(
            f"verify --recompute: no sample can be recomputed: every shard that could match holds failed samples "
            f"({', '.join(sorted(incomplete))}), and the forward batches they were part of cannot be rebuilt without them. "
            "Nothing was compared (the structural checks passed)."
        )
    if len(positions) < count:
        log.warning("verify --recompute: only %d of the %d samples asked for can be recomputed", len(positions), count)
    chosen = sorted(random.Random(seed).sample(positions, min(count, len(positions))))
    tolerance = tolerance_for({name: comparable[name] for name, _ in chosen}, here)
    model_path = resolve_target(target_model or identity["target"]["model"])
    own_code = runs_own_code(identity["target"], trust_remote_code)
    specials_problems = check_target(model_path, manifest, own_code, fix)
    token_problems = specials_problems + check_tokens(out, manifest, model_path, chosen, own_code, fix)
    device, dtype = compute_device()
    model = load_model(model_path, identity["target"]["revision"], own_code, device, dtype)
    target = Target(model, identity["aux_layer_ids"])
    selected = read_vocab(out)["selected_token_ids"].to(device)
    problems = Report(token_problems)
    problems.recomputed = len(chosen)
    try:
        if manifest["layout"]["target_format"] == "hidden":
            problems += check_head_file(out, manifest, target, selected, fix)
        for name in sorted({n for n, _ in chosen}):
            shard = ShardRows(out / "data" / name, RowDecoder(manifest))
            batching = shard_batching(manifest, name)
            for index in (i for n, i in chosen if n == name):
                problems += [
                    f"data/{name}/{shard.row(index)['sample_id']}: {p}"
                    for p in compare_live(target, manifest, shard, index, selected, batching, tolerance.get(name))
                ]
    finally:
        target.close()
    return problems


# ---- the recomputed samples' tokens, against their input rows ----------------------------------

TOKENS_DIFFER = (
    "this run tokenizes with the conversation rules and tokenizers, transformers and jinja2 versions the build recorded, "
    "so the sample was damaged"
)


class NotRetokenized(Exception):
    """Why the recomputed samples' input rows cannot be tokenized again here (not damage: a note)."""


def check_tokens(
    out: Path, manifest: dict, model_path: str, chosen: list[tuple[str, int]], own_code: bool = False, fix: Repair = LOCAL
) -> list[str]:
    """The chosen samples' stored token ids and loss masks against their input rows tokenized now. The
    recompute runs the target on the stored tokens, so a sample whose loss mask lost a supervised token
    (its target rows dropped to agree) would match it. Where the input cannot be read here, or is no
    longer the build's, says so and compares nothing. A difference is damage only where this run
    tokenizes as the build recorded it did; otherwise it may be a change of the tokenizing rules,
    said in a warning."""
    stored = stored_samples(out, chosen)
    try:
        now = tokenized_now(manifest, model_path, [sample["source_index"] for _, sample in stored], own_code)
    except NotRetokenized as why:
        log.warning("verify --recompute: the recomputed samples' token ids and loss masks are not compared with their input rows: %s", why)
        return []
    differing = [
        (name, f"data/{name}/{sample['sample_id']}: {problem}")
        for name, sample in stored
        for problem in token_differences(sample, now[sample["source_index"]])
    ]
    changed = tokenizing_changes(manifest.get("versions") or {})
    if differing and changed:
        log.warning(
            "verify --recompute: %d recomputed sample(s) hold other token ids or loss masks than their input rows tokenized "
            "now (%s), and this run tokenizes with other versions than the build recorded (%s): they may tokenize the rows "
            "otherwise, as a --resume of the build with them would find and refuse. Not counted as damage; to tell, verify "
            "with the versions the build recorded",
            len(differing),
            differing[0][1],
            "; ".join(changed),
        )
        return []
    return [f"{line}: {TOKENS_DIFFER}; {fix.shards(name)}" for name, line in differing]


def tokenizing_changes(recorded: dict) -> list[str]:
    """How the tokenizing code and libraries here differ from those the build recorded, in words (the
    manifest's versions, of the last run: a resume refuses shards an earlier run tokenized otherwise);
    a cache built before they were recorded differs by every one it lacks."""
    from .manifest import tokenizing_versions

    return [
        f"{name} {here} here, {recorded[name] if name in recorded else 'not recorded'} for the build"
        for name, here in tokenizing_versions().items()
        if recorded.get(name) != here
    ]


def stored_samples(out: Path, chosen: list[tuple[str, int]]) -> list[tuple[str, dict]]:
    """(shard, its row) of each chosen sample: id, source index, token ids and loss mask (stored raw)."""
    samples = []
    for name in sorted({n for n, _ in chosen}):
        table = pq.read_table(out / "data" / name, columns=["sample_id", "source_index", "input_ids", "loss_mask"])
        for index in (i for n, i in chosen if n == name):
            row = table.slice(index, 1).to_pylist()[0]
            row["input_ids"] = np.frombuffer(row["input_ids"], dtype="<i4")
            row["loss_mask"] = np.frombuffer(row["loss_mask"], dtype=np.uint8)
            samples.append((name, row))
    return samples


def tokenized_now(manifest: dict, model_path: str, source_indices: list[int], own_code: bool = False) -> dict[int, dict]:
    """{source index: its input row tokenized now as the build tokenized it}; NotRetokenized where that
    cannot be done here."""
    from .hub_inputs import accepted_hashes
    from .target import load_tokenizer
    from .tokenize import _tokenize_batch

    identity = manifest["identity"]
    selection = identity["input"]
    tokenizer = load_tokenizer(model_path, identity["target"]["revision"], own_code)
    template = builds_template(tokenizer, identity)
    if renders_the_date(template):
        raise NotRetokenized(
            "the chat template writes the day it runs into them (it calls strftime_now), so on another day than the build's "
            "they hold another date"
        )
    rows, info = build_input_rows(manifest)
    recorded = accepted_hashes(info.get("earlier_content_hashes", ()), manifest.get("input_revision")) | {info["content_hash"]}
    if selection["content_hash"] not in recorded and info["content_hash"] in info.get("earlier_content_hashes", ()):
        raise NotRetokenized(  # a Hub input named by `datasets`' fingerprint of its rows: what made them was not told
            f"what the rows of the build's input {selection['data']!r} were made from could not be told here (offline, "
            "the local Hub cache holds no copy of its files): reach the Hub (unset HF_HUB_OFFLINE) to compare them"
        )
    if selection["content_hash"] not in recorded:
        raise NotRetokenized(
            f"the build's input {selection['data']!r} has changed since (its content hash is {info['content_hash']}, the "
            f"build's {selection['content_hash']}){read_from_here(manifest)}"
        )
    # Tokenized here, not through the build's cached map: a few rows, and a template may render the
    # day it runs, which no cache key holds.
    columns = _tokenize_batch(
        rows.select(source_indices)[:],  # formatted as the map formats its batches
        range(len(source_indices)),
        tokenizer=tokenizer,
        template=template,
        seq_length=identity["seq_length"],
        source_indices=np.asarray(source_indices),
        mask_options=dict(
            mask_generation_prompt=identity.get("mask_generation_prompt", False),
            mask_reasoning_content=identity.get("mask_reasoning_content", False),
        ),
    )
    return {index: {column: values[k] for column, values in columns.items()} for k, index in enumerate(columns["source_index"])}


def build_input_rows(manifest: dict):
    """The build's input rows and their description (inputs.load_rows), read as the build read them: a Hub
    dataset at the commit it read. NotRetokenized, saying what verify needs, where they cannot be read here."""
    from .embedded import resolve_input
    from .inputs import load_rows

    selection, revision = manifest["identity"]["input"], manifest.get("input_revision")
    data = selection["data"]
    if is_local_input(manifest) and not Path(resolve_input(data)).expanduser().exists():
        raise NotRetokenized(f"the build's input {data!r} is not here{how_to_read(manifest)}")
    try:
        return load_rows(resolve_input(data), config=selection.get("config"), split=selection.get("split"), revision=revision)
    except Eagle3CacheError as err:
        raise NotRetokenized(f"the build's input {data!r} cannot be read here ({finding(err)}){how_to_read(manifest)}") from None


def is_local_input(manifest: dict) -> bool:
    """Whether the build read local files: it recorded no Hub commit read (caches built before it recorded
    one: the path names local files as `--input-data` tells them apart). A local path missing here is never
    looked up on the Hub, where a repo of that name would be another dataset."""
    from .embedded import resolve_input
    from .inputs import is_local

    return manifest.get("input_revision") is None and (
        "input_revision" in manifest or is_local(resolve_input(manifest["identity"]["input"]["data"]))
    )


def read_from_here(manifest: dict) -> str:
    """Where verify reads a local input from, where the build recorded it as a relative path."""
    from .embedded import resolve_input

    if not is_local_input(manifest) or Path(resolve_input(manifest["identity"]["input"]["data"])).expanduser().is_absolute():
        return ""
    return (
        f" (a relative path: the build read it from the directory it ran in, and verify reads it from the one it runs in, "
        f"{Path.cwd()}: run verify from the build's)"
    )


def how_to_read(manifest: dict) -> str:
    """What verify needs to read the build's input, where it could not: the Hub (or the local Hub cache's copy
    of the commit the build read), or the files the build read, at the path it read them from."""
    data, revision = manifest["identity"]["input"]["data"], manifest.get("input_revision")
    if is_local_input(manifest):
        return f": verify needs the files the build read at {data}, unchanged{read_from_here(manifest)}"
    commit = f"commit {revision} (the manifest's input_revision)" if revision else "the commit the build read"
    return (
        f": verify reads Hub dataset {data!r} at {commit}; run it where the Hub can be reached (HF_HUB_OFFLINE unset, "
        "logged in where the dataset is private), or where the local Hub cache holds a copy of that commit"
    )


def finding(err: Exception) -> str:
    """What an input error found, without the build's flag it names or the advice to the build that follows."""
    return re.sub(r"^--[a-z-]+: ", "", " ".join(str(err).split())).split("; ")[0]


def builds_template(tokenizer, identity: dict):
    """The tokenizer's chat template, where the build rendered with it: a --chat-template file is
    recorded only by its hash."""
    import hashlib

    from .tokenize import template_bytes, template_of

    try:
        template = template_of(tokenizer, None)
    except Eagle3CacheError:
        template = None
    if template is None or hashlib.sha256(template_bytes(template)).hexdigest() != identity.get("chat_template_sha256"):
        raise NotRetokenized(
            "the build rendered them with a chat template other than the tokenizer's (--chat-template), which the manifest "
            "records only by its hash"
        )
    return template


def renders_the_date(template: str | dict[str, str]) -> bool:
    """Whether a template (or any of named templates) calls transformers' strftime_now, as Llama 3.2
    and 3.3's do to write "Today Date" into the system turn."""
    return any(DATE_CALL.search(text) for text in ([template] if isinstance(template, str) else template.values()))


DATE_CALL = re.compile(r"\bstrftime_now\s*\(")


def token_differences(stored: dict, now: dict) -> list[str]:
    row = stored["source_index"]
    if now["skip_reason"]:
        return [f"input row {row} is now skipped ({now['skip_reason']}: {now['skip_detail']}), where the build stored it"]
    return [
        f"{column} differs from input row {row} tokenized now ({first_token_difference(stored[column], np.asarray(now[column]))})"
        for column in ("input_ids", "loss_mask")
        if not np.array_equal(stored[column], now[column])
    ]


def first_token_difference(stored: np.ndarray, now: np.ndarray) -> str:
    if len(stored) != len(now):
        return f"{len(stored)} tokens, where the row gives {len(now)}"
    position = int(np.flatnonzero(stored != now)[0])
    return f"{int(stored[position])} at position {position}, where the row gives {int(now[position])}"


# ---- a hidden cache's head ------------------------------------------------------------------------


@torch.inference_mode()
def check_head_file(out: Path, manifest: dict, target, selected: torch.Tensor, fix: Repair = LOCAL) -> list[str]:
    """A hidden cache's samples are read through its head file (the draft rows, all rows with
    --store-full-head, the bias) and the manifest's head_transform: they must be the live target's,
    or every distribution a reader rebuilds is wrong however right the stored hidden states are."""
    from safetensors.torch import load_file

    from .target import head_spec

    path = manifest["lm_head_file"]["path"]
    stored = load_file(str(out / path))
    live = live_head_tensors(target, selected, full="weight" in stored or bool(manifest["identity"].get("store_full_head")))
    dtypes = compute_dtypes(manifest, target.head.weight.dtype)
    problems = [
        f"{path}: {what}; every sample of this hidden cache is read through it: {fix.head_file(path)}"
        for what in head_differences(stored, live, dtypes)
    ]
    expected = head_spec(target.model.config, lm_head_bias="bias" in live)
    if terms_given(manifest["head_transform"]) != terms_given(expected):
        problems.append(
            f"README.md: the manifest's head_transform is {manifest['head_transform']}, where the target gives {expected}: readers "
            f"would apply other logit terms than the target's. {fix.card()}"
        )
    return problems


def terms_given(head_transform: dict) -> dict:
    """The logit terms a head transform applies: a term recorded as None applies nothing, as one a cache
    built before the term existed does not record (readers take both as absent)."""
    return {term: value for term, value in head_transform.items() if value is not None}


def live_head_tensors(target, selected: torch.Tensor, full: bool) -> dict[str, torch.Tensor]:
    """What the build writes to a hidden cache's head file, from the live head (on its device)."""
    weight, bias = target.head.weight, getattr(target.head, "bias", None)
    live = {"draft_rows": weight.index_select(0, selected.to(weight.device))}
    if full:
        live["weight"] = weight
    if bias is not None:
        live["bias"] = bias
    return live


def compute_dtypes(manifest: dict, here: torch.dtype) -> set[torch.dtype]:
    """The dtypes the head may have been loaded in: this machine's, and every one a shard records (the
    head file is written by the last run that computed, in its dtype)."""
    recorded = {getattr(torch, s["compute"]["dtype"], None) for s in manifest["shards"] if "dtype" in (s.get("compute") or {})}
    return {here} | {dtype for dtype in recorded if isinstance(dtype, torch.dtype)}


def head_differences(stored: dict, live: dict, dtypes: set[torch.dtype]):
    """How the stored head tensors differ from the live ones: a tensor matches where both agree exactly
    at the precision of a dtype the head was loaded in (the build stored it in fp32)."""
    for key in sorted(stored.keys() | live.keys()):
        if key not in stored:
            yield f"holds no {key}, and the target's head has one"
        elif key not in live:
            yield f"holds a {key} the target's head does not have"
        elif stored[key].shape != live[key].shape:
            yield f"{key} has shape {list(stored[key].shape)}, where the target's is {list(live[key].shape)}"
        else:
            got, want = stored[key].to(live[key].device), live[key]
            if not any(torch.equal(got.to(dtype), want.to(dtype)) for dtype in dtypes):
                diff = (got.float() - want.float()).abs().max().item()
                yield f"{key} differs from the target's head (max abs diff {diff:.3g})"


def runs_own_code(recorded: dict, trust_remote_code: bool) -> bool:
    """Whether the recompute runs the code the target names of its own: where its build did (its
    identity's `remote_code`), which needs --trust-remote-code here too; a build of an earlier
    version, which recorded no such field, runs as --trust-remote-code says."""
    if "remote_code" not in recorded:
        return trust_remote_code
    if recorded["remote_code"] and not trust_remote_code:
        raise Eagle3CacheError(
            "verify --recompute: the cache was built running the target's own code (its auto_map, with "
            "--trust-remote-code), and this run does not trust it, so transformers would run its built-in "
            "class instead and no sample could match. Pass --trust-remote-code (the structural checks passed)."
        )
    return bool(recorded["remote_code"])


def check_target(model_path: str, manifest: dict, own_code: bool = False, fix: Repair = LOCAL) -> list[str]:
    """Refuse a target other than the one the cache was built with (another model, the same folder
    retrained, or its own code edited), by the identity fields the build recorded: otherwise every
    sample would be reported as damaged. Fields a Hub target does not record (its commit pins it)
    are not compared. `own_code`: load it running the code of its own it names. Returns the card's
    problems the build's tokenizer shows (`check_recorded_specials`)."""
    from .prepare import target_differences
    from .target import load_config, load_tokenizer

    revision = manifest["identity"]["target"]["revision"]
    config = load_config(model_path, revision, own_code)
    tokenizer = load_tokenizer(model_path, revision, own_code, config=config)
    differences = target_differences(manifest, model_path, config, tokenizer)
    if differences:
        lines = "\n".join(f"  {field}: the cache has {old}, {model_path} has {new}" for field, (old, new) in sorted(differences.items()))
        raise Eagle3CacheError(
            f"verify --recompute: {model_path} is not the target the cache was built with:\n{lines}\n"
            "Pass the build's target with --target-model (the structural checks passed)."
        )
    return check_recorded_specials(manifest, tokenizer, fix)


def check_recorded_specials(manifest: dict, tokenizer, fix: Repair = LOCAL) -> list[str]:
    """The card's special_token_ids against those of the build's tokenizer (its hash is in the identity, the
    ids are not): where the stored draft vocabulary is the whole one, no file shows an edit to them, yet a
    read of a smaller one selects with them. Caches of earlier versions recorded the ids of their rule."""
    from .vocab import earlier_special_token_ids, special_token_ids

    recorded, vocab_size = manifest["special_token_ids"], manifest["target_vocab_size"]
    specials = special_token_ids(tokenizer, vocab_size)
    if recorded in (specials, earlier_special_token_ids(tokenizer, vocab_size)):
        return []
    return [
        f"README.md: the manifest's special_token_ids {recorded} are not those of the build's tokenizer ({specials}): "
        f"readers selecting a smaller draft vocabulary would pick other tokens. {fix.card()}"
    ]


PRECISION = ("device", "dtype")  # of a compute record: where these differ, no recompute can match
ROUNDING_STEPS = 16  # the tolerance where only the finer fields differ (CPU instructions, GPU model, versions)
# Compute dtypes fine enough for that tolerance: in bf16 (or fp16), 16 steps of a row's largest logit
# are a quarter of it, enough to pass any probability from 0 to twice the live one.
TOLERABLE_DTYPES = ("float32", "float64")


def precision_of(record: dict) -> dict:
    return {key: record[key] for key in PRECISION if key in record}


def differing_fields(recorded: dict, here: dict) -> set[str]:
    """The fields both records hold that differ: older records hold only the device kind and dtype."""
    return {key for key in recorded.keys() & here.keys() if recorded[key] != here[key]}


def comparable_shards(manifest: dict, here: dict) -> dict[str, dict | None]:
    """The shards computed the way this machine computes (device kind and dtype): only there can a
    recompute match. Each maps to None where every field both records hold agrees (compared exactly),
    or to its record where only finer fields differ (another CPU instruction set, GPU model or
    library version) in fp32 compute (compared within `ROUNDING_STEPS`). In bf16 or fp16 compute a
    tolerance for other rounding would hide damage, so such shards are skipped as another device
    kind's are. Shards recorded before the record existed count as computed here. Raises when no
    shard is comparable, rather than reporting every sample as damaged."""
    records = {s["name"]: s.get("compute", here) for s in manifest["shards"]}
    elsewhere = {name: record for name, record in records.items() if differing_fields(record, here) & set(PRECISION)}
    coarse = {
        name: record
        for name, record in records.items()
        if name not in elsewhere and differing_fields(record, here) and here.get("dtype") not in TOLERABLE_DTYPES
    }
    comparable = {
        name: record if differing_fields(record, here) else None for name, record in records.items() if name not in elsewhere | coarse
    }
    if not comparable:
        reasons = [why for why in (another_kind(elsewhere, here), too_coarse(coarse, here)) if why]
        alike = f", with the same {fields_differing(coarse, here)}" if coarse else ""
        raise Eagle3CacheError(
            f"verify --recompute: every shard was computed {'; the others '.join(reasons)}. Run the recompute on the kind "
            f"of machine that built the cache{alike} (the structural checks passed)."
        )
    if elsewhere:
        log.warning(
            "verify --recompute: skipping %d shard(s) computed with %s (this machine computes with %s, which rounds differently): %s",
            len(elsewhere),
            kinds_of(elsewhere),
            json.dumps(precision_of(here), sort_keys=True),
            ", ".join(sorted(elsewhere)),
        )
    if coarse:
        log.warning(
            "verify --recompute: skipping %d shard(s) computed %s: %s", len(coarse), too_coarse(coarse, here), ", ".join(sorted(coarse))
        )
    return comparable


def kinds_of(records: dict[str, dict]) -> str:
    return ", ".join(sorted({json.dumps(precision_of(record), sort_keys=True) for record in records.values()}))


def another_kind(elsewhere: dict[str, dict], here: dict) -> str:
    """Why shards computed on another device kind or in another dtype cannot be compared ('' for none)."""
    if not elsewhere:
        return ""
    return (
        f"with {kinds_of(elsewhere)}, and this machine computes with {json.dumps(precision_of(here), sort_keys=True)}: "
        "another device kind or dtype rounds differently, so no sample could match"
    )


def too_coarse(coarse: dict[str, dict], here: dict) -> str:
    """Why shards computed in bf16 or fp16 on another machine of this kind cannot be compared ('' for none)."""
    if not coarse:
        return ""
    records = ", ".join(sorted({json.dumps(record, sort_keys=True) for record in coarse.values()}))
    return (
        f"on {records}, and this machine is {json.dumps(here, sort_keys=True)} (they differ in {fields_differing(coarse, here)}): "
        f"it may round differently, and in {here['dtype']} a tolerance for that is too coarse to tell rounding from damage, so no "
        "sample can be compared"
    )


def fields_differing(records: dict[str, dict], here: dict) -> str:
    return ", ".join(sorted(set().union(*(differing_fields(record, here) for record in records.values()))))


def tolerance_for(records: dict[str, dict | None], here: dict) -> dict[str, Tolerance]:
    """The tolerance of each shard computed on another machine of this kind (none: compared
    exactly), saying so once."""
    elsewhere = {name: record for name, record in records.items() if record is not None}
    if not elsewhere:
        return {}
    tolerance = Tolerance(ROUNDING_STEPS, torch.finfo(getattr(torch, here["dtype"])).eps)
    log.warning(
        "verify --recompute: %s computed on %s, and this machine is %s: it may round differently, so their samples are "
        "compared within %d rounding steps of %s, not bit for bit (recompute on the build's kind of machine for an exact check)",
        f"data/{next(iter(elsewhere))} was" if len(elsewhere) == 1 else f"{len(elsewhere)} shards ({examples(sorted(elsewhere), 3)}) were",
        ", ".join(sorted({json.dumps(r, sort_keys=True) for r in elsewhere.values()})),
        json.dumps(here, sort_keys=True),
        ROUNDING_STEPS,
        here["dtype"],
    )
    return dict.fromkeys(elsewhere, tolerance)


class ShardRows:
    """Random access to a shard's decoded rows, one row group in memory at a time: lengths and
    loss masks (to rebuild batches) come from two small columns, whole rows only when needed."""

    def __init__(self, path: Path, decode: RowDecoder):
        self.file, self.decode = pq.ParquetFile(path), decode
        small = self.file.read(columns=["num_tokens", "loss_mask"]).to_pylist()
        self.lengths = [{"num_tokens": r["num_tokens"], "num_loss_tokens": sum(r["loss_mask"]), "position": i} for i, r in enumerate(small)]
        sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self.starts = [sum(sizes[:g]) for g in range(len(sizes))]
        self._group, self._rows = None, []

    def row(self, index: int) -> dict:
        group = max(g for g, start in enumerate(self.starts) if start <= index)
        if group != self._group:
            self._group, self._rows = group, self.file.read_row_group(group).to_pylist()
        return self.decode(self._rows[index - self.starts[group]])


def shard_batching(manifest: dict, name: str) -> dict:
    """The batch size, token budget, row-group and sort-window bytes the shard was built with (a resume may have
    changed them); caches recorded before shards carried them: the last run's settings."""
    shard = next(s for s in manifest["shards"] if s["name"] == name)
    build = manifest["build"]
    return shard.get("batching") or {k: build[k] for k in BATCHING_KEYS + OPTIONAL_BATCHING_KEYS if k in build}


def batch_of(manifest: dict, lengths: list[dict], index: int, batching: dict) -> list[int]:
    """Positions (in the shard) of the forward batch that produced row `index` at build time."""
    per_token, per_loss = Layout(**manifest["layout"]).bytes_per_position()
    for window in row_windows(lengths, per_token, per_loss, window_bytes(batching)):
        for batch in plan_batches([r["num_tokens"] for r in window], batching["max_tokens_per_batch"], batching["batch_size"]):
            members = [window[i]["position"] for i in batch]
            if index in members:
                return members
    raise AssertionError(f"row {index} is in no batch")


def compare_live(
    target, manifest: dict, shard: ShardRows, index: int, selected: torch.Tensor, batching: dict, tolerance: Tolerance | None = None
) -> list[str]:
    """Re-encode the live outputs of the sample's batch exactly as the build did, and compare: exactly,
    or within `tolerance` where the shard was computed on another machine of this kind."""
    layout = Layout(**manifest["layout"])
    members = batch_of(manifest, shard.lengths, index, batching)
    member_rows = [shard.row(i) for i in members]
    ids, attention, loss = pad_batch(
        [r["input_ids"].tolist() for r in member_rows],
        [r["loss_mask"].tolist() for r in member_rows],
        manifest["build"]["pad_token_id"],
    )
    dev = target.device
    live = target.supervise(ids.to(target.input_device), attention.to(target.input_device), loss.to(dev), selected)
    encoded = encode_aux(live["aux"], layout.aux_dtype) | encode_targets(layout, live)
    b = members.index(index)
    row = member_rows[b]
    before, n_loss, length = int(loss[:b].sum()), int(loss[b].sum()), row["num_tokens"]
    columns = layout.columns()
    live_row = {
        name: (t[before : before + n_loss] if columns[name]["per"] == "loss" else t[b, :length]).cpu() for name, t in encoded.items()
    }
    if tolerance is None:
        return [f"{key} differs from a live recompute (max abs diff {diff:.3g})" for key, diff in differences(row, live_row)]
    at_loss = loss_rows_of(target, live, b, loss, slice(before, before + n_loss), row["target_argmax"])
    return [
        f"{key} differs from a live recompute by more than {tolerance.steps} rounding steps (max abs diff {diff:.3g}): this "
        "machine may round differently from the one that computed the shard, or the sample is damaged; recompute on the "
        "build's kind of machine to tell"
        for key, diff in tolerant_differences(row, live_row, tolerance, at_loss, columns)
    ]


def differences(stored: dict, live: dict):
    """Exact for fp32 and integers; within one rounding step of a lower-precision float dtype."""
    for key, want in live.items():
        got = stored[key]
        if got.shape != want.shape or got.dtype != want.dtype:
            yield key, float("inf")
            continue
        if want.dtype == torch.float32 or not want.is_floating_point():
            if not torch.equal(got, want):
                yield key, (got.double() - want.double()).abs().max().item()
            continue
        eps = torch.finfo(want.dtype).eps
        diff = (got.float() - want.float()).abs()
        if (diff > eps * want.float().abs() + 1e-30).any():
            yield key, diff.max().item()


class LossRows(NamedTuple):
    """What tells near-ties from wrong ids at the sample's loss rows (`[n]` each unless said, fp32, on
    the host): the live draft probabilities `[n, Vd]`, the largest live logit magnitude, and the
    live logits of the stored and of the live argmax."""

    probs: torch.Tensor
    logit_scale: torch.Tensor
    stored_argmax_logit: torch.Tensor
    live_argmax_logit: torch.Tensor


@torch.inference_mode()
def loss_rows_of(target, live: dict, b: int, loss: torch.Tensor, rows: slice, stored_argmax: torch.Tensor) -> LossRows:
    """Row `b`'s LossRows, its logits taken chunk by chunk as the build takes them (never all `[n, V]` at once)."""
    from .supervision import HEAD_CHUNK_ROWS, logit_chunks

    hidden = live["final_hidden"][b][loss[b].bool().to(target.device)]
    live_argmax = live["argmax"][rows].to(target.device)
    stored = (
        stored_argmax.to(target.device).long().clamp(0, target.vocab_size - 1) if stored_argmax.shape == live_argmax.shape else live_argmax
    )
    ids = torch.stack([stored, live_argmax], 1)
    scale, at_ids = [], []
    for k, logits in enumerate(logit_chunks(hidden, target.head, target.transform)):
        scale.append(logits.abs().amax(-1).float())
        at_ids.append(logits.gather(1, torch.nn.functional.pad(ids[k * HEAD_CHUNK_ROWS :], (0, 0, 0, HEAD_CHUNK_ROWS))[:HEAD_CHUNK_ROWS]))
    n = hidden.shape[0]
    scale_all = torch.cat(scale)[:n].cpu() if scale else torch.zeros(0)
    logits_at = torch.cat(at_ids)[:n].float().cpu() if at_ids else torch.zeros(0, 2)
    return LossRows(live["probs"][rows].float().cpu(), scale_all, logits_at[:, 0], logits_at[:, 1])


LOG_SPACE = ("topk_logprobs", "log_draft_mass")  # loss-row columns a logit error moves by itself, not by its multiple
PROBABILITY_ROWS = ("target_probs",)  # loss-row columns whose rows are distributions (a softmax: mass 1 however the logits move)


@dataclass(frozen=True)
class Tolerance:
    """Where a shard was computed on another machine of this kind, its sums ran in other orders, and
    each value may differ by `steps` rounding steps (`eps`, of the compute dtype) of what it was
    computed from: hidden states by steps of their token's largest magnitude; what the logits give
    (probabilities, log-probabilities, ids) by steps of the row's largest logit. Each stored value
    may also have rounded to its stored dtype on the other side of a step. Ids may trade places
    only on a near-tie of their logits. A bound relative to a row's largest logit grows with it, so
    each probability row's mass is held to the rounding of its sum as well: no logit moves it."""

    steps: int
    eps: float

    def logit_slack(self, at_loss: LossRows) -> torch.Tensor:
        """How far `[n]` a row's log-probabilities may move: two logits' worth (a value and the row's normaliser)."""
        return 2 * self.steps * self.eps * at_loss.logit_scale

    def spread(self, want: torch.Tensor, slack: torch.Tensor | None, log_space: bool) -> torch.Tensor:
        """How far the compute may have moved each value: `slack` None for hidden states (and other
        per-token values), each token by its own largest magnitude: one far larger (as a first token's
        often is) would otherwise hide the others' damage."""
        if slack is None:
            return self.steps * self.eps * (want.abs().amax(-1, keepdim=True) if want.dim() > 1 else want.abs())
        slack = slack.reshape(-1, *[1] * (want.dim() - 1))
        if log_space:
            return slack
        return slack * want.abs() + self.steps * self.eps * want.abs().amax(-1, keepdim=True)  # p moves by p times log p's error

    @staticmethod
    def exceeds(got: torch.Tensor, want: torch.Tensor, spread: torch.Tensor, stored_dtype: torch.dtype) -> torch.Tensor:
        info = torch.finfo(stored_dtype)
        step = info.eps * torch.maximum(got.abs(), want.abs()).clamp(min=info.smallest_normal)
        return (got - want).abs() > step + spread

    def mass_differs(self, got: torch.Tensor, want: torch.Tensor, stored_dtype: torch.dtype) -> torch.Tensor:
        """Probability rows `[n]` whose mass differs from the live row's by more than rounding: the
        normaliser's sum of `Vd` terms may round by a step per term in any order, and each stored
        value by a step of its stored dtype."""
        got_mass, want_mass = got.double().sum(-1), want.double().sum(-1)
        rounding = ((want.shape[-1] + self.steps) * self.eps + torch.finfo(stored_dtype).eps) * want_mass
        return (got_mass - want_mass).abs() > rounding

    def argmax_not_tied(self, got: torch.Tensor, want: torch.Tensor, at_loss: LossRows) -> torch.Tensor:
        """Argmaxes that differ where the live logits of the two ids are not near-tied."""
        return (got != want) & (at_loss.stored_argmax_logit < at_loss.live_argmax_logit - self.logit_slack(at_loss))

    def topk_not_tied(self, got: torch.Tensor, want: torch.Tensor, stored_values: torch.Tensor, at_loss: LossRows) -> torch.Tensor:
        """Top-k ids that differ other than by near-tied ids trading places (or in and out at the k-th):
        each stored id's stored log-probability must match its live one, and an id in only one of the
        two sets must lie within the slack of the live k-th value."""
        logprobs = at_loss.probs.clamp(min=torch.finfo(torch.float32).tiny).log()  # as the build took them
        slack = self.logit_slack(at_loss)[:, None]
        known = (got >= 0) & (got < logprobs.shape[1])
        got, want = got.long().clamp(0, logprobs.shape[1] - 1), want.long()
        kth = logprobs.gather(1, want[:, -1:])
        of_stored, of_live = logprobs.gather(1, got), logprobs.gather(1, want)
        only_stored = ~(got[:, :, None] == want[:, None, :]).any(-1)
        only_live = ~(want[:, :, None] == got[:, None, :]).any(-1)
        value_differs = self.exceeds(stored_values.float(), of_stored, slack, stored_values.dtype)
        return ~known | value_differs | (only_stored & (of_stored < kth - slack)) | (only_live & (of_live > kth + slack))


def tolerant_differences(stored: dict, live: dict, tolerance: Tolerance, at_loss: LossRows, columns: dict):
    """As `differences`, within `tolerance` (see Tolerance)."""
    for key, want in live.items():
        got = stored[key]
        if got.shape != want.shape or got.dtype != want.dtype:
            yield key, float("inf")
            continue
        if want.numel() == 0:
            continue
        if want.is_floating_point():
            slack = tolerance.logit_slack(at_loss) if columns[key]["per"] == "loss" else None
            spread = tolerance.spread(want.float(), slack, key in LOG_SPACE)
            beyond = tolerance.exceeds(got.float(), want.float(), spread, want.dtype)
            if key in PROBABILITY_ROWS:
                beyond = beyond | tolerance.mass_differs(got.float(), want.float(), want.dtype)[:, None]
        elif key == "target_argmax":
            beyond = tolerance.argmax_not_tied(got, want, at_loss)
        elif key == "topk_ids":
            beyond = tolerance.topk_not_tied(got, want, stored["topk_logprobs"], at_loss)
        else:
            beyond = got != want
        if beyond.any():
            yield key, (got.double() - want.double()).abs().max().item()
