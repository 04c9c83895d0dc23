"""Write the dataset card (last): its pictures, then the README.md holding the manifest."""

from __future__ import annotations

from pathlib import Path

from dataset_card import render_card
from dataset_card.pictures import PICTURES, card_pictures

from .files import write_bytes_atomic, write_text_atomic
from .manifest import assemble_manifest
from .prepare import Prepared


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
