"""The one definition of EAGLE-3 target supervision (docs/supervision.md).

The builder calls `compute_target_distribution` on the target's logits, and so can an online
trainer: cached supervision then equals live supervision exactly in fp32.

`chunked_logits` is the one way a head meets hidden rows, at build time (the target's `lm_head`)
and at read time (`hidden` caches: the stored draft rows): the same fixed-shape chunks on both
sides, so a `hidden` cache read gives the live build's logits bit for bit where the kernels do.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

HEAD_CHUNK_ROWS = 256  # rows per head matmul: every chunk has this shape, so a row's logits never depend on its chunk-mates


class TargetSupervision(NamedTuple):
    target_probs: torch.Tensor  # [..., Vd] fp32: softmax over the draft-vocab logits; 0 off the loss mask
    position_mask: torch.Tensor  # [...] bool: loss_mask & (full-vocab argmax is in the draft vocab)
    argmax: torch.Tensor  # [...] int64: full-vocab argmax


def compute_target_distribution(
    logits: torch.Tensor, loss_mask: torch.Tensor | None, selected_token_ids: torch.Tensor
) -> TargetSupervision:
    """Target distribution of the token after each position, restricted to the draft vocab.

    `logits` `[..., V]` (any float dtype; computed in fp32), `loss_mask` `[...]` (None: every
    position is a loss position, as for rows already gathered at them), `selected_token_ids`
    `[Vd]` int64. Unshifted: position `u` describes token `u + 1`.
    """
    selected = selected_token_ids.to(logits.device)
    # On a CPU, gathers and reductions over bf16/fp16 run several times slower than over fp32:
    # widen first (exact, so the same probs and argmax). On a GPU the fp32 copy of every logit
    # would only cost memory, so only the draft columns are widened there.
    logits = logits.float() if logits.device.type == "cpu" else logits
    draft_logits = logits.index_select(-1, selected).float()
    target_probs = torch.softmax(draft_logits, dim=-1)
    argmax = logits.argmax(dim=-1)
    # index_fill_, not `in_vocab[selected] = True`: that copies the value from the host and waits for the GPU
    in_vocab = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device).index_fill_(0, selected, True)
    if loss_mask is None:  # no pass over the [..., Vd] probs to keep them all
        return TargetSupervision(target_probs, in_vocab[argmax], argmax)
    keep = loss_mask.to(logits.device).bool()
    return TargetSupervision(target_probs.mul_(keep.unsqueeze(-1)), keep & in_vocab[argmax], argmax)


def logit_chunks(rows: torch.Tensor, head, transform=None):
    """`transform(head(chunk))` for `[n, H]` rows zero-padded to whole `HEAD_CHUNK_ROWS`-row chunks
    (matmul kernels are chosen by shape: a fixed shape makes each row's logits independent of the others)."""
    padded = torch.nn.functional.pad(rows, (0, 0, 0, -rows.shape[0] % HEAD_CHUNK_ROWS))
    for chunk in padded.split(HEAD_CHUNK_ROWS):
        logits = head(chunk)
        yield transform(logits) if transform is not None else logits


def chunked_logits(rows: torch.Tensor, head, transform=None, width: int | None = None) -> torch.Tensor:
    """Logits `[n, width]` of `[n, H]` rows, in fixed-shape chunks (see `logit_chunks`); `width` shapes the empty result."""
    chunks = list(logit_chunks(rows, head, transform))
    return torch.cat(chunks)[: rows.shape[0]] if chunks else rows.new_zeros(0, width)
