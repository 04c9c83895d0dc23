"""Run every benchmark (each in its own process, one after the other) and print one summary.

Run: make bench   (or .venv/bin/python benchmarks/run_all.py [NAME ...])

Each benchmark writes benchmarks/results/NAME.json; the summary is read back from those
files, so it shows exactly the figures that were recorded. Ratios are measured within one
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
BENCHMARKS = ("tokenize_throughput", "cache_size", "peak_rss")


def run(name: str) -> float:
    print(f"\n=== {name} " + "=" * (70 - len(name)), flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, str(BENCH_DIR / f"{name}.py")], check=True, cwd=BENCH_DIR.parent)
    return time.perf_counter() - start


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
            lines.append(f"tokenize_throughput{took} (issue 2): {data['rows']:,} rows, seq {data['seq_length']}")
            for (path_kind, num_proc), c in by.items():
                per_core = (f", {c['samples_per_s'] / f['one_thread_forward_samples_per_s']:.1f}x its 1-thread forward"
                            if num_proc == 1 and "one_thread_forward_samples_per_s" in f else "")
                lines.append(
                    f"  {path_kind:10s} num_proc {num_proc}: {c['samples_per_s']:,.0f} samples/s [CPU]; cached rerun "
                    f"{c['cached_over_first']:.4f}x the first run's time; "
                    f"{c['samples_per_s'] / f['forward_samples_per_s']:.1f}x the tiny target's forward samples/s{per_core}"
                )
        elif name == "cache_size":
            lines.append(f"cache_size{took} (issue 3): seq {data['seq_length']}, {data['dtype']}, embedded default")
            for b in data["builds"]:
                lines.append(
                    f"  Vd {b['draft_vocab']:>5}: {b['bytes_per_token']:,.0f} B/token vs reference {b['reference_bytes_per_token']:,.0f} "
                    f"-> {b['ratio_reference_over_cache']:.1f}x smaller (padding {b['padding_factor']:.2f}x, the rest {b['ratio_unpadded_reference_over_cache']:.2f}x)"
                )
            for p in data["projections"]:
                ratios = p["ratio_reference_over"]
                lines.append(
                    f"  PROJECTION 8B-like, Vd {p['draft_vocab']:>5}: reference / probs {ratios['probs']:.1f}x, / topk {ratios['topk']:.1f}x, "
                    f"/ hidden {ratios['hidden']:.1f}x"
                )
        elif name == "peak_rss":
            base = data["baseline"]["VmHWM"] / 2**20
            peaks = {k: [run["VmHWM"] / 2**20 for run in v] for k, v in data["build"].items()}
            verdict = "MET" if r["meets_target_under_10_percent"] else "NOT MET"
            lines.append(f"peak_rss{took} (issue 3): rows {data['rows']}")
            lines.append(
                f"  build peak RSS grows {r['build_peak_growth_percent']:+.1f}% when the input doubles (target < 10%: {verdict}); "
                f"1x {', '.join(f'{v:.0f}' for v in peaks['1x'])} MiB, 2x {', '.join(f'{v:.0f}' for v in peaks['2x'])} MiB"
            )
            lines.append(
                f"  baseline (imports + model) {base:.0f} MiB = {r['baseline_share_of_build_peak_1x']:.0%} of the 1x peak; "
                f"the part above it grows {r['build_minus_baseline_growth_percent']:+.1f}%"
                + (f"; identical runs differ by up to {r['build_peak_run_to_run_spread_percent']:.1f}%"
                   if r.get("build_peak_run_to_run_spread_percent") is not None else "")
            )
    if machine:
        lines.append(f"machine: {machine.get('cpu')}, {machine.get('cores')} cores, GPU: {machine.get('gpu')}, torch {machine.get('torch')}")
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
