"""Parquet shards: one row per sample, tensors as raw little-endian bytes in binary columns.

A shard is written row group by row group (groups sized by bytes) to a hidden temp name,
hashed while it is written, fsynced, then renamed: a shard file that exists is complete.
"""

from __future__ import annotations

import hashlib
import os
import queue
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .formats import TORCH_DTYPES  # noqa: F401 (re-exported for readers of the stored dtypes)

if sys.byteorder != "little":  # the stored bytes are little-endian; decoding assumes a native match
    raise ImportError("eagle3-cache stores tensors little-endian and supports little-endian hosts only")

SCALAR_COLUMNS = {"sample_id": pa.string(), "source_index": pa.int64(), "num_tokens": pa.int32()}


def shard_schema(layout) -> pa.Schema:
    """Scalar columns, then one binary column per tensor column of the layout (see formats.Layout)."""
    fields = [pa.field(k, v) for k, v in SCALAR_COLUMNS.items()]
    return pa.schema(fields + [pa.field(name, pa.binary()) for name in layout.columns()])


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def shard_name(index: int, num_shards: int, split: str = "train") -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}.parquet"


@dataclass
class ShardInfo:
    name: str
    rows: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


class _HashingFile:
    """A write-only file that hashes what passes through, so a shard is never re-read to checksum it.
    sha256 is slower than a disk write: a helper thread hashes (hashlib releases the GIL) while the
    writer goes on encoding and writing."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")
        self._hash = hashlib.sha256()
        self._chunks: queue.Queue = queue.Queue(maxsize=64)
        self._hasher = threading.Thread(target=self._hash_chunks, name="eagle3-shard-hasher", daemon=True)
        self._hasher.start()
        self.closed = False

    def _hash_chunks(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            self._hash.update(chunk)

    def write(self, data) -> int:
        written = self._file.write(data)
        self._chunks.put(bytes(data))  # a copy: the caller may reuse its buffer
        return written

    def tell(self) -> int:
        return self._file.tell()

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._chunks.put(None)
            self._hasher.join()
            self.closed = True

    def discard(self) -> None:
        """Close without flushing: after a failed write (a full disk) the buffer cannot go anywhere."""
        if not self.closed:
            self.closed = True
            self._chunks.put(None)
            try:
                self._file.close()
            except OSError:
                pass

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class ShardWriter:
    """Writes one shard; use as a context manager so a failure leaves no partial file behind."""

    def __init__(self, path: Path, schema: pa.Schema, row_group_bytes: int):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.schema = schema
        self.row_group_bytes = row_group_bytes
        self._rows: list[dict] = []
        self._buffered_bytes = 0
        self._sink = _HashingFile(self.tmp_path)
        scalar = [name for name in SCALAR_COLUMNS]
        self._writer = pq.ParquetWriter(
            pa.PythonFile(self._sink, mode="w"), schema, compression="none", use_dictionary=False,
            write_statistics=scalar,  # min/max of megabyte-sized binary values would be waste
        )
        self.rows = 0

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()

    def add(self, row: dict) -> None:
        self._rows.append(row)
        self._buffered_bytes += sum(len(v) for v in row.values() if isinstance(v, bytes))
        self.rows += 1
        if self._buffered_bytes >= self.row_group_bytes:
            self._flush_row_group()

    def _flush_row_group(self) -> None:
        if self._rows:
            columns = [column_array([row[f.name] for row in self._rows], f.type) for f in self.schema]
            self._writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
            self._rows, self._buffered_bytes = [], 0

    def close(self) -> ShardInfo:
        self._flush_row_group()
        self._writer.close()
        self._sink.close()
        return ShardInfo(self.path.name, self.rows, self.tmp_path.stat().st_size, self._sink.hexdigest())

    def publish(self) -> None:
        """Atomically give the finished shard its real name."""
        os.replace(self.tmp_path, self.path)
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        try:
            self._writer.close()
        except Exception:
            pass
        self._sink.discard()
        self.tmp_path.unlink(missing_ok=True)


def column_array(values: list, arrow_type: pa.DataType) -> pa.Array:
    """Binary values as one buffer + offsets (a single memcpy; `from_pylist` copies value by value
    at a fraction of disk speed); other types through `pa.array`."""
    if arrow_type != pa.binary():
        return pa.array(values, type=arrow_type)
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    return pa.Array.from_buffers(pa.binary(), len(values), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(values))])


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def shard_row_count(path: Path) -> int | None:
    """Rows per the Parquet footer, or None when the file is not a readable Parquet file."""
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowInvalid, OSError):
        return None
