"""Shard writer and reader throughput against plain file I/O of the same bytes (issue 4).

The cache: a real build of the embedded default (tiny-llama, the 300 sample chats) at seq
length 2048 with dtype fp32 and the whole 1,024-token vocabulary as draft vocabulary: about
280 MB in one shard (three 128 MiB row groups), 300 rows of 0.1 to 8 MB. Its rows are read
back into memory once; then, in one process, interleaved, 3 times each (the fastest counts):

  writer        the build's writer path on exactly the build's input: the rows as host
                tensors in the build's batches and windows (padded `[B, T, ...]` per-token
                tensors, per-loss rows, `BatchOutput`), through `BackgroundWriter` (its thread
                slices rows, turns tensors into bytes, fills Arrow row groups, writes Parquet
                while hashing it with sha256, fsyncs, writes the sidecar, renames). Timed from
                the writer's creation to `finish()`. The shard it writes must be
                byte-identical to the build's (checked: same sha256).
  plain write   the same number of bytes (the shard file's own bytes, in memory beforehand)
                written to a new file in 8 MiB chunks, then fsync: the disk's speed for it.
  reader        `load_cache(DIR, layout="raw", streaming=True)`, iterating every row and
                touching every tensor byte (each tensor copied once into a scratch buffer, as
                the plain read's `readinto` copies into its buffer; a trainer's collate pays at
                least that). Headline: the iteration; the open (card, vocab, `datasets`
                builder) is reported beside it.
  plain read    the shard file read into an 8 MiB buffer with `readinto`.

Both reads run twice: cold (the shard's pages dropped from the page cache first with
posix_fadvise(DONTNEED), so the bytes come from the disk) and warm (in the page cache: the
plain read is then a memory copy, and the ratio shows the reader's CPU cost alone).

Diagnostics: `ShardWriter` alone on already-encoded rows; the writer's stages one by one on
the same rows (tensor -> bytes, `pa.Table.from_pylist`, Parquet encoding into a Python file
object with ShardWriter's settings, the same into a native file, sha256, fsync); and
pyarrow's own Parquet read (`read_row_group`, all columns), the floor any Parquet reader
built on pyarrow starts from.

Run: .venv/bin/python benchmarks/io_throughput.py [--results PATH] [--repeats N]
"""

from __future__ import annotations

import _common  # noqa: F401  (first: fresh HF_DATASETS_CACHE before datasets loads)

import argparse
import hashlib
import os
import time
from pathlib import Path

from _common import machine_line, table, temp_dir, write_results

NAME = "io_throughput"
BUILD = dict(target_model="tiny-llama", input_data="sample-chats", seq_length=2048, dtype="fp32")
TARGET_WRITE, TARGET_READ = 0.7, 0.5
CHUNK = 8 << 20


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def plain_write(path: Path, data: bytes) -> float:
    view = memoryview(data)
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for i in range(0, len(view), CHUNK):
            f.write(view[i : i + CHUNK])
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    return elapsed


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
    return opened - start, end - opened, rows


def collect_build_input(prep, cache: Path):
    """The build's writer input, rebuilt from the cache's rows: per shard, per window, the
    BatchOutputs the forward thread hands the writer (host tensors, padded per batch)."""
    import torch

    from builder.batching import plan_batches
    from builder.build import shard_windows
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
                batches.append(BatchOutput(positions, samples, columns, per_loss, finite, {}))
            windows.append((len(window), batches))
        shards.append(windows)
    return shards


def writer_pass(prep, shards, names: list[str], out: Path) -> float:
    import torch

    from builder.writer import BackgroundWriter

    (out / "data").mkdir(parents=True, exist_ok=True)
    in_vocab = torch.zeros(prep.vocab_size, dtype=torch.bool)
    in_vocab[torch.as_tensor(prep.selected_token_ids)] = True
    start = time.perf_counter()
    writer = BackgroundWriter(prep.layout, in_vocab, prep.cfg.row_group_bytes)
    for name, windows in zip(names, shards):
        writer.open_shard(out / "data" / name)
        for num_rows, batches in windows:
            for batch in batches:
                writer.submit(batch)
            writer.end_window(num_rows)
        writer.close_shard()
    writer.finish()
    return time.perf_counter() - start


def shardwriter_alone_pass(prep, shards, names: list[str], out: Path) -> float:
    """Diagnostic: ShardWriter on rows already turned into bytes (no tensor slicing or copies)."""
    from builder.shards import ShardWriter, shard_schema

    encoded = []
    for windows in shards:
        rows = {}
        for _, batches in windows:
            for batch in batches:
                for position, (row, _argmax) in batch.rows():
                    rows[len(rows)] = row
        encoded.append([rows[i] for i in range(len(rows))])
    (out / "data").mkdir(parents=True, exist_ok=True)
    schema = shard_schema(prep.layout)
    start = time.perf_counter()
    for name, rows in zip(names, encoded):
        writer = ShardWriter(out / "data" / name, schema, prep.cfg.row_group_bytes)
        for row in rows:
            writer.add(row)
        writer.close()
        writer.publish()
    return time.perf_counter() - start


def writer_stages(prep, shards, base: Path) -> dict:
    """Seconds per stage of the writer's work on the same rows, one stage at a time (diagnostic)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from builder.shards import SCALAR_COLUMNS, shard_schema

    stages = {}
    start = time.perf_counter()
    rows = [row for windows in shards for _, batches in windows for batch in batches for _, (row, _a) in batch.rows()]
    stages["tensors_to_bytes"] = time.perf_counter() - start
    schema = shard_schema(prep.layout)
    start = time.perf_counter()
    tables, group, size = [], [], 0
    for row in rows:  # row groups cut as ShardWriter cuts them
        group.append(row)
        size += sum(len(v) for v in row.values() if isinstance(v, bytes))
        if size >= prep.cfg.row_group_bytes:
            tables.append(pa.Table.from_pylist(group, schema=schema))
            group, size = [], 0
    if group:
        tables.append(pa.Table.from_pylist(group, schema=schema))
    stages["arrow_from_pylist"] = time.perf_counter() - start
    options = dict(compression="none", use_dictionary=False, write_statistics=list(SCALAR_COLUMNS))  # ShardWriter's

    class NullSink:
        def __init__(self):
            self.n, self.closed = 0, False

        def write(self, data):
            self.n += len(data)
            return len(data)

        def tell(self):
            return self.n

        def flush(self):
            pass

        def close(self):
            self.closed = True

    start = time.perf_counter()
    writer = pq.ParquetWriter(pa.PythonFile(NullSink(), mode="w"), schema, **options)
    for t in tables:
        writer.write_table(t)
    writer.close()
    stages["parquet_into_python_sink"] = time.perf_counter() - start
    path = base / "stages.parquet"
    start = time.perf_counter()
    writer = pq.ParquetWriter(str(path), schema, **options)
    for t in tables:
        writer.write_table(t)
    writer.close()
    stages["parquet_into_native_file"] = time.perf_counter() - start
    data = path.read_bytes()
    start = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    stages["sha256"] = time.perf_counter() - start
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-samples", type=int, default=None, help="default: all 300 sample chats")
    p.add_argument("--results", default=None, help=f"JSON path (default: benchmarks/results/{NAME}.json)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    _common.quiet_libraries()
    import shutil

    from builder.build import build
    from builder.config import BuildConfig

    base = Path(temp_dir("io"))
    cache = base / "cache"
    print(f"{NAME}: building the cache (embedded default, seq 2048, fp32, Vd 1024) ...", flush=True)
    result = build(BuildConfig(output_dir=str(cache), max_samples=args.max_samples, **BUILD), progress=False)
    prep, manifest = result.prepared, result.manifest
    names = [s["name"] for s in manifest["shards"]]
    paths = [cache / "data" / n for n in names]
    total = sum(p.stat().st_size for p in paths)
    originals = {n: (cache / "data" / n).read_bytes() for n in names}
    print(f"  {total / 1e6:,.1f} MB in {len(names)} shard(s), {manifest['totals']['samples']} rows; "
          f"rebuilding the writer's input ...", flush=True)
    shards = collect_build_input(prep, cache)

    sha_start = time.perf_counter()
    for data in originals.values():
        hashlib.sha256(data).hexdigest()
    sha_mb_s = total / (time.perf_counter() - sha_start) / 1e6

    times = {k: [] for k in ("plain_write", "writer", "shardwriter_alone", "plain_read_cold", "reader_cold",
                             "pyarrow_read_cold", "plain_read_warm", "reader_warm", "reader_warm_no_touch", "pyarrow_read_warm")}
    opens, identical = [], True
    for rep in range(args.repeats):
        print(f"  round {rep + 1}/{args.repeats} ...", flush=True)
        scratch = base / f"plain-{rep}"
        scratch.mkdir()
        times["plain_write"].append(sum(plain_write(scratch / n, originals[n]) for n in names))
        shutil.rmtree(scratch)

        out = base / f"writer-{rep}"
        times["writer"].append(writer_pass(prep, shards, names, out))
        identical &= all(hashlib.sha256((out / "data" / n).read_bytes()).digest() == hashlib.sha256(originals[n]).digest()
                         for n in names)
        shutil.rmtree(out)

        out = base / f"alone-{rep}"
        times["shardwriter_alone"].append(shardwriter_alone_pass(prep, shards, names, out))
        shutil.rmtree(out)

        for p in paths:
            drop_from_page_cache(p)
        times["plain_read_cold"].append(plain_read(paths))
        for p in paths:
            drop_from_page_cache(p)
        opened, iterated, rows = reader_pass(cache)
        times["reader_cold"].append(iterated)
        opens.append(opened)
        assert rows == manifest["totals"]["samples"]
        for p in paths:
            drop_from_page_cache(p)
        times["pyarrow_read_cold"].append(pyarrow_read(paths))

        plain_read(paths)  # into the page cache
        times["plain_read_warm"].append(plain_read(paths))
        opened, iterated, _ = reader_pass(cache)
        times["reader_warm"].append(iterated)
        opens.append(opened)
        times["reader_warm_no_touch"].append(reader_pass(cache, touch=False)[1])
        times["pyarrow_read_warm"].append(pyarrow_read(paths))

    print("  the writer's stages one by one ...", flush=True)
    stages = [writer_stages(prep, shards, base) for _ in range(2)]
    stages = {k: min(s[k] for s in stages) for k in stages[0]}

    best = {k: min(v) for k, v in times.items()}
    mb_s = {k: total / v / 1e6 for k, v in best.items()}
    ratios = {
        "writer_over_plain_write": mb_s["writer"] / mb_s["plain_write"],
        "shardwriter_alone_over_plain_write": mb_s["shardwriter_alone"] / mb_s["plain_write"],
        "reader_over_plain_read_cold": mb_s["reader_cold"] / mb_s["plain_read_cold"],
        "reader_over_plain_read_warm": mb_s["reader_warm"] / mb_s["plain_read_warm"],
        "reader_no_touch_over_plain_read_warm": mb_s["reader_warm_no_touch"] / mb_s["plain_read_warm"],
        "pyarrow_read_over_plain_read_cold": mb_s["pyarrow_read_cold"] / mb_s["plain_read_cold"],
        "pyarrow_read_over_plain_read_warm": mb_s["pyarrow_read_warm"] / mb_s["plain_read_warm"],
    }
    verdicts = {
        "writer_meets_0_7": ratios["writer_over_plain_write"] >= TARGET_WRITE,
        "reader_cold_meets_0_5": ratios["reader_over_plain_read_cold"] >= TARGET_READ,
        "reader_warm_meets_0_5": ratios["reader_over_plain_read_warm"] >= TARGET_READ,
    }

    print()
    print(table(
        ["path", "best s", "MB/s", "ratio", "target", "verdict"],
        [["plain write + fsync", best["plain_write"], mb_s["plain_write"], 1.0, "", ""],
         ["BackgroundWriter (the build's path)", best["writer"], mb_s["writer"], ratios["writer_over_plain_write"],
          f">= {TARGET_WRITE}", "MET" if verdicts["writer_meets_0_7"] else "NOT MET"],
         ["  diag: ShardWriter alone, rows pre-encoded", best["shardwriter_alone"], mb_s["shardwriter_alone"],
          ratios["shardwriter_alone_over_plain_write"], "", ""],
         ["plain read, cold", best["plain_read_cold"], mb_s["plain_read_cold"], 1.0, "", ""],
         ["load_cache raw streaming, cold", best["reader_cold"], mb_s["reader_cold"], ratios["reader_over_plain_read_cold"],
          f">= {TARGET_READ}", "MET" if verdicts["reader_cold_meets_0_5"] else "NOT MET"],
         ["  diag: pyarrow read_row_group, cold", best["pyarrow_read_cold"], mb_s["pyarrow_read_cold"],
          ratios["pyarrow_read_over_plain_read_cold"], "", ""],
         ["plain read, warm (page cache)", best["plain_read_warm"], mb_s["plain_read_warm"], 1.0, "", ""],
         ["load_cache raw streaming, warm", best["reader_warm"], mb_s["reader_warm"], ratios["reader_over_plain_read_warm"],
          f">= {TARGET_READ}", "MET" if verdicts["reader_warm_meets_0_5"] else "NOT MET"],
         ["  diag: the same without touching the tensors", best["reader_warm_no_touch"], mb_s["reader_warm_no_touch"],
          ratios["reader_no_touch_over_plain_read_warm"], "", ""],
         ["  diag: pyarrow read_row_group, warm", best["pyarrow_read_warm"], mb_s["pyarrow_read_warm"],
          ratios["pyarrow_read_over_plain_read_warm"], "", ""]],
        title=f"Same bytes ({total / 1e6:,.1f} MB, {len(names)} shard(s), {manifest['totals']['samples']} rows), one run, one machine, "
              f"best of {args.repeats} (MB/s are this machine's figures):",
    ))
    print(table(
        ["writer stage (same rows, one at a time)", "s", "MB/s", "stage s / whole writer s"],
        [[k, v, total / v / 1e6, v / best["writer"]] for k, v in stages.items()],
        title="Where the writer's time goes:",
    ))
    print(f"  writer output byte-identical to the build's shard(s): {identical}")
    print(f"  reader open (card, vocab, datasets builder): {min(opens):.3f} s (not in the reader's MB/s)")
    print(f"  sha256 on this CPU: {sha_mb_s:,.0f} MB/s (the writer hashes every byte on its thread)")
    print(f"  {machine_line()}")
    data = {"cache": {"bytes": total, "shards": len(names), "rows": manifest["totals"]["samples"], **BUILD,
                      "draft_vocab": len(prep.selected_token_ids), "row_group_bytes": prep.cfg.row_group_bytes},
            "repeats": args.repeats, "seconds": times, "best_seconds": best, "mb_per_s": mb_s,
            "reader_open_s": min(opens), "sha256_mb_per_s": sha_mb_s, "writer_stage_seconds": stages, "writer_output_identical": identical,
            "ratios": ratios | verdicts, "targets": {"writer": TARGET_WRITE, "reader": TARGET_READ}}
    if args.results:
        import json

        path = Path(args.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"benchmark": NAME, "machine": _common.machine(), **data}, indent=2) + "\n")
    else:
        path = write_results(NAME, data)
    print(f"  wrote {path}")
    return data


if __name__ == "__main__":
    main()
