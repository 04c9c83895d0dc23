"""Per-column stored bytes, raw bytes and encoding speed of a built cache (what `--compression`
buys, column by column), and the random-weight target the compression figures are measured on.

`column_stats(cache)`: for every tensor column, the bytes its values take in the shards
(`stored`) and the bytes of the tensors they decode to (`raw`): the compression ratio is
raw / stored. `encode_speed(cache)`: MB/s of tensor data one thread encodes per column
(`shards.encode_value` on the decoded values, the writer's own call).
"""

from __future__ import annotations

import time
from pathlib import Path

from builder.plan import COLUMN_PARTS

# The "bigger random target" of the compression figures: the 92.3M-parameter random Llama of
# build_overhead.py (hidden 1024, 8 layers), on the first 32 sample chats at seq 512.
BIG = dict(hidden_size=1024, num_hidden_layers=8, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4)
BIG_SAMPLES, BIG_SEQ = 32, 512
KIND = {**COLUMN_PARTS, "target_argmax": "ids", "input_ids": "ids", "loss_mask": "ids"}  # the planner's parts, plus ids


def make_big_target(directory: Path) -> Path:
    from _targets import make_random_llama

    if not (Path(directory) / "config.json").exists():
        make_random_llama(Path(directory), **BIG)
    return Path(directory)


def _values(cache: Path):
    """(column, stored value bytes) of every tensor value of the cache, shard by shard."""
    import pyarrow.parquet as pq

    from builder.reader import read_manifest

    manifest = read_manifest(cache)
    columns = [n for n, s in manifest["columns"].items() if s["arrow"] == "binary"]
    for shard in manifest["shards"]:
        table = pq.read_table(Path(cache) / "data" / shard["name"], columns=columns)
        for name in columns:
            for value in table.column(name).to_pylist():
                yield manifest, name, value


def column_stats(cache: Path) -> dict[str, dict]:
    """{column: {"raw", "stored", "ratio", "encoding"}} over the whole cache."""
    import struct

    stats: dict[str, dict] = {}
    for manifest, name, value in _values(cache):
        spec = manifest["columns"][name]
        encoding = spec.get("encoding", "raw")
        if encoding == "raw":
            raw = len(value)
        else:
            n, k = struct.unpack_from("<QB", value, 0)
            raw = n * k
        s = stats.setdefault(name, {"raw": 0, "stored": 0, "encoding": encoding, "dtype": spec["dtype"], "kind": KIND.get(name, name)})
        s["raw"] += raw
        s["stored"] += len(value)
    for s in stats.values():
        s["ratio"] = s["raw"] / s["stored"] if s["stored"] else 1.0
    return stats


def encode_speed(cache: Path, repeats: int = 2) -> dict[str, float]:
    """{column: MB/s of tensor data one thread encodes} for the cache's encoded columns."""
    from builder.formats import TORCH_DTYPES
    from builder.shards import RAW, decode_value, encode_value, frombuffer

    tensors: dict[str, list] = {}
    encodings = {}
    for manifest, name, value in _values(cache):
        spec = manifest["columns"][name]
        encodings[name] = spec.get("encoding", RAW)
        dtype = TORCH_DTYPES[spec["dtype"]]
        tensors.setdefault(name, []).append(frombuffer(value, dtype).clone() if encodings[name] == RAW else decode_value(value, dtype))
    speeds = {}
    for name, values in tensors.items():
        if encodings[name] == RAW:
            continue
        nbytes = sum(t.numel() * t.element_size() for t in values)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for t in values:
                encode_value(t, encodings[name])
            best = min(best, time.perf_counter() - start)
        speeds[name] = nbytes / best / 1e6
    return speeds
