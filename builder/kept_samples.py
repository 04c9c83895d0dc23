"""--resume keeps the shards an interrupted build finished: each must hold exactly the samples this
run would write into it.

The identity pins the tokenizer's and template's files, not the tokens they give: another version
of eagle3-cache's conversation rules, or of tokenizers or transformers, can tokenize the same rows
otherwise, or find other rows valid. A resume would then mix two tokenizations in one cache, so
before any shard is written each kept shard's source indices, token ids and loss masks are compared
with this run's samples for it. Only those columns are read: a few bytes per token, next to the
supervision's kilobytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .batching import expected_rows
from .build_state import BUILD_STATE_DIR, read_sidecar
from .errors import ResumeSamplesDiffer, ShardUnreadable
from .files import file_hash
from .shards import CHECKSUM_ALGORITHM, is_decode_error, shard_name

if TYPE_CHECKING:
    from .prepare import Prepared

log = logging.getLogger(__name__)

SAMPLE_COLUMNS = ("source_index", "input_ids", "loss_mask")

TOKENIZED_DIFFERENTLY = (
    "The input rows are tokenized (or found valid) differently now than when that shard was written, though the tokenizer's "
    "and chat template's files are the same: by another eagle3-cache version's conversation rules, or another "
    "tokenizers or transformers version. A resume would mix both in one cache, so nothing was written or deleted. "
    "Finish the build with the eagle3-cache, tokenizers and transformers versions that began it, or build into a "
    "new --output-dir."
)


@dataclass
class ShardSamples:
    """A shard's samples, in build order: what a resume compares."""

    source_index: list[int]
    input_ids: list[np.ndarray]
    loss_mask: list[np.ndarray]


def check_kept_samples(out: Path, prep: Prepared, kept: list[int]) -> None:
    """Refuse (changing nothing) where a kept shard, or a shard this build wrote for another number
    of shards, holds other samples than this run would write."""
    check_shard_count(out, prep)
    warn_of_uploaded_shards(out, prep)
    for k in kept:
        check_shard_samples(out, prep, k)


def check_shard_count(out: Path, prep: Prepared) -> None:
    """A record of a shard this run would not name: the build wrote it when its valid samples
    filled another number of shards (rows found valid then are not now, or the other way round)."""
    names = {shard_name(k, prep.num_shards) for k in range(prep.num_shards)}
    records = sorted(p.name.removesuffix(".json") for p in (out / BUILD_STATE_DIR / "shards").glob("*.parquet.json"))
    others = [name for name in records if name not in names]
    if others:
        raise ResumeSamplesDiffer(
            f"--resume: this build wrote {others[0]} when its samples filled another number of shards; this run's "
            f"{len(prep.samples)} samples fill {prep.num_shards} (shard size {prep.cfg.shard_size}), so rows were "
            f"found valid then that are not now, or the other way round. {TOKENIZED_DIFFERENTLY}"
        )


def check_shard_samples(out: Path, prep: Prepared, k: int) -> None:
    name = shard_name(k, prep.num_shards)
    path = out / "data" / name
    record = read_sidecar(out, name)
    written, now = written_samples(path), samples_now(prep, k, record.get("failed", []))
    difference = first_difference(written, now) if isinstance(written, ShardSamples) else written
    if difference is None:
        return
    checksum_differs = file_hash(path, CHECKSUM_ALGORITHM) != record["checksum"]
    if checksum_differs or not isinstance(written, ShardSamples):
        raise ResumeSamplesDiffer(
            f"--resume: shard {name} {'does not match the checksum its record holds: it ' if checksum_differs else ''}is "
            f"damaged ({difference}), and nothing was written or deleted. Delete it and rerun with --resume to rebuild it."
        )
    raise ResumeSamplesDiffer(
        f"--resume: shard {name}, which this build finished, holds other samples than this run would write "
        f"into it: {difference}. {TOKENIZED_DIFFERENTLY}"
    )


def written_samples(path: Path) -> ShardSamples | str:
    """A shard's sample columns alone (token ids and loss masks are stored raw: int32, uint8), or,
    where Parquet cannot decode them (damaged bytes), what it says."""
    try:
        table = pq.ParquetFile(path).read(columns=list(SAMPLE_COLUMNS))
    except (pa.ArrowInvalid, OSError) as err:
        if is_decode_error(err):
            return f"Parquet cannot decode its sample columns: {err}"
        raise ShardUnreadable(
            f"--resume: cannot read {path} to check its samples against this run's ({err.strerror or err}); nothing "
            "was deleted. Rerun once it is readable (check its permissions and its file system)."
        ) from err
    return ShardSamples(
        table.column("source_index").to_pylist(),
        [np.frombuffer(value, dtype="<i4") for value in table.column("input_ids").to_pylist()],
        [np.frombuffer(value, dtype=np.uint8) for value in table.column("loss_mask").to_pylist()],
    )


def samples_now(prep: Prepared, k: int, failed: list[dict]) -> ShardSamples:
    """This run's samples for shard k, less those the shard's record lists as not stored (non-finite outputs)."""
    start = k * prep.cfg.shard_size
    table = prep.samples.with_format("arrow")[start : start + expected_rows(prep, k)]
    not_stored = {record["source_index"] for record in failed}
    stored = [i for i, index in enumerate(table.column("source_index").to_pylist()) if index not in not_stored]
    table = table.take(pa.array(stored, type=pa.int64()))  # typed: a shard whose every sample failed takes none
    return ShardSamples(
        table.column("source_index").to_pylist(),
        list(table.column("input_ids").to_numpy()),
        list(table.column("loss_mask").to_numpy()),
    )


def first_difference(written: ShardSamples, now: ShardSamples) -> str | None:
    """Where the shard first differs from this run's samples, in words; None where it holds them exactly."""
    for row, (index, index_now) in enumerate(zip(written.source_index, now.source_index)):
        if index != index_now:
            return f"its row {row} holds input row {index}, where this run has input row {index_now}"
        for column in ("input_ids", "loss_mask"):
            stored, expected = getattr(written, column)[row], getattr(now, column)[row]
            if not np.array_equal(stored, expected):
                return f"its row {row} (input row {index}) has {column} {differing(stored, expected)}"
    if len(written.source_index) != len(now.source_index):
        return f"it holds {len(written.source_index)} samples, where this run has {len(now.source_index)}"
    return None


def differing(stored: np.ndarray, expected: np.ndarray) -> str:
    """How two token id or mask arrays differ: their lengths, or the first position they disagree at."""
    if len(stored) != len(expected):
        return f"of {len(stored)} tokens, where this run has {len(expected)}"
    position = int(np.flatnonzero(stored != expected)[0])
    return f"{int(stored[position])} at position {position}, where this run has {int(expected[position])}"


def warn_of_uploaded_shards(out: Path, prep: Prepared) -> None:
    """Shards uploaded and then deleted here (--delete-local-after-upload) are not checked: that
    would download them."""
    names = [shard_name(k, prep.num_shards) for k in range(prep.num_shards)]
    uploaded = [n for n in names if not (out / "data" / n).exists() and (read_sidecar(out, n) or {}).get("sha256")]
    if uploaded:
        log.warning(
            "--resume: %d shard(s) this build uploaded and deleted here (--delete-local-after-upload) are not checked "
            "against this run's tokenization, which would download them (first: %s)",
            len(uploaded),
            uploaded[0],
        )
