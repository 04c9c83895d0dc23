"""The one definition of EAGLE-3 target supervision (docs/supervision.md).

The builder calls `compute_target_distribution` on the target's logits, and so can an online
trainer: cached supervision then equals live supervision exactly in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TargetSupervision(NamedTuple):
    target_probs: torch.Tensor  # [..., Vd] fp32: softmax over the draft-vocab logits; 0 off the loss mask
    position_mask: torch.Tensor  # [...] bool: loss_mask & (full-vocab argmax is in the draft vocab)
    argmax: torch.Tensor  # [...] int64: full-vocab argmax


def compute_target_distribution(logits: torch.Tensor, loss_mask: torch.Tensor, selected_token_ids: torch.Tensor) -> TargetSupervision:
    """Target distribution of the token after each position, restricted to the draft vocab.

    `logits` `[..., V]` (any float dtype; computed in fp32), `loss_mask` `[...]`,
    `selected_token_ids` `[Vd]` int64. Unshifted: position `u` describes token `u + 1`.
    """
    selected = selected_token_ids.to(logits.device)
    draft_logits = logits.index_select(-1, selected).float()
    target_probs = torch.softmax(draft_logits, dim=-1)
    keep = loss_mask.to(logits.device).bool()
    target_probs = target_probs * keep.unsqueeze(-1)
    argmax = logits.argmax(dim=-1)
    in_vocab = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    in_vocab[selected] = True
    return TargetSupervision(target_probs, keep & in_vocab[argmax], argmax)
