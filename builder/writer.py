"""The background shard writer: encoding, compression, checksumming and writing run off the
forward thread, fed through a bounded queue, so the forward never waits on disk.

The forward thread submits each batch's host tensors (copied from the device
asynchronously, with a CUDA event to wait on) and marks the end of every window. A dispatch
thread hands each row to a pool of encoder threads as soon as its batch arrives (numpy and
zstd release the GIL, so rows compress in parallel, and the next window encodes while this
one is written; the encoders take rows in the order they are written); the writer thread
writes each window's rows in build order, row group by row group; the shard's checksum and
disk flush run on a thread of their own (see shards.ShardWriter). Shard bytes never depend on
the number of threads.
"""

from __future__ import annotations

import heapq
import itertools
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .build_state import sidecar_path
from .errors import Eagle3CacheError, NonFiniteOutput, WriteFailed
from .files import disk_full_error, is_disk_full, write_json_atomic, written_shards_stay_valid
from .formats import merge_quality
from .manifest import argmax_in_vocab
from .shards import HostWords, ShardWriter, column_encodings, encode_columns, shard_schema

QUEUE_DEPTH = 8  # batches in flight between the forward and the writer: bounds host memory
ENCODING_DEPTH = 4  # batches handed to the encoders ahead of the window being written
MAX_AUTO_WRITER_THREADS = 8


def default_writer_threads() -> int:
    """This process's share of the host's cores (one build process per GPU), at most 8."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(MAX_AUTO_WRITER_THREADS, (os.cpu_count() or 1) // max(local_processes, 1)))


@dataclass
class BatchOutput:
    """One forward batch on the host: rows of `samples` are positions `window_positions` of the window.

    `columns` holds per-token tensors `[B, T, ...]` and per-loss-row tensors `[n_loss, ...]`
    (row-major over the batch), named as the layout's columns; `per_loss` names the latter.
    `tokens`, when given, is the padded `(input_ids, loss_mask)` `[B, T]` the forward ran on:
    rows slice their stored token ids from it rather than converting each sample's lists.
    """

    window_positions: list[int]
    samples: list[dict]
    columns: dict[str, torch.Tensor]
    per_loss: frozenset
    finite: torch.Tensor  # [B] bool: no NaN/Inf in the sample's live aux states or probs
    quality: dict  # device->host scalars/vectors of formats.quality_of_batch
    ready: object = None  # a torch.cuda.Event marking the end of the device->host copy
    tokens: tuple[torch.Tensor, torch.Tensor] | None = None

    def rows(self):
        """(window position, (row, argmax)), or (position, (None, sample)) for a non-finite sample.
        A row holds the sample's scalars and its columns as HostWords (see `encode_row`)."""
        for position, (sample, tensors, tokens) in self.split():
            yield position, ((encode_row(sample, tensors, tokens), tensors["target_argmax"]) if tensors is not None else (None, sample))

    def split(self):
        """(window position, (sample, its columns as HostWords, its stored token ids and loss mask or
        None)), columns None for a non-finite sample."""
        self.wait()
        ids, mask = self._stored_tokens()
        columns = {name: HostWords.of(t) for name, t in self.columns.items()}  # rows are sliced in numpy, not torch
        finite = self.finite.tolist()
        offset = 0
        for b, (position, sample) in enumerate(zip(self.window_positions, self.samples)):
            n_loss, length = sample["num_loss_tokens"], sample["num_tokens"]
            if not finite[b]:
                yield position, (sample, None, None)
            else:
                tensors = {name: w[offset : offset + n_loss] if name in self.per_loss else w[b, :length] for name, w in columns.items()}
                yield position, (sample, tensors, (ids[b, :length], mask[b, :length]) if ids is not None else None)
            offset += n_loss

    def wait(self) -> None:
        """Until the device->host copy has landed."""
        if self.ready is not None:
            self.ready.synchronize()

    def argmax_in_vocab(self, in_vocab: np.ndarray) -> list[int]:
        """Per sample: its loss rows whose target argmax is in the draft vocabulary (`in_vocab`: a
        bool per token id). One pass over the batch, not one small op per row on the encoders."""
        self.wait()
        return argmax_in_vocab(self.columns["target_argmax"].numpy(), [s["num_loss_tokens"] for s in self.samples], in_vocab)

    def _stored_tokens(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The padded token ids and loss mask in their stored dtypes (int32, uint8), one cast per batch."""
        if self.tokens is None:
            return None, None
        ids, mask = self.tokens
        return ids.numpy().astype(np.int32), mask.numpy().astype(np.uint8)


def encode_row(sample: dict, tensors: dict[str, HostWords], tokens: tuple | None = None) -> dict:
    """The stored row before encoding: scalars, and every tensor column in its stored dtype.
    `tokens`: the sample's `(input_ids int32, loss_mask uint8)` arrays, else taken from its lists."""
    ids, mask = tokens if tokens is not None else (np.array(sample["input_ids"], np.int32), np.array(sample["loss_mask"], np.uint8))
    row = {
        "sample_id": sample["sample_id"],
        "source_index": sample["source_index"],
        "num_tokens": sample["num_tokens"],
        "input_ids": HostWords(ids.view(np.uint32), floating=False),
        "loss_mask": HostWords(mask, floating=False),
    }
    return row | tensors


def shard_write_error(err: OSError) -> WriteFailed:
    """A shard's write failed for a reason other than space; pyarrow's errors name the file in their text, not in `filename`."""
    return WriteFailed(
        f"writing {err.filename or 'a shard'} failed ({err.strerror or err}); "
        + written_shards_stay_valid("Fix the cause (the folder's permissions, the disk or its file system)")
    )


class BackgroundWriter:
    """Owns the dispatch, encoder and writer threads. Protocol per shard: open_shard,
    (submit* end_window)*, close_shard."""

    def __init__(
        self,
        layout,
        in_vocab: torch.Tensor,
        row_group_bytes: int,
        on_shard_done: Callable[[dict], None] | None = None,
        strict: bool = False,
        compression: str = "zstd",
        threads: int | None = None,
        shard_record: dict | None = None,
    ):
        self.schema = shard_schema(layout)
        self.encodings = column_encodings(layout, compression)
        self._encode_inline = compression == "none"
        self.in_vocab = in_vocab.cpu().numpy()  # a bool per token id
        self.strict = strict
        self.row_group_bytes = row_group_bytes
        self.on_shard_done = on_shard_done
        self.shard_record = shard_record or {}  # fields every shard's sidecar also records (e.g. its batching)
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        self._encoded: queue.Queue = queue.Queue(maxsize=ENCODING_DEPTH)
        self._error: BaseException | None = None
        self._encoders = OrderedEncoderPool(threads or default_writer_threads(), "eagle3-shard-encoder")
        self._windows_dispatched = 0  # the dispatch thread's count: rows are keyed (window, position)
        self._thread = threading.Thread(target=self._run, name="eagle3-shard-writer", daemon=True)
        self._dispatcher = threading.Thread(target=self._dispatch, name="eagle3-shard-dispatch", daemon=True)
        self._thread.start()
        self._dispatcher.start()

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
        self._dispatcher.join()
        self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop without finishing: the shard in progress is discarded (its temp file removed)."""
        self._put(("abort", None), check=False)
        self._dispatcher.join()
        self._thread.join()

    def _put(self, item, check: bool = True) -> None:
        while True:
            if check:
                self._raise_if_failed()
            if not self._dispatcher.is_alive():
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
        if is_disk_full(err):
            raise disk_full_error(err) from err
        if isinstance(err, OSError):  # the user's to fix (permissions, a failing disk); any other error is a bug
            raise shard_write_error(err) from err
        raise RuntimeError(f"the shard writer failed: {err!r}") from err

    def _fail(self, err: BaseException) -> None:
        if self._error is None:  # the first failure is the one to report
            self._error = err

    # ---- dispatch thread side -------------------------------------------------------

    def _dispatch(self) -> None:
        """Rows go to the encoders as soon as their batch arrives; everything passes on in order."""
        try:
            while True:
                item = self._queue.get()
                if item is not None and item[0] == "batch":
                    batch = item[1]
                    in_vocab = batch.argmax_in_vocab(self.in_vocab)
                    rows = [
                        (position, self._hand_off(position, sample, tensors, tokens, hits) if tensors is not None else (None, sample))
                        for hits, (position, (sample, tensors, tokens)) in zip(in_vocab, batch.split())
                    ]
                    item = ("rows", (rows, batch.quality))
                elif item is not None and item[0] == "window":
                    self._windows_dispatched += 1
                if not self._forward(item) or item is None or item[0] == "abort":
                    return
        except BaseException as err:  # surfaced on the forward thread at its next call
            self._fail(err)
            self._forward(("abort", None))

    def _hand_off(self, position: int, sample: dict, tensors: dict, tokens, in_vocab: int) -> Future | tuple:
        """Raw columns are views of the tensors: encoded here, as threads would only add GIL hand-offs."""
        if self._encode_inline:
            return self._encode(sample, tensors, tokens, in_vocab)
        return self._encoders.submit((self._windows_dispatched, position), self._encode, sample, tensors, tokens, in_vocab)

    def _forward(self, item) -> bool:
        while self._thread.is_alive():
            try:
                self._encoded.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    # ---- writer thread side ---------------------------------------------------------

    def _run(self) -> None:
        shard: ShardWriter | None = None
        window: dict[int, Future | tuple] = {}
        totals: dict[str, int] = {}
        try:
            while (item := self._encoded.get()) is not None:
                kind, payload = item
                if kind == "open":
                    shard = ShardWriter(payload, self.schema, self.row_group_bytes, self.encodings)
                    totals = {"tokens": 0, "loss_tokens": 0, "argmax_in_vocab": 0, "failed": [], "quality": {}}
                elif kind == "rows":
                    rows, quality = payload
                    window.update(rows)
                    totals["quality"] = merge_quality(totals["quality"], {k: v.tolist() for k, v in quality.items()})
                elif kind == "window":
                    for position in range(payload):  # build order
                        encoded = window.pop(position)
                        self._write_row(shard, encoded.result() if isinstance(encoded, Future) else encoded, totals)
                elif kind == "close":
                    self._publish(shard, totals)
                    shard = None
                elif kind == "abort":
                    break
        except BaseException as err:  # surfaced on the forward thread at its next call
            self._fail(err)
        finally:
            for pending in window.values():
                if isinstance(pending, Future):
                    pending.cancel()
            self._encoders.shutdown()
            if shard is not None:
                shard.abort()

    def _encode(self, sample: dict, tensors: dict, tokens, in_vocab: int) -> tuple[dict, int, int]:
        """On an encoder thread (inline for raw columns): (stored row, loss tokens, argmax in the draft vocab)."""
        return encode_columns(encode_row(sample, tensors, tokens), self.encodings), sample["num_loss_tokens"], in_vocab

    def _write_row(self, shard: ShardWriter, encoded: tuple, totals: dict) -> None:
        row, *counts = encoded
        if row is None:  # never written silently: recorded, or fatal with --strict
            sample = counts[0]
            if self.strict:
                raise NonFiniteOutput(
                    f"--strict: the target produced NaN/Inf for input row {sample['source_index']} (id {sample['sample_id']!r}); "
                    "check the model's dtype and weights, or run without --strict to record and skip such samples"
                )
            totals["failed"].append(
                {
                    "sample_id": sample["sample_id"],
                    "source_index": sample["source_index"],
                    "shard": shard.path.name,
                    "reason": "non_finite_output",
                }
            )
            return
        loss_tokens, in_vocab = counts
        totals["tokens"] += row["num_tokens"]
        totals["loss_tokens"] += loss_tokens
        totals["argmax_in_vocab"] += in_vocab
        shard.add(row)

    def _publish(self, shard: ShardWriter, totals: dict) -> None:
        info = shard.close().to_dict() | totals | self.shard_record
        # before the rename, durably: a shard whose name survives a power cut has its record
        write_json_atomic(sidecar_path(shard.path.parent.parent, shard.path.name), info)
        shard.publish()
        if self.on_shard_done is not None:
            self.on_shard_done(info)


class OrderedEncoderPool:
    """Encoder threads that take the pending row the writer needs first, lowest (window,
    position): rows arrive in the forward's length-sorted batches but are written in build
    order, so in FIFO order the writer would wait for most of a window before its first row
    group; in this order it writes a window's first rows while the rest are encoded."""

    def __init__(self, threads: int, name: str):
        self._pending: list = []  # heap of (key, submission number, future, function, args)
        self._submitted = itertools.count()
        self._changed = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, key: tuple, function: Callable, *args) -> Future:
        future: Future = Future()
        with self._changed:
            if self._closed:
                raise RuntimeError("the encoder pool is shut down")
            heapq.heappush(self._pending, (key, next(self._submitted), future, function, args))
            self._changed.notify()
        return future

    def _work(self) -> None:
        while True:
            with self._changed:
                while not self._pending and not self._closed:
                    self._changed.wait()
                if not self._pending:
                    return
                *_, future, function, args = heapq.heappop(self._pending)
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = function(*args)
            except BaseException as err:  # noqa: BLE001 - handed to the future's owner
                future.set_exception(err)
            else:
                future.set_result(result)

    def shutdown(self) -> None:
        """Cancel what has not started, and wait for the rows being encoded."""
        with self._changed:
            self._closed = True
            for *_, future, _function, _args in self._pending:
                future.cancel()
                future.set_running_or_notify_cancel()  # wakes whoever waits on it
            self._pending.clear()
            self._changed.notify_all()
        for thread in self._threads:
            thread.join()
