"""The dry run's size estimate comes from the layout itself: for every target format, aux dtype
and top-k id dtype it matches the tensor data a real uncompressed build of the same samples
writes, and with zstd it bounds what is stored. The start-up check weighs what this build's forward
produces against what its writer threads encode."""

from __future__ import annotations

import os
import re
import types

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from helpers import small_config
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from builder import plan as plan_module
from builder import shards
from builder.embedded import EMBEDDED_TARGETS
from builder.formats import TARGET_FORMATS, Layout
from builder.pipeline import build
from builder.plan import (
    ZSTD_RATIOS,
    ZSTD_RATIOS_FP32,
    encoder_mb_per_s,
    format_plan,
    forward_tokens_per_s,
    layout_sizes,
    plan_summary,
    warn_if_writer_holds_back,
    writer_feed_warning,
)
from builder.shards import PLANES_ZSTD, RAW, SCALAR_COLUMNS

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


# Two rows of 300 and 700 tokens, 100 and 250 of them loss-masked.
ROW_TOKENS, ROW_LOSS = np.array([300, 700]), np.array([100, 250])


def test_zstd_sizes_add_each_values_header_at_most_and_expect_each_columns_own_ratio():
    layout = Layout("probs", "bf16", "bf16", 8, 1000, 3 * 64, 64)
    # int32 ids, uint8 mask and bf16 aux per token; int32 argmax and bf16 probs per loss-masked token
    ids, mask, aux, argmax, probs = 1000 * 4, 1000 * 1, 1000 * 192 * 2, 350 * 4, 350 * 1000 * 2
    data = ids + mask + aux + argmax + probs
    assert data == 1_090_400
    assert layout_sizes(layout, ROW_TOKENS, ROW_LOSS, "none") == {"data": data, "at_most": data, "expected": data}
    sizes = layout_sizes(layout, ROW_TOKENS, ROW_LOSS, "zstd")
    # Each row's value of a zstd column (aux, argmax, probs; ids and mask stay raw): a 9-byte header and
    # 9 bytes per byte plane of its dtype.
    assert sizes["at_most"] == data + 2 * ((9 + 9 * 2) + (9 + 9 * 4) + (9 + 9 * 2)) == 1_090_598
    # The ids and mask as they are; the argmax at its format's ratio, as the probs.
    expected = ids + mask + aux / ZSTD_RATIOS["aux"] + (argmax + probs) / ZSTD_RATIOS["probs"]
    assert sizes == {"data": data, "at_most": 1_090_598, "expected": round(expected)}


def test_the_fp32_zstd_ratio_applies_to_fp32_aux_states_but_not_to_fp32_topk_columns():
    layout = Layout("topk", "fp32", "fp32", 8, 1000, 3 * 64, 64)
    # per token: int32 ids, uint8 mask, fp32 aux; per loss-masked token: int32 argmax, K fp32 log-probs, K int16 ids, fp32 log mass
    raw, aux, topk = 1000 * (4 + 1), 1000 * 192 * 4, 350 * (4 + 8 * 4 + 8 * 2 + 4)
    sizes = layout_sizes(layout, ROW_TOKENS, ROW_LOSS, "zstd")
    assert sizes["data"] == raw + aux + topk == 792_600
    assert sizes["expected"] == round(raw + aux / ZSTD_RATIOS_FP32 + topk / ZSTD_RATIOS["topk"])


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


def test_the_printed_ratio_is_the_reference_over_the_expected_cache_and_hidden_counts_its_head_file():
    sizes = {
        "probs": {"data": 1_600_000, "at_most": 1_600_200, "expected": 1_000_000},
        "topk": {"data": 400_000, "at_most": 400_300, "expected": 250_000},
        "hidden": {"data": 2_000_000, "at_most": 2_000_200, "expected": 1_500_000},
    }
    plan = {
        "valid_samples": 2,
        "skipped": {},
        "tokens": 1000,
        "loss_tokens": 350,
        "length_p50_p90_p99_max": [300, 660, 696, 700],
        "target_vocab_size": 32000,
        "draft_vocab_size": 1000,
        "draft_vocab_coverage": 0.9,
        "aux_layer_ids": [1, 2, 3],
        "shards": 1,
        "target_format": "probs",
        "compression": "zstd",
        "sizes": sizes,
        "head_file_bytes": 500_000,
        "reference_padded_dense": 10_000_000,
    }
    assert format_plan(plan).splitlines()[-5:] == [
        "    probs    at most 1.60 MB, expected 1.00 MB   (10.0x smaller than the reference)",
        "    topk     at most 0.40 MB, expected 0.25 MB   (40.0x smaller than the reference)",
        # 10 MB over the 1.5 MB of shards and the 0.5 MB head file
        "    hidden   at most 2.00 MB, expected 1.50 MB   (5.0x smaller than the reference)",
        "    hidden also writes vocab/lm_head.safetensors: 0.50 MB of fp32 head rows",
        "    reference padded dense layout 10.00 MB",
    ]


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


@pytest.mark.parametrize("arch", ["llama", "llama_tied"])
def test_the_forward_rate_counts_a_head_tied_to_the_embedding_once_as_the_head(arch):
    from tiny_targets import _config, tiny_tokenizer

    from builder.plan import FORWARD_UTILISATION, GPU_PEAK_BF16

    config = _config(arch, tiny_tokenizer())
    with torch.device("meta"):  # shapes only, the head tied as a loaded target's is
        model = AutoModelForCausalLM.from_config(config)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == config.tie_word_embeddings
    decoder = sum(p.numel() for p in model.model.layers.parameters()) + model.model.norm.weight.numel()
    head = config.vocab_size * config.hidden_size
    flops = 2 * decoder + 2 * head * 0.5
    peak = dict(GPU_PEAK_BF16)["H100"]
    assert forward_tokens_per_s(model, "NVIDIA H100 80GB HBM3", 0.5) == pytest.approx(peak * FORWARD_UTILISATION / flops, rel=1e-12)


@pytest.mark.parametrize("fields", [dict(num_experts=4), dict(num_experts_per_tok=2)], ids=["experts-only", "per-token-only"])
def test_a_config_naming_the_experts_or_how_many_a_token_runs_but_not_both_runs_every_parameter(fields):
    from tiny_targets import _config, tiny_tokenizer

    from builder.placement import meta_model
    from builder.plan import active_parameters

    config = _config("llama", tiny_tokenizer())
    config.update(fields)
    model = meta_model(config)
    assert active_parameters(model) == sum(p.numel() for p in model.parameters())


# ---- does the writer keep up with the forward? --------------------------------------------


def test_the_writer_warning_fires_just_past_the_writers_capacity_and_not_at_it():
    # 25,000 tokens/s x 64,000 bytes: 1,600 MB/s, what 4 threads of 400 MB/s encode
    at_capacity = dict(tokens_per_s=25_000, per_thread_mb_s=400, threads=4, cores=16, basis="test")
    assert writer_feed_warning(bytes_per_token=64_000, **at_capacity) is None
    message = writer_feed_warning(bytes_per_token=64_001, **at_capacity)
    assert "the build produces 1,600 MB/s" in message and "To keep the GPU busy: pass --writer-threads 5;" in message


def test_the_writer_warning_advises_as_many_threads_as_the_cores_and_no_more():
    need = dict(tokens_per_s=25_000, bytes_per_token=64_000, per_thread_mb_s=400, threads=2, basis="test")
    assert writer_feed_warning(cores=4, **need) == (
        "the shard writer will likely hold back the forward: at about 25,000 tokens/s (test) the build produces "
        "1,600 MB/s of tensor data (64,000 bytes per token before compression), while 2 writer thread(s) encode about "
        "800 MB/s here (400 MB/s each, measured at start-up). To keep the GPU busy: pass --writer-threads 4; or write "
        "less per token with --target-format topk and/or --aux-dtype fp8; or --compression none (no CPU cost, more disk)"
    )
    short = writer_feed_warning(cores=3, **need)
    assert "To keep the GPU busy: even 3 threads (this process's share of the cores) would not keep up;" in short


def test_the_writer_warning_suggests_no_compression_only_where_a_thread_encodes_under_1000_mb_s():
    need = dict(tokens_per_s=100_000, bytes_per_token=64_000, threads=2, cores=16, basis="test")
    slow, fast = writer_feed_warning(per_thread_mb_s=999, **need), writer_feed_warning(per_thread_mb_s=1000, **need)
    assert slow.endswith("--aux-dtype fp8; or --compression none (no CPU cost, more disk)")
    assert fast.endswith("--target-format topk and/or --aux-dtype fp8")


@pytest.mark.parametrize("compression, encoding", [("zstd", PLANES_ZSTD), ("none", RAW)])
def test_the_writer_speed_is_measured_with_the_encoding_the_build_writes(monkeypatch, compression, encoding):
    encodings, encode = [], shards.encode_value
    # The speed it returns does not show the encoding: record the one it measures.
    monkeypatch.setattr(shards, "encode_value", lambda values, encoding: encodings.append(encoding) or encode(values, encoding))
    layout = Layout("probs", "bf16", "bf16", 8, 1000, 3 * 64, 64)
    assert encoder_mb_per_s(layout, compression, seconds=0.0) > 0
    assert encodings == [encoding]


ENCODER_MB_S = {"zstd": 400.0, "none": 4000.0}  # a thread's speed per compression, as if measured


@pytest.mark.parametrize(
    "writer_threads, threads, compression",
    [(3, 3, "zstd"), (5, 5, "none"), (None, 8, "zstd")],
    ids=["3-threads-zstd", "5-threads-none", "default-threads"],
)
def test_the_writer_check_weighs_this_builds_samples_threads_compression_and_share_of_the_cores(
    monkeypatch, caplog, writer_threads, threads, compression
):
    from tiny_targets import _config, tiny_tokenizer

    from builder.placement import meta_model

    gpu = "NVIDIA H100 80GB HBM3"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)  # no GPU here: the one the target would run on
    monkeypatch.setattr(plan_module, "encoder_mb_per_s", lambda layout, compression: ENCODER_MB_S[compression])  # timing varies
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two build processes on the host: 8 cores each
    model = meta_model(_config("llama", tiny_tokenizer()))
    target = types.SimpleNamespace(device=torch.device("cuda"), model=model)
    prep = types.SimpleNamespace(  # what the check reads of a prepared build
        samples={"num_tokens": [300, 100], "num_loss_tokens": [100, 100]},  # half the tokens loss-masked
        layout=Layout("probs", "bf16", "bf16", 8, 1000, 3 * 64, 64),
        cfg=types.SimpleNamespace(writer_threads=writer_threads, compression=compression),
    )
    with caplog.at_level("WARNING", logger="builder.plan"):
        message = warn_if_writer_holds_back(prep, target)
    # per token: int32 id, uint8 mask, 192 bf16 aux; and half of the int32 argmax and 1000 bf16 probs
    bytes_per_token = 4 + 1 + 192 * 2 + 0.5 * (4 + 1000 * 2)
    assert "(1,391 bytes per token before compression)" in message
    speed = ENCODER_MB_S[compression]
    assert f"while {threads} writer thread(s) encode about {threads * speed:,.0f} MB/s here ({speed:,.0f} MB/s each" in message
    assert "even 8 threads (this process's share of the cores) would not keep up" in message
    assert message == writer_feed_warning(
        tokens_per_s=forward_tokens_per_s(model, gpu, 0.5),
        bytes_per_token=bytes_per_token,
        per_thread_mb_s=speed,
        threads=threads,
        cores=8,
        basis=f"estimated for {gpu} at 37% of its bf16 peak",
    )
    assert [r.getMessage() for r in caplog.records] == [message]
