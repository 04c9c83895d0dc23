"""The background shard writer: encoding, checksumming and writing run on their own thread,
fed through a bounded queue, so the forward never waits on disk.

The forward thread submits each batch's host tensors (copied from the device
asynchronously, with a CUDA event to wait on) and marks the end of every window; the
writer buffers one window's rows and writes them in build order, row group by row group.
"""

from __future__ import annotations

import errno
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import DiskFull, Eagle3CacheError, NonFiniteOutput
from .manifest import sidecar_path, write_json_atomic
from .formats import merge_quality
from .shards import ShardWriter, shard_schema, tensor_bytes

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
QUEUE_DEPTH = 8  # batches in flight between the forward and the writer: bounds host memory


@dataclass
class BatchOutput:
    """One forward batch on the host: rows of `samples` are positions `window_positions` of the window.

    `columns` holds per-token tensors `[B, T, ...]` and per-loss-row tensors `[n_loss, ...]`
    (row-major over the batch), named as the layout's columns; `per_loss` names the latter.
    """

    window_positions: list[int]
    samples: list[dict]
    columns: dict[str, torch.Tensor]
    per_loss: frozenset
    finite: torch.Tensor  # [B] bool: no NaN/Inf in the sample's live aux states or probs
    quality: dict  # device->host scalars/vectors of formats.quality_of_batch
    ready: object = None  # a torch.cuda.Event marking the end of the device->host copy

    def rows(self):
        """(window position, (encoded row, argmax)), or (position, (None, sample)) for a non-finite sample."""
        if self.ready is not None:
            self.ready.synchronize()
        offset = 0
        for b, (position, sample) in enumerate(zip(self.window_positions, self.samples)):
            n_loss, length = sample["num_loss_tokens"], sample["num_tokens"]
            if not self.finite[b]:
                yield position, (None, sample)
            else:
                tensors = {
                    name: t[offset : offset + n_loss] if name in self.per_loss else t[b, :length]
                    for name, t in self.columns.items()
                }
                yield position, (encode_row(sample, tensors), tensors["target_argmax"])
            offset += n_loss


def encode_row(sample: dict, tensors: dict[str, torch.Tensor]) -> dict:
    row = {
        "sample_id": sample["sample_id"],
        "source_index": sample["source_index"],
        "num_tokens": sample["num_tokens"],
        "input_ids": tensor_bytes(torch.as_tensor(sample["input_ids"], dtype=torch.int32)),
        "loss_mask": tensor_bytes(torch.as_tensor(sample["loss_mask"], dtype=torch.uint8)),
    }
    return row | {name: tensor_bytes(t) for name, t in tensors.items()}


class BackgroundWriter:
    """Owns the writer thread. Protocol per shard: open_shard, (submit* end_window)*, close_shard."""

    def __init__(self, layout, in_vocab: torch.Tensor, row_group_bytes: int, on_shard_done: Callable[[dict], None] | None = None, strict: bool = False,
                 shard_record: dict | None = None):
        self.schema = shard_schema(layout)
        self.in_vocab = in_vocab
        self.strict = strict
        self.row_group_bytes = row_group_bytes
        self.on_shard_done = on_shard_done
        self.shard_record = shard_record or {}  # fields every shard's sidecar also records (e.g. its batching)
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="eagle3-shard-writer", daemon=True)
        self._thread.start()

    # ---- forward thread side --------------------------------------------------------

    def open_shard(self, path: Path) -> None:
        self._put(("open", path))

    def submit(self, batch: BatchOutput) -> None:
        self._put(("batch", batch))

    def end_window(self, num_rows: int) -> None:
        self._put(("window", num_rows))

    def close_shard(self) -> None:
        self._put(("close", None))

    def finish(self) -> None:
        """Wait until everything submitted is on disk; re-raise a writer failure here."""
        self._put(None)
        self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop without finishing: the shard in progress is discarded (its temp file removed)."""
        self._put(("abort", None), check=False)
        self._thread.join()

    def _put(self, item, check: bool = True) -> None:
        while True:
            if check:
                self._raise_if_failed()
            if not self._thread.is_alive():
                return
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _raise_if_failed(self) -> None:
        err = self._error
        if err is None:
            return
        if isinstance(err, Eagle3CacheError):
            raise err
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            raise DiskFull(
                f"no space left writing {getattr(err, 'filename', None) or 'a shard'} ({err.strerror}); every shard "
                "already written is complete and valid. Free space (or raise the quota), then rerun with --resume."
            ) from err
        raise RuntimeError(f"the shard writer failed: {err!r}") from err

    # ---- writer thread side ---------------------------------------------------------

    def _run(self) -> None:
        shard: ShardWriter | None = None
        window: dict[int, dict] = {}
        totals: dict[str, int] = {}
        try:
            while (item := self._queue.get()) is not None:
                kind, payload = item
                if kind == "open":
                    shard = ShardWriter(payload, self.schema, self.row_group_bytes)
                    totals = {"tokens": 0, "loss_tokens": 0, "argmax_in_vocab": 0, "failed": [], "quality": {}}
                elif kind == "batch":
                    window.update(payload.rows())
                    totals["quality"] = merge_quality(totals["quality"], {k: v.tolist() for k, v in payload.quality.items()})
                elif kind == "window":
                    for position in range(payload):  # build order
                        self._write_row(shard, window.pop(position), totals)
                elif kind == "close":
                    self._publish(shard, totals)
                    shard = None
                elif kind == "abort":
                    break
        except BaseException as err:  # surfaced on the forward thread at its next call
            self._error = err
        finally:
            if shard is not None:
                shard.abort()

    def _write_row(self, shard: ShardWriter, encoded: tuple, totals: dict) -> None:
        row, argmax = encoded
        if row is None:  # never written silently: recorded, or fatal with --strict
            sample = argmax
            if self.strict:
                raise NonFiniteOutput(
                    f"--strict: the target produced NaN/Inf for input row {sample['source_index']} (id {sample['sample_id']!r}); "
                    "check the model's dtype and weights, or run without --strict to record and skip such samples"
                )
            totals["failed"].append({"sample_id": sample["sample_id"], "source_index": sample["source_index"], "shard": shard.path.name, "reason": "non_finite_output"})
            return
        totals["tokens"] += row["num_tokens"]
        totals["loss_tokens"] += len(argmax)
        totals["argmax_in_vocab"] += int(self.in_vocab[argmax.long()].sum())
        shard.add(row)

    def _publish(self, shard: ShardWriter, totals: dict) -> None:
        info = shard.close().to_dict() | totals | self.shard_record
        write_json_atomic(sidecar_path(shard.path.parent.parent, shard.path.name), info)  # before the rename
        shard.publish()
        if self.on_shard_done is not None:
            self.on_shard_done(info)
