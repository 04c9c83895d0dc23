"""End-to-end build throughput against the bare target forward on the same batches.

For each target, in one process:

  bare     the target alone on exactly the batches the build runs (reproduced with the build's
           own `shard_windows` + `plan_batches` + `pad_batch` over the same prepared samples),
           timed as `model(input_ids, attention_mask)` (the plain Hugging Face forward, logits at
           every position: THE denominator of the acceptance ratio), and as diagnostics
           `Target.forward` (decoder + aux hooks, no head) and `Target.supervise` (what the build
           computes per batch: forward, lm_head at loss positions, supervision).
  build    `builder.build()`, timed from the start of the first forward
           (`Target.supervise`, wrapped) to the publication of the last shard
           (`ShardWriter.publish`, wrapped): model loading, tokenization, card and vocab files
           are left out. Everything in between counts: padding, the forward, encoding, the
           quality report, device->host copies, the background writer and its queue, and the
           drain of the last window after the last forward.

The ratio is build tokens/s over bare tokens/s (real tokens, padding excluded, the same
numerator for both): 1.0 means the build costs nothing beyond the forward. Passes alternate,
bare, build, bare, ..., build, bare (`--repeats` builds, default 4), after one untimed warm-up
batch. Two figures: the fastest bare pass over the fastest build, which damps other processes'
noise on a shared machine, and the median over the builds of each build against the mean of the
bare passes on either side of it (with the range), which follows the machine's drift. The spread
of the bare passes shows how much the machine drifted.

Row groups: 8 MiB here (`--row-group-bytes`; the builder's default is 128 MiB), sort windows
32 MiB (`--sort-window-bytes`; the builder's default is 4 GiB). The writer writes a window while
the forward computes the next; only the last window is written after the last forward (the
"drain tail"). In a long build that tail is one window among thousands; in a run of a few
hundred samples, the default window would make the whole cache one window, written entirely
after the forward, which measures the tail, not the overlap. Small windows give these short
runs several windows, as a long build has.

Threads: torch runs ONE intra-op thread by default here (`--threads`), for the bare passes and
the build alike. On this shared 2-core machine, identical 2-thread passes over the same batches
took 2.8 s to 13.8 s (another process holding one core stalls torch's 2-thread barriers),
while 1-thread passes stayed within 10% of each other. One thread also leaves the second core
to the build's writer thread, as a GPU build leaves the host's cores to it.

Targets (both with the embedded 1,024-token tokenizer and the 300 sample chats):
  tiny  the embedded `tiny-llama` (8 layers, hidden 64), seq 2048, all 300 samples: the
        cheapest target there is, so the most I/O per FLOP.
  big   a random-weight Llama (default: hidden 1024, 8 layers, intermediate 2816, 16 heads,
        4 KV heads, vocab 1024: 92M parameters), seq 512, the first 32 samples (kept short:
        5 passes over them must finish in about 2 minutes on one CPU core). Its FLOPs per
        byte written are printed next to Llama-3.1-8B's (Vd 32000, the same loss share).

On CPU the model computes in fp32 (the builder's CPU setting) and the cache stores bf16. On a
GPU (gpu_check.sh) the same script runs the model in bf16; the timers synchronise the device.

Run: .venv/bin/python benchmarks/build_overhead.py [--cases tiny,big] [--big-shape H,L,I,HEADS,KV,V]
     [--big-samples N] [--big-seq S] [--big-draft-vocab VD] [--threads N] [--diagnostics tiny,big]
     [--repeats N] [--row-group-bytes B] [--sort-window-bytes B] [--compression none|zstd] [--writer-threads N]
     [--switch-interval S] [--results PATH]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common  # noqa: F401  (first: fresh HF_DATASETS_CACHE before datasets loads)
from _common import machine_line, table, temp_dir, write_results
from _targets import LLAMA_8B, compute_per_byte, llama_params, make_shaped_llama

NAME = "build_overhead"
TARGET_RATIO = 0.90  # acceptance, on the bigger target
DEFAULT_BIG_SHAPE = "1024,8,2816,16,4,1024"
TINY = dict(target_model="tiny-llama", input_data="sample-chats", seq_length=2048, dtype="bf16")


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Instrument:
    """Wraps Target.supervise and ShardWriter.publish (public methods) to time the build's
    forward-to-last-shard span; restores them afterwards."""

    def __init__(self):
        self.first_forward = self.last_forward_end = None
        self.supervise_s = 0.0
        self.forwards = 0
        self.publishes: list[float] = []

    def __enter__(self):
        from builder.shards import ShardWriter
        from builder.target import Target

        self._orig = (Target.supervise, ShardWriter.publish)
        supervise, publish = self._orig
        inst = self

        def timed_supervise(target, *args, **kwargs):
            start = time.perf_counter()
            if inst.first_forward is None:
                inst.first_forward = start
            out = supervise(target, *args, **kwargs)
            inst.last_forward_end = time.perf_counter()
            inst.supervise_s += inst.last_forward_end - start  # on a GPU: launch time only (asynchronous)
            inst.forwards += 1
            return out

        def timed_publish(writer, *args, **kwargs):
            publish(writer, *args, **kwargs)
            inst.publishes.append(time.perf_counter())

        Target.supervise, ShardWriter.publish = timed_supervise, timed_publish
        return self

    def __exit__(self, *exc):
        from builder.shards import ShardWriter
        from builder.target import Target

        Target.supervise, ShardWriter.publish = self._orig


def build_batches(prep) -> list[tuple]:
    """The build's batches, in the build's order: shards -> windows -> token-budget batches."""
    from builder.batching import pad_batch, plan_batches, shard_windows

    cfg = prep.cfg
    pad_id = prep.tokenizer.pad_token_id if prep.tokenizer.pad_token_id is not None else 0
    batches = []
    for shard in range(prep.num_shards):
        start = shard * cfg.shard_size
        rows = prep.samples.select(range(start, min(start + cfg.shard_size, len(prep.samples))))
        for window in shard_windows(prep, rows):
            for positions in plan_batches([r["num_tokens"] for r in window], cfg.token_budget, cfg.batch_size):
                samples = [window[i] for i in positions]
                batches.append(pad_batch([s["input_ids"] for s in samples], [s["loss_mask"] for s in samples], pad_id))
    return batches


def time_pass(fn, batches, device) -> float:
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        fn(*batch)
    sync(device)
    return time.perf_counter() - start


def planned_memory(prep) -> dict:
    """The placement planner's per-GPU estimate for this build (bf16), as `--dry-run` prints it."""
    from builder.placement import memory_plan

    return memory_plan(prep, dtype_bytes=2).to_dict()


def peak_gpu_memory(peaks: list[tuple[int, int]], plan: dict) -> dict:
    """Torch's peak allocation during the builds (weights included) next to the planner's estimate.
    The planner's `overhead` (CUDA context, allocator slack) lies outside torch's allocator, so the
    estimate to compare with the peak allocation leaves it out."""
    if not peaks:
        return {}
    allocated, reserved = max(a for a, _ in peaks), max(r for _, r in peaks)
    in_allocator = plan["per_gpu"] - plan["overhead"]
    return {
        "peak_gpu_allocated_bytes": allocated,
        "peak_gpu_reserved_bytes": reserved,
        "planned_gpu_bytes": plan["per_gpu"],
        "planned_gpu_bytes_in_allocator": in_allocator,
        "planned_gpu": plan,
        "ratio_peak_allocated_over_planned": allocated / in_allocator,
    }


def bare_runner(prep, model, target, kind: str, device, input_device):
    import torch

    selected = torch.as_tensor(prep.selected_token_ids, device=device)
    log_mass = "log_draft_mass" in prep.layout.columns()  # as the build asks for it

    @torch.inference_mode()
    def run(ids, attention, loss):
        if kind == "model":
            model(input_ids=ids.to(input_device), attention_mask=attention.to(input_device), use_cache=False)
        elif kind == "forward":
            target.forward(ids.to(input_device), attention.to(input_device))
        else:
            target.supervise(ids.to(input_device), attention.to(input_device), loss.to(device), selected, log_draft_mass=log_mass)

    return run


def paired_ratios(bare: list[float], builds: list[float]) -> dict:
    """Each build against the mean of the bare passes just before and after it: the machine's drift
    over a pass hits both sides of a pair alike. Median and range over the builds."""
    import statistics

    ratios = [(bare[i] + bare[i + 1]) / 2 / build for i, build in enumerate(builds)]
    return {
        "ratios_build_over_neighbouring_bare": ratios,
        "ratio_build_over_bare_model_paired_median": statistics.median(ratios),
    }


def run_case(label: str, build_kwargs: dict, diagnostics: bool, repeats: int) -> dict:
    import numpy as np
    import torch

    from builder.config import BuildConfig
    from builder.pipeline import build
    from builder.prepare import prepare
    from builder.target import Target, compute_device, load_model

    cfg = BuildConfig(output_dir=str(Path(temp_dir(f"overhead-{label}")) / "cache"), **build_kwargs)
    prep = prepare(cfg)
    batches = build_batches(prep)
    tokens = int(np.asarray(prep.samples["num_tokens"]).sum())
    loss_tokens = int(np.asarray(prep.samples["num_loss_tokens"]).sum())
    padded = sum(int(b[0].numel()) for b in batches)
    device, dtype = compute_device()
    model = load_model(prep.model_path, None, False, device, dtype)
    input_device = model.get_input_embeddings().weight.device
    plain = bare_runner(prep, model, None, "model", device, input_device)
    plain(*batches[0])  # warm-up (kernels, allocator), untimed
    sync(device)
    print(
        f"  [{label}] {len(prep.samples)} samples, {tokens:,} tokens ({padded:,} with padding) in {len(batches)} batches; "
        f"bare, then (build, bare) x {repeats} ...",
        flush=True,
    )
    bare = [time_pass(plain, batches, device)]
    extra = {}
    if diagnostics:
        target = Target(model, prep.aux_layer_ids)
        extra["target_forward_s"] = time_pass(bare_runner(prep, model, target, "forward", device, input_device), batches, device)
        extra["target_supervise_s"] = time_pass(bare_runner(prep, model, target, "supervise", device, input_device), batches, device)
        target.close()
    builds, peaks = [], []
    for rep in range(repeats):
        out = Path(temp_dir(f"overhead-{label}-{rep}")) / "cache"
        whole_start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the build's own peak, not the bare passes' full logits
        with Instrument() as inst:
            result = build(cfg.replace(output_dir=str(out)), progress=False)
        whole_s = time.perf_counter() - whole_start
        if device.type == "cuda":
            peaks.append((torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)))
        assert inst.forwards == len(batches), (inst.forwards, len(batches))  # the same batches, all of them
        builds.append(
            {
                "build_s": inst.publishes[-1] - inst.first_forward,
                "forward_phase_s": inst.last_forward_end - inst.first_forward,
                "drain_tail_s": inst.publishes[-1] - inst.last_forward_end,
                "supervise_calls_s": inst.supervise_s,
                "whole_build_call_s": whole_s,
                "shards": len(inst.publishes),
            }
        )
        bare.append(time_pass(plain, batches, device))
        totals = result.manifest["totals"]
        assert totals["tokens"] == tokens
    gpu_memory = peak_gpu_memory(peaks, planned_memory(prep))
    bare_s = min(bare)
    best = min(builds, key=lambda b: b["build_s"])
    build_s, tail_s = best["build_s"], best["drain_tail_s"]
    print(
        f"  [{label}] bare passes "
        + ", ".join(f"{x:.2f}" for x in bare)
        + " s; builds "
        + ", ".join(f"{b['build_s']:.2f} (drain tail {b['drain_tail_s']:.2f})" for b in builds)
        + " s",
        flush=True,
    )

    model_shape = {
        k: getattr(model.config, k)
        for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size")
    }
    del model
    loss_share = loss_tokens / tokens
    draft_vocab = len(prep.selected_token_ids)
    fmt = dict(target_format=cfg.target_format, aux_dtype=cfg.storage_aux_dtype, topk=cfg.topk)
    per_byte = compute_per_byte(model_shape, draft_vocab=draft_vocab, loss_share=loss_share, dtype=cfg.dtype, **fmt)
    per_byte_8b = compute_per_byte(LLAMA_8B, draft_vocab=32000, loss_share=loss_share, **fmt)  # same format, bf16
    row = {
        "label": label,
        "target": cfg.target_model if label == "tiny" else "random-weight Llama",
        "shape": model_shape,
        "params": llama_params(**model_shape),
        "device": str(device),
        "compute_dtype": str(dtype).replace("torch.", ""),
        "storage": {
            "dtype": cfg.dtype,
            "aux_dtype": cfg.storage_aux_dtype,
            "format": cfg.target_format,
            "draft_vocab": draft_vocab,
            "compression": cfg.compression,
        },
        "writer_threads": cfg.writer_threads,
        "seq_length": cfg.seq_length,
        "token_budget": cfg.token_budget,
        "row_group_bytes": cfg.row_group_bytes,
        "sort_window_bytes": cfg.sort_window_bytes,
        "samples": len(prep.samples),
        "tokens": tokens,
        "padded_tokens": padded,
        "loss_tokens": loss_tokens,
        "batches": len(batches),
        "shards": prep.num_shards,
        "cache_bytes": totals["bytes"],
        "bare_model_s": bare_s,
        "bare_model_passes_s": bare,
        "bare_spread_percent": (max(bare) / min(bare) - 1) * 100,
        "build_s": build_s,
        "build_forward_phase_s": best["forward_phase_s"],
        "build_drain_tail_s": tail_s,
        "build_supervise_calls_s": best["supervise_calls_s"],
        "builds": builds,
        "bare_tokens_per_s": tokens / bare_s,
        "build_tokens_per_s": tokens / build_s,
        "written_mb_per_s": totals["bytes"] / build_s / 1e6,
        "ratio_build_over_bare_model": bare_s / build_s,
        **paired_ratios(bare, [b["build_s"] for b in builds]),
        "ratio_build_minus_tail_over_bare_model": bare_s / (build_s - tail_s),
        "compute_per_byte": per_byte,
        "llama_8b_compute_per_byte": per_byte_8b,
        **gpu_memory,
        **extra,
    }
    if diagnostics:
        row["ratio_build_over_target_forward"] = extra["target_forward_s"] / build_s
        row["ratio_build_over_target_supervise"] = extra["target_supervise_s"] / build_s
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="tiny,big", help="comma-separated: tiny, big")
    p.add_argument("--big-shape", default=DEFAULT_BIG_SHAPE, help="H,LAYERS,INTERMEDIATE,HEADS,KV_HEADS,VOCAB")
    p.add_argument("--big-samples", type=int, default=32, help="0: all rows")
    p.add_argument("--big-seq", type=int, default=512)
    p.add_argument("--big-batch-size", type=int, default=8)
    p.add_argument("--big-draft-vocab", type=int, default=None, help="default: the whole vocabulary")
    p.add_argument("--big-format", default="probs", help="target format of the big case (probs, topk, hidden)")
    p.add_argument("--big-aux-dtype", default=None, help="aux dtype of the big case (default: bf16)")
    p.add_argument("--big-max-tokens", type=int, default=None, help="--max-tokens-per-batch of the big case")
    p.add_argument(
        "--big-rows",
        type=int,
        default=None,
        help="input: the sample chats repeated to this many rows (default: the 300 sample chats as they are)",
    )
    p.add_argument("--tiny-samples", type=int, default=None, help="default: all 300")
    p.add_argument(
        "--diagnostics",
        default="tiny",
        help="cases that also time Target.forward and Target.supervise "
        "(default: tiny; on the big target both equal model() within a few %%)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1; 0 = torch's default)")
    p.add_argument("--repeats", type=int, default=4, help="builds per target (bare passes: one more)")
    p.add_argument("--row-group-bytes", type=int, default=8 << 20, help="default 8 MiB (see the docstring); 0: the builder's default")
    p.add_argument("--sort-window-bytes", type=int, default=32 << 20, help="default 32 MiB (see the docstring); 0: the builder's default")
    p.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="the GIL switch interval the build's forward loop sets, in seconds (default: the builder's)",
    )
    p.add_argument("--compression", default=None, help="--compression of both cases (default: the builder's)")
    p.add_argument("--writer-threads", type=int, default=None, help="--writer-threads of both cases (default: the builder's)")
    p.add_argument("--results", default=None, help=f"JSON path (default: benchmarks/results/{NAME}.json)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    _common.quiet_libraries()
    import torch

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    diagnostics = {c.strip() for c in args.diagnostics.split(",") if c.strip()}
    if args.switch_interval is not None:
        import builder.forward

        builder.forward.FORWARD_SWITCH_INTERVAL_S = args.switch_interval
    rg = {"row_group_bytes": args.row_group_bytes} if args.row_group_bytes else {}
    rg |= {"sort_window_bytes": args.sort_window_bytes} if args.sort_window_bytes else {}
    rg |= {k: v for k, v in (("compression", args.compression), ("writer_threads", args.writer_threads)) if v is not None}
    if args.threads and not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    print(f"{NAME}: build tokens/s over bare target forward tokens/s on the same batches", flush=True)
    rows = []
    for case in cases:
        if case == "tiny":
            rows.append(
                run_case("tiny", dict(TINY, max_samples=args.tiny_samples, **rg), diagnostics="tiny" in diagnostics, repeats=args.repeats)
            )
        elif case == "big":
            model_dir = Path(temp_dir("big-target")) / "model"
            start = time.perf_counter()
            made = make_shaped_llama(model_dir, args.big_shape)
            print(
                f"  [big] random-weight Llama {made['shape']}: {made['params']['total'] / 1e6:,.1f}M parameters "
                f"(made in {time.perf_counter() - start:.1f} s)",
                flush=True,
            )
            data_input = "sample-chats"
            if args.big_rows:
                data_input = str(_common.write_replicated_jsonl(Path(temp_dir("big-input")) / "chats.jsonl", args.big_rows))
            rows.append(
                run_case(
                    "big",
                    dict(
                        target_model=str(model_dir),
                        input_data=data_input,
                        seq_length=args.big_seq,
                        max_samples=args.big_samples or None,
                        batch_size=args.big_batch_size,
                        dtype="bf16",
                        draft_vocab_size=args.big_draft_vocab,
                        **rg,
                        target_format=args.big_format,
                        aux_dtype=args.big_aux_dtype,
                        max_tokens_per_batch=args.big_max_tokens,
                    ),
                    diagnostics="big" in diagnostics,
                    repeats=args.repeats,
                )
            )
        else:
            raise SystemExit(f"unknown case {case!r}; expected tiny or big")

    print()
    print(
        table(
            [
                "target",
                "params",
                "tokens",
                "bare model() tok/s",
                "build tok/s",
                "build / bare",
                "paired median (range)",
                "build-minus-tail / bare",
                "bare spread %",
            ],
            [
                [
                    r["label"],
                    f"{r['params']['total'] / 1e6:,.1f}M",
                    r["tokens"],
                    r["bare_tokens_per_s"],
                    r["build_tokens_per_s"],
                    r["ratio_build_over_bare_model"],
                    f"{r['ratio_build_over_bare_model_paired_median']:.3f} "
                    f"({min(r['ratios_build_over_neighbouring_bare']):.3f}-{max(r['ratios_build_over_neighbouring_bare']):.3f})",
                    r["ratio_build_minus_tail_over_bare_model"],
                    r["bare_spread_percent"],
                ]
                for r in rows
            ],
            title="Build vs bare forward on the same batches (one run, one machine; tok/s are "
            + ("GPU" if torch.cuda.is_available() else "CPU")
            + " figures):",
        )
    )
    diag = [r for r in rows if "target_forward_s" in r]
    if diag:
        print(
            table(
                [
                    "target",
                    "bare model() s",
                    "Target.forward s",
                    "Target.supervise s",
                    "build s",
                    "forward phase s",
                    "drain tail s",
                    "build / Target.forward",
                    "build / Target.supervise",
                ],
                [
                    [
                        r["label"],
                        r["bare_model_s"],
                        r["target_forward_s"],
                        r["target_supervise_s"],
                        r["build_s"],
                        r["build_forward_phase_s"],
                        r["build_drain_tail_s"],
                        r["ratio_build_over_target_forward"],
                        r["ratio_build_over_target_supervise"],
                    ]
                    for r in diag
                ],
                title="Diagnostics (same batches): the build's per-batch computation alone, and where the build's time goes:",
            )
        )
    print(
        table(
            [
                "target",
                "format",
                "FLOPs/token",
                "cache B/token",
                "FLOPs per byte written",
                "vs Llama-3.1-8B, same format, Vd 32000",
                "written MB/s",
            ],
            [
                [
                    r["label"],
                    f"{r['storage']['format']}/{r['storage']['aux_dtype']}/Vd {r['storage']['draft_vocab']}",
                    r["compute_per_byte"]["flops_per_token"],
                    r["compute_per_byte"]["bytes_per_token"],
                    r["compute_per_byte"]["flops_per_byte"],
                    f"{r['compute_per_byte']['flops_per_byte'] / r['llama_8b_compute_per_byte']['flops_per_byte']:.3f}x",
                    r["written_mb_per_s"],
                ]
                for r in rows
            ],
            title="Compute per byte written (forward FLOPs as the build runs them; cache bytes at the storage dtypes):",
        )
    )
    for r8 in {
        r["llama_8b_compute_per_byte"]["target_format"] + r["llama_8b_compute_per_byte"]["aux_dtype"]: r["llama_8b_compute_per_byte"]
        for r in rows
    }.values():
        print(
            f"  Llama-3.1-8B: {r8['flops_per_token'] / 1e9:.1f} GFLOP/token, {r8['bytes_per_token']:,.0f} B/token ({r8['target_format']}, "
            f"aux {r8['aux_dtype']}, Vd 32000, loss share {r8['loss_share']:.0%}) -> {r8['flops_per_byte']:,.0f} FLOPs per byte"
        )
    for r in rows:
        if "peak_gpu_allocated_bytes" in r:
            print(
                f"  [{r['label']}] peak GPU memory {r['peak_gpu_allocated_bytes'] / 2**30:.2f} GiB allocated "
                f"({r['peak_gpu_reserved_bytes'] / 2**30:.2f} GiB reserved); the planner's estimate "
                f"{r['planned_gpu_bytes_in_allocator'] / 2**30:.2f} GiB without its CUDA-context overhead "
                f"({r['planned_gpu_bytes'] / 2**30:.2f} GiB with it): peak / estimate {r['ratio_peak_allocated_over_planned']:.2f}"
            )
    verdicts = {}
    for r in rows:
        if r["label"] == "big":
            verdicts["big_meets_0_90"] = r["ratio_build_over_bare_model"] >= TARGET_RATIO
            print(
                f"  bigger target: build / bare = {r['ratio_build_over_bare_model']:.3f} "
                f"(target >= {TARGET_RATIO}: {'MET' if verdicts['big_meets_0_90'] else 'NOT MET'})"
            )
    print(f"  {machine_line()}")
    ratios = {f"{r['label']}_build_over_bare_model": r["ratio_build_over_bare_model"] for r in rows}
    ratios |= {f"{r['label']}_build_over_target_forward": r["ratio_build_over_target_forward"] for r in diag}
    ratios |= {f"{r['label']}_build_over_target_supervise": r["ratio_build_over_target_supervise"] for r in diag}
    ratios |= {f"{r['label']}_peak_gpu_over_planned": r["ratio_peak_allocated_over_planned"] for r in rows if "planned_gpu" in r}
    import builder.forward

    data = {
        "cases": rows,
        "ratios": ratios | verdicts,
        "target_ratio_big": TARGET_RATIO,
        "torch_threads": torch.get_num_threads(),
        "forward_switch_interval_s": builder.forward.FORWARD_SWITCH_INTERVAL_S,
    }
    path = write_results(NAME, data, args.results)
    print(f"  wrote {path}")
    return data


if __name__ == "__main__":
    main()
