"""`eagle3-cache` command line: `build` (and `scripts/build_cache.py`, same parser) and `push`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .embedded import DEFAULT_INPUT, DEFAULT_TARGET, describe_embedded
from .errors import Eagle3CacheError


def _layer_ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,13,28, got {text!r}") from None


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument(
        "--target-model", default=DEFAULT_TARGET, help=f"local model dir, Hub model id, or an embedded name (default: {DEFAULT_TARGET})"
    )
    g.add_argument("--target-revision", default=None, help="Hub revision (branch, tag or commit) of the target")
    g.add_argument("--trust-remote-code", action="store_true", help="allow custom model/tokenizer code from the target repo")
    g.add_argument("--chat-template", default=None, metavar="FILE", help="Jinja chat template overriding the tokenizer's")
    g.add_argument(
        "--aux-layer-ids", type=_layer_ids, default=None, help="decoder layers whose outputs feed the draft (default: 1,N//2-1,N-4)"
    )
    g = p.add_argument_group("input")
    g.add_argument(
        "--input-data",
        default=DEFAULT_INPUT,
        help=".json/.jsonl/.parquet file, a directory of them, a saved dataset, a Hub dataset id, "
        f"or an embedded name (default: {DEFAULT_INPUT})",
    )
    g.add_argument("--input-config", default=None, help="Hub dataset config name")
    g.add_argument("--split", default=None, help="dataset split (default: train)")
    g.add_argument("--max-samples", type=int, default=None, help="use the first N rows of the shuffled input")
    g.add_argument("--shuffle-seed", type=int, default=42, help="seed of the input permutation (default: 42)")
    g.add_argument("--seq-length", type=int, default=2048, help="right-truncate samples to this many tokens (default: 2048)")
    g.add_argument("--num-proc", type=int, default=1, help="processes for tokenization (default: 1)")
    g.add_argument("--strict", action="store_true", help="stop on the first invalid row instead of skipping and counting it")
    g.add_argument(
        "--mask-generation-prompt",
        action="store_true",
        help="leave out of the loss mask the tokens the chat template's generation prompt supplies to each assistant turn "
        "(role header, an empty <think></think>); NeMo Automodel's option of that name (default: supervised)",
    )
    g.add_argument(
        "--mask-reasoning-content",
        action="store_true",
        help="leave the rendered reasoning_content of assistant turns out of the loss mask; "
        "NeMo Automodel's option of that name (default: supervised)",
    )
    g = p.add_argument_group("cache")
    g.add_argument("--output-dir", default="eagle3-cache-out", help="cache directory (default: ./eagle3-cache-out)")
    g.add_argument("--draft-vocab-size", type=int, default=None, help="draft vocabulary size (default: the full target vocab)")
    g.add_argument("--dtype", default="bf16", help="storage dtype of float tensors: bf16, fp16 or fp32 (default: bf16)")
    g.add_argument(
        "--target-format",
        default="probs",
        help="probs (dense draft-vocab probs, exact), topk (the K largest log-probs), "
        "or hidden (final hidden state; logits recomputed by the reader) (default: probs)",
    )
    g.add_argument("--topk", type=int, default=64, help="K of --target-format topk (default: 64)")
    g.add_argument(
        "--aux-dtype",
        default=None,
        help="storage of aux hidden states: bf16, fp16, fp32 or fp8 (e4m3, one scale per token) (default: --dtype)",
    )
    g.add_argument(
        "--store-full-head",
        action="store_true",
        help="hidden format: store every lm_head row, so any draft vocabulary can be read without a rebuild",
    )
    g.add_argument("--shard-size", type=int, default=1000, help="samples per Parquet shard (default: 1000)")
    g.add_argument("--row-group-bytes", type=int, default=128 << 20, help="bytes per Parquet row group (default: 128 MiB)")
    g = p.add_argument_group("placement (targets larger than one GPU)")
    g.add_argument(
        "--gpus-per-target", type=int, default=1, help="GPUs one target replica spans; launch with --num_processes = GPUs / N (default: 1)"
    )
    g.add_argument(
        "--max-memory-per-gpu",
        default=None,
        help="memory budget per GPU, e.g. 70GiB: leaves room for activations (default: the GPU's total)",
    )
    g.add_argument("--device-map", default=None, help='explicit placement: "auto", a JSON object {module: device}, or a JSON file')
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=int, default=8, help="max samples per forward batch (default: 8)")
    g.add_argument(
        "--max-tokens-per-batch",
        type=int,
        default=None,
        help="token budget per forward batch, padding included (default: batch size x seq length)",
    )
    g.add_argument("--resume", action="store_true", help="continue an interrupted build in --output-dir (identity must match)")
    g.add_argument("--dry-run", action="store_true", help="print the plan (samples, tokens, vocab coverage, sizes) and write nothing")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("writer")
    g.add_argument("--compression", default="zstd", help="zstd (lossless: byte planes + zstd, decoded bit-exact) or none (default: zstd)")
    g.add_argument(
        "--writer-threads",
        type=int,
        default=None,
        help="threads encoding and compressing rows per process (default: this process's share of the cores, at most 8)",
    )


def config_from_args(args: argparse.Namespace):
    from .config import BuildConfig

    return BuildConfig(
        target_model=args.target_model,
        target_revision=args.target_revision,
        input_data=args.input_data,
        input_config=args.input_config,
        split=args.split,
        max_samples=args.max_samples,
        shuffle_seed=args.shuffle_seed,
        output_dir=args.output_dir,
        seq_length=args.seq_length,
        draft_vocab_size=args.draft_vocab_size,
        batch_size=args.batch_size,
        max_tokens_per_batch=args.max_tokens_per_batch,
        shard_size=args.shard_size,
        dtype=args.dtype,
        aux_layer_ids=args.aux_layer_ids,
        target_format=args.target_format,
        topk=args.topk,
        aux_dtype=args.aux_dtype,
        store_full_head=args.store_full_head,
        row_group_bytes=args.row_group_bytes,
        resume=args.resume,
        strict=args.strict,
        dry_run=args.dry_run,
        trust_remote_code=args.trust_remote_code,
        chat_template=args.chat_template,
        num_proc=args.num_proc,
        mask_generation_prompt=args.mask_generation_prompt,
        mask_reasoning_content=args.mask_reasoning_content,
        gpus_per_target=args.gpus_per_target,
        max_memory_per_gpu=args.max_memory_per_gpu,
        device_map=args.device_map,
        push_to_hub=args.push_to_hub,
        hub_config=args.hub_config,
        hub_branch=args.hub_branch,
        hub_tag=args.hub_tag,
        private=args.private,
        delete_local_after_upload=args.delete_local_after_upload,
        compression=args.compression,
        writer_threads=args.writer_threads,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eagle3-cache", description="Build, share and read EAGLE-3 supervision caches.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser(
        "build",
        help="run the target over a chat dataset and write a cache",
        epilog=describe_embedded(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_build_arguments(build)
    g = build.add_argument_group("upload while building")
    g.add_argument(
        "--push-to-hub",
        default=None,
        metavar="REPO_ID",
        help="upload each shard to this Hub dataset repo as soon as it is written; card and tag last",
    )
    g.add_argument(
        "--delete-local-after-upload", action="store_true", help="remove each shard locally once uploaded: local disk for only a few shards"
    )
    add_hub_arguments(build)
    build.set_defaults(func=run_build)
    push = sub.add_parser(
        "push",
        help="upload a finished cache to a Hugging Face dataset repo (re-run to resume)",
        description="Upload a finished cache directory to a Hub dataset repo: shards first (a re-run skips those "
        "already there), then card, vocab and pictures in one commit, then the tag. The token comes from HF_TOKEN "
        "or `hf auth login`, the endpoint from HF_ENDPOINT.",
    )
    push.add_argument("cache_dir", metavar="DIR", help="cache directory written by `eagle3-cache build`")
    push.add_argument("repo_id", metavar="REPO_ID", help="dataset repo, e.g. my-org/llama8b-eagle3 (created if missing)")
    add_hub_arguments(push)
    push.set_defaults(func=run_push)
    verify = sub.add_parser(
        "verify",
        help="check a cache against its manifest (and recompute samples live)",
        description="Check every shard against the manifest: presence, size, checksum, schema, rows, shapes, finite "
        "values. With --recompute N, rerun the target on N random samples (same device kind as the build) and "
        "compare: exact in fp32, within one rounding step of bf16/fp16. Exit status 1 on any problem.",
    )
    verify.add_argument("cache_dir", metavar="DIR|REPO", help="cache directory, or a Hub dataset repo id (downloaded)")
    verify.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of a repo id")
    verify.add_argument("--recompute", type=int, default=0, metavar="N", help="samples to recompute with the target (default: 0)")
    verify.add_argument("--seed", type=int, default=0, help="seed choosing the recomputed samples")
    verify.add_argument("--target-model", default=None, help="the target, if not where the manifest says")
    verify.set_defaults(func=run_verify)
    export = sub.add_parser("export", help="write a cache in another trainer's offline format (nemo, specforge)")
    export.add_argument("cache_dir", metavar="DIR", help="cache directory")
    export.add_argument(
        "--to",
        required=True,
        choices=("nemo", "specforge"),
        help="nemo: NeMo Automodel's cached_target_path (format 2); specforge: SpecForge offline files (hidden caches)",
    )
    export.add_argument("out_dir", metavar="OUT", help="new or empty output directory")
    export.add_argument(
        "--target-model", default=None, help="the target, for its input embeddings and pad token (nemo), if not where the manifest says"
    )
    export.set_defaults(func=run_export)
    return parser


def run_export(args: argparse.Namespace) -> int:
    from .export import export_cache

    out = export_cache(args.cache_dir, args.to, args.out_dir, target_model=args.target_model)
    print(f"Exported {args.cache_dir} for {args.to} to {out}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from .verify import verify_cache

    problems = verify_cache(
        args.cache_dir, recompute=args.recompute, seed=args.seed, target_model=args.target_model, revision=args.revision
    )
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        print(f"{args.cache_dir}: {len(problems)} problem(s)")
        return 1
    print(f"{args.cache_dir}: OK" + (f" ({args.recompute} samples recomputed)" if args.recompute else ""))
    return 0


def add_hub_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by `push` and `build --push-to-hub`."""
    g = p.add_argument_group("hub")
    g.add_argument(
        "--hub-config",
        default=None,
        metavar="NAME",
        help="put the cache in sub-folder NAME as config NAME (several caches per repo); default: the repo root",
    )
    g.add_argument("--hub-branch", default="main", help="branch to commit to, created from main if missing (default: main)")
    g.add_argument("--hub-tag", default=None, help="tag naming this version, created only once every file is committed")
    g.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)")


def target_from_args(args: argparse.Namespace, repo_id: str):
    from .push import PushTarget, validate_target

    target = PushTarget(repo_id, config=args.hub_config, branch=args.hub_branch, tag=args.hub_tag, private=args.private)
    validate_target(target)
    return target


def run_push(args: argparse.Namespace) -> int:
    from .push import push_cache

    result = push_cache(args.cache_dir, target_from_args(args, args.repo_id))
    where = f"{result.repo_id}@{result.tag or result.branch}" + (f" (config {result.config})" if result.config else "")
    print(
        f"Pushed {args.cache_dir} to {where}: commit {result.commit[:12]}, {len(result.uploaded)} shards uploaded, "
        f"{len(result.skipped)} already there, {len(result.deleted)} stale data files removed"
    )
    print(f"  read it: {result.load_snippet()}")
    return 0


def run_build(args: argparse.Namespace) -> int:
    from .build import build
    from .plan import format_plan, plan_summary

    cfg = config_from_args(args)
    if args.quiet:  # also the bars of `datasets` (loading, tokenizing)
        from datasets import disable_progress_bars

        disable_progress_bars()
    result = build(cfg, progress=not args.quiet)
    if result.rank != 0:
        if not cfg.dry_run:
            print(f"[rank {result.rank}/{result.world_size}] wrote {len(result.written)} shards: {result.written}")
        return 0
    if cfg.dry_run:
        print(format_plan(plan_summary(result.prepared)))
        return 0
    print(f"[rank 0/{result.world_size}] wrote {len(result.written)} shards: {result.written}")
    print(format_summary(result))
    if result.pushed is not None:
        print(f"  pushed: {result.pushed.load_snippet()}")
    return 0


def format_summary(result) -> str:
    from dataset_card import summary_rows

    m = result.manifest
    written = sum(len(r["shards_written"]) for r in m["build"]["ranks"])
    lines = [
        f"Cache written to {result.output_dir} (fingerprint {m['fingerprint']}; "
        f"{written} shards written by {result.world_size} processes, {len(m['shards']) - written} already complete)"
    ]
    lines += [f"  {name:<60s} {value}" for name, value in summary_rows(m)]
    if m["skipped"]:
        lines.append(f"  skipped by reason: {json.dumps(m['skipped'])}")
    lines.append(f"  read it: builder.load_cache({str(result.output_dir)!r}, layout='nemo')")
    return "\n".join(lines)


def _is_main_process() -> bool:
    """Log on rank 0 only (before torch.distributed exists, the launcher's env tells the rank)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if _is_main_process() else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except Eagle3CacheError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
