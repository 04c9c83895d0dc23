"""The background shard writer: rows round-trip bit-exact, bytes independent of the writer
threads, stored byte planes as documented, and a failing thread (dispatch, encoder, checksum)
surfaces at the forward's next call, leaves no shard, and an abort stops every thread."""

from __future__ import annotations

import errno
import os
import struct
import threading
from concurrent import futures
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import xxhash
from helpers import batch_rows, says

import builder.shards as shards_module
from builder.build_state import sidecar_path
from builder.errors import DiskFull, WriteFailed
from builder.formats import TORCH_DTYPES, Layout
from builder.reader import RowDecoder
from builder.shards import PLANES_ZSTD, HostWords, column_encodings, encode_value
from builder.writer import BackgroundWriter, BatchOutput, OrderedEncoderPool

LAYOUTS = {
    "probs": Layout("probs", "bf16", "bf16", 64, 48, 3 * 40, 40),
    "topk_fp8": Layout("topk", "bf16", "fp8", 8, 48, 3 * 40, 40),  # fp16 values, int16 ids, fp8 aux + fp32 scales
}
WINDOWS = ((7, 3), (5, 2))  # (rows, batch size) per window: a shard is two windows


def column_values(spec: dict, rows: int, gen: torch.Generator, layout: Layout) -> torch.Tensor:
    """Values of a layout column for `rows` rows (per token or per loss), of its stored dtype."""
    dtype = TORCH_DTYPES[spec["dtype"]]
    width = [int(s) for s in spec["shape"][1:]]
    shape = (rows, *width)
    if dtype.is_floating_point:
        scales = torch.rand(shape[-1] if width else 1, generator=gen) * 3  # per-channel scales, as activations have
        return (torch.randn(shape, generator=gen) * scales).to(dtype)
    high = min(torch.iinfo(dtype).max, max(layout.draft_vocab_size, 1000))
    return torch.randint(0, high, shape, generator=gen, dtype=torch.int64).to(dtype)


def window_batches(layout: Layout, seed: int, first_row: int) -> list[list[BatchOutput]]:
    """Per window, the batches the forward hands over: padded [B, T, ...] per-token tensors and
    per-loss rows, one sample in the second window non-finite (recorded, not written)."""
    gen = torch.Generator().manual_seed(seed)
    columns = {k: v for k, v in layout.columns().items() if k not in ("input_ids", "loss_mask")}
    per_loss = frozenset(k for k, v in columns.items() if v["per"] == "loss")
    windows, row = [], first_row
    for w, (num_rows, batch) in enumerate(WINDOWS):
        batches = []
        for start in range(0, num_rows, batch):
            positions = list(range(start, min(start + batch, num_rows)))
            lengths = [int(x) for x in torch.randint(3, 50, (len(positions),), generator=gen)]
            masks = [(torch.rand(n, generator=gen) < 0.6).to(torch.uint8) for n in lengths]
            samples = []
            for n, m in zip(lengths, masks):
                ids = torch.randint(0, 1000, (n,), generator=gen).tolist()
                samples.append(
                    {
                        "sample_id": f"s{row}",
                        "source_index": row,
                        "num_tokens": n,
                        "num_loss_tokens": int(m.sum()),
                        "input_ids": ids,
                        "loss_mask": m.tolist(),
                    }
                )
                row += 1
            n_loss = sum(s["num_loss_tokens"] for s in samples)
            tensors = {}
            for name, spec in columns.items():
                if name in per_loss:
                    tensors[name] = column_values(spec, n_loss, gen, layout)
                else:
                    flat = column_values(spec, len(samples) * max(lengths), gen, layout)
                    tensors[name] = flat.reshape(len(samples), max(lengths), *flat.shape[1:])
            finite = torch.ones(len(samples), dtype=torch.bool)
            if w == 1 and start == 0:
                finite[1] = False
            batches.append(BatchOutput(positions, samples, tensors, per_loss, finite, {}))
        windows.append(batches)
    return windows


def write_shards(out, layout: Layout, shards: list, *, threads: int, compression: str = "zstd") -> list[dict]:
    """Write each shard's windows through one BackgroundWriter (as build.build drives it); the sidecars."""
    (out / "data").mkdir(parents=True)
    done: list[dict] = []
    writer = BackgroundWriter(
        layout, torch.ones(1000, dtype=torch.bool), 4_000, on_shard_done=done.append, compression=compression, threads=threads
    )
    try:
        for k, windows in enumerate(shards):
            writer.open_shard(out / "data" / f"s{k}.parquet")
            for batches, (num_rows, _) in zip(windows, WINDOWS):
                for batch in batches:
                    writer.submit(batch)
                writer.end_window(num_rows)
            writer.close_shard()
        writer.finish()
    except BaseException:
        writer.abort()  # as the build does: the threads stop, the shard in progress is removed
        raise
    return done


def forward_rows(windows) -> list[dict]:
    """The rows a shard must hold, in build order: every finite sample's row."""
    rows = []
    for batches in windows:
        found = batch_rows(batches)
        rows += [found[p] for p in sorted(found)]
    return rows


def decoded_rows(path, layout: Layout, compression: str) -> list[dict]:
    encodings = column_encodings(layout, compression)
    manifest = {"columns": {name: {"arrow": "binary", **spec, "encoding": encodings[name]} for name, spec in layout.columns().items()}}
    decode = RowDecoder(manifest)
    return [decode(row) for row in pq.read_table(path).to_pylist()]


@pytest.mark.parametrize("compression", ["zstd", "none"])
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_rows_round_trip_bit_exact_over_windows_and_shards(tmp_path, layout_name, compression):
    layout = LAYOUTS[layout_name]
    shards = [window_batches(layout, seed=k, first_row=100 * k) for k in range(2)]
    infos = write_shards(tmp_path, layout, shards, threads=2, compression=compression)
    assert [i["name"] for i in infos] == ["s0.parquet", "s1.parquet"]
    for info, windows in zip(infos, shards):
        path = tmp_path / "data" / info["name"]
        want, got = forward_rows(windows), decoded_rows(path, layout, compression)
        assert [r["sample_id"] for r in got] == [r["sample_id"] for r in want]
        assert len(got) == info["rows"] == sum(n for n, _ in WINDOWS) - 1
        assert [f["reason"] for f in info["failed"]] == ["non_finite_output"]
        assert info["loss_tokens"] == sum(len(r["target_argmax"]) for r in want)
        assert info["checksum"] == xxhash.xxh3_128(path.read_bytes()).hexdigest()
        assert pq.ParquetFile(path).num_row_groups > 2
        for g, w in zip(got, want):
            for name in layout.columns():
                assert torch.equal(g[name].reshape(-1).view(torch.uint8), w[name].reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_writer_threads_give_identical_bytes(tmp_path, layout_name):
    layout = LAYOUTS[layout_name]
    shards = [window_batches(layout, seed=7, first_row=0)]
    written = {}
    for threads in (1, 2, 3):
        info = write_shards(tmp_path / f"t{threads}", layout, shards, threads=threads)[0]
        written[threads] = ((tmp_path / f"t{threads}" / "data" / "s0.parquet").read_bytes(), info["checksum"])
    assert written[1] == written[2] == written[3]


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32", "fp8", "int16", "int32", "uint8"])
def test_stored_planes_are_the_values_bytes_most_significant_first(dtype):
    """The documented layout, checked against a byte view of the tensor: each plane stored as
    is holds exactly byte k-1-j of every element; each zstd plane decompresses to it."""
    gen = torch.Generator().manual_seed(5)
    torch_dtype = TORCH_DTYPES[dtype]
    if torch_dtype.is_floating_point:
        values = (torch.randn(3000, generator=gen) * 4).to(torch_dtype)
    else:
        values = torch.randint(0, 300 if dtype != "uint8" else 7, (3000,), generator=gen).to(torch_dtype)
    stored = memoryview(encode_value(values, PLANES_ZSTD).parts[0]).cast("B")
    n, k = struct.unpack_from("<QB", stored, 0)
    assert (n, k) == (3000, values.element_size())
    element_bytes = values.view(torch.uint8).numpy().reshape(n, k)
    offset = struct.calcsize("<QB") + k * struct.calcsize("<BQ")
    for j in range(k):
        codec, size = struct.unpack_from("<BQ", stored, struct.calcsize("<QB") + j * struct.calcsize("<BQ"))
        payload = stored[offset : offset + size]
        plane = pa.Codec("zstd").decompress(payload, decompressed_size=n) if codec == 1 else payload  # any zstd reader
        assert np.array_equal(np.frombuffer(plane, dtype=np.uint8), element_bytes[:, k - 1 - j]), j
        offset += size
    assert offset == len(stored)


def test_values_encode_and_decode_alike_on_many_threads_at_once():
    """Encoder threads share nothing (each has its own plane scratch): values coded concurrently
    are the bytes and tensors coded one at a time."""
    gen = torch.Generator().manual_seed(11)
    values = [(torch.randn(20000 + 997 * i, generator=gen) * (i + 1)).to(torch.bfloat16) for i in range(24)]
    alone = [b"".join(bytes(p) for p in encode_value(v, PLANES_ZSTD).parts) for v in values]
    with futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda v: b"".join(bytes(p) for p in encode_value(v, PLANES_ZSTD).parts), values * 3))
        decoded = list(pool.map(lambda b: shards_module.decode_value(b, torch.bfloat16), alone * 3))
    assert together == alone * 3
    for tensor, value in zip(decoded, values * 3):
        assert torch.equal(tensor.view(torch.int16), value.view(torch.int16))


def test_a_failing_encoder_thread_surfaces_and_leaves_no_shard(tmp_path, monkeypatch):
    layout = LAYOUTS["probs"]
    shards = [window_batches(layout, seed=k, first_row=100 * k) for k in range(2)]
    real_encode, threads = shards_module.encode_value, set()
    # the second shard's rows, known by their memory (slices of its batches' tensors)
    second_shard = [(t.data_ptr(), t.data_ptr() + t.nbytes) for batches in shards[1] for b in batches for t in b.columns.values()]

    def encode_failing_in_the_second_shard(value, encoding, *args):
        threads.add(threading.current_thread().name)
        address = value.words.ctypes.data if isinstance(value, HostWords) else value.data_ptr()
        if any(start <= address < end for start, end in second_shard):
            raise RuntimeError("encoder fault injected in the second shard")
        return real_encode(value, encoding, *args)

    monkeypatch.setattr(shards_module, "encode_value", encode_failing_in_the_second_shard)
    with pytest.raises(RuntimeError, match=r"the shard writer failed: .*encoder fault injected in the second shard"):
        write_shards(tmp_path, layout, shards, threads=2)
    assert all(name.startswith("eagle3-shard-encoder") for name in threads)
    data = tmp_path / "data"
    assert sorted(p.name for p in data.iterdir()) == ["s0.parquet"]  # no temp file, no second shard
    assert len(decoded_rows(data / "s0.parquet", layout, "zstd")) == sum(n for n, _ in WINDOWS) - 1


def test_encoder_threads_take_the_rows_the_writer_needs_first():
    """Pending rows are encoded lowest (window, position) first, whatever order they came in."""
    pool = OrderedEncoderPool(1, "eagle3-shard-encoder")
    started, release, order = threading.Event(), threading.Event(), []

    def hold():  # keeps the one thread busy while the rows queue up behind it
        started.set()
        release.wait()

    pool.submit((0, -1), hold)
    started.wait()
    keys = [(1, 0), (0, 5), (0, 2), (2, 0), (0, 9), (1, 3)]
    futures = [pool.submit(key, order.append, key) for key in keys]
    release.set()
    for future in futures:
        future.result()
    pool.shutdown()
    assert order == sorted(keys)


def test_encoder_pool_shutdown_cancels_rows_not_started():
    pool = OrderedEncoderPool(1, "eagle3-shard-encoder")
    started, release = threading.Event(), threading.Event()
    running = pool.submit((0, 0), lambda: started.set() or release.wait())
    started.wait()
    waiting = pool.submit((0, 1), lambda: "encoded")
    stopper = threading.Thread(target=pool.shutdown)
    stopper.start()
    done, _ = futures.wait([waiting], timeout=60)  # done once the shutdown cancels it (the one thread is still busy)
    assert waiting in done
    release.set()
    stopper.join()
    assert running.result() is True and waiting.cancelled()
    with pytest.raises(RuntimeError, match="the encoder pool is shut down"):
        pool.submit((0, 2), lambda: None)


def test_a_shard_whose_first_bytes_do_not_fit_leaves_nothing_behind(tmp_path, monkeypatch):
    """Parquet writes its magic bytes as its writer opens: a full disk (or quota) can refuse them
    there, before any row. The error says so, and no temp file, descriptor or checksum thread stays."""

    def full_disk_at_open(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards_module.pq, "ParquetWriter", full_disk_at_open)
    checksum_threads = {t for t in threading.enumerate() if t.name == "eagle3-shard-checksum"}
    shards = [window_batches(LAYOUTS["probs"], seed=0, first_row=0)]
    with pytest.raises(DiskFull, match=r"no space left writing .*rerun with --resume"):
        write_shards(tmp_path, LAYOUTS["probs"], shards, threads=2)
    assert list((tmp_path / "data").iterdir()) == []
    assert {t for t in threading.enumerate() if t.name == "eagle3-shard-checksum"} == checksum_threads


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names a descriptor's file through /proc")
def test_a_shards_record_is_durable_before_the_shard_is_renamed_into_place(tmp_path, monkeypatch):
    """A power cut keeps renames only up to the last fsync of their folder. A shard whose name
    survived one must have its record too (else a resume throws the finished shard away): the
    record's folder is fsynced after its rename and before the shard's."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def recording_replace(src, dst):
        events.append(("rename", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    write_shards(tmp_path, LAYOUTS["probs"], [window_batches(LAYOUTS["probs"], seed=0, first_row=0)], threads=1)
    record, data = sidecar_path(tmp_path, "s0.parquet"), tmp_path / "data"
    shard_renamed = events.index(("rename", str(data / "s0.parquet")))
    record_renamed = events.index(("rename", str(record)))
    assert record_renamed < shard_renamed
    assert ("fsync", str(record.parent.resolve())) in events[record_renamed:shard_renamed]
    assert events[shard_renamed + 1] == ("fsync", str(data.resolve()))  # and the shard's name itself


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names a descriptor's file through /proc")
def test_a_failing_checksum_thread_surfaces_and_leaves_no_shard(tmp_path, monkeypatch):
    """The disk writes the checksum thread starts can fail there first (an I/O error): the build
    stops with that error, the shard is neither published nor recorded, the shards before it stay."""
    layout = LAYOUTS["probs"]
    shards = [window_batches(layout, seed=k, first_row=100 * k) for k in range(2)]
    real_start_writeback, failed = shards_module._start_writeback, []

    def failing_in_the_second_shard(fd, offset, length):
        if ".s1.parquet.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            failed.append(threading.current_thread().name)
            raise OSError(errno.EIO, "Input/output error")
        real_start_writeback(fd, offset, length)

    monkeypatch.setattr(shards_module, "FLUSH_BYTES", 1024)
    monkeypatch.setattr(shards_module, "_start_writeback", failing_in_the_second_shard)
    with pytest.raises(WriteFailed, match=says("(Input/output error)", "every shard already written is complete", "rerun with --resume")):
        write_shards(tmp_path, layout, shards, threads=2)
    assert failed and set(failed) == {"eagle3-shard-checksum"}
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["s0.parquet"]
    assert sorted(p.name for p in sidecar_path(tmp_path, "s0.parquet").parent.iterdir()) == ["s0.parquet.json"]
    assert len(decoded_rows(tmp_path / "data" / "s0.parquet", layout, "zstd")) == sum(n for n, _ in WINDOWS) - 1


def test_a_shard_that_cannot_be_created_names_its_file_and_keeps_the_shards_before_it(tmp_path, monkeypatch):
    """The data folder lost its write permission midway (or the disk fails): the error names the
    file and says the shards already written stay valid, instead of a traceback."""
    layout = LAYOUTS["probs"]
    shards = [window_batches(layout, seed=k, first_row=100 * k) for k in range(2)]
    real_os_file = shards_module.pa.OSFile

    def denied_for_the_second_shard(path, mode="r"):  # as pyarrow reports it: the path in its text
        if ".s1.parquet.tmp-" in str(path):
            raise PermissionError(errno.EACCES, f"Failed to open local file '{path}'. Detail: [errno 13] Permission denied")
        return real_os_file(path, mode)

    monkeypatch.setattr(shards_module.pa, "OSFile", denied_for_the_second_shard)
    names_the_file_and_what_stays = says(".s1.parquet.tmp-", "Permission denied", "every shard already written is complete", "--resume")
    with pytest.raises(WriteFailed, match=names_the_file_and_what_stays):
        write_shards(tmp_path, layout, shards, threads=2)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["s0.parquet"]
    assert len(decoded_rows(tmp_path / "data" / "s0.parquet", layout, "zstd")) == sum(n for n, _ in WINDOWS) - 1


def test_a_checksum_read_that_stops_short_of_the_end_fails_the_shard(tmp_path, monkeypatch):
    """A checksum must cover every byte of the file it names: a read back that ends early is an error, not a shorter hash."""
    monkeypatch.setattr(shards_module, "_READ_BYTES", 4096)
    path = tmp_path / "shard.parquet"
    path.write_bytes(b"")
    hasher = shards_module._TailHasher(path)
    path.write_bytes(bytes(range(256)) * 64)
    real_preadv, reads = os.preadv, []

    def stops_after_the_first_read(fd, buffers, offset):
        reads.append(offset)
        return real_preadv(fd, buffers, offset) if len(reads) == 1 else 0

    monkeypatch.setattr(os, "preadv", stops_after_the_first_read)
    with pytest.raises(OSError, match=r"read back 4096 of its 16384 bytes to checksum it; the file changed while written"):
        hasher.finish()
    hasher.discard()


def three_sample_batch(finite: list[bool]) -> BatchOutput:
    """Samples with 2, 3 and 1 loss rows; row r of the per-loss argmax holds r, so each row names its place."""
    samples = [
        {"sample_id": f"s{b}", "source_index": b, "num_tokens": 3, "num_loss_tokens": n, "input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}
        for b, n in enumerate([2, 3, 1])
    ]
    columns = {"target_argmax": torch.arange(6, dtype=torch.int32), "hidden": torch.arange(18, dtype=torch.float32).reshape(3, 3, 2)}
    return BatchOutput([0, 1, 2], samples, columns, frozenset({"target_argmax"}), torch.tensor(finite), {})


def test_the_samples_after_a_non_finite_one_keep_their_own_loss_rows():
    """A non-finite sample is not written, but its loss rows still sit in the batch's per-loss
    columns: the finite samples after it take the rows after its rows, not its rows."""
    rows = {position: tensors for position, (_, tensors, _) in three_sample_batch([True, False, True]).split()}
    assert rows[1] is None
    assert rows[0]["target_argmax"].words.tolist() == [0, 1]
    assert rows[2]["target_argmax"].words.tolist() == [5]


def test_argmax_in_vocab_counts_each_samples_own_loss_rows():
    """Rows 0-1 are the first sample's, 2-4 the second's, 5 the third's."""
    in_vocab = np.array([True, False, True, True, False, True])
    assert three_sample_batch([True, True, True]).argmax_in_vocab(in_vocab) == [1, 2, 1]


WRITER_THREADS = ("eagle3-shard-writer", "eagle3-shard-dispatch", "eagle3-shard-encoder", "eagle3-shard-checksum")


def writer_threads() -> set[threading.Thread]:
    """The shard writers' threads alive now, known by their names (the encoders' carry a number)."""
    return {t for t in threading.enumerate() if t.name.startswith(WRITER_THREADS)}


def within_a_minute(call):
    """`call()`'s result (or its exception), run on a thread of its own: a writer that hangs fails
    the test here rather than hanging it. The bound only matters on a hang."""
    done: futures.Future = futures.Future()

    def run():
        try:
            done.set_result(call())
        except BaseException as err:  # noqa: BLE001 - handed to the test's thread
            done.set_exception(err)

    threading.Thread(target=run, daemon=True).start()
    return done.result(timeout=60)


def ended(thread: threading.Thread) -> None:
    """Wait until `thread` ended: a writer thread ends once it failed (its failure recorded first)."""
    thread.join(timeout=60)
    assert not thread.is_alive(), f"{thread.name} still running"


class FailedCopy:
    """A device->host copy whose event reports a device error when waited on, as a CUDA fault does;
    it records the thread that waited."""

    def __init__(self):
        self.waited_on: list[str] = []

    def synchronize(self):
        self.waited_on.append(threading.current_thread().name)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_failing_dispatch_thread_surfaces_and_leaves_no_shard(tmp_path):
    """The dispatch thread waits for each batch's copy to the host: a device error there stops the
    build with that error (not a build that finishes without the shard, nor one that hangs), and the
    shard in progress is removed while the shards before it stay."""
    layout = LAYOUTS["probs"]
    shards = [window_batches(layout, seed=k, first_row=100 * k) for k in range(2)]
    failed = shards[1][0][1].ready = FailedCopy()  # the second shard's second batch
    with pytest.raises(RuntimeError, match=r"the shard writer failed: .*CUDA error: an illegal memory access"):
        within_a_minute(lambda: write_shards(tmp_path, layout, shards, threads=2))
    assert failed.waited_on == ["eagle3-shard-dispatch"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["s0.parquet"]
    assert len(decoded_rows(tmp_path / "data" / "s0.parquet", layout, "zstd")) == sum(n for n, _ in WINDOWS) - 1


def started_writer(layout: Layout, threads: int) -> tuple[BackgroundWriter, dict[str, threading.Thread]]:
    """A BackgroundWriter, and the threads it started, by name."""
    before = writer_threads()
    writer = BackgroundWriter(layout, torch.ones(1000, dtype=torch.bool), 4_000, threads=threads)
    return writer, {t.name: t for t in writer_threads() - before}


def test_after_a_writer_failure_each_next_call_raises_it(tmp_path):
    """Once the writer failed, the forward thread learns it at its next call (the next batch it
    hands over, the window's end, the shard's close): it stops there instead of running the target
    on for batches nobody writes, and it is told the first failure."""
    layout = LAYOUTS["probs"]
    batches, _ = window_batches(layout, seed=0, first_row=0)
    (tmp_path / "data").mkdir()
    writer, threads = started_writer(layout, threads=2)
    writer.open_shard(tmp_path / "data" / "s0.parquet")
    batches[0].ready = FailedCopy()
    writer.submit(batches[0])
    ended(threads["eagle3-shard-dispatch"])  # it failed on that batch
    the_failure = r"the shard writer failed: .*CUDA error: an illegal memory access"
    for next_call in (lambda: writer.submit(batches[1]), lambda: writer.end_window(7), writer.close_shard, writer.finish):
        with pytest.raises(RuntimeError, match=the_failure):
            next_call()
    within_a_minute(writer.abort)
    assert list((tmp_path / "data").iterdir()) == []


def test_aborting_after_a_failure_raises_nothing_more_and_stops_every_writer_thread(tmp_path, monkeypatch):
    """A build that stops (the writer's failure raised, or its own error) aborts the writer: that
    must not raise the writer's failure again, over the error being raised, and must leave none of
    the writer's threads (dispatch, writer, encoders, the shard's checksum) behind, nor the shard."""

    def failing_encoder(value, encoding, *args):
        raise RuntimeError("encoder fault injected")

    monkeypatch.setattr(shards_module, "encode_value", failing_encoder)
    layout = LAYOUTS["probs"]
    batches, _ = window_batches(layout, seed=0, first_row=0)
    (tmp_path / "data").mkdir()
    before = writer_threads()
    writer, threads = started_writer(layout, threads=3)
    encoders = [f"eagle3-shard-encoder_{i}" for i in range(3)]
    assert sorted(threads) == ["eagle3-shard-dispatch", *encoders, "eagle3-shard-writer"]
    writer.open_shard(tmp_path / "data" / "s0.parquet")
    for batch in batches:
        writer.submit(batch)
    writer.end_window(7)
    ended(threads["eagle3-shard-writer"])  # it failed writing the window's first row
    assert within_a_minute(writer.abort) is None
    assert [t.name for t in threads.values() if t.is_alive()] == []
    assert writer_threads() == before  # the shard's checksum thread too
    assert list((tmp_path / "data").iterdir()) == []
    with pytest.raises(RuntimeError, match=r"the shard writer failed: .*encoder fault injected"):
        writer.finish()  # the failure is still the one reported
