"""Bytes per token and per sample of every target format and aux dtype, with the default
lossless compression (byte planes + zstd), measured on real builds, per column, and
extrapolated to Llama-3.1-8B, next to NeMo Automodel's padded dense layout.

Measured:
- the embedded default (tiny-llama: H=64, 3 aux layers; the 300 sample chats) at seq length
  2048, dtype bf16, for target formats `probs`, `topk` (K=64) and `hidden`, each with aux
  dtype bf16 and fp8 (e4m3 + one fp32 scale per token), at draft vocab 256 and 1024 (the
  tiny target's whole vocabulary): 12 builds;
- a bigger random-weight target whose activations are not trivial: the 92.3M-parameter
  random Llama of build_overhead.py (hidden 1024, 8 layers, aux width 3,072), on the first
  32 sample chats at seq 512, Vd 1024, the same 6 format x aux combinations.
Cache bytes are the Parquet shards (manifest totals). Per column: the bytes the values take
in the shards against the bytes of the tensors they decode to (the compression ratio), and
the MB/s one thread encodes (`shards.encode_value`, the writer's call). A `hidden` cache also
stores the head's draft rows once (vocab/lm_head.safetensors, listed apart).

Extrapolated (arithmetic, no build): Llama-3.1-8B, H=4096, 3 aux layers, Vd=32000, a sample of
2,048 tokens, with the loss-masked share of tokens measured on the sample chats. Raw bytes per
token come from the builder's `Layout`; compressed bytes divide each column by the ratio
measured on the bigger random target for the same column, format and aux dtype (a real
target's activations and distributions will differ; probs were measured at Vd 1024).

Reference: NeMo Automodel 0.7.0 `precompute_eagle3`'s layout (safetensors shards), every
sample padded to seq_length: int64 input_ids / attention_mask / loss_mask, `[S, 3H]` aux and
`[S, Vd]` probs in bf16, a bool position mask: `S * (3*8 + 3H*2 + Vd*2 + 1)` bytes per sample
(`_nemo_layout.py`). That is NeMo's lossless default; our `topk` caches are lossy, so they are
also set against NeMo's own top-k cache (`--target-probs-topk 64`: bf16 values and int32 indices
instead of the probs, padded the same way), `S * (3*8 + 3H*2 + 64*(2+4) + 1)` bytes per sample.

Run: .venv/bin/python benchmarks/format_sizes.py [--draft-vocabs 256,1024] [--no-big] [--results PATH]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common  # noqa: F401  (first: fresh HF_DATASETS_CACHE before datasets loads)
from _columns import BIG_SAMPLES, BIG_SEQ, column_stats, encode_speed, make_big_target
from _common import machine_line, table, temp_dir, write_results
from _nemo_layout import nemo_bytes_per_position

NAME = "format_sizes"
SEQ_LENGTH = 2048
FORMATS = ("probs", "topk", "hidden")
AUX_DTYPES = ("bf16", "fp8")
TOPK = 64
LLAMA_8B = {"hidden_size": 4096, "aux_layers": 3, "draft_vocab": 32000, "tokens": 2048, "target_vocab": 128256}


def layout_of(target_format: str, aux_dtype: str, hidden: int, draft_vocab: int, aux_layers: int = 3):
    from builder.formats import Layout

    return Layout(target_format, "bf16", aux_dtype, min(TOPK, draft_vocab), draft_vocab, aux_layers * hidden, hidden)


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--draft-vocabs", default="256,1024")
    p.add_argument("--no-big", action="store_true", help="skip the bigger random target (its ratios feed the 8B columns)")
    p.add_argument("--results", default=None, help=f"JSON path (default: benchmarks/results/{NAME}.json)")
    return p.parse_args(argv)


def one_build(target: str, label: str, fmt: str, aux: str, vd: int, **settings) -> dict:
    from builder.config import BuildConfig
    from builder.manifest import LM_HEAD_FILE
    from builder.pipeline import build

    out = Path(temp_dir(f"{label}-{fmt}-{aux}-{vd}")) / "cache"
    start = time.perf_counter()
    result = build(
        BuildConfig(
            target_model=target,
            input_data="sample-chats",
            output_dir=str(out),
            draft_vocab_size=vd,
            dtype="bf16",
            target_format=fmt,
            topk=TOPK,
            aux_dtype=aux,
            **settings,
        ),
        progress=False,
    )
    seconds = time.perf_counter() - start
    prep, m = result.prepared, result.manifest
    totals = m["totals"]
    n, tokens, loss = totals["samples"], totals["tokens"], totals["loss_tokens"]
    seq = prep.cfg.seq_length
    aux_width = len(prep.aux_layer_ids) * prep.hidden_size
    columns = column_stats(out)
    raw = sum(c["raw"] for c in columns.values())
    reference = n * seq * nemo_bytes_per_position(aux_width, vd)
    head = out / LM_HEAD_FILE
    row = {
        "target": label,
        "target_format": fmt,
        "aux_dtype": aux,
        "draft_vocab": vd,
        "seq_length": seq,
        "samples": n,
        "tokens": tokens,
        "loss_tokens": loss,
        "hidden_size": prep.hidden_size,
        "aux_width": aux_width,
        "shard_bytes": totals["bytes"],
        "tensor_bytes": raw,
        "compression_ratio": raw / totals["bytes"],
        "head_rows_bytes": head.stat().st_size if head.exists() else 0,
        "cache_dir_bytes": directory_bytes(out),
        "bytes_per_token": totals["bytes"] / tokens,
        "bytes_per_sample": totals["bytes"] / n,
        "reference_bytes": reference,
        "reference_bytes_per_token": reference / tokens,
        "reference_bytes_per_sample": reference / n,
        "ratio_reference_over_cache": reference / totals["bytes"],
        "ratio_reference_over_uncompressed": reference / raw,
        "columns": columns,
        "quality": m.get("quality", {}),
        "build_s": seconds,
    }
    if fmt == "topk":  # lossy: also against NeMo's own lossy top-k cache of the same samples
        nemo_topk = n * seq * nemo_bytes_per_position(aux_width, vd, topk=TOPK)
        row |= {
            "nemo_topk_reference_bytes": nemo_topk,
            "nemo_topk_reference_bytes_per_token": nemo_topk / tokens,
            "ratio_nemo_topk_reference_over_cache": nemo_topk / totals["bytes"],
        }
    if label == "big":
        row["encode_mb_per_s"] = encode_speed(out)
    print(
        f"  built {label:5s} {fmt:6s} aux {aux:4s} Vd {vd:5d}: {totals['bytes']:,} shard bytes, {raw:,} tensor bytes "
        f"({row['compression_ratio']:.2f}x) in {seconds:.1f} s",
        flush=True,
    )
    return row


def main(argv=None) -> dict:
    args = parse_args(argv)
    _common.quiet_libraries()
    from builder.formats import TORCH_DTYPES

    draft_vocabs = [int(x) for x in args.draft_vocabs.split(",")]
    print(
        f"{NAME}: embedded default (tiny-llama, sample-chats), seq {SEQ_LENGTH}, bf16, zstd; formats {FORMATS} x aux {AUX_DTYPES} "
        f"x draft vocab {draft_vocabs}"
        + ("" if args.no_big else f"; and a random Llama (hidden 1024), {BIG_SAMPLES} chats, seq {BIG_SEQ}"),
        flush=True,
    )
    builds = [
        one_build("tiny-llama", "tiny", fmt, aux, vd, seq_length=SEQ_LENGTH) for vd in draft_vocabs for fmt in FORMATS for aux in AUX_DTYPES
    ]
    big = []
    if not args.no_big:
        target = make_big_target(Path(temp_dir("big-target")) / "model")
        big = [
            one_build(str(target), "big", fmt, aux, 1024, seq_length=BIG_SEQ, max_samples=BIG_SAMPLES)
            for fmt in FORMATS
            for aux in AUX_DTYPES
        ]

    b0 = builds[0]
    loss_share = b0["loss_tokens"] / b0["tokens"]
    ref8 = nemo_bytes_per_position(3 * LLAMA_8B["hidden_size"], LLAMA_8B["draft_vocab"])  # per position; samples are full
    ref8_topk = nemo_bytes_per_position(3 * LLAMA_8B["hidden_size"], LLAMA_8B["draft_vocab"], topk=TOPK)
    projections = []
    for fmt in FORMATS:
        for aux in AUX_DTYPES:
            layout = layout_of(fmt, aux, LLAMA_8B["hidden_size"], LLAMA_8B["draft_vocab"], LLAMA_8B["aux_layers"])
            measured = next((b["columns"] for b in big if b["target_format"] == fmt and b["aux_dtype"] == aux), {})
            raw_bpt = stored_bpt = chats_raw = chats_stored = 0.0
            for name, spec in layout.columns().items():
                width = spec["shape"][1] if len(spec["shape"]) == 2 else 1
                per_position = width * TORCH_DTYPES[spec["dtype"]].itemsize
                share = 1.0 if spec["per"] == "token" else loss_share
                ratio = measured.get(name, {}).get("ratio", 1.0)
                raw_bpt += per_position * share
                stored_bpt += per_position * share / ratio
                count = b0["tokens"] if spec["per"] == "token" else b0["loss_tokens"]
                chats_raw += count * per_position
                chats_stored += count * per_position / ratio
            projections.append(
                {
                    "target_format": fmt,
                    "aux_dtype": aux,
                    "raw_bytes_per_token": raw_bpt,
                    "bytes_per_token": stored_bpt,
                    "compression_ratio": raw_bpt / stored_bpt,
                    "bytes_per_sample": stored_bpt * LLAMA_8B["tokens"],
                    "reference_bytes_per_token": ref8,
                    "reference_bytes_per_sample": ref8 * LLAMA_8B["tokens"],
                    "ratio_reference_over_cache": ref8 / stored_bpt,
                    "ratio_reference_over_uncompressed": ref8 / raw_bpt,
                    # the same target on the sample chats' own lengths (mean 239 tokens): the reference pads to 2,048
                    "ratio_reference_over_cache_at_sample_chat_lengths": b0["samples"] * LLAMA_8B["tokens"] * ref8 / chats_stored,
                    "fixed_bytes_per_cache": LLAMA_8B["draft_vocab"] * LLAMA_8B["hidden_size"] * 4 if fmt == "hidden" else 0,
                }
            )
            if fmt == "topk":
                projections[-1] |= {
                    "nemo_topk_reference_bytes_per_token": ref8_topk,
                    "ratio_nemo_topk_reference_over_cache": ref8_topk / stored_bpt,
                    "ratio_nemo_topk_reference_over_cache_at_sample_chat_lengths": b0["samples"]
                    * LLAMA_8B["tokens"]
                    * ref8_topk
                    / chats_stored,
                }

    lines = [
        f"| format | aux | embedded, Vd {'/'.join(str(v) for v in draft_vocabs)}: B/token | B/sample | NeMo / cache | "
        + ("random Llama H 1024: B/token | NeMo / cache | " if big else "")
        + "Llama-3.1-8B: B/token | MB/sample | NeMo / cache | same, at the chats' lengths |",
        "|---|---|---|---|---|" + ("---|---|" if big else "") + "---|---|---|---|",
    ]
    for p in projections:
        fmt, aux = p["target_format"], p["aux_dtype"]
        mine = [b for b in builds if b["target_format"] == fmt and b["aux_dtype"] == aux]
        theirs = next((b for b in big if b["target_format"] == fmt and b["aux_dtype"] == aux), None)
        lines.append(
            f"| {fmt}{f' (K={TOPK})' if fmt == 'topk' else ''} | {aux} | "
            + " / ".join(f"{b['bytes_per_token']:,.0f}" for b in mine)
            + " | "
            + " / ".join(f"{b['bytes_per_sample'] / 1e3:,.0f} kB" for b in mine)
            + " | "
            + " / ".join(f"{b['ratio_reference_over_cache']:.1f}x" for b in mine)
            + " | "
            + (f"{theirs['bytes_per_token']:,.0f} | {theirs['ratio_reference_over_cache']:.2f}x | " if theirs else "")
            + f"{p['bytes_per_token']:,.0f} (raw {p['raw_bytes_per_token']:,.0f}) | {p['bytes_per_sample'] / 1e6:,.1f} | "
            + f"{p['ratio_reference_over_cache']:.2f}x | {p['ratio_reference_over_cache_at_sample_chat_lengths']:.1f}x |"
        )
    print()
    print("\n".join(lines))
    print()
    print(
        table(
            ["topk (K=64) against NeMo --target-probs-topk 64", "aux", "B/token", "NeMo top-k B/token", "NeMo top-k / cache"],
            [
                [b["target"] + f", Vd {b['draft_vocab']}", b["aux_dtype"], b["bytes_per_token"], b["nemo_topk_reference_bytes_per_token"]]
                + [b["ratio_nemo_topk_reference_over_cache"]]
                for b in builds + big
                if b["target_format"] == "topk"
            ]
            + [
                ["Llama-3.1-8B, 2,048-token samples", p["aux_dtype"], p["bytes_per_token"], p["nemo_topk_reference_bytes_per_token"]]
                + [p["ratio_nemo_topk_reference_over_cache"]]
                for p in projections
                if p["target_format"] == "topk"
            ],
            title="Our lossy topk caches against NeMo's own lossy top-k cache of the same samples (bf16 values + int32 indices, "
            "padded like its default); the table above sets every format against NeMo's lossless default:",
        )
    )
    print()
    kinds = sorted({(name, c["dtype"]) for b in builds + big for name, c in b["columns"].items() if c["encoding"] != "raw"})
    rows = []
    for name, dtype in kinds:

        def ratios(group, vd=None, name=name, dtype=dtype):
            found = [
                b["columns"][name]["ratio"]
                for b in group
                if name in b["columns"] and b["columns"][name]["dtype"] == dtype and (vd is None or b["draft_vocab"] == vd)
            ]
            return (
                f"{min(found):.2f}-{max(found):.2f}"
                if len(found) > 1 and max(found) - min(found) > 0.005
                else (f"{found[0]:.2f}" if found else "-")
            )

        speeds = [b["encode_mb_per_s"][name] for b in big if name in b.get("encode_mb_per_s", {}) and b["columns"][name]["dtype"] == dtype]
        rows.append(
            [name, dtype, ratios(builds, draft_vocabs[-1]), ratios(big), f"{min(speeds):,.0f}-{max(speeds):,.0f}" if speeds else "-"]
        )
    print(
        table(
            [
                "column",
                "dtype",
                f"embedded (Vd {draft_vocabs[-1]}) raw/stored",
                "random Llama H 1024 raw/stored",
                "encode MB/s per thread (random Llama)",
            ],
            rows,
            title="Compression per column (zstd default; ranges over the formats that store the column):",
        )
    )
    print()
    print(
        f"- embedded default: {b0['samples']} samples, {b0['tokens']:,} tokens (mean {b0['tokens'] / b0['samples']:.0f} per sample, "
        f"seq length {SEQ_LENGTH}), {b0['loss_tokens']:,} loss-masked ({loss_share:.1%}); H=64, aux width 192. "
        "Bytes are the Parquet shards; NeMo / cache includes NeMo's padding to the sequence length."
    )
    for group in (builds, big):
        if group:
            print(
                f"- {group[0]['target']}: whole-cache compression {min(b['compression_ratio'] for b in group):.2f}x to "
                f"{max(b['compression_ratio'] for b in group):.2f}x (tensor bytes / shard bytes)"
            )
    heads = [b for b in builds if b["head_rows_bytes"]]
    if heads:
        print(
            "- hidden caches also store the head's draft rows once (fp32): "
            + ", ".join(f"Vd {b['draft_vocab']}: {b['head_rows_bytes']:,} B" for b in heads if b["aux_dtype"] == "bf16")
            + f"; for Llama-3.1-8B at Vd 32000 that is {LLAMA_8B['draft_vocab'] * LLAMA_8B['hidden_size'] * 4 / 1e6:,.0f} MB "
            "per cache, not per sample (--store-full-head: all 128,256 rows, 2.1 GB)."
        )
    print(
        f"- Llama-3.1-8B columns: the builder's Layout (H=4096, 3 aux layers, Vd 32000, 2,048-token samples, loss share "
        f"{loss_share:.1%}), each column divided by its ratio measured on the random Llama (H 1024); NeMo = 2,048 x "
        f"(24 + 24,576 + 64,000 + 1) B = {ref8 * LLAMA_8B['tokens'] / 1e6:,.1f} MB per sample. Last column: the same 8B target "
        f"on the sample chats' own lengths (mean {b0['tokens'] / b0['samples']:.0f} tokens), which NeMo pads to 2,048."
    )
    print(f"  {machine_line()}")
    data = {
        "seq_length": SEQ_LENGTH,
        "topk": TOPK,
        "builds": builds,
        "big_builds": big,
        "llama_8b": LLAMA_8B | {"loss_share": loss_share},
        "projections": projections,
        "markdown_table": "\n".join(lines),
        "ratios": {f"{p['target_format']}_{p['aux_dtype']}_8b_reference_over_cache": p["ratio_reference_over_cache"] for p in projections}
        | {f"{b['target_format']}_{b['aux_dtype']}_big_reference_over_cache": b["ratio_reference_over_cache"] for b in big}
        | {
            f"topk_{p['aux_dtype']}_8b_nemo_topk_reference_over_cache": p["ratio_nemo_topk_reference_over_cache"]
            for p in projections
            if "ratio_nemo_topk_reference_over_cache" in p
        }
        | {
            f"topk_{b['aux_dtype']}_big_nemo_topk_reference_over_cache": b["ratio_nemo_topk_reference_over_cache"]
            for b in big
            if b["target_format"] == "topk"
        },
    }
    path = write_results(NAME, data, args.results)
    print(f"  wrote {path}")
    return data


if __name__ == "__main__":
    main()
