"""The dataset card, without a build: a manifest in, markdown out, and the metadata parsed back."""

from __future__ import annotations

import pytest
from manifest_inputs import SHARDS, prepared, write_vocab_file

from builder.manifest import assemble_manifest, card_data_of
from dataset_card import data_prefix, index_entry, index_from_card_data, render_card, render_index_card, summary_rows


@pytest.fixture
def manifest(tmp_path):
    write_vocab_file(tmp_path)
    return assemble_manifest(tmp_path, prepared(tmp_path), SHARDS)


def test_config_folders():
    assert data_prefix(None) == "" and data_prefix("default") == "" and data_prefix("small") == "small/"


def test_card_metadata_lets_datasets_open_the_config(manifest):
    data = card_data_of(render_card(manifest, "user/cache", config="small", revision="v1"))
    own_folders = [{"split": "train", "path": "data/train-*-of-00002.parquet"}]  # exactly the shards' names
    assert data["configs"] == [{"config_name": "small", "data_files": own_folders}]
    assert data["dataset_info"]["splits"] == [{"name": "train", "num_bytes": 1600, "num_examples": 5}]
    assert [f["name"] for f in data["dataset_info"]["features"]] == list(manifest["columns"])
    assert data["tags"] == ["eagle3", "speculative-decoding", "eagle3-cache"]


def test_card_text_names_how_to_open_it(manifest):
    text = render_card(manifest, "user/cache", config="small", revision="v1")
    assert "load_cache('user/cache', name='small', revision='v1', layout=\"nemo\", streaming=True)" in text
    assert "datasets.load_dataset('user/cache', 'small', revision='v1', split=\"train\")" in text
    assert f"fingerprint `{manifest['fingerprint']}`" in text and "target format `topk`" in text
    local = render_card(manifest, "/data/cache")
    assert "load_cache('/data/cache', layout=\"nemo\", streaming=True)" in local


def test_card_tables_and_pictures(manifest):
    text = render_card(manifest, "user/cache", pictures=[("images/lengths.png", "Sample lengths")], picture_base="https://hub/resolve/v1/")
    assert "![Sample lengths](https://hub/resolve/v1/images/lengths.png)" in text
    assert "| samples | 5 |" in text and "| too_long | 2 |" in text
    assert "## At a glance" not in render_card(manifest, "user/cache")  # no pictures, no section
    rows = dict(summary_rows(manifest))
    assert rows["bytes"] == "1,600 (0.000 GB)" and rows["bytes per token"] == "16.0"
    assert rows["draft-vocab coverage (loss positions whose target argmax is in the draft vocab)"] == "85.00%"
    assert rows["skipped input rows"] == "3" and rows["failed samples (non-finite target outputs, not stored)"] == "1"


def test_index_card_lists_configs_and_reads_back(manifest):
    index = {"small": index_entry(manifest, "small", "v1"), "large": index_entry(manifest, "large", None)}
    assert index["small"]["path"] == "small" and index["small"]["samples"] == 5 and index["small"]["revision"] == "v1"
    text = render_index_card("user/caches", index)
    data = card_data_of(text)
    assert "eagle3_cache" not in data and sorted(data["eagle3_cache_index"]) == ["large", "small"]
    paths = [c["data_files"][0]["path"] for c in data["configs"]]
    assert paths == ["large/data/train-*-of-00002.parquet", "small/data/train-*-of-00002.parquet"]
    assert index_from_card_data(data) == index
    assert "load_cache('user/caches', name='small', revision='v1', layout=\"nemo\", streaming=True)" in text
    assert index_from_card_data(card_data_of(render_card(manifest, "user/cache"))) == {}  # a cache's own card lists none
    earlier = {"small": {key: value for key, value in index["small"].items() if key != "shards"}}  # pushed before counts
    assert card_data_of(render_index_card("user/caches", earlier))["configs"][0]["data_files"][0]["path"] == "small/data/train-*"
