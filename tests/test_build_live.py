"""Cached == live: what the reader yields equals the shared supervision function applied to a
fresh forward of the target, for every supported architecture."""

from __future__ import annotations

import pytest
import torch
from helpers import decoded_rows, small_config
from tiny_targets import ARCHITECTURES, make_tiny_target
from transformers import AutoModelForCausalLM

from builder import compute_target_distribution
from builder.build import build
from builder.reader import read_vocab


def live_nemo(model, aux_layer_ids, selected, input_ids, loss_mask, store_dtype):
    """The NeMo-layout sample an online trainer would compute: one fresh forward, full logits."""
    ids = torch.as_tensor(input_ids).long()[None]
    loss = torch.as_tensor(loss_mask).bool()[None]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    sup = compute_target_distribution(out.logits, loss, selected)
    aux = torch.cat([out.hidden_states[i + 1] for i in aux_layer_ids], dim=-1)[0]

    def shift(t):
        return torch.cat([t[1:], t.new_zeros((1, *t.shape[1:]))])

    return {
        "input_ids": shift(ids[0]),
        "attention_mask": torch.ones(ids.shape[1], dtype=torch.long),
        "loss_mask": shift(loss[0].long()),
        "aux_hidden_states": aux.to(store_dtype),
        "target_probs": shift(sup.target_probs[0]).to(store_dtype),
        "position_mask": shift(sup.position_mask[0]).unsqueeze(-1),
    }


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_equals_live_fp32(tmp_path, arch):
    target = make_tiny_target(tmp_path / "target", arch)
    # batch_size 1: each live forward sees exactly the batch the builder ran.
    cfg = small_config(tmp_path / "cache", target, batch_size=1, max_tokens_per_batch=96, aux_layer_ids=(0, 2, 4))
    result = build(cfg, progress=False)
    check_against_live(result, target, torch.float32)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_equals_live_cast_to_bf16(tmp_path, arch):
    target = make_tiny_target(tmp_path / "target", arch)
    cfg = small_config(tmp_path / "cache", target, batch_size=1, max_tokens_per_batch=96, dtype="bf16", aux_layer_ids=(0, 2, 4))
    result = build(cfg, progress=False)
    check_against_live(result, target, torch.bfloat16)


def check_against_live(result, target, store_dtype):
    prep = result.prepared
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    selected = read_vocab(result.output_dir)["selected_token_ids"]
    assert torch.equal(selected, torch.as_tensor(prep.selected_token_ids))
    cached = decoded_rows(result.output_dir, layout="nemo")
    assert len(cached) == len(prep.samples) == 14
    supervised = 0
    for sample, got in zip(prep.samples, cached):
        want = live_nemo(model, prep.aux_layer_ids, selected, sample["input_ids"], sample["loss_mask"], store_dtype)
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype, key
            assert torch.equal(got[key], want[key]), f"{key} of sample {sample['sample_id']}"
        supervised += int(got["position_mask"].sum())
    assert supervised > 0  # the comparison covered real supervision, not only zeros


def test_padded_batches_match_single_sample_forwards(tmp_path):
    """Token-budget batching with right padding changes nothing but float rounding."""
    single = build(small_config(tmp_path / "single", batch_size=1, max_tokens_per_batch=96), progress=False)
    batched = build(small_config(tmp_path / "batched", batch_size=8, max_tokens_per_batch=8 * 96), progress=False)
    for a, b in zip(decoded_rows(single.output_dir), decoded_rows(batched.output_dir)):
        assert a["sample_id"] == b["sample_id"]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["loss_mask"], b["loss_mask"])
        torch.testing.assert_close(a["aux_hidden_states"], b["aux_hidden_states"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a["target_probs"], b["target_probs"], rtol=1e-4, atol=1e-6)
