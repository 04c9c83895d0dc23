"""The dataset card, without a build: a manifest in, markdown out, and the metadata parsed back."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import MIXED_KEYS, MIXED_VALUES, card_edited_by_user, front_matter_edited
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


@pytest.mark.parametrize("config", [None, "default", "small"])
def test_datasets_files_the_card_info_under_the_config_it_names(manifest, config):
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    data = DatasetCard(render_card(manifest, "user/cache", config=config)).data
    name = config or "default"
    assert list(MetadataConfigs.from_dataset_card_data(data)) == [name]
    infos = DatasetInfosDict.from_dataset_card_data(data)
    assert list(infos) == [name] and infos[name].splits["train"].num_examples == 5


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


def card_prose(tmp_path, target_format: str, **settings) -> str:
    """The card text, whitespace joined, of a cache built with `target_format` and the given settings."""
    text = render_card(built_manifest(tmp_path, target_format, **settings), "user/cache")
    return " ".join(text.split("\n---\n", 1)[1].split())


def built_manifest(tmp_path, target_format: str, **settings) -> dict:
    """The manifest of a cache built with `target_format` and the given settings."""
    import dataclasses

    import torch
    from safetensors.torch import save_file

    from builder.manifest import LM_HEAD_FILE

    write_vocab_file(tmp_path)
    if target_format == "hidden":
        save_file({"weight": torch.zeros(4, 16)}, str(tmp_path / LM_HEAD_FILE))
    prep = prepared(tmp_path)
    cfg = prep.cfg.replace(target_format=target_format, **settings)
    identity = {**prep.identity, "target_format": target_format, "topk": cfg.topk if target_format == "topk" else None}
    prep = dataclasses.replace(prep, cfg=cfg, identity=identity | {"aux_dtype": cfg.storage_aux_dtype})
    return assemble_manifest(tmp_path, prep, SHARDS)


def test_card_says_what_a_probs_cache_stores(tmp_path):
    text = card_prose(tmp_path, "probs", dtype="fp32")
    assert (
        "the target's dense next-token probabilities over a 4-token draft vocabulary at every loss-masked position "
        "(stored as `fp32`) (target format `probs`)"
    ) in text
    assert "hidden states at layers [1, 2, 4] (the output of each decoder layer; stored as `fp32`)" in text


def test_card_says_what_a_topk_cache_stores_with_its_k_and_fp8_aux(tmp_path):
    text = card_prose(tmp_path, "topk", topk=3, dtype="bf16", aux_dtype="fp8")
    assert (
        "the target's top-3 next-token log-probabilities within a 4-token draft vocabulary (K = 3, stored as `fp16`) "
        "with their token ids and the log of the draft vocabulary's total probability, at every loss-masked position"
    ) in text
    assert "(the output of each decoder layer; stored as `fp8`: e4m3 with one fp32 scale per token, which `load_cache` applies)" in text
    assert "dense" not in text


def test_card_says_a_hidden_cache_stores_the_final_hidden_state_at_every_token(tmp_path):
    text = card_prose(tmp_path, "hidden", dtype="bf16", aux_dtype="fp16")
    assert (
        "the target's final hidden state at every token (stored as `bf16`), from which the next-token distribution "
        "over a 4-token draft vocabulary is recomputed with the target's head rows stored under `vocab/` (target format `hidden`)"
    ) in text
    assert "loss-masked position" not in text and "stored as `fp16`)" in text


def test_card_states_mask_generation_prompt_without_claiming_what_generation_blocks_leave_out(tmp_path):
    """With `{% generation %}` blocks the role header is never supervised, whatever the option:
    the card says so instead of claiming that an unset option keeps it."""
    from manifest_inputs import IDENTITY

    write_vocab_file(tmp_path)
    off = " ".join(render_card(assemble_manifest(tmp_path, prepared(tmp_path), SHARDS), "user/cache").split())
    on_identity = {**IDENTITY, "mask_generation_prompt": True}
    on = " ".join(render_card(assemble_manifest(tmp_path, prepared(tmp_path, on_identity), SHARDS), "user/cache").split())
    header = "the role header the generation prompt supplies"
    unless = "unless the chat template's `{% generation %}` blocks leave it out"
    assert f"`mask_generation_prompt: false` ({header} is supervised {unless})" in off
    assert f"`mask_generation_prompt: true` (without {header})" in on
    assert f"(with {header})" not in off


def test_card_says_how_each_tensor_column_is_encoded(tmp_path):
    """The default (zstd) stores the supervision columns as byte planes, not as the raw bytes a
    plain reader would take them for; the card names each column's encoding from the manifest."""
    zstd = card_prose(tmp_path, "probs", dtype="fp32")
    assert "tensor columns are raw" not in zstd
    assert "`input_ids`, `loss_mask` are `raw`: the tensor's bytes as they are" in zstd
    planes = "`aux_hidden_states`, `target_argmax`, `target_probs` are `byte_planes_zstd`, not readable as plain bytes"
    assert planes in zstd and "builder.shards.decode_value(value, " in zstd and "docs/cache-layout.md" in zstd
    raw = card_prose(tmp_path, "probs", dtype="fp32", compression="none")
    assert "`input_ids`, `loss_mask`, `aux_hidden_states`, `target_argmax`, `target_probs` are `raw`" in raw
    assert "byte_planes_zstd" not in raw and "decode_value" not in raw


def test_card_names_a_raw_reader_that_has_the_columns_dtype(tmp_path):
    """bf16 (the default dtype) has no numpy dtype: the card names torch's reader for raw columns."""
    import torch

    raw = card_prose(tmp_path, "probs", dtype="bf16", compression="none")
    assert "(`torch.frombuffer` in the column's dtype reads them)" in raw and "numpy.frombuffer" not in raw
    assert torch.equal(torch.frombuffer(bytearray(b"\x80\x3f"), dtype=torch.bfloat16), torch.ones(1, dtype=torch.bfloat16))


@pytest.mark.parametrize("column", ["aux_hidden_states", "target_probs", "target_argmax"])
def test_the_cards_decoding_call_runs_as_written_and_gives_the_recorded_shape(tmp_path, column):
    import math
    import re

    import torch

    import builder.shards
    from builder.shards import PLANES_ZSTD, TORCH_DTYPES, encode_value

    manifest = built_manifest(tmp_path, "probs", dtype="fp32")
    call = re.search(r"`(builder\.shards\.decode_value\(.*?)`", render_card(manifest, "user/cache")).group(1)
    spec = manifest["columns"][column]
    width = spec["shape"][1:]
    values = (torch.arange(5 * math.prod(width)) - 7).reshape(5, *width).to(TORCH_DTYPES[spec["dtype"]])
    value = b"".join(bytes(part) for part in encode_value(values, PLANES_ZSTD).parts)
    decoded = eval(call, {"builder": builder, "value": value, "spec": spec})  # noqa: S307 - the card's own code
    assert torch.equal(decoded, values)


# ---- what users add to a card is kept when it is written again ----------------------------------


def other_version(manifest: dict) -> dict:
    """The manifest of a later version of the cache (other totals)."""
    return manifest | {"totals": manifest["totals"] | {"samples": 7, "bytes": 2000}}


def test_a_card_written_again_keeps_the_keys_tags_and_text_users_added(manifest):
    from builder.manifest import manifest_from_card
    from dataset_card.render import user_parts

    later = other_version(manifest)
    text = render_card(later, "user/cache", kept=user_parts(card_edited_by_user(render_card(manifest, "user/cache"))))
    data = card_data_of(text)
    assert data["license"] == "mit" and data["pretty_name"] == "Team X: cache" and data["language"] == ["en"]
    assert data["tags"] == ["eagle3", "speculative-decoding", "eagle3-cache", "team-x"]
    assert manifest_from_card(text) == later and data["dataset_info"]["splits"][0]["num_examples"] == 7  # generated: the new version's
    body = text.split("\n---\n", 1)[1]
    assert body.startswith("\nOur intro.\n\n<!-- eagle3-cache generated start")
    assert body.endswith("end -->\n\n## Citation\n\nCite team X.\n")
    assert render_card(later, "user/cache", kept=user_parts(text)) == text  # written again as it is
    assert render_card(manifest, "user/cache", kept=user_parts(render_card(manifest, "user/cache"))) == render_card(manifest, "user/cache")


def test_a_users_mapping_whose_keys_mix_types_is_written_again_as_it_was(manifest):
    """Numbers beside words, YAML 1.1's `on` (True) and `null` beside strings: keys that cannot be sorted."""
    from dataset_card.render import user_parts

    text = render_card(
        other_version(manifest), "user/cache", kept=user_parts(card_edited_by_user(render_card(manifest, "user/cache"), keys=MIXED_KEYS))
    )
    assert {key: card_data_of(text)[key] for key in MIXED_VALUES} == MIXED_VALUES
    assert render_card(other_version(manifest), "user/cache", kept=user_parts(text)) == text


def test_front_matter_read_back_is_compared_value_by_value():
    from dataset_card.render import _same_data

    assert _same_data({"a": [float("nan"), (1, 2)], 0: None, "b": "x"}, {"b": "x", 0: None, "a": (float("nan"), [1, 2])})
    assert not _same_data({"a": 1}, {"a": 1.0}) and not _same_data({"a": True}, {"a": 1}) and not _same_data({1: "x"}, {"1": "x"})
    assert not _same_data({"a": [1]}, {"a": [1, 2]}) and not _same_data({"a": "x"}, {"a": "x", "b": "y"})


def test_a_card_written_before_the_markers_keeps_its_keys_only(manifest, caplog):
    """Without the markers, no text is known to be the user's: the body is written anew, and a warning says so."""
    from dataset_card.render import GENERATED_END, GENERATED_START, user_parts

    older = card_edited_by_user(render_card(manifest, "user/cache")).replace(GENERATED_START + "\n", "").replace(GENERATED_END, "")
    with caplog.at_level("WARNING", logger="dataset_card.render"):
        text = render_card(manifest, "user/cache", kept=user_parts(older))
    assert "it has no '<!-- eagle3-cache generated start ... -->' marker (written by an earlier version, or removed)" in caplog.text
    assert card_data_of(text)["license"] == "mit" and "team-x" in card_data_of(text)["tags"]
    assert "Our intro." not in text and "Cite team X." not in text and GENERATED_START in text


@pytest.mark.parametrize("marker", ["end", "start"])
@pytest.mark.parametrize("where", ["above", "below"])
def test_a_marker_quoted_in_the_users_text_keeps_their_text(manifest, marker, where):
    """Their text tells other editors where the generated text starts or ends, quoting its marker."""
    from dataset_card.render import GENERATED_END, GENERATED_START, user_parts

    quote = f" Edit nothing between `{GENERATED_START if marker == 'start' else GENERATED_END}` and the other marker."
    above, below = ("Our intro." + quote, "Cite team X.") if where == "above" else ("Our intro.", "Cite team X." + quote)
    edited = card_edited_by_user(render_card(manifest, "user/cache")).replace("Our intro.", above).replace("Cite team X.", below)
    kept = user_parts(edited)
    assert (kept.above, kept.below) == (f"\n{above}\n\n", f"\n\n## Citation\n\n{below}\n")
    assert user_parts(render_card(other_version(manifest), "user/cache", kept=kept)) == kept


def test_text_outside_markers_out_of_order_is_not_kept_and_a_warning_says_so(manifest, caplog):
    from dataset_card.render import GENERATED_END, GENERATED_START, user_parts

    edited = card_edited_by_user(render_card(manifest, "user/cache"))
    swapped = edited.replace(GENERATED_START, "START").replace(GENERATED_END, GENERATED_START).replace("START", GENERATED_END)
    with caplog.at_level("WARNING", logger="dataset_card.render"):
        kept = user_parts(swapped, "cache/README.md")
    assert (kept.above, kept.below) == (None, None) and kept.keys["license"] == "mit"
    assert f"cache/README.md: its {GENERATED_END!r} marker is above the start marker, so no text in it is known" in caplog.text
    assert "any text added to it is not kept" in caplog.text


def test_the_local_cards_additions_win_and_the_hub_only_ones_are_kept(manifest):
    from dataset_card.render import merge_user_parts, user_parts

    card = render_card(manifest, "user/cache")
    local = user_parts(card_edited_by_user(card, keys="license: mit\n", tag="local"))
    hub = user_parts(card_edited_by_user(card, keys="license: apache-2.0\npretty_name: On the Hub\n", tag="hub"))
    merged = merge_user_parts(local, hub)
    assert merged.keys == {"license": "mit", "pretty_name": "On the Hub", "tags": ["local", "hub"]}
    blank = user_parts(render_card(manifest, "user/cache"))  # no text of the user's: the Hub's is kept
    assert merge_user_parts(blank, hub).below == hub.below and merge_user_parts(local, blank).above == local.above


def test_an_index_card_written_again_keeps_what_users_added(manifest):
    from dataset_card.render import user_parts

    first = render_index_card("user/caches", {"small": index_entry(manifest, "small", "v1")})
    index = {"small": index_entry(manifest, "small", "v1"), "large": index_entry(manifest, "large", "v1")}
    text = render_index_card("user/caches", index, kept=user_parts(card_edited_by_user(first)))
    data = card_data_of(text)
    assert data["license"] == "mit" and "team-x" in data["tags"] and sorted(data["eagle3_cache_index"]) == ["large", "small"]
    assert "Our intro." in text and text.endswith("\n## Citation\n\nCite team X.\n")


def with_users_config(text: str) -> str:
    """A card whose user added a config of their own (its first shard, as a quick sample) beside eagle3-cache's."""
    own = "- config_name: first-shard\n  data_files:\n  - split: train\n    path: data/train-00000-of-00002.parquet\n"
    return text.replace("configs:\n", f"configs:\n{own}", 1)


def test_a_card_written_again_keeps_a_config_users_added(manifest):
    """`configs` is eagle3-cache's key, but an entry of another name is the user's: `datasets` still offers it."""
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    from dataset_card.render import user_parts

    text = render_card(other_version(manifest), "user/cache", kept=user_parts(with_users_config(render_card(manifest, "user/cache"))))
    configs = MetadataConfigs.from_dataset_card_data(DatasetCard(text).data)
    assert configs["first-shard"]["data_files"] == [{"split": "train", "path": "data/train-00000-of-00002.parquet"}]
    assert configs["default"]["data_files"] == [{"split": "train", "path": "data/train-*-of-00002.parquet"}]
    assert configs.get_default_config_name() == "default"
    assert render_card(other_version(manifest), "user/cache", kept=user_parts(text)) == text


def test_an_index_card_written_again_keeps_a_config_users_added(manifest):
    from dataset_card.render import user_parts

    first = render_index_card("user/caches", {"small": index_entry(manifest, "small", "v1")})
    index = {"small": index_entry(manifest, "small", "v1"), "large": index_entry(manifest, "large", "v1")}
    edited = with_users_config(first).replace("data/train-00000", "small/data/train-00000")
    configs = card_data_of(render_index_card("user/caches", index, kept=user_parts(edited)))["configs"]
    assert [c["config_name"] for c in configs] == ["large", "small", "first-shard"]
    assert configs[2]["data_files"] == [{"split": "train", "path": "small/data/train-00000-of-00002.parquet"}]


def test_an_index_card_written_again_keeps_the_default_config_a_user_chose(manifest):
    """`default: true` on one of eagle3-cache's entries lets `load_dataset(repo)` open it without a name."""
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    from dataset_card.render import user_parts

    first = render_index_card("user/caches", {"small": index_entry(manifest, "small", "v1")})
    edited = first.replace("- config_name: small\n", "- config_name: small\n  default: true\n", 1)
    index = {"small": index_entry(manifest, "small", "v1"), "large": index_entry(manifest, "large", "v1")}
    text = render_index_card("user/caches", index, kept=user_parts(edited))
    configs = MetadataConfigs.from_dataset_card_data(DatasetCard(text).data)
    assert configs.get_default_config_name() == "small"
    assert configs["small"]["data_files"] == [{"split": "train", "path": "small/data/train-*-of-00002.parquet"}]
    assert render_index_card("user/caches", index, kept=user_parts(text)) == text


def test_the_shards_are_read_by_the_config_eagle3_cache_wrote_not_by_one_a_user_listed_above_it(manifest):
    """By a user's config of one shard, listed first, three of four shards would be called missing and the cache refused."""
    from builder.manifest import card_shard_pattern

    assert card_shard_pattern(with_users_config(render_card(manifest, "user/cache"))) == "train-*-of-00002.parquet"
    first = render_index_card("user/caches", {"small": index_entry(manifest, "small", "v1")})
    assert card_shard_pattern(with_users_config(first)) == "train-*-of-00002.parquet"


class DrawnPictures:
    """A drawing whose pictures are done (none here)."""

    def pictures(self) -> dict:
        return {}


def test_a_resumed_build_writes_the_card_again_with_what_users_added(tmp_path):
    from builder.card import write_card
    from builder.reader import read_manifest

    write_vocab_file(tmp_path)
    prep = prepared(tmp_path)
    manifest = write_card(tmp_path, prep, SHARDS, drawing=DrawnPictures())
    (tmp_path / "README.md").write_text(card_edited_by_user((tmp_path / "README.md").read_text()))
    write_card(tmp_path, prep, SHARDS, drawing=DrawnPictures())  # a resume of the finished build
    text = (tmp_path / "README.md").read_text()
    assert card_data_of(text)["license"] == "mit" and "Our intro." in text and "Cite team X." in text
    assert read_manifest(tmp_path) == manifest


def test_a_resumed_build_keeps_a_users_mapping_whose_keys_mix_types(tmp_path):
    from builder.card import write_card

    write_vocab_file(tmp_path)
    prep = prepared(tmp_path)
    write_card(tmp_path, prep, SHARDS, drawing=DrawnPictures())
    (tmp_path / "README.md").write_text(card_edited_by_user((tmp_path / "README.md").read_text(), keys=MIXED_KEYS))
    write_card(tmp_path, prep, SHARDS, drawing=DrawnPictures())
    text = (tmp_path / "README.md").read_text()
    assert {key: card_data_of(text)[key] for key in MIXED_VALUES} == MIXED_VALUES and "Cite team X." in text


def test_a_resumed_build_keeps_the_text_of_a_card_whose_yaml_a_hand_edit_broke(tmp_path, caplog):
    """An unquoted `: ` in a value: verify says to resume to restore the card; the resume restores
    the manifest from the build state and keeps the user's text, saying their keys were not kept."""
    from builder.card import write_card
    from builder.reader import read_manifest

    write_vocab_file(tmp_path)
    prep = prepared(tmp_path)
    manifest = write_card(tmp_path, prep, SHARDS, drawing=DrawnPictures())
    edited = card_edited_by_user((tmp_path / "README.md").read_text(), keys="pretty_name: Team X: draft cache\n")
    (tmp_path / "README.md").write_text(edited)
    with caplog.at_level("WARNING", logger="builder.card"):
        write_card(tmp_path, prep, SHARDS, drawing=DrawnPictures())
    text = (tmp_path / "README.md").read_text()
    assert (
        "Our intro." in text
        and text.endswith("\n## Citation\n\nCite team X.\n")
        and "Team X" not in card_data_of(text).get("pretty_name", "")
    )
    assert read_manifest(tmp_path) == manifest
    assert "README.md: its YAML front matter cannot be read (line 2: mapping values are not allowed here)" in caplog.text
    assert (
        "keeping the text above and below the generated markers; the YAML keys added to it are lost: pretty_name (line 2);" in caplog.text
    )
    assert "written anew" not in caplog.text  # one warning, saying what is kept and what is lost


def test_a_resumed_build_rewrites_a_card_given_a_top_level_key_that_is_no_text(tmp_path, caplog):
    """`2024:` reads as a number key, which no card reader takes: the resume writes the manifest again from
    the build state, keeps the user's text and names the key it could not keep."""
    from builder.card import write_card
    from builder.reader import read_manifest

    write_vocab_file(tmp_path)
    prep = prepared(tmp_path)
    manifest = write_card(tmp_path, prep, SHARDS, drawing=DrawnPictures())
    (tmp_path / "README.md").write_text(card_edited_by_user((tmp_path / "README.md").read_text(), keys="2024: a good year\n"))
    with caplog.at_level("WARNING", logger="builder.card"):
        write_card(tmp_path, prep, SHARDS, drawing=DrawnPictures())
    text = (tmp_path / "README.md").read_text()
    assert "Our intro." in text and text.endswith("\n## Citation\n\nCite team X.\n") and "a good year" not in text
    assert read_manifest(tmp_path) == manifest
    assert "its YAML front matter cannot be read (top-level keys that are not text (2024: quote such a key))" in caplog.text
    assert "the YAML keys added to it are lost: 2024 (line 2)" in caplog.text


def test_a_resumed_build_keeps_what_users_added_to_a_card_whose_manifest_block_they_removed(tmp_path):
    """Its generated markers show eagle3-cache wrote it: the resume writes the manifest again from the build state."""
    from builder.card import write_card
    from builder.reader import read_manifest

    write_vocab_file(tmp_path)
    prep = prepared(tmp_path)
    manifest = write_card(tmp_path, prep, SHARDS, drawing=DrawnPictures())
    edited = card_edited_by_user((tmp_path / "README.md").read_text())
    (tmp_path / "README.md").write_text(front_matter_edited(edited, lambda data: data.pop("eagle3_cache")))
    write_card(tmp_path, prep, SHARDS, drawing=DrawnPictures())
    text = (tmp_path / "README.md").read_text()
    assert card_data_of(text)["license"] == "mit" and "team-x" in card_data_of(text)["tags"]
    assert "Our intro." in text and text.endswith("\n## Citation\n\nCite team X.\n")
    assert read_manifest(tmp_path) == manifest


def test_a_resumed_build_keeps_the_text_of_a_readme_that_is_no_card_of_eagle3_caches_and_says_so(tmp_path, caplog):
    from builder.card import write_card

    write_vocab_file(tmp_path)
    (tmp_path / "README.md").write_text("# Our notes\n\nNothing generated here.\n")
    with caplog.at_level("WARNING", logger="builder.card"):
        write_card(tmp_path, prepared(tmp_path), SHARDS, drawing=DrawnPictures())
    text = (tmp_path / "README.md").read_text()
    assert text.split("\n---\n", 1)[1].startswith("# Our notes\n\nNothing generated here.\n\n<!-- eagle3-cache generated start")
    assert f"{tmp_path / 'README.md'}: expected eagle3-cache's card (its front matter holding the manifest, or" in caplog.text
    assert "found neither: it is written again from the build state, keeping its front-matter keys and, above" in caplog.text


def test_a_resumed_build_names_the_keys_lost_with_a_card_cut_short(tmp_path, caplog):
    from builder.card import write_card

    write_vocab_file(tmp_path)
    prep = prepared(tmp_path)
    write_card(tmp_path, prep, SHARDS, drawing=DrawnPictures())
    (tmp_path / "README.md").write_text(card_edited_by_user((tmp_path / "README.md").read_text())[:300])  # in dataset_info
    with caplog.at_level("WARNING", logger="builder.card"):
        write_card(tmp_path, prep, SHARDS, drawing=DrawnPictures())
    assert "its YAML front matter begins but is never closed (a line holding only ---): it is written again" in caplog.text
    assert "the YAML keys added to it are lost: license (line 2), pretty_name (line 3), language (line 4); add them" in caplog.text


def test_a_card_saved_with_a_byte_order_mark_keeps_what_users_added(tmp_path):
    from builder.card import write_card

    write_vocab_file(tmp_path)
    prep = prepared(tmp_path)
    write_card(tmp_path, prep, SHARDS, drawing=DrawnPictures())
    (tmp_path / "README.md").write_text("\ufeff" + card_edited_by_user((tmp_path / "README.md").read_text()))
    write_card(tmp_path, prep, SHARDS, drawing=DrawnPictures())
    text = (tmp_path / "README.md").read_text()
    assert card_data_of(text)["license"] == "mit" and "Our intro." in text and "Cite team X." in text


def test_a_card_saved_with_a_byte_order_mark_is_read_as_the_card_it_is(tmp_path):
    from builder.build_state import is_cache_card
    from builder.card import write_card
    from builder.manifest import manifest_from_card

    write_vocab_file(tmp_path)
    write_card(tmp_path, prepared(tmp_path), SHARDS, drawing=DrawnPictures())
    text = (tmp_path / "README.md").read_text()
    (tmp_path / "README.md").write_text("\ufeff" + text)  # as an editor may save it: verify, push and the reader read it
    assert is_cache_card(tmp_path / "README.md")
    assert manifest_from_card((tmp_path / "README.md").read_text()) == manifest_from_card(text)


def test_a_card_written_into_a_relative_output_dir_names_its_absolute_path(tmp_path, monkeypatch):
    from builder.card import write_card

    monkeypatch.chdir(tmp_path)
    write_vocab_file(Path("cache"))
    write_card(Path("cache"), prepared(Path("cache")), SHARDS, drawing=DrawnPictures())
    text = (tmp_path / "cache" / "README.md").read_text()
    assert f'load_cache({str(tmp_path / "cache")!r}, layout="nemo", streaming=True)' in text
    assert f'datasets.load_dataset({str(tmp_path / "cache")!r}, split="train")' in text


@pytest.mark.parametrize(
    "folder, found",
    [("cache[1]", "`[`"), ("cache*", "`*`"), ("a::b", "`::`"), ("ca?he", "`?`"), ("c$HOME", "`$`"), ("c$[1]", "`[` and `$`")],
)
def test_a_card_in_a_folder_whose_path_datasets_misreads_says_to_rename_it_instead_of_giving_snippets(tmp_path, folder, found):
    from builder.card import write_card
    from builder.reader import read_manifest

    out = tmp_path / folder
    write_vocab_file(out)
    write_card(out, prepared(out), SHARDS, drawing=DrawnPictures())
    text = (out / "README.md").read_text()
    assert "```python" not in text and f"load_cache({str(out)!r}" not in text and f"load_dataset({str(out)!r}" not in text
    assert f"This folder's path holds {found}, which `datasets` reads as a file pattern, a chained URL or an environment variable" in text
    assert "Rename the folder, or move the cache, to a path without any of `*`, `?`, `[`, `::`, `$`" in text
    assert "load_cache('user/cache', layout=" in render_card(read_manifest(out), "user/cache")  # a repo id: the snippets


@pytest.mark.parametrize(
    "odd", ["in\x85x", "a\u2028b\u2029c", "a\rb", "\x85", "caf\udce9 \x85"], ids=["nel", "separators", "cr", "nel-only", "undecodable"]
)
def test_a_card_reads_back_the_strings_it_was_written_with(tmp_path, odd):
    """PyYAML writes NEL (U+0085) as it is, and reads it back as a line break folded to a space: a
    fresh cache whose input path held one read as edited."""
    from builder.card import write_card
    from builder.manifest import manifest_from_card
    from builder.reader import read_manifest
    from dataset_card.render import UserParts

    write_vocab_file(tmp_path)
    identity = prepared(tmp_path).identity | {"input": {"data": f"/data/{odd}/chats.jsonl"}}
    manifest = write_card(tmp_path, prepared(tmp_path, identity), SHARDS, drawing=DrawnPictures())
    assert read_manifest(tmp_path) == manifest and manifest["identity"]["input"]["data"] == f"/data/{odd}/chats.jsonl"
    text = render_card(manifest, "user/cache", kept=UserParts({"pretty_name": f"team {odd}"}))
    assert manifest_from_card(text) == manifest and card_data_of(text)["pretty_name"] == f"team {odd}"


@pytest.mark.parametrize("closed", [False, True], ids=["never closed", "closed, YAML broken"])
def test_a_damaged_front_matter_holds_a_key_of_ours_only_where_every_line_above_it_is_yaml(closed):
    from builder.manifest import damaged_card_key

    end = "---\n# body\n" if closed else ""
    quoted = "\n```yaml\neagle3_cache: [\n```\n"  # `[` never closed: YAML that does not parse, where closed
    assert damaged_card_key(f"---\n# Our notes{quoted}{end}") is None  # a heading above it
    assert damaged_card_key(f"---\nOur notes, and our card:{quoted}{end}") is None  # prose
    assert damaged_card_key(f"---\n{quoted[1:]}{end}") is None  # a code fence
    assert damaged_card_key(f"---\n#eagle3_cache:\neagle3_cache: [\n{end}") is None  # a comment
    yaml_above = "license: mit\n'pretty name': x\ntags:\n- a\n  - b\n\ndataset_info:\n  features: []\n"
    assert damaged_card_key(f"---\n{yaml_above}eagle3_cache: [\n{end}") == "eagle3_cache"
    assert damaged_card_key(f"\ufeff---\n{yaml_above}eagle3_cache_index: [\n{end}") == "eagle3_cache_index"


def test_an_index_lists_a_config_whose_card_is_damaged_by_its_folder_alone(manifest):
    from dataset_card.render import entry_of_a_damaged_card

    index = {"small": index_entry(manifest, "small", "v1"), "large": entry_of_a_damaged_card("large")}
    text = render_index_card("user/caches", index)
    data = card_data_of(text)
    assert sorted(data["eagle3_cache_index"]) == ["large", "small"]
    assert [c["data_files"][0]["path"] for c in data["configs"]] == ["large/data/train-*", "small/data/train-*-of-00002.parquet"]
    assert [info["config_name"] for info in data["dataset_info"]] == ["small"]  # datasets reads large's features from its shards
    assert "| `large` | its card is damaged: push this config again to restore it |" in text
    assert index_from_card_data(data)["large"] == {"path": "large", "revision": None}  # so again when read back
