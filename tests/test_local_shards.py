"""Local shards stream memory-mapped: the tables `datasets` would read, the same samples, and
resume states that carry over between the two ways of reading."""

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
    assert stream_exit.STREAMED_SHARDS  # the shards are still recorded, for a read that falls back to datasets
    assert stream_exit.shard_files(closed_only=False) == []  # no Python file object: nothing for the exit to wait on
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


def test_a_stream_that_skips_bad_files_is_left_to_datasets(cache, tmp_path):
    """`on_bad_files="skip"`: datasets passes over an unreadable file, which the memory-mapped source would raise on."""
    good = sorted((cache / "data").glob("*.parquet"))[0]
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not a Parquet file" * 8)
    rows = datasets.load_dataset("parquet", data_files=[str(good), str(bad)], split="train", streaming=True, on_bad_files="skip")
    assert memory_map_local_shards(rows) is False
    assert [row["sample_id"] for row in rows] == pq.read_table(good, columns=["sample_id"]).column("sample_id").to_pylist()
