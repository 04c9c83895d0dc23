"""Reader layouts and batching."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import configs_removed, first_config_renamed, folder_of_caches, front_matter_edited, index_cut_short, says, small_config

from builder.errors import Eagle3CacheError
from builder.pipeline import build
from builder.reader import ShardFilesMismatch, collate_nemo, load_cache, read_manifest, to_nemo


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return build(small_config(tmp_path_factory.mktemp("reader") / "cache", dtype="bf16"), progress=False).output_dir


def test_nemo_layout_is_the_raw_fields_shifted_by_one(cache):
    raw = load_cache(cache, layout="raw", streaming=False)
    nemo = load_cache(cache, layout="nemo", streaming=False)
    assert len(raw) == len(nemo) == 14
    for i in range(len(raw)):
        r, n = raw[i], nemo[i]
        length = r["num_tokens"]
        assert torch.equal(n["input_ids"][:-1], r["input_ids"][1:].long()) and n["input_ids"][-1] == 0
        assert torch.equal(n["loss_mask"][:-1], r["loss_mask"][1:].long()) and n["loss_mask"][-1] == 0
        assert torch.equal(n["attention_mask"], torch.ones(length, dtype=torch.long))
        assert torch.equal(n["aux_hidden_states"], r["aux_hidden_states"])  # unshifted
        loss_positions = r["loss_mask"].bool().nonzero().squeeze(-1)
        # slot t carries the stored probs of position t + 1; off the mask it is zero
        assert torch.equal(n["target_probs"][loss_positions - 1], r["target_probs"])
        off = torch.ones(length, dtype=torch.bool)
        off[loss_positions - 1] = False
        assert not n["target_probs"][off].any()
        assert n["position_mask"].shape == (length, 1) and n["position_mask"].dtype == torch.bool
        assert not n["position_mask"][off].any()


def test_position_mask_follows_argmax_membership():
    t2d = torch.tensor([True, False, True, False])
    raw = {
        "input_ids": torch.tensor([5, 6, 7, 8], dtype=torch.int32),
        "loss_mask": torch.tensor([0, 1, 1, 1], dtype=torch.uint8),
        "aux_hidden_states": torch.zeros(4, 2),
        "target_probs": torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]]),
        "target_argmax": torch.tensor([0, 1, 2], dtype=torch.int32),
    }
    nemo = to_nemo(raw, t2d)
    assert nemo["position_mask"].squeeze(-1).tolist() == [True, False, True, False]
    assert nemo["loss_mask"].tolist() == [1, 1, 1, 0]
    assert torch.equal(nemo["target_probs"], torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75], [0.0, 0.0]]))


def test_collate_pads_to_longest_or_fixed_length(cache):
    samples = [s for _, s in zip(range(3), load_cache(cache, layout="nemo"))]
    longest = max(s["input_ids"].shape[0] for s in samples)
    batch = collate_nemo(samples)
    assert batch["aux_hidden_states"].shape == (3, longest, 192)
    assert batch["target_probs"].shape == (3, longest, 300)
    for row, s in enumerate(samples):
        n = s["input_ids"].shape[0]
        assert torch.equal(batch["input_ids"][row, :n], s["input_ids"])
        assert not batch["attention_mask"][row, n:].any() and not batch["position_mask"][row, n:].any()
    fixed = collate_nemo(samples, pad_to=96)
    assert fixed["input_ids"].shape == (3, 96) and fixed["position_mask"].shape == (3, 96, 1)
    seq_length = read_manifest(cache)["identity"]["seq_length"]
    assert collate_nemo(samples, pad_to=seq_length)["input_ids"].shape == (3, seq_length)
    with pytest.raises(
        ValueError,
        match=rf"pad_to: expected a length no sample exceeds.* one of {longest} tokens, got {longest - 1}\. .*the cache's seq_length",
    ):
        collate_nemo(samples, pad_to=longest - 1)  # cutting the longest would drop its last positions' supervision


def test_collate_nemo_names_the_keys_samples_of_another_layout_lack(cache):
    raw = load_cache(cache, layout="raw", streaming=False)
    with pytest.raises(
        ValueError,
        match=r"samples: expected NeMo-layout samples, .*got \[.*'sample_id'.*\]\. They lack attention_mask, position_mask: "
        r"read the cache with load_cache\(\.\.\., layout='nemo'\)",
    ):
        collate_nemo([raw[0], raw[1]])


def test_the_readme_names_the_key_only_some_reads_add():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    paragraph = next(p for p in readme.split("\n\n") if "yields the same keys" in " ".join(p.split()))
    assert "`kept_mass`" in paragraph and "`draft_vocab_size=`" in paragraph


def test_aux_dtype_takes_the_names_expect_takes(cache):
    def first(aux_dtype):
        return load_cache(cache, layout="nemo", streaming=False, aux_dtype=aux_dtype)[0]["aux_hidden_states"]

    assert torch.equal(first("float32"), first(torch.float32)) and first("fp32").dtype == torch.float32
    assert torch.equal(first("bf16"), first(None)) and first("bfloat16").dtype == torch.bfloat16
    for wrong in ("int8", torch.int8, 16):  # at the open, not at the first read
        with pytest.raises(ValueError, match=r"aux_dtype: expected a floating torch dtype or one of 'bf16', 'fp16', 'fp32', .*'float32'"):
            load_cache(cache, layout="nemo", aux_dtype=wrong)


def test_dataloader_with_workers_yields_every_sample(cache):
    loader = torch.utils.data.DataLoader(
        load_cache(cache, layout="nemo", streaming=False), batch_size=4, collate_fn=collate_nemo, num_workers=2
    )
    assert sum(b["input_ids"].shape[0] for b in loader) == 14


def test_raw_layout_can_select_columns(cache):
    row = next(iter(load_cache(cache, layout="raw", columns=["sample_id", "input_ids"])))
    assert set(row) == {"sample_id", "input_ids"} and row["input_ids"].dtype == torch.int32
    row = next(iter(load_cache(cache, layout="raw", columns=("num_tokens",), streaming=False)))
    assert set(row) == {"num_tokens"}


@pytest.mark.parametrize("streaming", [True, False])
def test_columns_are_checked_at_open(cache, streaming):
    """At the open, not at the first read: no columns would read nothing, an unknown name fails deep in
    Arrow, and a bare string would be read as one column per character."""
    with pytest.raises(ValueError, match=r"columns: expected a non-empty list.*got \[\]\. This cache's columns are \['sample_id'"):
        load_cache(cache, layout="raw", columns=[], streaming=streaming)
    with pytest.raises(ValueError, match=r"got 'sample_id'.*Write columns=\['sample_id'\] for one column"):
        load_cache(cache, layout="raw", columns="sample_id", streaming=streaming)
    with pytest.raises(ValueError, match=r"Not in this cache: \['input_id'\]; its columns are \['sample_id', .*'input_ids'"):
        load_cache(cache, layout="raw", columns=["sample_id", "input_id"], streaming=streaming)
    for layout in ("nemo", "specforge"):  # their samples are built from every column: columns= would be ignored
        with pytest.raises(ValueError, match=rf"columns: expected None with layout='{layout}'.*Only layout='raw' selects columns"):
            load_cache(cache, layout=layout, columns=["input_ids"], streaming=streaming)


def test_reader_errors_are_clear(tmp_path, cache):
    with pytest.raises(ValueError, match="layout: expected one of"):
        load_cache(cache, layout="padded")
    with pytest.raises(ValueError, match="shuffle_buffer: expected a positive number of rows.*got 0"):
        load_cache(cache, shuffle_buffer=0)
    for seed, found in ((None, "None"), (-1, "-1"), (1.5, "1.5")):  # at the open, not in a DataLoader worker's first read
        with pytest.raises(ValueError, match=rf"seed: expected a non-negative int, got {found}\. .*same on every rank and on resume"):
            load_cache(cache, layout="raw", columns=["sample_id"], shuffle_buffer=3, seed=seed)
    assert len(list(load_cache(cache, layout="raw", columns=["sample_id"], shuffle_buffer=3, seed=2**64))) == 14
    for streaming in (True, False):  # at the open, not at the first read
        with pytest.raises(ValueError, match=r"layout='specforge'.*was built with --target-format probs.*layout='nemo'"):
            load_cache(cache, layout="specforge", streaming=streaming)
    with pytest.raises(FileNotFoundError, match="no README.md.*--resume"):
        read_manifest(tmp_path)
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# not a cache\n")
    with pytest.raises(ValueError, match="no 'eagle3_cache' manifest block"):
        read_manifest(tmp_path)


def cut_mid_yaml(text: str) -> str:
    return text[: text.index("eagle3_cache:") + 200]


def closing_rule_lost(text: str) -> str:
    closing = text.index("\n---\n", 4)
    return text[:closing] + text[closing + len("\n---") :]


@pytest.mark.parametrize("damage", [cut_mid_yaml, closing_rule_lost])
def test_a_card_cut_short_is_called_damaged_with_verifys_advice_not_another_datasets(cache, tmp_path, damage):
    """What is left of the card is no YAML block, so it holds no manifest: the card is damaged, found as verify
    finds it, and restored as verify says, not a README that is not eagle3-cache's."""
    import shutil

    from builder.manifest import ManifestError
    from builder.verify import verify_cache

    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    (copy / "README.md").write_text(damage((cache / "README.md").read_text()))
    damaged = f"{copy}: README.md is damaged: its YAML front matter, which holds the manifest, begins but is never closed"
    for streaming in (True, False):
        with pytest.raises(ManifestError, match=says(damaged, "Restore it: run the build command again with --resume")) as refused:
            load_cache(copy, streaming=streaming)
    with pytest.raises(Eagle3CacheError) as verified:
        verify_cache(copy)
    assert str(refused.value).split(" is damaged: ")[1] == str(verified.value).split(" is damaged: ")[1]


@pytest.mark.parametrize(
    ("part", "edit", "found"),
    [
        ("shards", lambda block: block.pop("shards"), "nothing"),
        ("columns", lambda block: block.update(columns=["input_ids"]), "list"),
        ("layout", lambda block: block.pop("layout"), "nothing"),
        ("shards", lambda block: block["shards"][0].pop("rows"), "an entry without rows"),
    ],
)
def test_a_manifest_part_removed_by_hand_is_refused_naming_it_with_verifys_advice(cache, tmp_path, part, edit, found):
    """A card whose manifest lost a part every read needs (a hand edit) is refused naming the part and what to
    do, not with a KeyError or TypeError from wherever it was first read."""
    import shutil

    from builder.manifest import ManifestError

    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    text = (cache / "README.md").read_text()
    (copy / "README.md").write_text(front_matter_edited(text, lambda data: edit(data["eagle3_cache"])))
    needs = says(f"the card of {copy}: its manifest has no usable '{part}' (found {found}", f"eagle3-cache verify {copy}")
    for layout in ("raw", "nemo"):
        with pytest.raises(ManifestError, match=needs):
            load_cache(copy, layout=layout)


@pytest.mark.parametrize("damage", [index_cut_short, configs_removed, first_config_renamed])
def test_a_local_index_card_that_no_longer_offers_a_config_is_refused_with_verifys_advice(cache, tmp_path, damage):
    """A local copy of a repo holding several caches: an index card damaged so that its `configs`, by which `datasets`
    opens a config, leave out one its index lists, is called damaged as verify calls it, with the same advice (a build
    writes no index card: download it again), not a folder without an index card; load_cache leaves it as it is."""
    from builder.manifest import ManifestError
    from builder.verify import verify_cache

    folder = folder_of_caches(tmp_path / "copy", {"one": cache, "two": cache})
    card = folder / "README.md"
    card.write_text(damage(card.read_text()))
    written = card.read_bytes()
    with pytest.raises(Eagle3CacheError, match="README.md is damaged: ") as verified:
        verify_cache(folder, name="one")
    restore = "Restore it: download the index card (README.md at the root) again from the repo the caches were pushed to"
    with pytest.raises(ManifestError, match=says(f"{card} is damaged: ", restore, "reads from its own sub-folder (DIR/CONFIG)")) as loaded:
        load_cache(folder, name="one", layout="raw")
    assert str(loaded.value).split(" is damaged: ")[1] == str(verified.value).split(" is damaged: ")[1]
    assert card.read_bytes() == written
    assert sum(1 for _ in load_cache(folder / "one", layout="raw")) == 14  # read from its sub-folder, as the advice says


def test_a_config_a_local_index_lists_without_its_card_names_the_config_the_index_and_what_to_do(cache, tmp_path):
    """The index says the config is there; its folder lacks the card: an interrupted build of that config, or a
    folder copied in part. Not a directory that holds no finished cache."""
    from builder.manifest import CardNotFound
    from builder.verify import verify_cache

    folder = folder_of_caches(tmp_path / "copy", {"one": cache, "two": cache})
    (folder / "one" / "README.md").unlink()
    listed = f"the index card {folder / 'README.md'} lists the config 'one', whose card is missing: "
    resume = "an interrupted build of that config has none: resume it (the same build command, with --resume)"
    what_to_do = (resume, "copy or download it again")
    with pytest.raises(CardNotFound, match=says(f"{folder} (config one): no one/README.md; {listed}", *what_to_do)) as loaded:
        load_cache(folder, name="one", layout="raw")
    assert "expected a finished eagle3-cache directory" not in str(loaded.value)
    with pytest.raises(Eagle3CacheError, match=says(f"{folder / 'one'} has no README.md", listed, *what_to_do)) as verified:
        verify_cache(folder, name="one")
    assert "at the root" not in str(verified.value)


def read_by_load_cache(copy, tmp_path, capsys) -> str:
    with pytest.raises(Eagle3CacheError) as refused:
        load_cache(copy, streaming=True)
    return str(refused.value)


def read_by_read_manifest(copy, tmp_path, capsys) -> str:
    with pytest.raises(Eagle3CacheError) as refused:
        read_manifest(copy)
    return str(refused.value)


def read_by_export(copy, tmp_path, capsys) -> str:
    from builder.cli import main

    assert main(["export", str(copy), "--to", "nemo", str(tmp_path / "out")]) == 2
    return capsys.readouterr().err


def read_by_verify(copy, tmp_path, capsys) -> str:
    from builder.cli import main

    assert main(["verify", str(copy)]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("read", [read_by_load_cache, read_by_read_manifest, read_by_export, read_by_verify])
def test_a_card_given_a_date_that_does_not_exist_is_called_damaged(cache, tmp_path, capsys, read):
    """YAML reads `2024-02-30` as a date and raises ValueError, not a YAML error, building it: the card's
    front matter does not parse, as any a hand edit broke."""
    import shutil

    from builder.manifest import ManifestError, card_data_of

    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    text = (cache / "README.md").read_text().replace("---\n", "---\nreleased: 2024-02-30\n", 1)
    (copy / "README.md").write_text(text)
    with pytest.raises(ManifestError, match="found text YAML cannot parse \\(day is out of range for month\\)"):
        card_data_of(text)
    message = read(copy, tmp_path, capsys)
    assert "README.md is damaged: its YAML front matter, which holds the manifest, does not parse (day is out of range" in message
    assert "Restore it: run the build command again with --resume" in message


@pytest.mark.parametrize("read", [read_by_load_cache, read_by_read_manifest, read_by_export, read_by_verify])
@pytest.mark.parametrize("key", ["2024", "true", "null", "2024-01-01"])
def test_a_card_given_a_top_level_key_that_is_no_text_is_called_damaged(cache, tmp_path, capsys, read, key):
    """YAML reads `2024:` as a number key, which huggingface_hub's card cannot take (it passes keys as
    keyword names): a hand edit no reader of cards reads, called damaged with the advice that restores it."""
    import shutil

    from builder.manifest import ManifestError, card_data_of

    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    text = (cache / "README.md").read_text().replace("---\n", f"---\n{key}: a year to remember\n", 1)
    (copy / "README.md").write_text(text)
    expected = f"top-level keys that are not text ({key}: quote such a key)"
    refusal = f"the card: expected YAML front matter whose keys are text, found it holds {expected}"
    with pytest.raises(ManifestError, match=re.escape(refusal)):
        card_data_of(text)
    message = read(copy, tmp_path, capsys)
    assert f"README.md is damaged: its YAML front matter, which holds the manifest, holds {expected}" in message
    assert "Restore it: run the build command again with --resume" in message
    assert (copy / "README.md").read_text() == text


def test_shard_files_other_than_the_manifests_are_refused_before_any_row(tmp_path, cache):
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    shards = sorted((copy / "data").glob("*.parquet"))
    shards[1].write_bytes(shards[2].read_bytes())  # another shard's bytes under its name
    assert shards[1].stat().st_size != (cache / "data" / shards[1].name).stat().st_size
    shards[3].unlink()  # removed after the build
    for streaming in (True, False):
        with pytest.raises(
            ShardFilesMismatch,
            match=rf"the shard files in data/ are not the ones its card lists \(missing: {shards[3].name}; "
            rf"another size than recorded: {shards[1].name}\)\. The shards were removed or replaced after the build",
        ):
            load_cache(copy, layout="raw", streaming=streaming)


def test_a_shard_of_another_size_than_recorded_is_refused_before_any_row(tmp_path, cache):
    """Every shard is there by name, one holds other rows (another shard's bytes): reading it would train
    on rows the card does not describe, so the open refuses it."""
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    shards = sorted((copy / "data").glob("*.parquet"))
    shards[1].write_bytes(shards[3].read_bytes())
    for streaming in (True, False):
        with pytest.raises(
            ShardFilesMismatch,
            match=rf"the shard files in data/ are not the ones its card lists \(another size than recorded: {shards[1].name}\)\. ",
        ):
            load_cache(copy, layout="raw", streaming=streaming)


def with_card_pattern(card, pattern: str) -> None:
    """Rewrite the card's data_files pattern (as a card pushed by an earlier version had it)."""
    text = card.read_text()
    current = re.search(r"path: (data/\S+)", text).group(1)
    card.write_text(text.replace(f"path: {current}", f"path: {pattern}"))


@pytest.mark.parametrize("stray", ["{}.bak", "{} - Copy.parquet"])
def test_a_stray_copy_of_a_shard_is_never_read_as_more_rows(tmp_path, cache, stray):
    """The card names the shards exactly, so `datasets` and `load_cache` skip a copy beside them; a
    card with the earlier, wider pattern `data/train-*` would read it, so there `load_cache` refuses it."""
    import shutil

    import datasets

    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    shard = sorted((copy / "data").glob("*.parquet"))[1]
    shutil.copy(shard, shard.with_name(stray.format(shard.name)))
    samples = read_manifest(cache)["totals"]["samples"]
    assert datasets.load_dataset(str(copy), split="train").num_rows == samples
    assert len(list(load_cache(copy, layout="raw", columns=["sample_id"]))) == samples
    with_card_pattern(copy / "README.md", "data/train-*")
    with pytest.raises(ShardFilesMismatch, match=rf"not in the manifest: {re.escape(stray.format(shard.name))}\).*move it out of data/"):
        load_cache(copy, layout="raw")


def test_a_file_the_cards_pattern_reads_but_the_manifest_does_not_list_is_refused(tmp_path, cache):
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    shard = sorted((copy / "data").glob("*.parquet"))[1]
    shutil.copy(shard, copy / "data" / "train-copy-of-00004.parquet")
    with pytest.raises(ShardFilesMismatch, match=r"not in the manifest: train-copy-of-00004\.parquet\).*data/train-\*-of-00004\.parquet"):
        load_cache(copy, layout="raw")


@pytest.mark.parametrize("name", ["cache[1]", "q?m", "st*ar", "x::y", "c$PART"])
def test_a_cache_path_datasets_would_read_as_a_pattern_is_refused(tmp_path, cache, monkeypatch, name):
    """`datasets` globs the folder's path: `cache[1]` would read the shards of a `cache1` beside it;
    without streaming it expands environment variables too: `c$PART` would read `c1`'s with PART=1."""
    import shutil

    monkeypatch.setenv("PART", "1")
    copy = tmp_path / name
    shutil.copytree(cache, copy)
    shutil.copytree(
        cache, tmp_path / name.replace("[", "").replace("]", "").replace("?", "x").replace("*", "").replace("::", "_").replace("$PART", "1")
    )
    for streaming in (True, False):
        with pytest.raises(
            ValueError,
            match=rf"load_cache: the path .*{re.escape(name)}' contains .* `datasets` reads as a file pattern, a chained URL or an "
            "environment variable",
        ):
            load_cache(copy, layout="raw", streaming=streaming)


# ---- splitting, only when asked ------------------------------------------------------------------


def test_each_process_reads_the_whole_cache_unless_it_asks_for_a_part(cache, monkeypatch):
    everything = [row["sample_id"] for row in load_cache(cache, layout="raw", columns=["sample_id"])]
    assert len(everything) == len(set(everything)) == 14
    parts = [[row["sample_id"] for row in load_cache(cache, layout="raw", columns=["sample_id"], rank=r, world_size=2)] for r in range(2)]
    assert all(parts) and not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(everything)
    assert [
        row["sample_id"] for row in load_cache(cache, layout="raw", columns=["sample_id"], split_by_rank=True)
    ] == everything  # one process
    monkeypatch.setenv("WORLD_SIZE", "2")  # launched by torchrun, but no process group yet
    with pytest.raises(ValueError, match="WORLD_SIZE=2 is set but torch.distributed is not initialised.*init_process_group"):
        load_cache(cache, layout="raw", split_by_rank=True)
    assert len(list(load_cache(cache, layout="raw", columns=["sample_id"]))) == 14  # no split asked: no rank needed


def uneven_split_warnings(location, world_size: int, caplog) -> tuple[list[int], list[str]]:
    parts = [ids(load_cache(location, layout="raw", columns=["sample_id"], rank=r, world_size=world_size)) for r in range(world_size)]
    warnings = [r.getMessage() for r in caplog.records if "the split gives the ranks" in r.getMessage()]
    return [len(part) for part in parts], warnings


@pytest.mark.parametrize("world_size, expected", [(2, [8, 6]), (3, [6, 4, 4]), (4, [4, 4, 4, 2]), (5, [3, 3, 3, 3, 2])])
def test_a_split_that_leaves_ranks_unequal_says_so(cache, caplog, world_size, expected):
    """14 samples in shards of 4, 4, 4, 2 (one row group each): ranks get different numbers of samples
    (by whole shards, or row by row for more ranks than row groups), so a DDP loop would wait forever on
    the rank with an extra batch; rank 0 says so, with the counts."""
    counts, warnings = uneven_split_warnings(cache, world_size, caplog)
    assert counts == expected
    assert warnings == [
        f"split_by_rank: the split gives the ranks {counts} samples: a loop that runs a collective"
        + warnings[0].split("a loop that runs a collective")[1]
    ]
    assert "DDP's join()" in warnings[0]


def test_a_split_that_gives_every_rank_as_many_samples_does_not_warn(cache, caplog):
    """Seven ranks, more than the four row groups: each keeps 1 row in 7 of the 14, two samples each."""
    counts, warnings = uneven_split_warnings(cache, 7, caplog)
    assert counts == [2] * 7 and warnings == []


def test_a_rank_outside_the_world_size_is_refused(cache):
    """Ranks count from 0: rank 2 of 2 would read a part no rank of a two-process run reads."""
    for rank, world_size in ((2, 2), (-1, 2), (None, 2)):
        with pytest.raises(
            ValueError,
            match=re.escape(f"rank/world_size: expected 0 <= rank < world_size, both given, got rank={rank}, world_size={world_size}"),
        ):
            load_cache(cache, layout="raw", columns=["sample_id"], rank=rank, world_size=world_size)


def test_a_split_by_row_groups_that_leaves_ranks_unequal_says_so(tmp_path, caplog):
    """One shard of five one-row groups, two ranks: whole row groups give them 3 and 2 samples."""
    one_shard = build(small_config(tmp_path / "cache", dtype="bf16", max_samples=5, shard_size=5, row_group_bytes=1), progress=False)
    counts, warnings = uneven_split_warnings(one_shard.output_dir, 2, caplog)
    assert counts == [3, 2] and len(warnings) == 1 and "the ranks [3, 2] samples" in warnings[0]


# ---- mid-epoch resume ---------------------------------------------------------------------------


def ids(rows) -> list[str]:
    return [row["sample_id"] for row in rows]


@pytest.mark.parametrize("shuffle_buffer", [None, 4])
def test_streaming_resumes_mid_epoch_exactly(cache, shuffle_buffer):
    def open_cache():
        return load_cache(cache, layout="raw", columns=["sample_id", "input_ids"], shuffle_buffer=shuffle_buffer, seed=7)

    whole = ids(open_cache())
    assert sorted(whole) == sorted(ids(load_cache(cache, layout="raw", columns=["sample_id"]))) and len(whole) == 14
    for k in (0, 1, 5, 13, 14):  # nothing read, the first sample, mid-window, all but the last, all
        first = open_cache()
        head = ids(itertools.islice(first, k))
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
        second = open_cache()
        second.load_state_dict(state)
        assert head + ids(second) == whole, (shuffle_buffer, k)
        assert ids(second) == whole  # the loaded state serves one iteration; the next one is the whole epoch
    if shuffle_buffer:
        reshuffled = open_cache()
        reshuffled.set_epoch(1)
        head = ids(itertools.islice(reshuffled, 3))
        state = reshuffled.state_dict()
        assert state["epoch"] == 1 and head != whole[:3]
        resumed = open_cache()
        resumed.load_state_dict(state)  # restores the epoch too
        assert sorted(head + ids(resumed)) == sorted(whole)


@pytest.mark.parametrize("num_workers, shuffle_buffer", [(0, None), (2, 3)])
def test_stateful_dataloader_resumes_mid_epoch(cache, num_workers, shuffle_buffer):
    from torchdata.stateful_dataloader import StatefulDataLoader

    def open_loader():
        dataset = load_cache(cache, layout="raw", columns=["sample_id"], shuffle_buffer=shuffle_buffer, seed=1)
        return StatefulDataLoader(dataset, batch_size=2, num_workers=num_workers, collate_fn=ids)

    def flat(batches) -> list[str]:
        return list(itertools.chain.from_iterable(batches))

    whole = flat(open_loader())
    assert sorted(whole) == sorted(ids(load_cache(cache, layout="raw", columns=["sample_id"])))
    for k in (1, 4, 7):  # the first batch, mid-epoch, the last batch
        loader = open_loader()
        head = flat(itertools.islice(loader, k))
        state = loader.state_dict()
        resumed = open_loader()
        resumed.load_state_dict(state)
        assert head + flat(resumed) == whole, (k, num_workers)


def test_a_stateful_dataloader_resume_decodes_only_the_rows_it_yields(cache):
    """The dataset's own state takes a resume back to the start of the window it stood in: the rows
    of that window already yielded are read again, not decoded, and nothing before it is read."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    decoded = []

    def open_loader():
        dataset = load_cache(cache, layout="raw", columns=["sample_id"], shuffle_buffer=4, seed=0)
        decode = dataset.transform

        def counting(row):
            decoded.append(row)
            return decode(row)

        dataset.transform = counting
        return StatefulDataLoader(dataset, batch_size=3, collate_fn=ids)

    whole = list(itertools.chain.from_iterable(open_loader()))
    for k in (1, 2, 3):  # 3, 6, 9 of 14 samples: mid-window, each
        loader = open_loader()
        head = list(itertools.chain.from_iterable(itertools.islice(loader, k)))
        state = json.loads(json.dumps(loader.state_dict()))
        resumed = open_loader()
        resumed.load_state_dict(state)
        decoded.clear()
        tail = list(itertools.chain.from_iterable(resumed))
        assert head + tail == whole and len(decoded) == len(tail), k


@pytest.mark.parametrize("num_workers", [1, 3])
def test_stateful_dataloader_resumes_after_a_workers_stream_ended(cache, num_workers):
    """A worker whose stream ends hands its last, partial batch out with its state: a checkpoint
    after that batch must not read the worker's part again (14 samples in shards of 4, 4, 4, 2)."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    def open_loader():
        dataset = load_cache(cache, layout="raw", columns=["sample_id"])
        return StatefulDataLoader(dataset, batch_size=3, num_workers=num_workers, collate_fn=ids)

    batches = list(open_loader())
    whole = list(itertools.chain.from_iterable(batches))
    assert sorted(whole) == sorted(ids(load_cache(cache, layout="raw", columns=["sample_id"])))
    assert any(len(batch) < 3 for batch in batches[:-1]) or num_workers == 1  # a worker ended before the loader did
    for k in range(1, len(batches) + 1):
        loader = open_loader()
        head = list(itertools.chain.from_iterable(itertools.islice(loader, k)))
        state = loader.state_dict()
        resumed = open_loader()
        resumed.load_state_dict(state)
        tail = list(itertools.chain.from_iterable(resumed))
        assert sorted(head + tail) == sorted(whole), (k, num_workers)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_checkpoint_at_an_epochs_end_resumes_into_the_next_epoch(cache, num_workers):
    """The usual loop: set_epoch(e), a whole epoch, a checkpoint; after a restart, load it, then set_epoch(e + 1)."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    def open_loader():
        dataset = load_cache(cache, layout="raw", columns=["sample_id"], shuffle_buffer=3, seed=1)
        return dataset, StatefulDataLoader(dataset, batch_size=2, num_workers=num_workers, collate_fn=ids)

    def epoch(dataset, loader, number) -> list[str]:
        dataset.set_epoch(number)
        return list(itertools.chain.from_iterable(loader))

    dataset, loader = open_loader()
    expected = [epoch(dataset, loader, 0), epoch(dataset, loader, 1)]
    assert expected[0] != expected[1] and sorted(expected[0]) == sorted(expected[1])
    dataset, loader = open_loader()
    epoch(dataset, loader, 0)
    checkpoint = json.loads(json.dumps(loader.state_dict()))
    dataset, loader = open_loader()
    loader.load_state_dict(checkpoint)
    assert epoch(dataset, loader, 1) == expected[1]  # the whole next epoch, in its own order
    assert dataset.epoch == 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_checkpoint_after_an_epochs_last_batch_resumes_into_a_whole_next_epoch(cache, num_workers):
    """A loop without set_epoch saves after every step: the last save follows the epoch's last,
    partial batch. After a restart the rest of that epoch is empty and the next epoch is whole."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    def open_loader():
        dataset = load_cache(cache, layout="raw", columns=["sample_id"])
        return StatefulDataLoader(dataset, batch_size=3, num_workers=num_workers, collate_fn=ids)

    loader = open_loader()
    everything = []
    for batch in loader:
        everything += batch
        checkpoint = json.loads(json.dumps(loader.state_dict()))
    assert len(everything) == 14
    resumed = open_loader()
    resumed.load_state_dict(checkpoint)
    epochs = [list(itertools.chain.from_iterable(resumed)) for _ in range(3)]
    assert [sorted(e) for e in epochs] == [[], sorted(everything), sorted(everything)]


def test_resume_state_of_other_settings_is_refused(cache):
    shuffled = load_cache(cache, layout="raw", columns=["sample_id"], shuffle_buffer=4)
    next(iter(shuffled))
    plain = load_cache(cache, layout="raw", columns=["sample_id"])
    with pytest.raises(ValueError, match=r"saved by a dataset with shuffle_buffer=4; this one expects shuffle_buffer=None"):
        plain.load_state_dict(shuffled.state_dict())
    in_worker = {**plain.state_dict(), "worker": [1, 2]}  # saved by DataLoader worker 1 of 2
    plain.load_state_dict(in_worker)
    with pytest.raises(ValueError, match="saved by DataLoader worker 1 of 2, but it is read by worker 0 of 1"):
        next(iter(plain))


def shard_ids(cache) -> list[list[str]]:
    import pyarrow.parquet as pq

    return [pq.read_table(f, columns=["sample_id"]).column("sample_id").to_pylist() for f in sorted((cache / "data").glob("*.parquet"))]


def test_a_shuffle_buffer_shuffles_the_order_of_the_shards_by_seed_and_epoch(cache):
    """A one-row window permutes no rows, so the stream is whole shards in the shuffled order: that order
    must change with the epoch and the seed, or every epoch starts with the same shard."""
    shards = shard_ids(cache)

    def shard_order(seed: int, epoch: int) -> tuple[int, ...]:
        dataset = load_cache(cache, layout="raw", columns=["sample_id"], shuffle_buffer=1, seed=seed)
        dataset.set_epoch(epoch)
        read = ids(dataset)
        order, start = [], 0
        while start < len(read):
            order.append(next(i for i, shard in enumerate(shards) if read[start : start + len(shard)] == shard))
            start += len(shards[order[-1]])
        assert sorted(order) == [0, 1, 2, 3]  # each shard once, whole and in its own order
        return tuple(order)

    assert len({shard_order(0, epoch) for epoch in range(4)}) > 1
    assert len({shard_order(seed, 0) for seed in range(4)}) > 1


def test_a_state_saved_after_set_epoch_resumes_that_epoch(cache):
    """The loop moved on to epoch 1 and saved mid-epoch: a restart continues epoch 1's order, not epoch 0's."""

    def open_cache(epoch: int | None = None):
        dataset = load_cache(cache, layout="raw", columns=["sample_id"], shuffle_buffer=4, seed=7)
        if epoch is not None:
            dataset.set_epoch(epoch)
        return dataset

    epochs = [ids(open_cache(epoch)) for epoch in (0, 1)]
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1])
    for k in (1, 6, 13):
        saving = open_cache(1)
        head = ids(itertools.islice(saving, k))
        state = json.loads(json.dumps(saving.state_dict()))
        assert state["epoch"] == 1
        resumed = open_cache()
        resumed.load_state_dict(state)
        assert head + ids(resumed) == epochs[1], k
        assert resumed.epoch == 1


def test_a_state_from_another_cache_is_refused(cache, tmp_path):
    """Its positions count another cache's shards and rows: resuming with it would skip or repeat samples."""
    import shutil

    from helpers import record_in_card

    other = tmp_path / "other"
    shutil.copytree(cache, other)
    record_in_card(other, seq_length=2048)  # another build's card: another fingerprint
    saving = load_cache(other, layout="raw", columns=["sample_id"])
    next(iter(saving))
    theirs, mine = read_manifest(other)["fingerprint"], read_manifest(cache)["fingerprint"]
    assert theirs != mine
    with pytest.raises(
        ValueError,
        match=says(
            f"the state was saved by a dataset with fingerprint={theirs!r}; this one expects fingerprint={mine!r}",
            "Open the same cache",
        ),
    ):
        load_cache(cache, layout="raw", columns=["sample_id"]).load_state_dict(saving.state_dict())


def test_a_state_missing_keys_is_refused(cache):
    """A state cut short (or not a StreamingCacheDataset's) says what it holds, not a KeyError at the next read."""
    dataset = load_cache(cache, layout="raw", columns=["sample_id"])
    state = dataset.state_dict()
    del state["position"]
    with pytest.raises(
        ValueError, match=says(f"saved by a dataset with keys {sorted(state)}", "this one expects a StreamingCacheDataset state")
    ):
        dataset.load_state_dict(state)


def test_every_outage_of_a_stream_gets_the_whole_retry_budget(cache, monkeypatch, caplog):
    """A long epoch meets many brief outages: each is retried anew once reading resumed, so outages that
    together outnumber the retries do not stop training."""
    from builder.hub import Retry

    whole = ids(load_cache(cache, layout="raw", columns=["sample_id"]))
    dataset = load_cache(cache, layout="raw", columns=["sample_id"], retry=Retry(retries=1, backoff=0))
    reads, failing = itertools.count(1), {3, 9}

    def with_outages(rows):
        for row in rows:
            if next(reads) in failing:
                raise ConnectionError("connection reset by peer")
            yield row

    opened = dataset._open
    monkeypatch.setattr(dataset, "_open", lambda position: with_outages(opened(position)))
    assert ids(dataset) == whole
    retried = [r.getMessage() for r in caplog.records if r.getMessage().startswith("streaming read failed")]
    assert (
        retried
        == ["streaming read failed (ConnectionError: connection reset by peer); reopening at the current window, retry 1/1 in 0.0s"] * 2
    )


@pytest.mark.parametrize("memory_mapped", [True, False])
def test_a_stream_left_open_at_exit_is_closed_quietly(cache, memory_mapped):
    """A script that stops reading and exits with its iterator still referenced: the read is closed
    at exit while every module still works, so `datasets` prints no "Exception ignored" traceback.
    Shards `datasets` reads itself (from the Hub, or where they cannot be memory-mapped) too."""
    lines = [
        "import sys",
        "import builder.reader",
        *([] if memory_mapped else ["builder.reader.memory_map_local_shards = lambda hf: False"]),
        "rows = iter(builder.reader.load_cache(sys.argv[1], layout='raw', streaming=True))",
        "next(rows)",
        "print('read one row', flush=True)",
    ]
    script = "\n".join(lines) + "\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script, str(cache)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "read one row" in done.stdout, done.stderr[-2000:]
    assert "Exception ignored" not in done.stderr, done.stderr[-2000:]


def damaged_copy(cache, tmp_path, where: slice):
    """A copy of the cache whose second shard has bytes overwritten at `where`; its size stays as recorded."""
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    shard = copy / "data" / "train-00001-of-00004.parquet"
    damaged = bytearray(shard.read_bytes())
    damaged[where] = b"\xff" * len(damaged[where])
    shard.write_bytes(bytes(damaged))
    return copy, shard


@pytest.mark.parametrize("where", [slice(4, 40), slice(-40, -8)], ids=["page header", "footer"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_damaged_shard_is_named_with_what_to_do_when_streamed(cache, tmp_path, where, num_workers):
    """Parquet's own error names no file ("Couldn't deserialize thrift"): the reader says which shard and how to repair it."""
    from builder.local_shards import DamagedShard

    copy, shard = damaged_copy(cache, tmp_path, where)
    loader = torch.utils.data.DataLoader(load_cache(copy, layout="raw"), batch_size=2, num_workers=num_workers, collate_fn=ids)
    with pytest.raises(
        DamagedShard,
        match=says(
            f"{shard}: the shard cannot be read (",
            f"`eagle3-cache verify {copy}` checks every shard against the checksums its card records",
            "delete each shard it names and run the build again with --resume",
        ),
    ):
        list(loader)


def test_a_damaged_shard_read_map_style_says_what_to_do(cache, tmp_path, monkeypatch):
    import datasets

    from builder.local_shards import DamagedShard

    # Arrow files are kept per cache content: the intact cache's, prepared by another test, would be read instead.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    copy, _ = damaged_copy(cache, tmp_path, slice(4, 40))
    with pytest.raises(
        DamagedShard,
        match=says(
            f"{copy}: a shard is damaged: `datasets` could not read its shards (OSError: Couldn't deserialize thrift",
            f"`eagle3-cache verify {copy}` checks every shard against the checksums its card records",
            "delete each shard it names and run the build again with --resume",
        ),
    ):
        load_cache(copy, layout="raw", streaming=False)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_damaged_shard_datasets_streams_itself_is_named_with_what_to_do(cache, tmp_path, monkeypatch, num_workers):
    """Where the shards are not memory-mapped (read through `datasets`' file, as from the Hub), the shard is named
    as where they are: Parquet's own error names no file."""
    import builder.reader as reader
    from builder.local_shards import DamagedShard

    monkeypatch.setattr(reader, "memory_map_local_shards", lambda hf: False)
    copy, shard = damaged_copy(cache, tmp_path, slice(4, 40))
    loader = torch.utils.data.DataLoader(load_cache(copy, layout="raw"), batch_size=2, num_workers=num_workers, collate_fn=ids)
    with pytest.raises(
        DamagedShard,
        match=says(
            f"{shard}: the shard cannot be read (OSError: Couldn't deserialize thrift",
            f"`eagle3-cache verify {copy}` checks every shard against the checksums its card records",
            "delete each shard it names and run the build again with --resume",
        ),
    ):
        list(loader)


@pytest.mark.parametrize("streaming", [True, False])
def test_a_split_the_cache_does_not_hold_is_refused_at_open_without_blaming_the_cache(cache, streaming, monkeypatch):
    """A cache holds one split, `train`: `split="validation"` is the caller's to change, not a damaged cache to verify,
    and is refused before a map-style read prepares every shard."""
    import datasets

    prepared = []
    monkeypatch.setattr(datasets.builder.DatasetBuilder, "download_and_prepare", lambda *a, **k: prepared.append(1))
    with pytest.raises(ValueError, match=says("split: expected 'train'", "got 'validation'", "a cache holds one split, train")) as refused:
        load_cache(cache, layout="raw", split="validation", streaming=streaming)
    assert "verify" not in str(refused.value) and prepared == []


def test_a_slice_of_the_train_split_reads_map_style_and_is_refused_streaming(cache):
    assert (
        ids(load_cache(cache, layout="raw", columns=["sample_id"], split="train[:3]", streaming=False))
        == ids(load_cache(cache, layout="raw", columns=["sample_id"]))[:3]
    )
    with pytest.raises(ValueError, match=says("split: expected 'train'", "got 'train[:3]'", "itertools.islice")):
        load_cache(cache, layout="raw", split="train[:3]", streaming=True)


def test_a_shuffle_buffer_given_as_true_or_a_numpy_int_is_read_as_meant(cache):
    """`shuffle_buffer=True` read as one row per window shuffled no row (only the shard order): refuse it, saying
    to give a number of rows; a numpy int (a config's value) is a number of rows like any int."""
    import numpy as np

    with pytest.raises(ValueError, match=says("shuffle_buffer: expected a positive number of rows", "got True")):
        load_cache(cache, layout="raw", columns=["sample_id"], shuffle_buffer=True)
    given = load_cache(cache, layout="raw", columns=["sample_id"], shuffle_buffer=np.int64(4), seed=7)
    assert ids(given) == ids(load_cache(cache, layout="raw", columns=["sample_id"], shuffle_buffer=4, seed=7))
    assert json.loads(json.dumps(given.state_dict()))["shuffle_buffer"] == 4  # a checkpoint stores it


@pytest.mark.parametrize(
    "option, value", [("draft_vocab_size", 100), ("aux_dtype", torch.float32), ("spread_tail", True)], ids=lambda v: str(v)
)
@pytest.mark.parametrize("streaming", [True, False])
def test_a_raw_read_refuses_the_options_only_decoded_layouts_apply(cache, option, value, streaming):
    """A raw read yields the stored tensors: a draft vocabulary, aux dtype or tail spread it would not apply
    would leave the trainer with the stored 300 columns, or fp32 asked and bf16 read, unseen."""
    with pytest.raises(ValueError, match=says(f"{option}: expected", "with layout='raw'", f"got {value!r}", "layout='nemo'")):
        load_cache(cache, layout="raw", streaming=streaming, **{option: value})
    assert set(next(iter(load_cache(cache, layout="raw", streaming=streaming, **{option: None if option != "spread_tail" else False}))))


def test_a_cache_path_with_a_tilde_is_read_from_the_home_folder(cache, tmp_path, monkeypatch):
    """`~` in a path given to the Python API means the home folder, as the command line's shell reads it; a build
    given `~/...` writes there, not into a folder named `~` under the working directory."""
    monkeypatch.setenv("HOME", str(cache.parent))
    monkeypatch.chdir(tmp_path)
    expected = load_cache(cache, layout="raw", streaming=False)
    for streaming in (True, False):
        read = load_cache(f"~/{cache.name}", layout="raw", streaming=streaming)
        rows = list(read) if streaming else [read[i] for i in range(len(read))]
        assert len(rows) == 14
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(rows, expected))
    assert read_manifest(f"~/{cache.name}")["fingerprint"] == expected.manifest["fingerprint"]
    built = build(small_config("~/built", max_samples=4), progress=False)
    assert built.output_dir.resolve() == (cache.parent / "built").resolve()
    assert (cache.parent / "built" / "README.md").is_file() and not (tmp_path / "~").exists()
