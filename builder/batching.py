"""Token-budget batches over length-sorted samples, so little compute is spent on padding."""

from __future__ import annotations

import torch


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
    """Right-padded `input_ids`, `attention_mask` and `loss_mask` (padding is never supervised)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    loss = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (seq, mask) in enumerate(zip(sequences, masks)):
        ids[row, : len(seq)] = torch.as_tensor(seq)
        attention[row, : len(seq)] = 1
        loss[row, : len(seq)] = torch.as_tensor(mask, dtype=torch.bool)
    return ids, attention, loss
