"""How much a GPU build writes, and how many writer threads keep up with the forward: a table
for Llama-3.1-8B and Llama-3.1-70B in every format, from figures measured by the other
benchmarks (no build here: arithmetic, reproducible from the results files).

Per token, per format and aux dtype, from the builder's own `Layout` (H=4096 / 8192, 3 aux
layers, vocab 128256; loss-masked share of tokens as measured on the sample chats):
- raw bytes (what the forward hands the writer) and stored bytes after the default
  compression, each column divided by its ratio measured on the random-weight Llama
  (hidden 1024) in `results/format_sizes.json` (probs measured at Vd 1024);
- GB/s per GPU at a stated forward rate, an assumption and not a measurement
  (`TOKENS_PER_S_8B`): 25,000 tokens/s for 8B on one H100 (bf16); Llama-3.1-70B at the same
  share of the GPU's peak (FLOPs per token from its shape: 2 per decoder parameter, plus the
  head at loss-masked positions), split over 4 H100s with `--gpus-per-target 4` (141 GB of
  bf16 weights; 48.2 GiB per GPU per the placement planner), where one GPU computes at a
  time, so one replica runs at that rate and each of its 4 GPUs carries a quarter;
- writer threads needed per build process (one per replica): the replica's raw MB/s over the
  MB/s one thread encodes, rounded up, from the per-column encode speeds in
  `results/format_sizes.json` (measured on this machine's CPU), weighted by each column's
  share of the bytes. The division assumes encoding scales linearly with threads; measured
  encoding (`io_throughput.py`) grows less than that. With `--compression none` encoding is
  free (the tensors' memory is handed to Arrow as is): the disk must take the raw GB/s, and
  one thread writes Parquet. The Parquet MB/s printed for it is the writer's Parquet stage
  alone in `results/io_throughput.json` (tensor bytes over the seconds of "parquet into a
  native file" in `writer_stage_seconds`, the slower of its `none` and `zstd` shards).

Run: .venv/bin/python benchmarks/gpu_feed.py (after format_sizes.py and io_throughput.py)
"""

from __future__ import annotations

import json
import math

import _common  # noqa: F401
from _common import RESULTS_DIR, machine_line, write_results
from _targets import flops_per_token

NAME = "gpu_feed"
LLAMA = {
    "Llama-3.1-8B": dict(
        hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256
    ),
    "Llama-3.1-70B": dict(
        hidden_size=8192, num_hidden_layers=80, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256
    ),
}
GPUS_PER_REPLICA = {"Llama-3.1-8B": 1, "Llama-3.1-70B": 4}  # 70B: 48.2 GiB per 80 GiB GPU per the placement planner
TOKENS_PER_S_8B = 25_000  # one H100, bf16: an assumed rate, not measured here
FORMATS = [("probs", 8192), ("probs", 32000), ("topk", 32000), ("hidden", 32000)]
AUX_DTYPES = ("bf16", "fp8")
TOPK = 64


def main() -> dict:
    from builder.formats import TORCH_DTYPES, Layout

    sizes = json.loads((RESULTS_DIR / "format_sizes.json").read_text())
    io = json.loads((RESULTS_DIR / "io_throughput.json").read_text())
    loss_share = sizes["llama_8b"]["loss_share"]
    measured = {(b["target_format"], b["aux_dtype"]): b for b in sizes["big_builds"]}
    parquet_mb_s = min(
        io["cache"]["tensor_bytes"] / io["writer_stage_seconds"][c]["parquet into a native file"] / 1e6 for c in ("none", "zstd")
    )
    flops = {name: flops_per_token(shape, loss_share) for name, shape in LLAMA.items()}
    rate = {name: TOKENS_PER_S_8B * flops["Llama-3.1-8B"] / f for name, f in flops.items()}  # per replica
    rows = []
    for model, shape in LLAMA.items():
        h = shape["hidden_size"]
        for fmt, vd in FORMATS:
            for aux in AUX_DTYPES:
                layout = Layout(fmt, "bf16", aux, min(TOPK, vd), vd, 3 * h, h)
                build = measured[(fmt, aux)]
                raw = stored = seconds_per_byte = 0.0
                for name, spec in layout.columns().items():
                    width = spec["shape"][1] if len(spec["shape"]) == 2 else 1
                    nbytes = width * TORCH_DTYPES[spec["dtype"]].itemsize * (1.0 if spec["per"] == "token" else loss_share)
                    column = build["columns"].get(name, {})
                    raw += nbytes
                    stored += nbytes / column.get("ratio", 1.0)
                    speed = build.get("encode_mb_per_s", {}).get(name)
                    seconds_per_byte += nbytes / (speed * 1e6) if speed else 0.0
                per_thread = raw / seconds_per_byte / 1e6  # MB/s of tensor data one thread encodes
                per_gpu_tokens = rate[model] / GPUS_PER_REPLICA[model]
                raw_gb_s, stored_gb_s = per_gpu_tokens * raw / 1e9, per_gpu_tokens * stored / 1e9
                replica_raw_mb_s = rate[model] * raw / 1e6
                rows.append(
                    {
                        "model": model,
                        "format": fmt,
                        "draft_vocab": vd,
                        "aux_dtype": aux,
                        "tokens_per_s_per_gpu": per_gpu_tokens,
                        "raw_bytes_per_token": raw,
                        "stored_bytes_per_token": stored,
                        "compression_ratio": raw / stored,
                        "raw_gb_s_per_gpu": raw_gb_s,
                        "stored_gb_s_per_gpu": stored_gb_s,
                        "encode_mb_s_per_thread": per_thread,
                        "raw_mb_s_per_process": replica_raw_mb_s,
                        "threads_zstd": math.ceil(replica_raw_mb_s / per_thread),
                    }
                )
    lines = [
        "| model | format | aux | bytes/token: raw → zstd | GB/s written per GPU: zstd (none) | writer threads per process (zstd) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        fmt = f"probs, Vd {r['draft_vocab'] // 1000}k" if r["format"] == "probs" else ("topk-64" if r["format"] == "topk" else "hidden")
        lines.append(
            f"| {r['model'].split('-')[-1]} | {fmt} | {r['aux_dtype']} | {r['raw_bytes_per_token']:,.0f} → "
            f"{r['stored_bytes_per_token']:,.0f} ({r['compression_ratio']:.2f}x) | {r['stored_gb_s_per_gpu']:.2f} "
            f"({r['raw_gb_s_per_gpu']:.2f}) | {r['threads_zstd']} |"
        )
    table = "\n".join(lines)
    print(table)
    print()
    print(
        f"- forward: {TOKENS_PER_S_8B:,} tokens/s for 8B on one H100; 70B at the same share of peak: {rate['Llama-3.1-70B']:,.0f} tokens/s "
        f"per 4-GPU replica ({flops['Llama-3.1-70B'] / 1e9:.0f} vs {flops['Llama-3.1-8B'] / 1e9:.1f} GFLOP/token), "
        f"{rate['Llama-3.1-70B'] / GPUS_PER_REPLICA['Llama-3.1-70B']:,.0f} per GPU"
    )
    print(
        f"- loss-masked share {loss_share:.1%} (sample chats); "
        "zstd ratios per column from the random Llama (hidden 1024) in format_sizes.json"
    )
    print(
        f"- threads: a process's raw MB/s / MB/s one thread encodes ({min(r['encode_mb_s_per_thread'] for r in rows):,.0f}-"
        f"{max(r['encode_mb_s_per_thread'] for r in rows):,.0f} MB/s by format, per-column encode speeds on this CPU); the 70B's "
        f"process serves a 4-GPU replica. --compression none: no encoding cost; the disk takes the raw GB/s, and one thread "
        f"writes Parquet at {parquet_mb_s:,.0f} MB/s here"
    )
    print(f"  {machine_line()}")
    data = {
        "tokens_per_s_8b_h100": TOKENS_PER_S_8B,
        "tokens_per_s_per_replica": rate,
        "gpus_per_replica": GPUS_PER_REPLICA,
        "flops_per_token": flops,
        "loss_share": loss_share,
        "parquet_write_mb_s": parquet_mb_s,
        "rows": rows,
        "markdown_table": table,
    }
    path = write_results(NAME, data)
    print(f"  wrote {path.relative_to(_common.ROOT)}")
    return data


if __name__ == "__main__":
    main()
