"""The forward loop: a rank's pending shards, window by window and batch by batch, through the
target; each batch's supervision encoded on the device and handed to the background writer.

Within a shard, rows are computed length-sorted inside windows of `--sort-window-bytes` (see
`batching.shard_windows`), so the writer can publish row groups in the samples' order while the
forward only pads within a window.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .batching import batching_record, expected_rows, pad_batch, plan_batches, shard_windows
from .build_state import BUILD_STATE_DIR, read_sidecar
from .faults import FAULT_ENV, FaultPoints  # noqa: F401 (FAULT_ENV: the crash tests name it from here)
from .files import atomic_write, mode_of_open
from .formats import encode_aux, encode_targets, head_transform_from, quality_of_batch
from .manifest import LM_HEAD_FILE
from .placement import device_map_summary, load_placed_model
from .plan import warn_if_writer_holds_back
from .prepare import Prepared
from .target import HEAD_PROBE_TOKENS, Target, compute_device, head_spec
from .writer import BackgroundWriter, BatchOutput

if TYPE_CHECKING:
    from .pipeline import BuildResult

log = logging.getLogger(__name__)

# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). The forward
# thread lets go of the GIL in every torch call and must get it back before it can queue the next
# kernel; the writer's threads holding it for 5 ms at a time would leave a GPU idle.
FORWARD_SWITCH_INTERVAL_S = 0.0005


def run_forward(
    prep: Prepared, out: Path, pending: list[int], names: list[str], result: BuildResult, show_progress: bool, uploader=None
) -> None:
    model = load_placed_model(prep)
    result.placement = {"gpus_per_target": prep.cfg.gpus_per_target, "device_map": device_map_summary(model)}
    target = Target(model, prep.aux_layer_ids)
    head = HeadRows.of(target, prep.selected_token_ids, prep.cfg.target_format)
    try:
        check_head(prep, target, head)  # before any file is written
    except BaseException:
        target.close()
        raise
    (out / "data").mkdir(parents=True, exist_ok=True)
    if prep.cfg.target_format == "hidden" and result.rank == 0:
        write_head_rows(out, prep, target)
    progress = Progress(prep, out, show_progress, pending, names, result.rank, result.world_size)
    in_vocab = torch.zeros(prep.vocab_size, dtype=torch.bool)
    in_vocab[torch.as_tensor(prep.selected_token_ids)] = True
    faults = FaultPoints()

    def shard_done(info: dict) -> None:  # on the writer thread, right after the rename
        progress.shard_done(info)
        if uploader is not None:  # blocks while one shard already waits: bounds local disk
            uploader.upload(out / "data" / info["name"])
        faults.reached("after_shard")

    warn_if_writer_holds_back(prep, target)
    compute = compute_record()
    warn_if_precisions_mix(out, [name for k, name in enumerate(names) if k not in set(pending)], compute)
    writer = BackgroundWriter(
        prep.layout,
        in_vocab,
        prep.cfg.row_group_bytes,
        on_shard_done=shard_done,
        strict=prep.cfg.strict,
        compression=prep.cfg.compression,
        threads=prep.cfg.writer_threads,
        shard_record={"batching": batching_record(prep), "compute": compute},
    )
    try:
        with gil_switch_interval(FORWARD_SWITCH_INTERVAL_S):
            for k in pending:
                write_one_shard(prep, target, writer, out / "data" / names[k], k, progress, head, faults)
                result.written.append(names[k])
            writer.finish()
    except BaseException:
        if uploader is not None:  # first: the writer may wait in `upload` for a shard the outage holds back
            uploader.cancel()
        writer.abort()
        raise
    finally:
        target.close()
        progress.close()


def compute_record() -> dict:
    """Where and in what precision this process computes (bf16 on a GPU, fp32 on a CPU), and what else
    decides its rounding: the CPU's vector instructions or the GPU model, and the torch (and CUDA)
    versions, whose kernels sum in other orders. Part of what shaped a shard's bytes, recorded with
    each shard; `verify --recompute` compares exactly only where it all matches."""
    device, dtype = compute_device()
    record = {"device": device.type, "dtype": str(dtype).removeprefix("torch.")}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        gpu = {"gpu": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}", "cuda": torch.version.cuda}
        return record | gpu | {"torch": str(torch.__version__)}
    if device.type == "cpu":
        return record | {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": str(torch.__version__)}
    return record | {"torch": str(torch.__version__)}


def warn_if_precisions_mix(out: Path, finished: list[str], compute: dict) -> None:
    """A resume on another kind of device computes the remaining shards in another precision; on
    another CPU or GPU model, or torch version, in the same precision but maybe rounded otherwise.
    Records compare on the fields both have (older ones hold only the device kind and dtype)."""
    earlier = [record["compute"] for record in (read_sidecar(out, name) or {} for name in finished) if "compute" in record]
    precision = {"device", "dtype"}

    def differing(record: dict) -> set:
        return {key for key in record.keys() & compute.keys() if record[key] != compute[key]}

    def shown(records, keys=None) -> str:
        return ", ".join(sorted({json.dumps({k: v for k, v in r.items() if keys is None or k in keys}, sort_keys=True) for r in records}))

    if others := [r for r in earlier if differing(r) & precision]:
        log.warning(
            "the shards already written were computed with %s; this run computes with %s: the cache will mix precisions "
            "(each shard's manifest record says which). Resume on the same kind of device to keep one.",
            shown(others, precision),
            shown([compute], precision),
        )
    if others := [r for r in earlier if differing(r) and not differing(r) & precision]:
        log.warning(
            "the shards already written were computed on %s; this run computes on %s: the same device kind and dtype, "
            "but another CPU instruction set, GPU model or library version may round differently, so one machine's "
            "`verify --recompute` checks the other's shards within a tolerance (fp32) or skips them (bf16, fp16). Resume on "
            "the same machine type to keep every shard exactly reproducible.",
            shown(others),
            shown([compute]),
        )


@contextmanager
def gil_switch_interval(seconds: float):
    """Python's thread switch interval at most `seconds` inside the block, restored after it."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def check_head(prep: Prepared, target: Target, head: HeadRows) -> None:
    """The head path must reproduce the target's own logits (on the first sample's first tokens)."""
    if not len(prep.samples):
        return
    probe = torch.as_tensor(prep.samples[0]["input_ids"][:HEAD_PROBE_TOKENS])[None]
    draft = (head.selected, head.draft_rows, head.transform) if prep.cfg.target_format == "hidden" else None
    target.check_head(probe, draft)


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


def forward_window(prep: Prepared, target: Target, window: list[dict], head: HeadRows):
    """Length-sorted token-budget batches of one window, each copied to the host asynchronously."""
    columns = prep.layout.columns()
    per_loss = frozenset(name for name, spec in columns.items() if spec["per"] == "loss")
    log_mass = "log_draft_mass" in columns
    # The manifest records this id for `verify --recompute`; one past the embedding table (a pad token the
    # tokenizer added without resizing the model) becomes id 0 in Target.forward, for both.
    pad_id = prep.tokenizer.pad_token_id if prep.tokenizer.pad_token_id is not None else 0
    for positions in plan_batches([r["num_tokens"] for r in window], prep.cfg.token_budget, prep.cfg.batch_size):
        # Nothing of a batch stays on the device here once it is handed on: its aux states, probs and
        # encoded columns die with `supervise_batch`'s frame, so the next forward has the room the memory
        # plan gives one batch (the copies already queued read them first, in stream order).
        yield supervise_batch(prep, target, [window[i] for i in positions], positions, head, pad_id, per_loss, log_mass)


def supervise_batch(
    prep: Prepared, target: Target, samples: list[dict], positions, head: HeadRows, pad_id: int, per_loss: frozenset, log_mass: bool
) -> BatchOutput:
    """One batch through the target, encoded on the device and copied to the host without waiting."""
    layout = prep.layout
    ids, attention, loss = pad_batch([s["input_ids"] for s in samples], [s["loss_mask"] for s in samples], pad_id)
    # The loss mask stays on the host (see Target.supervise): nothing below waits for the GPU,
    # which keeps computing while this thread queues the next batch.
    attention = attention.to(target.device, non_blocking=True)
    live = target.supervise(
        ids.to(target.input_device, non_blocking=True), attention.to(target.input_device), loss, head.selected, log_draft_mass=log_mass
    )
    live["attention"] = attention
    # Encode (cast, top-k, fp8) on the device: less to copy, and the host thread only slices bytes.
    encoded = encode_aux(live["aux"], layout.aux_dtype) | encode_targets(layout, live)
    finite = finite_rows(live, encoded, attention, per_loss)  # the samples stored; the card's figures are theirs
    quality = quality_of_batch(layout, live, encoded, head.draft_rows, head.transform, finite)
    (columns, quality, finite), ready = to_host((encoded, quality, finite))
    return BatchOutput(positions, samples, columns, per_loss, finite, quality, ready=ready, tokens=(ids, loss))


def finite_rows(live: dict, encoded: dict, attention: torch.Tensor, per_loss) -> torch.Tensor:
    """[B] bool, on the device: the live probs and every stored float column of the sample are finite
    (checked after the cast: fp16 turns activations above 65504 into inf; fp8 saturates instead)."""
    batch, length = attention.shape
    ok = torch.ones(batch, dtype=torch.bool, device=attention.device)
    row_of_loss = live["loss_positions"] // length
    floats = {"probs": live["probs"]} | {n: t for n, t in encoded.items() if t.is_floating_point() and t.dtype != torch.float8_e4m3fn}
    for name, tensor in floats.items():
        if name == "probs" or name in per_loss:  # [n_loss, ...] rows, row-major over the batch
            bad = ~all_finite(tensor, (len(tensor),), bounded=name in BOUNDED_COLUMNS)
            ok &= torch.zeros(batch, dtype=torch.long, device=ok.device).index_add_(0, row_of_loss, bad.long()) == 0
        else:  # [B, T, ...]: real tokens only
            ok &= ~(~all_finite(tensor, (batch, length), bounded=False) & attention.bool()).any(-1)
    return ok


BOUNDED_COLUMNS = frozenset({"probs", "target_probs", "topk_logprobs"})  # |value| <= 88 unless inf or NaN


def all_finite(tensor: torch.Tensor, lead: tuple, bounded: bool) -> torch.Tensor:
    """`lead`-shaped bool: are all values under each leading index finite? One reduction, no mask of the
    whole tensor. A sum is finite exactly when every summed value is, as long as finite values cannot
    overflow it: float32 holds any sum of bounded values or fp16 values, float64 any sum of fewer than
    10^270 fp32/bf16 values. A float64 sum also runs several times faster than a min and max over short
    rows. Devices without float64 (MPS) check the min and max instead."""
    if tensor.numel() == 0:
        return torch.ones(lead, dtype=torch.bool, device=tensor.device)
    rows = tensor.reshape(*lead, -1)
    if bounded or tensor.dtype == torch.float16:
        return rows.sum(-1, dtype=torch.float32).isfinite()
    if tensor.device.type != "mps":
        return rows.sum(-1, dtype=torch.float64).isfinite()
    low, high = torch.aminmax(rows, dim=-1)
    return low.isfinite() & high.isfinite()


def to_host(tree):
    """Copy a (nested) structure of device tensors into pinned host memory without waiting;
    returns the copies and a CUDA event to wait on (None on CPU, where nothing is copied)."""
    flat = tensors_of(tree)
    if not flat or flat[0].device.type != "cuda":
        return tree, None
    copies = {}
    for t in flat:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        copies[id(t)] = host
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(flat[0].device))  # the copies' device, not the current one
    return with_tensors_replaced(tree, copies), event


# Plain recursive functions, not closures: a closure that calls itself is a reference cycle, which would
# keep the batch's device tensors alive until the garbage collector runs instead of when the batch is done.
def tensors_of(node) -> list[torch.Tensor]:
    """The tensors of a nested structure of dicts, lists and tuples, in order."""
    if isinstance(node, torch.Tensor):
        return [node]
    children = node.values() if isinstance(node, dict) else node if isinstance(node, (list, tuple)) else ()
    return [t for child in children for t in tensors_of(child)]


def with_tensors_replaced(node, copies: dict):
    """`node` with each tensor replaced by `copies[id(tensor)]`."""
    if isinstance(node, torch.Tensor):
        return copies[id(node)]
    if isinstance(node, dict):
        return {k: with_tensors_replaced(v, copies) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(with_tensors_replaced(v, copies) for v in node)
    return node


@dataclass
class HeadRows:
    """What every batch needs from the head: the draft ids on the device, and for `hidden` caches
    the draft rows and logit transform used to rebuild probs (quality report, start-up check); None
    for the other formats, which never read them: their fp32 copy is device memory the plan counts
    only for `hidden` (`MemoryPlan.head_rows`)."""

    selected: torch.Tensor
    draft_rows: torch.Tensor | None
    transform: object

    @classmethod
    def of(cls, target: Target, selected_token_ids, target_format: str) -> HeadRows:
        selected = torch.as_tensor(selected_token_ids, device=target.device)
        if target_format != "hidden":
            return cls(selected, None, None)
        rows = target.head.weight.index_select(0, selected).float()
        bias = target.head.bias.index_select(0, selected).float() if getattr(target.head, "bias", None) is not None else None
        return cls(selected, rows, head_transform_from(head_spec(target.model.config), bias))


# Head rows converted to fp32 at a time on their way to the head file: the device holds one such chunk
# (128 MiB at H 8192) beside the weights, at start-up, when no batch holds the memory the plan gives it.
HEAD_COPY_ROWS = 4096


def write_head_rows(out: Path, prep: Prepared, target: Target) -> None:
    """vocab/lm_head.safetensors for `hidden` caches: the draft rows (and with --store-full-head all rows),
    and the head's bias over the whole vocabulary when it has one."""
    weight = target.head.weight
    tensors = {"draft_rows": rows_in_fp32_on_host(weight, torch.as_tensor(prep.selected_token_ids, device=weight.device))}
    if prep.cfg.store_full_head:
        tensors["weight"] = rows_in_fp32_on_host(weight)
    if getattr(target.head, "bias", None) is not None:
        tensors["bias"] = target.head.bias.float().cpu()
    with atomic_write(out / LM_HEAD_FILE) as tmp, mode_of_open(tmp):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def rows_in_fp32_on_host(weight: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """`weight`'s rows `ids` (default: all) as fp32 on the host, converted HEAD_COPY_ROWS rows at a time: a
    whole head in fp32 on the device ([V, H], 4.2 GB at a 128k vocabulary and H 8192) is memory the plan
    does not count. Exactly `weight[ids].float()`: a cast is elementwise."""
    count = len(weight) if ids is None else len(ids)
    host = torch.empty((count, weight.shape[1]), dtype=torch.float32)
    for start in range(0, count, HEAD_COPY_ROWS):
        end = min(start + HEAD_COPY_ROWS, count)
        rows = weight[start:end] if ids is None else weight.index_select(0, ids[start:end])
        host[start:end] = rows.float()
    return host


class Progress:
    """One bar on rank 0: the samples of every rank's pending shards. This rank's shards count batch by
    batch as they go to the writer; another rank's count once published (from their records)."""

    POLL_INTERVAL_S = 1.0  # how often the others' records are looked at

    def __init__(self, prep: Prepared, out: Path, enabled: bool, pending: list[int], names: list[str], rank: int = 0, world_size: int = 1):
        self.enabled, self.out = enabled, out
        self.start = time.perf_counter()
        self.tokens = self.bytes = 0
        # {name: rows} of the other ranks' shards not yet published. This rank's shards are never counted
        # from their records: a record is written before its shard is renamed into place, and a resume may
        # find a damaged shard's stale record; the total is what this run has left to build.
        others = {names[k]: expected_rows(prep, k) for k in range(len(names)) if k % world_size != rank} if enabled else {}
        published = published_records(out, others)
        self.others_pending = {name: rows for name, rows in others.items() if name not in published}
        total = sum(expected_rows(prep, k) for k in pending) + sum(self.others_pending.values()) if enabled else 0
        self.bar = tqdm(total=total, unit="sample", desc="Building", disable=not enabled, dynamic_ncols=True)
        self._last_poll = 0.0

    def batch_done(self, batch: BatchOutput) -> None:
        if not self.enabled:
            return
        self.bar.update(len(batch.samples))
        self.tokens += sum(s["num_tokens"] for s in batch.samples)
        now = time.perf_counter()
        if now - self._last_poll >= self.POLL_INTERVAL_S:
            self._last_poll = now
            self.poll_other_ranks()
        elapsed = max(now - self.start, 1e-9)
        self.bar.set_postfix(tok_s=f"{self.tokens / elapsed:,.0f}", written=f"{self.bytes / 1e9:.3f}GB", refresh=False)

    def shard_done(self, info: dict) -> None:  # called on the writer thread
        self.bytes += info["bytes"]

    def poll_other_ranks(self) -> None:
        """Count the shards other ranks published since the last look."""
        for name, record in published_records(self.out, self.others_pending).items():
            self.bar.update(self.others_pending.pop(name))
            self.tokens += record["tokens"]
            self.bytes += record["bytes"]

    def close(self) -> None:
        self.bar.close()


def published_records(out: Path, names) -> dict[str, dict]:
    """{name: record} of the shards among `names` that are published: in place with their recorded size,
    or deleted after an upload whose sha256 their record holds. The shards are listed before their records
    are read: a rank writes a shard's record first, then renames the shard into place."""
    names = set(names)
    if not names:
        return {}
    sizes = file_sizes(out / "data", names)
    recorded = names & {path.stem for path in (out / BUILD_STATE_DIR / "shards").glob("*.json")}
    published = {}
    for name in recorded:
        record = read_sidecar(out, name)
        if record is not None and (record["bytes"] == sizes[name] if name in sizes else record.get("sha256") is not None):
            published[name] = record
    return published


def file_sizes(folder: Path, names: set[str]) -> dict[str, int]:
    """{name: bytes} of the files among `names` in `folder`: one listing, however many files it holds."""
    sizes = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name in names:
                try:
                    sizes[entry.name] = entry.stat().st_size
                except FileNotFoundError:  # deleted after its upload since the listing
                    pass
    return sizes
