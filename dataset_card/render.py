"""Pure functions from a manifest to the card's metadata and text."""

from __future__ import annotations

from pathlib import Path

TEMPLATE_PATH = Path(__file__).with_name("template.md")


def card_data(manifest: dict) -> dict:
    """YAML front matter: `configs` (so `load_dataset(DIR)` needs no arguments), features,
    tags, and the full manifest under `eagle3_cache`."""
    columns = manifest["columns"]
    return {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}],
        "dataset_info": {
            "features": [{"name": name, "dtype": spec["arrow"]} for name, spec in columns.items()],
            "splits": [{"name": "train", "num_bytes": manifest["totals"]["bytes"], "num_examples": manifest["totals"]["samples"]}],
        },
        "tags": ["eagle3", "speculative-decoding", "eagle3-cache"],
        "eagle3_cache": manifest,
    }


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
    ]


def render_card(manifest: dict, location: str) -> str:
    """The whole README.md; `location` is what users pass to load it (a path or a repo id)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    identity = manifest["identity"]
    card = DatasetCard.from_template(
        DatasetCardData(**card_data(manifest)),
        template_path=str(TEMPLATE_PATH),
        target_model=identity["target"]["model"],
        format_version=identity["format_version"],
        fingerprint=manifest["fingerprint"],
        aux_layer_ids=identity["aux_layer_ids"],
        aux_convention=identity["aux_convention"],
        draft_vocab_size=identity["draft_vocab_size"],
        target_format=identity["target_format"],
        dtype=identity["dtype"],
        location=location,
        summary_rows=summary_rows(manifest),
        skipped=manifest["skipped"],
    )
    return str(card)
