"""Run every benchmark (each in its own process, one after the other) and print one summary.

Run: make bench   (or .venv/bin/python benchmarks/run_all.py [NAME ...])

Each benchmark writes benchmarks/results/NAME.json; the summary is read back from those
files, so it shows exactly the figures that were recorded (build_overhead.json's tiny and big
cases are the main README's two build ÷ bare rows). Ratios are measured within one
benchmark run on one machine; absolute figures are CPU figures that only matter relative to
each other.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
BENCHMARKS = (
    "tokenize_throughput",
    "cache_size",
    "peak_rss",
    "build_overhead",
    "io_throughput",
    "scaling",
    "format_sizes",
    "gpu_feed",
    "collate_throughput",
    "padding",
)
# Not here, each run on its own (see benchmarks/README.md): nemo_speed (needs NeMo's site folder),
# hub_stream, float_encodings, and gpu_check.sh (needs an NVIDIA GPU).


def run(name: str) -> float:
    print(f"\n=== {name} " + "=" * (70 - len(name)), flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, str(BENCH_DIR / f"{name}.py")], check=True, cwd=BENCH_DIR.parent)
    return time.perf_counter() - start


def build_overhead_lines(data: dict, took: str) -> list[str]:
    """Each case's build ÷ bare two ways, side by side: the median over the builds of each build
    against the mean of the bare passes on either side of it (it follows the machine's drift), and
    the fastest bare pass over the fastest build (one fast bare pass sets it alone)."""
    r = data.get("ratios", {})
    lines = [
        f"build_overhead{took}: build tokens/s / bare model() tokens/s, same batches, {data.get('torch_threads', '?')} torch thread(s)"
    ]
    for c in data["cases"]:
        verdict = ""
        if c["label"] == "big":
            verdict = f" (target >= {data['target_ratio_big']}: {'MET' if r.get('big_meets_0_90') else 'NOT MET'})"
        paired = "paired median: not in this results file"
        if "ratio_build_over_bare_model_paired_median" in c:
            pairs = c["ratios_build_over_neighbouring_bare"]
            median = c["ratio_build_over_bare_model_paired_median"]
            paired = f"paired median {median:.3f} ({min(pairs):.3f}-{max(pairs):.3f}, {len(pairs)} builds)"
        diag = f"; / Target.supervise {c['ratio_build_over_target_supervise']:.2f}" if "ratio_build_over_target_supervise" in c else ""
        per_byte = c["compute_per_byte"]["flops_per_byte"]
        lines.append(
            f"  {c['label']:4s} {c['params']['total'] / 1e6:,.1f}M params: {paired}, fastest over fastest "
            f"{c['ratio_build_over_bare_model']:.3f}{verdict}{diag}; bare {c['bare_tokens_per_s']:,.0f} tok/s [CPU], "
            f"FLOPs/byte {per_byte:,.0f} ({per_byte / c['llama_8b_compute_per_byte']['flops_per_byte']:.3f}x Llama-3.1-8B's)"
        )
    return lines


def io_throughput_lines(data: dict, took: str) -> list[str]:
    """Writer and reader ratios of times. Results files written before the baseline flushed as the
    writer does, and before the reader's ratios became ratios of times, lack the new keys: their
    writer lines fall back to the one-fsync baseline, their reader lines are left out (their
    ratios set decoded MB/s against the file's MB/s)."""
    r, mb = data["ratios"], data["mb_per_s"]
    if "writer_none_1_over_fastest_plain_write_of_the_tensor_bytes" in r:
        baseline = "fastest_plain_write"
        plain_mb_s = max(mb["plain_write_overlapped_none"], mb["plain_write_none"])
        flushed = "the faster of: disk writes started every 32 MiB, one fsync at the end"
    elif "plain_write_overlapped_none" in mb:
        baseline, plain_mb_s, flushed = "overlapped_plain_write", mb["plain_write_overlapped_none"], "disk writes started every 32 MiB"
    else:
        baseline, plain_mb_s, flushed = "plain_write", mb["plain_write_none"], "one fsync at the end: an older results file"
    lines = [
        f"io_throughput{took}: {data['cache']['tensor_bytes'] / 1e6:,.0f} MB of tensor data in one shard, best of {data['repeats']}; "
        f"ratios of times; target writer >= {data['targets']['writer']}, reader >= {data['targets']['reader']}"
    ]
    for c in ("none", "zstd"):
        per_thread = [
            f"{t} thread(s) {r[f'writer_{c}_{t}_over_{baseline}_of_the_tensor_bytes']:.2f} ({mb[f'writer_{c}_{t}']:,.0f} MB/s)"
            for t in data["threads"]
        ]
        lines.append(
            f"  writer {c}: {', '.join(per_thread)} of a plain write + fsync of the tensor bytes ({plain_mb_s:,.0f} MB/s, {flushed})"
        )
    if "reader_cold_none_over_plain_read_of_its_files" not in r:
        lines.append("  reader: not shown (an older results file: its ratios set decoded MB/s against the file's MB/s)")
        return lines
    for c in ("none", "zstd"):
        cold, warm = f"cold_{c}_over_plain_read_of", f"warm_{c}_over_plain_read_of"
        lines.append(
            f"  reader {c}, a plain read's time over the reader's: cold {r[f'reader_{cold}_its_files']:.3f} "
            f"({r[f'reader_with_open_{cold}_its_files']:.3f} with the open), warm {r[f'reader_{warm}_its_files']:.3f}; "
            f"against a plain read of the same tensor bytes (the none shard) cold {r[f'reader_{cold}_the_tensor_bytes']:.3f}; "
            f"pyarrow's own read {r[f'pyarrow_read_{cold}_its_files']:.2f} cold"
        )
    return lines


def summary(names: list[str], seconds: dict[str, float]) -> str:
    lines = ["", "=== summary " + "=" * 63]
    machine = None
    for name in names:
        path = RESULTS_DIR / f"{name}.json"
        if not path.exists():
            lines.append(f"{name}: no results")
            continue
        data = json.loads(path.read_text())
        machine = data.get("machine", machine)
        r = data.get("ratios", {})
        took = f" ({seconds[name]:.0f} s)" if name in seconds else ""
        if name == "tokenize_throughput":
            by = {(c["path"], c["num_proc"]): c for c in data["configs"]}
            f = data["forward"]
            lines.append(f"tokenize_throughput{took}: {data['rows']:,} rows, seq {data['seq_length']}")
            for (path_kind, num_proc), c in by.items():
                per_core = (
                    f", {c['samples_per_s'] / f['one_thread_forward_samples_per_s']:.1f}x its 1-thread forward"
                    if num_proc == 1 and "one_thread_forward_samples_per_s" in f
                    else ""
                )
                lines.append(
                    f"  {path_kind:10s} num_proc {num_proc}: {c['samples_per_s']:,.0f} samples/s [CPU]; cached rerun "
                    f"{c['cached_over_first']:.4f}x the first run's time; "
                    f"{c['samples_per_s'] / f['forward_samples_per_s']:.1f}x the tiny target's forward samples/s{per_core}"
                )
        elif name == "cache_size":
            lines.append(f"cache_size{took}: {data['dtype']}, NeMo Automodel 0.7.0's padded cache of the same samples / ours")
            for b in data["builds"] + data.get("big_builds", []):
                lines.append(
                    f"  {b['case']} ({b.get('compression', 'none')}): {b['bytes_per_token']:,.0f} B/token "
                    f"vs NeMo {b['reference_bytes_per_token']:,.0f} "
                    f"-> {b['ratio_reference_over_cache']:.2f}x smaller (padding {b['padding_factor']:.2f}x, "
                    f"the rest {b['ratio_unpadded_reference_over_cache']:.2f}x)"
                    + (
                        f"; NeMo's own lossy --target-probs-topk {b['nemo_topk']} cache: "
                        f"{b['ratio_nemo_topk_reference_over_cache']:.2f}x smaller than that"
                        if "nemo_topk" in b
                        else ""
                    )
                )
            for p in data["projections"]:
                ratios = p["ratio_reference_over_zstd"]
                lines.append(
                    f"  PROJECTION 8B-like, zstd, Vd {p['draft_vocab']:>5}: "
                    f"NeMo (lossless) / probs {ratios['probs']:.1f}x, / topk {ratios['topk']:.1f}x, "
                    f"/ hidden {ratios['hidden']:.1f}x"
                    + (
                        f"; NeMo's own top-k cache / topk {p['ratio_nemo_topk_reference_over_topk']['zstd']:.1f}x"
                        if "ratio_nemo_topk_reference_over_topk" in p
                        else ""
                    )
                )
        elif name == "peak_rss":
            base = data["baseline"]["VmHWM"] / 2**20
            peaks = {k: [run["VmHWM"] / 2**20 for run in v] for k, v in data["build"].items()}
            verdict = "MET" if r["meets_target_under_10_percent"] else "NOT MET"
            lines.append(f"peak_rss{took}: rows {data['rows']}")
            lines.append(
                f"  build peak RSS grows {r['build_peak_growth_percent']:+.1f}% when the input doubles (target < 10%: {verdict}); "
                f"1x {', '.join(f'{v:.0f}' for v in peaks['1x'])} MiB, 2x {', '.join(f'{v:.0f}' for v in peaks['2x'])} MiB"
            )
            lines.append(
                f"  baseline (imports + model) {base:.0f} MiB = {r['baseline_share_of_build_peak_1x']:.0%} of the 1x peak; "
                f"the part above it grows {r['build_minus_baseline_growth_percent']:+.1f}%"
                + (
                    f"; identical runs differ by up to {r['build_peak_run_to_run_spread_percent']:.1f}%"
                    if r.get("build_peak_run_to_run_spread_percent") is not None
                    else ""
                )
            )
        elif name == "build_overhead":
            lines += build_overhead_lines(data, took)
        elif name == "io_throughput":
            lines += io_throughput_lines(data, took)
        elif name == "scaling":
            best = data["best"]
            lines.append(f"scaling{took}: {data['cores']} cores, OMP_NUM_THREADS=1 per process")
            for case, b in best.items():
                if case == "one":
                    continue
                lines.append(
                    f"  {case} processes vs one: wall {best['one']['wall_s']:.1f} -> {b['wall_s']:.1f} s "
                    f"(x{r.get(case + '_wall_speedup', float('nan')):.2f}); "
                    f"forward+write x{r.get(case + '_forward_phase_speedup', float('nan')):.2f}; "
                    f"identical shards: {data['identical_shards']}"
                )
        elif name == "format_sizes":
            lines.append(f"format_sizes{took}: NeMo / cache, zstd; random Llama (hidden 1024, seq 512) measured, Llama-3.1-8B extrapolated")
            lines.append(
                "  measured: "
                + ", ".join(
                    f"{b['target_format']}/{b['aux_dtype']} {b['ratio_reference_over_cache']:.2f}x" for b in data.get("big_builds", [])
                )
            )
            topk = [b for b in data.get("big_builds", []) if "ratio_nemo_topk_reference_over_cache" in b]
            if topk:
                lines.append(
                    "  topk against NeMo's own lossy --target-probs-topk 64 cache: "
                    + ", ".join(f"aux {b['aux_dtype']} {b['ratio_nemo_topk_reference_over_cache']:.2f}x" for b in topk)
                )
            lines.append(
                "  8B, 2,048-token samples: "
                + ", ".join(
                    f"{p['target_format']}/{p['aux_dtype']} {p['ratio_reference_over_cache']:.1f}x ({p['bytes_per_sample'] / 1e6:,.0f} MB)"
                    for p in data["projections"]
                )
            )
        elif name == "gpu_feed":
            lines.append(f"gpu_feed{took}: GB/s written per GPU (zstd) and writer threads per process (zstd)")
            for row in data["rows"]:
                if row["aux_dtype"] == "bf16" or row["format"] == "topk":
                    lines.append(
                        f"  {row['model']} {row['format']} Vd {row['draft_vocab']} aux {row['aux_dtype']}: "
                        f"{row['stored_gb_s_per_gpu']:.2f} GB/s, {row['threads_zstd']} threads"
                    )
        elif name == "padding":
            lines.append(f"padding{took}: share of forward tokens that are padding, {data['legacy_window_mib']} MiB -> 4 GiB sort window")
            for case in data["cases"]:
                shares = case["padding_share_by_window_mib"]
                lines.append(
                    f"  {case['target']} {case['format']}, batch {case['batch_size']} / {case['max_tokens_per_batch']:,} tokens: "
                    f"{shares[str(data['legacy_window_mib'])]:.0%} -> {shares['4096']:.0%}"
                )
        elif name == "collate_throughput":
            sps, shard, batch = data["samples_per_s"], data["shard_mb_per_s"], data["batch_mb_per_s"]
            lines.append(
                f"collate_throughput{took}: NeMo batches of {data['batch_size']} through {data['workers']} DataLoader workers, "
                f"{data['cache']['bytes'] / 1e6:,.0f} MB cache, best of {data['repeats']}"
            )
            for key, label in (("loader_streaming", "streaming"), ("loader_map", "map-style")):
                lines.append(
                    f"  {label:9s}: {sps[key]:,.0f} samples/s [CPU], {shard[key]:,.0f} MB/s of shards, {batch[key]:,.0f} MB/s of batches; "
                    f"{r[key + '_over_pyarrow']:.3f}x pyarrow's read of the same files ({shard['pyarrow']:,.0f} MB/s)"
                )
            lines.append(
                f"  decode + collate alone (1 thread): {sps['decode_current']:,.0f} samples/s, "
                f"{r['decode_current_over_earlier_speed']:.2f}x the earlier way; fresh shared memory "
                f"{r['fill_shared_over_heap_time']:.0f}x the time of heap memory"
            )
    if machine:
        lines.append(
            f"machine: {machine.get('cpu')}, {machine.get('cores')} cores, GPU: {machine.get('gpu')}, torch {machine.get('torch')}"
        )
    lines.append("ratios: one run, one machine; [CPU] figures only matter relative to each other")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; expected some of {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    seconds = {}
    failed = []
    for name in names:
        try:
            seconds[name] = run(name)
        except subprocess.CalledProcessError as err:
            failed.append(name)
            print(f"{name} failed (exit status {err.returncode})", file=sys.stderr)
    print(summary(names, seconds))
    if failed:
        print(f"failed: {', '.join(failed)} (their lines above are from an earlier run, if any)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
