"""Assemble the manifest from the build's records and write the dataset card (last)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from dataset_card import render_card

from .manifest import VOCAB_FILE, fingerprint
from .prepare import Prepared
from .shards import TENSOR_COLUMNS_PROBS, column_dtypes, file_sha256
from .vocab import vocab_coverage


def library_versions() -> dict:
    import accelerate
    import datasets
    import huggingface_hub
    import pyarrow
    import torch
    import transformers

    from . import __version__

    mods = {"torch": torch, "transformers": transformers, "datasets": datasets, "huggingface_hub": huggingface_hub, "accelerate": accelerate, "pyarrow": pyarrow}
    return {"eagle3_cache": __version__, "python": platform.python_version(), **{k: str(m.__version__) for k, m in mods.items()}}


def column_specs(prep: Prepared) -> dict:
    dtypes = column_dtypes(prep.cfg.dtype)
    specs = {
        "sample_id": {"arrow": "string"},
        "source_index": {"arrow": "int64"},
        "num_tokens": {"arrow": "int32"},
    }
    aux_width = len(prep.aux_layer_ids) * prep.hidden_size
    shapes = {
        "input_ids": ["L"],
        "loss_mask": ["L"],
        "aux_hidden_states": ["L", aux_width],
        "target_probs": ["n_loss", len(prep.selected_token_ids)],
        "target_argmax": ["n_loss"],
    }
    for name in TENSOR_COLUMNS_PROBS:
        specs[name] = {"arrow": "binary", "dtype": dtypes[name], "shape": shapes[name], "byte_order": "little"}
    return specs


def assemble_manifest(out: Path, prep: Prepared, shards: list[dict], ranks: list[dict] | None = None) -> dict:
    tokens = sum(s["tokens"] for s in shards)
    loss_tokens = sum(s["loss_tokens"] for s in shards)
    total_bytes = sum(s["bytes"] for s in shards)
    return {
        "identity": prep.identity,
        "fingerprint": fingerprint(prep.identity),
        "columns": column_specs(prep),
        "target_vocab_size": prep.vocab_size,
        "hidden_size": prep.hidden_size,
        "vocab_file": {"path": VOCAB_FILE, "sha256": file_sha256(out / VOCAB_FILE)},
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
        "build": {
            "batch_size": prep.cfg.batch_size,
            "max_tokens_per_batch": prep.cfg.token_budget,
            "row_group_bytes": prep.cfg.row_group_bytes,
            "ranks": ranks or [],  # per-rank work of the last run; the content does not depend on it
        },
        "versions": library_versions(),
    }


def write_card(out: Path, prep: Prepared, shards: list[dict], ranks: list[dict] | None = None) -> dict:
    manifest = assemble_manifest(out, prep, shards, ranks)
    text = render_card(manifest, location=str(out))
    tmp = out / f".README.md.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, out / "README.md")
    return manifest
