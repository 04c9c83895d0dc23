"""Tokenization + loss masking throughput: tokenizing must not be the bottleneck.

Measures `builder.tokenize.tokenize_rows` (the cached `datasets.map` the build runs) on the
embedded sample conversations repeated verbatim to 3000 rows (a temp JSONL; nothing varies
but repetition), at num_proc 1 and 2, for both loss-mask paths:

  generation  the template's {% generation %} blocks (return_assistant_tokens_mask)
  prefix      prefix-rendering spans (builder/assets/templates/no_generation.jinja)

Each cold run reads its own byte-identical copy of the JSONL (a new path gives a new
`datasets` fingerprint, so nothing is reused), in a fresh temporary HF_DATASETS_CACHE; then
`tokenize_rows` is called again on the same rows, and the ratio second/first shows what the
fingerprint cache saves on a rerun. Every configuration runs three times (interleaved) and
the fastest run counts, which damps the noise of other processes on a shared machine.

Then the tiny target on the same machine: the 300 sample chats at seq 2048 in the build's
token-budget batches (what a small build runs), timed as `Target.forward` (the decoder with the aux
hooks) and as `Target.supervise` (forward + lm_head + supervision, what the build runs per
batch), with torch's default threads (the build's setting) and with
one thread (two passes each; per batch the fastest counts). Tokenization samples/s over
forward samples/s says how many times faster the data side is than the cheapest possible
target; the one-thread figure against num_proc 1 compares one core with one core, which
moves least when other processes load the machine (torch's threads suffer most from that).

Run: .venv/bin/python benchmarks/tokenize_throughput.py
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import _common  # noqa: F401  (first: fresh HF_DATASETS_CACHE before datasets loads)
from _common import load_average, machine_line, table, temp_dir, write_replicated_jsonl, write_results

NAME = "tokenize_throughput"
ROWS = 3000
REPEATS = 3
FORWARD_PASSES = 2
SEQ_LENGTH = 2048
PATHS = ("generation", "prefix")
NUM_PROCS = (1, 2)
FORWARD_BUILD = dict(target_model="tiny-llama", input_data="sample-chats", seq_length=SEQ_LENGTH, draft_vocab_size=256, dtype="bf16")


def measure_tokenize(jsonl: Path, tokenizer, template: str, num_proc: int) -> dict:
    from builder.inputs import load_rows, select_rows
    from builder.tokenize import tokenize_rows

    rows, _ = load_rows(str(jsonl))
    rows, source_indices = select_rows(rows, 42, None)
    start = time.perf_counter()
    first = tokenize_rows(rows, source_indices, tokenizer, template, SEQ_LENGTH, num_proc)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    second = tokenize_rows(rows, source_indices, tokenizer, template, SEQ_LENGTH, num_proc)
    second_s = time.perf_counter() - start
    reasons = first["skip_reason"]
    return {
        "rows": len(first),
        "valid_rows": sum(1 for r in reasons if not r),
        "tokens": int(sum(first["num_tokens"])),
        "loss_tokens": int(sum(first["num_loss_tokens"])),
        "first_s": first_s,
        "second_s": second_s,
        "second_reused_first_cache_files": sorted(c["filename"] for c in first.cache_files)
        == sorted(c["filename"] for c in second.cache_files),
    }


def measure_forward() -> dict:
    """The tiny target on the batches a 300-sample build runs: forward, then head + supervision,
    with torch's default threads (what the build uses) and with one thread (per core)."""
    import torch

    from builder.batching import pad_batch, plan_batches
    from builder.config import BuildConfig
    from builder.prepare import prepare
    from builder.target import Target, compute_device, load_model

    prep = prepare(BuildConfig(output_dir=str(Path(temp_dir("forward")) / "cache"), **FORWARD_BUILD))
    rows = [prep.samples[i] for i in range(len(prep.samples))]
    device, dtype = compute_device()
    target = Target(load_model(prep.model_path, None, False, device, dtype), prep.aux_layer_ids)
    pad_id = prep.tokenizer.pad_token_id or 0
    batches = [
        pad_batch([rows[i]["input_ids"] for i in batch], [rows[i]["loss_mask"] for i in batch], pad_id)
        for batch in plan_batches([r["num_tokens"] for r in rows], prep.cfg.token_budget, prep.cfg.batch_size)
    ]
    selected = torch.as_tensor(prep.selected_token_ids)
    default_threads = torch.get_num_threads()
    n = len(rows)
    result = {
        "samples": n,
        "tokens": int(sum(r["num_tokens"] for r in rows)),
        "loss_tokens": int(sum(r["num_loss_tokens"] for r in rows)),
        "batches": len(batches),
        "token_budget": prep.cfg.token_budget,
        "passes": FORWARD_PASSES,
        "torch_threads": default_threads,
    }
    for label, threads in (("", default_threads), ("one_thread_", 1)):
        torch.set_num_threads(threads)
        target.supervise(*batches[-1], selected)  # warm-up on the smallest batch
        forward_times = [float("inf")] * len(batches)
        supervise_times = [float("inf")] * len(batches)
        for _ in range(FORWARD_PASSES):  # per batch, the fastest pass counts (damps other processes' noise)
            for b, (ids, attention, loss) in enumerate(batches):
                start = time.perf_counter()
                target.forward(ids, attention)  # the decoder with the aux hooks
                middle = time.perf_counter()
                target.supervise(ids, attention, loss, selected)  # what the build runs per batch
                end = time.perf_counter()
                forward_times[b] = min(forward_times[b], middle - start)
                supervise_times[b] = min(supervise_times[b], end - middle)
        forward_s, supervise_s = sum(forward_times), sum(supervise_times)
        result.update(
            {
                f"{label}forward_s": forward_s,
                f"{label}supervise_s": supervise_s,
                f"{label}forward_samples_per_s": n / forward_s,
                f"{label}supervised_forward_samples_per_s": n / supervise_s,
            }
        )
    torch.set_num_threads(default_threads)
    target.close()
    return result


def main() -> dict:
    _common.quiet_libraries()
    from builder.embedded import NO_GENERATION_TEMPLATE, WITH_GENERATION_TEMPLATE, resolve_target
    from builder.target import load_tokenizer
    from builder.tokenize import has_generation_blocks

    tokenizer = load_tokenizer(resolve_target("tiny-llama"), None, False)
    templates = {"generation": WITH_GENERATION_TEMPLATE.read_text(), "prefix": NO_GENERATION_TEMPLATE.read_text()}
    assert has_generation_blocks(templates["generation"]) and not has_generation_blocks(templates["prefix"])
    input_dir = Path(temp_dir("input"))
    original = write_replicated_jsonl(input_dir / "chats-x10.jsonl", ROWS)
    print(
        f"{NAME}: {ROWS:,} rows (the 300 sample chats x{ROWS // 300}), seq_length {SEQ_LENGTH}; "
        f"best of {REPEATS} cold runs per configuration, each on its own copy of the input",
        flush=True,
    )
    load_before = load_average()

    runs: dict[tuple[str, int], list[dict]] = {}
    copy = 0
    for repeat in range(REPEATS):
        order = [(p, n) for p in PATHS for n in NUM_PROCS]
        for path_kind, num_proc in order[repeat % len(order) :] + order[: repeat % len(order)]:
            copy += 1
            jsonl = input_dir / f"copy{copy}" / "chats-x10.jsonl"
            jsonl.parent.mkdir()
            shutil.copyfile(original, jsonl)
            run = measure_tokenize(jsonl, tokenizer, templates[path_kind], num_proc)
            runs.setdefault((path_kind, num_proc), []).append(run)
            print(
                f"  run {repeat + 1}: {path_kind:10s} num_proc={num_proc}: {run['rows'] / run['first_s']:,.0f} samples/s cold, "
                f"second run {run['second_s'] / run['first_s']:.4f}x the first",
                flush=True,
            )

    configs = []
    for (path_kind, num_proc), results in runs.items():
        best = min(results, key=lambda r: r["first_s"])
        configs.append(
            {
                "path": path_kind,
                "num_proc": num_proc,
                **best,
                "second_s": min(r["second_s"] for r in results),
                "all_first_s": [r["first_s"] for r in results],
                "all_second_s": [r["second_s"] for r in results],
                "samples_per_s": best["rows"] / best["first_s"],
                "cached_over_first": min(r["second_s"] for r in results) / best["first_s"],
                "second_reused_first_cache_files": all(r["second_reused_first_cache_files"] for r in results),
            }
        )
    configs.sort(key=lambda c: (PATHS.index(c["path"]), c["num_proc"]))
    print("  tiny target forward on the build's batches ...", flush=True)
    forward = measure_forward()
    load_after = load_average()

    by = {(c["path"], c["num_proc"]): c for c in configs}
    ratios = {}
    for path_kind in PATHS:
        ratios[f"{path_kind}_num_proc2_over_1_speedup"] = by[(path_kind, 2)]["samples_per_s"] / by[(path_kind, 1)]["samples_per_s"]
        for num_proc in NUM_PROCS:
            c = by[(path_kind, num_proc)]
            ratios[f"{path_kind}_np{num_proc}_cached_over_first_time"] = c["cached_over_first"]
            ratios[f"{path_kind}_np{num_proc}_tokenize_over_forward"] = c["samples_per_s"] / forward["forward_samples_per_s"]
            ratios[f"{path_kind}_np{num_proc}_tokenize_over_supervised_forward"] = (
                c["samples_per_s"] / forward["supervised_forward_samples_per_s"]
            )
        # per core: one tokenizing process against the target on one thread
        ratios[f"{path_kind}_np1_tokenize_over_one_thread_forward"] = (
            by[(path_kind, 1)]["samples_per_s"] / forward["one_thread_forward_samples_per_s"]
        )
    ratios["prefix_over_generation_np1"] = by[("prefix", 1)]["samples_per_s"] / by[("generation", 1)]["samples_per_s"]

    print()
    print(
        table(
            [
                "loss-mask path",
                "num_proc",
                "cached/first time",
                f"tokenize/forward ({forward['torch_threads']} thr)",
                "tokenize/supervise (2 thr)",
                "per core: tokenize/forward (1 thr)",
            ],
            [
                [
                    c["path"],
                    c["num_proc"],
                    c["cached_over_first"],
                    c["samples_per_s"] / forward["forward_samples_per_s"],
                    c["samples_per_s"] / forward["supervised_forward_samples_per_s"],
                    c["samples_per_s"] / forward["one_thread_forward_samples_per_s"] if c["num_proc"] == 1 else "-",
                ]
                for c in configs
            ],
            title="Ratios (one run, one machine; samples/s ratios, > 1 = tokenizing is faster than the target):",
        )
    )
    print(
        f"  num_proc 2 / 1 speed-up: generation {ratios['generation_num_proc2_over_1_speedup']:.2f}x, "
        f"prefix {ratios['prefix_num_proc2_over_1_speedup']:.2f}x; "
        f"prefix / generation samples/s (num_proc 1): {ratios['prefix_over_generation_np1']:.2f}x"
    )
    same = by[("generation", 1)]["loss_tokens"] == by[("prefix", 1)]["loss_tokens"]
    print(
        f"  both paths mask the same number of tokens: {same} "
        f"({by[('generation', 1)]['loss_tokens']:,} / {by[('prefix', 1)]['loss_tokens']:,});"
        f" every second run reused the first run's cache files: {all(c['second_reused_first_cache_files'] for c in configs)}"
    )
    print()
    print(
        table(
            ["measurement", "seconds", "samples", "samples/s"],
            [
                *[
                    [f"tokenize {c['path']} np{c['num_proc']}, cold (best of {REPEATS})", c["first_s"], c["rows"], c["samples_per_s"]]
                    for c in configs
                ],
                *[
                    [f"tokenize {c['path']} np{c['num_proc']}, cached rerun", c["second_s"], c["rows"], c["rows"] / c["second_s"]]
                    for c in configs
                ],
                ["tiny target forward (aux hooks)", forward["forward_s"], forward["samples"], forward["forward_samples_per_s"]],
                [
                    "tiny target Target.supervise (forward + lm_head + supervision)",
                    forward["supervise_s"],
                    forward["samples"],
                    forward["supervised_forward_samples_per_s"],
                ],
                [
                    "tiny target forward, 1 thread",
                    forward["one_thread_forward_s"],
                    forward["samples"],
                    forward["one_thread_forward_samples_per_s"],
                ],
                [
                    "tiny target Target.supervise, 1 thread",
                    forward["one_thread_supervise_s"],
                    forward["samples"],
                    forward["one_thread_supervised_forward_samples_per_s"],
                ],
            ],
            title="Absolute figures (CPU; they only matter relative to each other):",
        )
    )
    print(
        f"  forward: {forward['samples']} samples, {forward['tokens']:,} tokens, {forward['batches']} token-budget batches "
        f"(budget {forward['token_budget']:,} tokens, batch <= 8), fastest of {forward['passes']} passes per batch, "
        f"{forward['torch_threads']} torch threads and 1"
    )
    print(f"  {machine_line()}, at the start {load_before[:1]}")
    data = {
        "rows": ROWS,
        "seq_length": SEQ_LENGTH,
        "repeats": REPEATS,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "configs": configs,
        "forward": forward,
        "ratios": ratios,
    }
    path = write_results(NAME, data)
    print(f"  wrote {path.relative_to(_common.ROOT)}")
    return data


if __name__ == "__main__":
    main()
