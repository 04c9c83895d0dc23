"""Which samples are computed together: a shard's rows, its sort windows (`--sort-window-bytes` of
rows held on the host), and token-budget batches over length-sorted samples, so little compute is
spent on padding.

Everything here depends only on sample lengths and the recorded settings, so `verify --recompute`
can rebuild the exact batch that produced any cached row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .prepare import Prepared

# Caches recorded before the sort window had a setting of its own sorted within 4 row groups.
LEGACY_WINDOW_ROW_GROUPS = 4


def plan_batches(lengths: list[int], max_tokens: int, max_batch_size: int | None = None) -> list[list[int]]:
    """Group sample positions (indices into `lengths`) so that rows x longest <= max_tokens.

    Longest first (an out-of-memory shows on the first batch, not hours in); order is
    deterministic, so a test or a resume can rebuild exactly the same batches.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current, longest = [], [], 0
    for i in order:
        width = max(longest, lengths[i])
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and ((len(current) + 1) * width > max_tokens or full):
            batches.append(current)
            current, width = [], lengths[i]
        current.append(i)
        longest = width
    if current:
        batches.append(current)
    return batches


def pad_batch(sequences: list[list[int]], masks: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `loss_mask` (padding is never supervised).
    Filled in numpy: several times faster than torch from Python lists, and it never lets go of the
    GIL, which the forward thread would then wait to get back from the writer's threads."""
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    attention = np.zeros((len(sequences), width), dtype=np.int64)
    loss = np.zeros((len(sequences), width), dtype=np.bool_)
    for row, (seq, mask) in enumerate(zip(sequences, masks)):
        ids[row, : len(seq)] = seq
        attention[row, : len(seq)] = 1
        loss[row, : len(seq)] = mask
    return torch.from_numpy(ids), torch.from_numpy(attention), torch.from_numpy(loss)


def expected_rows(prep: Prepared, shard: int) -> int:
    return min(prep.cfg.shard_size, len(prep.samples) - shard * prep.cfg.shard_size)


def batching_record(prep: Prepared) -> dict:
    """The settings that decide which samples share a forward batch; recorded per shard, because a
    resume may change them and `verify --recompute` must rebuild each shard's own batches."""
    return {
        "batch_size": prep.cfg.batch_size,
        "max_tokens_per_batch": prep.cfg.token_budget,
        "row_group_bytes": prep.cfg.row_group_bytes,
        "sort_window_bytes": prep.cfg.sort_window_bytes,
    }


def window_bytes(batching: dict) -> int:
    """The sort window a batching record stands for (records without one: 4 row groups)."""
    return batching.get("sort_window_bytes") or batching["row_group_bytes"] * LEGACY_WINDOW_ROW_GROUPS


def row_windows(rows, per_token: int, per_loss: int, window_bytes: int):
    """Consecutive runs of samples whose encoded size (known from lengths alone) fits the window."""
    window, size = [], 0
    for row in rows:
        row_size = row["num_tokens"] * per_token + row["num_loss_tokens"] * per_loss
        if window and size + row_size > window_bytes:
            yield window
            window, size = [], 0
        window.append(row)
        size += row_size
    if window:
        yield window


def shard_windows(prep: Prepared, rows):
    per_token, per_loss = prep.layout.bytes_per_position()
    return row_windows(rows, per_token, per_loss, window_bytes(batching_record(prep)))
