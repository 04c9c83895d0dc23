"""Cached == live: what the reader yields equals the supervision rule applied to a fresh forward
of the target (its own `forward` logits, logit terms included), for every supported architecture.

The reference rule is written out here from docs/supervision.md, not taken from the builder, so a wrong rule
in the builder cannot agree with itself.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from helpers import decoded_rows, small_config
from tiny_targets import (
    ARCHITECTURES,
    _init_weights,
    _text_settings,
    make_tiny_target,
    tiny_tokenizer,
)
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    FalconH1Config,
    Gemma2Config,
    GraniteConfig,
    HyperCLOVAXConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PhiConfig,
)

from builder.errors import HeadMismatch
from builder.pipeline import build
from builder.reader import load_cache, read_manifest, read_vocab


def reference_supervision(logits: torch.Tensor, loss: torch.Tensor, selected: torch.Tensor):
    """docs/supervision.md: softmax over the draft columns (in `selected` order) in fp32, zero off the loss
    mask; supervised where the FULL-vocab argmax is a draft token."""
    probs = torch.softmax(logits.float()[..., selected], dim=-1)
    probs = torch.where(loss.bool().unsqueeze(-1), probs, torch.zeros_like(probs))
    return probs, loss.bool() & torch.isin(logits.argmax(dim=-1), selected)


def live_nemo(model, aux_layer_ids, selected, input_ids, loss_mask, store_dtype):
    """The NeMo-layout sample an online trainer would compute: one fresh forward, full logits."""
    ids = torch.as_tensor(input_ids).long()[None]
    loss = torch.as_tensor(loss_mask).bool()[None]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    probs, position_mask = reference_supervision(out.logits, loss, selected)
    aux = torch.cat([out.hidden_states[i + 1] for i in aux_layer_ids], dim=-1)[0]

    def shift(t):
        return torch.cat([t[1:], t.new_zeros((1, *t.shape[1:]))])

    return {
        "input_ids": shift(ids[0]),
        "attention_mask": torch.ones(ids.shape[1], dtype=torch.long),
        "loss_mask": shift(loss[0].long()),
        "aux_hidden_states": aux.to(store_dtype),
        "target_probs": shift(probs[0]).to(store_dtype),
        "position_mask": shift(position_mask[0]).unsqueeze(-1),
    }


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_equals_live_fp32(tmp_path, arch):
    target = make_tiny_target(tmp_path / "target", arch)
    # batch_size 1: each live forward sees exactly the batch the builder ran.
    cfg = small_config(tmp_path / "cache", target, batch_size=1, max_tokens_per_batch=96, aux_layer_ids=(0, 2, 4))
    result = build(cfg, progress=False)
    assert len(result.prepared.samples) == 14
    check_against_live(result, target, torch.float32)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_equals_live_cast_to_bf16(tmp_path, arch):
    target = make_tiny_target(tmp_path / "target", arch)
    cfg = small_config(tmp_path / "cache", target, batch_size=1, max_tokens_per_batch=96, dtype="bf16", aux_layer_ids=(0, 2, 4))
    result = build(cfg, progress=False)
    check_against_live(result, target, torch.bfloat16)


def check_against_live(result, target, store_dtype, cached=None, selected=None, probs_tolerance=None):
    """Every cached sample equals the live one: exactly, or `target_probs` within `probs_tolerance`
    (rtol, atol) for formats that recompute them at read time."""
    prep = result.prepared
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    if selected is None:
        selected = read_vocab(result.output_dir)["selected_token_ids"]
        assert torch.equal(selected, torch.as_tensor(prep.selected_token_ids))
    cached = decoded_rows(result.output_dir, layout="nemo") if cached is None else cached
    assert len(cached) == len(prep.samples) > 0
    supervised = 0
    for sample, got in zip(prep.samples, cached):
        want = live_nemo(model, prep.aux_layer_ids, selected, sample["input_ids"], sample["loss_mask"], store_dtype)
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype, key
            if key == "target_probs" and probs_tolerance is not None:
                torch.testing.assert_close(got[key], want[key], rtol=probs_tolerance[0], atol=probs_tolerance[1])
            else:
                assert torch.equal(got[key], want[key]), f"{key} of sample {sample['sample_id']}"
        supervised += int(got["position_mask"].sum())
    assert supervised > 0  # the comparison covered real supervision, not only zeros
    return model


def test_padded_batches_match_single_sample_forwards(tmp_path):
    """Token-budget batching with right padding changes nothing but float rounding."""
    single = build(small_config(tmp_path / "single", batch_size=1, max_tokens_per_batch=96), progress=False)
    batched = build(small_config(tmp_path / "batched", batch_size=8, max_tokens_per_batch=8 * 96), progress=False)
    for a, b in zip(decoded_rows(single.output_dir), decoded_rows(batched.output_dir)):
        assert a["sample_id"] == b["sample_id"]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["loss_mask"], b["loss_mask"])
        torch.testing.assert_close(a["aux_hidden_states"], b["aux_hidden_states"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a["target_probs"], b["target_probs"], rtol=1e-4, atol=1e-6)


# ---- logit terms after lm_head --------------------------------------------------------------

# Each family's term, set far from neutral so that it shapes the tiny models' supervision.
HEAD_TERM_TARGETS = {
    "gemma2": (
        lambda tok: Gemma2Config(**_text_settings(tok, final_logit_softcapping=5.0, sliding_window=16)),
        {"final_logit_softcapping": 5.0},
    ),  # tanh(z / 5) * 5
    "granite": (lambda tok: GraniteConfig(**_text_settings(tok, logits_scaling=4.0)), {"logits_scaling": 4.0}),  # z / 4
    "cohere": (lambda tok: CohereConfig(**_text_settings(tok, logit_scale=0.25)), {"logit_scale": 0.25}),  # z * 0.25
    "falcon_h1": (
        lambda tok: FalconH1Config(
            **_text_settings(
                tok, lm_head_multiplier=0.5, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=16
            )
        ),
        {"lm_head_multiplier": 0.5},
    ),  # z * 0.5
    # muP: HyperCLOVA X multiplies by its logits_scaling where Granite divides, so it is recorded as a scale
    "hyperclovax": (lambda tok: HyperCLOVAXConfig(**_text_settings(tok, logits_scaling=0.5)), {"logit_scale": 0.5}),
}
FEW = {"batch_size": 1, "max_tokens_per_batch": 96, "max_samples": 6, "shard_size": 6, "aux_layer_ids": (0, 2, 4)}
HIDDEN_REBUILD_TOLERANCE = (1e-5, 1e-7)  # probs recomputed at read time by another matmul shape


def save_target(directory, config, head_bias_std: float | None = None):
    """A tiny random target of any config, saved with the embedded tokenizer (as tiny_targets does)."""
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _init_weights(model, 0)
    if head_bias_std is not None:
        with torch.no_grad():
            bias = model.get_output_embeddings().bias
            bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(1)) * head_bias_std)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def bare_head_differs(model, sample, selected) -> float:
    """How far the supervision of lm_head alone (no term, no bias) is from the model's: the premise
    that a build dropping the term would fail the comparisons."""
    ids = torch.as_tensor(sample["input_ids"])[None]
    loss = torch.as_tensor(sample["loss_mask"]).bool()[None]
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state
        bare = hidden @ model.get_output_embeddings().weight.T
        full = model(input_ids=ids).logits
    return float((reference_supervision(bare, loss, selected)[0] - reference_supervision(full, loss, selected)[0]).abs().max())


@pytest.mark.parametrize("arch", HEAD_TERM_TARGETS)
def test_logit_terms_reach_the_cache(tmp_path, arch):
    make_config, recorded = HEAD_TERM_TARGETS[arch]
    target = save_target(tmp_path / "target", make_config(tiny_tokenizer()))
    probs = build(small_config(tmp_path / "probs", target, **FEW), progress=False)
    model = check_against_live(probs, target, torch.float32)  # bit for bit: the build's head path
    hidden = build(small_config(tmp_path / "hidden", target, target_format="hidden", **FEW), progress=False)
    check_against_live(hidden, target, torch.float32, probs_tolerance=HIDDEN_REBUILD_TOLERANCE)  # the reader's rebuild
    head_transform = read_manifest(hidden.output_dir)["head_transform"]
    assert {k: v for k, v in head_transform.items() if v is not None} == recorded
    selected = read_vocab(probs.output_dir)["selected_token_ids"]
    assert bare_head_differs(model, probs.prepared.samples[0], selected) > 0.02


def test_hidden_cache_applies_the_lm_head_bias(tmp_path):
    """Phi's lm_head has a bias: the hidden format stores it and adds it when it rebuilds logits."""
    from safetensors.torch import load_file

    from builder.vocab import select_draft_vocab

    config = PhiConfig(**{k: v for k, v in _text_settings(tiny_tokenizer()).items() if k != "head_dim"})
    target = save_target(tmp_path / "target", config, head_bias_std=1.0)
    cfg = small_config(tmp_path / "cache", target, target_format="hidden", store_full_head=True, **FEW)
    result = build(cfg, progress=False)
    manifest = read_manifest(result.output_dir)
    assert manifest["head_transform"]["lm_head_bias"] is True
    model = check_against_live(result, target, torch.float32, probs_tolerance=HIDDEN_REBUILD_TOLERANCE)
    assert torch.equal(load_file(result.output_dir / "vocab" / "lm_head.safetensors")["bias"], model.lm_head.bias)
    vocab = read_vocab(result.output_dir)
    assert bare_head_differs(model, result.prepared.samples[0], vocab["selected_token_ids"]) > 0.02
    # another draft vocabulary, from the full head: the bias follows the new columns
    smaller = torch.as_tensor(select_draft_vocab(vocab["token_counts"].numpy(), 150, manifest["special_token_ids"]))
    rows = list(load_cache(result.output_dir, layout="nemo", draft_vocab_size=150))
    check_against_live(result, target, torch.float32, cached=rows, selected=smaller, probs_tolerance=HIDDEN_REBUILD_TOLERANCE)


class CustomHeadForCausalLM(LlamaForCausalLM):
    """Custom code whose forward applies terms no config key names: an output multiplier and a
    per-token bias added after lm_head (as BART's final_logits_bias)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        bias = torch.linspace(-1.0, 1.0, out.logits.shape[-1], device=out.logits.device) * self.config.extra_bias
        out.logits = out.logits * self.config.extra_multiplier + bias
        return out


CUSTOM_HEAD_CODE = "import torch\nfrom transformers import LlamaForCausalLM\n\n\n" + inspect.getsource(CustomHeadForCausalLM)


@pytest.mark.parametrize(
    "term", [{"extra_multiplier": 0.5, "extra_bias": 0.0}, {"extra_multiplier": 1.0, "extra_bias": 2.0}], ids=["multiplier", "bias"]
)
def test_a_logit_term_the_head_path_misses_is_refused_before_anything_is_written(tmp_path, term):
    target = save_target(tmp_path / "target", LlamaConfig(**_text_settings(tiny_tokenizer())))
    (target / "modeling_custom_head.py").write_text(CUSTOM_HEAD_CODE)
    config = json.loads((target / "config.json").read_text())
    config |= term | {"auto_map": {"AutoModelForCausalLM": "modeling_custom_head.CustomHeadForCausalLM"}}
    (target / "config.json").write_text(json.dumps(config))
    out = tmp_path / "cache"
    with pytest.raises(
        HeadMismatch,
        match=r"(?s)(?=.*llama \(CustomHeadForCausalLM\))(?=.*\(lm_head\))(?=.*by up to \d)(?=.*tolerance [\d.e+-]+ for float32)",
    ):
        build(small_config(out, target, trust_remote_code=True, **FEW), progress=False)
    assert not (out / "data").exists() and not (out / "README.md").exists()


def test_head_check_tolerates_bf16_rounding_yet_catches_a_missing_term():
    """In bf16 the two computations of the logits differ by rounding only: every family with a
    known term passes, while a term the head path misses (custom code) is still refused."""
    from builder.target import Target

    tok = tiny_tokenizer()
    probe = torch.arange(5, 69)[None]
    for arch, (make_config, _) in HEAD_TERM_TARGETS.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(make_config(tok), dtype=torch.float32)
        _init_weights(model, 0)
        target = Target(model.to(torch.bfloat16).eval(), [1, 2, 4])
        assert target.check_head(probe) <= 4 * torch.finfo(torch.bfloat16).eps, arch
        target.close()
    config = LlamaConfig(**_text_settings(tok), extra_multiplier=0.8, extra_bias=0.0)  # a milder term than above
    torch.manual_seed(0)
    model = CustomHeadForCausalLM(config)
    _init_weights(model, 0)
    with pytest.raises(HeadMismatch, match=r"(?s)(?=.*llama \(CustomHeadForCausalLM\))(?=.*tolerance [\d.e+-]+ for bfloat16)"):
        Target(model.to(torch.bfloat16).eval(), [1, 2, 4]).check_head(probe)
