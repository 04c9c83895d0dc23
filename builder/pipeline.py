"""The build, orchestrated: prepared samples -> forward (forward.py) -> Parquet shards -> vocab files -> card (last).

Data parallel under `accelerate launch`: every rank prepares the same samples (rank 0
first, so the others reuse its `datasets` cache), rank r writes the shards
k with k % world_size == r, and rank 0 writes the vocab files and the card once every rank
is done. Shard contents depend only on the build's settings, never on the world size,
so a build started on N processes can be resumed on M.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from dataset_card.pictures import PICTURES

from .batching import expected_rows
from .build_state import (
    BUILD_STATE_DIR,
    BUILD_STATE_FILE,
    INPUT_SOURCE_FILE,
    RUN_TOKEN_FILE,
    check_resume,
    holds_cache,
    read_identity,
    read_run_token,
    read_sidecar,
)
from .card import PictureDrawing, remove_dead_drawings, write_card
from .config import BuildConfig
from .errors import (
    ConfigError,
    Eagle3CacheError,
    NonFiniteOutput,
    OtherRankStopped,
    OutputDirNotShared,
    ProcessCountMismatch,
    ShardRecordsMissing,
    ShardUnreadable,
)
from .files import atomic_write, disk_full_as_error, file_hash, mode_of_open, remove_leftovers, write_json_atomic
from .forward import run_forward, write_head_rows
from .hub import Retry
from .kept_samples import check_kept_samples
from .lock import CacheLock, WriterHold
from .manifest import LM_HEAD_FILE, VOCAB_FILE
from .placement import check_placement, load_placed_model
from .prepare import Prepared, prepare
from .shards import shard_name, shard_row_count
from .target import Target

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    output_dir: Path
    prepared: Prepared
    rank: int = 0
    world_size: int = 1
    shards: list[dict] = field(default_factory=list)
    written: list[str] = field(default_factory=list)  # shards written by this rank in this run
    manifest: dict | None = None  # rank 0 only
    placement: dict = field(default_factory=dict)  # recorded in the card; content never depends on it
    pushed: object = None  # push.PushResult of --push-to-hub (rank 0)


def build(cfg: BuildConfig, *, progress: bool = True) -> BuildResult:
    from accelerate import PartialState

    # Without a GPU, accelerate runs several processes only when told they are CPU ranks (gloo).
    # Barriers may wait for hours (rank 0 tokenizing a large input, a rank's last uploads):
    # far past NCCL's 10-minute default watchdog.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=24))
    check_state_counts_every_process(state)
    with state.main_process_first():  # rank 0 tokenizes; the others then hit its cache
        prep = prepare(cfg)
    state.wait_for_everyone()  # every rank has validated the output dir before rank 0 writes to it
    out = Path(cfg.output_dir)
    result = BuildResult(out, prep, state.process_index, state.num_processes)
    if cfg.dry_run:
        return result
    check_placement(prep)  # before any weights load or any file is written
    if cfg.resume:
        # every rank alike, before anything is written
        prep.identity = check_resume(out, prep.identity, prep.tokenizer_hashes, prep.input_hashes, prep.altered_input_hashes)
    uploader = open_uploader(cfg, prep)  # checks token, repo and tag before any GPU time is spent
    if uploader is not None and uploader.already_pushed:
        log.warning("%s already holds this build under tag %s: nothing to do", cfg.push_to_hub, cfg.hub_tag)
        result.pushed = uploader.tagged_result()
        uploader.close()
        return result
    lock, writing = CacheLock(out), WriterHold(out)
    try:
        token = secrets.token_hex(16) if state.num_processes > 1 else None  # rank 0's is the one written
        agree(state, lambda: lock_output_dir(out, lock, token), "taking the output directory")
        check_one_output_dir(state, out, token)
        agree(state, lambda: start_or_continue(out, prep, cfg.resume, lock), "taking the output directory")
        writing.hold()  # every rank, until it stops: a later build refuses the cache while any of them writes
        with disk_full_as_error():
            write_cache(state, prep, out, result, progress, uploader)
    except BaseException:
        if uploader is not None:  # stop now, not after the queued uploads and their retries (an outage: half an hour)
            uploader.close(cancel=True)
        raise
    finally:
        writing.release()
        if state.is_main_process:
            lock.release()
    return result


def check_state_counts_every_process(state) -> None:
    """PartialState reuses a state the caller created first (an `Accelerator()`): made without cpu=True
    on a machine without a GPU, it counts one process though the launch's gloo group holds several, and
    every process would build alone as rank 0 of 1 (the lock then stopping all but one, misleadingly)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    group_size = torch.distributed.get_world_size()
    if group_size != state.num_processes:
        raise ProcessCountMismatch(
            f"build(): torch.distributed runs {group_size} processes, but the accelerate state created before build() "
            f"counts {state.num_processes}, so each process would build alone as rank 0 of {state.num_processes}; "
            f"expected one state for all {group_size}. Without a GPU, create it with Accelerator(cpu=True) or "
            "PartialState(cpu=True), or call build() before creating one (build() creates its own)."
        )


# Uploading as it goes, a build rides out a Hub outage of about half an hour (the bounded queue holds
# the forward meanwhile) rather than throwing hours of target compute away; its start-up checks
# still fail within seconds.
UPLOAD_WHILE_BUILDING_RETRY = Retry(retries=36, backoff=1.0, max_wait=60.0)


def open_uploader(cfg: BuildConfig, prep: Prepared):
    """--push-to-hub: the background uploader every rank hands its finished shards to."""
    if not cfg.push_to_hub:
        return None
    from .manifest import fingerprint
    from .push import ShardUploader
    from .push_target import PushTarget

    target = PushTarget(cfg.push_to_hub, config=cfg.hub_config, branch=cfg.hub_branch, tag=cfg.hub_tag, private=cfg.private)
    # Bounding the queue bounds local disk; without deletion it would only slow the build to upload speed.
    max_pending = 1 if cfg.delete_local_after_upload else 1 << 20
    return ShardUploader(
        target,
        delete_local=cfg.delete_local_after_upload,
        max_pending=max_pending,
        fingerprint=fingerprint(prep.identity),
        upload_retry=UPLOAD_WHILE_BUILDING_RETRY,
        own_shards=[shard_name(k, prep.num_shards) for k in range(prep.num_shards)],
        own_sha256=partial(own_shard_sha256, Path(cfg.output_dir)) if cfg.resume else lambda name: None,
    )


def own_shard_sha256(out: Path, name: str) -> str | None:
    """The sha256 of this build's shard `name`, where an earlier run left it: recorded by its upload,
    else hashed from the finished local file (a run stopped after the upload landed but before it
    was recorded). On the Hub, a file of that name is this build's only with that sha256."""
    recorded = (read_sidecar(out, name) or {}).get("sha256")
    path = out / "data" / name
    return recorded or (file_hash(path, "sha256") if path.exists() else None)


def write_cache(state, prep: Prepared, out: Path, result: BuildResult, progress: bool, uploader=None) -> None:
    # the card's pictures, while the target runs
    drawing = PictureDrawing(prep, work_dir=out / BUILD_STATE_DIR) if state.is_main_process else None
    try:
        write_shards(state, prep, out, result, progress, uploader)
        wait_for_other_ranks(state, result)
        if state.is_main_process:
            finish_cache(out, prep, result, uploader, drawing)
    finally:
        if drawing is not None:
            drawing.close()


def write_shards(state, prep: Prepared, out: Path, result: BuildResult, progress: bool, uploader=None) -> None:
    """This rank's shards that are not complete yet (locally, or on the Hub when uploading)."""
    names = [shard_name(k, prep.num_shards) for k in range(prep.num_shards)]
    mine = [k for k in range(prep.num_shards) if k % state.num_processes == state.process_index]
    remote = uploader.remote_shards() if uploader is not None else {}
    pending = [k for k in mine if not shard_is_complete(out, names[k], remote)]
    if uploader is not None:  # finished locally in an earlier run but never uploaded
        for k in mine:
            path = out / "data" / names[k]
            if k not in pending and path.exists():
                sha = read_sidecar(out, names[k]).get("sha256")  # recorded by the shard's upload, if it had one
                if sha is None or remote.get(names[k]) != sha:
                    uploader.upload(path, sha)
    started = time.perf_counter()
    if pending:
        run_forward(prep, out, pending, names, result, progress and state.is_main_process, uploader)
    write_rank_stats(out, result, pending, prep, time.perf_counter() - started)
    if uploader is not None:
        uploader.wait()  # this rank's shards are all committed


def wait_for_other_ranks(state, result: BuildResult) -> None:
    """Until every rank has written its shards. A rank that stopped meanwhile (an error, a kill) fails the
    wait where the launcher does not stop the others (gloo: its connection closed): this rank says so in
    the build's words, its own shards kept, rather than with the process group's error."""
    try:
        state.wait_for_everyone()
    except RuntimeError as err:  # torch.distributed's errors (DistBackendError among them)
        cause = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OtherRankStopped(
            f"rank {result.rank} finished its shards, but another rank stopped before finishing its own ({cause}); "
            f"that rank's output says why. The {len(result.written)} shards this rank wrote are kept and the cache "
            "was not finished (no card): fix what that rank reports, then rerun with --resume, which builds only "
            "the missing shards."
        ) from err


def finish_cache(out: Path, prep: Prepared, result: BuildResult, uploader, drawing) -> None:
    """Rank 0, once every rank is done: vocab, head rows, then the card, last (a cache with a card
    is complete), then the upload's closing commit."""
    result.shards = shard_records(out, prep.num_shards, result.world_size)
    check_every_shard_recorded(out, result.shards, prep.num_shards, result.world_size)
    check_some_stored(result.shards)
    write_vocab(out, prep)
    if prep.cfg.target_format == "hidden" and not (out / LM_HEAD_FILE).exists():  # rank 0 had no shard to build
        target = Target(load_placed_model(prep), prep.aux_layer_ids)
        write_head_rows(out, prep, target)
        target.close()
    result.manifest = write_card(out, prep, result.shards, read_rank_stats(out, result.world_size), drawing)
    if uploader is not None:
        result.pushed = uploader.finish(out, result.manifest)  # card, vocab and pictures last, then the tag


# How long rank 0 looks again for shard records another rank wrote before it calls them missing: a
# network file system may show another node's new files late (see RUN_TOKEN_WAIT_SECONDS).
RECORD_WAIT_SECONDS = 90.0


def shard_records(out: Path, num_shards: int, world_size: int) -> list[dict | None]:
    """Every shard's record, None for one still missing after RECORD_WAIT_SECONDS (on several processes)."""
    names = [shard_name(k, num_shards) for k in range(num_shards)]
    records = [read_sidecar(out, name) for name in names]
    if None not in records or world_size == 1 or RECORD_WAIT_SECONDS <= 0:
        return records
    log.warning(
        "%d of the %d shard records are not in %s yet; looking again for up to %.0f s (a network file system may "
        "show another node's new files late)",
        records.count(None),
        num_shards,
        out.absolute() / BUILD_STATE_DIR / "shards",
        RECORD_WAIT_SECONDS,
    )
    deadline = time.monotonic() + RECORD_WAIT_SECONDS
    while None in records and time.monotonic() < deadline:
        time.sleep(1.0)
        records = [record or read_sidecar(out, name) for record, name in zip(records, names, strict=True)]
    return records


def check_every_shard_recorded(out: Path, records: list[dict | None], num_shards: int, world_size: int) -> None:
    """Every rank is done, so each shard has its record: one missing was written by its rank (shard k by
    rank k % world_size this run; an earlier run's are kept with theirs) into another directory."""
    missing = [k for k, record in enumerate(records) if record is None]
    if not missing:
        return
    by_rank = {}
    for k in missing:
        by_rank.setdefault(k % world_size, []).append(shard_name(k, num_shards))
    listed = "; ".join(f"rank {rank}: {', '.join(names)}" for rank, names in sorted(by_rank.items()))
    raise ShardRecordsMissing(
        f"every rank finished, but {len(missing)} of the {num_shards} shards have no record in "
        f"{out.absolute() / BUILD_STATE_DIR / 'shards'} ({listed}), so the cache was not finished (no card): those "
        "ranks wrote them into another directory. --output-dir must name the same directory on every node (a shared "
        "filesystem; an absolute path): make it one every node sees, then rerun with --resume, which builds the "
        "missing shards."
    )


def check_some_stored(shards: list[dict]) -> None:
    """A build whose every sample failed is broken (weights, dtype), not a cache of nothing."""
    failed = sum(len(shard.get("failed", [])) for shard in shards)
    if failed and not any(shard["rows"] for shard in shards):
        raise NonFiniteOutput(
            f"the target's outputs were NaN or Inf for every sample ({failed}): no sample could be stored, so the "
            "cache was not finished (no card). Check the target's weights and --dtype (fp16 overflows where bf16 "
            "does not), then build again into a new --output-dir."
        )


def agree(state, main_process_step, step: str) -> None:
    """Run a step on rank 0 (`step` says what it does) and raise its error on every rank, so no rank
    waits at a barrier forever. Every failure is shared, not only the project's own errors: rank 0
    raises it as it is, the other ranks an error naming it (a PermissionError, a bug)."""
    failure = shared_error = None
    if state.is_main_process:
        try:
            main_process_step()
        except Eagle3CacheError as err:
            failure = shared_error = err
        except BaseException as err:
            failure, shared_error = err, RankZeroFailed.of(err, step)
    if state.num_processes > 1:
        shared = [shared_error]
        torch.distributed.broadcast_object_list(shared, src=0)
        shared_error = shared[0]
    if failure is not None:
        raise failure
    if shared_error is not None:
        raise shared_error


class RankZeroFailed(Eagle3CacheError):
    """Rank 0 failed with an error that is not the project's: the other ranks raise this in its
    place, with its type and message (the error itself may not pickle)."""

    @classmethod
    def of(cls, err: BaseException, step: str) -> RankZeroFailed:
        shared = cls(
            f"rank 0 stopped while {step}: {type(err).__name__}: {err}. Its traceback is in rank 0's "
            "output; fix what it reports (a permission, a path, the file system), then run the build again."
        )
        shared.error_type, shared.error_message = type(err).__name__, str(err)
        return shared


def lock_output_dir(out: Path, lock: CacheLock, token: str | None) -> None:
    """Rank 0 takes the output directory's lock, then, on several processes, writes the run's token
    there for every rank to find (check_one_output_dir)."""
    with disk_full_as_error():
        lock.acquire()
        if token is not None:
            write_json_atomic(out / RUN_TOKEN_FILE, {"token": token})


# How long a rank looks for rank 0's token before refusing: a network file system's client may go on
# answering that a file another node created is not there until its cached view of the folder expires
# (NFS: up to a minute). A rank that sees it does not wait.
RUN_TOKEN_WAIT_SECONDS = 90.0


def check_one_output_dir(state, out: Path, token: str | None) -> None:
    """Every rank finds the token rank 0 wrote into its output directory (`agree` broadcast after the
    write), or every rank refuses, naming those that did not: their --output-dir is another folder
    (a node's own disk, a relative path launched from another working directory), and their shards
    would be missing from rank 0's cache once the whole forward had run."""
    if state.num_processes == 1:
        return
    shared = [token]
    torch.distributed.broadcast_object_list(shared, src=0)
    expected = shared[0]
    found = expected if state.is_main_process else wait_for_run_token(out, expected, state.process_index)
    views = [None] * state.num_processes
    seen = {"path": str(out.absolute()), "host": socket.gethostname(), "token": found}
    torch.distributed.all_gather_object(views, seen)
    strays = [(rank, view) for rank, view in enumerate(views) if view["token"] != expected]
    if strays:
        raise OutputDirNotShared(output_dir_not_shared_message(views[0], strays))


def wait_for_run_token(out: Path, expected: str, rank: int) -> str | None:
    deadline = time.monotonic() + RUN_TOKEN_WAIT_SECONDS
    found = read_run_token(out)
    if found != expected and RUN_TOKEN_WAIT_SECONDS > 0:
        log.warning(
            "rank %d does not find rank 0's run token in %s; looking again for up to %.0f s (a network file system "
            "may show another node's new files late)",
            rank,
            out.absolute(),
            RUN_TOKEN_WAIT_SECONDS,
        )
    while found != expected and time.monotonic() < deadline:
        time.sleep(1.0)
        found = read_run_token(out)
    return found


def output_dir_not_shared_message(rank_0: dict, strays: list[tuple[int, dict]]) -> str:
    seen = "; ".join(
        f"rank {rank} (on {view['host']}) sees {view['path']} "
        + ("without it" if view["token"] is None else "holding another run's token instead")
        for rank, view in strays
    )
    return (
        "--output-dir must name the same directory on every node (a shared filesystem; an absolute path): rank 0 "
        f"(on {rank_0['host']}) wrote this run's token to {Path(rank_0['path']) / RUN_TOKEN_FILE}, and {seen}. "
        "The target did not run, and this run wrote nothing there but its lock and token. Pass an absolute "
        "--output-dir on a file system every node mounts, then run the build again with the same flags."
    )


def start_or_continue(out: Path, prep: Prepared, resume: bool, lock: CacheLock) -> None:
    """Rank 0, holding the output directory's lock (lock_output_dir): the checks that another build
    starting at the same moment could have made stale since `prepare` ran them."""
    with disk_full_as_error():
        remove_dead_drawings(out / BUILD_STATE_DIR)  # the lock is held: any drawing there is a killed build's
        if resume:  # again: another build may have started here since
            check_resume(out, prep.identity, prep.tokenizer_hashes, prep.input_hashes, prep.altered_input_hashes)
        if resume and read_identity(out) is not None:
            check_kept_samples(out, prep, kept_shards(out, prep))  # before anything is removed or written
            remove_killed_writers_files(out)
            return
        if holds_cache(out):  # another build took this directory after our check: never keep or mix its shards
            raise ConfigError(
                "--output-dir",
                str(out),
                "an empty or new directory",
                "Another build started writing to it meanwhile; pass --resume to continue that build, or choose another directory.",
            )
        if (out / BUILD_STATE_FILE).exists():  # holding no shard: a start that failed (holds_cache)
            log.warning("%s: the build begun there wrote no shard; starting it over with this run's settings", out)
            remove_killed_writers_files(out)
        write_json_atomic(out / INPUT_SOURCE_FILE, {"revision": prep.input_revision})
        write_json_atomic(out / BUILD_STATE_FILE, prep.identity)


def remove_killed_writers_files(out: Path) -> None:
    """The temp files of this cache's killed writers (shards, sidecars, card, vocab, head rows, pictures),
    in the folders the cache writes only: another cache or an export nested in the output directory
    has writers of its own, which may be running."""
    remove_leftovers(out / BUILD_STATE_DIR, recursive=True)
    for folder in {
        out,
        out / "data",
        *((out / name).parent for name in (VOCAB_FILE, LM_HEAD_FILE, *(path for path, _ in PICTURES.values()))),
    }:
        remove_leftovers(folder)


def kept_shards(out: Path, prep: Prepared) -> list[int]:
    """The shards a resume keeps as they are: on disk, and matching their record."""
    names = [shard_name(k, prep.num_shards) for k in range(prep.num_shards)]
    return [k for k in range(prep.num_shards) if (out / "data" / names[k]).exists() and shard_matches_record(out, names[k])]


def shard_is_complete(out: Path, name: str, remote: dict | None = None) -> bool:
    """A shard file exists only once complete (atomic rename); its sidecar and footer must agree.
    With upload-while-building, a shard deleted locally is complete when the Hub has its bytes."""
    path = out / "data" / name
    if not path.exists():
        sidecar = read_sidecar(out, name)
        return bool(remote) and sidecar is not None and sidecar.get("sha256") is not None and remote.get(name) == sidecar["sha256"]
    if not shard_matches_record(out, name):
        log.warning("shard %s exists but does not match its record; it will be rebuilt", name)
        path.unlink()
        return False
    return True


def shard_matches_record(out: Path, name: str) -> bool:
    """Size and footer as recorded. A shard that cannot be read now (an I/O error, its permissions)
    is not known to be incomplete: the resume stops rather than delete what may be valid. Whether it
    holds the samples this run has for it (their number too) is kept_samples' check, which refuses
    rather than rebuild: a complete shard holding other samples was written by other rules."""
    path = out / "data" / name
    try:
        sidecar = read_sidecar(out, name)
        return sidecar is not None and sidecar["bytes"] == path.stat().st_size and shard_row_count(path) == sidecar["rows"]
    except OSError as err:
        raise ShardUnreadable(
            f"--resume: cannot read {err.filename or path} to check that shard {name} is complete "
            f"({err.strerror or err}); nothing was deleted. Rerun once it is readable (check its permissions "
            "and its file system)."
        ) from err


def write_rank_stats(out: Path, result: BuildResult, pending: list[int], prep: Prepared, seconds: float) -> None:
    rows = sum(expected_rows(prep, k) for k in pending)
    stats = {
        "rank": result.rank,
        "world_size": result.world_size,
        "shards_written": result.written,
        "samples": rows,
        "seconds": round(seconds, 3),
        "placement": result.placement,
    }
    write_json_atomic(out / BUILD_STATE_DIR / "ranks" / f"rank-{result.rank:05d}.json", stats)


def read_rank_stats(out: Path, world_size: int) -> list[dict]:
    """This run's ranks: a resume on fewer processes leaves the earlier run's higher ranks' files behind.
    Every rank wrote its own before the card; one not shown yet (a network file system) is looked for again."""
    stats = this_runs_rank_stats(out, world_size)
    deadline = time.monotonic() + RECORD_WAIT_SECONDS
    while len(stats) < world_size and time.monotonic() < deadline:
        time.sleep(1.0)
        stats = this_runs_rank_stats(out, world_size)
    return stats


def this_runs_rank_stats(out: Path, world_size: int) -> list[dict]:
    stats = [s for s in map(rank_stats, sorted((out / BUILD_STATE_DIR / "ranks").glob("rank-*.json"))) if s is not None]
    return [s for s in stats if s["world_size"] == world_size and s["rank"] < world_size]


def rank_stats(path: Path) -> dict | None:
    """A rank's stats; None for one that no longer decodes: every rank of this run wrote its own before the
    card, so a damaged one is an earlier run's, and must not stop the card once every shard is computed."""
    try:
        return json.loads(path.read_text())
    except ValueError:  # not JSON, or not text
        log.warning("%s is damaged; the card leaves it out (it is no rank's of this run)", path)
        return None


def write_vocab(out: Path, prep: Prepared) -> None:
    with atomic_write(out / VOCAB_FILE) as tmp, mode_of_open(tmp):
        save_file(
            {
                "selected_token_ids": torch.as_tensor(prep.selected_token_ids, dtype=torch.int64),
                "token_counts": torch.as_tensor(prep.token_counts, dtype=torch.int64),
            },
            str(tmp),
        )
