"""Pure functions from a manifest to the card's metadata and text.

A repo holds one cache at its root (config `default`, the same layout as on local disk), or
several in sub-folders, one config each: then the root card is an index listing them
(`configs` for `datasets`, `eagle3_cache_index` for people and tools) and each cache's full
manifest lives in the card of its own folder.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).with_name("template.md")
INDEX_TEMPLATE_PATH = Path(__file__).with_name("index_template.md")
DEFAULT_CONFIG = "default"
TAGS = ["eagle3", "speculative-decoding", "eagle3-cache"]
# The front-matter keys eagle3-cache writes (`tags`: its own, beside any others); every other key is a user's
GENERATED_KEYS = ("configs", "dataset_info", "tags", "eagle3_cache", "eagle3_cache_index")
# The body between these markers is written again at every build and push; text above or below them is kept
GENERATED_START = (
    "<!-- eagle3-cache generated start: the text down to the end marker is written again at every build and push. "
    "Write your own above or below the two markers: it is kept. -->"
)
GENERATED_END = "<!-- eagle3-cache generated end -->"
_START_RE = re.compile(r"<!-- eagle3-cache generated start\b.*?-->", re.S)
_END_RE = re.compile(r"<!-- eagle3-cache generated end\b.*?-->", re.S)


@dataclass(frozen=True)
class UserParts:
    """What people added to a card, kept when eagle3-cache writes it again: the front-matter keys it
    does not write (`tags`: only those beyond its own), and the text above and below the generated
    body's markers (None: none known, as in a new card or one written before the markers), and the
    `configs` entries it does not write (a user's config of their own: a subset of the shards, say)."""

    keys: dict = field(default_factory=dict)
    above: str | None = None
    below: str | None = None
    configs: list = field(default_factory=list)

    def tags(self) -> list:
        return list(self.keys.get("tags", []))


BOM = "\ufeff"  # an editor's byte-order mark: before it, the card's front matter is not found


def user_parts(text: str, where: str = "the card written again") -> UserParts:
    """The user's parts of a card's text (an eagle3-cache card, a cache's or an index); `where`
    names the card in a warning about text that cannot be kept."""
    from huggingface_hub import DatasetCard

    card = DatasetCard(text.removeprefix(BOM))
    return UserParts(users_keys(card.data.to_dict()), *user_text(card.text, where), configs=users_configs(card.data.to_dict()))


def users_keys(data: dict) -> dict:
    """The front-matter keys eagle3-cache does not write, with the tags beyond its own."""
    keys = {key: value for key, value in data.items() if key not in GENERATED_KEYS}
    tags = _unique(_as_list(data.get("tags")), exclude=TAGS)
    if tags:
        keys["tags"] = tags
    return keys


def users_configs(data: dict) -> list:
    """The `configs` entries of a card's front matter that hold something a user added: an entry eagle3-cache
    does not write (one it writes is named in its index, or reads all of a cache's shards, `reads_all_shards`,
    as the one entry of a cache's card does), or one it writes given settings of theirs (`default: true`)."""
    configs, index = data.get("configs"), data.get("eagle3_cache_index")
    listed = index if isinstance(index, dict) else {}
    return [
        config
        for config in (configs if isinstance(configs, list) else [])
        if isinstance(config, dict) and isinstance(config.get("config_name"), str)
        if not _written_by_us(config, listed) or set(config) - {"config_name", "data_files"}
    ]


def _written_by_us(config: dict, listed=()) -> bool:
    return config["config_name"] in listed or _generated_files(config["config_name"], config.get("data_files"))


def _generated_files(name: str, data_files) -> bool:
    """Whether `data_files` are those `_config_yaml` writes for config `name`, in its own card or the index."""
    if not (isinstance(data_files, list) and len(data_files) == 1 and isinstance(data_files[0], dict)):
        return False
    path = data_files[0].get("path")
    return (
        data_files[0].get("split") == "train" and isinstance(path, str) and any(reads_all_shards(path, p) for p in ("", data_prefix(name)))
    )


def body_below_front_matter(text: str) -> str:
    """A card's text below its front matter, split off unread (all of it where the front matter is never closed)."""
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    text = text.removeprefix(BOM)
    front_matter = REGEX_YAML_BLOCK.search(text)
    return text[front_matter.end() :] if front_matter else text


def user_text(body: str, where: str) -> tuple[str | None, str | None]:
    """The text above and below the generated body's markers in a card's body (`marked_user_text`);
    where they are missing, none, and a warning says so."""
    found = marked_user_text(body)
    if found is None:  # no markers (a card of an earlier version), or moved: no text known to be the user's
        log.warning(
            "%s: %s, so no text in it is known to be a user's: all of it is written anew, and any text added to it is "
            "not kept; add it again above or below the markers of the card written",
            where,
            markers_missing(body),
        )
        return None, None
    return found


def marked_user_text(body: str) -> tuple[str, str] | None:
    """The text above and below the generated body's markers in a card's body (below its front
    matter), None where they are missing: the body is the first end marker after a start marker,
    back to the last start marker before it, so a marker a user quotes in their own text, above or
    below, is theirs."""
    end = next((m for m in _END_RE.finditer(body) if _START_RE.search(body, 0, m.start())), None)
    if end is None:
        return None
    start = list(_START_RE.finditer(body, 0, end.start()))[-1]
    return body[: start.start()], body[end.end() :]


def markers_missing(body: str) -> str:
    if _START_RE.search(body) is None:
        return "it has no '<!-- eagle3-cache generated start ... -->' marker (written by an earlier version, or removed)"
    if _END_RE.search(body) is None:
        return f"it has no {GENERATED_END!r} marker"
    return f"its {GENERATED_END!r} marker is above the start marker"


def merge_user_parts(preferred: UserParts, other: UserParts) -> UserParts:
    """Both cards' user parts: `preferred`'s where both have a key (or text above, or below), the
    other's where only it has one; tags from both."""
    keys = other.keys | preferred.keys
    tags = _unique(preferred.tags() + other.tags())
    if tags:
        keys["tags"] = tags
    above, below = _first_text(preferred.above, other.above), _first_text(preferred.below, other.below)
    return UserParts(keys, above, below, configs=_configs_beside(preferred.configs, other.configs))


def _configs_beside(configs: list, others: list) -> list:
    """`configs`, then those of `others` whose names they do not have."""
    names = {config["config_name"] for config in configs}
    return configs + [config for config in others if config["config_name"] not in names]


def _first_text(*texts: str | None) -> str | None:
    """The first text with words in it; else the first known one (whitespace as it was)."""
    return next((t for t in texts if t and t.strip()), next((t for t in texts if t is not None), None))


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def _unique(items: list, exclude: list = ()) -> list:
    out: list = []
    for item in items:
        if item not in out and item not in exclude:
            out.append(item)
    return out


def with_user_keys(data: dict, kept: UserParts) -> dict:
    """Generated front matter with the user's keys beside it, their tags after eagle3-cache's own, and their
    configs after eagle3-cache's."""
    return (
        kept.keys | data | {"tags": TAGS + _unique(kept.tags(), exclude=TAGS), "configs": with_users_configs(data["configs"], kept.configs)}
    )


def with_users_configs(configs: list, kept: list) -> list:
    """eagle3-cache's `configs` entries, each with the settings a user gave it (its data files stay eagle3-cache's),
    then the user's own entries; an entry eagle3-cache wrote for a config it no longer writes here (the local
    card's `default`, in the card of a config pushed by name) is not the user's."""
    settings = {config["config_name"]: config for config in kept}
    ours = [config | {k: v for k, v in settings.get(config["config_name"], {}).items() if k not in config} for config in configs]
    names = {config["config_name"] for config in configs}
    return ours + [config for config in kept if config["config_name"] not in names and not _written_by_us(config)]


def data_prefix(config: str | None) -> str:
    """Folder of a config inside the repo: the root for `default`, else a sub-folder named after it."""
    return "" if config in (None, DEFAULT_CONFIG) else f"{config}/"


def features(manifest: dict) -> list[dict]:
    return [{"name": name, "dtype": spec["arrow"]} for name, spec in manifest["columns"].items()]


def index_entry(manifest: dict, config: str | None = None, revision: str | None = None) -> dict:
    """What the root card records about one config (its full manifest stays in its own card);
    `revision`: the tag (or branch) it was pushed with."""
    identity, totals = manifest["identity"], manifest["totals"]
    return {
        "path": data_prefix(config).rstrip("/") or ".",
        "shards": len(manifest["shards"]),
        "revision": revision,
        "fingerprint": manifest["fingerprint"],
        "target_model": identity["target"]["model"],
        "seq_length": identity["seq_length"],
        "aux_layer_ids": identity["aux_layer_ids"],
        "draft_vocab_size": identity["draft_vocab_size"],
        "dtype": identity["dtype"],
        "target_format": identity["target_format"],
        "samples": totals["samples"],
        "tokens": totals["tokens"],
        "bytes": totals["bytes"],
        "features": features(manifest),
    }


def entry_of_a_damaged_card(config: str) -> dict:
    """The index entry of a config whose own card is damaged (what its manifest said is unknown until it is
    pushed again): its folder only, so that the index still lists it as a cache's."""
    return {"path": data_prefix(config).rstrip("/"), "revision": None}


def _config_yaml(name: str, entry: dict, prefix: str) -> tuple[dict, dict | None]:
    """The config's `configs` and `dataset_info` entries; no `dataset_info` for one whose card is damaged
    (`entry_of_a_damaged_card`): `datasets` then reads its features from its shards."""
    config = {"config_name": name, "data_files": [{"split": "train", "path": f"{prefix}data/{shard_files(entry.get('shards'))}"}]}
    if "features" not in entry:
        return config, None
    info = {
        "config_name": name,
        "features": entry["features"],
        "splits": [{"name": "train", "num_bytes": entry["bytes"], "num_examples": entry["samples"]}],
    }
    return config, info


def shard_files(num_shards: int | None) -> str:
    """The `data_files` pattern of a cache's shards (`train-00000-of-00004.parquet`, ...): exactly
    those names, so a stray copy beside them (`... .parquet.bak`) is never read as more rows. Index
    entries pushed before the count was recorded keep the old, wider pattern."""
    return f"train-*-of-{num_shards:05d}.parquet" if num_shards else "train-*"


# The file part of a `data_files` path `_config_yaml` writes (`shard_files`): a user's entry names others
_GENERATED_SHARDS_RE = re.compile(r"train-\*(?:-of-\d{5}\.parquet)?")


def reads_all_shards(path: str, prefix: str = "") -> bool:
    """Whether a `data_files` path is the one eagle3-cache writes for a cache in folder `prefix` (all its
    shards), not one a user wrote (a config of their own, as of one shard)."""
    folder, _, name = path.rpartition("/")
    return folder == f"{prefix}data" and _GENERATED_SHARDS_RE.fullmatch(name) is not None


def card_data(manifest: dict, config: str | None = None) -> dict:
    """YAML front matter: `configs` (so `load_dataset` needs no data_files), features, tags, and
    the full manifest under `eagle3_cache`. Data paths are relative to the card's own folder, so a
    config's folder downloaded alone opens like any cache; the repo's index card, the one `datasets`
    reads on the Hub, names each config's folder."""
    config_yaml, info = _config_yaml(config or DEFAULT_CONFIG, index_entry(manifest, config), prefix="")
    if info["config_name"] == DEFAULT_CONFIG:
        info.pop("config_name")  # single-config form, as `datasets` writes it; another config's info keeps its name
    return {"configs": [config_yaml], "dataset_info": info, "tags": TAGS, "eagle3_cache": manifest}


def summary_rows(manifest: dict) -> list[tuple[str, str]]:
    t = manifest["totals"]
    return [
        ("samples", f"{t['samples']:,}"),
        ("shards", f"{len(manifest['shards']):,}"),
        ("tokens", f"{t['tokens']:,}"),
        ("supervised positions (loss-masked tokens)", f"{t['loss_tokens']:,}"),
        ("draft-vocab coverage (loss positions whose target argmax is in the draft vocab)", f"{t['argmax_coverage']:.2%}"),
        ("draft-vocab coverage of loss-masked input tokens", f"{t['token_coverage']:.2%}"),
        ("bytes", f"{t['bytes']:,} ({t['bytes'] / 1e9:.3f} GB)"),
        ("bytes per token", f"{t['bytes_per_token']:,.1f}"),
        ("skipped input rows", f"{sum(manifest['skipped'].values()):,}"),
        ("failed samples (non-finite target outputs, not stored)", f"{len(manifest.get('failed', [])):,}"),
    ]


def supervision_text(manifest: dict) -> str:
    """What a row holds for the draft's targets, in the words of its format: dense probabilities,
    the top K with their K, or the final hidden state at every token; each with its stored dtype."""
    identity, columns = manifest["identity"], manifest["columns"]
    vocab = f"{identity['draft_vocab_size']:,}-token draft vocabulary"
    if identity["target_format"] == "hidden":
        return (
            f"the target's final hidden state at every token (stored as `{columns['final_hidden']['dtype']}`), from which "
            f"the next-token distribution over a {vocab} is recomputed with the target's head rows stored under `vocab/`"
        )
    if identity["target_format"] == "topk":
        k = columns["topk_logprobs"]["shape"][1]
        return (
            f"the target's top-{k} next-token log-probabilities within a {vocab} (K = {k}, stored as "
            f"`{columns['topk_logprobs']['dtype']}`) with their token ids and the log of the draft vocabulary's total "
            "probability, at every loss-masked position"
        )
    return (
        f"the target's dense next-token probabilities over a {vocab} at every loss-masked position "
        f"(stored as `{columns['target_probs']['dtype']}`)"
    )


def aux_storage_text(manifest: dict) -> str:
    dtype = manifest["columns"]["aux_hidden_states"]["dtype"]
    if dtype == "fp8":
        return "stored as `fp8`: e4m3 with one fp32 scale per token, which `load_cache` applies"
    return f"stored as `{dtype}`"


ENCODING_WORDS = {
    # torch, not numpy: numpy has no bfloat16 or float8 dtype to read those columns in.
    "raw": ": the tensor's bytes as they are (`torch.frombuffer` in the column's dtype reads them)",
    "byte_planes_zstd": (
        ", not readable as plain bytes: a header (`<QB`: element count n, plane count k = bytes per element), then per "
        "plane `<BQ` (codec 0 stored or 1 zstd, stored length), then the k byte planes, most significant byte first, "
        "each n bytes once decompressed; interleaved back, they give the little-endian values bit for bit"
    ),
}


def encoding_text(manifest: dict) -> str:
    """How each tensor column's values are encoded, in the words of the manifest's `columns.*.encoding`
    (caches of format version 1 recorded none: every column raw)."""
    by_encoding: dict[str, list[str]] = {}
    for name, spec in manifest["columns"].items():
        if spec.get("arrow") == "binary":
            by_encoding.setdefault(spec.get("encoding", "raw"), []).append(name)
    parts = []
    for encoding, names in by_encoding.items():
        listed = ", ".join(f"`{name}`" for name in names)
        parts.append(f"{listed} {'is' if len(names) == 1 else 'are'} `{encoding}`{ENCODING_WORDS.get(encoding, '')}")
    return "; ".join(parts)


def load_arguments(location: str, config: str | None = None, revision: str | None = None) -> str:
    """The exact arguments that open this cache, for the usage snippets."""
    args = [repr(location)]
    if config not in (None, DEFAULT_CONFIG):
        args.append(f"name={config!r}")
    if revision:
        args.append(f"revision={revision!r}")
    return ", ".join(args)


def _datasets_arguments(location: str, config: str | None, revision: str | None) -> str:
    args = [repr(location)]
    if config not in (None, DEFAULT_CONFIG):
        args.append(repr(config))
    if revision:
        args.append(f"revision={revision!r}")
    return ", ".join(args)


def render_card(
    manifest: dict,
    location: str,
    *,
    config: str | None = None,
    revision: str | None = None,
    pictures: list[tuple[str, str]] = (),
    picture_base: str = "",
    kept: UserParts = UserParts(),
) -> str:
    """The whole README.md. `location` is what users pass to load it (a path or a repo id);
    `config`/`revision` complete the usage snippet; `pictures` are (path, caption) pairs
    relative to the cache folder, linked as `picture_base + path`; `kept`: what users added
    to the card this one replaces."""
    from huggingface_hub import DatasetCard, DatasetCardData

    identity = manifest["identity"]
    front_matter = DatasetCardData(**with_user_keys(card_data(manifest, config), kept))
    card = DatasetCard.from_template(
        front_matter,
        template_path=str(TEMPLATE_PATH),
        **marker_arguments(kept),
        target_model=identity["target"]["model"],
        format_version=identity["format_version"],
        fingerprint=manifest["fingerprint"],
        aux_layer_ids=identity["aux_layer_ids"],
        aux_convention=identity["aux_convention"],
        draft_vocab_size=identity["draft_vocab_size"],
        target_format=identity["target_format"],
        supervision=supervision_text(manifest),
        aux_storage=aux_storage_text(manifest),
        encodings=encoding_text(manifest),
        byte_planes=any(spec.get("encoding") == "byte_planes_zstd" for spec in manifest["columns"].values()),
        # caches built before these options existed were built with both off
        mask_generation_prompt=identity.get("mask_generation_prompt", False),
        mask_reasoning_content=identity.get("mask_reasoning_content", False),
        location=location,
        **misread_arguments(location),
        load_args=load_arguments(location, config, revision),
        datasets_args=_datasets_arguments(location, config, revision),
        config=config or DEFAULT_CONFIG,
        revision=revision,
        summary_rows=summary_rows(manifest),
        skipped=manifest["skipped"],
        pictures=[(picture_base + path, caption) for path, caption in pictures],
    )
    return text_reading_back(card, front_matter)


def misread_arguments(location: str) -> dict:
    """What in a cache's path `datasets` would not read literally (a repo id has none of it): the
    card then says to rename or move the folder, instead of giving snippets that read other files."""
    from builder.files import MISREAD_IN_PATHS, misread_in_path

    return {
        "misread": " and ".join(f"`{part}`" for part in misread_in_path(location)),
        "misread_all": ", ".join(f"`{part}`" for part in MISREAD_IN_PATHS),
    }


def marker_arguments(kept: UserParts) -> dict:
    """The template's markers around the generated body, and the user's text outside them."""
    return {
        "generated_start": GENERATED_START,
        "generated_end": GENERATED_END,
        "above": "\n" if kept.above is None else kept.above,
        "below": "\n" if kept.below is None else kept.below,
    }


def render_index_card(location: str, index: dict, kept: UserParts = UserParts()) -> str:
    """Root card of a repo whose caches all live in sub-folders: lists them, no manifest of its own.
    Each entry's snippet names the revision that config was pushed with (`entry["revision"]`);
    `kept`: what users added to the index card this one replaces."""
    from huggingface_hub import DatasetCard, DatasetCardData

    configs, infos = zip(*(_config_yaml(k, v, data_prefix(k)) for k, v in sorted(index.items())))
    data = {
        "configs": list(configs),
        "dataset_info": [info for info in infos if info is not None],
        "tags": TAGS,
        "eagle3_cache_index": {k: {key: v[key] for key in v if key != "features"} for k, v in sorted(index.items())},
    }
    front_matter = DatasetCardData(**with_user_keys(data, kept))
    card = DatasetCard.from_template(
        front_matter,
        template_path=str(INDEX_TEMPLATE_PATH),
        **marker_arguments(kept),
        location=location,
        others=[(name, entry, load_arguments(location, name, entry.get("revision"))) for name, entry in sorted(index.items())],
    )
    return text_reading_back(card, front_matter)


def text_reading_back(card, front_matter) -> str:
    """The card's text, with front matter that reads back as `front_matter` (what `from_template`
    was given; `card.data` is what its YAML read back as). PyYAML writes a few characters as they
    are that it reads back as others (NEL, U+0085, becomes a line break, then a space): there, every
    string holding more than printable ASCII is written double-quoted, with escapes."""
    import yaml
    from huggingface_hub import DatasetCard

    written = front_matter.to_dict()
    if _same_data(card.data.to_dict(), written):
        return str(card)
    escaped = yaml.dump(written, Dumper=_escaping_dumper(), sort_keys=False, allow_unicode=True).strip()
    text = f"---\n{escaped}\n---\n{card.text}"
    if not _same_data(DatasetCard(text).data.to_dict(), written):
        from builder.manifest import ManifestError

        raise ManifestError(
            "writing the card: expected its YAML front matter to read back as written, found other values even with every "
            "string escaped; remove the unusual characters from the paths, names or card keys it holds, then run again"
        )
    return text


def _same_data(read, written) -> bool:
    """The same values as YAML reads them back: mappings with the same keys (of the same types:
    users' mappings may mix them, `{0: rejected, other: unknown}`, so nothing is sorted) and values,
    lists and tuples alike (YAML writes a tuple as a list), NaN equal to itself, any other value
    equal and of the same type (1 is not 1.0, nor True)."""
    if isinstance(read, dict) and isinstance(written, dict):
        return _typed_keys(read) == _typed_keys(written) and all(_same_data(read[key], written[key]) for key in read)
    if isinstance(read, (list, tuple)) and isinstance(written, (list, tuple)):
        return len(read) == len(written) and all(map(_same_data, read, written))
    if _is_nan(read) and _is_nan(written):
        return True
    return type(read) is type(written) and read == written


def _typed_keys(mapping: dict) -> set:
    return {(type(key), key) for key in mapping}


def _is_nan(value) -> bool:
    return isinstance(value, float) and value != value


def _escaping_dumper():
    import yaml

    class EscapingDumper(yaml.Dumper):
        """Writes strings holding anything but printable ASCII double-quoted (escapes for the rest)."""

    def represent_str(dumper, value: str):
        style = '"' if any(not " " <= ch <= "~" for ch in value) else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    EscapingDumper.add_representer(str, represent_str)
    return EscapingDumper


def index_from_card_data(data: dict) -> dict:
    """The configs an index card lists, with their features, by name (empty for any other card)."""
    index = {k: dict(v) for k, v in (data.get("eagle3_cache_index") or {}).items()}
    infos = data.get("dataset_info")
    for info in infos if isinstance(infos, list) else []:
        if info.get("config_name") in index:
            index[info["config_name"]]["features"] = info.get("features", [])
    return index
