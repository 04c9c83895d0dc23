"""The dry run's size estimate comes from the layout itself: for every target format, aux dtype
and top-k id dtype it matches the tensor data a real uncompressed build of the same samples
writes, and with zstd it bounds what is stored."""

from __future__ import annotations

import re

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers import small_config
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from builder.embedded import EMBEDDED_TARGETS
from builder.formats import TARGET_FORMATS
from builder.pipeline import build
from builder.plan import plan_summary
from builder.shards import SCALAR_COLUMNS

FEW = dict(max_samples=5, shard_size=3, seq_length=64, batch_size=5)
# (case, settings): every target format, every aux dtype (fp8 with its scales), both top-k value dtypes.
CASES = [
    ("probs-fp16", dict(target_format="probs", dtype="fp16")),
    ("topk-fp16-aux-fp8", dict(target_format="topk", dtype="fp16", aux_dtype="fp8", topk=8)),
    ("topk-fp32-aux-bf16", dict(target_format="topk", dtype="fp32", aux_dtype="bf16", topk=5)),
    ("hidden-bf16-aux-fp8", dict(target_format="hidden", dtype="bf16", aux_dtype="fp8")),
    ("hidden-fp32-full-head", dict(target_format="hidden", dtype="fp32", store_full_head=True)),
]


def shard_tensor_bytes(cache_dir) -> dict[str, int]:
    """Bytes of each tensor column's values over all shards (Parquet's own framing left out)."""
    totals: dict[str, int] = {}
    for path in sorted((cache_dir / "data").glob("*.parquet")):
        table = pq.read_table(path)
        for name in table.column_names:
            if name not in SCALAR_COLUMNS:
                totals[name] = totals.get(name, 0) + pc.sum(pc.binary_length(table[name])).as_py()
    return totals


def estimate_and_build(out, target="tiny-llama", dry_run_first=False, **settings):
    """The plan and the build of the same samples. The plan is the dry run's (`plan_summary` of
    the prepared samples); `dry_run_first` runs a dry run of its own first, as the CLI would."""
    cfg = small_config(out, target, compression="none", **FEW, **settings)
    dry = plan_summary(build(cfg.replace(dry_run=True), progress=False).prepared) if dry_run_first else None
    result = build(cfg, progress=False)
    plan = plan_summary(result.prepared)
    if dry is not None:
        assert dry["sizes"] == plan["sizes"]
    return plan, result


def assert_estimate_matches(plan, result):
    real = shard_tensor_bytes(result.output_dir)
    layout = result.prepared.layout
    assert set(real) == set(layout.columns())
    estimate = plan["sizes"][layout.target_format]["data"]
    assert abs(estimate - sum(real.values())) <= 0.05 * sum(real.values())
    # Column by column it is exact: the layout that writes the columns also sizes them.
    totals = result.manifest["totals"]
    assert layout.column_bytes(totals["tokens"], totals["loss_tokens"]) == real
    assert estimate == sum(real.values())


@pytest.mark.parametrize("case, settings", CASES, ids=[c for c, _ in CASES])
def test_dry_run_estimate_matches_an_uncompressed_build(tmp_path, case, settings):
    plan, result = estimate_and_build(tmp_path / case, dry_run_first=case == CASES[0][0], **settings)
    assert set(plan["sizes"]) == set(TARGET_FORMATS)
    assert_estimate_matches(plan, result)
    if settings["target_format"] == "hidden":
        with safe_open(result.output_dir / "vocab" / "lm_head.safetensors", framework="pt") as f:
            head = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] * 4 for k in f.keys())
        assert plan["head_file_bytes"] == head


def test_int32_topk_ids_are_sized_as_written(tmp_path):
    """A target vocabulary over 32767 tokens stores int32 top-k ids."""
    target = tmp_path / "wide-vocab"
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_TARGETS["tiny-llama"])
    model.resize_token_embeddings(33_000)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(EMBEDDED_TARGETS["tiny-llama"]).save_pretrained(target)
    plan, result = estimate_and_build(tmp_path / "cache", target, target_format="topk", topk=4, draft_vocab_size=None)
    assert result.prepared.layout.topk_id_dtype == "int32"
    assert_estimate_matches(plan, result)


def test_zstd_estimate_is_an_upper_bound(tmp_path):
    result = build(small_config(tmp_path / "zstd", compression="zstd", dtype="bf16", **FEW), progress=False)
    plan = plan_summary(result.prepared)
    stored = sum(shard_tensor_bytes(result.output_dir).values())
    size = plan["sizes"]["probs"]
    assert size["expected"] <= size["at_most"] and stored <= size["at_most"]
    assert stored < size["data"]  # it did compress, so the bound is not the stored size itself


def test_dry_run_prints_the_sizes_of_the_settings_given(tmp_path, capsys):
    """--topk, --aux-dtype fp8 and the hidden format's argmax reach the printed estimate."""
    from builder.cli import main
    from builder.config import BuildConfig
    from builder.prepare import prepare

    argv = ["build", "--dry-run", "--quiet", "--max-samples", "40", "--output-dir", str(tmp_path / "out")]
    argv += ["--target-format", "topk", "--topk", "8", "--aux-dtype", "fp8"]
    assert main([*argv, "--compression", "none"]) == 0
    text = capsys.readouterr().out
    prep = prepare(BuildConfig(target_model="tiny-llama", input_data="sample-chats", output_dir=str(tmp_path / "out"), max_samples=40))
    tokens, loss = sum(prep.samples["num_tokens"]), sum(prep.samples["num_loss_tokens"])
    # per token: int32 id, uint8 mask, 3 x 64 fp8 aux, its fp32 scale; per loss-masked token: the int32 argmax and ...
    per_token, argmax = 4 + 1 + 192 + 4, 4
    topk = tokens * per_token + loss * (argmax + 8 * 2 + 8 * 2 + 4)  # ... K fp16 log-probs, K int16 ids, fp32 log mass
    hidden = tokens * (per_token + 64 * 2) + loss * argmax  # ... and a bf16 final hidden state per token
    assert f"    {'topk':8s} {topk / 1e6:12,.2f} MB" in text
    assert f"    {'hidden':8s} {hidden / 1e6:12,.2f} MB" in text
    assert "  target format        topk (" in text and ", uncompressed (exact):" in text

    assert main(argv) == 0  # zstd: the uncompressed figure and each value's header bound what is stored
    text = capsys.readouterr().out
    assert "with zstd: at most = the uncompressed bytes and each value's header (an upper bound)" in text
    rows = len(prep.samples["num_tokens"])
    compressed_topk_columns = [1, 2, 2, 4, 4]  # bytes per element of aux, log-probs, ids, log mass, argmax
    # each value of a zstd column: a 9-byte header and 9 bytes per byte plane
    at_most = topk + rows * sum(9 + 9 * k for k in compressed_topk_columns + [4])  # + the aux scales
    assert re.search(rf"^    topk     at most {at_most / 1e6:,.2f} MB, expected [\d.]+ MB ", text, re.M)


@pytest.mark.parametrize(
    "arch, experts_field, expert_width",
    [("qwen3_moe", "num_experts", "moe_intermediate_size"), ("mixtral", "num_local_experts", "intermediate_size")],
)
def test_the_forward_rate_of_a_mixture_of_experts_counts_the_experts_a_token_runs(arch, experts_field, expert_width):
    """Each token runs num_experts_per_tok of the E experts of a layer: the FLOPs per token, and so the
    rate the writer must keep up with, follow the active parameters, not all of them."""
    from tiny_targets import _config, tiny_tokenizer

    from builder.placement import meta_model
    from builder.plan import FORWARD_UTILISATION, GPU_PEAK_BF16, active_parameters, forward_tokens_per_s

    config = _config(arch, tiny_tokenizer())
    model = meta_model(config)
    total = sum(p.numel() for p in model.parameters())
    experts, k = getattr(config, experts_field), config.num_experts_per_tok
    assert (experts, k) == (4, 2)
    # gate, up and down projections of every expert of every layer, of which k / E run per token
    routed = config.num_hidden_layers * experts * 3 * config.hidden_size * getattr(config, expert_width)
    assert active_parameters(model) == total - routed + routed * k // experts
    embedding, head = model.get_input_embeddings().weight.numel(), model.get_output_embeddings().weight.numel()
    flops = 2 * (total - routed * (experts - k) // experts - embedding - head) + 2 * head * 0.5
    peak = dict(GPU_PEAK_BF16)["H100"]
    assert forward_tokens_per_s(model, "NVIDIA H100 80GB HBM3", 0.5) == pytest.approx(peak * FORWARD_UTILISATION / flops, rel=1e-12)


def test_a_dense_target_runs_every_parameter():
    from tiny_targets import _config, tiny_tokenizer

    from builder.placement import meta_model
    from builder.plan import active_parameters

    model = meta_model(_config("llama", tiny_tokenizer()))
    assert active_parameters(model) == sum(p.numel() for p in model.parameters())
