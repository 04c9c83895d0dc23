"""Cache size against NeMo Automodel's cache of the same samples.

NeMo Automodel 0.7.0's `precompute_eagle3` writes safetensors shards in which every sample is
padded to seq_length: int64 input_ids / attention_mask / loss_mask, `[S, 3H]` aux and `[S, Vd]`
probs in bf16 at every position, a bool position mask, i.e. `S * (3*8 + 3H*2 + Vd*2 + 1)` bytes
per sample (its lossless default; the safetensors headers add a few hundred bytes per shard).
That figure comes from `_nemo_layout.py` (NeMo's fields, checked against the shards NeMo's own
code writes in tests/test_benchmarks.py), independently of `builder.plan.estimate_sizes` (and
checked against it with compression off).

Our `topk` builds are lossy, NeMo's default is not: they are also set against NeMo's own top-k
cache of the same samples (`--target-probs-topk K`, the same K: bf16 values and int32 indices
instead of the probs, padded the same way), `S * (3*8 + 3H*2 + K*(2+4) + 1)` bytes per sample.

Measured, each built with `--compression zstd` (the default: byte planes + zstd, lossless)
and with `--compression none`, in bf16:
- the embedded default (tiny-llama target, the 300 sample chats) at seq_length 2048, draft
  vocab 256 and 1024 (= the tiny target's whole vocabulary);
- a bigger random-weight target whose activations are not trivial: the 92.3M-parameter random
  Llama of build_overhead.py (hidden 1024, 8 layers, vocab 1024), the first 32 sample chats
  at seq 512, in `probs` (lossless) and in `topk` (K=64) with fp8 aux.
The cache's size is the Parquet shards (manifest totals). The ratio splits into NeMo's padding
(seq_length over the real length) and the rest (dense probs at unsupervised positions, int64
ids and masks, and the compression).

Then projections (no build: arithmetic on the same length distribution) with
`builder.plan.estimate_sizes` for an 8B-like target: H=4096, 3 aux layers, Vd 32000 and 8192,
seq 2048, bf16, uncompressed and with the zstd ratios measured by format_sizes.py.

Run: .venv/bin/python benchmarks/cache_size.py [--no-big]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common  # noqa: F401  (first: fresh HF_DATASETS_CACHE before datasets loads)
import numpy as np
from _columns import BIG_SAMPLES, BIG_SEQ, column_stats, make_big_target
from _common import machine_line, table, temp_dir, write_results
from _nemo_layout import nemo_bytes_per_position

NAME = "cache_size"
SEQ_LENGTH = 2048
DTYPE = "bf16"
DRAFT_VOCABS = (256, 1024)
COMPRESSIONS = ("zstd", "none")
PROJECTION = {"hidden_size": 4096, "aux_layers": 3, "draft_vocabs": (32000, 8192), "seq_length": 2048, "dtype": "bf16"}


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(label: str, target: str, compression: str, **settings) -> dict:
    from builder.config import BuildConfig
    from builder.pipeline import build
    from builder.plan import estimate_sizes

    out = Path(temp_dir(f"{label}-{compression}")) / "cache"
    start = time.perf_counter()
    result = build(
        BuildConfig(target_model=target, input_data="sample-chats", output_dir=str(out), dtype=DTYPE, compression=compression, **settings),
        progress=False,
    )
    build_s = time.perf_counter() - start
    prep, totals = result.prepared, result.manifest["totals"]
    seq = prep.cfg.seq_length
    num_tokens = np.asarray(prep.samples["num_tokens"], dtype=np.int64)
    num_loss = np.asarray(prep.samples["num_loss_tokens"], dtype=np.int64)
    aux_width = len(prep.aux_layer_ids) * prep.hidden_size
    vd = len(prep.selected_token_ids)
    n, tokens = totals["samples"], totals["tokens"]
    assert n == len(num_tokens) and tokens == int(num_tokens.sum())
    per_position = nemo_bytes_per_position(aux_width, vd, DTYPE)
    reference, reference_unpadded = n * seq * per_position, tokens * per_position
    estimate = estimate_sizes(
        num_tokens, num_loss, aux_width=aux_width, hidden_size=prep.hidden_size, draft_vocab=vd, dtype=DTYPE, seq_length=seq
    )
    assert estimate["reference_padded_dense"] == reference, (estimate, reference)
    columns = column_stats(out)
    row = {
        "case": label,
        "compression": compression,
        "target_format": prep.cfg.target_format,
        "aux_dtype": prep.cfg.storage_aux_dtype,
        "draft_vocab": vd,
        "seq_length": seq,
        "samples": n,
        "tokens": tokens,
        "loss_tokens": totals["loss_tokens"],
        "aux_width": aux_width,
        "shards_bytes": totals["bytes"],
        "cache_dir_bytes": directory_bytes(out),
        "tensor_bytes": sum(c["raw"] for c in columns.values()),
        "bytes_per_token": totals["bytes"] / tokens,
        "reference_bytes": reference,
        "reference_bytes_per_token": reference / tokens,
        "ratio_reference_over_cache": reference / totals["bytes"],
        "ratio_reference_over_cache_dir": reference / directory_bytes(out),
        "padding_factor": reference / reference_unpadded,
        "ratio_unpadded_reference_over_cache": reference_unpadded / totals["bytes"],
        "columns": columns,
        "build_s": build_s,
    }
    row["compression_ratio"] = row["tensor_bytes"] / totals["bytes"]
    if prep.cfg.target_format == "topk":  # lossy: also against NeMo's own lossy top-k cache
        nemo_topk = n * seq * nemo_bytes_per_position(aux_width, vd, DTYPE, topk=prep.cfg.topk)
        row |= {
            "nemo_topk": prep.cfg.topk,
            "nemo_topk_reference_bytes": nemo_topk,
            "nemo_topk_reference_bytes_per_token": nemo_topk / tokens,
            "ratio_nemo_topk_reference_over_cache": nemo_topk / totals["bytes"],
        }
    print(
        f"  built {label} ({compression}): {totals['bytes']:,} bytes in {len(result.manifest['shards'])} shard(s), {build_s:.1f} s",
        flush=True,
    )
    return row, (num_tokens, num_loss)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-big", action="store_true", help="skip the bigger random target")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    _common.quiet_libraries()
    from builder.plan import TOPK_DEFAULT, estimate_sizes

    print(
        f"{NAME}: embedded default (tiny-llama, sample-chats), seq_length {SEQ_LENGTH}, {DTYPE}"
        + ("" if args.no_big else f"; random Llama (hidden 1024), first {BIG_SAMPLES} chats, seq {BIG_SEQ}"),
        flush=True,
    )
    builds, lengths = [], None
    for draft_vocab in DRAFT_VOCABS:
        for compression in COMPRESSIONS:
            row, lengths = measure(f"tiny Vd {draft_vocab}", "tiny-llama", compression, seq_length=SEQ_LENGTH, draft_vocab_size=draft_vocab)
            builds.append(row)
    big = []
    if not args.no_big:
        target = str(make_big_target(Path(temp_dir("big-target")) / "model"))
        for fmt, aux in (("probs", "bf16"), ("topk", "fp8")):
            for compression in COMPRESSIONS:
                big.append(
                    measure(
                        f"random Llama H 1024, {fmt} {aux}",
                        target,
                        compression,
                        seq_length=BIG_SEQ,
                        max_samples=BIG_SAMPLES,
                        target_format=fmt,
                        aux_dtype=aux,
                    )[0]
                )

    num_tokens, num_loss = lengths
    projections = []
    for draft_vocab in PROJECTION["draft_vocabs"]:
        aux_width = PROJECTION["aux_layers"] * PROJECTION["hidden_size"]
        sizes = {
            c: estimate_sizes(
                num_tokens,
                num_loss,
                aux_width=aux_width,
                hidden_size=PROJECTION["hidden_size"],
                draft_vocab=draft_vocab,
                dtype=PROJECTION["dtype"],
                seq_length=PROJECTION["seq_length"],
                compression=c,
            )
            for c in COMPRESSIONS
        }
        tokens = int(num_tokens.sum())
        ref = sizes["none"]["reference_padded_dense"]
        positions = len(num_tokens) * PROJECTION["seq_length"]
        ref_topk = positions * nemo_bytes_per_position(aux_width, draft_vocab, PROJECTION["dtype"], topk=TOPK_DEFAULT)
        projections.append(
            {
                "draft_vocab": draft_vocab,
                "hidden_size": PROJECTION["hidden_size"],
                "aux_width": aux_width,
                "seq_length": PROJECTION["seq_length"],
                "bytes_per_token": {k: v / tokens for k, v in sizes["none"].items()},
                "zstd_bytes_per_token": {k: v / tokens for k, v in sizes["zstd"].items()},
                "reference_bytes_per_sample": ref / len(num_tokens),
                "ratio_reference_over": {k: ref / sizes["none"][k] for k in ("probs", "topk", "hidden")},
                "ratio_reference_over_zstd": {k: ref / sizes["zstd"][k] for k in ("probs", "topk", "hidden")},
                "nemo_topk_reference_bytes_per_sample": ref_topk / len(num_tokens),
                "ratio_nemo_topk_reference_over_topk": {c: ref_topk / sizes[c]["topk"] for c in COMPRESSIONS},
            }
        )

    print()
    print(
        table(
            ["case", "compression", "cache B/token", "NeMo B/token", "NeMo / cache", "padding factor", "rest", "tensor/shard bytes"],
            [
                [
                    b["case"],
                    b["compression"],
                    b["bytes_per_token"],
                    b["reference_bytes_per_token"],
                    b["ratio_reference_over_cache"],
                    b["padding_factor"],
                    b["ratio_unpadded_reference_over_cache"],
                    b["compression_ratio"],
                ]
                for b in builds + big
            ],
            title="Measured: real caches vs NeMo Automodel 0.7.0's cache of the same samples (one run, one machine):",
        )
    )
    b0 = builds[0]
    print(
        f"  embedded: {b0['samples']} samples, {b0['tokens']:,} tokens "
        f"({b0['tokens'] / b0['samples']:.0f} per sample on average against seq_length {SEQ_LENGTH}), "
        f"{b0['loss_tokens']:,} loss-masked ({b0['loss_tokens'] / b0['tokens']:.0%}); aux width {b0['aux_width']} (3 x H=64)"
    )
    if big:
        g = big[0]
        print(
            f"  random Llama: {g['samples']} samples, {g['tokens']:,} tokens "
            f"({g['tokens'] / g['samples']:.0f} per sample against seq {BIG_SEQ}), "
            f"{g['loss_tokens']:,} loss-masked; aux width {g['aux_width']}"
        )
    print("  cache = the Parquet shards (manifest totals); padding factor x rest = NeMo/cache; tensor/shard bytes = what compression saves")
    topk_rows = [b for b in builds + big if "nemo_topk" in b]
    if topk_rows:
        print(
            table(
                ["case", "compression", "cache B/token", "NeMo top-k B/token", "NeMo top-k / cache"],
                [
                    [
                        b["case"],
                        b["compression"],
                        b["bytes_per_token"],
                        b["nemo_topk_reference_bytes_per_token"],
                        b["ratio_nemo_topk_reference_over_cache"],
                    ]
                    for b in topk_rows
                ],
                title=f"Our lossy top-k builds against NeMo's own lossy cache of the same samples, --target-probs-topk "
                f"{topk_rows[0]['nemo_topk']} (bf16 values + int32 indices, padded like its default):",
            )
        )
    print()
    print(
        table(
            ["column", "dtype"] + [b["case"] for b in builds + big if b["compression"] == "zstd"],
            [
                [name, dtype]
                + [
                    f"{b['columns'][name]['ratio']:.2f}" if b["columns"].get(name, {}).get("dtype") == dtype else "-"
                    for b in builds + big
                    if b["compression"] == "zstd"
                ]
                for name, dtype in sorted({(n, c["dtype"]) for b in builds + big for n, c in b["columns"].items()})
            ],
            title="Compression per column (tensor bytes / stored bytes, zstd builds):",
        )
    )
    print()
    print(
        table(
            ["Vd", "probs B/token", "topk B/token", "hidden B/token", "NeMo B/token", "NeMo/probs", "NeMo/topk", "NeMo/hidden"],
            [
                [
                    p["draft_vocab"],
                    f"{p['bytes_per_token']['probs']:,.0f} / {p['zstd_bytes_per_token']['probs']:,.0f}",
                    f"{p['bytes_per_token']['topk']:,.0f} / {p['zstd_bytes_per_token']['topk']:,.0f}",
                    f"{p['bytes_per_token']['hidden']:,.0f} / {p['zstd_bytes_per_token']['hidden']:,.0f}",
                    p["bytes_per_token"]["reference_padded_dense"],
                    *[
                        f"{p['ratio_reference_over'][k]:.1f}x / {p['ratio_reference_over_zstd'][k]:.1f}x"
                        for k in ("probs", "topk", "hidden")
                    ],
                ]
                for p in projections
            ],
            title=f"PROJECTIONS (builder.plan.estimate_sizes, not built; uncompressed / zstd at plan.ZSTD_RATIOS): 8B-like target, "
            f"H={PROJECTION['hidden_size']}, {PROJECTION['aux_layers']} aux layers, seq {PROJECTION['seq_length']}, {PROJECTION['dtype']}, "
            "the sample chats' length distribution:",
        )
    )
    for p in projections:
        print(
            f"  Vd={p['draft_vocab']}: NeMo {p['reference_bytes_per_sample'] / 1e6:,.1f} MB per sample; its own lossy "
            f"--target-probs-topk {TOPK_DEFAULT} cache {p['nemo_topk_reference_bytes_per_sample'] / 1e6:,.1f} MB, "
            f"{p['ratio_nemo_topk_reference_over_topk']['none']:.1f}x / {p['ratio_nemo_topk_reference_over_topk']['zstd']:.1f}x our topk"
        )
    print(f"  {machine_line()}")
    data = {
        "seq_length": SEQ_LENGTH,
        "dtype": DTYPE,
        "builds": builds,
        "big_builds": big,
        "projections": projections,
        "length_distribution": {
            "samples": int(len(num_tokens)),
            "tokens": int(num_tokens.sum()),
            "loss_tokens": int(num_loss.sum()),
            "p50_p90_p99_max": [*np.percentile(num_tokens, [50, 90, 99]).astype(int).tolist(), int(num_tokens.max())],
        },
        "ratios": {f"{b['case']} {b['compression']}": b["ratio_reference_over_cache"] for b in builds + big}
        | {
            f"{b['case']} {b['compression']} vs NeMo --target-probs-topk {b['nemo_topk']}": b["ratio_nemo_topk_reference_over_cache"]
            for b in builds + big
            if "nemo_topk" in b
        },
    }
    path = write_results(NAME, data)
    print(f"  wrote {path.relative_to(_common.ROOT)}")
    return data


if __name__ == "__main__":
    main()
