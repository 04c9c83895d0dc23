"""The trainer's batch: NeMo-layout batches through a DataLoader with 2 workers, next to
pyarrow's read of the same files.

The cache: a real build of the embedded default (tiny-llama, the 300 sample chats) at seq
length 2048, bf16, `probs` over the whole 1,024-token vocabulary, in 4 shards (so each of 2
streaming workers reads its own 2). In one process, interleaved, 3 times each (the fastest
counts):

  pyarrow       `pq.ParquetFile.read_row_group` over every row group of every shard, the
                columns the NeMo layout reads: the floor of any reader built on pyarrow.
  loader        `DataLoader(load_cache(DIR, layout="nemo"), batch_size=4, num_workers=2,
                collate_fn=collate_nemo)`, iterating every batch in the main process and
                reading each batch byte once there (a copy into a scratch buffer, as a
                trainer's host-to-device copy reads it). Streaming (the default) and
                map-style; and streaming with no workers (one process, one torch thread).
                Worker start-up is included (a new iterator per epoch, as without
                `persistent_workers`); the open is not.

Figures: samples/s; MB/s of shard bytes (the same bytes pyarrow reads, so the ratio loader /
pyarrow is the cost of everything above pyarrow's read); MB/s of the NeMo batches delivered
(padded `[B, T, ...]`: int64 ids and masks, the aux states, dense probs, bool position mask).

Diagnostics, in this process with no workers and one torch thread (as in a DataLoader worker):
- on rows already read into memory, the decode side alone (`SampleDecoder` + `collate_nemo`,
  each batch dropped once made), against the same work done the earlier way (scatter, shift
  by concatenation, pad by concatenation, stack), with outputs checked bit-identical;
- the price of the memory a worker's batch lives in: allocating and filling one block of each
  batch's size in fresh shared memory (where a worker's batch must be to reach the main
  process, with `default_collate` too), against the same in this process's heap.

Run: .venv/bin/python benchmarks/collate_throughput.py [--repeats N] [--max-samples N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common  # noqa: F401  (first: fresh HF_DATASETS_CACHE before datasets loads)
from _common import machine_line, table, temp_dir, write_results

NAME = "collate_throughput"
BUILD = {"target_model": "tiny-llama", "input_data": "sample-chats", "seq_length": 2048, "dtype": "bf16", "shard_size": 75}
BATCH_SIZE, WORKERS = 4, 2


def pyarrow_read(paths: list[Path], columns: list[str]) -> float:
    import pyarrow.parquet as pq

    start = time.perf_counter()
    for path in paths:
        f = pq.ParquetFile(path)
        for i in range(f.num_row_groups):
            f.read_row_group(i, columns=columns)
    return time.perf_counter() - start


def loader_pass(cache: Path, streaming: bool, workers: int = WORKERS) -> tuple[float, int, list[int]]:
    """(seconds to iterate every batch, samples, bytes of each batch) through `workers` workers. Every
    batch byte is read once in this process (copied into a scratch buffer, as a trainer's
    host-to-device copy reads it)."""
    import torch

    from builder.reader import collate_nemo, load_cache

    dataset = load_cache(str(cache), layout="nemo", streaming=streaming)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, num_workers=workers, collate_fn=collate_nemo)
    samples, sizes, scratch = 0, [], torch.empty(64 << 20, dtype=torch.uint8)
    start = time.perf_counter()
    for batch in loader:
        samples += batch["input_ids"].shape[0]
        sizes.append(0)
        for t in batch.values():
            flat = t.reshape(-1).view(torch.uint8)
            if flat.numel() > scratch.numel():
                scratch = torch.empty(flat.numel(), dtype=torch.uint8)
            scratch[: flat.numel()].copy_(flat)
            sizes[-1] += flat.numel()
    return time.perf_counter() - start, samples, sizes


def fresh_memory_pass(sizes: list[int], shared: bool) -> float:
    """Seconds to allocate and fill one block per batch: shared memory (what a worker's batch
    lives in, `default_collate`'s too) or this process's heap."""
    import torch

    start = time.perf_counter()
    for size in sizes:
        block = torch.UntypedStorage._new_shared(size) if shared else torch.UntypedStorage(size)
        torch.empty(0, dtype=torch.uint8).set_(block, 0, (size,)).fill_(1)
        del block
    return time.perf_counter() - start


# ---- the earlier decode, for the diagnostic: every step a new tensor -------------------------


def _shift_by_concatenation(tensor):
    import torch

    return torch.cat([tensor[1:], tensor.new_zeros((1, *tensor.shape[1:]))])


def earlier_to_nemo(raw: dict, t2d, probs, aux) -> dict:
    import torch

    length = raw["input_ids"].numel()
    loss = raw["loss_mask"].bool()
    dense = probs.new_zeros(length, probs.shape[-1])
    dense[loss] = probs
    supervised = torch.zeros(length, dtype=torch.bool)
    supervised[loss] = t2d[raw["target_argmax"].long()]
    return {
        "input_ids": _shift_by_concatenation(raw["input_ids"].long()),
        "attention_mask": torch.ones(length, dtype=torch.long),
        "loss_mask": _shift_by_concatenation(loss.long()),
        "aux_hidden_states": aux,
        "target_probs": _shift_by_concatenation(dense),
        "position_mask": _shift_by_concatenation(supervised).unsqueeze(-1),
    }


def earlier_collate(samples: list[dict]) -> dict:
    import torch

    width = max(s["input_ids"].shape[0] for s in samples)
    return {
        key: torch.stack([torch.cat([s[key], s[key].new_zeros((width - s[key].shape[0], *s[key].shape[1:]))]) for s in samples])
        for key in samples[0]
    }


def earlier_decode(decoder, row: dict) -> dict:
    from builder.formats import decode_aux

    raw = decoder.decode(row)
    aux = decode_aux(raw["aux_hidden_states"], raw.get("aux_scales"), decoder.aux_dtype)
    return earlier_to_nemo(raw, decoder.t2d, raw["target_probs"], aux)


def decode_passes(rows: list[dict], decoder) -> tuple[float, float]:
    """(seconds of SampleDecoder + collate_nemo, seconds of the earlier way), one torch thread
    (what a DataLoader worker runs with); each batch is dropped once made, as a training step does."""
    import torch

    from builder.reader import collate_nemo

    batches = [rows[i : i + BATCH_SIZE] for i in range(0, len(rows), BATCH_SIZE)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for batch in batches:
            collate_nemo([decoder(row) for row in batch])
        current_s = time.perf_counter() - start
        start = time.perf_counter()
        for batch in batches:
            earlier_collate([earlier_decode(decoder, row) for row in batch])
        earlier_s = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return current_s, earlier_s


def same_outputs(rows: list[dict], decoder) -> tuple[bool, int]:
    """(the current and the earlier way give bit-identical batches, bytes of those batches)."""
    import torch

    from builder.reader import collate_nemo

    same, nbytes = True, 0
    for i in range(0, len(rows), BATCH_SIZE):
        batch = rows[i : i + BATCH_SIZE]
        current, earlier = collate_nemo([decoder(row) for row in batch]), earlier_collate([earlier_decode(decoder, row) for row in batch])
        same &= current.keys() == earlier.keys() and all(
            current[k].dtype == earlier[k].dtype and torch.equal(current[k], earlier[k]) for k in current
        )
        nbytes += sum(t.numel() * t.element_size() for t in current.values())
    return same, nbytes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-samples", type=int, default=None, help="default: all 300 sample chats")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    _common.quiet_libraries()
    import pyarrow.parquet as pq
    import torch

    from builder.config import BuildConfig
    from builder.pipeline import build
    from builder.reader import RowDecoder, SampleDecoder, load_cache

    cache = Path(temp_dir("collate")) / "cache"
    print(f"{NAME}: building the cache (embedded default, seq 2048, bf16, probs, Vd 1024, 4 shards) ...", flush=True)
    result = build(BuildConfig(output_dir=str(cache), max_samples=args.max_samples, **BUILD), progress=False)
    manifest = result.manifest
    paths = [cache / "data" / s["name"] for s in manifest["shards"]]
    total = sum(p.stat().st_size for p in paths)
    rows_total = manifest["totals"]["samples"]
    columns = list(RowDecoder(manifest).columns)
    map_style = load_cache(str(cache), layout="nemo", streaming=False)  # converts to Arrow once, outside the timings
    source = map_style.source
    rows = [row for p in paths for row in pq.read_table(p, columns=columns).to_pylist()]  # stored rows (bytes), as `datasets` yields them
    decoder = SampleDecoder(source, manifest, "nemo")
    print(f"  {total / 1e6:,.1f} MB in {len(paths)} shards, {rows_total} rows, {manifest['totals']['tokens']:,} tokens", flush=True)

    identical, decoded_bytes = same_outputs(rows, decoder)
    times = {
        k: []
        for k in (
            "pyarrow",
            "loader_streaming",
            "loader_map",
            "loader_streaming_no_workers",
            "decode_current",
            "decode_earlier",
            "fill_shared_memory",
            "fill_heap_memory",
        )
    }
    batch_bytes = {"decode_current": decoded_bytes, "decode_earlier": decoded_bytes}
    threads = torch.get_num_threads()
    for rep in range(args.repeats):
        print(f"  round {rep + 1}/{args.repeats} ...", flush=True)
        times["pyarrow"].append(pyarrow_read(paths, columns))
        for key, streaming in (("loader_streaming", True), ("loader_map", False)):
            seconds, samples, sizes = loader_pass(cache, streaming)
            assert samples == rows_total, (key, samples)
            times[key].append(seconds)
            batch_bytes[key] = sum(sizes)
        torch.set_num_threads(1)  # what a worker runs with
        seconds, samples, one_process_sizes = loader_pass(cache, True, workers=0)
        assert samples == rows_total
        times["loader_streaming_no_workers"].append(seconds)
        batch_bytes["loader_streaming_no_workers"] = sum(one_process_sizes)
        times["fill_shared_memory"].append(fresh_memory_pass(sizes, shared=True))
        times["fill_heap_memory"].append(fresh_memory_pass(sizes, shared=False))
        torch.set_num_threads(threads)
        current_s, earlier_s = decode_passes(rows, decoder)
        times["decode_current"].append(current_s)
        times["decode_earlier"].append(earlier_s)

    best = {k: min(v) for k, v in times.items()}
    file_mb_s = {k: total / v / 1e6 for k, v in best.items()}
    samples_s = {k: rows_total / v for k, v in best.items()}
    batch_bytes["fill_shared_memory"] = batch_bytes["fill_heap_memory"] = batch_bytes["loader_map"]
    batch_mb_s = {k: batch_bytes[k] / best[k] / 1e6 for k in batch_bytes}
    ratios = {
        "loader_streaming_over_pyarrow": file_mb_s["loader_streaming"] / file_mb_s["pyarrow"],
        "loader_map_over_pyarrow": file_mb_s["loader_map"] / file_mb_s["pyarrow"],
        "loader_streaming_no_workers_over_pyarrow": file_mb_s["loader_streaming_no_workers"] / file_mb_s["pyarrow"],
        "loader_streaming_over_no_workers_speed": best["loader_streaming_no_workers"] / best["loader_streaming"],
        "decode_current_over_earlier_speed": best["decode_earlier"] / best["decode_current"],
        "fill_shared_over_heap_time": best["fill_shared_memory"] / best["fill_heap_memory"],
    }

    print()
    print(
        table(
            ["path", "best s", "samples/s", "shard MB/s", "batch MB/s", "shard MB/s / pyarrow"],
            [
                ["pyarrow read_row_group (same files, same columns)", best["pyarrow"], samples_s["pyarrow"], file_mb_s["pyarrow"], "", 1.0],
                [
                    f"DataLoader nemo, streaming, {WORKERS} workers",
                    best["loader_streaming"],
                    samples_s["loader_streaming"],
                    file_mb_s["loader_streaming"],
                    batch_mb_s["loader_streaming"],
                    ratios["loader_streaming_over_pyarrow"],
                ],
                [
                    f"DataLoader nemo, map-style, {WORKERS} workers",
                    best["loader_map"],
                    samples_s["loader_map"],
                    file_mb_s["loader_map"],
                    batch_mb_s["loader_map"],
                    ratios["loader_map_over_pyarrow"],
                ],
                [
                    "DataLoader nemo, streaming, no workers, 1 torch thread",
                    best["loader_streaming_no_workers"],
                    samples_s["loader_streaming_no_workers"],
                    file_mb_s["loader_streaming_no_workers"],
                    batch_mb_s["loader_streaming_no_workers"],
                    ratios["loader_streaming_no_workers_over_pyarrow"],
                ],
                [
                    "  diag: decode + collate only, in process, 1 thread",
                    best["decode_current"],
                    samples_s["decode_current"],
                    file_mb_s["decode_current"],
                    batch_mb_s["decode_current"],
                    "",
                ],
                [
                    "  diag: the same the earlier way (cat + stack)",
                    best["decode_earlier"],
                    samples_s["decode_earlier"],
                    file_mb_s["decode_earlier"],
                    batch_mb_s["decode_earlier"],
                    "",
                ],
                [
                    "  diag: allocate + fill the batches' bytes, shared memory",
                    best["fill_shared_memory"],
                    "",
                    "",
                    batch_mb_s["fill_shared_memory"],
                    "",
                ],
                ["  diag: the same in this process's heap", best["fill_heap_memory"], "", "", batch_mb_s["fill_heap_memory"], ""],
            ],
            title=f"{total / 1e6:,.1f} MB in {len(paths)} shards, {rows_total} rows, batch {BATCH_SIZE}; one run, one machine, "
            f"best of {args.repeats} (absolute figures are this machine's):",
        )
    )
    print(
        f"  NeMo batches delivered: {batch_bytes['loader_streaming'] / 1e6:,.1f} MB for {total / 1e6:,.1f} MB of shards "
        f"({batch_bytes['loader_streaming'] / total:.2f}x: int64 ids and masks, dense probs at every position, padding)"
    )
    print(
        f"  decode + collate: {ratios['decode_current_over_earlier_speed']:.2f}x the speed of the earlier way; "
        f"outputs bit-identical: {identical}"
    )
    print(f"  fresh shared memory takes {ratios['fill_shared_over_heap_time']:.1f}x the time of heap memory to allocate and fill")
    print(f"  {machine_line()}")
    data = {
        "cache": {
            "bytes": total,
            "shards": len(paths),
            "rows": rows_total,
            "tokens": manifest["totals"]["tokens"],
            **BUILD,
            "draft_vocab": manifest["identity"]["draft_vocab_size"],
            "target_format": "probs",
        },
        "batch_size": BATCH_SIZE,
        "workers": WORKERS,
        "repeats": args.repeats,
        "seconds": times,
        "best_seconds": best,
        "samples_per_s": samples_s,
        "shard_mb_per_s": file_mb_s,
        "batch_mb_per_s": batch_mb_s,
        "batch_bytes": batch_bytes,
        "decode_outputs_identical": identical,
        "ratios": ratios,
    }
    path = write_results(NAME, data)
    print(f"  wrote {path}")
    return data


if __name__ == "__main__":
    main()
