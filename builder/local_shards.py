"""Streaming local shards through `datasets`, memory-mapped.

`datasets` streams a Parquet file through a Python file object: each read is a Python call
that copies the file's bytes into a `bytes` object, which Parquet's decoder then copies again
into the column's values. For shards on a local disk, `memory_map_local_shards` swaps in a table
source that runs the same Parquet scan over the file memory-mapped: Parquet decodes straight
from the page cache, one copy fewer, and no read needs the interpreter (Arrow's threads never
wait for the GIL, at exit or otherwise).

Only where the tables come from changes. The source yields the tables `datasets` yields (one
per row group, split at the same batch size, with the same keys), so the shard lists, the
rank and worker splits, the shard shuffle and every `state_dict` stay `datasets`' own, and a
state saved by either source resumes on the other. Where `datasets` builds its stream in
another way (another version, options this source does not mirror, a file that is not local),
nothing is swapped and `datasets` reads the same rows itself.

A memory-mapped file must not shrink while it is read: the reading process would stop with
SIGBUS, as with any memory-mapped file (`datasets`' own Arrow cache files are read the same
way). Shards are only ever replaced by a rename, and `load_cache` checks every shard's size
against the manifest before the first row.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
from pyarrow.fs import LocalFileSystem

from .errors import Eagle3CacheError

TABLE_ARGUMENTS = ["files", "row_groups_list"]  # datasets' Parquet table generator, as this source mirrors it
REPAIR = (
    "checks every shard against the checksums its card records: delete each shard it names and run the build again "
    "with --resume (it rebuilds only the missing shards), or copy the cache again from where it came from"
)


class DamagedShard(Eagle3CacheError, OSError):
    """A cache's shard cannot be read: its bytes are damaged (or the disk failed to read them)."""


def damaged_shard(where: str, cache, err: BaseException, what: str = "the shard cannot be read") -> DamagedShard:
    return DamagedShard(f"{where}: {what} ({type(err).__name__}: {err}). `eagle3-cache verify {cache}` {REPAIR}")


@contextlib.contextmanager
def naming_the_shard(file: str):
    """Parquet's errors for damaged bytes name no file ("Couldn't deserialize thrift"): say which shard, and what to do."""
    try:
        yield
    except (OSError, pa.ArrowException) as err:
        raise damaged_shard(file, Path(file).parent.parent, err) from err


class MemoryMappedTables:
    """`datasets`' Parquet `_generate_tables(files, row_groups_list)`: the same fragment scan, over
    the file memory-mapped instead of a Python file object. Pre-buffering asks the kernel to read
    each column chunk ahead (`madvise`) before Parquet decodes it.

    Picklable (a DataLoader worker started by spawn receives it with the dataset)."""

    def __init__(self, columns: list[str] | None, schema: pa.Schema | None):
        self.columns, self.schema = columns, schema

    def __call__(self, files, row_groups_list):
        from datasets.builder import Key

        parquet = pads.ParquetFileFormat(default_fragment_scan_options=pads.ParquetFragmentScanOptions(pre_buffer=True))
        filesystem = LocalFileSystem(use_mmap=True)
        for file_index, (file, row_groups) in enumerate(zip(files, row_groups_list)):
            with naming_the_shard(file):
                fragment = parquet.make_fragment(file, filesystem=filesystem)
                if row_groups is not None:
                    fragment = fragment.subset(row_group_ids=row_groups)
                if not fragment.row_groups:
                    continue
                # as datasets reads a fragment: batches of its first row group's rows, no read-ahead across batches
                batch_size = fragment.row_groups[0].num_rows
                batches = iter(fragment.to_batches(batch_size=batch_size, columns=self.columns, batch_readahead=0, fragment_readahead=0))
            for batch_index in itertools.count():
                with naming_the_shard(file):  # not around the yield: an error thrown into the generator is not the shard's
                    batch = next(batches, None)
                if batch is None:
                    break
                yield Key(file_index, batch_index), self._cast(pa.Table.from_batches([batch]))

    def _cast(self, table: pa.Table) -> pa.Table:
        if self.schema is None:
            return table
        from datasets.table import table_cast  # as datasets does: a no-op but for the schema's metadata

        return table_cast(table, self.schema)


def memory_map_local_shards(hf) -> bool:
    """Make a streaming `datasets.IterableDataset` over local Parquet files read them memory-mapped.

    Returns whether it did; `False` leaves `hf` as it was (it then reads through `datasets`)."""
    examples = getattr(hf, "_ex_iterable", None)
    generate = getattr(examples, "generate_tables_fn", None)
    parquet_builder = getattr(generate, "__self__", None)
    if not _is_datasets_parquet_reader(generate, parquet_builder) or sorted(getattr(examples, "kwargs", {})) != TABLE_ARGUMENTS:
        return False
    config = parquet_builder.config
    if getattr(config, "filters", None) is not None or getattr(config, "batch_size", None) is not None or not _bad_files_raise(config):
        return False  # options this source does not mirror: datasets applies them itself
    if not all(isinstance(f, str) and os.path.isfile(f) for f in examples.kwargs["files"]):
        return False
    features = parquet_builder.info.features
    examples.generate_tables_fn = MemoryMappedTables(config.columns, features.arrow_schema if features is not None else None)
    return True


def _bad_files_raise(config) -> bool:
    """`datasets` skips or warns about an unreadable file where asked (`on_bad_files`); this source raises."""
    return getattr(config, "on_bad_files", "error") == "error"


def _is_datasets_parquet_reader(generate, parquet_builder) -> bool:
    try:
        from datasets.builder import Key  # noqa: F401 (the source yields datasets' keys: refuse here, not mid-stream)
        from datasets.packaged_modules.parquet.parquet import Parquet
    except ImportError:
        return False
    if not isinstance(parquet_builder, Parquet) or getattr(generate, "__name__", None) != "_generate_tables":
        return False
    return list(inspect.signature(generate).parameters) == TABLE_ARGUMENTS
