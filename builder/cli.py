"""`eagle3-cache` command line: `build` (and `scripts/build_cache.py`, same parser) and `push`."""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import gc
import importlib
import json
import logging
import os
import sys
from contextlib import contextmanager

from .embedded import describe_embedded
from .errors import Eagle3CacheError
from .files import misread_in_path


def add_settings(p: argparse.ArgumentParser, groups: tuple[str, ...]) -> dict:
    """One option per BuildConfig setting of these groups, derived from the field: flag, type,
    default and help (with the default it shows). Returns the argument groups by key."""
    from typing import get_type_hints

    from .config import SETTING_GROUPS, BuildConfig, flag_of, settings

    hints = get_type_hints(BuildConfig)
    made = {key: p.add_argument_group(SETTING_GROUPS[key]) for key in groups}
    for f in settings():
        meta = f.metadata
        if meta["api_only"] or meta["group"] not in made:
            continue
        default = f.default if f.default is not dataclasses.MISSING else meta["cli_default"]
        shown = shown_default(meta["shown_default"], default)
        options = {"default": default, "help": meta["help"] + (f" (default: {shown})" if shown is not None else "")}
        if hints[f.name] is bool:
            options["action"] = "store_true"
        elif meta["parse"] is not None or hints[f.name] in (int, int | None):
            options["type"] = meta["parse"] or int
        if meta["metavar"]:
            options["metavar"] = meta["metavar"]
        made[meta["group"]].add_argument(flag_of(f.name), **options)
    return made


def shown_default(shown, default):
    """What --help says a setting's default is: its own words, a function of the value, or the value."""
    if callable(shown):
        return shown(default)
    return shown or (default if default not in (None, False) else None)


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    """The build settings (all but uploading), and --quiet."""
    groups = add_settings(p, ("target", "input", "cache", "placement", "run", "writer"))
    groups["run"].add_argument("--quiet", action="store_true", help="no progress bar")


def add_hub_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by `push` and `build --push-to-hub`."""
    add_settings(p, ("hub",))


def config_from_args(args: argparse.Namespace):
    """The BuildConfig of a parsed `build` command line: every setting is an option of the same name."""
    from .config import BuildConfig, settings

    return BuildConfig(**{f.name: getattr(args, f.name) for f in settings() if not f.metadata["api_only"]})


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
    add_settings(build, ("upload",))
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
        "values. With --recompute N, rerun the target on N random samples and compare: exact "
        "in fp32, within one rounding step of bf16/fp16. Only shards computed on this kind of device in this dtype "
        "(each shard's record says which) can match: others are skipped with a warning. A shard computed on another "
        "CPU instruction set, GPU model or torch/CUDA version is compared within 16 rounding steps in fp32/fp64 "
        "compute, with a warning, and skipped in bf16/fp16 compute (a GPU's); a recompute with no shard left stops "
        "with exit status 2. Exit status 1 on any problem, "
        "2 when verify cannot run (no finished cache there, an unknown repo or config, a damaged card, another "
        "target, nothing to recompute, or shards a build uploaded and deleted here: verify the repo instead).",
    )
    verify.add_argument("cache_dir", metavar="DIR|REPO", help="cache directory, or a Hub dataset repo id (downloaded)")
    verify.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of a repo id (not of a directory)")
    verify.add_argument(
        "--name", default=None, metavar="CONFIG", help="the cache (config, a sub-folder) of a repo or directory holding several"
    )
    verify.add_argument("--recompute", type=sample_count, default=0, metavar="N", help="samples to recompute with the target (default: 0)")
    verify.add_argument("--seed", type=int, default=None, help="seed choosing the recomputed samples (with --recompute; default: 0)")
    verify.add_argument("--target-model", default=None, help="the target, if not where the manifest says (with --recompute)")
    verify.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let --recompute run the target's own code (its auto_map), as a build with --trust-remote-code did",
    )
    verify.set_defaults(func=run_verify)
    export = sub.add_parser("export", help="write a cache in another trainer's offline format (nemo, specforge)")
    export.add_argument("cache_dir", metavar="DIR|REPO", help="cache directory, or a Hub dataset repo id (read at one commit)")
    export.add_argument(
        "--to",
        required=True,
        choices=("nemo", "specforge"),
        help="nemo: NeMo Automodel's cached_target_path (format 2); specforge: SpecForge offline files (hidden caches)",
    )
    export.add_argument("out_dir", metavar="OUT", help="new or empty output directory")
    export.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of a repo id (not of a directory)")
    export.add_argument(
        "--name", default=None, metavar="CONFIG", help="the cache (config, a sub-folder) of a repo or directory holding several"
    )
    export.add_argument(
        "--target-model", default=None, help="the target, for its input embeddings and pad token (nemo), if not where the manifest says"
    )
    export.set_defaults(func=run_export)
    return parser


def run_export(args: argparse.Namespace) -> int:
    from .export import export_cache

    out = export_cache(args.cache_dir, args.to, args.out_dir, name=args.name, revision=args.revision, target_model=args.target_model)
    print(f"Exported {args.cache_dir} for {args.to} to {out}")
    return 0


def sample_count(text: str) -> int:
    """--recompute's N: a whole number of samples, 0 for none."""
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of samples, 0 or more (0: recompute none), got {text!r}")
    return count


def run_verify(args: argparse.Namespace) -> int:
    from .verify import verify_cache

    problems = verify_cache(
        args.cache_dir,
        recompute=args.recompute,
        seed=args.seed,
        target_model=args.target_model,
        revision=args.revision,
        name=args.name,
        trust_remote_code=args.trust_remote_code,
    )
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        print(f"{args.cache_dir}: {len(problems)} problem(s)")
        return 1
    if args.recompute and problems.recomputed < args.recompute:
        print(
            f"{args.cache_dir}: OK (only {problems.recomputed} of the {args.recompute} samples asked for could be recomputed, "
            "see the warnings; they match)"
        )
    else:
        print(f"{args.cache_dir}: OK" + (" (the recomputed samples match)" if args.recompute else ""))
    return 0


def target_from_args(args: argparse.Namespace, repo_id: str):
    from .push_target import PushTarget, validate_target

    target = PushTarget(repo_id, config=args.hub_config, branch=args.hub_branch, tag=args.hub_tag, private=args.private)
    validate_target(target)
    return target


def run_push(args: argparse.Namespace) -> int:
    from .push import push_cache

    result = push_cache(args.cache_dir, target_from_args(args, args.repo_id))
    where = f"{result.repo_id}@{result.tag or result.branch}" + (f" (config {result.config})" if result.config else "")
    print(
        f"Pushed {args.cache_dir} to {where}: commit {result.commit[:12]}, {len(result.uploaded)} shards uploaded, "
        f"{len(result.skipped)} already there, {len(result.deleted)} files of an earlier version removed"
    )
    print(f"  read it: {result.load_snippet()}")
    return 0


# What every build imports: the builder (torch, datasets), accelerate, and transformers' model
# code (config, tokenizer and model loading); a dry run loads no model.
BUILD_IMPORTS = ("builder.pipeline", "accelerate")
MODEL_IMPORTS = ("transformers.modeling_utils",)


@contextmanager
def startup_objects_frozen(modules: tuple[str, ...]):
    """Import `modules` with the cyclic collector paused, then freeze every object alive until the
    block ends. Imports make millions of long-lived objects, and each full collection during a build
    walked all of them to free nothing: over a second of a small build. Unfrozen at the end, so a
    caller that goes on (a notebook, a test) gets its collector back as it was."""
    enabled, caller_froze = gc.isenabled(), gc.get_freeze_count() > 0  # a caller's own freeze is left alone
    gc.disable()
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        if enabled:
            gc.enable()
    if not caller_froze:
        gc.freeze()
    try:
        yield
    finally:
        if not caller_froze:
            gc.unfreeze()


def run_build(args: argparse.Namespace) -> int:
    caller_group = process_group_up()  # a caller's own group (main called in-process) is left to the caller
    with startup_objects_frozen(BUILD_IMPORTS + (() if args.dry_run else MODEL_IMPORTS)):
        status = report_build(args)
    if not caller_group:
        release_process_group()
    return status


def process_group_up() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def release_process_group() -> None:
    """Tear down the launch's process group once the build returned on this rank. Left up, its threads
    outlive the interpreter's shutdown, and gloo's can abort the process at exit, so a launcher reads
    a build that succeeded as failed. Not after a failure: another rank may still wait in a
    collective, and tearing the group down under it can hang."""
    import torch.distributed as dist

    if process_group_up():
        dist.destroy_process_group()


def silence_library_progress_bars() -> None:
    """--quiet: also the bars the libraries draw (datasets: loading, tokenizing; transformers: loading
    the weights; huggingface_hub: downloads and uploads)."""
    from datasets import disable_progress_bars
    from huggingface_hub.utils import disable_progress_bars as disable_hub_progress_bars
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bars()
    disable_hub_progress_bars()
    disable_progress_bar()


def report_build(args: argparse.Namespace) -> int:
    from .pipeline import build
    from .plan import format_plan, plan_summary

    cfg = config_from_args(args)
    if args.quiet:
        silence_library_progress_bars()
    result = build(cfg, progress=not args.quiet)
    if result.rank != 0:
        if not cfg.dry_run:
            print(f"[rank {result.rank}/{result.world_size}] wrote {len(result.written)} shards: {result.written}")
        return 0
    if cfg.dry_run:
        print(format_plan(plan_summary(result.prepared)))
        return 0
    if result.manifest is None:  # the Hub already held this very build under its tag: nothing was built
        print(f"{result.pushed.repo_id}@{result.pushed.tag} already holds this build; read it: {result.pushed.load_snippet()}")
        return 0
    print(f"[rank 0/{result.world_size}] wrote {len(result.written)} shards: {result.written}")
    print(format_summary(result))
    if result.pushed is not None:
        print(f"  pushed: {result.pushed.load_snippet()}")
    return 0


def counted(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('s') else 's'}"


def format_summary(result) -> str:
    from dataset_card import summary_rows

    m = result.manifest
    written = sum(len(r["shards_written"]) for r in m["build"]["ranks"])
    lines = [
        f"Cache written to {result.output_dir} (fingerprint {m['fingerprint']}; "
        f"{counted(written, 'shard')} written by {counted(result.world_size, 'process')}, "
        f"{len(m['shards']) - written} already complete)"
    ]
    lines += [f"  {name:<60s} {value}" for name, value in summary_rows(m)]
    if m["skipped"]:
        lines.append(f"  skipped by reason: {json.dumps(m['skipped'])}")
    lines.append(f"  read it: {how_to_read_local(result.output_dir, m)}")
    return "\n".join(lines)


def how_to_read_local(output_dir, manifest: dict) -> str:
    """How to read the cache just written where it was written: not at all where its shards were
    uploaded and deleted here (--delete-local-after-upload), and not by a path `datasets` misreads."""
    if not all((output_dir / "data" / shard["name"]).exists() for shard in manifest["shards"]):
        return "not from here: the shards were uploaded and deleted here (--delete-local-after-upload); read the pushed cache"
    if misread_in_path(os.path.abspath(output_dir)):
        return (
            "rename or move the folder first: `datasets` reads '*', '?', '[' and '::' in a path as a pattern or URL, "
            "and '$' as an environment variable"
        )
    return f"builder.load_cache({str(output_dir)!r}, layout='nemo')"


def _is_main_process() -> bool:
    """Log on rank 0 only (before torch.distributed exists, the launcher's env tells the rank)."""
    return os.environ.get("RANK", "0") == "0"


def skip_final_collection() -> None:
    """At exit, freeze every object instead of letting the interpreter's last full collection walk
    them: after a build that walk covers everything torch, transformers and datasets created, and
    takes seconds, to free nothing a written cache needs.
    Runs at interpreter exit only, so calling `main` in a process that goes on changes nothing."""
    atexit.unregister(gc.freeze)  # once, however often main runs in one process
    atexit.register(gc.freeze)


def main(argv: list[str] | None = None) -> int:
    skip_final_collection()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if _is_main_process() else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except Eagle3CacheError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
