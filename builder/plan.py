"""The dry-run plan and size estimates, from tokenized samples alone (no weights)."""

from __future__ import annotations

import numpy as np

from .vocab import vocab_coverage

FLOAT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
TOPK_DEFAULT = 64


def estimate_sizes(num_tokens: np.ndarray, num_loss: np.ndarray, *, aux_width: int, hidden_size: int,
                   draft_vocab: int, dtype: str, seq_length: int, topk: int = TOPK_DEFAULT) -> dict[str, int]:
    """Bytes per target format of DESIGN §2, and the reference's padded dense layout.

    Reference (NeMo Automodel precompute_eagle3): every sample padded to seq_length with
    int64 input_ids/attention_mask/loss_mask, `[S, 3H]` aux, `[S, Vd]` probs, bool mask.
    """
    b = FLOAT_BYTES[dtype]
    tokens, loss = int(num_tokens.sum()), int(num_loss.sum())
    common = tokens * (4 + 1 + aux_width * b)  # ids int32, mask uint8, aux
    n = len(num_tokens)
    return {
        "probs": common + loss * (draft_vocab * b + 4),
        "topk": common + loss * (topk * (2 + 2) + 4 + 4),
        "hidden": common + tokens * hidden_size * b + draft_vocab * hidden_size * b,
        "reference_padded_dense": n * seq_length * (3 * 8 + aux_width * b + draft_vocab * b + 1),
    }


def plan_summary(prep) -> dict:
    samples = prep.samples
    num_tokens = np.asarray(samples["num_tokens"], dtype=np.int64)
    num_loss = np.asarray(samples["num_loss_tokens"], dtype=np.int64)
    aux_width = len(prep.aux_layer_ids) * prep.hidden_size
    sizes = estimate_sizes(num_tokens, num_loss, aux_width=aux_width, hidden_size=prep.hidden_size,
                           draft_vocab=len(prep.selected_token_ids), dtype=prep.cfg.dtype, seq_length=prep.cfg.seq_length)
    pct = np.percentile(num_tokens, [50, 90, 99]).astype(int).tolist() if len(num_tokens) else [0, 0, 0]
    return {
        "valid_samples": len(num_tokens),
        "skipped": prep.skipped,
        "duplicate_ids": prep.duplicate_ids,
        "tokens": int(num_tokens.sum()),
        "loss_tokens": int(num_loss.sum()),
        "length_p50_p90_p99_max": [*pct, int(num_tokens.max()) if len(num_tokens) else 0],
        "target_vocab_size": prep.vocab_size,
        "draft_vocab_size": len(prep.selected_token_ids),
        "draft_vocab_coverage": vocab_coverage(prep.token_counts, prep.selected_token_ids),
        "aux_layer_ids": prep.aux_layer_ids,
        "shards": prep.num_shards,
        "estimated_bytes": sizes,
        "memory": memory_estimate(prep),
    }


def memory_estimate(prep) -> str:
    """The placement planner's per-GPU estimate (bf16 weights, as a GPU build runs them)."""
    from .placement import plan_memory

    plan = plan_memory(prep.model_config, gpus_per_target=prep.cfg.gpus_per_target, max_tokens=prep.cfg.token_budget,
                       num_aux_layers=len(prep.aux_layer_ids), dtype_bytes=2, draft_vocab_size=len(prep.selected_token_ids))
    return plan.describe()


def format_plan(plan: dict) -> str:
    sizes = plan["estimated_bytes"]
    ref = sizes["reference_padded_dense"]
    lines = [
        "Build plan (dry run: nothing written)",
        f"  valid samples        {plan['valid_samples']:,}",
        f"  skipped rows         {sum(plan['skipped'].values()):,} {plan['skipped'] or ''}",
        f"  tokens               {plan['tokens']:,}",
        f"  loss-masked tokens   {plan['loss_tokens']:,}",
        "  length p50/p90/p99/max  " + "/".join(str(x) for x in plan["length_p50_p90_p99_max"]),
        f"  vocab                target {plan['target_vocab_size']:,}, draft {plan['draft_vocab_size']:,}",
        f"  draft-vocab coverage {plan['draft_vocab_coverage']:.2%} of loss-masked tokens",
        f"  aux layers           {plan['aux_layer_ids']}",
        f"  shards               {plan['shards']}",
        "  estimated cache size:",
    ]
    for name in ("probs", "topk", "hidden"):
        ratio = ref / sizes[name] if sizes[name] else float("inf")
        lines.append(f"    {name:8s} {sizes[name] / 1e6:12,.2f} MB   ({ratio:,.1f}x smaller than the reference)")
    lines.append(f"    reference padded dense layout {ref / 1e6:,.2f} MB")
    if "memory" in plan:
        lines.append(f"  GPU memory (bf16)    {plan['memory']}")
    return "\n".join(lines)
