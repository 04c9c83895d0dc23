"""End to end against NeMo Automodel 0.7.0's `precompute_eagle3`, on the same target, data and flags.

Both run as command-line tools in their own process, from launch to exit (imports, data loading
and tokenization, draft vocabulary, model load, every forward, every write), alternating (the
order reverses each round, so a drift of the machine's load favours neither). Per round the ratio
is NeMo's wall time over ours; the median over rounds is reported with the range.

NeMo runs unchanged except its model loader, `NeMoAutoModelForCausalLM` (CUDA-only), which is
swapped for `transformers.AutoModelForCausalLM`, the loader ours uses.

Both run in the same environment: the same interpreter and the same `sys.path`, NeMo's own site
folder (see the Makefile) appended for both before anything is imported. transformers imports
torchao, which only that folder holds, on every model load; with the folder on one tool's path
only, that tool alone would pay the import. The comparison is of the tools, not their paths.

Start-up is measured too: from the launch to the first `nn.Module.forward` call in the process
(a global forward pre-hook, installed before anything else, records it once and removes itself).

Setting: the embedded `tiny-llama` (8 layers, hidden 64) on the sample chats both tools read the
same way (no `tool` turn: NeMo requires a `tool_call_id` there and has no ShareGPT `tool` role;
string contents only, the input of the runs the README reports), seq 512, draft
vocab 512, bf16 cache, batch size 4 (NeMo's default) and shard size 256 for both, on CPU (both
compute in fp32 there). Each run gets a fresh `datasets` cache, so ours tokenizes cold. torch
runs ONE intra-op thread in both (`--threads`): on a shared 2-core machine identical 2-thread
runs vary several-fold. Both tools' outputs are checked to hold the same number of samples and
the same draft vocabulary.

A third run per round is a diagnostic, not the comparison: ours with NeMo's tokens per forward
(batch size x seq) as its token budget and no cap on samples per forward (`ours_budget`).

Run: .venv/bin/python benchmarks/nemo_speed.py [--rounds N] [--seq S] [--draft-vocab VD]
     [--batch-size B] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _common  # noqa: F401  (first: fresh HF_DATASETS_CACHE before datasets loads)
from _common import ROOT, machine_line, quiet_env, sample_chat_lines, table, temp_dir, write_results

NAME = "nemo_speed"
TARGET_RATIO = 2.0
# ours_budget: length-sorted short samples share a forward up to NeMo's tokens per forward,
# instead of at most 4 samples per forward whatever their length.
TOOLS = ("ours", "nemo", "ours_budget")


# ---- child: one run of one tool, instrumented only with the first-forward probe ---------------


def record_first_forward() -> None:
    """Print the wall-clock time of the first module forward of this process, once."""
    import torch

    def hook(module, args):
        handle.remove()
        print(json.dumps({"first_forward_unix": time.time()}), flush=True)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)


def use_nemo_site() -> None:
    """NeMo Automodel's own site folder (see the Makefile), appended to the path of every run, ours
    included, so both tools import the same libraries (torchao among them, on each model load)."""
    site = Path(sys.prefix) / "nemo-site"
    if site.is_dir() and str(site) not in sys.path:
        sys.path.append(str(site))


def run_tool(tool: str, argv: list[str]) -> int:
    use_nemo_site()  # first, whatever the tool: the same path for both
    import torch

    torch.set_num_threads(int(os.environ.get("NEMO_SPEED_THREADS", "1")))
    record_first_forward()
    if tool.startswith("ours"):
        from builder.cli import main

        return main(["build", *argv])
    import transformers
    from nemo_automodel.components.speculative import precompute_eagle3

    precompute_eagle3.NeMoAutoModelForCausalLM = transformers.AutoModelForCausalLM  # its loader is CUDA-only
    return precompute_eagle3.main(argv)


# ---- parent ------------------------------------------------------------------------------------


def nemo_accepted_chats(path: Path) -> int:
    """The sample chats both tools read the same way: no `tool` turn (NeMo's chat dataset raises on
    those) and every content a string (the input of the runs the README reports)."""
    kept = []
    for line in sample_chat_lines():
        row = json.loads(line)
        turns = row.get("conversations") or row.get("messages")
        if all(turn.get("from", turn.get("role")) != "tool" and isinstance(turn.get("value", turn.get("content")), str) for turn in turns):
            kept.append(line)
    path.write_bytes(b"\n".join(kept) + b"\n")
    return len(kept)


def tool_args(tool: str, data: Path, out: Path, args) -> list[str]:
    batch = ["--batch-size", str(args.batch_size)]
    if tool == "ours_budget":
        batch = ["--batch-size", "1024", "--max-tokens-per-batch", str(args.batch_size * args.seq)]
    common = [
        "--target-model",
        TINY_PATH,
        "--input-data",
        str(data),
        "--output-dir",
        str(out),
        "--seq-length",
        str(args.seq),
        "--draft-vocab-size",
        str(args.draft_vocab),
        *batch,
        "--shard-size",
        "256",
        "--dtype",
        "bf16",
    ]
    if tool == "nemo":
        return [*common, "--device", "cpu", "--log-level", "WARNING"]
    return [*common, "--quiet"]


def run_once(tool: str, data: Path, args) -> dict:
    out = Path(temp_dir(f"nemo-speed-{tool}")) / "cache"
    env = quiet_env(temp_dir(f"hf-{tool}"))
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), NEMO_SPEED_THREADS=str(args.threads))
    command = [sys.executable, __file__, "--child", tool, "--", *tool_args(tool, data, out, args)]
    start_unix, start = time.time(), time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise RuntimeError(f"{tool} failed with exit status {proc.returncode}")
    probe = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"first_forward_unix"')]
    return {"tool": tool, "wall_s": wall, "startup_s": probe[0]["first_forward_unix"] - start_unix, "output": str(out)}


def check_same_work(ours_dir: str, nemo_dir: str, rows: int) -> dict:
    """Both caches hold every row and the same draft vocabulary: the same work was done."""
    from builder.reader import read_manifest, read_vocab

    manifest = read_manifest(ours_dir)
    nemo = json.loads((Path(nemo_dir) / "manifest.json").read_text())
    same_vocab = read_vocab(ours_dir)["selected_token_ids"].tolist() == nemo["selected_token_ids"]
    if not (manifest["totals"]["samples"] == nemo["num_samples"] == rows and same_vocab):
        raise RuntimeError(
            f"the two runs differ: samples {manifest['totals']['samples']} vs {nemo['num_samples']} (of {rows}), same vocab: {same_vocab}"
        )
    return {
        "samples": rows,
        "tokens": manifest["totals"]["tokens"],
        "loss_tokens": manifest["totals"]["loss_tokens"],
        "same_draft_vocab": same_vocab,
    }


def summarise(runs: list[dict], key: str) -> dict:
    values = {tool: [r[key] for r in runs if r["tool"] == tool] for tool in TOOLS}
    return {tool: {"median": statistics.median(v), "min": min(v), "max": max(v), "all": v} for tool, v in values.items()}


def per_round(runs: list[dict]):
    """{tool: run} of each round."""
    for round_index in sorted({r["round"] for r in runs}):
        yield {r["tool"]: r for r in runs if r["round"] == round_index}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--draft-vocab", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    try:
        use_nemo_site()
        import nemo_automodel  # noqa: F401
    except ImportError:
        print("needs nemo-automodel==0.7.0 (make installs it: see the Makefile)", file=sys.stderr)
        return 2

    print(machine_line())
    data = Path(temp_dir("nemo-speed-data")) / "chats.jsonl"
    rows = nemo_accepted_chats(data)
    runs, ratios, work = [], [], None
    for round_index in range(args.rounds):
        order = TOOLS if round_index % 2 == 0 else TOOLS[::-1]
        got = {tool: run_once(tool, data, args) for tool in order}
        work = work or check_same_work(got["ours"]["output"], got["nemo"]["output"], rows)
        check_same_work(got["ours_budget"]["output"], got["nemo"]["output"], rows)
        ratios.append(got["nemo"]["wall_s"] / got["ours"]["wall_s"])
        for tool in order:
            runs.append({"round": round_index, **{k: v for k, v in got[tool].items() if k != "output"}})
            print(f"round {round_index}: {tool:4s} wall {got[tool]['wall_s']:6.1f} s, start-up {got[tool]['startup_s']:5.1f} s", flush=True)
    for run in runs:
        run["after_startup_s"] = run["wall_s"] - run["startup_s"]  # forwards, writes, card, exit
    wall, startup, after = summarise(runs, "wall_s"), summarise(runs, "startup_s"), summarise(runs, "after_startup_s")
    after_ratios = [by_tool["nemo"]["after_startup_s"] / by_tool["ours"]["after_startup_s"] for by_tool in per_round(runs)]
    budget_ratios = [by_tool["nemo"]["wall_s"] / by_tool["ours_budget"]["wall_s"] for by_tool in per_round(runs)]
    median_ratio = statistics.median(ratios)
    rows_table = [
        [
            tool,
            wall[tool]["median"],
            f"{wall[tool]['min']:.1f}-{wall[tool]['max']:.1f}",
            startup[tool]["median"],
            f"{startup[tool]['min']:.1f}-{startup[tool]['max']:.1f}",
        ]
        for tool in TOOLS
    ]
    print(
        table(
            ["tool", "wall s (median)", "range", "start-up s (median)", "range"],
            rows_table,
            title=f"\n{rows} chats, seq {args.seq}, Vd {args.draft_vocab}, bf16, batch {args.batch_size}, "
            f"{args.threads} torch thread(s), {args.rounds} rounds",
        )
    )
    print(
        f"NeMo wall / ours: median {median_ratio:.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}; target >= {TARGET_RATIO}: "
        f"{'MET' if median_ratio >= TARGET_RATIO else 'NOT MET'})"
    )
    print(
        f"start-up NeMo / ours: {startup['nemo']['median'] / startup['ours']['median']:.2f}x (medians); after the first forward "
        f"NeMo / ours: median {statistics.median(after_ratios):.2f}x (range {min(after_ratios):.2f}-{max(after_ratios):.2f})"
    )
    print(
        f"diagnostic, ours at NeMo's tokens per forward ({args.batch_size * args.seq}) without the 4-sample cap: NeMo wall / ours "
        f"median {statistics.median(budget_ratios):.2f}x (range {min(budget_ratios):.2f}-{max(budget_ratios):.2f})"
    )
    path = write_results(
        NAME,
        {
            "setting": {
                "target": "tiny-llama",
                "input": "sample chats without a tool turn or list-of-parts content",
                "rows": rows,
                "seq_length": args.seq,
                "draft_vocab_size": args.draft_vocab,
                "dtype": "bf16",
                "batch_size": args.batch_size,
                "shard_size": 256,
                "torch_threads": args.threads,
                "device": "cpu",
                "nemo_automodel": _nemo_version(),
                "nemo_change": "NeMoAutoModelForCausalLM swapped for transformers.AutoModelForCausalLM",
                "environment": "the same interpreter and sys.path for both tools, NeMo's site folder appended for both",
            },
            "work": work,
            "rounds": args.rounds,
            "runs": runs,
            "wall_s": wall,
            "startup_s": startup,
            "after_startup_s": after,
            "ratios": {
                "nemo_wall_over_ours": ratios,
                "median": median_ratio,
                "min": min(ratios),
                "max": max(ratios),
                "meets_2x": median_ratio >= TARGET_RATIO,
                "startup_nemo_over_ours_medians": startup["nemo"]["median"] / startup["ours"]["median"],
                "after_startup_nemo_over_ours": after_ratios,
                "after_startup_median": statistics.median(after_ratios),
                "diagnostic_nemo_wall_over_ours_budget": budget_ratios,
                "diagnostic_budget_median": statistics.median(budget_ratios),
            },
        },
    )
    print(f"results: {path}")
    return 0


def _nemo_version() -> str:
    from importlib.metadata import version

    return version("nemo-automodel")


TINY_PATH = str(ROOT / "builder" / "assets" / "tiny-llama")

if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(run_tool(sys.argv[2], sys.argv[4:]))
    sys.exit(main())
