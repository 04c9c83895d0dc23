"""topk, hidden and fp8: the reader rebuilds what the live target gave, within the bounds the card
reports (which must be the true maxima); hidden caches change draft vocabulary with no rebuild."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import AllocatedBytes, says, small_config
from transformers import AutoModelForCausalLM, LlamaConfig

from builder import compute_target_distribution
from builder.embedded import resolve_target
from builder.formats import (
    FP8_MAX,
    TARGET_FORMATS,
    TORCH_DTYPES,
    Layout,
    decode_aux,
    encode_aux,
    encode_targets,
    probs_from_topk,
    quality_of_batch,
)
from builder.pipeline import build
from builder.placement import plan_memory
from builder.reader import load_cache, read_manifest

KEYS = {"input_ids", "attention_mask", "loss_mask", "aux_hidden_states", "target_probs", "position_mask"}


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(resolve_target("tiny-llama"), dtype=torch.float32).eval()


def live(model, sample, selected):
    """Unshifted live aux `[L, 3H]` and probs at the loss positions `[n, Vd]` (fp32), one sample per forward."""
    ids = torch.as_tensor(sample["input_ids"]).long()[None]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    loss = torch.as_tensor(sample["loss_mask"]).bool()
    sup = compute_target_distribution(out.logits[0], loss, selected)
    aux = torch.cat([out.hidden_states[i + 1] for i in (1, 3, 4)], dim=-1)[0]
    return aux, sup.target_probs[loss]


def build_format(tmp_path_factory, name, **overrides):
    # batch_size 1: the live per-sample forward sees the batch the build ran
    settings = dict(batch_size=1, max_tokens_per_batch=96, draft_vocab_size=256) | overrides
    cfg = small_config(tmp_path_factory.mktemp(name) / "cache", **settings)
    return build(cfg, progress=False)


def unshifted(sample_nemo, loss):
    """The loss-position probs of a NeMo sample (slot t carries position t + 1)."""
    probs = torch.cat([sample_nemo["target_probs"][-1:], sample_nemo["target_probs"][:-1]])  # undo the shift
    return probs[loss].float()


@pytest.fixture(scope="module")
def fp8_hidden(tmp_path_factory):
    return build_format(tmp_path_factory, "fp8_hidden", target_format="hidden", aux_dtype="fp8", store_full_head=True)


@pytest.fixture(scope="module")
def topk(tmp_path_factory):
    return build_format(tmp_path_factory, "topk", target_format="topk", topk=8)


@pytest.fixture(scope="module")
def fp8_hidden_bf16(tmp_path_factory):
    return build_format(tmp_path_factory, "fp8_hidden_bf16", target_format="hidden", aux_dtype="fp8", dtype="bf16")


@pytest.mark.parametrize(
    "cache, probs_dtype, probs_bound",
    # fp32 hidden states; bf16 ones (whose rounding moves the logits) and bf16 probs
    [("fp8_hidden", torch.float32, 1e-5), ("fp8_hidden_bf16", torch.bfloat16, 0.01)],
)
def test_the_cards_fp8_aux_and_hidden_probs_figures_are_the_largest_differences_of_a_default_read(
    cache, probs_dtype, probs_bound, request, model
):
    """A default read decodes fp8 aux states to bf16 and yields the rebuilt probs in the cache's dtype:
    the card's figures are the largest differences of exactly that from the live target."""
    result = request.getfixturevalue(cache)
    quality = read_manifest(result.output_dir)["quality"]
    selected = torch.as_tensor(result.prepared.selected_token_ids)
    cached = load_cache(result.output_dir, layout="nemo", streaming=False)
    aux_diff = probs_diff = 0.0
    for i, sample in enumerate(result.prepared.samples):
        live_aux, live_probs = live(model, sample, selected)
        got = cached[i]
        assert set(got) == KEYS and (got["aux_hidden_states"].dtype, got["target_probs"].dtype) == (torch.bfloat16, probs_dtype)
        aux_diff = max(aux_diff, (got["aux_hidden_states"].float() - live_aux).abs().max().item())
        probs_diff = max(probs_diff, (unshifted(got, torch.as_tensor(sample["loss_mask"]).bool()) - live_probs).abs().max().item())
    assert 0 < aux_diff == quality["aux_max_abs_diff"]
    assert probs_diff == quality["probs_max_abs_diff"]
    assert aux_diff < 0.05 and probs_diff < probs_bound  # aux: e4m3 with a per-token scale, then bf16


def spread_rebuild(logprobs: torch.Tensor, ids: torch.Tensor, draft_vocab_size: int) -> torch.Tensor:
    """The top-K rebuilt with the tail spread, from its definition: each kept column holds its own
    probability, each other column an equal share of what the K leave."""
    kept = logprobs.float().exp()
    is_kept = torch.zeros(len(kept), draft_vocab_size, dtype=torch.bool).scatter(1, ids.long(), True)
    share = (1 - kept.sum(-1, keepdim=True)).clamp(min=0) / (~is_kept).sum(-1, keepdim=True)  # none where rounding passes 1
    dense = torch.zeros(len(kept), draft_vocab_size).scatter(1, ids.long(), kept)
    return torch.where(is_kept, dense, share)


def test_topk_reports_true_kept_mass_and_kl(topk, model):
    """The card's figures against the live target and the rebuild written out from its definition,
    not the reader's (which shares the build's code)."""
    result = topk
    quality = read_manifest(result.output_dir)["quality"]
    selected = torch.as_tensor(result.prepared.selected_token_ids)
    raw = load_cache(result.output_dir, layout="raw", streaming=False)
    spread = load_cache(result.output_dir, layout="nemo", streaming=False, spread_tail=True)
    renorm = load_cache(result.output_dir, layout="nemo", streaming=False)
    kept, kls = [], []
    for i, sample in enumerate(result.prepared.samples):
        loss = torch.as_tensor(sample["loss_mask"]).bool()
        _, live_probs = live(model, sample, selected)
        kept.append(raw[i]["topk_logprobs"].float().exp().sum(-1))
        rebuilt = spread_rebuild(raw[i]["topk_logprobs"], raw[i]["topk_ids"], len(selected))
        torch.testing.assert_close(unshifted(spread[i], loss), rebuilt, rtol=1e-6, atol=1e-9)  # what the reader yields
        kls.append((live_probs * (live_probs.clamp(min=1e-38).log() - rebuilt.clamp(min=1e-38).log())).sum(-1))
        renormed = unshifted(renorm[i], loss)
        assert torch.allclose(renormed.sum(-1), torch.ones(len(renormed)), atol=1e-5)  # renormalised over the K
        assert int((renormed > 0).sum(-1).max()) <= 8
    kept, kls = torch.cat(kept), torch.cat(kls)
    assert quality["kept_mass_mean"] == pytest.approx(kept.mean().item(), rel=1e-5)
    assert quality["kept_mass_min"] == pytest.approx(kept.min().item(), rel=1e-6)
    nearest_rank = kept.sort().values[math.ceil(0.01 * len(kept)) - 1].item()  # the 1st percentile, nearest rank
    assert nearest_rank <= quality["kept_mass_p1"] <= nearest_rank + 1e-3 + 1e-9  # its 0.001-wide histogram bin's upper edge
    assert quality["kl_live_to_rebuilt_spread_mean"] == pytest.approx(kls.mean().item(), rel=1e-4)


def test_the_spread_tail_shares_what_the_k_leave_among_the_other_columns():
    """Kept 0.5 at id 3 and 0.3 at id 0 of 6: the 0.2 left goes to the 4 other columns, 0.05 each;
    the kept columns hold their own values and the row sums to 1."""
    logprobs, ids = torch.tensor([[0.5, 0.3]]).log(), torch.tensor([[3, 0]])
    rebuilt = probs_from_topk(logprobs, ids, 6, spread_tail=True)
    torch.testing.assert_close(rebuilt, torch.tensor([[0.3, 0.05, 0.05, 0.5, 0.05, 0.05]]), rtol=1e-6, atol=0)
    torch.testing.assert_close(rebuilt.sum(-1), torch.ones(1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype, stored", [("fp32", "fp32"), ("bf16", "fp16"), ("fp16", "fp16")])
def test_topk_logprobs_are_stored_in_fp16_unless_the_cache_is_fp32(dtype, stored):
    """Log-probs lie in [-87.34, 0] (floored at the log of the smallest normal fp32), well within fp16's
    range, where its 10-bit mantissa rounds 8 times finer than bf16's 7 bits: a bf16 cache stores them in fp16."""
    layout = Layout("topk", dtype, "bf16", 4, 6, 8, 8)
    assert layout.columns()["topk_logprobs"]["dtype"] == stored
    probs = torch.softmax(torch.randn(3, 6, generator=torch.Generator().manual_seed(0)), -1)
    live = {"argmax": probs.argmax(-1), "probs": probs, "log_draft_mass": torch.zeros(3)}
    assert encode_targets(layout, live)["topk_logprobs"].dtype == TORCH_DTYPES[stored]


def test_a_topk_row_with_fewer_than_k_nonzero_probabilities_is_stored_finite_and_kept(tmp_path):
    """A peaked target's fp32 softmax underflows all but a few probabilities of a row to 0, so its K largest
    hold zeros, whose log (-inf) would drop the sample as non-finite. They are stored as the log of the
    smallest normal fp32, -126 ln 2 (a probability of about 1e-38), and every sample is kept."""
    import shutil

    target = shutil.copytree(resolve_target("tiny-llama"), tmp_path / "target")
    peaked = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    with torch.no_grad():
        peaked.lm_head.weight.mul_(100)
    peaked.save_pretrained(target)
    result = build(small_config(tmp_path / "cache", target=target, target_format="topk", topk=16, max_samples=4), progress=False)
    assert result.manifest["failed"] == [] and result.manifest["totals"]["samples"] == 4
    floor = torch.tensor(-126 * math.log(2), dtype=torch.float32)
    floored = 0
    for row in load_cache(result.output_dir, layout="raw", streaming=False):
        assert torch.isfinite(row["topk_logprobs"]).all()
        floored += int((row["topk_logprobs"] == floor).sum())
    assert floored > 0  # the premise: rows with fewer than K non-zero probabilities


def test_every_format_yields_the_same_keys_and_shapes(fp8_hidden, topk, tmp_path_factory):
    probs = build_format(tmp_path_factory, "probs")
    first = [load_cache(r.output_dir, layout="nemo", streaming=False, aux_dtype=torch.float32)[3] for r in (probs, topk, fp8_hidden)]
    for sample in first[1:]:
        assert {k: (v.shape, v.dtype) for k, v in sample.items()} == {k: (v.shape, v.dtype) for k, v in first[0].items()}
        assert torch.equal(sample["input_ids"], first[0]["input_ids"]) and torch.equal(sample["position_mask"], first[0]["position_mask"])


@pytest.mark.parametrize("size", [128, 512])
def test_hidden_cache_reads_another_draft_vocab_like_a_probs_build(fp8_hidden, tmp_path_factory, size):
    probs = build_format(tmp_path_factory, f"probs{size}", draft_vocab_size=size)
    want = load_cache(probs.output_dir, layout="nemo", streaming=False)
    got = load_cache(fp8_hidden.output_dir, layout="nemo", streaming=False, draft_vocab_size=size)
    for i in range(len(want)):
        assert got[i]["target_probs"].shape[-1] == size
        torch.testing.assert_close(got[i]["target_probs"], want[i]["target_probs"], rtol=0, atol=2e-6)
        assert torch.equal(got[i]["position_mask"], want[i]["position_mask"])


def test_a_larger_draft_vocab_than_a_topk_cache_holds_is_refused(topk):
    with pytest.raises(ValueError, match=says("draft_vocab_size", "300", "topk cache", "256-token draft vocabulary")):
        load_cache(topk.output_dir, layout="nemo", draft_vocab_size=300)


def test_a_hidden_cache_reads_the_live_builds_probs_bit_for_bit(tmp_path, monkeypatch):
    """Build and reader apply the head in the same fixed-shape chunks: the probs a `hidden` cache
    rebuilds at read time (one sample per chunk) equal those the build computed live from the
    target's head (several samples per chunk), in fp32, bit for bit."""
    import builder.supervision as supervision

    settings = dict(max_samples=6, batch_size=3, max_tokens_per_batch=3 * 96)
    live = build(small_config(tmp_path / "probs", **settings), progress=False)
    hidden = build(small_config(tmp_path / "hidden", target_format="hidden", **settings), progress=False)
    want = load_cache(live.output_dir, layout="nemo", streaming=False)
    got = load_cache(hidden.output_dir, layout="nemo", streaming=False)
    assert len(got) == len(want) == 6
    for i in range(len(want)):
        assert torch.equal(got[i]["target_probs"], want[i]["target_probs"]), i
        assert torch.equal(got[i]["position_mask"], want[i]["position_mask"]), i
    # The premise: another chunking at read time (one row per matmul) changes the bits.
    monkeypatch.setattr(supervision, "HEAD_CHUNK_ROWS", 1)
    rechunked = load_cache(hidden.output_dir, layout="nemo", streaming=False)
    assert any(not torch.equal(rechunked[i]["target_probs"], want[i]["target_probs"]) for i in range(len(want)))


def test_the_last_layer_is_stored_as_its_own_output_before_the_final_norm(tmp_path_factory, model):
    """Layer i's output is transformers' hidden_states[i + 1], except for the last layer, whose
    hidden_states[N] transformers gives after the final norm: the cache keeps the layer's own output
    (as NeMo's forward hooks capture it), for an id N - 1 as for any other."""
    last = model.config.num_hidden_layers - 1
    result = build_format(tmp_path_factory, "last-layer", aux_layer_ids=(1, 3, last), max_samples=2)
    sample = next(iter(load_cache(result.output_dir, layout="raw", streaming=False)))
    ids = sample["input_ids"].long()[None]
    captured = {}
    hook = model.model.layers[last].register_forward_hook(lambda module, args, output: captured.update(out=output))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    finally:
        hook.remove()
    layer_output = captured["out"][0] if isinstance(captured["out"], tuple) else captured["out"]
    hidden = model.config.hidden_size
    stored = sample["aux_hidden_states"].float()
    assert torch.equal(stored[:, :hidden], out.hidden_states[2][0]) and torch.equal(stored[:, hidden : 2 * hidden], out.hidden_states[4][0])
    assert torch.equal(stored[:, 2 * hidden :], layer_output[0])
    assert not torch.allclose(stored[:, 2 * hidden :], out.hidden_states[last + 1][0])  # that one is after the final norm


@pytest.mark.parametrize("target_format", TARGET_FORMATS)
@pytest.mark.parametrize("loss_rows", [2048, 1337])
def test_a_batchs_supervision_peak_fits_the_planners_outputs_term(target_format, loss_rows):
    """What a batch holds of its `[n, Vd]` supervision once the forward is done: the live fp32 probs, the
    encoded columns and the quality figures' temporaries. The planner budgets it in `outputs` for a batch
    of 2048 tokens, whichever format; quality is measured slice by slice so that it stays within."""
    tokens, vocab, hidden = 2048, 1000, 32
    torch.manual_seed(0)
    live = {
        "probs": torch.softmax(torch.randn(loss_rows, vocab) * 3, -1),
        "argmax": torch.zeros(loss_rows, dtype=torch.long),
        "log_draft_mass": torch.zeros(loss_rows),
        "aux": torch.zeros(1, tokens, 8),
        "attention": torch.ones(1, tokens),
        "loss_positions": torch.arange(loss_rows),
        "final_hidden": torch.randn(1, tokens, hidden),
    }
    draft_rows = torch.randn(vocab, hidden) * 0.1
    layout = Layout(target_format, "bf16", "bf16", 64, vocab, 8, hidden)
    with AllocatedBytes([*live.values(), draft_rows]) as allocated:
        encoded = encode_targets(layout, live)
        quality_of_batch(layout, live, encoded, draft_rows)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=vocab)
    plan = plan_memory(config, gpus_per_target=1, max_tokens=tokens, num_aux_layers=3, dtype_bytes=2, draft_vocab_size=vocab)
    assert live["probs"].nbytes + allocated.peak <= plan.outputs


@pytest.mark.parametrize("aux_dtype", ["bf16", "fp16", "fp32", "fp8"])
@pytest.mark.parametrize("tokens", [2048, 1337, 1])
def test_a_batchs_aux_peak_fits_the_planners_aux_term(aux_dtype, tokens):
    """What a batch holds of its aux states once the forward is done: the live aux states and final hidden
    state (bf16, as a GPU computes them), the encoded aux columns and their quality figure's temporaries.
    The planner budgets it in `aux_capture` for a batch of `tokens` tokens, whichever aux dtype."""
    layers, hidden = 3, 64
    torch.manual_seed(0)
    live = {
        "aux": torch.randn(1, tokens, layers * hidden, dtype=torch.bfloat16),
        "final_hidden": torch.randn(1, tokens, hidden, dtype=torch.bfloat16),
        "attention": torch.ones(1, tokens),
    }
    layout = Layout("probs", "bf16", aux_dtype, 64, 100, layers * hidden, hidden)
    with AllocatedBytes(list(live.values())) as allocated:
        encoded = encode_aux(live["aux"], aux_dtype)
        quality_of_batch(layout, live, encoded)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)
    plan = plan_memory(config, gpus_per_target=1, max_tokens=tokens, num_aux_layers=layers, dtype_bytes=2, aux_dtype=aux_dtype)
    assert live["aux"].nbytes + live["final_hidden"].nbytes + allocated.peak <= plan.aux_capture


def fp8_of_whole_batch(aux: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fp8 encoding and its quality figure computed over the whole batch at once: stored, scales, max diff."""
    scales = (aux.float().abs().amax(dim=-1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    stored = (aux.float() / scales.unsqueeze(-1)).to(torch.float8_e4m3fn)
    per_token = (decode_aux(stored, scales, torch.bfloat16).float() - aux.float()).abs().amax(dim=-1)
    return stored, scales, torch.where(attention.bool(), per_token, 0.0).amax() if aux.shape[1] else None


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that equal NaNs compare equal."""
    return tensor.reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("shape", [(1, 0, 24), (1, 1, 24), (1, 17, 24), (3, 37, 40), (2, 1000, 24), (1, 33, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_aux_encoded_slice_by_slice_stores_what_the_whole_batch_would(shape, dtype):
    """Slices of tokens (some shorter than the others) store the bytes and report the figure the whole batch
    at once gives: zero, huge and tiny rows included, and infinities and NaNs in padding, which the figure skips."""
    torch.manual_seed(0)
    tokens = shape[1]
    aux = torch.randn(shape) * torch.logspace(-30, 30, tokens).reshape(1, -1, 1)
    attention = torch.ones(shape[:2], dtype=torch.long)
    attention[-1, (tokens + 1) // 2 :] = 0
    if tokens > 4:
        aux[0, 1], aux[0, 2] = 0.0, 1e-40
        aux[-1, -2, 0], aux[-1, -1, -1] = float("inf"), float("nan")
    aux = aux.to(dtype)
    stored, scales, max_diff = fp8_of_whole_batch(aux, attention)
    encoded = encode_aux(aux, "fp8")
    assert encoded["aux_hidden_states"].shape == stored.shape and encoded["aux_scales"].shape == scales.shape
    assert torch.equal(bits(encoded["aux_hidden_states"]), bits(stored)) and torch.equal(bits(encoded["aux_scales"]), bits(scales))
    if tokens:
        layout = Layout("probs", "bf16", "fp8", 64, 100, shape[-1], shape[-1])
        figure = quality_of_batch(layout, {"aux": aux, "attention": attention}, encoded)["aux_max_abs_diff"]
        assert torch.equal(bits(figure), bits(max_diff)) and figure.isfinite()


def batch_with_a_non_finite_sample(target_format: str, aux_dtype: str):
    """Three samples (the last padded): sample 1 goes NaN from its 4th token on, as a NaN embedding makes
    every later position of a causal model. (layout, live outputs, draft rows, which samples are finite)."""
    torch.manual_seed(0)
    batch, length, hidden, vocab = 3, 7, 8, 16
    attention = torch.ones(batch, length, dtype=torch.long)
    attention[2, 5:] = 0
    loss = attention.bool() & (torch.arange(length) > 0)
    final_hidden, aux = torch.randn(batch, length, hidden), torch.randn(batch, length, 3 * hidden)
    final_hidden[1, 3:], aux[1, 3:] = float("nan"), float("nan")
    draft_rows = torch.randn(vocab, hidden)
    positions = loss.flatten().nonzero().squeeze(-1)
    probs = torch.softmax(final_hidden.flatten(0, 1)[positions] @ draft_rows.T, dim=-1)
    live = {
        "aux": aux,
        "final_hidden": final_hidden,
        "attention": attention,
        "loss_positions": positions,
        "probs": probs,
        "argmax": probs.argmax(-1),
        "log_draft_mass": torch.zeros(len(positions)),
    }
    layout = Layout(target_format, "bf16", aux_dtype, 4, vocab, 3 * hidden, hidden)
    return layout, live, draft_rows, torch.tensor([True, False, True])


@pytest.mark.parametrize(("target_format", "aux_dtype"), [("topk", "fp8"), ("hidden", "bf16"), ("hidden", "fp8")])
def test_quality_figures_are_those_of_the_finite_samples_alone(target_format, aux_dtype):
    """The build stores only finite samples: their figures are the card's, whatever the others hold."""
    from helpers import assert_same_figures, quality_of_samples

    from builder.formats import merge_quality

    layout, live, draft_rows, finite = batch_with_a_non_finite_sample(target_format, aux_dtype)
    encoded = encode_aux(live["aux"], aux_dtype) | encode_targets(layout, live)
    figures = {k: v.tolist() for k, v in quality_of_batch(layout, live, encoded, draft_rows, finite=finite).items()}
    expected = quality_of_samples(layout, live, [0, 2], draft_rows)
    assert_same_figures(figures, expected)
    assert all(math.isfinite(v) for k, v in figures.items() if not k.endswith("_hist"))
    # a batch with no finite sample adds nothing, merged before or after the others
    none_kept = quality_of_batch(layout, live, encoded, draft_rows, finite=torch.zeros_like(finite))
    none_kept = {k: v.tolist() for k, v in none_kept.items()}
    assert merge_quality(none_kept, expected) == expected and merge_quality(expected, none_kept) == expected


def test_merged_extremes_do_not_depend_on_which_batch_holds_a_nan():
    from builder.formats import merge_quality

    finite, nan = {"aux_max_abs_diff": 0.5, "kept_mass_min": 0.5}, {"aux_max_abs_diff": math.nan, "kept_mass_min": math.nan}
    for merged in (merge_quality(finite, nan), merge_quality(nan, finite)):
        assert all(math.isnan(value) for value in merged.values())
