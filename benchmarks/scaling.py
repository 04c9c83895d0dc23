"""One process against two on the same input (data parallel under `accelerate launch`).

The same build runs as

  one   `python scripts/build_cache.py ...`                                  (1 process)
  two   `accelerate launch --multi_gpu --num_processes 2 scripts/build_cache.py ...`
        (the launch line of tests/test_distributed.py; on CPU the ranks talk over gloo)

with OMP_NUM_THREADS=1 (and MKL_NUM_THREADS=1) for both, each in a fresh `datasets` cache
(so both tokenize, rank 0 first in the two-process run), and each timed from the launch to
the exit of the last process: imports, tokenization, model loading, forward, writing, the
card. The card's per-rank statistics give each rank's forward-and-write seconds, so the
speed-up of the part that parallelises is shown beside the wall-clock one.

Target: a random-weight Llama (hidden 1024, 8 layers, intermediate 2816, 92M parameters,
the embedded tokenizer) on the first 40 sample chats at seq 512, shard size 10 (4 shards: 2
per rank), bf16. The run is repeated (`--repeats`, default 2: one, two, one, two) and the
fastest of each counts.

THIS MACHINE HAS 2 CORES: two processes with one thread each use both, one process one.
The ideal speed-up is 2.0; any other process on the machine takes from the two-process run
first. On a GPU machine the same script compares 1 and 2 GPUs (`gpu_check.sh` runs it only
where 2 GPUs exist), and `--cases group2` times one process whose target spans 2 GPUs
(`--gpus-per-target 2`).

Run: .venv/bin/python benchmarks/scaling.py [--samples N] [--seq S] [--repeats N] [--cases one,two] [--results PATH]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

import _common  # noqa: F401  (first: fresh HF_DATASETS_CACHE before datasets loads)
from _common import ROOT, machine_line, quiet_env, table, temp_dir, write_results

NAME = "scaling"
SCRIPT = ROOT / "scripts" / "build_cache.py"
DEFAULT_SHAPE = "1024,8,2816,16,4,1024"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(case: str, out: Path, flags: list[str]) -> list[str]:
    build = [str(SCRIPT), "--output-dir", str(out), *flags]
    if case == "one":
        return [sys.executable, *build]
    if case == "group2":
        return [sys.executable, *build, "--gpus-per-target", "2"]
    if case == "two":
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            *build,
        ]
    raise ValueError(case)


def run_case(case: str, flags: list[str], timeout: float) -> dict:
    from builder.reader import read_manifest

    out = Path(temp_dir(f"scaling-{case}")) / "cache"
    env = quiet_env(temp_dir(f"hf-{case}"))
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.run(command(case, out, flags), env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        return {"case": case, "wall_s": wall, "error": f"exit status {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    manifest = read_manifest(out)
    ranks = manifest["build"]["ranks"]
    reported = sorted(line.split("]")[0] + "]" for line in proc.stdout.splitlines() if line.startswith("[rank "))
    return {
        "case": case,
        "wall_s": wall,
        "processes": len(ranks),
        "ranks_reported": reported,
        "rank_seconds": [r["seconds"] for r in ranks],
        "rank_samples": [r["samples"] for r in ranks],
        "rank_shards": [len(r["shards_written"]) for r in ranks],
        "shard_sha256": [s["sha256"] for s in manifest["shards"]],
        "tokens": manifest["totals"]["tokens"],
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="one,two", help="comma-separated: one, two, group2 (group2 needs 2 GPUs)")
    p.add_argument("--shape", default=DEFAULT_SHAPE, help="H,LAYERS,INTERMEDIATE,HEADS,KV_HEADS,VOCAB of the random Llama")
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--shard-size", type=int, default=10)
    p.add_argument("--draft-vocab", type=int, default=None)
    p.add_argument("--format", default="probs", help="--target-format of the builds")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="--max-tokens-per-batch")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--results", default=None, help=f"JSON path (default: benchmarks/results/{NAME}.json)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    _common.quiet_libraries()
    import torch
    from _targets import make_shaped_llama

    on_gpu = torch.cuda.is_available()
    model_dir = Path(temp_dir("scaling-target")) / "model"
    made = make_shaped_llama(model_dir, args.shape)
    flags = [
        "--target-model",
        str(model_dir),
        "--input-data",
        "sample-chats",
        "--max-samples",
        str(args.samples),
        "--seq-length",
        str(args.seq),
        "--shard-size",
        str(args.shard_size),
        "--dtype",
        "bf16",
        "--quiet",
        "--target-format",
        args.format,
        "--batch-size",
        str(args.batch_size),
    ]
    if args.max_tokens:
        flags += ["--max-tokens-per-batch", str(args.max_tokens)]
    if args.draft_vocab:
        flags += ["--draft-vocab-size", str(args.draft_vocab)]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    print(
        f"{NAME}: random-weight Llama {made['params']['total'] / 1e6:,.1f}M parameters, {args.samples} samples, seq {args.seq}, "
        f"shard size {args.shard_size}; cases {cases}, {args.repeats} round(s), OMP_NUM_THREADS=1",
        flush=True,
    )
    runs = {c: [] for c in cases}
    for rep in range(args.repeats):
        for case in cases:
            r = run_case(case, flags, args.timeout)
            runs[case].append(r)
            if "error" in r:
                print(f"  round {rep + 1}: {case}: FAILED ({r['error']})", flush=True)
                continue
            print(
                f"  round {rep + 1}: {case}: {r['wall_s']:.1f} s wall, {r['processes']} process(es), rank seconds "
                + ", ".join(f"{s:.1f}" for s in r["rank_seconds"])
                + f"; {', '.join(r['ranks_reported'])}",
                flush=True,
            )
    failed = sorted({c for c, v in runs.items() for r in v if "error" in r})
    best = {c: min(ok, key=lambda r: r["wall_s"]) for c, v in runs.items() if (ok := [r for r in v if "error" not in r])}
    ratios = {}
    base = best.get("one")
    same = all(r["shard_sha256"] == base["shard_sha256"] for v in runs.values() for r in v if "error" not in r) if base else None
    rows = []
    for case, r in best.items():
        wall_speedup = base["wall_s"] / r["wall_s"] if base else None
        phase_speedup = max(base["rank_seconds"]) / max(r["rank_seconds"]) if base else None
        if base and case != "one":
            ratios[f"{case}_wall_speedup"] = wall_speedup
            ratios[f"{case}_forward_phase_speedup"] = phase_speedup
        rows.append([case, r["processes"], r["wall_s"], max(r["rank_seconds"]), wall_speedup, phase_speedup])
    print()
    print(
        table(
            ["case", "processes", "wall s", "slowest rank's forward+write s", "wall speed-up", "forward+write speed-up"],
            rows,
            title=f"Same input, one run, one machine, fastest of {args.repeats} ({'GPU' if on_gpu else 'CPU'} seconds):",
        )
    )
    if base:
        print(f"  shard bytes identical (sha256) across every run: {same}")
    import os

    print(f"  this machine has {os.cpu_count()} cores; each process runs 1 torch thread (OMP_NUM_THREADS=1)")
    print(f"  {machine_line()}")
    data = {
        "target": {"shape": made["shape"], "params": made["params"]},
        "flags": flags,
        "runs": runs,
        "best": {c: {k: v for k, v in r.items() if k != "shard_sha256"} for c, r in best.items()},
        "identical_shards": same,
        "cores": os.cpu_count(),
        "ratios": ratios,
        "failed_cases": failed,
    }
    path = write_results(NAME, data, args.results)
    print(f"  wrote {path}")
    if failed:
        print(f"  FAILED cases: {failed}", file=sys.stderr)
    return data


if __name__ == "__main__":
    sys.exit(1 if main()["failed_cases"] else 0)
