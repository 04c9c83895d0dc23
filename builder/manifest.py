"""The manifest: everything that shapes a cache's bytes (its identity, fingerprinted) plus what
the build produced. It lives in the dataset card's YAML under `eagle3_cache`.

Here it is assembled (from the build's records), read back from a card (text, local folder or
Hub repo), fingerprinted and checked against the format version this package reads; a card whose
front matter is damaged (cut short, or its YAML broken) is told from one that is not a cache's.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dataset_card.render import BOM, data_prefix, reads_all_shards

from .errors import Eagle3CacheError
from .files import file_hash
from .formats import merge_quality, quality_report
from .repair import LOCAL, Repair
from .shards import CHECKSUM_ALGORITHM, SCALAR_COLUMNS, column_encodings
from .source import CacheSource, open_source
from .vocab import vocab_coverage

if TYPE_CHECKING:
    from .formats import Layout
    from .prepare import Prepared

FORMAT_VERSION = 2  # 2: column encodings (byte planes + zstd) and xxh3-128 checksums; 1: raw columns, sha256
VOCAB_FILE = "vocab/vocab.safetensors"
LM_HEAD_FILE = "vocab/lm_head.safetensors"  # `hidden` caches: the target's head rows
CARD_KEY = "eagle3_cache"  # the manifest's key in the card's YAML
INDEX_KEY = "eagle3_cache_index"  # a root card listing caches in sub-folders


class ManifestError(Eagle3CacheError, ValueError):
    """A card holds no manifest this package can read."""


class CardNotFound(Eagle3CacheError, FileNotFoundError):
    """No card where a cache's should be (a path that is no cache, an interrupted build or push);
    still a FileNotFoundError for callers that catch that."""


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def recorded_checksum(manifest: dict, record: dict) -> tuple[str, str]:
    """(algorithm, hex digest) the manifest records for a file (shard, vocab or head rows);
    caches of format version 1 recorded sha256 under that name."""
    algorithm = manifest.get("checksum_algorithm", "sha256")
    return algorithm, record["checksum"] if "checksum" in record else record[algorithm]


# ---- assembling (the build) ---------------------------------------------------------------


def library_versions() -> dict:
    import accelerate
    import datasets
    import huggingface_hub
    import pyarrow
    import torch
    import transformers

    from . import __version__

    mods = {
        "torch": torch,
        "transformers": transformers,
        "datasets": datasets,
        "huggingface_hub": huggingface_hub,
        "accelerate": accelerate,
        "pyarrow": pyarrow,
    }
    versions = {"eagle3_cache": __version__, "python": platform.python_version(), **{k: str(m.__version__) for k, m in mods.items()}}
    return versions | tokenizing_versions()


def tokenizing_versions() -> dict:
    """What tokenizes an input row besides the tokenizer's and chat template's files (the identity
    pins those): this package's conversation rules and tokenizing code (their source's hash), and
    the libraries that render templates and encode text. `verify --recompute` calls a sample whose
    tokens differ from its input row's damaged only where all of them are the build's."""
    import jinja2
    import tokenizers
    import transformers

    from . import __version__
    from .tokenize import TOKENIZE_CODE_VERSION

    return {
        "eagle3_cache": __version__,
        "tokenize_code": TOKENIZE_CODE_VERSION,
        "transformers": str(transformers.__version__),
        "tokenizers": str(tokenizers.__version__),
        "jinja2": str(jinja2.__version__),
    }


def column_specs(prep: Prepared) -> dict:
    return layout_column_specs(prep.layout, prep.cfg.compression)


def layout_column_specs(layout: Layout, compression: str) -> dict:
    """Every column's Arrow type; tensor columns also their dtype, inner shape, what they are per and
    how their values are encoded (shards.encode_value)."""
    specs = {name: {"arrow": str(arrow_type)} for name, arrow_type in SCALAR_COLUMNS.items()}
    encodings = column_encodings(layout, compression)
    for name, spec in layout.columns().items():
        specs[name] = {"arrow": "binary", **spec, "byte_order": "little", "encoding": encodings[name]}
    return specs


def head_files(out: Path, prep: Prepared) -> dict:
    """`hidden` caches: where the head rows are, and the logit transform a reader must apply."""
    if prep.cfg.target_format != "hidden":
        return {}
    from safetensors import safe_open

    from .target import head_spec

    with safe_open(str(out / LM_HEAD_FILE), "pt") as head:
        has_bias = "bias" in head.keys()
    return {
        "lm_head_file": {"path": LM_HEAD_FILE, "checksum": file_hash(out / LM_HEAD_FILE, CHECKSUM_ALGORITHM)},
        "head_transform": head_spec(prep.model_config, lm_head_bias=has_bias),
    }


def merged_quality(shards: list[dict]) -> dict:
    merged: dict = {}
    for shard in shards:
        merged = merge_quality(merged, shard.get("quality", {}))
    return quality_report(merged)


SHARD_FIELDS = ("name", "rows", "bytes", "checksum", "tokens", "loss_tokens", "argmax_in_vocab", "batching", "compute")


def assemble_manifest(out: Path, prep: Prepared, sidecars: list[dict], ranks: list[dict] | None = None) -> dict:
    # Per-shard records stay small (a card with thousands of shards must parse fast); quality
    # histograms and failures are merged once below.
    shards = [{k: s[k] for k in SHARD_FIELDS if k in s} for s in sidecars]  # `batching`, `compute`: absent in older records
    tokens = sum(s["tokens"] for s in shards)
    loss_tokens = sum(s["loss_tokens"] for s in shards)
    return {
        "identity": prep.identity,
        "fingerprint": fingerprint(prep.identity),
        "columns": column_specs(prep),
        "target_vocab_size": prep.vocab_size,
        "hidden_size": prep.hidden_size,
        "layout": asdict(prep.layout),
        "special_token_ids": list(prep.special_token_ids),
        "checksum_algorithm": CHECKSUM_ALGORITHM,  # of every file checksum below (shards, vocab, head rows)
        "vocab_file": {"path": VOCAB_FILE, "checksum": file_hash(out / VOCAB_FILE, CHECKSUM_ALGORITHM)},
        **head_files(out, prep),
        "quality": merged_quality(sidecars),  # measured against the live target during the build
        "shards": shards,
        "totals": {
            "samples": sum(s["rows"] for s in shards),
            "tokens": tokens,
            "loss_tokens": loss_tokens,
            "bytes": sum(s["bytes"] for s in shards),
            "bytes_per_token": bytes_per_token(shards),
            "argmax_coverage": argmax_coverage(shards),
            "token_coverage": vocab_coverage(prep.token_counts, prep.selected_token_ids),
        },
        # the Hub dataset commit this run read (null for local input): informational, the identity hashes the data files
        "input_revision": prep.input_revision,
        "skipped": prep.skipped,
        "duplicate_ids": prep.duplicate_ids,  # kept: source_index is the stable key
        "failed": [failure for shard in sidecars for failure in shard.get("failed", [])],  # e.g. non-finite outputs
        "build": {
            "batch_size": prep.cfg.batch_size,
            "max_tokens_per_batch": prep.cfg.token_budget,
            "row_group_bytes": prep.cfg.row_group_bytes,
            "sort_window_bytes": prep.cfg.sort_window_bytes,
            "pad_token_id": prep.tokenizer.pad_token_id if prep.tokenizer.pad_token_id is not None else 0,
            "ranks": ranks or [],  # per-rank work of the last run; the content does not depend on it
        },
        "versions": library_versions(),
    }


def argmax_in_vocab(argmax: np.ndarray, loss_rows: list[int], in_vocab: np.ndarray) -> list[int]:
    """Each sample's `argmax_in_vocab` count: its loss rows whose target argmax is in the draft vocabulary.
    `argmax`: the samples' loss rows' target argmax ids, sample after sample; `loss_rows`: each sample's
    number of them; `in_vocab`: a bool per target token id. One pass over them all, not one small op per
    sample (the build counts a whole batch at once, verify a stored row)."""
    hits = np.concatenate(([0], np.cumsum(in_vocab[argmax], dtype=np.int64)))
    ends = np.cumsum(loss_rows, dtype=np.int64)
    return (hits[ends] - hits[ends - np.asarray(loss_rows, dtype=np.int64)]).tolist()


def bytes_per_token(shards: list[dict]) -> float:
    """The shards' bytes per token, over their records."""
    tokens = sum(s["tokens"] for s in shards)
    return sum(s["bytes"] for s in shards) / tokens if tokens else 0.0


def argmax_coverage(shards: list[dict]) -> float:
    """The share of loss tokens whose target argmax is in the draft vocabulary, over the shards' records."""
    loss_tokens = sum(s["loss_tokens"] for s in shards)
    return sum(s["argmax_in_vocab"] for s in shards) / loss_tokens if loss_tokens else 0.0


# ---- reading (from a card) ------------------------------------------------------------------


def card_data_of(text: str, where: str = "the card") -> dict:
    """The YAML front matter of a dataset card's text, as a dict (empty when it has none).
    Front matter that is not a YAML mapping is a ManifestError naming `where` and the line."""
    import yaml
    from huggingface_hub import DatasetCard

    try:  # a leading byte-order mark (some editors save one) would hide the front matter
        return DatasetCard(text.removeprefix("\ufeff")).data.to_dict()
    except TypeError:  # huggingface_hub passes the top-level keys as keyword names: one that is no text
        raise ManifestError(
            f"{where}: expected YAML front matter whose keys are text, found it {front_matter_damage(text)}; "
            "the card was edited or is not eagle3-cache's: restore it, or rebuild the cache"
        ) from None
    except (yaml.YAMLError, ValueError) as err:
        # YAML builds some values itself and raises ValueError for one that cannot be (a date like 2024-02-30)
        if isinstance(err, yaml.YAMLError) or front_matter_damage(text) is not None:
            raise ManifestError(
                f"{where}: expected YAML front matter between '---' lines, found text YAML cannot parse "
                f"({_yaml_problem(text, err)}); the card was edited or is not eagle3-cache's: restore it, or rebuild the cache"
            ) from None
        raise ManifestError(  # YAML, but not a mapping
            f"{where}: expected the front matter to be a YAML mapping ({err}); restore the card, or rebuild the cache"
        ) from None


def _yaml_problem(text: str, err: Exception) -> str:
    """What YAML found wrong, at its line of the card (the front matter starts after the first '---')."""
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    match = REGEX_YAML_BLOCK.search(text)
    if mark is None or match is None:
        return problem
    return f"line {match.group(1).count(chr(10)) + mark.line + 1}: {problem}"


def front_matter_damage(text: str) -> str | None:
    """How a card's YAML front matter (where the manifest lives) is damaged, in words: it begins but is
    never closed (a card cut short), or it does not parse (a hand edit); None where it reads, or the
    card has none."""
    import yaml
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    text = text.removeprefix(BOM)  # as card_data_of reads it
    if not re.match(r"\s*---\s*$", text.split("\n", 1)[0]):
        return None
    block = REGEX_YAML_BLOCK.search(text)
    if block is None:
        return "begins but is never closed (a line holding only ---)"
    try:
        data = yaml.safe_load(block.group(2))
    except (yaml.YAMLError, ValueError) as err:  # ValueError: a value YAML cannot build, as the date 2024-02-30
        return f"does not parse ({yaml_error_in_words(err, first_line=block.group(1).count(chr(10)) + 1)})"
    odd_keys = keys_not_text(data)
    return None if odd_keys is None else f"holds {odd_keys}"


def keys_not_text(data) -> str | None:
    """In words, the top-level keys of front matter that YAML reads as no text (`2024:`, `true:`, `null:`), which no
    reader of cards takes (huggingface_hub passes them as keyword names); None where there are none."""
    import yaml

    odd = [key for key in data if not isinstance(key, str)] if isinstance(data, dict) else []
    if not odd:
        return None
    as_written = [yaml.safe_dump(key).splitlines()[0] for key in odd]  # 2024-01-01, not datetime.date(2024, 1, 1)
    return f"top-level keys that are not text ({', '.join(as_written)}: quote such a key)"


def yaml_error_in_words(err: Exception, first_line: int) -> str:
    """What YAML found wrong with a card's front matter, at its line in the card (YAML counts from the front
    matter's first line, `first_line` of the card)."""
    what = ": ".join(part for part in (getattr(err, "context", None), getattr(err, "problem", None)) if part)
    mark = getattr(err, "problem_mark", None)
    if not what or mark is None:
        return " ".join(str(err).split())
    return f"{what}, at line {first_line + mark.line} of the card"


def refuse_damaged_front_matter(text: str, where: str, fix: Repair = LOCAL, root: bool = True) -> None:
    """A card whose YAML front matter (where the manifest lives) begins but is never closed or does not parse was
    cut short or edited: say so, where (`where` names the card), and how to restore it (`fix`), rather than call it
    not a cache's. `root`: the card is the repo's root card (a cache's or the index), not a config's."""
    damage = front_matter_damage(text)
    if damage is not None:
        advice = fix.damaged_card(push_recognises(text, root), root, index=damaged_card_key(text) == INDEX_KEY)
        raise ManifestError(f"{where} is damaged: its YAML front matter, which holds the manifest, {damage}{advice}")


def push_recognises(text: str, root: bool) -> bool:
    """Whether a push can tell a damaged card is eagle3-cache's, and so writes it again: by the key of a cache's or
    index card it still shows with only YAML lines above it (`damaged_card_key`); a config's card (`root` False) also
    where its front matter is never closed, as what is left then reads as no front matter at all, in the folder the
    root index lists as the config's. Any other card a push takes for another dataset's, and never replaces."""
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    never_closed = REGEX_YAML_BLOCK.search(text.removeprefix(BOM)) is None
    return damaged_card_key(text) is not None or (not root and never_closed)


def damaged_card_key(text: str) -> str | None:
    """CARD_KEY (a cache's card) or INDEX_KEY (a repo's index card) for a card of eagle3-cache's whose
    front matter is damaged (`front_matter_damage`), by the key that front matter still holds: such a
    card cannot be another dataset's, so a push may write it again. None for a card whose front matter
    reads, and for a damaged one holding neither key (cut short before it, or someone else's)."""
    if front_matter_damage(text) is None:
        return None
    keys = {key for _, key in yaml_shaped_keys(text)}
    return next((key for key in (INDEX_KEY, CARD_KEY) if key in keys), None)


# A top-level key line of YAML front matter: a plain or quoted key at the line's start, then `:`
TOP_LEVEL_KEY = re.compile(r"""^(?:(?P<plain>[A-Za-z0-9_][\w.-]*)|"(?P<double>[^"\n]*)"|'(?P<single>[^'\n]*)')[ \t]*:(?:[ \t]|$)""")
# Any other line of YAML as eagle3-cache writes it: blank, indented (a nested value), or a list item
OTHER_YAML_LINE = re.compile(r"^(?:[ \t]|-(?:[ \t]|$)|$)")


def front_matter_lines(text: str) -> list[tuple[int, str]]:
    """(line number in the card, line) of a card's front matter, read as lines (it need not parse): those
    after the opening `---` down to the closing one, or to the end of a card cut short before it; none
    where the card has no front matter."""
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    text = text.removeprefix(BOM)
    if not re.match(r"\s*---\s*$", text.split("\n", 1)[0]):
        return []
    block = REGEX_YAML_BLOCK.search(text)
    first, lines = (block.group(1).count("\n") + 1, block.group(2).split("\n")) if block else (2, text.split("\n")[1:])
    return [(first + i, line.rstrip("\r")) for i, line in enumerate(lines)]


def top_level_key(line: str) -> str | None:
    match = TOP_LEVEL_KEY.match(line)
    return None if match is None else next(key for key in match.group("plain", "double", "single") if key is not None)


def front_matter_keys(text: str) -> list[tuple[int, str]]:
    """(line in the card, key) of every top-level key line of a card's front matter, read as lines."""
    return [(number, key) for number, line in front_matter_lines(text) if (key := top_level_key(line)) is not None]


def yaml_shaped_keys(text: str) -> list[tuple[int, str]]:
    """(line in the card, key) of the top-level keys of a card's front matter, down to its first line not
    shaped as YAML is written in a card (a top-level `key:`, an indented line, a `- ` list item, a blank
    line). A heading, prose, a code fence, a comment or a marker there is a README's own text below a
    `---` rule that merely opens it, so no key shown after it (in a code block, say) is the card's."""
    keys = []
    for number, line in front_matter_lines(text):
        key = top_level_key(line)
        if key is None and not OTHER_YAML_LINE.match(line):
            break
        if key is not None:
            keys.append((number, key))
    return keys


def card_shard_pattern(text: str, where: str = "the card") -> str:
    """The file-name pattern the card's `data_files` reads its shards by (`train-*-of-00004.parquet`);
    cards written before the shard count was in it read every `train-*`. The pattern eagle3-cache wrote
    wins over a config a user added (listed first, one of a single shard would leave the others unread)."""
    configs = card_data_of(text, where).get("configs")
    paths = []
    for config in configs if isinstance(configs, list) else []:  # not a list: an edited card, refused by `datasets`
        files = config.get("data_files") if isinstance(config, dict) else None
        for entry in files if isinstance(files, list) else []:
            if isinstance(entry, dict) and entry.get("split") == "train" and isinstance(entry.get("path"), str):
                paths.append(entry["path"])
    ours = [path for path in paths if reads_all_shards(path, prefix=path.rpartition("data/")[0])]
    return (ours or paths or ["train-*"])[0].rsplit("/", 1)[-1]


def manifest_from_card(text: str, where: str = "the card", folder: str | Path | None = None) -> dict:
    """The manifest a card's text holds, checked to be of a format version this package reads.
    `where` names the card in errors; `folder`: the local directory the card is in (None: a Hub repo's)."""
    data = card_data_of(text, where)
    if CARD_KEY not in data:
        if data.get(INDEX_KEY):
            raise ManifestError(f"{where} holds several caches: {how_to_pick(sorted(data[INDEX_KEY]), folder)}")
        raise ManifestError(f"{where} has no '{CARD_KEY}' manifest block; it is not an eagle3-cache dataset card")
    manifest = data[CARD_KEY]
    check_manifest_shape(manifest, where)
    check_format_version(manifest, where)
    return manifest


def check_manifest_shape(manifest, where: str = "the card") -> None:
    """Refuse a manifest block, or its identity, that a hand edit left no mapping: the first `.get` on it would
    fail with an AttributeError. The parts inside are checked where they are read (verify names each one)."""
    for part, value in (
        ("'eagle3_cache' block", manifest),
        ("identity", manifest.get("identity", {}) if isinstance(manifest, dict) else {}),
    ):
        if not isinstance(value, dict):
            raise ManifestError(
                f"{where}: expected its {part} to be a mapping, found {type(value).__name__} {value!r:.60}; "
                "the card was edited: restore the card, or rebuild the cache"
            )


def how_to_pick(names: list[str], folder: str | Path | None) -> str:
    """How to pick one of the caches of a repo or directory holding several. A directory's are its sub-folders,
    each a cache of its own, which every command takes (push has no --name)."""
    by_name = f"pass one of {names} as --name (name= in Python)"
    if folder is None:
        return by_name
    return f"pass one of its sub-folders as the directory ({Path(folder) / names[0]}), or, to verify, export or load_cache, {by_name}"


def check_format_version(manifest: dict, where: str = "the cache") -> None:
    """Refuse a manifest written by a newer eagle3-cache (its files may be encoded in ways this one
    cannot decode) or one with no version at all."""
    version = manifest.get("identity", {}).get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ManifestError(
            f"{where}: expected identity.format_version to be a positive integer, found {version!r}; "
            "the manifest was edited or is not eagle3-cache's: rebuild the cache"
        )
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"{where}: the cache has format version {version}, newer than the {FORMAT_VERSION} this eagle3-cache reads; "
            "upgrade eagle3-cache to read it"
        )


def read_manifest(location: str | Path, *, revision: str | None = None, name: str | None = None, token: str | None = None) -> dict:
    """The manifest of a cache: a local folder, or a Hub repo id at `revision` (config `name`)."""
    source = location if isinstance(location, CacheSource) else open_source(location, revision=revision, name=name, token=token)
    return manifest_of(source)


def _no_card(source: CacheSource) -> str:
    """Why there is no card, and what to do: a local path that is no directory says so first."""
    if not source.on_hub and not Path(source.location).is_dir():
        found = "is not a directory" if Path(source.location).exists() else "does not exist"
        return f"the path {found}; expected a finished eagle3-cache directory: check the path"
    return f"no {source.prefix}README.md; {_why_no_card(source)}"


def caches_in_sub_folders(folder: Path) -> str | None:
    """What to do with a directory with no card of its own whose sub-folders hold caches (caches built one by
    one into OUT/a, OUT/b): each is a cache of its own, to pass as the directory. None: it holds none."""
    try:
        cards = sorted(sub / "README.md" for sub in folder.iterdir() if (sub / "README.md").is_file())
        names = [card.parent.name for card in cards if f"{CARD_KEY}:" in card.read_text(encoding="utf-8", errors="replace")]
    except OSError:
        return None
    if not names:
        return None
    return f"its sub-folders {names} hold caches of their own: pass one of them as the directory ({folder / names[0]})"


def _why_no_card(source: CacheSource) -> str:
    unoffered = config_not_offered(source) or config_card_missing(source) if source.name is not None else None
    if unoffered:
        return unoffered
    if not source.on_hub and source.name is None:
        return caches_in_sub_folders(Path(source.location)) or unfinished_cache(on_hub=False)
    return unfinished_cache(source.on_hub)


def unfinished_cache(on_hub: bool) -> str:
    """Why a cache has no card where it should, and what to do: the card is written last, and pushed last."""
    if not on_hub:
        return (
            "expected a finished eagle3-cache directory (the card is written last, so an interrupted build has none: "
            "resume it with --resume)"
        )
    return (
        "the card is pushed last, so a push that stopped partway has none: re-run the push (it resumes), "
        "or read the branch or tag of a finished one with --revision (revision= in Python)"
    )


def config_not_offered(source: CacheSource) -> str | None:
    """Why the repo or directory `source` names a config of does not hold it, by its root card (the
    index `datasets` finds a config by), and what to pass instead; None where the card lists it."""
    holder = "repo" if source.on_hub else "directory"
    root_data = _root_card_data(source)
    index = root_data.get(INDEX_KEY) or {}
    if index and source.name not in index:
        return f"the {holder} holds the caches {sorted(index)}, not {source.name!r}: pass one of them as --name (name= in Python)"
    if CARD_KEY in root_data:
        if not data_prefix(source.name):  # `default` names the config at the root: this cache
            return None
        return f"the {holder} holds one cache, at its root, and no configs: leave out --name {source.name} (name= in Python)"
    if not index and not source.on_hub:  # caches copied side by side into a folder
        cache = Path(source.location) / source.name
        named = f" ({cache})" if (cache / "README.md").is_file() else ""
        return (
            f"{source.location} has no index card (a README.md listing its caches under '{INDEX_KEY}', as a repo holding "
            f"several has) to pick a config by: pass the cache's own directory{named} and no --name (name= in Python)"
        )
    return None


def config_card_missing(source: CacheSource) -> str | None:
    """Why the root index lists config `source.name` though its folder has no card, and what to do; None where
    the index does not list it."""
    index = _root_card_data(source).get(INDEX_KEY)
    if not isinstance(index, dict) or source.name not in index:
        return None
    index_card = "README.md" if source.on_hub else str(Path(source.location) / "README.md")  # the message names the repo first
    return listed_config_without_card(index_card, source.name, _repair_of(source))


def listed_config_without_card(index_card: str, name: str, fix: Repair = LOCAL) -> str:
    """The index card `index_card` lists config `name`, whose folder has no card: a build of it interrupted, a
    folder copied in part, or a card removed since; the missing card is named by the caller."""
    return f"the index card {index_card} lists the config {name!r}, whose card is missing: {fix.missing_config_card()}"


def refuse_damaged_root_card(source: CacheSource) -> None:
    """Once `datasets` refused to open config `source.name`: the root card it finds configs by, refused as damaged
    where it is (`refuse_damaged_index`). Read only then, so that a load that opens costs no extra download."""
    text = _root_card_text(source)
    if text is not None:
        refuse_damaged_index(text, _root_card_where(source), source.name, _repair_of(source))


def refuse_damaged_index(text: str, where: str, name: str, fix: Repair = LOCAL) -> None:
    """A root card that fails to offer config `name` to `datasets` for damage: its front matter cut short or broken
    (`refuse_damaged_front_matter`), or its `configs`, by which `datasets` opens a config, not listing one its index
    lists (removed or edited by hand). An intact card that does not list `name` is no damage (`config_not_offered`)."""
    refuse_damaged_front_matter(text, where, fix, root=True)
    data = card_data_of(text, where)
    index = data.get(INDEX_KEY)
    if isinstance(index, dict) and name in index and name not in configs_offered(data):
        raise ManifestError(
            f"{where} is damaged: its configs, by which `datasets` opens a config, list no {name!r}, though its index "
            f"({INDEX_KEY}) lists it{fix.damaged_card(root=True, index=True)}"
        )


def configs_offered(data: dict) -> set:
    """The config names a card's `configs` offer to `datasets`."""
    configs = data.get("configs")
    return {config.get("config_name") for config in configs if isinstance(config, dict)} if isinstance(configs, list) else set()


def _root_card_data(source: CacheSource) -> dict:
    """The YAML of the root card of the repo or directory (the index of one holding several caches);
    empty where there is none."""
    text = _root_card_text(source)
    return {} if text is None else card_data_of(text, f"the root card of {source.location}")


def _root_card_text(source: CacheSource) -> str | None:
    try:
        root = source.repo_file("README.md") if source.on_hub else Path(source.location) / "README.md"
        return root.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def _root_card_where(source: CacheSource) -> str:
    """The root card, as errors name it."""
    return f"{source.location}@{source.commit[:12]}: README.md" if source.on_hub else str(Path(source.location) / "README.md")


def _repair_of(source: CacheSource) -> Repair:
    return Repair(source.location, source.revision, source.name) if source.on_hub else LOCAL


def manifest_of(source: CacheSource) -> dict:
    try:
        card_path = source.file("README.md")
    except FileNotFoundError:
        card_path = None
    if card_path is None or not card_path.exists():
        raise CardNotFound(f"{source.describe()}: {_no_card(source)}")
    folder = None if source.on_hub else source.location
    text = card_path.read_text(encoding="utf-8")
    fix = _repair_of(source)
    refuse_damaged_front_matter(text, f"{source.describe()}: {source.prefix}README.md", fix, root=not source.prefix)
    return manifest_from_card(text, f"the card of {source.describe()}", folder)
