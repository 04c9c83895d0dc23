"""Assemble the manifest from the build's records and write the dataset card (last)."""

from __future__ import annotations

import platform
from dataclasses import asdict
from pathlib import Path

from dataset_card import render_card
from dataset_card.pictures import PICTURES, card_pictures

from .files import file_hash, write_bytes_atomic, write_text_atomic
from .formats import merge_quality, quality_report
from .manifest import LM_HEAD_FILE, VOCAB_FILE, fingerprint
from .prepare import Prepared
from .shards import CHECKSUM_ALGORITHM, SCALAR_COLUMNS, column_encodings
from .target import head_spec
from .vocab import special_token_ids, vocab_coverage


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
    return {"eagle3_cache": __version__, "python": platform.python_version(), **{k: str(m.__version__) for k, m in mods.items()}}


def column_specs(prep: Prepared) -> dict:
    """Every column's Arrow type; tensor columns also their dtype, inner shape, what they are per and
    how their values are encoded (shards.encode_value)."""
    specs = {name: {"arrow": str(arrow_type)} for name, arrow_type in SCALAR_COLUMNS.items()}
    encodings = column_encodings(prep.layout, prep.cfg.compression)
    for name, spec in prep.layout.columns().items():
        specs[name] = {"arrow": "binary", **spec, "byte_order": "little", "encoding": encodings[name]}
    return specs


def head_files(out: Path, prep: Prepared) -> dict:
    """`hidden` caches: where the head rows are, and the logit transform a reader must apply."""
    if prep.cfg.target_format != "hidden":
        return {}
    from safetensors import safe_open

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


SHARD_FIELDS = ("name", "rows", "bytes", "checksum", "tokens", "loss_tokens", "argmax_in_vocab", "batching")


def assemble_manifest(out: Path, prep: Prepared, sidecars: list[dict], ranks: list[dict] | None = None) -> dict:
    # Per-shard records stay small (a card with thousands of shards must parse fast); quality
    # histograms and failures are merged once below.
    shards = [{k: s[k] for k in SHARD_FIELDS if k in s} for s in sidecars]  # `batching`: absent in older records
    tokens = sum(s["tokens"] for s in shards)
    loss_tokens = sum(s["loss_tokens"] for s in shards)
    total_bytes = sum(s["bytes"] for s in shards)
    return {
        "identity": prep.identity,
        "fingerprint": fingerprint(prep.identity),
        "columns": column_specs(prep),
        "target_vocab_size": prep.vocab_size,
        "hidden_size": prep.hidden_size,
        "layout": asdict(prep.layout),
        "special_token_ids": special_token_ids(prep.tokenizer, prep.vocab_size),
        "checksum_algorithm": CHECKSUM_ALGORITHM,  # of every file checksum below (shards, vocab, head rows)
        "vocab_file": {"path": VOCAB_FILE, "checksum": file_hash(out / VOCAB_FILE, CHECKSUM_ALGORITHM)},
        **head_files(out, prep),
        "quality": merged_quality(sidecars),  # measured against the live target during the build
        "shards": shards,
        "totals": {
            "samples": sum(s["rows"] for s in shards),
            "tokens": tokens,
            "loss_tokens": loss_tokens,
            "bytes": total_bytes,
            "bytes_per_token": total_bytes / tokens if tokens else 0.0,
            "argmax_coverage": sum(s["argmax_in_vocab"] for s in shards) / loss_tokens if loss_tokens else 0.0,
            "token_coverage": vocab_coverage(prep.token_counts, prep.selected_token_ids),
        },
        "skipped": prep.skipped,
        "duplicate_ids": prep.duplicate_ids,  # kept: source_index is the stable key
        "failed": [failure for shard in sidecars for failure in shard.get("failed", [])],  # e.g. non-finite outputs
        "build": {
            "batch_size": prep.cfg.batch_size,
            "max_tokens_per_batch": prep.cfg.token_budget,
            "row_group_bytes": prep.cfg.row_group_bytes,
            "pad_token_id": prep.tokenizer.pad_token_id if prep.tokenizer.pad_token_id is not None else 0,
            "ranks": ranks or [],  # per-rank work of the last run; the content does not depend on it
        },
        "versions": library_versions(),
    }


def write_pictures(out: Path, prep: Prepared) -> None:
    """The card's PNGs, from what the build already holds (shards may be gone after an upload)."""
    pictures = card_pictures(prep.samples["num_tokens"], prep.token_counts, prep.selected_token_ids, prep.cfg.seq_length)
    for relative, data in pictures.items():
        write_bytes_atomic(out / relative, data)


def existing_pictures(out: Path) -> list[tuple[str, str]]:
    """(path, caption) of the card pictures present in a cache folder."""
    return [(path, caption) for path, caption in PICTURES.values() if (Path(out) / path).exists()]


def write_card(out: Path, prep: Prepared, shards: list[dict], ranks: list[dict] | None = None) -> dict:
    manifest = assemble_manifest(out, prep, shards, ranks)
    write_pictures(out, prep)
    text = render_card(manifest, location=str(out), pictures=existing_pictures(out))
    write_text_atomic(out / "README.md", text)
    return manifest
