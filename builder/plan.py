"""The dry-run plan and size estimates, from tokenized samples alone (no weights), and the
start-up check that the shard writer can keep up with the forward.

Sizes come from the layout itself (formats.Layout): each tensor column's bytes per token or
per loss-masked token, times the samples' token counts. They cover the shards' tensor data,
exactly as `--compression none` writes it; Parquet adds the scalar columns (id, source
index, length), a length prefix per value and a footer per shard. With `--compression zstd`
that figure plus each value's plane header (shards.max_added_bytes) is an upper bound, and
the expected size applies the ratios measured below."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time

import numpy as np

from .formats import TARGET_FORMATS, TORCH_DTYPES, Layout
from .vocab import vocab_coverage

log = logging.getLogger(__name__)
FLOAT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
TOPK_DEFAULT = 64
HEAD_FILE_BYTES = 4  # vocab/lm_head.safetensors holds fp32 rows (forward.write_head_rows)
# Raw bytes over stored bytes with --compression zstd, per part of a row, measured by
# benchmarks/format_sizes.py on the sample chats: a random-weight Llama (hidden 1024) and the embedded
# tiny target (aux 1.46-1.58, probs 1.44-1.67, topk 1.7-1.9, hidden 1.47-1.50).
# Real targets' activations and distributions differ: these are expectations, not bounds.
ZSTD_RATIOS = {"aux": 1.45, "probs": 1.55, "topk": 1.8, "hidden": 1.45}
ZSTD_RATIOS_FP32 = 1.15  # fp32: one of four byte planes compresses
COLUMN_PARTS = {
    "aux_hidden_states": "aux",
    "aux_scales": "aux",
    "target_probs": "probs",
    "topk_logprobs": "topk",
    "topk_ids": "topk",
    "log_draft_mass": "topk",
    "final_hidden": "hidden",
}


def zstd_ratio(part: str, dtype: str) -> float:
    return ZSTD_RATIOS_FP32 if dtype == "fp32" and part != "topk" else ZSTD_RATIOS[part]


def layout_sizes(layout: Layout, num_tokens: np.ndarray, num_loss: np.ndarray, compression: str) -> dict[str, int]:
    """Shard tensor bytes of one layout over these samples: `data` (the columns' own bytes, what
    `--compression none` stores), `at_most` (with zstd: plus each value's header, an upper bound)
    and `expected` (with zstd: ZSTD_RATIOS applied per column; without: the data)."""
    from .shards import RAW, column_encodings, max_added_bytes

    columns = layout.column_bytes(int(np.sum(num_tokens)), int(np.sum(num_loss)))
    encodings = column_encodings(layout, compression)
    specs, rows, data, at_most, expected = layout.columns(), len(num_tokens), 0, 0, 0.0
    for name, nbytes in columns.items():
        dtype = specs[name]["dtype"]
        data += nbytes
        at_most += nbytes + rows * max_added_bytes(TORCH_DTYPES[dtype].itemsize, encodings[name])
        part = COLUMN_PARTS.get(name, layout.target_format)  # target_argmax goes with its format
        expected += nbytes if encodings[name] == RAW else nbytes / zstd_ratio(part, dtype)
    return {"data": data, "at_most": at_most, "expected": min(round(expected), at_most)}


def format_sizes(layout: Layout, num_tokens: np.ndarray, num_loss: np.ndarray, compression: str) -> dict[str, dict[str, int]]:
    """`layout_sizes` for each target format, the layout's other settings (dtypes, K, widths) kept."""
    return {fmt: layout_sizes(dataclasses.replace(layout, target_format=fmt), num_tokens, num_loss, compression) for fmt in TARGET_FORMATS}


def reference_bytes(num_samples: int, *, seq_length: int, aux_width: int, draft_vocab: int, dtype: str) -> int:
    """NeMo Automodel precompute_eagle3: every sample padded to seq_length with int64
    input_ids/attention_mask/loss_mask, `[S, 3H]` aux, `[S, Vd]` probs, a bool mask."""
    b = FLOAT_BYTES[dtype]
    return num_samples * seq_length * (3 * 8 + aux_width * b + draft_vocab * b + 1)


def estimate_sizes(
    num_tokens: np.ndarray,
    num_loss: np.ndarray,
    *,
    aux_width: int,
    hidden_size: int,
    draft_vocab: int,
    dtype: str,
    seq_length: int,
    topk: int = TOPK_DEFAULT,
    aux_dtype: str | None = None,
    compression: str = "none",
) -> dict[str, int]:
    """Shard tensor bytes per target format (exact uncompressed; with zstd, expected from
    ZSTD_RATIOS), the head rows a `hidden` cache writes besides (`hidden_head`), and the
    reference's padded dense layout."""
    layout = Layout("probs", dtype, aux_dtype or dtype, min(topk, draft_vocab), draft_vocab, aux_width, hidden_size)
    sizes = {fmt: s["expected"] for fmt, s in format_sizes(layout, num_tokens, num_loss, compression).items()}
    ref = reference_bytes(len(num_tokens), seq_length=seq_length, aux_width=aux_width, draft_vocab=draft_vocab, dtype=dtype)
    return sizes | {"hidden_head": head_file_bytes(layout, draft_vocab, False), "reference_padded_dense": ref}


def head_file_bytes(layout: Layout, vocab_size: int, store_full_head: bool) -> int:
    """Tensor bytes of a `hidden` cache's vocab/lm_head.safetensors: the draft rows, and every
    row with --store-full-head (a head bias, where the target has one, adds its vocab_size floats)."""
    rows = layout.draft_vocab_size + (vocab_size if store_full_head else 0)
    return rows * layout.hidden_size * HEAD_FILE_BYTES


def plan_summary(prep) -> dict:
    samples = prep.samples
    num_tokens = np.asarray(samples["num_tokens"], dtype=np.int64)
    num_loss = np.asarray(samples["num_loss_tokens"], dtype=np.int64)
    layout = prep.layout
    aux_width = layout.aux_width
    pct = np.percentile(num_tokens, [50, 90, 99]).astype(int).tolist() if len(num_tokens) else [0, 0, 0]
    return {
        "valid_samples": len(num_tokens),
        "skipped": prep.skipped,
        "duplicate_ids": prep.duplicate_ids,
        "tokens": int(num_tokens.sum()),
        "loss_tokens": int(num_loss.sum()),
        "length_p50_p90_p99_max": [*pct, int(num_tokens.max()) if len(num_tokens) else 0],
        "target_vocab_size": prep.vocab_size,
        "draft_vocab_size": len(prep.selected_token_ids),
        "draft_vocab_coverage": vocab_coverage(prep.token_counts, prep.selected_token_ids),
        "aux_layer_ids": prep.aux_layer_ids,
        "shards": prep.num_shards,
        "target_format": layout.target_format,
        "sizes": format_sizes(layout, num_tokens, num_loss, prep.cfg.compression),
        "head_file_bytes": head_file_bytes(layout, prep.vocab_size, prep.cfg.store_full_head),
        "reference_padded_dense": reference_bytes(
            len(num_tokens), seq_length=prep.cfg.seq_length, aux_width=aux_width, draft_vocab=layout.draft_vocab_size, dtype=prep.cfg.dtype
        ),
        "compression": prep.cfg.compression,
        "memory": memory_estimate(prep),
    }


def memory_estimate(prep) -> str:
    """The placement planner's per-GPU estimate (bf16 weights, as a GPU build runs them)."""
    from .placement import memory_plan

    return memory_plan(prep, dtype_bytes=2).describe()


def format_plan(plan: dict) -> str:
    sizes, ref = plan["sizes"], plan["reference_padded_dense"]
    zstd = plan.get("compression") == "zstd"
    lines = [
        "Build plan (dry run: nothing written)",
        f"  valid samples        {plan['valid_samples']:,}",
        f"  skipped rows         {sum(plan['skipped'].values()):,} {plan['skipped'] or ''}",
        f"  tokens               {plan['tokens']:,}",
        f"  loss-masked tokens   {plan['loss_tokens']:,}",
        "  length p50/p90/p99/max  " + "/".join(str(x) for x in plan["length_p50_p90_p99_max"]),
        f"  vocab                target {plan['target_vocab_size']:,}, draft {plan['draft_vocab_size']:,}",
        f"  draft-vocab coverage {plan['draft_vocab_coverage']:.2%} of loss-masked tokens",
        f"  aux layers           {plan['aux_layer_ids']}",
        f"  shards               {plan['shards']}",
        f"  target format        {plan['target_format']} (the other formats' sizes below for comparison)",
        "  estimated cache size, the shards' tensor data (Parquet adds a few bytes per row and a footer per shard)"
        + (
            ":\n    with zstd: at most = the uncompressed bytes and each value's header (an upper bound); "
            "expected = ratios measured on a random-weight target (real activations differ)"
            if zstd
            else ", uncompressed (exact):"
        ),
    ]
    for name, size in sizes.items():
        total = size["expected"] + (plan.get("head_file_bytes", 0) if name == "hidden" else 0)
        ratio = ref / total if total else float("inf")
        if zstd:
            figure = f"at most {size['at_most'] / 1e6:,.2f} MB, expected {size['expected'] / 1e6:,.2f} MB"
        else:
            figure = f"{size['data'] / 1e6:12,.2f} MB"
        lines.append(f"    {name:8s} {figure}   ({ratio:,.1f}x smaller than the reference)")
    if "head_file_bytes" in plan:
        lines.append(f"    hidden also writes vocab/lm_head.safetensors: {plan['head_file_bytes'] / 1e6:,.2f} MB of fp32 head rows")
    lines.append(f"    reference padded dense layout {ref / 1e6:,.2f} MB")
    if "memory" in plan:
        lines.append(f"  GPU memory (bf16)    {plan['memory']}")
    return "\n".join(lines)


# ---- does the writer keep up with the forward? --------------------------------------------

# Dense bf16 tensor-core peak FLOP/s by GPU name (the first match wins).
GPU_PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("B100", 1750e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("A10", 125e12),
    ("L4", 121e12),
)
# The share of that peak a Hugging Face forward reaches: an 8B target forwards about 25k tokens/s
# on one H100 (14.8 GFLOP per token at 77% loss-masked tokens: 0.37 x 989 TFLOP/s).
FORWARD_UTILISATION = 0.37
CALIBRATION_BYTES = 16 << 20


def forward_tokens_per_s(model, gpu_name: str, loss_share: float) -> float | None:
    """Estimated forward tokens/s of one replica: 2 FLOPs per active decoder parameter per token plus the
    head at loss-masked positions, at FORWARD_UTILISATION of the GPU's peak; a target split over
    N GPUs (device map) runs one GPU at a time, so no faster than one. None for an unknown GPU."""
    peak = next((flops for name, flops in GPU_PEAK_BF16 if name in gpu_name), None)
    if peak is None:
        return None
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    total = active_parameters(model)
    decoder = total - embedding.weight.numel() - (head.weight.numel() if head.weight is not embedding.weight else 0)
    flops = 2 * decoder + 2 * head.weight.numel() * loss_share
    return peak * FORWARD_UTILISATION / flops


def active_parameters(model) -> int:
    """Parameters one token runs through: of a mixture of experts, num_experts_per_tok of the E
    routed experts (modules named `experts`; shared experts and routers always run)."""
    from .target import EXPERT_COUNT_FIELDS, text_config

    config = text_config(model.config)
    experts = next((getattr(config, field) for field in EXPERT_COUNT_FIELDS if getattr(config, field, None)), None)
    per_token = getattr(config, "num_experts_per_tok", None)
    total = sum(p.numel() for p in model.parameters())
    if not experts or not per_token:
        return total
    routed = sum(p.numel() for name, module in model.named_modules() if name.rsplit(".", 1)[-1] == "experts" for p in module.parameters())
    return total - routed + routed * min(per_token, experts) // experts


def encoder_mb_per_s(layout, compression: str, seconds: float = 0.05) -> float:
    """Raw tensor MB/s one writer thread encodes here, measured on activation-like data: the
    aux states' dtype, per-channel scales, in the layout's aux width."""
    import torch

    from .formats import TORCH_DTYPES
    from .shards import PLANES_ZSTD, RAW, encode_value

    encoding = PLANES_ZSTD if compression == "zstd" else RAW
    gen = torch.Generator().manual_seed(0)
    width = max(layout.aux_width, 1)
    rows = max(1, CALIBRATION_BYTES // (width * 2))
    scales = torch.rand(width, generator=gen) * 4
    values = (torch.randn(rows, width, generator=gen) * scales).to(TORCH_DTYPES[layout.aux_dtype])
    nbytes, best, start = values.numel() * values.element_size(), math.inf, time.perf_counter()
    while time.perf_counter() - start < seconds or best == math.inf:
        began = time.perf_counter()
        encoded = encode_value(values, encoding)
        b"".join(encoded.parts)  # the copy into the row group's buffer
        best = min(best, time.perf_counter() - began)
    return nbytes / best / 1e6


def writer_feed_warning(
    *, tokens_per_s: float, bytes_per_token: float, per_thread_mb_s: float, threads: int, cores: int, basis: str
) -> str | None:
    """The start-up warning when the writer's threads cannot encode what the forward produces, or None."""
    need = tokens_per_s * bytes_per_token / 1e6
    capacity = per_thread_mb_s * threads
    if need <= capacity:
        return None
    wanted = math.ceil(need / per_thread_mb_s)
    advice = (
        f"pass --writer-threads {wanted}"
        if wanted <= cores
        else f"even {cores} threads (this process's share of the cores) would not keep up"
    )
    return (
        f"the shard writer will likely hold back the forward: at about {tokens_per_s:,.0f} tokens/s ({basis}) the "
        f"build produces {need:,.0f} MB/s of tensor data ({bytes_per_token:,.0f} bytes per token before compression), "
        f"while {threads} writer thread(s) encode about {capacity:,.0f} MB/s here ({per_thread_mb_s:,.0f} MB/s each, "
        f"measured at start-up). To keep the GPU busy: {advice}; or write less per token with --target-format topk "
        "and/or --aux-dtype fp8" + ("; or --compression none (no CPU cost, more disk)" if per_thread_mb_s < 1000 else "")
    )


def warn_if_writer_holds_back(prep, target) -> str | None:
    """Log a warning (and return it) when this build's own estimate says the writer will make the GPU wait."""
    import torch

    from .writer import default_writer_threads

    if target.device.type != "cuda":
        return None  # a CPU forward is far slower than any writer
    samples = prep.samples
    tokens, loss = sum(samples["num_tokens"]), sum(samples["num_loss_tokens"])
    loss_share = loss / tokens if tokens else 0.0
    gpu = torch.cuda.get_device_name(target.device)
    rate = forward_tokens_per_s(target.model, gpu, loss_share)
    if rate is None:
        log.info("writer check skipped: no peak FLOP/s known for %s", gpu)
        return None
    per_token, per_loss = prep.layout.bytes_per_position()
    threads = prep.cfg.writer_threads or default_writer_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    message = writer_feed_warning(
        tokens_per_s=rate,
        bytes_per_token=per_token + loss_share * per_loss,
        per_thread_mb_s=encoder_mb_per_s(prep.layout, prep.cfg.compression),
        threads=threads,
        cores=max(1, (os.cpu_count() or 1) // max(local, 1)),
        basis=f"estimated for {gpu} at {FORWARD_UTILISATION:.0%} of its bf16 peak",
    )
    if message:
        log.warning(message)
    return message
