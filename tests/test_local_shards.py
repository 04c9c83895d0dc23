"""Local shards stream memory-mapped: the tables `datasets` would read, the same samples, and
resume states that carry over between the two ways of reading; streams it cannot mirror are left to
`datasets`. Splits by rank read whole shards, or whole row groups (of uneven sizes here)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
from helpers import assert_same_content, small_config

import builder.reader as reader
import builder.stream_exit as stream_exit
from builder.local_shards import MemoryMappedTables, memory_map_local_shards
from builder.pipeline import build
from builder.reader import load_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Shards of 5 rows in row groups sized by bytes, so groups of one shard hold different numbers of rows."""
    cfg = small_config(tmp_path_factory.mktemp("local") / "cache", shard_size=5, dtype="bf16", row_group_bytes=60_000)
    return build(cfg, progress=False).output_dir


def group_rows(cache) -> list[list[int]]:
    files = sorted((cache / "data").glob("*.parquet"))
    return [[pq.ParquetFile(f).metadata.row_group(g).num_rows for g in range(pq.ParquetFile(f).num_row_groups)] for f in files]


def table_source(hf):
    examples = hf._ex_iterable
    while not hasattr(examples, "generate_tables_fn"):
        examples = examples.ex_iterable
    return examples


def datasets_stream(cache, columns=None):
    return datasets.load_dataset(str(cache), split="train", streaming=True, columns=columns)


def test_the_cache_has_uneven_row_groups(cache):
    rows = group_rows(cache)
    assert any(len(set(groups)) > 1 for groups in rows), rows  # otherwise the tests below prove less


@pytest.mark.parametrize("resharded", [False, True])
@pytest.mark.parametrize("columns", [None, ["sample_id", "aux_hidden_states"]])
def test_memory_mapped_tables_are_the_tables_datasets_reads(cache, resharded, columns):
    hf = datasets_stream(cache, columns)
    if resharded:
        hf = hf.reshard()  # one shard per row group, as a split across more ranks than files reads
    examples = table_source(hf)
    theirs = list(examples.generate_tables_fn(**examples.kwargs))
    ours = list(MemoryMappedTables(columns, hf.features.arrow_schema)(**examples.kwargs))
    assert [key for key, _ in ours] == [key for key, _ in theirs]
    assert len(theirs) > len(group_rows(cache))  # more tables than files: the batching was exercised
    for (_, mine), (_, expected) in zip(ours, theirs):
        assert mine.equals(expected, check_metadata=True)


def without_memory_map(monkeypatch):
    monkeypatch.setattr(reader, "memory_map_local_shards", lambda hf: False)


def test_load_cache_streams_local_shards_memory_mapped_and_the_samples_are_the_same(cache, monkeypatch):
    mapped = load_cache(cache, layout="nemo")
    assert isinstance(table_source(mapped.hf_dataset).generate_tables_fn, MemoryMappedTables)
    with monkeypatch.context() as patched:
        without_memory_map(patched)
        through_datasets = load_cache(cache, layout="nemo")
        assert not isinstance(table_source(through_datasets.hf_dataset).generate_tables_fn, MemoryMappedTables)
        expected = list(through_datasets)
    assert len(expected) == 14
    assert_same_content(list(mapped), expected)


def ids(rows) -> list[str]:
    return [row["sample_id"] for row in rows]


@pytest.mark.parametrize("shuffle_buffer", [None, 3])
def test_a_resume_state_carries_over_between_the_two_ways_of_reading(cache, monkeypatch, shuffle_buffer):
    def open_cache(mapped: bool):
        with monkeypatch.context() as patched:
            if not mapped:
                without_memory_map(patched)
            return load_cache(cache, layout="raw", columns=["sample_id"], shuffle_buffer=shuffle_buffer, seed=5)

    whole = ids(open_cache(True))
    assert whole == ids(open_cache(False)) and len(whole) == 14
    for saved_by, resumed_by in ((True, False), (False, True)):
        for k in (1, 4, 6, 13):  # inside a first row group, across row groups and shards
            first = open_cache(saved_by)
            head = ids(itertools.islice(first, k))
            state = json.loads(json.dumps(first.state_dict()))
            second = open_cache(resumed_by)
            second.load_state_dict(state)
            assert head + ids(second) == whole, (saved_by, k)


def test_a_memory_mapped_stream_stopped_early_leaves_no_shard_file_open(cache, monkeypatch):
    monkeypatch.setattr(stream_exit, "STREAMED_SHARDS", set())
    rows = iter(load_cache(cache, layout="raw", columns=["sample_id"]))
    next(rows)
    assert stream_exit.shard_files(closed_only=False) == []  # no Python file object: nothing for the exit to wait on
    assert not stream_exit.STREAMED_SHARDS  # so none is recorded: a closed file of a shard that a user keeps is not Arrow's
    assert mapped_shards()  # read memory-mapped...
    rows.close()
    assert mapped_shards() == []  # ...and unmapped once the stream stops


def mapped_shards() -> list[str]:
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    return [line.split()[-1] for line in maps.read_text().splitlines() if line.endswith(".parquet")]


def test_other_streams_are_left_to_datasets(cache, tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"a": 1}\n{"a": 2}\n')
    rows = datasets.load_dataset("json", data_files=str(jsonl), split="train", streaming=True)
    assert memory_map_local_shards(rows) is False
    assert [row["a"] for row in rows] == [1, 2]
    filtered = datasets.load_dataset(str(cache), split="train", streaming=True, filters=[("num_tokens", ">", 0)])
    assert memory_map_local_shards(filtered) is False  # an option the memory-mapped source does not apply
    rebatched = datasets.load_dataset(str(cache), split="train", streaming=True, batch_size=2)
    assert memory_map_local_shards(rebatched) is False  # another batching than a row group's
    assert memory_map_local_shards(datasets_stream(cache)) is True


def test_shards_that_are_not_files_on_disk_are_left_to_datasets(cache, tmp_path):
    """A shard inside an archive has no file to memory-map: datasets reads it through its own file system."""
    import zipfile

    good = sorted((cache / "data").glob("*.parquet"))[0]
    archive = tmp_path / "shards.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.write(good, "train.parquet")
    rows = datasets.load_dataset("parquet", data_files=f"zip://train.parquet::{archive}", split="train", streaming=True)
    assert memory_map_local_shards(rows) is False
    assert ids(rows) == pq.read_table(good, columns=["sample_id"]).column("sample_id").to_pylist()


def test_a_shard_without_row_groups_yields_no_table_as_in_datasets(cache, tmp_path):
    """A Parquet file written with no row group (a writer closed before its first batch) holds no rows:
    the memory-mapped source passes over it as datasets does, and reads the next file."""
    good = sorted((cache / "data").glob("*.parquet"))[0]
    empty = tmp_path / "empty.parquet"
    pq.ParquetWriter(empty, pq.read_schema(good)).close()
    assert pq.ParquetFile(empty).num_row_groups == 0
    hf = datasets.load_dataset("parquet", data_files=[str(empty), str(good)], split="train", streaming=True)
    examples = table_source(hf)
    theirs = list(examples.generate_tables_fn(**examples.kwargs))
    assert memory_map_local_shards(hf) is True
    ours = list(examples.generate_tables_fn(**examples.kwargs))
    assert [key for key, _ in ours] == [key for key, _ in theirs] and {key.original_shard_id for key, _ in ours} == {1}
    for (_, mine), (_, expected) in zip(ours, theirs):
        assert mine.equals(expected, check_metadata=True)
    assert ids(hf) == pq.read_table(good, columns=["sample_id"]).column("sample_id").to_pylist()


@pytest.mark.parametrize("columns", [None, ["sample_id", "aux_hidden_states"]])
def test_the_installed_source_reads_the_columns_and_schema_datasets_reads(cache, columns):
    """What `memory_map_local_shards` puts in place yields datasets' tables: the projected columns, and
    the schema's metadata (its features) that datasets casts every table to."""
    hf = datasets_stream(cache, columns)
    examples = table_source(hf)
    theirs = list(examples.generate_tables_fn(**examples.kwargs))
    assert theirs[0][1].schema.metadata  # the features, which the tables must keep
    assert memory_map_local_shards(hf) is True
    assert isinstance(examples.generate_tables_fn, MemoryMappedTables)
    ours = list(examples.generate_tables_fn(**examples.kwargs))
    assert len(ours) == len(theirs)
    for (_, mine), (_, expected) in zip(ours, theirs):
        assert mine.equals(expected, check_metadata=True)


# ---- splitting by rank: whole files, or whole row groups when files are fewer than ranks ----------


def row_group_ids(cache) -> list[list[list[str]]]:
    """The sample ids of each row group of each shard."""
    shards = []
    for file in sorted((cache / "data").glob("*.parquet")):
        parquet = pq.ParquetFile(file)
        shards.append(
            [parquet.read_row_group(g, columns=["sample_id"]).column("sample_id").to_pylist() for g in range(parquet.num_row_groups)]
        )
    return shards


@pytest.mark.parametrize("world_size", [3, 4])
def test_ranks_read_whole_shards_and_whole_row_groups_only_when_shards_are_fewer(cache, caplog, world_size):
    """Three shards: three ranks read one whole shard each. Four ranks: whole row groups, one in four each,
    rather than every rank reading all the cache to keep one row in four. Rank 0 says how many samples
    each rank gets."""
    shards = row_group_ids(cache)
    assert len(shards) == 3
    if world_size <= len(shards):
        parts = [shards[rank::world_size] for rank in range(world_size)]
    else:
        groups = [group for shard in shards for group in shard]
        parts = [[groups[rank::world_size]] for rank in range(world_size)]
    expected = [[sample for shard in part for group in shard for sample in group] for part in parts]
    read = [ids(load_cache(cache, layout="raw", columns=["sample_id"], rank=rank, world_size=world_size)) for rank in range(world_size)]
    assert read == expected
    counts = [len(part) for part in expected]
    warnings = [r.getMessage() for r in caplog.records if "the split gives the ranks" in r.getMessage()]
    assert len(warnings) == 1 and f"the split gives the ranks {counts} samples" in warnings[0]


@pytest.mark.parametrize("on_bad_files", ["skip", "warn"])
def test_a_stream_that_skips_bad_files_is_left_to_datasets(cache, tmp_path, on_bad_files):
    """`on_bad_files="skip"` or `"warn"`: datasets passes over an unreadable file, which the memory-mapped source would raise on."""
    good = sorted((cache / "data").glob("*.parquet"))[0]
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not a Parquet file" * 8)
    rows = datasets.load_dataset("parquet", data_files=[str(good), str(bad)], split="train", streaming=True, on_bad_files=on_bad_files)
    assert memory_map_local_shards(rows) is False
    assert [row["sample_id"] for row in rows] == pq.read_table(good, columns=["sample_id"]).column("sample_id").to_pylist()
