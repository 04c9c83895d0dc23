"""The build: prepared samples -> target forward -> Parquet shards -> vocab files -> card (last)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .batching import pad_batch, plan_batches
from .config import BuildConfig
from .manifest import (
    BUILD_STATE_FILE,
    VOCAB_FILE,
    check_resume,
    read_sidecar,
    sidecar_path,
    write_json_atomic,
)
from .prepare import Prepared, prepare
from .shards import TORCH_DTYPES, ShardWriter, file_sha256, shard_name, shard_row_count, shard_schema, tensor_bytes
from .target import Target, compute_device, load_model

log = logging.getLogger(__name__)
WINDOW_ROW_GROUPS = 4  # rows are computed length-sorted within windows of this many row groups


@dataclass
class BuildResult:
    output_dir: Path
    prepared: Prepared
    shards: list[dict] = field(default_factory=list)
    written: list[str] = field(default_factory=list)  # shards written by this run (others were resumed)
    manifest: dict | None = None


def build(cfg: BuildConfig, *, progress: bool = True) -> BuildResult:
    prep = prepare(cfg)
    out = Path(cfg.output_dir)
    result = BuildResult(out, prep)
    if cfg.dry_run:
        return result
    if cfg.resume and (out / BUILD_STATE_FILE).exists():
        check_resume(out, prep.identity)  # refuses before anything is written
        remove_leftover_temp_files(out)
    elif cfg.resume:
        check_resume(out, prep.identity)
    else:
        write_json_atomic(out / BUILD_STATE_FILE, prep.identity)

    names = [shard_name(k, prep.num_shards) for k in range(prep.num_shards)]
    pending = [k for k, name in enumerate(names) if not shard_is_complete(out, name, expected_rows(prep, k))]
    if pending:
        device, compute_dtype = compute_device()
        model = load_model(prep.model_path, cfg.target_revision, cfg.trust_remote_code, device, compute_dtype)
        target = Target(model, prep.aux_layer_ids)
        try:
            write_shards(prep, target, out, pending, names, result, progress)
        finally:
            target.close()
    result.shards = [read_sidecar(out, name) for name in names]
    write_vocab(out, prep)
    from .card import write_card  # the card is written last: a cache with a card is complete

    result.manifest = write_card(out, prep, result.shards)
    return result


def expected_rows(prep: Prepared, shard: int) -> int:
    return min(prep.cfg.shard_size, len(prep.samples) - shard * prep.cfg.shard_size)


def shard_is_complete(out: Path, name: str, rows: int) -> bool:
    """A shard file exists only once complete (atomic rename); its sidecar and footer must agree."""
    path = out / "data" / name
    if not path.exists():
        return False
    sidecar = read_sidecar(out, name)
    if sidecar is None or sidecar["bytes"] != path.stat().st_size or shard_row_count(path) != rows:
        log.warning("shard %s exists but does not match its record; it will be rebuilt", name)
        path.unlink()
        return False
    return True


def remove_leftover_temp_files(out: Path) -> None:
    for tmp in (out / "data").glob(".*.tmp-*"):
        tmp.unlink()


def write_shards(prep: Prepared, target: Target, out: Path, pending: list[int], names: list[str], result: BuildResult, progress: bool):
    (out / "data").mkdir(parents=True, exist_ok=True)
    total = sum(expected_rows(prep, k) for k in pending)
    bar = tqdm(total=total, unit="sample", desc="Building", disable=not progress, dynamic_ncols=True)
    stats = {"tokens": 0, "bytes": 0, "start": time.perf_counter()}
    for k in pending:
        info = write_one_shard(prep, target, out / "data" / names[k], k, bar, stats)
        result.written.append(info["name"])
    bar.close()


def write_one_shard(prep: Prepared, target: Target, path: Path, shard: int, bar, stats) -> dict:
    cfg = prep.cfg
    start = shard * cfg.shard_size
    rows = prep.samples.select(range(start, start + expected_rows(prep, shard)))
    selected = torch.as_tensor(prep.selected_token_ids)
    in_vocab = torch.zeros(prep.vocab_size, dtype=torch.bool)
    in_vocab[selected] = True
    totals = {"tokens": 0, "loss_tokens": 0, "argmax_in_vocab": 0}
    with ShardWriter(path, shard_schema(), cfg.row_group_bytes) as writer:
        for window in row_windows(prep, rows, cfg.row_group_bytes * WINDOW_ROW_GROUPS):
            encoded = supervise_window(prep, target, window, selected)
            for row in encoded:  # build order
                argmax = torch.frombuffer(bytearray(row["target_argmax"]), dtype=torch.int32).long()
                totals["tokens"] += row["num_tokens"]
                totals["loss_tokens"] += len(argmax)
                totals["argmax_in_vocab"] += int(in_vocab[argmax].sum())
                writer.add(row)
                stats["tokens"] += row["num_tokens"]
                stats["bytes"] += sum(len(v) for v in row.values() if isinstance(v, bytes))
            bar.update(len(encoded))
            elapsed = max(time.perf_counter() - stats["start"], 1e-9)
            bar.set_postfix(tok_s=f"{stats['tokens'] / elapsed:,.0f}", written=f"{stats['bytes'] / 1e9:.3f}GB", refresh=False)
        info = writer.close().to_dict() | totals
        write_json_atomic(sidecar_path(path.parent.parent, path.name), info)  # before the rename: a shard never lacks one
        writer.publish()
    return info


def row_windows(prep: Prepared, rows, window_bytes: int):
    """Consecutive runs of samples whose encoded size (known from lengths alone) fits the window."""
    per_token, per_loss = bytes_per_position(prep)
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


def bytes_per_position(prep: Prepared) -> tuple[int, int]:
    item = TORCH_DTYPES[prep.cfg.dtype].itemsize
    per_token = 4 + 1 + len(prep.aux_layer_ids) * prep.hidden_size * item
    per_loss = len(prep.selected_token_ids) * item + 4
    return per_token, per_loss


def supervise_window(prep: Prepared, target: Target, window: list[dict], selected: torch.Tensor) -> list[dict]:
    cfg = prep.cfg
    store_dtype = TORCH_DTYPES[cfg.dtype]
    encoded: list[dict | None] = [None] * len(window)
    pad_id = prep.tokenizer.pad_token_id if prep.tokenizer.pad_token_id is not None else 0
    for batch in plan_batches([r["num_tokens"] for r in window], cfg.token_budget, cfg.batch_size):
        samples = [window[i] for i in batch]
        ids, attention, loss = pad_batch([s["input_ids"] for s in samples], [s["loss_mask"] for s in samples], pad_id)
        aux, probs, argmax = target.supervise(ids.to(target.device), attention.to(target.device), loss.to(target.device), selected)
        aux, probs, argmax = aux.to(store_dtype).cpu(), probs.to(store_dtype).cpu(), argmax.to(torch.int32).cpu()
        offset = 0
        for row_in_batch, (i, sample) in enumerate(zip(batch, samples)):
            n_loss = sample["num_loss_tokens"]
            encoded[i] = encode_row(sample, aux[row_in_batch, : sample["num_tokens"]], probs[offset : offset + n_loss], argmax[offset : offset + n_loss])
            offset += n_loss
    return encoded


def encode_row(sample: dict, aux: torch.Tensor, probs: torch.Tensor, argmax: torch.Tensor) -> dict:
    return {
        "sample_id": sample["sample_id"],
        "source_index": sample["source_index"],
        "num_tokens": sample["num_tokens"],
        "input_ids": tensor_bytes(torch.as_tensor(sample["input_ids"], dtype=torch.int32)),
        "loss_mask": tensor_bytes(torch.as_tensor(sample["loss_mask"], dtype=torch.uint8)),
        "aux_hidden_states": tensor_bytes(aux),
        "target_probs": tensor_bytes(probs),
        "target_argmax": tensor_bytes(argmax),
    }


def write_vocab(out: Path, prep: Prepared) -> None:
    path = out / VOCAB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(
        {
            "selected_token_ids": torch.as_tensor(prep.selected_token_ids, dtype=torch.int64),
            "token_counts": torch.as_tensor(prep.token_counts, dtype=torch.int64),
        },
        str(tmp),
    )
    tmp.replace(path)


def vocab_file_sha256(out: Path) -> str:
    return file_sha256(out / VOCAB_FILE)
