"""Cache size against the reference's padded dense layout (issue 3: "Size").

Builds the embedded default (tiny-llama target, the 300 sample chats) at seq_length 2048,
dtype bf16, with draft vocab 256 and 1024 (= the tiny target's whole vocabulary), and
compares the real cache's bytes per token (manifest totals: the Parquet shards) with what
NeMo Automodel's `precompute_eagle3` layout takes for the same samples: every sample padded
to seq_length, int64 input_ids / attention_mask / loss_mask, `[S, 3H]` aux and `[S, Vd]`
probs in bf16 at every position, a bool position mask. The reference figure is computed
here from that description, independently of `builder.plan.estimate_sizes` (and checked
against it).

Then projections (no build: arithmetic on the same length distribution) with
`builder.plan.estimate_sizes` for an 8B-like target: H=4096, 3 aux layers, Vd 32000 and
8192, seq 2048, bf16.

Note: the sample chats are short (mean ~240 tokens against seq_length 2048), so most of the
reference's size is padding; the table splits the ratio into padding and the rest.

Run: .venv/bin/python benchmarks/cache_size.py
"""

from __future__ import annotations

import _common  # noqa: F401  (first: fresh HF_DATASETS_CACHE before datasets loads)

import time
from pathlib import Path

import numpy as np

from _common import machine_line, table, temp_dir, write_results

NAME = "cache_size"
SEQ_LENGTH = 2048
DTYPE = "bf16"
DRAFT_VOCABS = (256, 1024)
PROJECTION = {"hidden_size": 4096, "aux_layers": 3, "draft_vocabs": (32000, 8192), "seq_length": 2048, "dtype": "bf16"}
FLOAT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def reference_bytes_per_position(aux_width: int, draft_vocab: int, dtype: str) -> int:
    """NeMo Automodel precompute_eagle3, one (padded) position: 3 int64 (ids, attention, loss),
    aux `[3H]` and probs `[Vd]` in the float dtype, one bool position-mask byte."""
    return 3 * 8 + aux_width * FLOAT_BYTES[dtype] + draft_vocab * FLOAT_BYTES[dtype] + 1


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> dict:
    _common.quiet_libraries()
    from builder.build import build
    from builder.config import BuildConfig
    from builder.plan import estimate_sizes

    print(f"{NAME}: embedded default (tiny-llama, sample-chats), seq_length {SEQ_LENGTH}, dtype {DTYPE}", flush=True)
    builds = []
    lengths = None
    for draft_vocab in DRAFT_VOCABS:
        out = Path(temp_dir(f"vd{draft_vocab}")) / "cache"
        start = time.perf_counter()
        result = build(BuildConfig(target_model="tiny-llama", input_data="sample-chats", output_dir=str(out),
                                   seq_length=SEQ_LENGTH, draft_vocab_size=draft_vocab, dtype=DTYPE), progress=False)
        build_s = time.perf_counter() - start
        prep, totals = result.prepared, result.manifest["totals"]
        num_tokens = np.asarray(prep.samples["num_tokens"], dtype=np.int64)
        num_loss = np.asarray(prep.samples["num_loss_tokens"], dtype=np.int64)
        lengths = (num_tokens, num_loss)
        aux_width = len(prep.aux_layer_ids) * prep.hidden_size
        vd = len(prep.selected_token_ids)
        n, tokens = totals["samples"], totals["tokens"]
        assert n == len(num_tokens) and tokens == int(num_tokens.sum())
        per_position = reference_bytes_per_position(aux_width, vd, DTYPE)
        reference = n * SEQ_LENGTH * per_position
        reference_unpadded = tokens * per_position  # the same layout without the padding
        estimate = estimate_sizes(num_tokens, num_loss, aux_width=aux_width, hidden_size=prep.hidden_size,
                                  draft_vocab=vd, dtype=DTYPE, seq_length=SEQ_LENGTH)
        assert estimate["reference_padded_dense"] == reference, (estimate, reference)
        row = {
            "draft_vocab": vd,
            "samples": n,
            "tokens": tokens,
            "loss_tokens": totals["loss_tokens"],
            "aux_width": aux_width,
            "shards_bytes": totals["bytes"],
            "cache_dir_bytes": directory_bytes(out),
            "bytes_per_token": totals["bytes"] / tokens,
            "reference_bytes": reference,
            "reference_bytes_per_token": reference / tokens,
            "ratio_reference_over_cache": reference / totals["bytes"],
            "ratio_reference_over_cache_dir": reference / directory_bytes(out),
            "padding_factor": reference / reference_unpadded,
            "ratio_unpadded_reference_over_cache": reference_unpadded / totals["bytes"],
            "estimated_probs_bytes": estimate["probs"],
            "cache_over_estimate": totals["bytes"] / estimate["probs"],
            "parquet_overhead_percent": (totals["bytes"] / estimate["probs"] - 1) * 100,
            "build_s": build_s,
        }
        builds.append(row)
        print(f"  built Vd={vd}: {totals['bytes']:,} bytes in {len(result.manifest['shards'])} shard(s), {build_s:.1f} s", flush=True)

    num_tokens, num_loss = lengths
    projections = []
    for draft_vocab in PROJECTION["draft_vocabs"]:
        aux_width = PROJECTION["aux_layers"] * PROJECTION["hidden_size"]
        sizes = estimate_sizes(num_tokens, num_loss, aux_width=aux_width, hidden_size=PROJECTION["hidden_size"],
                               draft_vocab=draft_vocab, dtype=PROJECTION["dtype"], seq_length=PROJECTION["seq_length"])
        tokens = int(num_tokens.sum())
        ref = sizes["reference_padded_dense"]
        projections.append({
            "draft_vocab": draft_vocab,
            "hidden_size": PROJECTION["hidden_size"],
            "aux_width": aux_width,
            "seq_length": PROJECTION["seq_length"],
            "bytes_per_token": {k: v / tokens for k, v in sizes.items()},
            "reference_bytes_per_sample": ref / len(num_tokens),
            "ratio_reference_over": {k: ref / sizes[k] for k in ("probs", "topk", "hidden")},
        })

    print()
    print(table(
        ["draft vocab", "cache B/token", "reference B/token", "reference/cache", "padding factor", "rest (unpadded ref/cache)", "Parquet overhead %"],
        [[b["draft_vocab"], b["bytes_per_token"], b["reference_bytes_per_token"], b["ratio_reference_over_cache"],
          b["padding_factor"], b["ratio_unpadded_reference_over_cache"], b["parquet_overhead_percent"]] for b in builds],
        title="Measured: real cache vs the reference's padded dense layout, same samples (one run, one machine):",
    ))
    b0 = builds[0]
    print(f"  {b0['samples']} samples, {b0['tokens']:,} tokens ({b0['tokens'] / b0['samples']:.0f} per sample on average against seq_length {SEQ_LENGTH}), "
          f"{b0['loss_tokens']:,} loss-masked ({b0['loss_tokens'] / b0['tokens']:.0%}); aux width {b0['aux_width']} (3 x H=64)")
    print("  cache = the Parquet shards (manifest totals); with vocab/ and the card: "
          + ", ".join(f"Vd={b['draft_vocab']}: {b['ratio_reference_over_cache_dir']:.2f}x" for b in builds))
    print("  padding factor x rest = reference/cache; Parquet overhead = real shard bytes over builder.plan.estimate_sizes()['probs'] (raw tensor bytes)")
    print()
    print(table(
        ["Vd", "probs B/token", "topk B/token", "hidden B/token", "reference B/token", "ref/probs", "ref/topk", "ref/hidden"],
        [[p["draft_vocab"], p["bytes_per_token"]["probs"], p["bytes_per_token"]["topk"], p["bytes_per_token"]["hidden"],
          p["bytes_per_token"]["reference_padded_dense"], p["ratio_reference_over"]["probs"], p["ratio_reference_over"]["topk"],
          p["ratio_reference_over"]["hidden"]] for p in projections],
        title=f"PROJECTIONS (builder.plan.estimate_sizes, not built): 8B-like target, H={PROJECTION['hidden_size']}, "
              f"{PROJECTION['aux_layers']} aux layers, seq {PROJECTION['seq_length']}, {PROJECTION['dtype']}, same length distribution:",
    ))
    for p in projections:
        print(f"  Vd={p['draft_vocab']}: reference {p['reference_bytes_per_sample'] / 1e6:,.1f} MB per sample")
    print()
    print(table(
        ["draft vocab", "shard bytes", "cache dir bytes", "reference bytes", "build seconds"],
        [[b["draft_vocab"], b["shards_bytes"], b["cache_dir_bytes"], b["reference_bytes"], b["build_s"]] for b in builds],
        title="Absolute figures (sizes are exact; build seconds are CPU figures, the first includes the process's cold start):",
    ))
    print(f"  {machine_line()}")
    data = {"seq_length": SEQ_LENGTH, "dtype": DTYPE, "builds": builds, "projections": projections,
            "length_distribution": {"samples": int(len(num_tokens)), "tokens": int(num_tokens.sum()), "loss_tokens": int(num_loss.sum()),
                                    "p50_p90_p99_max": [*np.percentile(num_tokens, [50, 90, 99]).astype(int).tolist(), int(num_tokens.max())]}}
    path = write_results(NAME, data)
    print(f"  wrote {path.relative_to(_common.ROOT)}")
    return data


if __name__ == "__main__":
    main()
