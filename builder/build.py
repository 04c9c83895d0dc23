"""The build: prepared samples -> target forward -> Parquet shards -> vocab files -> card (last).

Data parallel under `accelerate launch`: every rank prepares the same samples (rank 0
first, so the others reuse its `datasets` cache), rank r writes the shards
k with k % world_size == r, and rank 0 writes the vocab files and the card once every rank
is done. Shard contents depend only on the build's settings, never on the world size,
so a build started on N processes can be resumed on M.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .batching import pad_batch, plan_batches
from .build_state import BUILD_STATE_DIR, BUILD_STATE_FILE, check_resume, read_sidecar
from .config import BuildConfig
from .errors import ConfigError, Eagle3CacheError
from .files import atomic_write, disk_full_as_error, remove_leftovers, write_json_atomic
from .formats import encode_aux, encode_targets, head_transform_from, quality_of_batch
from .lock import CacheLock
from .manifest import LM_HEAD_FILE, VOCAB_FILE
from .placement import check_fits, device_map_summary, group_gpus, max_memory_map, parse_bytes, plan_memory
from .plan import warn_if_writer_holds_back
from .prepare import Prepared, prepare
from .shards import shard_name, shard_row_count
from .target import HEAD_PROBE_TOKENS, Target, compute_device, head_spec, load_model
from .writer import BackgroundWriter, BatchOutput

log = logging.getLogger(__name__)
WINDOW_ROW_GROUPS = 4  # rows are computed length-sorted within windows of this many row groups
FAULT_ENV = "EAGLE3_CACHE_FAULT"  # test hook naming a point at which the build kills itself (see FaultPoints)


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
    with state.main_process_first():  # rank 0 tokenizes; the others then hit its cache
        prep = prepare(cfg)
    state.wait_for_everyone()  # every rank has validated the output dir before rank 0 writes to it
    out = Path(cfg.output_dir)
    result = BuildResult(out, prep, state.process_index, state.num_processes)
    if cfg.dry_run:
        return result
    check_placement(prep)  # before any weights load or any file is written
    if cfg.resume:
        check_resume(out, prep.identity)  # every rank refuses alike, before anything is written
    uploader = open_uploader(cfg, prep)  # checks token, repo and tag before any GPU time is spent
    if uploader is not None and uploader.already_pushed:
        log.warning("%s already holds this build under tag %s: nothing to do", cfg.push_to_hub, cfg.hub_tag)
        uploader.close()
        return result
    lock = CacheLock(out)
    agree(state, lambda: (lock.acquire(), start_or_continue(out, prep, cfg.resume)))
    try:
        with disk_full_as_error():
            write_cache(state, prep, out, result, progress, uploader)
    except BaseException:
        if uploader is not None:
            uploader.close()
        raise
    finally:
        if state.is_main_process:
            lock.release()
    return result


def open_uploader(cfg: BuildConfig, prep: Prepared):
    """--push-to-hub: the background uploader every rank hands its finished shards to."""
    if not cfg.push_to_hub:
        return None
    from .manifest import fingerprint
    from .push import PushTarget, ShardUploader, validate_target

    target = PushTarget(cfg.push_to_hub, config=cfg.hub_config, branch=cfg.hub_branch, tag=cfg.hub_tag, private=cfg.private)
    validate_target(target)
    # Bounding the queue bounds local disk; without deletion it would only slow the build to upload speed.
    max_pending = 1 if cfg.delete_local_after_upload else 1 << 20
    return ShardUploader(
        target, delete_local=cfg.delete_local_after_upload, max_pending=max_pending, fingerprint=fingerprint(prep.identity)
    )


def write_cache(state, prep: Prepared, out: Path, result: BuildResult, progress: bool, uploader=None) -> None:
    names = [shard_name(k, prep.num_shards) for k in range(prep.num_shards)]
    mine = [k for k in range(prep.num_shards) if k % state.num_processes == state.process_index]
    remote = uploader.remote_shards() if uploader is not None else {}
    pending = [k for k in mine if not shard_is_complete(out, names[k], expected_rows(prep, k), remote)]
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
    state.wait_for_everyone()
    if state.is_main_process:
        result.shards = [read_sidecar(out, name) for name in names]
        write_vocab(out, prep)
        if prep.cfg.target_format == "hidden" and not (out / LM_HEAD_FILE).exists():  # rank 0 had no shard to build
            target = Target(load_placed_model(prep), prep.aux_layer_ids)
            write_head_rows(out, prep, target)
            target.close()
        from .card import write_card  # the card is written last: a cache with a card is complete

        result.manifest = write_card(out, prep, result.shards, read_rank_stats(out))
        if uploader is not None:
            result.pushed = uploader.finish(out, result.manifest)  # card, vocab and pictures last, then the tag


def agree(state, main_process_step) -> None:
    """Run a step on rank 0 and raise its error on every rank, so no rank waits at a barrier forever."""
    error = None
    if state.is_main_process:
        try:
            main_process_step()
        except Eagle3CacheError as err:
            error = err
    if state.num_processes > 1:
        shared = [error]
        torch.distributed.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise error


def start_or_continue(out: Path, prep: Prepared, resume: bool) -> None:
    if resume:
        remove_leftovers(out / "data")  # temp files of a killed writer
    else:
        write_json_atomic(out / BUILD_STATE_FILE, prep.identity)


def expected_rows(prep: Prepared, shard: int) -> int:
    return min(prep.cfg.shard_size, len(prep.samples) - shard * prep.cfg.shard_size)


def shard_is_complete(out: Path, name: str, rows: int, remote: dict | None = None) -> bool:
    """A shard file exists only once complete (atomic rename); its sidecar and footer must agree.
    With upload-while-building, a shard deleted locally is complete when the Hub has its bytes."""
    path = out / "data" / name
    if not path.exists():
        sidecar = read_sidecar(out, name)
        return bool(remote) and sidecar is not None and sidecar.get("sha256") is not None and remote.get(name) == sidecar["sha256"]
    sidecar = read_sidecar(out, name)
    if (
        sidecar is None
        or sidecar["bytes"] != path.stat().st_size
        or sidecar["rows"] + len(sidecar.get("failed", [])) != rows
        or shard_row_count(path) != sidecar["rows"]
    ):
        log.warning("shard %s exists but does not match its record; it will be rebuilt", name)
        path.unlink()
        return False
    return True


def run_forward(
    prep: Prepared, out: Path, pending: list[int], names: list[str], result: BuildResult, show_progress: bool, uploader=None
) -> None:
    model = load_placed_model(prep)
    result.placement = {"gpus_per_target": prep.cfg.gpus_per_target, "device_map": device_map_summary(model)}
    target = Target(model, prep.aux_layer_ids)
    head = HeadRows.of(target, prep.selected_token_ids)
    try:
        check_head(prep, target, head)  # before any file is written
    except BaseException:
        target.close()
        raise
    (out / "data").mkdir(parents=True, exist_ok=True)
    if prep.cfg.target_format == "hidden" and result.rank == 0:
        write_head_rows(out, prep, target)
    progress = Progress(prep, out, show_progress)
    in_vocab = torch.zeros(prep.vocab_size, dtype=torch.bool)
    in_vocab[torch.as_tensor(prep.selected_token_ids)] = True
    faults = FaultPoints()

    def shard_done(info: dict) -> None:  # on the writer thread, right after the rename
        progress.shard_done(info)
        if uploader is not None:  # blocks while one shard already waits: bounds local disk
            uploader.upload(out / "data" / info["name"])
        faults.reached("after_shard")

    warn_if_writer_holds_back(prep, target)
    writer = BackgroundWriter(
        prep.layout,
        in_vocab,
        prep.cfg.row_group_bytes,
        on_shard_done=shard_done,
        strict=prep.cfg.strict,
        compression=prep.cfg.compression,
        threads=prep.cfg.writer_threads,
        shard_record={"batching": batching_record(prep)},
    )
    try:
        for k in pending:
            write_one_shard(prep, target, writer, out / "data" / names[k], k, progress, head, faults)
            result.written.append(names[k])
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        target.close()
        progress.close()


def check_head(prep: Prepared, target: Target, head: HeadRows) -> None:
    """The head path must reproduce the target's own logits (on the first sample's first tokens)."""
    if not len(prep.samples):
        return
    probe = torch.as_tensor(prep.samples[0]["input_ids"][:HEAD_PROBE_TOKENS])[None]
    draft = (head.selected, head.draft_rows, head.transform) if prep.cfg.target_format == "hidden" else None
    target.check_head(probe, draft)


def batching_record(prep: Prepared) -> dict:
    """The settings that decide which samples share a forward batch; recorded per shard, because a
    resume may change them and `verify --recompute` must rebuild each shard's own batches."""
    return {"batch_size": prep.cfg.batch_size, "max_tokens_per_batch": prep.cfg.token_budget, "row_group_bytes": prep.cfg.row_group_bytes}


class FaultPoints:
    """Crash tests: `EAGLE3_CACHE_FAULT=after_shard:3` (this run's 3rd shard published: renamed, with its
    record) or `after_batch:5` (this run's 5th forward batch handed to the writer) SIGKILLs the process
    right there, as a power cut would, instead of at a moment a test guesses from the clock."""

    def __init__(self):
        self.spec = os.environ.get(FAULT_ENV)
        self.counts: dict[str, int] = {}  # one key per thread: after_batch (forward), after_shard (writer)

    def reached(self, name: str) -> None:
        if self.spec is None:
            return
        self.counts[name] = self.counts.get(name, 0) + 1
        if self.spec == f"{name}:{self.counts[name]}":
            os.kill(os.getpid(), signal.SIGKILL)


def load_placed_model(prep: Prepared):
    """One device, an explicit --device-map, or this process's GPU group (--gpus-per-target)."""
    cfg = prep.cfg
    device, dtype = compute_device()
    load = partial(load_model, prep.model_path, cfg.target_revision, cfg.trust_remote_code, device, dtype)
    if cfg.device_map is not None:
        return load(device_map=read_device_map(cfg.device_map))
    if cfg.gpus_per_target > 1:
        from accelerate import PartialState

        gpus = group_gpus(PartialState().local_process_index, cfg.gpus_per_target, torch.cuda.device_count())
        torch.cuda.set_device(gpus[0])  # not another group's GPU
        plan = memory_plan(prep)
        per_gpu = available_per_gpu(cfg, gpus)
        return load(device_map="auto", max_memory=max_memory_map(gpus, per_gpu, plan))
    return load()


def memory_plan(prep: Prepared):
    return plan_memory(
        prep.model_config,
        gpus_per_target=prep.cfg.gpus_per_target,
        max_tokens=prep.cfg.token_budget,
        num_aux_layers=len(prep.aux_layer_ids),
        dtype_bytes=2 if torch.cuda.is_available() else 4,
        draft_vocab_size=len(prep.selected_token_ids),
    )


def available_per_gpu(cfg: BuildConfig, gpus: list[int]) -> int | None:
    if cfg.max_memory_per_gpu is not None:
        return parse_bytes(cfg.max_memory_per_gpu)
    if gpus and torch.cuda.is_available():
        return min(torch.cuda.get_device_properties(g).total_memory for g in gpus)
    return None  # CPU: no budget to check against


def check_placement(prep: Prepared) -> None:
    """Refuse a target that cannot fit before any weights load (not for explicit --device-map)."""
    from accelerate import PartialState

    cfg = prep.cfg
    if cfg.device_map is not None:
        return
    gpus = []
    if torch.cuda.is_available():
        gpus = group_gpus(PartialState().local_process_index, cfg.gpus_per_target, torch.cuda.device_count())
    budget = available_per_gpu(cfg, gpus)
    if budget is not None:
        check_fits(memory_plan(prep), budget)


def read_device_map(spec: str) -> dict | str:
    """--device-map: "auto", a JSON object, or a path to a JSON file ({module name: device})."""
    if spec == "auto":
        return spec
    text = spec if spec.lstrip().startswith("{") else Path(spec).read_text() if Path(spec).is_file() else spec
    try:
        return json.loads(text)
    except ValueError:
        raise ConfigError("--device-map", spec, '"auto", a JSON object {module: device}, or a path to one') from None


def write_one_shard(
    prep: Prepared,
    target: Target,
    writer: BackgroundWriter,
    path: Path,
    shard: int,
    progress,
    head: HeadRows,
    faults: FaultPoints | None = None,
) -> None:
    start = shard * prep.cfg.shard_size
    rows = prep.samples.select(range(start, start + expected_rows(prep, shard)))
    writer.open_shard(path)
    for window in shard_windows(prep, rows):
        for batch in forward_window(prep, target, window, head):
            writer.submit(batch)
            progress.batch_done(batch)
            if faults is not None:
                faults.reached("after_batch")
        writer.end_window(len(window))
    writer.close_shard()


def row_windows(rows, per_token: int, per_loss: int, window_bytes: int):
    """Consecutive runs of samples whose encoded size (known from lengths alone) fits the window."""
    window, size = [], 0
    for row in rows:
        row_size = row["num_tokens"] * per_token + row["num_loss_tokens"] * per_loss
        if window and size + row_size > window_bytes:
            yield window
            window, size = [], 0
        window.append(row)
        size += row_size
    if window:
        yield window


def shard_windows(prep: Prepared, rows):
    per_token, per_loss = prep.layout.bytes_per_position()
    return row_windows(rows, per_token, per_loss, prep.cfg.row_group_bytes * WINDOW_ROW_GROUPS)


def forward_window(prep: Prepared, target: Target, window: list[dict], head: HeadRows):
    """Length-sorted token-budget batches of one window, each copied to the host asynchronously."""
    layout = prep.layout
    per_loss = frozenset(name for name, spec in layout.columns().items() if spec["per"] == "loss")
    pad_id = prep.tokenizer.pad_token_id if prep.tokenizer.pad_token_id is not None else 0
    for positions in plan_batches([r["num_tokens"] for r in window], prep.cfg.token_budget, prep.cfg.batch_size):
        samples = [window[i] for i in positions]
        ids, attention, loss = pad_batch([s["input_ids"] for s in samples], [s["loss_mask"] for s in samples], pad_id)
        dev, inp = target.device, target.input_device
        attention, loss = attention.to(dev, non_blocking=True), loss.to(dev, non_blocking=True)
        live = target.supervise(ids.to(inp, non_blocking=True), attention.to(inp), loss, head.selected) | {"attention": attention}
        # Encode (cast, top-k, fp8) on the device: less to copy, and the host thread only slices bytes.
        encoded = encode_aux(live["aux"], layout.aux_dtype) | encode_targets(layout, live)
        quality = quality_of_batch(layout, live, encoded, loss.bool(), head.draft_rows, head.transform)
        finite = finite_rows(live, encoded, attention, loss, per_loss)
        (columns, quality, finite), ready = to_host((encoded, quality, finite))
        yield BatchOutput(positions, samples, columns, per_loss, finite, quality, ready=ready)


def finite_rows(live: dict, encoded: dict, attention: torch.Tensor, loss: torch.Tensor, per_loss) -> torch.Tensor:
    """[B] bool, on the device: the live probs and every stored float column of the sample are finite
    (checked after the cast: fp16 turns activations above 65504 into inf; fp8 saturates instead)."""
    batch, length = attention.shape
    ok = torch.ones(batch, dtype=torch.bool, device=attention.device)
    row_of_loss = loss.nonzero()[:, 0]
    floats = {"probs": live["probs"]} | {n: t for n, t in encoded.items() if t.is_floating_point() and t.dtype != torch.float8_e4m3fn}
    for name, tensor in floats.items():
        bad = ~tensor.float().isfinite()
        if name == "probs" or name in per_loss:  # [n_loss, ...] rows, row-major over the batch
            bad_rows = bad.reshape(len(bad), -1).any(-1).long()
            ok &= torch.zeros(batch, dtype=torch.long, device=ok.device).index_add_(0, row_of_loss, bad_rows) == 0
        else:  # [B, T, ...]: real tokens only
            ok &= ~(bad.reshape(batch, length, -1).any(-1) & attention.bool()).any(-1)
    return ok


def to_host(tree):
    """Copy a (nested) structure of device tensors into pinned host memory without waiting;
    returns the copies and a CUDA event to wait on (None on CPU, where nothing is copied)."""
    flat = []

    def collect(node):
        if isinstance(node, torch.Tensor):
            flat.append(node)
        elif isinstance(node, dict):
            for v in node.values():
                collect(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                collect(v)

    collect(tree)
    if not flat or flat[0].device.type != "cuda":
        return tree, None
    copies = {}
    for t in flat:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        copies[id(t)] = host

    def rebuild(node):
        if isinstance(node, torch.Tensor):
            return copies[id(node)]
        if isinstance(node, dict):
            return {k: rebuild(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(rebuild(v) for v in node)
        return node

    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(flat[0].device))  # the copies' device, not the current one
    return rebuild(tree), event


@dataclass
class HeadRows:
    """What every batch needs from the head: the draft ids on the device, and for `hidden` caches
    the draft rows and logit transform used to rebuild probs (quality report, vocab/lm_head)."""

    selected: torch.Tensor
    draft_rows: torch.Tensor | None
    transform: object

    @classmethod
    def of(cls, target: Target, selected_token_ids) -> HeadRows:
        selected = torch.as_tensor(selected_token_ids, device=target.device)
        rows = target.head.weight.index_select(0, selected).float()
        bias = target.head.bias.index_select(0, selected).float() if getattr(target.head, "bias", None) is not None else None
        return cls(selected, rows, head_transform_from(head_spec(target.model.config), bias))


def write_head_rows(out: Path, prep: Prepared, target: Target) -> None:
    """vocab/lm_head.safetensors for `hidden` caches: the draft rows (and with --store-full-head all rows),
    and the head's bias over the whole vocabulary when it has one."""
    tensors = {
        "draft_rows": target.head.weight.index_select(0, torch.as_tensor(prep.selected_token_ids, device=target.device)).float().cpu()
    }
    if prep.cfg.store_full_head:
        tensors["weight"] = target.head.weight.float().cpu()
    if getattr(target.head, "bias", None) is not None:
        tensors["bias"] = target.head.bias.float().cpu()
    with atomic_write(out / LM_HEAD_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


class Progress:
    """One bar on rank 0: samples over every rank's pending shards (others' from their sidecars)."""

    def __init__(self, prep: Prepared, out: Path, enabled: bool):
        self.enabled, self.out = enabled, out
        self.start = time.perf_counter()
        self.tokens = self.bytes = 0
        self.seen_sidecars = {p.name for p in self._sidecars()} if enabled else set()
        total = len(prep.samples) - sum(json.loads(p.read_text())["rows"] for p in self._sidecars()) if enabled else 0
        self.bar = tqdm(total=total, unit="sample", desc="Building", disable=not enabled, dynamic_ncols=True)
        self._mine: set[str] = set()
        self._last_poll = 0.0

    def _sidecars(self):
        return (self.out / BUILD_STATE_DIR / "shards").glob("*.json")

    def batch_done(self, batch: BatchOutput) -> None:
        if not self.enabled:
            return
        self.bar.update(len(batch.samples))
        self.tokens += sum(s["num_tokens"] for s in batch.samples)
        self._poll_other_ranks()
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(tok_s=f"{self.tokens / elapsed:,.0f}", written=f"{self.bytes / 1e9:.3f}GB", refresh=False)

    def shard_done(self, info: dict) -> None:  # called on the writer thread
        self.bytes += info["bytes"]
        self._mine.add(f"{info['name']}.json")

    def _poll_other_ranks(self) -> None:
        """Shards other ranks finished since the last look (at most once a second)."""
        now = time.perf_counter()
        if now - self._last_poll < 1.0:
            return
        self._last_poll = now
        for path in self._sidecars():
            if path.name not in self.seen_sidecars and path.name not in self._mine:
                self.seen_sidecars.add(path.name)
                info = json.loads(path.read_text())
                self.bar.update(info["rows"])
                self.tokens += info["tokens"]
                self.bytes += info["bytes"]

    def close(self) -> None:
        self.bar.close()


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


def read_rank_stats(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / BUILD_STATE_DIR / "ranks").glob("rank-*.json"))]


def write_vocab(out: Path, prep: Prepared) -> None:
    with atomic_write(out / VOCAB_FILE) as tmp:
        save_file(
            {
                "selected_token_ids": torch.as_tensor(prep.selected_token_ids, dtype=torch.int64),
                "token_counts": torch.as_tensor(prep.token_counts, dtype=torch.int64),
            },
            str(tmp),
        )
