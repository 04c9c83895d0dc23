"""The supervision rule (docs/supervision.md) against values worked out by hand, independent of the builder:

    target_probs[u] = softmax(z[u][selected_token_ids]) * loss_mask[u]     (renormalised over the draft vocab)
    position_mask[u] = loss_mask[u] & (argmax(z[u]) over the FULL vocab is a draft token)

Every expected value below is written from explicit numbers with `math.exp`, never by calling the rule.
"""

from __future__ import annotations

import math

import torch

from builder import compute_target_distribution

# A 6-token target vocab; the draft vocab keeps tokens 4, 1, 3 in that (not ascending) column order.
SELECTED = torch.tensor([4, 1, 3])


def softmax_of(*values: float) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def supervise(rows: list[list[float]], loss: list[int], dtype=torch.float32):
    return compute_target_distribution(torch.tensor(rows, dtype=dtype), torch.tensor(loss), SELECTED)


def test_columns_follow_selected_order_and_renormalise_over_the_draft_vocab():
    #         token: 0    1    2    3    4    5
    sup = supervise([[0.0, 1.0, -2.0, 2.0, 3.0, 0.5]], [1])
    # columns: token 4 (z=3), token 1 (z=1), token 3 (z=2); tokens 0, 2, 5 take no mass
    e3, e1, e2 = math.exp(3.0), math.exp(1.0), math.exp(2.0)
    expected = torch.tensor([[e3 / (e3 + e1 + e2), e1 / (e3 + e1 + e2), e2 / (e3 + e1 + e2)]])
    assert sup.target_probs.dtype == torch.float32
    torch.testing.assert_close(sup.target_probs, expected, rtol=1e-6, atol=0)
    assert abs(float(sup.target_probs.sum()) - 1.0) < 1e-6  # the draft mass (< 1 of the full vocab) is renormalised
    # a full-vocab softmax would give token 4 exp(3) / sum(all six), about 0.61 instead of 0.67
    full = math.exp(3.0) / sum(math.exp(v) for v in (0.0, 1.0, -2.0, 2.0, 3.0, 0.5))
    assert abs(float(sup.target_probs[0, 0]) - full) > 0.05
    assert sup.argmax.tolist() == [4] and sup.position_mask.tolist() == [True]


def test_full_vocab_argmax_outside_the_draft_vocab_is_not_supervised():
    # token 2 (not a draft token) has the largest logit; among draft tokens token 1 leads
    sup = supervise([[0.0, 4.0, 5.0, 2.0, 3.0, -1.0]], [1])
    assert sup.argmax.tolist() == [2]  # the FULL-vocab argmax, as a target token id
    assert sup.position_mask.tolist() == [False]
    # the probs are still the renormalised draft distribution: columns 4, 1, 3 -> z = 3, 4, 2
    torch.testing.assert_close(sup.target_probs, torch.tensor([softmax_of(3.0, 4.0, 2.0)]), rtol=1e-6, atol=0)


def test_tie_takes_the_first_maximal_index():
    # torch.argmax returns the first maximal index, i.e. the lowest token id among equal logits
    out_first = supervise([[7.0, 1.0, 0.0, 7.0, 2.0, 0.0]], [1])  # tie of token 0 (not draft) and 3 (draft)
    assert out_first.argmax.tolist() == [0] and out_first.position_mask.tolist() == [False]
    in_first = supervise([[0.0, 7.0, 0.0, 7.0, 2.0, 7.0]], [1])  # tie of tokens 1, 3 (draft) and 5 (not)
    assert in_first.argmax.tolist() == [1] and in_first.position_mask.tolist() == [True]
    # equal logits get equal probability: columns 4, 1, 3 -> z = 2, 7, 7
    torch.testing.assert_close(in_first.target_probs, torch.tensor([softmax_of(2.0, 7.0, 7.0)]), rtol=1e-6, atol=0)


def test_positions_off_the_loss_mask_are_zero_and_unsupervised():
    rows = [
        [0.0, 4.0, 1.0, 2.0, 0.5, -3.0],  # argmax token 1 (draft), supervised
        [0.0, 4.0, 1.0, 2.0, 0.5, -3.0],  # the same logits, off the loss mask
        [9.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # off the loss mask, argmax outside the draft vocab
    ]
    sup = supervise(rows, [1, 0, 0])
    torch.testing.assert_close(sup.target_probs[0], torch.tensor(softmax_of(0.5, 4.0, 2.0)), rtol=1e-6, atol=0)
    assert torch.equal(sup.target_probs[1:], torch.zeros(2, 3))
    assert sup.position_mask.tolist() == [True, False, False]
    assert sup.argmax.tolist() == [1, 1, 0]  # reported everywhere; only the mask depends on the loss mask


def test_batch_and_sequence_dimensions():
    # [B=2, T=2, V=6]: each position on its own
    logits = torch.tensor(
        [
            [[0.0, 1.0, -2.0, 2.0, 3.0, 0.5], [0.0, 4.0, 5.0, 2.0, 3.0, -1.0]],
            [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 6.0, 1.0]],
        ]
    )
    sup = compute_target_distribution(logits, torch.tensor([[1, 1], [0, 1]]), SELECTED)
    assert sup.target_probs.shape == (2, 2, 3) and sup.position_mask.shape == (2, 2)
    expected = torch.tensor(
        [
            [softmax_of(3.0, 1.0, 2.0), softmax_of(3.0, 4.0, 2.0)],
            [[0.0, 0.0, 0.0], softmax_of(6.0, 1.0, 1.0)],
        ]
    )
    torch.testing.assert_close(sup.target_probs, expected, rtol=1e-6, atol=0)
    assert sup.position_mask.tolist() == [[True, False], [False, True]]
    assert sup.argmax.tolist() == [[4, 2], [0, 4]]  # all-zero logits: the first index


def test_large_logits_do_not_overflow():
    # exp(1000) overflows fp32 and fp64: the softmax must subtract the maximum first
    sup = supervise([[0.0, 999.0, 0.0, 998.0, 1000.0, 0.0]], [1])
    torch.testing.assert_close(sup.target_probs, torch.tensor([softmax_of(0.0, -1.0, -2.0)]), rtol=1e-6, atol=0)
    assert sup.position_mask.tolist() == [True]


def test_half_precision_logits_are_computed_in_fp32():
    # values exact in bf16: the result must equal the fp32 computation bit for bit, in fp32
    rows = [[0.0, 1.0, -2.0, 2.0, 3.0, 0.5], [0.0, 4.0, 5.0, 2.0, 3.0, -1.0]]
    from_bf16 = supervise(rows, [1, 1], dtype=torch.bfloat16)
    from_fp32 = supervise(rows, [1, 1], dtype=torch.float32)
    assert from_bf16.target_probs.dtype == torch.float32
    assert torch.equal(from_bf16.target_probs, from_fp32.target_probs)
    assert torch.equal(from_bf16.position_mask, from_fp32.position_mask)


def test_half_precision_logits_on_the_cpu_give_the_half_precision_argmax_and_probs():
    """On a CPU the logits are widened to fp32 before the gather and the argmax (faster there): the
    result must equal the rule applied to the half-precision values themselves, ties and NaN included."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        logits = (torch.randn(64, 300, generator=gen) * 4).to(dtype)
        logits[:, 7] = logits.max(-1).values  # ties with the true maximum, at a lower index in many rows
        logits[3, 100] = float("nan")
        selected = torch.randperm(300, generator=gen)[:120]
        loss = torch.rand(64, generator=gen) < 0.8
        out = compute_target_distribution(logits, loss, selected)
        want_argmax = logits.argmax(-1)  # the argmax kernel of the half-precision type itself
        want_probs = torch.softmax(logits.index_select(-1, selected).float(), -1) * loss.unsqueeze(-1)
        assert torch.equal(out.argmax, want_argmax), dtype
        assert torch.equal(out.target_probs.view(torch.int32), want_probs.view(torch.int32)), dtype  # bit for bit, NaN too
        assert out.argmax[3] == 100  # NaN is the maximum for both


def test_no_loss_mask_means_every_position_bit_for_bit():
    """Rows already gathered at loss positions skip the mask: the same probs, mask and argmax as an
    all-ones loss mask, and masked rows differ from it only where the mask is 0."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 40, 50, generator=gen) * 3
    logits[1, 5, 9] = float("nan")
    selected = torch.randperm(50, generator=gen)[:20]
    every = compute_target_distribution(logits, None, selected)
    ones = compute_target_distribution(logits, torch.ones(3, 40, dtype=torch.long), selected)
    assert torch.equal(every.target_probs.view(torch.int32), ones.target_probs.view(torch.int32))
    assert torch.equal(every.position_mask, ones.position_mask) and torch.equal(every.argmax, ones.argmax)
    loss = torch.rand(3, 40, generator=gen) < 0.5
    loss[1, 5] = True  # a NaN row stays NaN (times 0 is NaN) under any mask
    masked = compute_target_distribution(logits, loss, selected)
    assert torch.equal(masked.target_probs[loss].view(torch.int32), every.target_probs[loss].view(torch.int32))
    assert not masked.target_probs[~loss].any() and torch.equal(masked.position_mask, every.position_mask & loss)
