"""Parquet shards: one row per sample, tensors as little-endian bytes in binary columns.

Each tensor value is stored `raw` (its bytes), or `byte_planes_zstd` (the default for the
supervision columns): the value's bytes split into byte planes, most significant first, each
plane zstd-compressed or stored as is (see `encode_value`). Floats keep their sign and
exponent in the most significant byte, which compresses well; the low mantissa bytes are
close to random, so they are stored as is and cost no compression time. Decoding is exact.

A shard is written row group by row group (groups sized by tensor bytes) into a native file
under a hidden temp name. A helper thread follows the file as Parquet writes it: it checksums
what has been written (xxh3-128, read back from the page cache) and flushes it to disk every
FLUSH_BYTES, so the disk writes one part while Parquet writes the next; the file is then
fsynced and renamed: a shard file that exists is complete.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import os
import queue
import re
import struct
import sys
import threading
import warnings
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .files import fsync_dir, new_hash, temp_path
from .formats import TORCH_DTYPES  # also re-exported for readers of the stored dtypes

if sys.byteorder != "little":  # the stored bytes are little-endian; decoding assumes a native match
    raise ImportError("eagle3-cache stores tensors little-endian and supports little-endian hosts only")

SCALAR_COLUMNS = {"sample_id": pa.string(), "source_index": pa.int64(), "num_tokens": pa.int32()}

# ---- checksums --------------------------------------------------------------------------------

CHECKSUM_ALGORITHM = "xxh3_128"  # integrity, resume and verify; the Hub computes its own sha256 on upload
# Files are hashed by files.file_hash; caches of format version 1 recorded "sha256".


# ---- column encodings -------------------------------------------------------------------------

COMPRESSIONS = ("zstd", "none")  # --compression; the first is the default
RAW, PLANES_ZSTD = "raw", "byte_planes_zstd"
ZSTD_LEVEL = 1  # measured (benchmarks/float_encodings.py): higher levels gain < 2% at 2-5x the CPU time; zstd's
# negative "fast" levels skip the entropy coding that the exponent plane's gain comes from
UNCOMPRESSED_COLUMNS = ("input_ids", "loss_mask")  # a few bytes per token; plain readers (and verify) read them as is
_ZSTD = pa.Codec("zstd", compression_level=ZSTD_LEVEL)
_HEADER = struct.Struct("<QB")  # elements, planes
_PLANE = struct.Struct("<BQ")  # codec (0 stored, 1 zstd), stored bytes
_STORED, _ZSTD_CODEC = 0, 1


def column_encodings(layout, compression: str) -> dict[str, str]:
    """{tensor column: encoding} for a layout (formats.Layout) and --compression."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression {compression!r}: expected one of {COMPRESSIONS}")
    return {name: RAW if compression == "none" or name in UNCOMPRESSED_COLUMNS else PLANES_ZSTD for name in layout.columns()}


def max_added_bytes(itemsize: int, encoding: str) -> int:
    """The most bytes encoding adds to one value's own bytes: `byte_planes_zstd` keeps a plane
    compressed only when zstd shrinks it, so a value never grows by more than its header."""
    return 0 if encoding == RAW else _HEADER.size + itemsize * _PLANE.size


@dataclass(frozen=True)
class Encoded:
    """A stored value as buffers (one, for the encodings here), referenced by Arrow without a copy."""

    parts: tuple
    nbytes: int  # stored
    raw_nbytes: int  # the tensor's own bytes: what row groups are sized by


@dataclass(frozen=True)
class HostWords:
    """A host tensor's memory as numpy unsigned words of its element size (numpy has no bfloat16 or
    float8), and whether it holds floats: all that encoding needs. The writer views each batch
    column this way once and slices rows in numpy: every torch call, however small, lets go of the
    GIL, and under a busy forward thread each one costs a wait to get it back."""

    words: np.ndarray
    floating: bool

    @classmethod
    def of(cls, tensor: torch.Tensor) -> HostWords:
        k = tensor.element_size()
        return cls(tensor.view(_SAME_SIZE_INTS[k]).numpy().view(_WORDS[k]), tensor.is_floating_point())

    def __getitem__(self, index) -> HostWords:
        return HostWords(self.words[index], self.floating)

    def __len__(self) -> int:
        return len(self.words)


_SAME_SIZE_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SIGNED_WORDS = {2: np.int16, 4: np.int32, 8: np.int64}  # torch.from_numpy takes these; it has no uint16


def _as_bytes_array(value: torch.Tensor | HostWords) -> np.ndarray:
    """The value's memory as a uint8 array (zero-copy when contiguous)."""
    if isinstance(value, HostWords):
        return np.ascontiguousarray(value.words).reshape(-1).view(np.uint8)
    # Same-size integers first: that view takes any strides (a byte view needs a unit stride, which
    # `contiguous()` leaves unfixed on tensors of 0 or 1 elements); numpy then copies only if strided.
    words = value.detach().view(_SAME_SIZE_INTS[value.element_size()]).numpy()
    return np.ascontiguousarray(words).reshape(-1).view(np.uint8)


def _element_kind(value: torch.Tensor | HostWords) -> tuple[int, bool]:
    """(bytes per element, floating point)."""
    if isinstance(value, HostWords):
        return value.words.itemsize, value.floating
    return value.element_size(), value.is_floating_point()


def encode_value(tensor: torch.Tensor | HostWords, encoding: str, level: int = ZSTD_LEVEL) -> Encoded:
    """One tensor (or its HostWords) as a stored value.

    `byte_planes_zstd`: header `<QB` (elements n, planes k = itemsize), then per plane `<BQ`
    (codec: 0 stored, 1 zstd; stored length), then the planes, most significant byte first,
    each n bytes once decoded. A float's most significant plane and every plane of an integer
    or 1-byte type is compressed (kept as is when zstd does not shrink it); the lower planes of
    a float (mantissa bits, close to random) are stored as is. `level` (zstd's; an encoder
    choice the decoder does not need) is for measuring: the cache is written at ZSTD_LEVEL.
    """
    data = _as_bytes_array(tensor)
    if encoding == RAW:
        return Encoded((data,), data.nbytes, data.nbytes)
    if encoding != PLANES_ZSTD:
        raise ValueError(f"unknown column encoding {encoding!r}")
    k, floating = _element_kind(tensor)
    n = data.nbytes // k
    words = data.view(_WORDS[k])  # plane j is byte k-1-j of each word
    compressed = {}  # plane -> zstd bytes, for the planes zstd shrinks
    for j in range(k):
        if j == 0 or not floating:
            packed = _zstd(level).compress(_byte_plane(words, k - 1 - j, _scratch(n)))
            if packed.size < n:
                compressed[j] = packed
    sizes = [compressed[j].size if j in compressed else n for j in range(k)]
    header = _HEADER.pack(n, k) + b"".join(_PLANE.pack(_ZSTD_CODEC if j in compressed else _STORED, sizes[j]) for j in range(k))
    out = _value_buffer(len(header) + sum(sizes))  # the value, contiguous: Arrow takes it without a copy
    out[: len(header)] = np.frombuffer(header, dtype=np.uint8)
    offset = len(header)
    for j in range(k):
        plane = out[offset : offset + sizes[j]]
        if j in compressed:
            plane[:] = np.frombuffer(compressed[j], dtype=np.uint8)
        else:
            _byte_plane(words, k - 1 - j, plane)
        offset += sizes[j]
    return Encoded((out,), out.nbytes, data.nbytes)


def _value_buffer(nbytes: int) -> np.ndarray:
    """A stored value's memory, from Arrow's memory pool: the pool keeps freed memory for the
    next values, where fresh memory from the system faults in page by page (and, with many
    encoder threads, the faults and unmaps contend for the process's memory map)."""
    return np.frombuffer(pa.allocate_buffer(nbytes), dtype=np.uint8)


def _zstd(level: int) -> pa.Codec:
    return _ZSTD if level == ZSTD_LEVEL else pa.Codec("zstd", compression_level=level)


_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SCRATCH = threading.local()  # per encoder thread: the plane zstd reads, reused (no page faults per value)


def _scratch(nbytes: int) -> np.ndarray:
    buffer = getattr(_SCRATCH, "buffer", None)
    if buffer is None or buffer.size < nbytes:
        buffer = _SCRATCH.buffer = np.empty(nbytes, dtype=np.uint8)
    return buffer[:nbytes]


def _byte_plane(words: np.ndarray, byte: int, out: np.ndarray) -> np.ndarray:
    """Byte `byte` (0: least significant) of every word into `out`: a shift and a truncating
    cast, vectorised, rather than a strided byte copy (several times slower)."""
    if byte == 0:
        np.copyto(out, words, casting="unsafe")
    else:
        np.right_shift(words, 8 * byte, out=out, casting="unsafe")
    return out


def decode_value(data, dtype: torch.dtype | str) -> torch.Tensor:
    """Inverse of `encode_value` for `byte_planes_zstd`: a 1-D tensor of `dtype` (bit-exact). `dtype`:
    a torch dtype, or the name a manifest's `columns` record ('bf16', 'fp32', 'int32', ...)."""
    if isinstance(dtype, str):
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected a torch dtype or a column dtype a manifest records, one of {list(TORCH_DTYPES)}")
        dtype = TORCH_DTYPES[dtype]
    view = memoryview(data).cast("B")
    n, k = _HEADER.unpack_from(view, 0)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if k != itemsize:
        raise ValueError(f"a stored value has {k} byte planes, but its column's dtype {dtype} has {itemsize} bytes per element")
    offset = _HEADER.size + k * _PLANE.size
    planes = []
    for j in range(k):
        codec, size = _PLANE.unpack_from(view, _HEADER.size + j * _PLANE.size)
        payload = view[offset : offset + size]
        offset += size
        planes.append(_ZSTD.decompress(payload, decompressed_size=n) if codec == _ZSTD_CODEC else payload)
    if k == 1:
        return frombuffer(planes[0], dtype)
    return torch.from_numpy(_join_planes(planes, n, k).view(_SIGNED_WORDS[k])).view(dtype)


def _join_planes(planes: list, n: int, k: int) -> np.ndarray:
    """The words whose byte k-1-j is plane j: shifts and ors over whole planes, several times
    faster than writing each plane into a strided byte view. The words come from Arrow's pool,
    which reuses freed memory instead of faulting fresh pages in for every value."""
    words = np.frombuffer(pa.allocate_buffer(n * k), dtype=_WORDS[k])
    np.left_shift(np.frombuffer(planes[0], dtype=np.uint8), 8 * (k - 1), out=words, dtype=_WORDS[k])
    for j in range(1, k):
        plane = np.frombuffer(planes[j], dtype=np.uint8)
        shift = 8 * (k - 1 - j)
        np.bitwise_or(words, np.left_shift(plane, shift, dtype=_WORDS[k]) if shift else plane, out=words)
    return words


def frombuffer(data, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over the buffer's memory, no copy (empty buffers too, which torch.frombuffer refuses).
    The buffer may be read-only: the tensor must then be treated as read-only.

    Through a memoryview: torch cannot take some read-only exporters (`pyarrow.Buffer` slices)
    directly; the tensor holds the memoryview, which holds the exporter and so its memory."""
    global _READ_ONLY_WARNING_SILENCED
    view = memoryview(data)
    if not view.nbytes:
        return torch.empty(0, dtype=dtype)
    if not view.readonly or _READ_ONLY_WARNING_SILENCED:
        return torch.frombuffer(view, dtype=dtype)
    with warnings.catch_warnings():  # torch warns once per process about read-only memory: silence that once
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.frombuffer(view, dtype=dtype)
    _READ_ONLY_WARNING_SILENCED = True
    return tensor


_READ_ONLY_WARNING_SILENCED = False


def encode_columns(row: dict, encodings: dict[str, str]) -> dict:
    """A row whose tensors become stored values (values already encoded pass through)."""
    return {k: encode_value(v, encodings.get(k, RAW)) if isinstance(v, (torch.Tensor, HostWords)) else v for k, v in row.items()}


# ---- shard files ------------------------------------------------------------------------------


def shard_schema(layout) -> pa.Schema:
    """Scalar columns, then one binary column per tensor column of the layout (see formats.Layout)."""
    fields = [pa.field(k, v) for k, v in SCALAR_COLUMNS.items()]
    return pa.schema(fields + [pa.field(name, pa.binary()) for name in layout.columns()])


def shard_name(index: int, num_shards: int, split: str = "train") -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}.parquet"


def is_card_read(name: str, pattern: str = "train-*") -> bool:
    """Whether a card whose `data_files` name shards by `pattern` (see `manifest.card_shard_pattern`)
    reads this file of data/ as a shard: such a file not in the manifest would be read as rows."""
    return fnmatch.fnmatchcase(name, pattern)


def is_shard_name(name: str) -> bool:
    """Named as `shard_name` names shards: files of another kind are never a cache's to remove."""
    return re.fullmatch(r"[\w.-]+-\d{5}-of-\d{5}\.parquet", name) is not None


@dataclass
class ShardInfo:
    name: str
    rows: int
    bytes: int
    checksum: str  # CHECKSUM_ALGORITHM of the file

    def to_dict(self) -> dict:
        return asdict(self)


FLUSH_BYTES = 32 << 20  # written bytes the checksum thread flushes to disk at a time (the tail left at close)
FOLLOW_INTERVAL_S = 0.004  # how often it looks for new bytes while a row group is being written
_READ_BYTES = 8 << 20  # read back into one reused buffer: no fresh memory (page faults) per read
_FOLLOW, _CATCH_UP = "follow", "catch up"


def _sync_file_range():
    """Linux's sync_file_range(2), or None: it starts the disk writes of a file range and
    returns, so the thread that calls it goes on checksumming while the disk writes."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a file range to disk (the close's fsync waits for it); where the system
    cannot start writes without waiting, flush the file instead."""
    if _SYNC_FILE_RANGE is None or _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
        os.fdatasync(fd)


class _TailHasher:
    """Checksums a file as it grows (Parquet only appends) and flushes it to disk, on its own
    thread: read back from the page cache, the bytes cost a memory copy, not a disk read.
    While a row group is being written (`follow`) it keeps up with the file, flushing every
    FLUSH_BYTES, so the disk writes while Parquet writes and little is left to flush at close."""

    def __init__(self, path: Path):
        self._path = path
        self._fd = os.open(path, os.O_RDONLY)
        self._hash = new_hash(CHECKSUM_ALGORITHM)
        self._buffer = memoryview(bytearray(_READ_BYTES))
        self._done = 0
        self._flushed = 0
        self._requests: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="eagle3-shard-checksum", daemon=True)
        self._thread.start()

    def follow(self) -> None:
        """A row group is being written: keep up with the file until `catch_up`."""
        self._requests.put(_FOLLOW)

    def catch_up(self) -> None:
        """The row group is written: hash to the end of the file, then wait for the next."""
        self._requests.put(_CATCH_UP)

    def _run(self) -> None:
        following = False
        while True:
            try:
                request = self._requests.get(timeout=FOLLOW_INTERVAL_S if following else None)
            except queue.Empty:
                request = _FOLLOW  # still writing: look again
            if request is None:
                return
            following = request == _FOLLOW
            if self._error is not None:
                continue
            try:
                self._hash_to_end()
                if self._done - self._flushed >= FLUSH_BYTES:
                    _start_writeback(self._fd, self._flushed, self._done - self._flushed)
                    self._flushed = self._done
            except BaseException as err:  # noqa: BLE001 - raised by finish()
                self._error = err

    def _hash_to_end(self) -> None:
        end = os.fstat(self._fd).st_size
        while self._done < end:
            read = os.preadv(self._fd, [self._buffer[: min(_READ_BYTES, end - self._done)]], self._done)
            if not read:
                break
            self._hash.update(self._buffer[:read])
            self._done += read

    def finish(self) -> str:
        """After the file is complete: hash the rest, fsync, and return the hex digest."""
        self._stop()
        if self._error is not None:
            raise self._error
        self._hash_to_end()
        size = os.fstat(self._fd).st_size
        if self._done != size:  # a read came back short of the end: the checksum would not cover the file
            short = f"read back {self._done} of its {size} bytes to checksum it; the file changed while written"
            raise OSError(errno.EIO, short, str(self._path))
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        return self._hash.hexdigest()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._requests.put(None)
            self._thread.join()

    def discard(self) -> None:
        self._stop()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class ShardWriter:
    """Writes one shard; use as a context manager so a failure leaves no partial file behind.

    `add` takes rows whose tensor columns are torch tensors (encoded here, per `encodings`)
    or values already encoded elsewhere (`Encoded`, e.g. on the background writer's threads)."""

    def __init__(self, path: Path, schema: pa.Schema, row_group_bytes: int, encodings: dict[str, str] | None = None):
        self.path = Path(path)
        self.tmp_path = temp_path(self.path)
        self.schema = schema
        self.row_group_bytes = row_group_bytes
        self.encodings = encodings or {}
        self._rows: list[dict] = []
        self._buffered_bytes = 0
        with ExitStack() as undo:  # Parquet writes its first bytes as it opens: a full disk can refuse them
            self._file = pa.OSFile(str(self.tmp_path), mode="w")  # native: no Python call per write
            undo.callback(self.tmp_path.unlink, missing_ok=True)
            undo.callback(self._file.close)
            self._hasher = _TailHasher(self.tmp_path)
            undo.callback(self._hasher.discard)
            self._writer = pq.ParquetWriter(
                self._file,
                schema,
                compression="none",
                use_dictionary=False,
                write_statistics=list(SCALAR_COLUMNS),  # min/max of megabyte-sized binary values would be waste
            )
            undo.pop_all()
        self.closed = False
        self.rows = 0

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()

    def add(self, row: dict) -> None:
        row = encode_columns(row, self.encodings)
        self._rows.append(row)
        self._buffered_bytes += sum(_stored_bytes(v, raw=True) for v in row.values())
        self.rows += 1
        if self._buffered_bytes >= self.row_group_bytes:
            self._flush_row_group()

    def _flush_row_group(self) -> None:
        if self._rows:
            columns = [column_array([row[f.name] for row in self._rows], f.type) for f in self.schema]
            table = pa.Table.from_arrays(columns, schema=self.schema)
            self._hasher.follow()
            try:
                self._writer.write_table(table)
            finally:  # also after a failed write: the checksum thread stops following the file
                self._hasher.catch_up()
            self._rows, self._buffered_bytes = [], 0

    def close(self) -> ShardInfo:
        self._flush_row_group()
        self._writer.close()
        self._file.close()
        checksum = self._hasher.finish()  # hashed to the end, fsynced
        self.closed = True
        return ShardInfo(self.path.name, self.rows, self.tmp_path.stat().st_size, checksum)

    def publish(self) -> None:
        """Atomically give the finished shard its real name."""
        os.replace(self.tmp_path, self.path)
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Discard the shard: after a failed write (a full disk) its bytes cannot go anywhere."""
        for close in (self._writer.close, self._file.close, self._hasher.discard):
            try:
                close()
            except Exception:
                pass
        self.tmp_path.unlink(missing_ok=True)


def _stored_bytes(value, raw: bool = False) -> int:
    if isinstance(value, Encoded):
        return value.raw_nbytes if raw else value.nbytes
    return len(value) if isinstance(value, bytes) else 0


def column_array(values: list, arrow_type: pa.DataType) -> pa.Array | pa.ChunkedArray:
    """Binary values as one chunk per value over the value's own buffer (tensor memory or its
    encoded bytes): no copy before Parquet's own; other types through `pa.array`."""
    if arrow_type != pa.binary():
        return pa.array(values, type=arrow_type)
    return pa.chunked_array([_binary_value(v) for v in values], type=pa.binary())


def _binary_value(value) -> pa.Array:
    parts = value.parts if isinstance(value, Encoded) else (value,)
    data = pa.py_buffer(parts[0] if len(parts) == 1 else b"".join(parts))
    return pa.Array.from_buffers(pa.binary(), 1, [None, pa.py_buffer(np.array([0, data.size], dtype=np.int32)), data])


def shard_row_count(path: Path) -> int | None:
    """Rows per the Parquet footer, or None when the file is not Parquet (no magic bytes or footer:
    a file cut short; a footer Parquet cannot decode). An OS error reading it is raised: a file
    that cannot be read now (an I/O error, its permissions) may well be complete."""
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowInvalid, OSError) as err:
        if not is_decode_error(err):
            raise
        return None


def is_decode_error(err: Exception) -> bool:
    """Whether pyarrow failed on the bytes it read (damaged Parquet), not on reading them: the OS's
    errors carry an errno; Parquet's own (`Couldn't deserialize thrift`) are OSErrors without one."""
    return isinstance(err, pa.ArrowInvalid) or (isinstance(err, OSError) and err.errno is None)
