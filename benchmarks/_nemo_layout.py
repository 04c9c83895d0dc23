"""NeMo Automodel 0.7.0's EAGLE-3 cache in bytes: what its `precompute_eagle3` stores per sample.

Each sample is padded to `seq_length` (its chat dataset tokenizes with `padding="max_length"`),
and every position stores (`precompute_eagle3._compute_batch_cache`, `eagle3_cache.write_shard`):
`input_ids`, `attention_mask` and `loss_mask` as int64, `aux_hidden_states` `[3H]` in the cache
dtype and a one-byte bool `position_mask`; then the draft-vocabulary distribution, either
- lossless, its default: `target_probs` `[Vd]` in the cache dtype; or
- with `--target-probs-topk K` (0 < K < Vd): `target_probs_values` `[K]` in the cache dtype (the
  kept probabilities renormalised: lossy) and `target_probs_indices` `[K]` as int32.
The safetensors headers (a few hundred bytes per shard) are left out.
"""

from __future__ import annotations

FLOAT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
INT64_BYTES, INT32_BYTES, BOOL_BYTES = 8, 4, 1


def nemo_bytes_per_position(aux_width: int, draft_vocab: int, dtype: str = "bf16", topk: int | None = None) -> int:
    """Bytes of one (padded) position of NeMo's cache; `topk` as its `--target-probs-topk` (None or
    0: lossless; K >= Vd stores the full distribution, as NeMo does)."""
    value = FLOAT_BYTES[dtype]
    common = 3 * INT64_BYTES + aux_width * value + BOOL_BYTES
    if topk and 0 < topk < draft_vocab:
        return common + topk * (value + INT32_BYTES)
    return common + draft_vocab * value
