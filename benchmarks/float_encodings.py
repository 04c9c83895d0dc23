"""Lossless encodings of the float columns, compared on real activations: stored size and
write / read MB/s of a Parquet file holding one column, the rows of a real cache.

The rows: the `aux_hidden_states` and `target_probs` values (bf16) of a `probs` build of the
92.3M random Llama (hidden 1024, 8 layers; the first 32 sample chats at seq 512), one value
per sample. Encodings, each written to an in-memory Parquet file and read back (the fastest of
2 passes counts):

  byte_planes_zstd   this project's default (`shards.encode_value`): a binary column, values
                     split into byte planes, the exponent plane zstd'd, the mantissa plane as is;
                     read = `pq.read_table` + `shards.decode_value` per value
  byte_planes_zstd_L the same at zstd level L instead of the default (1): 3 (slower, denser), and
                     zstd's negative "fast" levels -1 and -5
  byte_stream_split  Parquet's own BYTE_STREAM_SPLIT + zstd on a `list<fixed_size_binary(2)>`
                     column (the split needs a fixed-width type; bf16 has no Arrow float type)
  parquet_zstd       the raw bytes in a binary column with Parquet's page-level zstd

Run: .venv/bin/python benchmarks/float_encodings.py
"""

from __future__ import annotations

import time
from pathlib import Path

import _common  # noqa: F401  (first: fresh HF_DATASETS_CACHE before datasets loads)
from _columns import BIG_SAMPLES, BIG_SEQ, make_big_target
from _common import machine_line, table, temp_dir, write_results

NAME = "float_encodings"
COLUMNS = ("aux_hidden_states", "target_probs")
OTHER_LEVELS = (3, -1, -5)  # zstd levels beside the default 1


def best_of(fn, repeats: int = 2):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def measure(values: list) -> dict:
    """{encoding: {"ratio", "write_mb_s", "read_mb_s"}} for raw bf16 byte strings `values`."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from builder.shards import PLANES_ZSTD, ZSTD_LEVEL, decode_value, encode_value

    n = sum(len(v) for v in values)
    options = dict(use_dictionary=False, write_statistics=False)

    def to_buffer(table_, **kwargs):
        sink = pa.BufferOutputStream()
        pq.write_table(table_, sink, **options, **kwargs)
        return sink.getvalue()

    def planes(level: int = ZSTD_LEVEL):
        tensors = [torch.frombuffer(bytearray(v), dtype=torch.bfloat16) for v in values]
        encoded = [b"".join(encode_value(t, PLANES_ZSTD, level).parts) for t in tensors]
        return to_buffer(pa.table({"x": pa.array(encoded, pa.binary())}), compression="none")

    def planes_read(buf):
        return lambda: [decode_value(v, torch.bfloat16) for v in pq.read_table(pa.BufferReader(buf)).column("x").to_pylist()]

    def split():
        flat = pa.FixedSizeBinaryArray.from_buffers(pa.binary(2), n // 2, [None, pa.py_buffer(b"".join(values))])
        offsets = pa.array(np.cumsum([0] + [len(v) // 2 for v in values]).astype(np.int32))
        return to_buffer(
            pa.table({"x": pa.ListArray.from_arrays(offsets, flat)}),
            compression="zstd",
            compression_level=1,
            use_byte_stream_split=["x.list.element"],
        )

    def parquet_zstd():
        return to_buffer(pa.table({"x": pa.array(values, pa.binary())}), compression="zstd", compression_level=1)

    results = {}
    levels = [(f"byte_planes_zstd_{level}", lambda level=level: planes(level)) for level in OTHER_LEVELS]
    for name, write in (("byte_planes_zstd", planes), *levels, ("byte_stream_split", split), ("parquet_zstd", parquet_zstd)):
        write_s, buf = best_of(write)
        read = planes_read(buf) if name.startswith("byte_planes_zstd") else (lambda b=buf: pq.read_table(pa.BufferReader(b)))
        read_s, _ = best_of(read)
        results[name] = {"ratio": n / buf.size, "write_mb_s": n / write_s / 1e6, "read_mb_s": n / read_s / 1e6, "bytes": buf.size}
    return results


def main() -> dict:
    _common.quiet_libraries()
    import pyarrow.parquet as pq

    from builder.config import BuildConfig
    from builder.pipeline import build

    target = make_big_target(Path(temp_dir("big-target")) / "model")
    out = Path(temp_dir("float_encodings")) / "cache"
    print(
        f"{NAME}: building a probs cache of the random Llama (hidden 1024), {BIG_SAMPLES} chats, seq {BIG_SEQ}, uncompressed ...",
        flush=True,
    )
    result = build(
        BuildConfig(
            target_model=str(target),
            input_data="sample-chats",
            output_dir=str(out),
            seq_length=BIG_SEQ,
            max_samples=BIG_SAMPLES,
            dtype="bf16",
            compression="none",
        ),
        progress=False,
    )
    table_ = pq.read_table(out / "data" / result.manifest["shards"][0]["name"], columns=list(COLUMNS))
    measured = {c: measure(table_.column(c).to_pylist()) for c in COLUMNS}
    rows = [[c, name, r["ratio"], r["write_mb_s"], r["read_mb_s"]] for c, by in measured.items() for name, r in by.items()]
    print(
        table(
            ["column", "encoding", "raw / stored", "write MB/s", "read MB/s"],
            rows,
            title="One column of real rows into an in-memory Parquet file and back (MB/s of tensor data, one thread):",
        )
    )
    print(f"  {machine_line()}")
    path = write_results(NAME, {"columns": measured, "rows": table_.num_rows})
    print(f"  wrote {path.relative_to(_common.ROOT)}")
    return measured


if __name__ == "__main__":
    main()
