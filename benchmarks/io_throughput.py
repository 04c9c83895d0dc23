"""Shard writer and reader throughput against plain file I/O of the same bytes.

The cache: real builds of the embedded tiny-llama target on the 300 sample chats repeated
to `--rows` rows (default 900: one shard of about 424 MB of tensor data, four 128 MiB row
groups, as a long build writes them) at seq length 2048, dtype bf16 (`--dtype`), the whole
1,024-token vocabulary as draft vocabulary, once with `--compression none` and once with
`--compression zstd` (the default). Its rows are read back into memory once; then, in one
process, interleaved, `--repeats` times each (the fastest counts):

  writer        the build's writer path on exactly the build's input: the rows as host
                tensors in the build's batches and windows (padded `[B, T, ...]` per-token
                tensors, per-loss rows, `BatchOutput`), through `BackgroundWriter` with 1, 2
                and 4 writer threads (`--threads`): row slicing, encoding (byte planes + zstd,
                or the raw bytes), Arrow row groups, Parquet into a native file, the xxh3-128
                checksum and disk writes started every 32 MiB on their own thread, fsync,
                sidecar, rename. Timed from the writer's creation to `finish()`. The `none`
                shard must be byte-identical to the build's, and the `zstd` shard too,
                whatever the threads.
  plain write   the same number of bytes (the shard file's own bytes, in memory beforehand)
                written to a new file in 8 MiB chunks, then fsync, two ways: with the disk
                writes of every 32 MiB started as they accumulate (`shards._start_writeback`,
                the writer's own call and rhythm, here on the writing thread), and flushed by
                the one fsync at the end. The faster of the two is the baseline: the disk's
                speed for these bytes. Every timed write, the writer's too, starts after
                `os.sync()`, so no earlier pass's dirty pages are written meanwhile.
  reader        `load_cache(DIR, layout="raw", streaming=True)`, iterating every row and
                touching every tensor byte (each decoded tensor copied once into a scratch
                buffer, as the plain read's `readinto` copies into its buffer, on one torch
                thread like readinto and a DataLoader worker). Timed without its open (card,
                vocab, `datasets` builder) and, as a variant, with it. Also without that
                copy (a diagnostic: the tensors are in memory, Parquet's decode having
                copied every byte, but not read again).
  plain read    the shard file read into an 8 MiB buffer with `readinto`.

Ratios, all of times (the baseline's seconds over the path's: 1.0 is as fast as the baseline).
Writes: the writer against the faster plain write of the tensor bytes (the `none` shard: what
writing them takes at all) and against a plain write of the file it produces (for zstd, smaller).
Reads, cold (pages dropped with posix_fadvise(DONTNEED), so the bytes come from the disk) and
warm (page cache): against a plain read of the same shard file(s), what reading the cache
takes at all, and against a plain read of the `none` shard, the same tensor bytes. The JSON's
`ratio_keys` says what each key holds.

Diagnostics: the writer again with a pure-Python thread busy beside it, at the forward loop's GIL
switch interval (a launch-bound forward thread holds the GIL between its torch calls): the writer's
MB/s then, and the share of its solo rate the busy thread keeps; `RowDecoder` alone on rows in
memory with 1, 2 and 4 threads (the cost of decoding, which DataLoader workers spread); the writer's stages one by one on the same rows
(the rows out of the batches, encoding, the column buffers, Parquet into a native file,
xxh3-128, fsync); pyarrow's own Parquet read (`read_row_group`), the floor any reader built
on pyarrow starts from.

Run: .venv/bin/python benchmarks/io_throughput.py [--repeats N] [--threads 1,2,4] [--rows N]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _common  # noqa: F401  (first: fresh HF_DATASETS_CACHE before datasets loads)
from _common import machine_line, table, temp_dir, write_replicated_jsonl, write_results

NAME = "io_throughput"
BUILD = dict(target_model="tiny-llama", seq_length=2048)
TARGET_WRITE, TARGET_READ = 0.7, 0.5
CHUNK = 8 << 20
COMPRESSIONS = ("none", "zstd")


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def plain_write(path: Path, data: bytes, overlapped: bool = True) -> float:
    """Seconds to write `data` to a new file in CHUNK pieces, then fsync. `overlapped` (the
    baseline): the disk writes of every FLUSH_BYTES written are started as they accumulate, with
    the writer's own call (`shards._start_writeback`), as the writer's checksum thread does, so
    the disk writes while the next chunks are written. Otherwise one fsync flushes everything at
    the end (a diagnostic: the baseline of the runs before the writer overlapped its disk writes)."""
    from builder import shards

    view = memoryview(data)
    os.sync()  # every timed write starts on a quiet disk: no earlier pass's dirty pages being written meanwhile
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        flushed = 0
        for i in range(0, len(view), CHUNK):
            f.write(view[i : i + CHUNK])
            written = min(i + CHUNK, len(view))
            if overlapped and written - flushed >= shards.FLUSH_BYTES:
                shards._start_writeback(f.fileno(), flushed, written - flushed)
                flushed = written
        os.fsync(f.fileno())
    return time.perf_counter() - start


def plain_read(paths: list[Path]) -> float:
    buf = bytearray(CHUNK)
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


def reader_pass(cache: Path, touch: bool = True) -> tuple[float, float, int]:
    """(open seconds, iteration seconds, rows) of load_cache raw streaming over the whole cache."""
    import torch

    from builder.reader import load_cache

    start = time.perf_counter()
    ds = load_cache(str(cache), layout="raw", streaming=True)
    opened = time.perf_counter()
    rows, scratch = 0, torch.empty(CHUNK, dtype=torch.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the copy single-threaded, as readinto's (and as in a DataLoader worker)
    for row in ds:
        rows += 1
        if touch:  # every byte copied once into a buffer, as the plain read's readinto does
            for value in row.values():
                if isinstance(value, torch.Tensor) and value.numel():
                    flat = value.reshape(-1).view(torch.uint8)
                    if flat.numel() > scratch.numel():
                        scratch = torch.empty(flat.numel(), dtype=torch.uint8)
                    scratch[: flat.numel()].copy_(flat)
    end = time.perf_counter()
    torch.set_num_threads(threads)
    return opened - start, end - opened, rows


def collect_build_input(prep, cache: Path):
    """The build's writer input, rebuilt from the cache's rows: per shard, per window, the
    BatchOutputs the forward thread hands the writer (host tensors, padded per batch, with the
    padded token ids and loss mask the forward ran on)."""
    import torch

    from builder.batching import pad_batch, plan_batches, shard_windows
    from builder.reader import load_cache
    from builder.writer import BatchOutput

    stored = {}
    for row in load_cache(str(cache), layout="raw", streaming=True):
        stored[row["source_index"]] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in row.items()}
    layout = prep.layout
    per_loss = frozenset(name for name, spec in layout.columns().items() if spec["per"] == "loss")
    tensor_columns = [name for name in layout.columns() if name not in ("input_ids", "loss_mask")]
    cfg = prep.cfg
    shards = []
    for shard in range(prep.num_shards):
        start = shard * cfg.shard_size
        rows = prep.samples.select(range(start, min(start + cfg.shard_size, len(prep.samples))))
        windows = []
        for window in shard_windows(prep, rows):
            batches = []
            for positions in plan_batches([r["num_tokens"] for r in window], cfg.token_budget, cfg.batch_size):
                samples = [window[i] for i in positions]
                width = max(s["num_tokens"] for s in samples)
                columns = {}
                for name in tensor_columns:
                    parts = [stored[s["source_index"]][name] for s in samples]
                    if name in per_loss:
                        columns[name] = torch.cat(parts)
                    else:  # per token: [B, T, ...] padded like the forward's output
                        t = parts[0].new_zeros((len(samples), width, *parts[0].shape[1:]))
                        for b, p in enumerate(parts):
                            t[b, : p.shape[0]] = p
                        columns[name] = t
                finite = torch.ones(len(samples), dtype=torch.bool)
                ids, _, loss = pad_batch([s["input_ids"] for s in samples], [s["loss_mask"] for s in samples], 0)
                batches.append(BatchOutput(positions, samples, columns, per_loss, finite, {}, tokens=(ids, loss)))
            windows.append((len(window), batches))
        shards.append(windows)
    return shards


def writer_pass(prep, shards, names: list[str], out: Path, compression: str, threads: int) -> float:
    import torch

    from builder.writer import BackgroundWriter

    (out / "data").mkdir(parents=True, exist_ok=True)
    in_vocab = torch.zeros(prep.vocab_size, dtype=torch.bool)
    in_vocab[torch.as_tensor(prep.selected_token_ids)] = True
    os.sync()  # as for the plain write: a quiet disk at the start
    start = time.perf_counter()
    writer = BackgroundWriter(prep.layout, in_vocab, prep.cfg.row_group_bytes, compression=compression, threads=threads)
    for name, windows in zip(names, shards):
        writer.open_shard(out / "data" / name)
        for num_rows, batches in windows:
            for batch in batches:
                writer.submit(batch)
            writer.end_window(num_rows)
        writer.close_shard()
    writer.finish()
    return time.perf_counter() - start


def busy_python_thread(stop: threading.Event, counts: list[int]) -> None:
    """Pure Python work, as a launch-bound forward thread does between its torch calls."""
    n = 0
    while not stop.is_set():
        for _ in range(1000):
            n += 1
        counts[0] = n


def python_rate(seconds: float = 1.0) -> float:
    """Iterations per second of busy_python_thread with nothing else running."""
    stop, counts = threading.Event(), [0]
    thread = threading.Thread(target=busy_python_thread, args=(stop, counts))
    start = time.perf_counter()
    thread.start()
    time.sleep(seconds)
    stop.set()
    thread.join()
    return counts[0] / (time.perf_counter() - start)


def contended_writer_pass(prep, shards, names: list[str], out: Path, compression: str, threads: int) -> tuple[float, float]:
    """(writer seconds, the busy thread's iterations per second) with a busy Python thread running
    beside the writer, under the forward loop's GIL switch interval: how well the writer keeps up
    when the forward thread holds the GIL between its calls, and how much of it the forward keeps."""
    from builder.forward import FORWARD_SWITCH_INTERVAL_S, gil_switch_interval

    stop, counts = threading.Event(), [0]
    thread = threading.Thread(target=busy_python_thread, args=(stop, counts))
    with gil_switch_interval(FORWARD_SWITCH_INTERVAL_S):
        start = time.perf_counter()
        thread.start()
        seconds = writer_pass(prep, shards, names, out, compression, threads)
        stop.set()
        thread.join()
        elapsed = time.perf_counter() - start
    shutil.rmtree(out)
    return seconds, counts[0] / elapsed


def decode_pass(manifest: dict, rows: list[dict], threads: int) -> float:
    """RowDecoder alone on rows already in memory (bytes), split over `threads` threads."""
    from builder.reader import RowDecoder

    decode = RowDecoder(manifest)
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(decode, rows))
    return time.perf_counter() - start


def encode_pass(rows: list[dict], encodings: dict, threads: int) -> float:
    """Encoding alone (shards.encode_columns, what the writer threads run) on rows in memory."""
    from builder.shards import encode_columns

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda row: encode_columns(row, encodings), rows))
    return time.perf_counter() - start


def writer_stages(prep, shards, base: Path, compression: str) -> dict:
    """Seconds per stage of the writer's work on the same rows, one stage at a time, one thread."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import xxhash

    from builder.shards import SCALAR_COLUMNS, column_array, column_encodings, encode_columns, shard_schema

    encodings = column_encodings(prep.layout, compression)
    stages = {}
    start = time.perf_counter()
    rows = [row for windows in shards for _, batches in windows for batch in batches for _, (row, _a) in batch.rows()]
    stages["rows out of the batches (slices, token ids)"] = time.perf_counter() - start
    start = time.perf_counter()
    encoded = [encode_columns(row, encodings) for row in rows]
    stages["encode (slice, planes, zstd)"] = time.perf_counter() - start
    schema = shard_schema(prep.layout)
    start = time.perf_counter()
    tables, group, size = [], [], 0
    for row in encoded:  # row groups cut as ShardWriter cuts them (by tensor bytes)
        group.append(row)
        size += sum(v.raw_nbytes for v in row.values() if hasattr(v, "raw_nbytes"))
        if size >= prep.cfg.row_group_bytes:
            tables.append(pa.Table.from_arrays([column_array([r[f.name] for r in group], f.type) for f in schema], schema=schema))
            group, size = [], 0
    if group:
        tables.append(pa.Table.from_arrays([column_array([r[f.name] for r in group], f.type) for f in schema], schema=schema))
    stages["Arrow column chunks over the buffers (no copy)"] = time.perf_counter() - start
    path = base / "stages.parquet"
    start = time.perf_counter()
    with pa.OSFile(str(path), mode="w") as sink:
        writer = pq.ParquetWriter(sink, schema, compression="none", use_dictionary=False, write_statistics=list(SCALAR_COLUMNS))
        for t in tables:
            writer.write_table(t)
        writer.close()
    stages["parquet into a native file"] = time.perf_counter() - start
    data = path.read_bytes()
    start = time.perf_counter()
    xxhash.xxh3_128(data).hexdigest()
    stages["xxh3_128"] = time.perf_counter() - start
    start = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    stages["(sha256, no longer on the path)"] = time.perf_counter() - start
    with open(path, "rb+") as f:
        f.write(data)  # dirty every page again, then time the flush alone
        f.flush()
        start = time.perf_counter()
        os.fsync(f.fileno())
        stages["fsync"] = time.perf_counter() - start
    path.unlink()
    return stages


def pyarrow_read(paths: list[Path]) -> float:
    import pyarrow.parquet as pq

    start = time.perf_counter()
    for path in paths:
        f = pq.ParquetFile(path)
        for i in range(f.num_row_groups):
            f.read_row_group(i)
    return time.perf_counter() - start


READ_PATHS = {
    "reader": "load_cache raw streaming",
    "reader_with_open": "  the same, its open counted",
    "reader_untouched": "  diag: the reader, tensors not read again",
    "pyarrow_read": "  diag: pyarrow read_row_group",
}
RATIO_KEYS = {
    "writer_C_T_over_fastest_plain_write_of_the_tensor_bytes": "the headline: seconds of the faster of the two plain writes "
    "of the none shard's bytes (the tensor data: 8 MiB chunks, then fsync; with or without its disk writes started every "
    "32 MiB) over the writer's seconds (C: compression, T: writer threads)",
    "writer_C_T_over_fastest_plain_write_of_its_own_file": "the same baseline, of the file the writer produces",
    "writer_C_T_over_overlapped_plain_write_of_the_tensor_bytes": "diagnostic: against the plain write whose disk writes "
    "start every 32 MiB with the writer's own call (on the writing thread, where the writer makes it on another)",
    "writer_C_T_over_plain_write_of_the_tensor_bytes": "diagnostic: against the plain write flushed by one fsync at the end",
    "P_W_C_over_plain_read_of_its_files": "seconds of a plain read of the same shard file(s) over the path's seconds "
    "(P: reader, reader_with_open, reader_untouched or pyarrow_read; W: cold or warm): what reading this cache takes at all",
    "P_W_C_over_plain_read_of_the_tensor_bytes": "seconds of a plain read of the none shard (the same tensor bytes, "
    "uncompressed) over the path's seconds",
}


def fastest_plain_write(best: dict, compression: str) -> float:
    """Seconds of the faster plain write of a shard's bytes: with its disk writes started as it goes
    or flushed by one fsync (which is faster depends on the disk and the kernel)."""
    return min(best[f"plain_write_overlapped_{compression}"], best[f"plain_write_{compression}"])


def write_ratios(best: dict, threads) -> dict:
    """The writer's seconds against plain writes of the same bytes, as ratios of times (see RATIO_KEYS)."""
    ratios = {}
    for c in COMPRESSIONS:
        for t in threads:
            writer_s = best[f"writer_{c}_{t}"]
            ratios[f"writer_{c}_{t}_over_fastest_plain_write_of_the_tensor_bytes"] = fastest_plain_write(best, "none") / writer_s
            ratios[f"writer_{c}_{t}_over_fastest_plain_write_of_its_own_file"] = fastest_plain_write(best, c) / writer_s
            ratios[f"writer_{c}_{t}_over_overlapped_plain_write_of_the_tensor_bytes"] = best["plain_write_overlapped_none"] / writer_s
            ratios[f"writer_{c}_{t}_over_plain_write_of_the_tensor_bytes"] = best["plain_write_none"] / writer_s
    return ratios


def read_ratios(best: dict[str, float]) -> dict[str, float]:
    """Each read path's seconds against plain reads, as ratios of times (1.0: as fast as the plain
    read): of the same file(s), what reading the cache takes at all, and of the `none` shard, the
    same tensor bytes uncompressed. A ratio of MB/s would set the decoded tensor bytes of a zstd
    read against the fewer bytes of its file."""
    ratios = {}
    for c in COMPRESSIONS:
        for w in ("cold", "warm"):
            own, tensor_bytes = best[f"plain_read_{w}_{c}"], best[f"plain_read_{w}_none"]
            for kind in READ_PATHS:
                seconds = best[f"{kind}_{w}_{c}"]
                ratios[f"{kind}_{w}_{c}_over_plain_read_of_its_files"] = own / seconds
                ratios[f"{kind}_{w}_{c}_over_plain_read_of_the_tensor_bytes"] = tensor_bytes / seconds
    return ratios


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", default="1,2,4", help="writer threads to measure (default: 1,2,4)")
    p.add_argument("--rows", type=int, default=900, help="the sample chats repeated to this many rows, in one shard")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--results", default=None, help=f"JSON path (default: benchmarks/results/{NAME}.json)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    _common.quiet_libraries()
    import pyarrow.parquet as pq

    from builder.config import BuildConfig
    from builder.pipeline import build

    threads = [int(x) for x in args.threads.split(",")]
    base = Path(temp_dir("io"))
    chats = write_replicated_jsonl(base / "chats.jsonl", args.rows)
    caches, results = {}, {}
    for compression in COMPRESSIONS:
        print(
            f"{NAME}: building the cache (tiny-llama, {args.rows} rows, seq 2048, {args.dtype}, Vd 1024, --compression {compression}) ...",
            flush=True,
        )
        caches[compression] = base / f"cache-{compression}"
        results[compression] = build(
            BuildConfig(
                output_dir=str(caches[compression]),
                input_data=str(chats),
                shard_size=args.rows,
                dtype=args.dtype,
                compression=compression,
                **BUILD,
            ),
            progress=False,
        )
    prep = results["none"].prepared
    names = {c: [s["name"] for s in results[c].manifest["shards"]] for c in COMPRESSIONS}
    paths = {c: [caches[c] / "data" / n for n in names[c]] for c in COMPRESSIONS}
    originals = {c: [p.read_bytes() for p in paths[c]] for c in COMPRESSIONS}
    shard_bytes = {c: sum(len(d) for d in originals[c]) for c in COMPRESSIONS}
    raw = shard_bytes["none"]  # the tensor data (+ < 0.1% Parquet framing): what the forward hands over
    print(
        f"  {raw / 1e6:,.1f} MB raw, {shard_bytes['zstd'] / 1e6:,.1f} MB with zstd ({raw / shard_bytes['zstd']:.2f}x); "
        f"{results['none'].manifest['totals']['samples']} rows; rebuilding the writer's input ...",
        flush=True,
    )
    shards = collect_build_input(prep, caches["none"])
    tensor_mb = raw / 1e6

    times: dict[str, list[float]] = {}
    identical = {c: True for c in COMPRESSIONS}
    opens: dict[str, list[float]] = {}

    def timed(key: str, seconds: float) -> None:
        times.setdefault(key, []).append(seconds)

    for rep in range(args.repeats):
        print(f"  round {rep + 1}/{args.repeats} ...", flush=True)
        for c in COMPRESSIONS:
            scratch = base / f"plain-{c}-{rep}"
            scratch.mkdir()
            files = list(zip(names[c], originals[c]))
            for overlapped in (True, False) if rep % 2 == 0 else (False, True):  # alternating: neither always goes first
                key = "plain_write_overlapped" if overlapped else "plain_write"
                timed(f"{key}_{c}", sum(plain_write(scratch / f"{key}-{n}", d, overlapped) for n, d in files))
            shutil.rmtree(scratch)
        for c in COMPRESSIONS:
            for t in threads:
                out = base / f"writer-{c}-{t}-{rep}"
                timed(f"writer_{c}_{t}", writer_pass(prep, shards, names[c], out, c, t))
                identical[c] &= all((out / "data" / n).read_bytes() == d for n, d in zip(names[c], originals[c]))
                shutil.rmtree(out)
        for c in COMPRESSIONS:
            for p in paths[c]:
                drop_from_page_cache(p)
            timed(f"plain_read_cold_{c}", plain_read(paths[c]))
            for p in paths[c]:
                drop_from_page_cache(p)
            opened, iterated, rows = reader_pass(caches[c])
            timed(f"reader_cold_{c}", iterated)
            timed(f"reader_with_open_cold_{c}", opened + iterated)
            opens.setdefault(c, []).append(opened)
            for p in paths[c]:
                drop_from_page_cache(p)
            timed(f"reader_untouched_cold_{c}", reader_pass(caches[c], touch=False)[1])
            for p in paths[c]:
                drop_from_page_cache(p)
            timed(f"pyarrow_read_cold_{c}", pyarrow_read(paths[c]))
            plain_read(paths[c])  # into the page cache
            timed(f"plain_read_warm_{c}", plain_read(paths[c]))
            opened, iterated, _ = reader_pass(caches[c])
            timed(f"reader_warm_{c}", iterated)
            timed(f"reader_with_open_warm_{c}", opened + iterated)
            timed(f"reader_untouched_warm_{c}", reader_pass(caches[c], touch=False)[1])
            timed(f"pyarrow_read_warm_{c}", pyarrow_read(paths[c]))

    print("  the writer beside a busy Python thread ...", flush=True)
    solo_rate = python_rate()
    contended = {}
    for c in COMPRESSIONS:
        for t in threads:
            seconds, rate = min(contended_writer_pass(prep, shards, names[c], base / f"contended-{c}-{t}", c, t) for _ in range(2))
            contended[f"{c}_{t}"] = {"writer_s": seconds, "writer_mb_s": tensor_mb / seconds, "busy_thread_kept": rate / solo_rate}

    print("  encoding and decoding alone, and the writer's stages one by one ...", flush=True)
    from builder.shards import column_encodings

    encode = {}
    plain_rows = [row for windows in shards for _, batches in windows for batch in batches for _, (row, _a) in batch.rows()]
    for c in COMPRESSIONS:
        for t in threads:
            encode[f"{c}_{t}"] = min(encode_pass(plain_rows, column_encodings(prep.layout, c), t) for _ in range(2))
    del plain_rows
    decode = {}
    for c in COMPRESSIONS:
        rows = [r for p in paths[c] for r in pq.read_table(p).to_pylist()]
        for t in threads:
            decode[f"{c}_{t}"] = min(decode_pass(results[c].manifest, rows, t) for _ in range(2))
        del rows
    stages = {}
    for c in COMPRESSIONS:
        runs = [writer_stages(prep, shards, base, c) for _ in range(2)]
        stages[c] = {k: min(s[k] for s in runs) for k in runs[0]}

    best = {k: min(v) for k, v in times.items()}
    mb = {
        k: v
        for k, v in {
            **{
                f"{kind}_{c}": shard_bytes[c] / best[f"{kind}_{c}"] / 1e6
                for c in COMPRESSIONS
                for kind in ("plain_write_overlapped", "plain_write")
            },
            **{f"writer_{c}_{t}": tensor_mb / best[f"writer_{c}_{t}"] for c in COMPRESSIONS for t in threads},
            **{
                f"{kind}_{c}": shard_bytes[c] / best[f"{kind}_{c}"] / 1e6
                for c in COMPRESSIONS
                for kind in ("plain_read_cold", "plain_read_warm", "pyarrow_read_cold", "pyarrow_read_warm")
            },
            **{
                f"{kind}_{w}_{c}": raw / best[f"{kind}_{w}_{c}"] / 1e6
                for c in COMPRESSIONS
                for w in ("cold", "warm")
                for kind in ("reader", "reader_with_open", "reader_untouched")
            },
            **{f"decode_{k}": raw / v / 1e6 for k, v in decode.items()},
            **{f"encode_{k}": raw / v / 1e6 for k, v in encode.items()},
        }.items()
    }
    ratios = write_ratios(best, threads)
    plain_raw_s = fastest_plain_write(best, "none")
    ratios |= read_ratios(best)

    def verdict(value: float, target: float) -> str:
        return "MET" if value >= target else "NOT MET"

    print()
    rows = [
        [
            f"plain write, {label}, the {c} shard's bytes",
            best[f"{key}_{c}"],
            mb[f"{key}_{c}"],
            plain_raw_s / best[f"{key}_{c}"],
            "",
            "",
            "",
            "",
        ]
        for key, label in (("plain_write_overlapped", "disk writes started every 32 MiB + fsync"), ("plain_write", "one fsync at the end"))
        for c in COMPRESSIONS
    ]
    for c in COMPRESSIONS:
        for t in threads:
            r = ratios[f"writer_{c}_{t}_over_fastest_plain_write_of_the_tensor_bytes"]
            rows.append(
                [
                    f"BackgroundWriter, {c}, {t} thread(s)",
                    best[f"writer_{c}_{t}"],
                    mb[f"writer_{c}_{t}"],
                    r,
                    ratios[f"writer_{c}_{t}_over_overlapped_plain_write_of_the_tensor_bytes"],
                    ratios[f"writer_{c}_{t}_over_plain_write_of_the_tensor_bytes"],
                    f">= {TARGET_WRITE}",
                    verdict(r, TARGET_WRITE),
                ]
            )
    print(
        table(
            [
                "write path",
                "best s",
                "tensor MB/s",
                "÷ the faster plain write of the tensor bytes",
                "diag: ÷ the one flushed every 32 MiB",
                "diag: ÷ the one flushed by one fsync",
                "target",
                "verdict",
            ],
            rows,
            title=f"Writes: {tensor_mb:,.0f} MB of tensor data in {len(names['none'])} shard(s), "
            f"best of {args.repeats}; one run, one machine (MB/s are this machine's figures):",
        )
    )
    print(
        table(
            ["write path", "its own file, MB", "÷ the faster plain write of its own file"],
            [
                [
                    f"BackgroundWriter, {c}, {t} thread(s)",
                    shard_bytes[c] / 1e6,
                    ratios[f"writer_{c}_{t}_over_fastest_plain_write_of_its_own_file"],
                ]
                for c in COMPRESSIONS
                for t in threads
            ],
            title="The same writes against a plain write of the file each produces:",
        )
    )
    rows = []
    for c in COMPRESSIONS:
        for w in ("cold", "warm"):
            rows.append([f"plain read of the {c} shard, {w}", best[f"plain_read_{w}_{c}"], mb[f"plain_read_{w}_{c}"], 1.0, "", "", ""])
            for kind, label in READ_PATHS.items():
                r = ratios[f"{kind}_{w}_{c}_over_plain_read_of_its_files"]
                headline = kind == "reader"
                rows.append(
                    [
                        f"{label}, {c}, {w}",
                        best[f"{kind}_{w}_{c}"],
                        mb[f"{kind}_{w}_{c}"],
                        r,
                        ratios[f"{kind}_{w}_{c}_over_plain_read_of_the_tensor_bytes"],
                        f">= {TARGET_READ}" if headline else "",
                        verdict(r, TARGET_READ) if headline else "",
                    ]
                )
    print(
        table(
            [
                "read path",
                "best s",
                "MB/s",
                "plain read of its file(s) s ÷ its s",
                "plain read of the none shard s ÷ its s",
                "target",
                "verdict",
            ],
            rows,
            title="Reads, ratios of times (MB/s: the reader's of decoded tensor data, the plain and pyarrow reads' of the file's bytes):",
        )
    )
    print(
        table(
            ["rows in memory, MB/s of tensor data", *[f"{t} thread(s)" for t in threads]],
            [[f"encode_columns, {c}", *[mb[f"encode_{c}_{t}"] for t in threads]] for c in ("zstd",)]
            + [[f"RowDecoder, {c}", *[mb[f"decode_{c}_{t}"] for t in threads]] for c in COMPRESSIONS],
            title="Encoding and decoding alone, on 1, 2 and 4 threads (they release the GIL; free cores set the scaling):",
        )
    )
    for c in COMPRESSIONS:
        print(
            table(
                [f"writer stage, {c} (one thread, one at a time)", "s", "tensor MB/s"],
                [[k, v, raw / v / 1e6] for k, v in stages[c].items()],
                title=f"Where the writer's time goes ({c}):",
            )
        )
    print(
        table(
            ["writer beside a busy Python thread", *[f"{t} thread(s)" for t in threads]],
            [[f"{c}: tensor MB/s", *[contended[f"{c}_{t}"]["writer_mb_s"] for t in threads]] for c in COMPRESSIONS]
            + [[f"{c}: busy thread kept", *[contended[f"{c}_{t}"]["busy_thread_kept"] for t in threads]] for c in COMPRESSIONS],
            title="The writer beside a busy pure-Python thread (a launch-bound forward), at the build's GIL switch interval:",
        )
    )
    print(f"  writer output byte-identical to the build's shard: none {identical['none']}, zstd {identical['zstd']} (every thread count)")
    open_s = {c: min(v) for c, v in opens.items()}
    print(
        "  reader open (card, vocab, datasets builder): "
        + ", ".join(f"{c} {v:.3f} s" for c, v in open_s.items())
        + " (counted only in the reader-with-open rows)"
    )
    print(f"  {machine_line()}")
    data = {
        "cache": {
            "tensor_bytes": raw,
            "shard_bytes": shard_bytes,
            "rows": results["none"].manifest["totals"]["samples"],
            "input": f"the sample chats repeated to {args.rows} rows",
            **BUILD,
            "dtype": args.dtype,
            "draft_vocab": len(prep.selected_token_ids),
            "row_group_bytes": prep.cfg.row_group_bytes,
        },
        "repeats": args.repeats,
        "threads": threads,
        "seconds": times,
        "best_seconds": best,
        "mb_per_s": mb,
        "decode_seconds": decode,
        "encode_seconds": encode,
        "reader_open_s": min(open_s.values()),
        "reader_open_s_by_compression": open_s,
        "writer_stage_seconds": stages,
        "writer_beside_a_busy_python_thread": contended,
        "writer_output_identical": identical,
        "ratios": ratios,
        "ratio_keys": RATIO_KEYS,
        "targets": {"writer": TARGET_WRITE, "reader": TARGET_READ},
    }
    path = write_results(NAME, data, args.results)
    print(f"  wrote {path}")
    return data


if __name__ == "__main__":
    main()
