"""Bytes per token and per sample of every target format and aux dtype (issue 6), measured on
real builds and extrapolated to Llama-3.1-8B, next to the reference's padded dense layout.

Measured: the embedded default (tiny-llama: H=64, 3 aux layers; the 300 sample chats) at seq
length 2048, dtype bf16, for target formats `probs`, `topk` (K=64) and `hidden`, each with
aux dtype bf16 and fp8 (e4m3 + one fp32 scale per token), at draft vocab 256 and 1024 (the
tiny target's whole vocabulary): 12 builds. Cache bytes are the Parquet shards (manifest
totals); a `hidden` cache also stores the head's draft rows once (vocab/lm_head.safetensors,
listed apart: it does not grow with the data). Each build's shard bytes are checked against
the raw tensor bytes the builder's `Layout` predicts (Parquet's overhead is printed).

Extrapolated (arithmetic, no build): Llama-3.1-8B, H=4096, 3 aux layers, Vd=32000, a sample
of 2,048 tokens, with the loss-masked share of tokens measured on the sample chats. Bytes per
token come from the same `Layout` (what the builder writes per token and per loss-masked
position) plus the measured Parquet overhead (under 0.1%).

Reference: NeMo Automodel's `precompute_eagle3` layout, every sample padded to seq_length:
int64 input_ids / attention_mask / loss_mask, `[S, 3H]` aux and `[S, Vd]` probs in bf16, a
bool position mask: `S * (3*8 + 3H*2 + Vd*2 + 1)` bytes per sample. On the embedded default
the sample chats are short (mean 239 tokens against 2048), so the reference pays for padding
too; the 8B extrapolation uses full 2,048-token samples, where it pays none, so that ratio is
the layout's alone.

Run: .venv/bin/python benchmarks/format_sizes.py [--draft-vocabs 256,1024] [--results PATH]
"""

from __future__ import annotations

import _common  # noqa: F401  (first: fresh HF_DATASETS_CACHE before datasets loads)

import argparse
import json
import time
from pathlib import Path

from _common import machine_line, temp_dir, write_results

NAME = "format_sizes"
SEQ_LENGTH = 2048
FORMATS = ("probs", "topk", "hidden")
AUX_DTYPES = ("bf16", "fp8")
TOPK = 64
LLAMA_8B = {"hidden_size": 4096, "aux_layers": 3, "draft_vocab": 32000, "tokens": 2048, "target_vocab": 128256}


def reference_bytes_per_position(aux_width: int, draft_vocab: int) -> int:
    return 3 * 8 + aux_width * 2 + draft_vocab * 2 + 1


def layout_bytes(target_format: str, aux_dtype: str, hidden: int, draft_vocab: int, aux_layers: int = 3) -> tuple[int, int]:
    from builder.formats import Layout

    return Layout(target_format, "bf16", aux_dtype, min(TOPK, draft_vocab), draft_vocab, aux_layers * hidden, hidden).bytes_per_position()


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--draft-vocabs", default="256,1024")
    p.add_argument("--results", default=None, help=f"JSON path (default: benchmarks/results/{NAME}.json)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    _common.quiet_libraries()
    from builder.build import build
    from builder.config import BuildConfig
    from builder.manifest import LM_HEAD_FILE

    draft_vocabs = [int(x) for x in args.draft_vocabs.split(",")]
    print(f"{NAME}: embedded default (tiny-llama, sample-chats), seq {SEQ_LENGTH}, bf16; formats {FORMATS} x aux {AUX_DTYPES} "
          f"x draft vocab {draft_vocabs}", flush=True)
    builds = []
    for vd in draft_vocabs:
        for fmt in FORMATS:
            for aux in AUX_DTYPES:
                out = Path(temp_dir(f"{fmt}-{aux}-{vd}")) / "cache"
                start = time.perf_counter()
                result = build(BuildConfig(target_model="tiny-llama", input_data="sample-chats", output_dir=str(out),
                                           seq_length=SEQ_LENGTH, draft_vocab_size=vd, dtype="bf16", target_format=fmt,
                                           topk=TOPK, aux_dtype=aux), progress=False)
                seconds = time.perf_counter() - start
                prep, m = result.prepared, result.manifest
                totals = m["totals"]
                n, tokens, loss = totals["samples"], totals["tokens"], totals["loss_tokens"]
                hidden = prep.hidden_size
                aux_width = len(prep.aux_layer_ids) * hidden
                per_token, per_loss = layout_bytes(fmt, aux, hidden, vd, len(prep.aux_layer_ids))
                predicted = tokens * per_token + loss * per_loss
                head = out / LM_HEAD_FILE
                reference = n * SEQ_LENGTH * reference_bytes_per_position(aux_width, vd)
                builds.append({
                    "target_format": fmt, "aux_dtype": aux, "draft_vocab": vd, "samples": n, "tokens": tokens,
                    "loss_tokens": loss, "hidden_size": hidden, "aux_width": aux_width,
                    "shard_bytes": totals["bytes"], "head_rows_bytes": head.stat().st_size if head.exists() else 0,
                    "cache_dir_bytes": directory_bytes(out),
                    "bytes_per_token": totals["bytes"] / tokens, "bytes_per_sample": totals["bytes"] / n,
                    "predicted_bytes": predicted, "parquet_overhead": totals["bytes"] / predicted - 1,
                    "reference_bytes": reference, "reference_bytes_per_token": reference / tokens,
                    "reference_bytes_per_sample": reference / n, "ratio_reference_over_cache": reference / totals["bytes"],
                    "quality": m.get("quality", {}), "build_s": seconds,
                })
                print(f"  built {fmt:6s} aux {aux:4s} Vd {vd:5d}: {totals['bytes']:,} shard bytes ({seconds:.1f} s)", flush=True)

    b0 = builds[0]
    loss_share = b0["loss_tokens"] / b0["tokens"]
    overhead = max(b["parquet_overhead"] for b in builds)
    ref8 = reference_bytes_per_position(3 * LLAMA_8B["hidden_size"], LLAMA_8B["draft_vocab"])  # per position; samples are full
    projections = []
    for fmt in FORMATS:
        for aux in AUX_DTYPES:
            per_token, per_loss = layout_bytes(fmt, aux, LLAMA_8B["hidden_size"], LLAMA_8B["draft_vocab"], LLAMA_8B["aux_layers"])
            bpt = (per_token + loss_share * per_loss) * (1 + overhead)
            # the same target on the sample chats' own lengths (mean 239 tokens): the reference pads to 2,048
            chats = (b0["tokens"] * per_token + b0["loss_tokens"] * per_loss) * (1 + overhead)
            projections.append({
                "ratio_reference_over_cache_at_sample_chat_lengths": b0["samples"] * LLAMA_8B["tokens"] * ref8 / chats,
                "target_format": fmt, "aux_dtype": aux, "bytes_per_token": bpt, "bytes_per_sample": bpt * LLAMA_8B["tokens"],
                "reference_bytes_per_token": ref8, "reference_bytes_per_sample": ref8 * LLAMA_8B["tokens"],
                "ratio_reference_over_cache": ref8 / bpt,
                "fixed_bytes_per_cache": LLAMA_8B["draft_vocab"] * LLAMA_8B["hidden_size"] * 4 if fmt == "hidden" else 0,
            })

    lines = []
    lines.append(f"| format | aux | embedded, Vd {'/'.join(str(v) for v in draft_vocabs)}: B/token | B/sample | reference / cache | "
                 f"Llama-3.1-8B: B/token | MB/sample | reference / cache | same, at the chats' lengths |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for p in projections:
        mine = [b for b in builds if b["target_format"] == p["target_format"] and b["aux_dtype"] == p["aux_dtype"]]
        lines.append(
            f"| {p['target_format']}{f' (K={TOPK})' if p['target_format'] == 'topk' else ''} | {p['aux_dtype']} | "
            + " / ".join(f"{b['bytes_per_token']:,.0f}" for b in mine) + " | "
            + " / ".join(f"{b['bytes_per_sample'] / 1e3:,.0f} kB" for b in mine) + " | "
            + " / ".join(f"{b['ratio_reference_over_cache']:.1f}x" for b in mine) + " | "
            + f"{p['bytes_per_token']:,.0f} | {p['bytes_per_sample'] / 1e6:,.1f} | {p['ratio_reference_over_cache']:.1f}x | "
            + f"{p['ratio_reference_over_cache_at_sample_chat_lengths']:.1f}x |"
        )
    refs = [next(b for b in builds if b["draft_vocab"] == vd) for vd in draft_vocabs]
    lines.append(
        "| reference (padded dense) | bf16 | " + " / ".join(f"{b['reference_bytes_per_token']:,.0f}" for b in refs) + " | "
        + " / ".join(f"{b['reference_bytes_per_sample'] / 1e3:,.0f} kB" for b in refs) + " | 1x | "
        + f"{ref8:,} | {ref8 * LLAMA_8B['tokens'] / 1e6:,.1f} | 1x | 1x |"
    )
    print()
    print("\n".join(lines))
    print()
    print(f"- embedded default: {b0['samples']} samples, {b0['tokens']:,} tokens (mean {b0['tokens'] / b0['samples']:.0f} per sample, "
          f"seq length {SEQ_LENGTH}), {b0['loss_tokens']:,} loss-masked ({loss_share:.1%}); H=64, aux width 192. "
          "Bytes are the Parquet shards; reference / cache includes the reference's padding.")
    print(f"- Parquet overhead over the raw tensor bytes: at most {overhead:.3%} across the {len(builds)} builds "
          f"(min {min(b['parquet_overhead'] for b in builds):.3%}).")
    heads = [b for b in builds if b["head_rows_bytes"]]
    if heads:
        print("- hidden caches also store the head's draft rows once (fp32): "
              + ", ".join(f"Vd {b['draft_vocab']}: {b['head_rows_bytes']:,} B" for b in heads if b["aux_dtype"] == "bf16")
              + f"; for Llama-3.1-8B at Vd 32000 that is {LLAMA_8B['draft_vocab'] * LLAMA_8B['hidden_size'] * 4 / 1e6:,.0f} MB "
              "per cache, not per sample (--store-full-head: all 128,256 rows, 2.1 GB).")
    print(f"- Llama-3.1-8B columns: arithmetic on the builder's Layout, H=4096, 3 aux layers, Vd 32000, 2,048-token samples, "
          f"loss share {loss_share:.1%} (measured above); reference = 2,048 x (24 + 24,576 + 64,000 + 1) B = "
          f"{ref8 * LLAMA_8B['tokens'] / 1e6:,.1f} MB per sample. Last column: the same 8B target on the sample chats' "
          f"own lengths (mean {b0['tokens'] / b0['samples']:.0f} tokens), where the reference also pads every sample to 2,048.")
    print(f"  {machine_line()}")
    data = {"seq_length": SEQ_LENGTH, "topk": TOPK, "builds": builds, "llama_8b": LLAMA_8B | {"loss_share": loss_share},
            "projections": projections, "markdown_table": "\n".join(lines),
            "ratios": {f"{p['target_format']}_{p['aux_dtype']}_8b_reference_over_cache": p["ratio_reference_over_cache"] for p in projections}}
    if args.results:
        path = Path(args.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"benchmark": NAME, "machine": _common.machine(), **data}, indent=2) + "\n")
    else:
        path = write_results(NAME, data)
    print(f"  wrote {path}")
    return data


if __name__ == "__main__":
    main()
