"""Shard encoding and writing: bit-exact byte planes + zstd, checksums, thread-independent bytes."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import xxhash
from helpers import batch_rows

from builder import shards
from builder.config import BuildConfig, validate
from builder.errors import ConfigError, WriteFailed
from builder.formats import TORCH_DTYPES, Layout
from builder.plan import writer_feed_warning
from builder.reader import RowDecoder
from builder.shards import PLANES_ZSTD, RAW, column_encodings, decode_value, encode_value
from builder.writer import BackgroundWriter, BatchOutput

FLOAT_DTYPES = ("bf16", "fp16", "fp32", "fp8")
INT_DTYPES = ("int16", "int32", "uint8")


def stored(tensor: torch.Tensor, encoding: str = PLANES_ZSTD) -> bytes:
    return b"".join(encode_value(tensor, encoding).parts)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads and -0.0 included), dtype and shape too."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.fixture(scope="module")
def activations():
    """Real activations: the embedded tiny-llama's hidden states and next-token probs on chat tokens."""
    from transformers import AutoModelForCausalLM

    from builder.embedded import resolve_target

    model = AutoModelForCausalLM.from_pretrained(resolve_target("tiny-llama"), dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    hidden = torch.cat([out.hidden_states[i] for i in (2, 4, 5)], dim=-1).reshape(-1, 3 * model.config.hidden_size)
    return {"hidden": hidden, "probs": out.logits.softmax(-1).reshape(-1, model.config.vocab_size)}


def random_values(dtype: str, n: int = 5000) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if dtype in INT_DTYPES:
        info = torch.iinfo(TORCH_DTYPES[dtype])
        return torch.randint(info.min, info.max, (n,), generator=gen, dtype=torch.int64).to(TORCH_DTYPES[dtype])
    values = torch.randn(n, generator=gen) * 10
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3e-39, 65504.0, 448.0])
    values[: len(special)] = special
    return values.to(TORCH_DTYPES[dtype])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + INT_DTYPES)
def test_random_values_round_trip_bit_exact(dtype):
    values = random_values(dtype)
    decoded = decode_value(stored(values), values.dtype)
    assert same_bits(decoded, values)


@pytest.mark.parametrize("encoding", [PLANES_ZSTD, RAW])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + INT_DTYPES)
def test_a_value_encodes_the_same_from_its_numpy_words(dtype, encoding):
    """The writer hands rows over as numpy words (HostWords), not tensors: the same stored bytes."""
    values = random_values(dtype).reshape(50, 100)
    words = shards.HostWords.of(values)[10:30]  # a row slice, as the writer takes one
    assert stored(words, encoding) == stored(values[10:30], encoding)
    assert same_bits(decode_value(stored(words), values.dtype), values[10:30].reshape(-1))


ELEMENT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)
ELEMENT_DTYPES += (torch.bool, torch.uint8, torch.int16, torch.int32, torch.int64)
SAME_SIZE_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.mark.parametrize("dtype", ELEMENT_DTYPES, ids=str)
def test_rows_of_strided_batches_store_their_own_bytes(dtype):
    """A batch column may be a strided view (transposed, or a slice of a wider tensor): each row
    the writer slices from its HostWords stores exactly that row's elements, empty rows included."""
    gen = torch.Generator().manual_seed(4)
    ints = SAME_SIZE_INTS[dtype.itemsize]
    high = 2 if dtype == torch.bool else 256  # otherwise any bits: NaN payloads and subnormals too
    base = torch.randint(0, high, (5, 9, 24 * dtype.itemsize + 8), generator=gen, dtype=torch.uint8)[..., 8:].view(dtype)
    views = {"transposed": base.transpose(0, 1), "column slice": base[..., 5:19], "every other row": base.reshape(-1, base.shape[-1])[::2]}
    for name, view in views.items():
        words = shards.HostWords.of(view)
        for index in [(1, slice(0, 4)), (2, slice(0, 0)), (0, slice(None))] if view.dim() == 3 else [slice(3, 11), slice(6, 6)]:
            want = view[index].contiguous().view(ints).reshape(-1)
            assert stored(words[index], RAW) == want.numpy().tobytes(), (name, index)
            got = decode_value(stored(words[index]), dtype)
            assert got.dtype == dtype and torch.equal(got.view(ints), want), (name, index)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_real_activations_round_trip_bit_exact_and_shrink(activations, dtype):
    for name, tensor in activations.items():
        values = tensor.to(TORCH_DTYPES[dtype]).reshape(-1)
        data = stored(values)
        assert same_bits(decode_value(data, values.dtype), values), name
        assert len(data) < values.numel() * values.element_size(), name  # the exponent plane compresses


def test_bf16_activations_compress_by_their_exponent_plane(activations):
    values = activations["hidden"].to(torch.bfloat16).reshape(-1)
    encoded = encode_value(values, PLANES_ZSTD)
    data = b"".join(encoded.parts)
    n, k = struct.unpack_from("<QB", data, 0)  # the documented header: elements, planes, then (codec, size) per plane
    (top_codec, top_size), (low_codec, low_size) = struct.iter_unpack("<BQ", data[9 : 9 + 9 * k])
    assert (n, k) == (values.numel(), 2) and len(data) == 9 + 9 * k + top_size + low_size
    assert top_codec == 1 and top_size < n / 2  # sign and exponent: zstd, a few bits of entropy per value
    assert low_codec == 0 and low_size == n  # mantissa bits, close to random: stored as is, not worth zstd's time
    assert data[-n:] == values.view(torch.uint8)[0::2].numpy().tobytes()  # the low byte of each value, in order
    assert encoded.nbytes == len(data) < values.numel() * 2 / 1.3 and encoded.raw_nbytes == values.numel() * 2


def test_incompressible_values_cost_only_the_header():
    noise = torch.randint(0, 256, (100_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    for dtype in (torch.uint8, torch.int32, torch.float8_e4m3fn):
        values = noise.view(dtype)
        data = stored(values)
        assert len(data) <= noise.numel() + 9 + 9 * values.element_size()
        assert same_bits(decode_value(data, dtype), values)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + INT_DTYPES)
def test_empty_values_round_trip(dtype):
    empty = torch.empty(0, dtype=TORCH_DTYPES[dtype])
    assert same_bits(decode_value(stored(empty), empty.dtype), empty)


@pytest.mark.parametrize("dtype", ELEMENT_DTYPES, ids=str)
def test_strided_tensors_of_any_size_encode_their_own_elements(dtype):
    """A tensor (not HostWords) with a non-unit stride: `contiguous()` leaves 0- and 1-element ones as they are."""
    ints = SAME_SIZE_INTS[dtype.itemsize]
    base = (torch.arange(1, 17) % (2 if dtype == torch.bool else 64)).to(ints).view(dtype)  # bools: 0 or 1
    for view in (base[::2], base[::2][:1], base[::2][:0], base.view(4, 4).t()[1]):
        want = view.contiguous().view(ints).reshape(-1)
        assert stored(view, RAW) == want.numpy().tobytes(), view.stride()
        assert torch.equal(decode_value(stored(view), dtype).view(ints), want), view.stride()


def test_raw_encoding_is_the_tensor_bytes_without_a_copy():
    values = torch.arange(10, dtype=torch.float32)
    encoded = encode_value(values, RAW)
    assert b"".join(encoded.parts) == values.numpy().tobytes()
    assert encoded.parts[0].ctypes.data == values.data_ptr()  # a view of the tensor's memory


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + INT_DTYPES)
def test_a_value_decodes_with_the_dtype_name_its_manifest_records(dtype):
    values = random_values(dtype)
    assert same_bits(decode_value(stored(values), dtype), values)


def test_a_dtype_name_no_manifest_records_is_refused():
    with pytest.raises(ValueError, match=r"dtype 'float32': expected a torch dtype or a column dtype a manifest records, one of \['bf16'"):
        decode_value(stored(torch.ones(4)), "float32")


def test_a_value_decoded_as_another_dtype_is_refused():
    data = stored(torch.ones(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"2 byte planes, but its column's dtype torch.float32 has 4 bytes per element"):
        decode_value(data, torch.float32)


def test_reader_refuses_an_unknown_encoding():
    manifest = {"columns": {"aux_hidden_states": {"arrow": "binary", "dtype": "bf16", "shape": ["L", 4], "encoding": "lz9"}}}
    with pytest.raises(ValueError, match=r"encoding\(s\) \['lz9'\].*upgrade eagle3-cache"):
        RowDecoder(manifest)


# ---- the background writer on synthetic batches (no model) ---------------------------------------

LAYOUT = Layout("probs", "bf16", "bf16", 64, 48, 3 * 40, 40)


def synthetic_batches(num_rows: int = 12, batch: int = 3):
    """Batches as the forward hands them over: padded per-token tensors, per-loss rows."""
    gen = torch.Generator().manual_seed(3)
    per_loss = frozenset({"target_argmax", "target_probs"})
    batches = []
    for start in range(0, num_rows, batch):
        lengths = [int(x) for x in torch.randint(5, 60, (batch,), generator=gen)]
        masks = [(torch.rand(n, generator=gen) < 0.7).to(torch.uint8) for n in lengths]
        samples = [
            {
                "sample_id": f"s{start + b}",
                "source_index": start + b,
                "num_tokens": n,
                "num_loss_tokens": int(m.sum()),
                "input_ids": torch.randint(0, 1000, (n,), generator=gen).tolist(),
                "loss_mask": m.tolist(),
            }
            for b, (n, m) in enumerate(zip(lengths, masks))
        ]
        n_loss = sum(s["num_loss_tokens"] for s in samples)
        scales = torch.rand(LAYOUT.aux_width, generator=gen) * 3
        columns = {
            "aux_hidden_states": (torch.randn(batch, max(lengths), LAYOUT.aux_width, generator=gen) * scales).to(torch.bfloat16),
            "target_argmax": torch.randint(0, 1000, (n_loss,), generator=gen, dtype=torch.int32),
            "target_probs": torch.randn(n_loss, LAYOUT.draft_vocab_size, generator=gen).softmax(-1).to(torch.bfloat16),
        }
        batches.append(BatchOutput(list(range(start, start + batch)), samples, columns, per_loss, torch.ones(batch, dtype=torch.bool), {}))
    return batches


def write_shard(path, batches, *, threads: int, compression: str = "zstd", row_group_bytes: int = 20_000) -> dict:
    done = []
    writer = BackgroundWriter(
        LAYOUT, torch.ones(1000, dtype=torch.bool), row_group_bytes, on_shard_done=done.append, compression=compression, threads=threads
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.open_shard(path)
    for b in batches:
        writer.submit(b)
    writer.end_window(sum(len(b.samples) for b in batches))
    writer.close_shard()
    writer.finish()
    return done[0]


def read_rows(path, compression: str) -> list[dict]:
    encodings = column_encodings(LAYOUT, compression)
    manifest = {"columns": {name: {"arrow": "binary", **spec, "encoding": encodings[name]} for name, spec in LAYOUT.columns().items()}}
    decode = RowDecoder(manifest)
    return [decode(row) for row in pq.read_table(path).to_pylist()]


def expected_rows(batches) -> list[dict]:
    rows = batch_rows(batches)
    return [rows[p] for p in sorted(rows)]


def test_shard_bytes_do_not_depend_on_the_writer_threads(tmp_path):
    batches = synthetic_batches()
    one = write_shard(tmp_path / "one" / "data" / "s.parquet", batches, threads=1)
    four = write_shard(tmp_path / "four" / "data" / "s.parquet", batches, threads=4)
    assert (tmp_path / "one/data/s.parquet").read_bytes() == (tmp_path / "four/data/s.parquet").read_bytes()
    assert one["checksum"] == four["checksum"] == xxhash.xxh3_128((tmp_path / "one/data/s.parquet").read_bytes()).hexdigest()
    assert pq.ParquetFile(tmp_path / "one/data/s.parquet").num_row_groups > 2  # checksummed across several row groups


def test_the_checksum_covers_the_whole_file_when_flushed_in_small_steps(tmp_path, monkeypatch):
    """The checksum thread hashes and flushes the file while Parquet writes it: in whatever steps,
    the checksum is the whole file's and the bytes are the same."""
    batches = synthetic_batches()
    whole = write_shard(tmp_path / "whole" / "data" / "s.parquet", batches, threads=2)
    started = []
    start_writeback = shards._start_writeback

    def start_and_record(fd, offset, length):
        started.append(length)
        start_writeback(fd, offset, length)

    monkeypatch.setattr(shards, "FLUSH_BYTES", 1024)
    monkeypatch.setattr(shards, "_start_writeback", start_and_record)
    stepped = write_shard(tmp_path / "stepped" / "data" / "s.parquet", batches, threads=2)
    data = (tmp_path / "stepped/data/s.parquet").read_bytes()
    assert data == (tmp_path / "whole/data/s.parquet").read_bytes()
    assert stepped["checksum"] == whole["checksum"] == xxhash.xxh3_128(data).hexdigest()
    assert started and min(started) >= 1024 and sum(started) <= len(data)  # disk writes started before the close


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_written_rows_decode_to_the_forward_tensors(tmp_path, compression):
    batches = synthetic_batches()
    info = write_shard(tmp_path / "data" / "s.parquet", batches, threads=2, compression=compression)
    rows = read_rows(tmp_path / "data" / "s.parquet", compression)
    expected = expected_rows(batches)
    assert info["rows"] == len(rows) == len(expected) == 12
    assert info["loss_tokens"] == sum(len(r["target_argmax"]) for r in expected)
    for got, want in zip(rows, expected):
        assert got["sample_id"] == want["sample_id"]
        for name in LAYOUT.columns():
            assert same_bits(got[name].reshape(-1), want[name].reshape(-1)), name


def test_zstd_shard_is_smaller_than_the_raw_one(tmp_path):
    batches = synthetic_batches()
    zstd = write_shard(tmp_path / "z" / "data" / "s.parquet", batches, threads=2)
    raw = write_shard(tmp_path / "r" / "data" / "s.parquet", batches, threads=2, compression="none")
    assert zstd["bytes"] < raw["bytes"] / 1.2


# ---- flags and the start-up warning -------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(compression="lz4"), r"--compression: expected one of zstd, none, got 'lz4'"),
        (dict(writer_threads=0), r"--writer-threads: expected an integer >= 1, got 0"),
    ],
)
def test_writer_flags_are_checked(tmp_path, change, message):
    cfg = BuildConfig(target_model="tiny-llama", input_data="sample-chats", output_dir=str(tmp_path / "out"), **change)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_the_writer_warning_names_the_threads_that_keep_up():
    # Llama-3.1-8B, probs at Vd 32000, 77% loss-masked: 24,581 + 0.77 x 64,004 bytes per token before compression.
    per_token = 24_581 + 0.77 * 64_004
    message = writer_feed_warning(tokens_per_s=25_000, bytes_per_token=per_token, per_thread_mb_s=400, threads=2, cores=16, basis="test")
    assert "--writer-threads 5" in message and "1,847 MB/s" in message and "800 MB/s" in message
    assert (
        writer_feed_warning(tokens_per_s=25_000, bytes_per_token=per_token, per_thread_mb_s=400, threads=5, cores=16, basis="test") is None
    )
    short = writer_feed_warning(tokens_per_s=25_000, bytes_per_token=per_token, per_thread_mb_s=400, threads=2, cores=4, basis="test")
    assert "even 4 threads" in short and "--target-format topk" in short and "--aux-dtype fp8" in short


def test_a_format_1_cache_still_reads_and_verifies(tmp_path):
    """Caches written before column encodings (raw columns, sha256 checksums) stay readable and checkable."""
    from helpers import assert_same_content, decoded_rows, small_config
    from huggingface_hub import DatasetCard

    from builder.files import file_hash
    from builder.pipeline import build
    from builder.verify import verify_cache

    out = build(small_config(tmp_path / "cache", max_samples=6, compression="none"), progress=False).output_dir
    before = decoded_rows(out)
    card = DatasetCard.load(out / "README.md")
    manifest = card.data["eagle3_cache"]
    del manifest["checksum_algorithm"]
    for spec in manifest["columns"].values():
        spec.pop("encoding", None)
    for record, path in [(s, out / "data" / s["name"]) for s in manifest["shards"]] + [
        (manifest["vocab_file"], out / manifest["vocab_file"]["path"])
    ]:
        del record["checksum"]
        record["sha256"] = file_hash(path, "sha256")
    card.save(out / "README.md")
    assert verify_cache(out) == []
    assert_same_content(decoded_rows(out), before)
    shard = out / "data" / manifest["shards"][0]["name"]
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 1
    shard.write_bytes(bytes(damaged))
    repair = f"to repair: delete data/{shard.name} and run the build again with --resume (it rebuilds only the missing shards)"
    assert verify_cache(out) == [f"data/{shard.name}: checksum differs from the manifest (the file is damaged); {repair}"]


def test_the_forward_estimate_gives_25k_tokens_per_s_for_an_8b_on_an_h100():
    from transformers import LlamaConfig, LlamaForCausalLM

    from builder.plan import forward_tokens_per_s

    config = LlamaConfig(
        hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256
    )
    with torch.device("meta"):  # shapes only, no memory
        model = LlamaForCausalLM(config)
    rate = forward_tokens_per_s(model, "NVIDIA H100 80GB HBM3", loss_share=0.77)
    assert 23_000 < rate < 27_000
    assert forward_tokens_per_s(model, "NVIDIA H100 PCIe", loss_share=0.77) < rate  # a lower peak
    assert forward_tokens_per_s(model, "Some Future GPU", loss_share=0.77) is None


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names a descriptor's file through /proc")
def test_a_shards_bytes_are_fsynced_before_it_takes_its_name(tmp_path, monkeypatch):
    """A power cut keeps a rename but not necessarily the bytes written before it: a shard's name
    may only point at bytes already on disk, or a resume would trust a torn file as finished."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def recording_replace(src, dst):
        events.append(("rename", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    path = tmp_path / "data" / "s.parquet"
    write_shard(path, synthetic_batches(), threads=2)
    (shard_renamed,) = [k for k, event in enumerate(events) if event[0] == "rename" and event[2] == str(path)]
    temp_name = events[shard_renamed][1]
    assert ("fsync", temp_name) in events[:shard_renamed]


def test_a_shard_whose_checksum_read_stops_short_of_the_end_is_refused(tmp_path, monkeypatch):
    """A checksum recorded for a file must cover all of it: when reading the file back ends early
    (the file changed under the writer), the shard fails instead of recording a shorter file's hash."""
    real_preadv = os.preadv

    def nothing_past_the_first_kilobyte(fd, buffers, offset):
        return 0 if offset >= 1024 else real_preadv(fd, [buffers[0][: 1024 - offset]], offset)

    monkeypatch.setattr(os, "preadv", nothing_past_the_first_kilobyte)
    path = tmp_path / "data" / "s.parquet"
    with pytest.raises(WriteFailed, match=r"read back 1024 of its \d+ bytes to checksum it; the file changed while written"):
        write_shard(path, synthetic_batches(), threads=2)
    assert not path.exists()
