"""Streaming a cache from the Hub vs reading it locally.

Builds one cache (the embedded tiny target over the 300 sample chats, seq 512, bf16, 6
shards), pushes it to a loopback Hub (tests/hub_server.py) running in its own process on
127.0.0.1, then measures, in this process, on the same files:

  local   load_cache(DIR, streaming=True) over the whole cache
  hub     load_cache(REPO, revision=TAG, streaming=True): HTTP Range reads through
          `datasets`/`HfFileSystem`, the path a trainer uses

both in the stored (`raw`) layout: seconds to open (revision, card, vocab, data files) and
to iterate every row (MB/s of shard bytes, rows/s), and the ratio hub / local. Then samples/s a torch
DataLoader delivers from the Hub in the NeMo layout (`collate_nemo`, batch 4) with 0 and 2 workers (workers split the shards).

Loopback has no network latency or bandwidth limit: the ratio measures the client-side cost
of the HTTP path (requests, Range handling, copies), not a real link. Best of 3 runs each.

Run: .venv/bin/python benchmarks/hub_stream.py
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import _common  # noqa: F401  (first: fresh HF_DATASETS_CACHE before datasets loads)
from _common import ROOT, machine_line, table, temp_dir, write_results

NAME = "hub_stream"
REPO, TAG = "tester/bench", "v1"
REPEATS = 3
BUILD = dict(
    target_model="tiny-llama", input_data="sample-chats", seq_length=512, shard_size=50, batch_size=8, dtype="bf16", draft_vocab_size=512
)


def start_hub() -> tuple[subprocess.Popen, str]:
    """The loopback Hub in its own process (the reader's GIL is not shared with the server)."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "hub_server.py"), temp_dir("hub"), "900"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return proc, proc.stdout.readline().strip()


def point_clients_at(url: str) -> None:
    """Before `huggingface_hub`/`datasets` are imported: they read these at import time."""
    sys.path.insert(0, str(ROOT / "tests"))
    from hub_server import TOKEN

    os.environ.update(
        HF_ENDPOINT=url, HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0", HF_HUB_DISABLE_XET="1", HF_TOKEN=TOKEN, HF_HOME=temp_dir("hf-home")
    )


def timed(fn) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(REPEATS):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def read_all(location, **kwargs) -> tuple[float, float, int]:
    """(seconds to open: revision, card, vocab, data files; seconds to iterate every row; rows)."""
    from builder.reader import load_cache

    start = time.perf_counter()
    dataset = load_cache(location, layout="raw", streaming=True, **kwargs)
    opened = time.perf_counter()
    rows = sum(1 for _ in dataset)
    return opened - start, time.perf_counter() - opened, rows


def best_read(location, **kwargs) -> tuple[float, float, int]:
    runs = [read_all(location, **kwargs) for _ in range(REPEATS)]
    return min(r[0] for r in runs), min(r[1] for r in runs), runs[-1][2]


def loader_samples(location, workers: int, **kwargs) -> int:
    import torch

    from builder.reader import collate_nemo, load_cache

    dataset = load_cache(location, layout="nemo", streaming=True, **kwargs)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=workers, collate_fn=collate_nemo)
    return sum(batch["input_ids"].shape[0] for batch in loader)


def main() -> None:
    proc, url = start_hub()
    try:
        point_clients_at(url)
        from _common import quiet_libraries

        quiet_libraries()
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
        from builder.config import BuildConfig
        from builder.pipeline import build
        from builder.push import PushTarget, push_cache

        out = Path(temp_dir("cache")) / "cache"
        start = time.perf_counter()
        result = build(BuildConfig(output_dir=str(out), **BUILD), progress=False)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        push_cache(out, PushTarget(REPO, tag=TAG))
        push_s = time.perf_counter() - start
        shard_bytes = sum(s["bytes"] for s in result.manifest["shards"])
        samples = result.manifest["totals"]["samples"]

        local_open, local_s, local_n = best_read(out)
        hub_open, hub_s, hub_n = best_read(REPO, revision=TAG)
        assert local_n == hub_n == samples, (local_n, hub_n, samples)
        loaders = {}
        for workers in (0, 2):
            seconds, n = timed(functools.partial(loader_samples, REPO, workers, revision=TAG))
            assert n == samples
            loaders[workers] = samples / seconds
        local_loader_s, _ = timed(lambda: loader_samples(out, 0))
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)

    rows = [
        ["local stream (raw)", local_open, local_s, shard_bytes / local_s / 1e6, samples / local_s],
        ["loopback Hub stream (raw)", hub_open, hub_s, shard_bytes / hub_s / 1e6, samples / hub_s],
    ]
    print(machine_line())
    print(
        f"cache: {samples} samples, {len(result.manifest['shards'])} shards, {shard_bytes / 1e6:.1f} MB; "
        f"build {build_s:.1f}s, push {push_s:.1f}s"
    )
    print(table(["read", "open s", "iterate s", "MB/s", "rows/s"], rows, title=f"Streaming read of every row, best of {REPEATS}"))
    print(f"  hub / local throughput (iterating): {local_s / hub_s:.2f}; including open: {(local_open + local_s) / (hub_open + hub_s):.2f}")
    print(
        table(
            ["DataLoader (nemo layout, batch 4)", "samples/s"],
            [["local, 0 workers", samples / local_loader_s], ["Hub, 0 workers", loaders[0]], ["Hub, 2 workers", loaders[2]]],
            title="Samples delivered to a DataLoader",
        )
    )
    print(f"  Hub 2 workers / 0 workers: {loaders[2] / loaders[0]:.2f}")
    path = write_results(
        NAME,
        {
            "cache": {"samples": samples, "shards": len(result.manifest["shards"]), "bytes": shard_bytes, **BUILD},
            "build_s": build_s,
            "push_s": push_s,
            "local_stream": {
                "open_s": local_open,
                "iterate_s": local_s,
                "mb_per_s": shard_bytes / local_s / 1e6,
                "rows_per_s": samples / local_s,
            },
            "hub_stream": {"open_s": hub_open, "iterate_s": hub_s, "mb_per_s": shard_bytes / hub_s / 1e6, "rows_per_s": samples / hub_s},
            "hub_over_local_throughput": local_s / hub_s,
            "hub_over_local_including_open": (local_open + local_s) / (hub_open + hub_s),
            "dataloader_samples_per_s": {
                "local_0_workers": samples / local_loader_s,
                "hub_0_workers": loaders[0],
                "hub_2_workers": loaders[2],
            },
        },
    )
    print(f"results: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
