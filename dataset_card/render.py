"""Pure functions from a manifest to the card's metadata and text.

A repo holds one cache at its root (config `default`, the same layout as on local disk), or
several in sub-folders, one config each: then the root card is an index listing them
(`configs` for `datasets`, `eagle3_cache_index` for people and tools) and each cache's full
manifest lives in the card of its own folder.
"""

from __future__ import annotations

from pathlib import Path

TEMPLATE_PATH = Path(__file__).with_name("template.md")
INDEX_TEMPLATE_PATH = Path(__file__).with_name("index_template.md")
DEFAULT_CONFIG = "default"
TAGS = ["eagle3", "speculative-decoding", "eagle3-cache"]


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


def _config_yaml(name: str, entry: dict, prefix: str) -> tuple[dict, dict]:
    config = {"config_name": name, "data_files": [{"split": "train", "path": f"{prefix}data/{shard_files(entry.get('shards'))}"}]}
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
    "raw": ": the tensor's bytes as they are (`numpy.frombuffer` in the column's dtype reads them)",
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
) -> str:
    """The whole README.md. `location` is what users pass to load it (a path or a repo id);
    `config`/`revision` complete the usage snippet; `pictures` are (path, caption) pairs
    relative to the cache folder, linked as `picture_base + path`."""
    from huggingface_hub import DatasetCard, DatasetCardData

    identity = manifest["identity"]
    card = DatasetCard.from_template(
        DatasetCardData(**card_data(manifest, config)),
        template_path=str(TEMPLATE_PATH),
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
        # caches built before these options existed were built with both off
        mask_generation_prompt=identity.get("mask_generation_prompt", False),
        mask_reasoning_content=identity.get("mask_reasoning_content", False),
        location=location,
        load_args=load_arguments(location, config, revision),
        datasets_args=_datasets_arguments(location, config, revision),
        config=config or DEFAULT_CONFIG,
        revision=revision,
        summary_rows=summary_rows(manifest),
        skipped=manifest["skipped"],
        pictures=[(picture_base + path, caption) for path, caption in pictures],
    )
    return str(card)


def render_index_card(location: str, index: dict) -> str:
    """Root card of a repo whose caches all live in sub-folders: lists them, no manifest of its own.
    Each entry's snippet names the revision that config was pushed with (`entry["revision"]`)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    configs, infos = zip(*(_config_yaml(k, v, data_prefix(k)) for k, v in sorted(index.items())))
    data = {
        "configs": list(configs),
        "dataset_info": list(infos),
        "tags": TAGS,
        "eagle3_cache_index": {k: {key: v[key] for key in v if key != "features"} for k, v in sorted(index.items())},
    }
    card = DatasetCard.from_template(
        DatasetCardData(**data),
        template_path=str(INDEX_TEMPLATE_PATH),
        location=location,
        others=[(name, entry, load_arguments(location, name, entry.get("revision"))) for name, entry in sorted(index.items())],
    )
    return str(card)


def index_from_card_data(data: dict) -> dict:
    """The configs an index card lists, with their features, by name (empty for any other card)."""
    index = {k: dict(v) for k, v in (data.get("eagle3_cache_index") or {}).items()}
    infos = data.get("dataset_info")
    for info in infos if isinstance(infos, list) else []:
        if info.get("config_name") in index:
            index[info["config_name"]]["features"] = info.get("features", [])
    return index
