"""Streaming reads decode tensors straight from Arrow buffers: the same samples as decoding the
rows' bytes, raw columns as views of the Parquet values buffer, alive as long as a tensor is."""

from __future__ import annotations

import gc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import small_config

from builder.pipeline import build
from builder.reader import RowDecoder, arrow_rows, load_cache, read_manifest

BUILDS = {
    "probs-zstd-bf16": dict(dtype="bf16"),
    "topk-none": dict(target_format="topk", topk=8, compression="none"),
    "hidden-fp8-zstd": dict(target_format="hidden", aux_dtype="fp8", store_full_head=True, draft_vocab_size=128),
}


@pytest.fixture(scope="module", params=sorted(BUILDS))
def built(request, tmp_path_factory):
    cfg = small_config(tmp_path_factory.mktemp(request.param) / "cache", max_samples=6, **BUILDS[request.param])
    return request.param, build(cfg, progress=False).output_dir


def layouts(name: str) -> list[str]:
    return ["raw", "nemo", "specforge"] if name.startswith("hidden") else ["raw", "nemo"]


def test_streaming_samples_equal_the_row_by_row_decode(built):
    # map-style reads hand the decoder each row's values as Python bytes; streaming, Arrow views
    name, cache = built
    for layout in layouts(name):
        by_bytes = load_cache(cache, layout=layout, streaming=False)
        by_arrow = list(load_cache(cache, layout=layout, streaming=True))
        assert len(by_arrow) == len(by_bytes) == 6
        for i, streamed in enumerate(by_arrow):
            expected = by_bytes[i]
            assert streamed.keys() == expected.keys()
            for key, value in expected.items():
                if isinstance(value, torch.Tensor):
                    assert streamed[key].dtype == value.dtype and torch.equal(streamed[key], value), (layout, i, key)
                else:
                    assert streamed[key] == value, (layout, i, key)


@pytest.fixture(scope="module")
def uncompressed(tmp_path_factory):
    return build(small_config(tmp_path_factory.mktemp("none") / "cache", max_samples=6, compression="none"), progress=False).output_dir


def first_shard_table(cache) -> pa.Table:
    return pq.read_table(sorted((cache / "data").glob("*.parquet"))[0])


def test_raw_columns_are_views_of_the_arrow_values_buffer(uncompressed):
    table = first_shard_table(uncompressed)
    decode = RowDecoder(read_manifest(uncompressed))
    rows = [decode(row) for row in arrow_rows(table)]
    assert len(rows) == table.num_rows > 1
    for name in decode.columns:
        chunk = table.column(name).chunk(0)
        values = chunk.buffers()[2]
        for i, row in enumerate(rows):
            tensor, stored = row[name], chunk[i].as_py()
            assert torch.equal(tensor.reshape(-1).view(torch.uint8), torch.frombuffer(bytearray(stored), dtype=torch.uint8))
            if tensor.numel():  # the tensor's memory lies inside the Arrow buffer: nothing was copied
                start = tensor.data_ptr()
                assert values.address <= start and start + len(stored) <= values.address + values.size, (name, i)


def test_a_view_keeps_its_arrow_memory_alive(uncompressed):
    gc.collect()
    before = pa.total_allocated_bytes()
    table = first_shard_table(uncompressed)
    decode = RowDecoder(read_manifest(uncompressed))
    aux = decode(arrow_rows(table)[1])["aux_hidden_states"]
    expected = aux.clone()
    held = pa.total_allocated_bytes() - before
    del table
    gc.collect()
    churn = [pa.array([bytes(1 << 16)] * 64) for _ in range(4)]  # new Arrow allocations must not reuse it
    assert pa.total_allocated_bytes() - before >= held > 0
    assert torch.equal(aux, expected)
    del aux, churn
    gc.collect()
    assert pa.total_allocated_bytes() - before < held  # the last view gone, the memory is freed


def test_null_and_empty_binary_values_decode(uncompressed):
    array = pa.array([b"\x01\x00\x00\x00", None, b""], type=pa.large_binary())
    rows = arrow_rows(pa.table({"ids": array, "n": [1, 2, 3]}))
    assert [bytes(r["ids"]) if r["ids"] is not None else None for r in rows] == [b"\x01\x00\x00\x00", None, b""]
    assert [r["n"] for r in rows] == [1, 2, 3]
    sliced = arrow_rows(pa.table({"ids": pa.array([b"ab", b"cd", b"ef"]).slice(1)}))
    assert [bytes(r["ids"]) for r in sliced] == [b"cd", b"ef"]


@pytest.mark.parametrize("kind", [pa.binary(), pa.large_binary()], ids=["binary", "large_binary"])
def test_binary_and_large_binary_values_are_both_views_of_the_values_buffer(kind):
    """Arrow gives a column over 2 GiB of values as large_binary: its tensors must be the same views, not copies."""
    stored = [torch.arange(n, dtype=torch.int32) * 7 for n in (3, 5, 1)]
    array = pa.array([t.numpy().tobytes() for t in stored], type=kind)
    manifest = {"columns": {"ids": {"arrow": "binary", "dtype": "int32", "shape": ["L"]}}}
    rows = [RowDecoder(manifest)(row) for row in arrow_rows(pa.table({"ids": array}))]
    values = array.buffers()[2]
    for row, expected in zip(rows, stored):
        assert torch.equal(row["ids"], expected)
        start = row["ids"].data_ptr()
        assert values.address <= start and start + expected.nbytes <= values.address + values.size
