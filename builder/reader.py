"""Read a cache back as torch tensors: the stored (`raw`) fields, or NeMo Automodel's
shifted EAGLE-3 layout (`nemo`), from a local directory or a Hub repo through `datasets`.

Tensor columns are decoded with `torch.frombuffer` straight from the stored bytes (no copy):
streaming reads take rows as Arrow tables and view the Parquet values buffer; `datasets`'
torch/numpy formatters never touch them (they would upcast to float32/int64). Such tensors
are read-only memory shared with the Arrow batch: `.clone()` one before writing into it.
Local shards are memory-mapped while streaming (`local_shards`): Parquet decodes them straight
from the page cache.

From the Hub, every read is pinned to the commit the revision points at when the cache is
opened (card, vocab and shards of one version, even if the branch moves meanwhile); only
the columns the layout needs are requested (Parquet column projection), and with
`split_by_rank=True` each rank reads its own shards. Streaming reads resume mid-epoch from a
`state_dict()` and survive network failures by reopening where they stood.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import logging
import math
import numbers
import os
import time
from pathlib import Path

import torch

from .errors import ConfigError, Eagle3CacheError
from .files import refuse_pattern_paths
from .local_shards import TABLE_ARGUMENTS, DamagedShard, _is_datasets_parquet_reader, damaged_shard, memory_map_local_shards
from .manifest import VOCAB_FILE, read_manifest  # noqa: F401 (read_manifest: public here)
from .manifest import manifest_of as _manifest_of
from .shards import PLANES_ZSTD, RAW, TORCH_DTYPES, decode_value, frombuffer
from .source import CacheSource, open_source
from .stream_exit import track_shards, track_stream

log = logging.getLogger(__name__)
LAYOUTS = ("raw", "nemo", "specforge")
LOCAL_READ_BUFFER = 8 << 20  # bytes per sequential read of a local shard while streaming


class CacheMismatch(Eagle3CacheError, ValueError):
    """The cache was built with settings other than the trainer's (`load_cache(expect=...)`)."""

    def __init__(self, location: str, differences: dict):
        lines = [f"  {field}: trainer expects {want!r}, cache has {have!r}" for field, (want, have) in sorted(differences.items())]
        super().__init__(
            f"{location} does not match the trainer's settings:\n"
            + "\n".join(lines)
            + "\nUse a cache built with these settings (or build one), or change the trainer's settings to the cache's."
        )
        self.differences = differences


READ_PARTS = {"fingerprint": str, "columns": dict, "layout": dict, "shards": list}  # what every read of a cache needs
SHARD_RECORD_PARTS = ("name", "rows", "bytes")


def refuse_unreadable_parts(manifest: dict, source: CacheSource) -> None:
    """A manifest that a hand edit left without a part every read needs is refused naming the part, before a
    KeyError or TypeError from wherever the part is first read. verify names every damaged part in detail."""
    from .manifest import ManifestError

    for part, kind in READ_PARTS.items():
        value = manifest.get(part)
        found = None
        if part not in manifest:
            found = "nothing"
        elif not isinstance(value, kind):
            found = type(value).__name__
        elif part == "shards":
            broken = [entry for entry in value if not isinstance(entry, dict) or not all(key in entry for key in SHARD_RECORD_PARTS)]
            missing = [key for key in SHARD_RECORD_PARTS if broken and isinstance(broken[0], dict) and key not in broken[0]]
            found = f"an entry without {', '.join(missing)}" if missing else "an entry that is no mapping" if broken else None
        if found is not None:
            raise ManifestError(
                f"the card of {source.describe()}: its manifest has no usable '{part}' (found {found}; expected a {kind.__name__}"
                f"{', each entry with ' + ', '.join(SHARD_RECORD_PARTS) if part == 'shards' else ''}): the card was edited "
                f"or cut short. Run `eagle3-cache verify {source.location}`, which names what is wrong, then restore the card, "
                "or rebuild the cache"
            )


class ShardFilesMismatch(Eagle3CacheError, ValueError):
    """The shard files present are not the ones the cache's manifest lists."""


def check_shard_files(source: CacheSource, manifest: dict) -> None:
    """The shard files under data/ must be exactly the manifest's, by name and size (and on the Hub by
    sha256, where the card records it), before any row is read: otherwise rows of another build, or a
    partial cache, would be read as this cache. A branch in the middle of a push holds the old card
    beside new shards, which can have the old names and sizes."""
    from .manifest import card_shard_pattern
    from .shards import is_card_read

    pattern = card_shard_pattern(source.file("README.md").read_text(encoding="utf-8"))
    expected = {shard["name"]: shard["bytes"] for shard in manifest["shards"]}
    listing = {name: found for name, found in _data_files(source).items() if is_card_read(name, pattern)}
    present = {name: size for name, (size, _) in listing.items()}
    replaced = sorted(
        shard["name"]
        for shard in manifest["shards"]
        if shard.get("sha256") and listing.get(shard["name"], (None, None))[1] not in (None, shard["sha256"])
    )
    if present == expected and not replaced:
        return
    missing = sorted(set(expected) - set(present))
    extra = sorted(set(present) - set(expected))
    resized = sorted(name for name in set(expected) & set(present) if present[name] != expected[name])
    replaced = [name for name in replaced if name not in resized]
    found = "; ".join(
        f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
        for what, names in (
            ("missing", missing),
            ("not in the manifest", extra),
            ("another size than recorded", resized),
            ("another sha256 than recorded", replaced),
        )
        if names
    )
    if source.on_hub:
        hint = (
            "That revision is a push in progress, or one that stopped partway: read the tag of a finished push "
            "(--revision, revision= in Python), or re-run the push that was interrupted."
        )
    else:
        hint = (
            "The shards were removed or replaced after the build (a build with --delete-local-after-upload keeps them "
            "on the Hub only: read them from there); restore them, or rebuild with --resume."
        )
    if extra:
        hint += f" The card reads every data/{pattern} file, so one it does not list would be read as more rows: move it out of data/."
    where = f"{source.describe()}: the shard files in {source.prefix}data/"
    raise ShardFilesMismatch(f"{where} are not the ones its card lists ({found}). {hint}")


def _data_files(source: CacheSource) -> dict[str, tuple[int, str | None]]:
    """{file name: (size, sha256 where the Hub's listing gives it)} of the files directly under data/."""
    if source.on_hub:
        from .hub import remote_file_sizes

        return remote_file_sizes(source.location, source.commit, f"{source.prefix}data", source.token)
    folder = Path(source.location) / source.prefix / "data"
    return {path.name: (path.stat().st_size, None) for path in folder.iterdir() if path.is_file()} if folder.is_dir() else {}


def read_vocab(
    location: str | Path, *, revision: str | None = None, name: str | None = None, token: str | None = None
) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    source = location if isinstance(location, CacheSource) else open_source(location, revision=revision, name=name, token=token)
    return load_file(str(source.file(VOCAB_FILE)))


def _frombuffer(data, dtype: torch.dtype) -> torch.Tensor:
    return frombuffer(data, dtype)


def arrow_rows(table) -> list[dict]:
    """The rows of an Arrow table (or record batch) as dicts. A binary value is a memoryview of
    its bytes in the column's values buffer: nothing is copied, and the view (and any tensor
    `torch.frombuffer` makes over it) keeps that Arrow memory alive. Arrow memory is immutable:
    the next batch is read into new memory, never over a sample already handed out."""
    columns = [_array_values(column) for column in table.columns]
    return [dict(zip(table.column_names, values)) for values in zip(*columns)]


def _array_values(column) -> list:
    import pyarrow as pa

    values = []
    for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        large = chunk.type == pa.large_binary()
        values.extend(_binary_values(chunk, large) if large or chunk.type == pa.binary() else chunk.to_pylist())
    return values


def _binary_values(array, large: bool) -> list:
    """Each value of a (large) binary array as a memoryview of its values buffer (None where null)."""
    _, offsets, data = array.buffers()
    width = 8 if large else 4
    ends = memoryview(offsets).cast("B")[array.offset * width : (array.offset + len(array) + 1) * width].cast("q" if large else "i")
    whole = memoryview(data if data is not None else b"")  # no values buffer: every value is empty
    valid = array.is_valid().to_pylist() if array.null_count else itertools.repeat(True)
    return [whole[start:end] if ok else None for start, end, ok in zip(ends, ends[1:], valid)]


class RowDecoder:
    """Stored row -> tensors, per the manifest's column specs: `raw` values are viewed in place
    (no copy), `byte_planes_zstd` values decoded (bit-exact). A value is any buffer: `bytes`
    (map-style rows) or a memoryview of an Arrow values buffer (`arrow_rows`)."""

    def __init__(self, manifest: dict):
        self.columns = {name: spec for name, spec in manifest["columns"].items() if spec["arrow"] == "binary"}
        self.widths = {name: spec["shape"][1] for name, spec in self.columns.items() if len(spec["shape"]) == 2}
        self.dtypes = {name: TORCH_DTYPES[spec["dtype"]] for name, spec in self.columns.items()}
        self.encoded = {name for name, spec in self.columns.items() if spec.get("encoding", RAW) != RAW}
        unknown = {spec["encoding"] for spec in self.columns.values() if spec.get("encoding", RAW) not in (RAW, PLANES_ZSTD)}
        if unknown:
            raise ValueError(
                f"the cache's columns use encoding(s) {sorted(unknown)}; this eagle3-cache reads {RAW!r} and "
                f"{PLANES_ZSTD!r}: upgrade eagle3-cache to read it"
            )

    def __call__(self, row: dict) -> dict:
        out = {}
        for name, value in row.items():
            dtype = self.dtypes.get(name)
            if dtype is None:
                out[name] = value
                continue
            tensor = decode_value(value, dtype) if name in self.encoded else _frombuffer(value, dtype)
            out[name] = tensor.view(-1, self.widths[name]) if name in self.widths else tensor
        return out


NEMO_KEYS = ("input_ids", "attention_mask", "loss_mask", "aux_hidden_states", "target_probs", "position_mask")


def to_nemo(raw: dict, t2d: torch.Tensor, probs_rows: torch.Tensor | None = None, aux: torch.Tensor | None = None) -> dict:
    """NeMo Automodel's EAGLE-3 sample: slot t carries aux[t] and everything of position t+1.
    `probs_rows` (`[n_loss, Vd]`) defaults to the stored `target_probs`; `aux` to the stored aux.

    Every shifted field is written once, straight into its slot (no shift copy afterwards); the
    aux states stay a view of the row's bytes when their dtype is the one asked for."""
    length = raw["input_ids"].numel()
    loss = raw["loss_mask"].bool()
    probs = raw["target_probs"] if probs_rows is None else probs_rows
    slots, first = _loss_slots(loss)
    dense = _rows_at(slots, probs[first:], _shifted_length(length))
    supervised = torch.zeros(_shifted_length(length), dtype=torch.bool)
    supervised[slots] = t2d[raw["target_argmax"][first:].long()]
    return {
        "input_ids": _shift(raw["input_ids"], torch.long),
        "attention_mask": torch.ones(length, dtype=torch.long),
        "loss_mask": _shift(loss, torch.long),
        "aux_hidden_states": raw["aux_hidden_states"] if aux is None else aux,
        "target_probs": dense,
        "position_mask": supervised.unsqueeze(-1),
    }


_MAX_RUNS = 64  # loss-masked runs per sample above which a row-by-row index copy is cheaper


def _rows_at(slots: torch.Tensor, rows: torch.Tensor, length: int) -> torch.Tensor:
    """`[length, ...]`: `rows[i]` at `slots[i]` (ascending), zero elsewhere, every byte written once.
    Loss-masked positions come in runs (assistant turns): one slice copy per run is several
    times faster than a row-by-row index copy, and only the gaps need zeros."""
    out = rows.new_empty((length, *rows.shape[1:]))
    starts = torch.ones(len(slots), dtype=torch.bool)
    starts[1:] = slots[1:] != slots[:-1] + 1
    runs = starts.nonzero().squeeze(-1).tolist()
    if len(runs) > _MAX_RUNS:
        return out.zero_().index_copy_(0, slots, rows)
    done, bounds = 0, [int(slots[i]) for i in runs]
    for start, end, slot in zip(runs, runs[1:] + [len(slots)], bounds):
        out[done:slot] = 0
        out[slot : slot + end - start] = rows[start:end]
        done = slot + end - start
    out[done:] = 0
    return out


def _loss_slots(loss: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the NeMo slot of each loss-masked position, how many leading loss rows have no slot):
    position u lands in slot u - 1, so a loss mask at position 0 is dropped."""
    positions = loss.nonzero().squeeze(-1)
    first = int(len(positions) > 0 and positions[0] == 0)
    return positions[first:] - 1, first


class SampleDecoder:
    """Stored row -> a trainer's sample, for every target format and aux dtype: the same keys
    and shapes whatever the format. A class, not a closure, so DataLoader workers can pickle it.

    `draft_vocab_size` reads another draft vocabulary (`self.vocab`, see `draft_selection`):
    `probs` caches restrict their exact rows to a smaller one and renormalise (the softmax over
    the smaller vocabulary, exactly); `topk` caches drop the kept columns outside it and
    renormalise what remains, adding `kept_mass` `[L]` (shifted like `target_probs`, see
    `probs_from_topk_restricted`); `hidden` caches recompute the logits with the stored head rows
    (a larger vocabulary too with --store-full-head). `position_mask` follows the vocabulary
    read, from the stored full-vocab argmax.
    """

    def __init__(
        self,
        source,
        manifest: dict,
        layout_name: str,
        *,
        draft_vocab_size: int | None = None,
        spread_tail: bool = False,
        aux_dtype: torch.dtype | None = None,
    ):
        from .formats import Layout, default_read_aux_dtype, head_bias, head_transform_from
        from .vocab import DraftVocab

        self.decode = RowDecoder(manifest)
        self.layout = Layout(**manifest["layout"])
        self.layout_name, self.spread_tail = layout_name, spread_tail
        stored = TORCH_DTYPES[self.layout.dtype]
        self.float_dtype = stored
        self.aux_dtype = aux_dtype or default_read_aux_dtype(self.layout.aux_dtype)
        selected, columns = draft_selection(manifest, read_vocab(source), draft_vocab_size)
        self.columns, self.draft_rows, self.transform = None, None, None
        if self.layout.target_format == "hidden":
            head = _read_safetensors(source, manifest["lm_head_file"]["path"])
            self.transform = head_transform_from(manifest.get("head_transform"), head_bias(head, selected))
            self.draft_rows = _draft_rows(head, selected, columns)
        elif columns is not None:
            self.columns = columns
            self.new_column = torch.full((self.layout.draft_vocab_size,), -1, dtype=torch.long)
            self.new_column[columns] = torch.arange(len(columns))
        self.vocab = DraftVocab(selected, manifest["target_vocab_size"])
        self.selected = selected
        self.t2d = self.vocab.t2d

    def __call__(self, row: dict) -> dict:
        from .formats import decode_aux, probs_from_topk_restricted, supervised_probs

        raw = self.decode(row)
        aux = decode_aux(raw["aux_hidden_states"], raw.get("aux_scales"), self.aux_dtype)
        if self.layout_name == "specforge":
            return {
                "input_ids": raw["input_ids"].long(),
                "loss_mask": raw["loss_mask"].long(),
                "hidden_state": raw["final_hidden"].unsqueeze(0),
                "aux_hidden_state": aux.unsqueeze(0),
            }
        loss = raw["loss_mask"].bool()
        kept_mass = None
        if self.layout.target_format == "probs" and self.columns is None:
            probs = raw["target_probs"]  # stored exactly: no round trip through fp32
        elif self.layout.target_format == "probs":
            probs = restrict_probs(raw["target_probs"], self.columns).to(self.float_dtype)
        elif self.layout.target_format == "topk" and self.columns is not None:
            probs, kept_mass = probs_from_topk_restricted(
                raw["topk_logprobs"], raw["topk_ids"], self.new_column, len(self.columns), self.spread_tail
            )
            probs = probs.to(self.float_dtype)
        else:
            probs = supervised_probs(self.layout, raw, loss, self.draft_rows, self.transform, self.spread_tail).to(self.float_dtype)
        sample = to_nemo(raw, self.t2d, probs, aux)
        if kept_mass is not None:
            slots, first = _loss_slots(loss)
            sample["kept_mass"] = _rows_at(slots, kept_mass[first:], _shifted_length(len(loss)))
        return sample


def draft_selection(manifest: dict, vocab: dict, draft_vocab_size: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(selected ids, columns): the draft vocabulary a read with `draft_vocab_size` supervises,
    and the column of each of its ids in the stored supervision (None: the stored vocabulary
    itself, or a `hidden` cache's full head provides the rows).

    The vocabulary is the one a build with that size would select (`select_draft_vocab` on the
    stored loss-token counts). The stored one is ranked by those counts, so a smaller one is
    its prefix (a subset when the stored one is the whole vocabulary, in id order); that is
    checked, and a cache where it does not hold is refused.
    """
    from .vocab import columns_in, select_draft_vocab

    stored = vocab["selected_token_ids"]
    if draft_vocab_size is None or draft_vocab_size == len(stored):
        return stored, None
    if isinstance(draft_vocab_size, bool) or not isinstance(draft_vocab_size, numbers.Integral) or draft_vocab_size < 1:
        raise ValueError(f"draft_vocab_size: expected a positive int (or None for the cache's own {len(stored)}), got {draft_vocab_size!r}")
    target_format = manifest["layout"]["target_format"]
    wanted = torch.as_tensor(select_draft_vocab(vocab["token_counts"].numpy(), int(draft_vocab_size), manifest["special_token_ids"]))
    if len(wanted) == len(stored) and torch.equal(wanted, stored):
        return stored, None  # a size at or above the target vocabulary: the identity, as stored
    if target_format == "hidden" and manifest["identity"].get("store_full_head"):
        return wanted, None
    if len(wanted) > len(stored):
        if target_format == "hidden":
            raise ValueError(
                f"draft_vocab_size: {draft_vocab_size} needs lm_head rows this cache did not store (it keeps {len(stored)}); "
                "rebuild with --store-full-head to read any draft vocabulary size"
            )
        raise ValueError(
            f"draft_vocab_size: asked for {draft_vocab_size}, but this {target_format} cache holds supervision over its "
            f"{len(stored)}-token draft vocabulary only; read it with draft_vocab_size <= {len(stored)}, or rebuild with "
            f"--draft-vocab-size {draft_vocab_size} (a `hidden` cache built with --store-full-head reads any size)"
        )
    columns = columns_in(stored.numpy(), wanted.numpy())
    if columns is None:
        raise ValueError(
            f"draft_vocab_size: the {draft_vocab_size}-token vocabulary a build would select from this cache's token "
            f"counts is not within its stored {len(stored)}-token draft vocabulary (vocab/ ranks them differently), so "
            f"the stored supervision cannot serve it; rebuild with --draft-vocab-size {draft_vocab_size}"
        )
    return wanted, torch.as_tensor(columns)


def restrict_probs(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Dense draft-vocab probs `[n, Vd]` -> `[n, Vd']` fp32 over the stored columns `columns`,
    renormalised: p restricted to a subset and renormalised is the softmax over that subset."""
    prefix = bool(len(columns)) and int(columns[-1]) == len(columns) - 1 and torch.equal(columns, torch.arange(len(columns)))
    kept = (rows[:, : len(columns)] if prefix else rows.index_select(1, columns)).float()
    total = kept.sum(-1, keepdim=True)
    return kept / torch.where(total > 0, total, torch.ones_like(total))  # an all-zero row stays zero


def read_draft_vocab(
    location, draft_vocab_size: int | None = None, *, revision: str | None = None, name: str | None = None, token: str | None = None
):
    """The `DraftVocab` that `load_cache(location, draft_vocab_size=...)` supervises: its
    `selected_token_ids` and the `d2t`/`t2d` of each trainer's convention, for exports."""
    from .vocab import DraftVocab

    source = location if isinstance(location, CacheSource) else open_source(location, revision=revision, name=name, token=token)
    manifest = _manifest_of(source)
    selected, _ = draft_selection(manifest, read_vocab(source), draft_vocab_size)
    return DraftVocab(selected, manifest["target_vocab_size"])


def draft_vocab(dataset):
    """The `DraftVocab` of a dataset from `load_cache`: the one its samples are supervised over
    (the stored one for `layout="raw"`)."""
    decoder = getattr(dataset, "transform", None)
    if isinstance(decoder, SampleDecoder):
        return decoder.vocab
    return read_draft_vocab(dataset.source)


def _read_safetensors(source, path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(source.file(path)))


def _draft_rows(head: dict, selected: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
    """The head rows of `selected`, from what the cache stores (`draft_selection` checked they are there)."""
    if columns is not None:
        return head["draft_rows"].index_select(0, columns)
    if "weight" in head and len(selected) != len(head["draft_rows"]):
        return head["weight"].index_select(0, selected)
    return head["draft_rows"]


def _shifted_length(length: int) -> int:
    return max(length - 1, 0) + 1


def _shift(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Left by one along the sequence, last slot zero, in `dtype` (one copy, converting on the way)."""
    out = torch.empty((_shifted_length(tensor.shape[0]), *tensor.shape[1:]), dtype=dtype or tensor.dtype)
    out[:-1] = tensor[1:]
    out[-1] = 0
    return out


class CacheDataset(torch.utils.data.Dataset):
    """Map-style: a `datasets.Dataset` whose rows decode on access."""

    def __init__(self, hf_dataset, transform):
        self.hf_dataset, self.transform = hf_dataset, transform

    def __len__(self) -> int:
        return len(self.hf_dataset)

    def __getitem__(self, index: int) -> dict:
        return self.transform(self.hf_dataset[index])


class StreamingCacheDataset(torch.utils.data.IterableDataset):
    """Iterable: a streaming `datasets.IterableDataset` whose rows decode as they arrive.
    In DataLoader workers, `datasets` hands each worker its own shards.

    Rows arrive as Arrow tables (`datasets`' "arrow" format), never as Python objects: tensor
    columns are decoded straight from the Arrow buffers (`arrow_rows`), so a raw column is a
    view of the bytes Parquet read (read-only: `.clone()` a tensor to write into it). With a
    `shuffle_buffer`, `datasets`' shard-order shuffle (a one-row buffer) takes each row into a
    table of its own: one memory copy per row, still no Python object.

    Resumable mid-epoch: `state_dict()` says where the iteration stands and `load_state_dict()`
    makes the next iteration yield exactly the samples that follow (torchdata's
    `StatefulDataLoader` calls both, per worker). With `shuffle_buffer`, the shard order is
    shuffled per epoch and rows are permuted within consecutive windows of that many rows
    (seeded by seed, epoch, rank, worker and window), so a resume re-reads at most one window
    instead of losing a buffer's content. A read that fails past the client's own retries is
    reopened at the current window and resumed (`retry`); a permanent failure raises `HubError`
    naming the file and the revision.
    """

    def __init__(
        self,
        hf_dataset,
        transform,
        *,
        shuffle_buffer: int | None = None,
        seed: int = 0,
        split: tuple[int, int] = (0, 1),
        fingerprint: str | None = None,
        retry=None,
        describe=None,
        shards: tuple[str, ...] = (),
    ):
        self.hf_dataset, self.transform = hf_dataset.with_format("arrow"), transform
        self.shards = shards  # paths the exit waits on (see stream_exit), recorded where the stream is read
        self.shuffle_buffer, self.seed, self.split, self.fingerprint = shuffle_buffer, seed, split, fingerprint
        self.retry = retry
        self.describe_failure = describe  # (error, reopened=n) -> the exception to raise; None: re-raise
        self._state: dict | None = None  # where the running (or last) iteration stands
        self._resume: dict | None = None  # loaded by load_state_dict, used by the next iteration
        self._epoch_chosen = False  # set_epoch was called: a loaded state of another epoch does not override it

    @property
    def epoch(self) -> int:
        return self.hf_dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle (shard order and windows) differently each epoch when a shuffle buffer is set."""
        if self._resume is not None and self._resume["epoch"] != epoch:
            log.warning(
                "set_epoch(%d) after load_state_dict() of epoch %d: the next iteration starts epoch %d from its beginning",
                epoch,
                self._resume["epoch"],
                epoch,
            )
        self._epoch_chosen = True
        self.hf_dataset.set_epoch(epoch)

    @property
    def num_shards(self) -> int:
        return self.hf_dataset.num_shards

    # ---- resuming ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Where this dataset's iteration stands: small, JSON-serialisable, one per DataLoader worker."""
        if self._state is not None and self._state["epoch"] == self.epoch:
            return dict(self._state)
        return self._make_state(position=None, window=0, skip=0)

    def load_state_dict(self, state: dict) -> None:
        """Make the next iteration continue where `state` was saved (in its epoch)."""
        mine = self._identity()
        differences = {key: (state.get(key), value) for key, value in mine.items() if key != "worker" and state.get(key) != value}
        if differences or not {"epoch", "position", "window", "skip"} <= set(state):
            saved = ", ".join(f"{key}={want!r}" for key, (want, _) in sorted(differences.items())) or f"keys {sorted(state)}"
            have = ", ".join(f"{key}={have!r}" for key, (_, have) in sorted(differences.items())) or "a StreamingCacheDataset state"
            raise ValueError(
                f"load_state_dict: the state was saved by a dataset with {saved}; this one expects {have}. "
                "Open the same cache with the same shuffle_buffer, seed and rank split to resume."
            )
        # The epoch is not set here: torchdata loads a state when the iteration starts, after the training
        # loop's own set_epoch, which must stand (see _start).
        self._state = self._resume = dict(state)

    def _identity(self) -> dict:
        from torch.utils.data import get_worker_info

        worker = get_worker_info()
        return {
            "fingerprint": self.fingerprint,
            "shuffle_buffer": self.shuffle_buffer,
            "seed": self.seed,
            "split": list(self.split),
            "worker": [worker.id, worker.num_workers] if worker else [0, 1],
        }

    def _make_state(self, position: dict | None, window: int, skip: int) -> dict:
        # position: the `datasets` state where window `window` starts (None: the epoch's start);
        # skip: how many samples of that window were already yielded.
        return {"epoch": self.epoch, "position": position, "window": window, "skip": skip, **self._identity()}

    def _start(self) -> tuple[dict | None, int, int]:
        resume, self._resume = self._resume, None
        if resume is None:
            return None, 0, 0
        if resume["epoch"] != self.epoch:
            if self._epoch_chosen:  # the loop moved on (a checkpoint from an epoch's end): a new epoch starts
                return None, 0, 0
            self.hf_dataset.set_epoch(resume["epoch"])  # nothing chose an epoch: the saved one continues
        here = self._identity()["worker"]
        if list(resume["worker"]) != here:
            raise ValueError(
                f"load_state_dict: the state was saved by DataLoader worker {resume['worker'][0]} of {resume['worker'][1]}, "
                f"but it is read by worker {here[0]} of {here[1]}. Resume through the same StatefulDataLoader settings "
                "(num_workers), which hands each worker its own state."
            )
        return resume["position"], resume["window"], resume["skip"]

    # ---- iterating ----------------------------------------------------------------------------

    def __iter__(self):
        # Not a generator itself: a loaded state is taken when the iterator is made. torchdata makes one
        # for a state saved after an epoch's last batch and never asks it for a row; the state must not
        # wait for the next epoch's iterator, which it would empty.
        position, window, skip = self._start()
        self._state = self._make_state(position, window, skip)
        return self._rows(position, window, skip)

    def _rows(self, position: dict | None, window: int, skip: int):
        for index, start, rows, end in self._windows(position, window):
            order = self._order(index, len(rows))
            for i in range(skip, len(rows)):
                last = i + 1 == len(rows)
                self._state = self._make_state(end, index + 1, 0) if last else self._make_state(start, index, i + 1)
                yield self.transform(arrow_rows(rows[order[i]])[0])
            skip = 0
        # The state stays where the stream ended (nothing left of this epoch): a DataLoader worker hands
        # it out with its last, partial batch, and a checkpoint after that batch must not read the part
        # again. The next iteration starts the epoch over anyway (`_start`), unless a state is loaded.

    def _order(self, window: int, size: int):
        if not self.shuffle_buffer:
            return range(size)
        import numpy as np

        worker = self._identity()["worker"][0]
        return np.random.default_rng([self.seed, self.epoch, self.split[0], worker, window]).permutation(size).tolist()

    def _windows(self, position: dict | None, window: int):
        """(index, start state, rows, end state) of consecutive windows; a failed read is reopened
        at the window's start, so a window is always read whole and in the same order."""
        size = self.shuffle_buffer or 1
        failures = 0
        rows = self._open(position)
        try:
            while True:
                try:
                    with _resuming_without_buffer():
                        chunk = list(itertools.islice(rows, size))
                except Exception as err:  # noqa: BLE001 - classified in _recover
                    rows.close()
                    failures += 1
                    self._recover(err, failures)
                    rows = self._open(position)
                    continue
                failures = 0
                if not chunk:
                    return
                end = self.hf_dataset.state_dict()
                yield window, position, chunk, end
                position, window = end, window + 1
        finally:
            rows.close()

    def _open(self, position: dict | None):
        self.hf_dataset.load_state_dict(position)  # None: from the epoch's start
        track_shards(self.shards)  # here too: a spawned DataLoader worker never ran load_cache
        rows = iter(self.hf_dataset)
        track_stream(rows)
        return rows

    def _recover(self, err: Exception, failures: int) -> None:
        """Return to reopen and resume after a transient failure; raise when it is permanent or retries ran out."""
        from .hub import Retry, is_transient

        retry = self.retry or Retry()
        if not is_transient(err) or failures > retry.retries:
            failure = err if self.describe_failure is None else self.describe_failure(err, reopened=failures - 1)
            if failure is err:
                raise err
            raise failure from err
        wait = min(retry.backoff * 2 ** (failures - 1), 30.0)
        log.warning(
            "streaming read failed (%s: %s); reopening at the current window, retry %d/%d in %.1fs",
            type(err).__name__,
            err,
            failures,
            retry.retries,
            wait,
        )
        time.sleep(wait)


_RESUMING = contextvars.ContextVar("eagle3_cache_resuming", default=False)


class _OneRowBufferFilter(logging.Filter):
    """The shard-order shuffle uses a one-row `datasets` shuffle buffer, which holds no row between
    samples: its "buffer will be refilled" warning on resume does not apply to our reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_RESUMING.get() and record.getMessage().startswith("Loading a state dict of a shuffle buffer"))


@contextlib.contextmanager
def _resuming_without_buffer():
    logger = logging.getLogger("datasets.iterable_dataset")
    if not any(isinstance(f, _OneRowBufferFilter) for f in logger.filters):
        logger.addFilter(_OneRowBufferFilter())
    token = _RESUMING.set(True)
    try:
        yield
    finally:
        _RESUMING.reset(token)


EXPECTABLE = {
    "target_model": lambda m: m["identity"]["target"]["model"],
    "target_revision": lambda m: m["identity"]["target"]["revision"],
    "aux_layer_ids": lambda m: list(m["identity"]["aux_layer_ids"]),
    "aux_convention": lambda m: m["identity"]["aux_convention"],
    "draft_vocab_size": lambda m: m["identity"]["draft_vocab_size"],
    "selected_token_ids": lambda m: m["identity"]["selected_token_ids_sha256"],
    "seq_length": lambda m: m["identity"]["seq_length"],
    "dtype": lambda m: m["identity"]["dtype"],
    "target_format": lambda m: m["identity"]["target_format"],
    "hidden_size": lambda m: m["hidden_size"],
    "target_vocab_size": lambda m: m["target_vocab_size"],
    "format_version": lambda m: m["identity"]["format_version"],
    "fingerprint": lambda m: m["fingerprint"],
}
_DTYPE_NAMES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "float32": "fp32",
    "half": "fp16",
    "float": "fp32",
}


def _normalise_expected(key: str, value):
    if key == "aux_layer_ids":
        return [int(v) for v in value]
    if key == "selected_token_ids":  # compared by hash: the ids themselves need no download
        import numpy as np

        from .vocab import array_hash

        return array_hash(np.asarray(torch.as_tensor(value).cpu().numpy(), dtype=np.int64))
    if key == "dtype":
        return _DTYPE_NAMES.get(value, value)
    return value


def check_expected(manifest: dict, expect: dict, location: str = "the cache") -> None:
    """Raise `CacheMismatch` naming every field whose value differs from the trainer's."""
    unknown = sorted(set(expect) - set(EXPECTABLE))
    if unknown:
        raise ValueError(f"expect=: unknown field(s) {unknown}; expected some of {sorted(EXPECTABLE)}")
    differences = {}
    for key, want in expect.items():
        want, have = _normalise_expected(key, want), EXPECTABLE[key](manifest)
        if want != have:
            differences[key] = (want, have)
    if differences:
        raise CacheMismatch(location, differences)


def distributed_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """The (rank, world_size) to split by: explicit values win; else torch.distributed's group;
    else a single process. Only asked when the caller wants a split (`split_by_rank=True`)."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None or not 0 <= rank < world_size:
            raise ValueError(f"rank/world_size: expected 0 <= rank < world_size, both given, got rank={rank}, world_size={world_size}")
        return rank, world_size
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1:
        raise ValueError(
            f"split_by_rank=True: WORLD_SIZE={launched} is set but torch.distributed is not initialised, so this "
            "process does not know its rank. Call torch.distributed.init_process_group() (or create the Accelerator) "
            "before load_cache, or pass rank= and world_size="
        )
    return 0, 1


def split_for_rank(hf, rank: int, world_size: int, rows_per_file: dict[str, int] | None = None):
    """Disjoint parts per rank. Streaming: whole shards (files, or row groups when files are
    fewer than ranks), so no rank reads another's data; only a cache with fewer row groups
    than ranks falls back to every rank reading all and keeping one row in `world_size`.
    `rows_per_file` (the manifest's): to warn when whole files give the ranks unequal parts."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    if world_size == 1:
        return hf
    if not isinstance(hf, datasets.IterableDataset):
        return split_dataset_by_node(hf, rank=rank, world_size=world_size)
    if hf.num_shards < world_size:
        hf = hf.reshard()  # Parquet: one shard per row group
    if hf.num_shards >= world_size:
        if rank == 0:
            warn_if_uneven(rank_sample_counts(hf, world_size, rows_per_file or {}))
        return split_dataset_by_node(hf, rank=rank, world_size=world_size, strategy="shards")
    log.warning(
        "the cache has %d row groups for %d ranks: every rank reads all of it and keeps 1 row in %d", hf.num_shards, world_size, world_size
    )
    if rank == 0 and rows_per_file:
        total = sum(rows_per_file.values())
        warn_if_uneven([len(range(r, total, world_size)) for r in range(world_size)])
    return split_dataset_by_node(hf, rank=rank, world_size=world_size, strategy="examples")


def warn_if_uneven(counts: list[int] | None) -> None:
    if counts is not None and len(set(counts)) > 1:
        log.warning(
            "split_by_rank: the split gives the ranks %s samples: a loop that runs a collective every step "
            "(DDP's gradient all-reduce) waits forever on the ranks with more batches. Wrap it in DDP's join() "
            "(accelerate: accelerator.join_uneven_inputs), stop every rank at the smallest count, or let "
            "accelerator.prepare split the stream instead (it evens the ranks out)",
            counts,
        )


def rank_sample_counts(hf, world_size: int, rows_per_file: dict[str, int]) -> list[int] | None:
    """Samples each rank gets from a split by whole files or row groups: the parts `datasets` hands it
    (its own `shard_data_sources`, as it splits by rank when iterating); None where that is not known
    (row groups of files not on this machine, or a stream of another kind)."""
    examples = getattr(hf, "_ex_iterable", None)
    if not hasattr(examples, "shard_data_sources"):
        return None
    counts = []
    for rank in range(world_size):
        files = getattr(examples.shard_data_sources(num_shards=world_size, index=rank, contiguous=False), "kwargs", {})
        paths = [str(f) for f in files.get("files", [])]
        groups = files.get("row_groups_list") or [None] * len(paths)
        names = [p.rsplit("/", 1)[-1] for p in paths]
        if not names or any(n not in rows_per_file for n in names):
            return None
        if groups[0] is None:
            counts.append(sum(rows_per_file[n] for n in names))
        elif all(os.path.isfile(p) for p in paths):
            counts.append(sum(_row_group_rows(p, g) for p, g in zip(paths, groups)))
        else:
            return None
    return counts


def _row_group_rows(path: str, groups) -> int:
    import pyarrow.parquet as pq

    metadata = pq.read_metadata(path)
    return sum(metadata.row_group(g).num_rows for g in groups)


def _arrow_cache_dir(manifest: dict) -> str:
    """A `datasets` cache folder per cache content: `datasets` keys local Parquet folders by name and
    file names, so two caches both called `cache/` would otherwise share (wrong) Arrow files."""
    import hashlib
    import json

    import datasets

    key = hashlib.sha256(
        json.dumps([manifest["fingerprint"], [s.get("checksum") or s["sha256"] for s in manifest["shards"]]]).encode()
    ).hexdigest()[:16]
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "eagle3_cache" / key)


def _load_rows(
    source: CacheSource,
    split: str,
    streaming: bool,
    columns: list[str] | None,
    block_size: int | None,
    cache_dir: str | None = None,
    retry=None,
):
    """(the `datasets` dataset, whether its shards are read memory-mapped, through no Python file object)."""
    import datasets

    from .hub import Retry

    kwargs: dict = {"split": split, "streaming": streaming}
    if cache_dir is not None and not streaming:
        kwargs["cache_dir"] = cache_dir
    if columns is not None:
        kwargs["columns"] = list(columns)  # pushed down to the Parquet reader: other columns are never fetched
    if source.on_hub:
        kwargs.update(revision=source.commit, token=source.token)
        if block_size is not None:
            kwargs["storage_options"] = {"hf": {"block_size": block_size}}
    else:
        where = Path(source.location)
        refuse_pattern_paths({os.path.abspath(where), where.resolve().as_posix()}, "load_cache")
    if streaming and not source.on_hub:
        kwargs["fragment_scan_options"] = local_scan_options()  # what datasets reads with if it cannot be memory-mapped
    load = functools.partial(datasets.load_dataset, source.location, source.name, **kwargs)
    if source.on_hub:  # `datasets` asks the Hub about the repo first: one 429 or 503 must not stop a training start
        load = functools.partial(retry or Retry(), "open the shards", load, source.location, explain_permanent=False)
    hf = opened(load, source)
    memory_mapped = streaming and not source.on_hub and memory_map_local_shards(hf)
    if streaming and not memory_mapped:  # a stream `datasets` reads itself: from the Hub, or a local shard it could not map
        name_the_shard_of_read_errors(hf)
    return hf, memory_mapped


def name_the_shard_of_read_errors(hf) -> None:
    """Make `datasets`' Parquet reads of a streaming dataset name the shard file on their errors (`TablesNamingTheirFile`);
    a stream `datasets` builds in another way (another version) is left as it is: its errors then name no file."""
    examples = getattr(hf, "_ex_iterable", None)
    generate = getattr(examples, "generate_tables_fn", None)
    if _is_datasets_parquet_reader(generate, getattr(generate, "__self__", None)) and sorted(examples.kwargs) == TABLE_ARGUMENTS:
        examples.generate_tables_fn = TablesNamingTheirFile(generate)


class TablesNamingTheirFile:
    """`datasets`' Parquet table generator, run one file at a time, so that an error reading a file carries its
    name (`hub.SHARD_FILE`, read by `hub.read_error` and `local_read_error`): Parquet's own errors name none.
    The same tables, with the same keys. Picklable, as the generator it wraps (DataLoader workers)."""

    def __init__(self, generate):
        self.generate = generate

    def __call__(self, files, row_groups_list):
        from datasets.builder import Key

        from .hub import SHARD_FILE

        for file_index, (file, row_groups) in enumerate(zip(files, row_groups_list)):
            with contextlib.closing(self.generate(files=[file], row_groups_list=[row_groups])) as tables:
                while True:
                    try:
                        item = next(tables, None)
                    except Exception as err:  # not around the yield: an error thrown into the generator is not the file's
                        setattr(err, SHARD_FILE, str(file))
                        raise
                    if item is None:
                        break
                    key, table = item
                    yield Key(file_index, key.item_or_batch_id), table


class ShardsNotOpened(Eagle3CacheError, ValueError):
    """`datasets` refused to open a cache's shards."""


def opened(load: functools.partial, source: CacheSource):
    """`load()`'s dataset; a ValueError of `datasets` (such as a config the root card does not offer) raised as this
    package's error, saying what to do. Only then is the root card read, to tell a damaged one (refused with
    verify's advice) from one that lists other configs: a load that opens costs no extra download."""
    from datasets.exceptions import DatasetGenerationError

    from .manifest import ManifestError, config_not_offered, refuse_damaged_root_card

    try:
        return load()
    except DatasetGenerationError as err:  # preparing a map-style read: Parquet's error names no shard
        if not _read_failure(err.__cause__):
            raise
        if source.on_hub:  # the shards were downloaded whole before: the bytes served are damaged
            raise damaged_hub_shard(err.__cause__, source.describe(), source.location, source.revision, source.name, SHARD_DAMAGED) from err
        raise damaged_shard(source.describe(), verify_target(source), err.__cause__, SHARD_DAMAGED) from err
    except ValueError as err:
        if isinstance(err, Eagle3CacheError):
            raise
        if source.name is not None:
            try:
                refuse_damaged_root_card(source)
            except ManifestError as damaged:
                raise damaged from err
        hint = config_not_offered(source) if source.name is not None else None
        written_by = "a repo as `eagle3-cache push` wrote it" if source.on_hub else "a cache directory as `eagle3-cache build` wrote it"
        raise ShardsNotOpened(
            f"{source.describe()}: `datasets` could not open its shards ({err}); "
            + (hint or f"expected {written_by}: check it with `eagle3-cache verify`")
        ) from err


SHARD_DAMAGED = "a shard is damaged: `datasets` could not read its shards"


def _read_failure(err: BaseException | None) -> bool:
    import pyarrow as pa

    return isinstance(err, (OSError, pa.ArrowException)) and not isinstance(err, DamagedShard)


def verify_target(source: CacheSource) -> str:
    """What to pass to `eagle3-cache verify` to check this cache."""
    return f"{source.location} --name {source.name}" if source.name else str(source.location)


def local_read_error(err: BaseException, reopened: int, source: CacheSource) -> BaseException:
    """A local stream's failure as the user's error: a shard `datasets` read itself (not memory-mapped)
    fails with Parquet's error, which names no file: named by the file `TablesNamingTheirFile` noted on it,
    as a memory-mapped shard is. Any other error is raised as it is."""
    from .hub import SHARD_FILE

    if not _read_failure(err):
        return err
    shard = getattr(err, SHARD_FILE, None)
    if shard is None:  # a stream `datasets` built in another way (another version): the shard is not known
        return damaged_shard(source.describe(), verify_target(source), err, SHARD_DAMAGED)
    return damaged_shard(shard, verify_target(source), err)


def hub_read_error(err: BaseException, reopened: int, source: CacheSource, revision: str | None) -> BaseException:
    """A Hub stream's failure as the user's error: bytes Parquet cannot decode are a damaged shard, named by
    the file `TablesNamingTheirFile` noted on the error, with verify's check and the repair; the Hub's
    answers and broken connections as the Hub client tells them (`hub.read_error`)."""
    from .hub import failed_path, read_error, read_version, undecodable

    if undecodable(err):
        where = f"streaming {source.location}: {failed_path(err) or 'a data file'} at {read_version(revision, source.commit)}"
        return damaged_hub_shard(err, where, source.location, revision, source.name)
    return read_error(err, source.location, revision, source.commit, reopened)


def damaged_hub_shard(
    err: BaseException, where: str, repo_id: str, revision: str | None, name: str | None, what: str = "the shard is damaged"
) -> DamagedShard:
    from .repair import Repair

    verify = f"eagle3-cache verify {repo_id}" + (f" --revision {revision}" if revision else "") + (f" --name {name}" if name else "")
    return DamagedShard(
        f"{where}: {what} ({type(err).__name__}: {err}). `{verify}` checks every shard against the "
        f"checksums its card records; to repair: {Repair(repo_id, revision, name).push_again()}"
    )


def local_scan_options():
    """Parquet scan options for streaming local shards through `datasets` (where they cannot be
    memory-mapped): one sequential buffered pass.

    Arrow's default pre-buffering plans and coalesces ranged reads for every column chunk, which
    suits object stores; over a local file it halves the read rate. Tensor values are large, so an
    8 MiB buffered stream reads each row group in few sequential calls.
    """
    import pyarrow.dataset as pads

    return pads.ParquetFragmentScanOptions(pre_buffer=False, use_buffered_stream=True, buffer_size=LOCAL_READ_BUFFER)


def load_cache(
    location: str | Path,
    *,
    split: str = "train",
    streaming: bool = True,
    layout: str = "nemo",
    columns: list[str] | None = None,
    revision: str | None = None,
    name: str | None = None,
    expect: dict | None = None,
    shuffle_buffer: int | None = None,
    seed: int = 0,
    split_by_rank: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    token: str | None = None,
    block_size: int | None = None,
    draft_vocab_size: int | None = None,
    spread_tail: bool = False,
    aux_dtype: torch.dtype | str | None = None,
    retry=None,
):
    """A torch dataset over a cache: a local directory or a Hub dataset repo id.

    `layout="raw"`: the stored, unshifted fields as tensors in the stored dtype (`columns`
    selects some; with another layout it is refused). `layout="nemo"`: `input_ids`, `attention_mask`, `loss_mask`,
    `aux_hidden_states`, `target_probs`, `position_mask` as NeMo Automodel's EAGLE-3 trainer
    consumes them; batch with `collate_nemo`. `layout="specforge"` (hidden caches): SpecForge's
    offline sample (`input_ids`, `loss_mask`, `hidden_state`, `aux_hidden_state`).

    Every format yields the same keys and shapes (but for the `kept_mass` a `topk` cache read with
    a smaller `draft_vocab_size` adds, see `SampleDecoder`): `topk` is rebuilt renormalised over
    the kept K (or, `spread_tail=True`, with the missing mass spread evenly), `hidden` recomputes the
    probs with the stored head rows (`draft_vocab_size` picks another draft vocabulary), and
    aux states are decoded to `aux_dtype` (a torch dtype or a name such as "bf16" or "float32";
    default: bf16 for fp8, else the stored dtype).

    Hub: `revision` (branch, tag or commit; pinned to its commit at open), `name` (config of
    a repo holding several caches), `token`, `block_size` (bytes per ranged read).
    `expect={field: value}` raises `CacheMismatch` naming each field that differs (see
    `EXPECTABLE`).

    Every process gets the whole cache unless it asks for a part: splitting is done once, by
    whoever the user chooses (`accelerator.prepare`, a `DistributedSampler`, or this function).
    `split_by_rank=True`: each rank of the torch.distributed group gets a disjoint part (whole
    shards when possible; DataLoader workers split it further); `rank`/`world_size` give the
    split explicitly. Never combine a split with `accelerator.prepare` or a `DistributedSampler`:
    they split again, and half of every rank's part is lost.

    `shuffle_buffer`: streaming shuffle (shard order per epoch + rows permuted in windows of that
    many rows), seeded by `seed` (a fixed non-negative int, the same on every rank); call
    `set_epoch` each epoch (map-style datasets are shuffled fully instead). Under
    `accelerator.prepare`, call the prepared loader's `loader.set_epoch(e)` instead: it sets the
    dataset's epoch from its own counter when an epoch starts, overriding `dataset.set_epoch`,
    and a restart sets that counter back to 0. Streaming datasets resume mid-epoch
    (`state_dict`/`load_state_dict`; through accelerate, a state saved at an epoch's last step,
    when `loader.end_of_dataloader` is true, resumes with the next epoch: `loader.set_epoch(e + 1)`)
    and reopen a read that failed past the client's retries (`retry`: a `builder.hub.Retry`,
    which also retries a transient failure while the cache is opened on the Hub).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if columns is not None and layout != "raw":
        raise ConfigError(
            "columns",
            columns,
            f"None with layout={layout!r}, whose samples are built from every stored column",
            "Only layout='raw' selects columns: pass layout='raw' with columns=, or leave columns= out",
        )
    checked_split(split, streaming)
    if layout == "raw":
        refuse_decoding_options(draft_vocab_size=draft_vocab_size, aux_dtype=aux_dtype, spread_tail=spread_tail)
    if shuffle_buffer is not None:  # True would be a one-row window: no row shuffled
        if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, numbers.Integral) or shuffle_buffer < 1:
            raise ValueError(
                f"shuffle_buffer: expected a positive number of rows (or None for no shuffle), got {shuffle_buffer!r}. "
                "Give the rows a shuffle window holds, such as shuffle_buffer=1000"
            )
        shuffle_buffer = int(shuffle_buffer)  # a numpy int too: the resume state holds it as JSON
    if shuffle_buffer is not None:
        seed = checked_seed(seed)
    if layout != "raw":
        aux_dtype = read_aux_dtype(aux_dtype)
    source = open_source(location, revision=revision, name=name, token=token, retry=retry)
    manifest = _manifest_of(source)
    refuse_unreadable_parts(manifest, source)
    if layout == "specforge" and manifest["identity"]["target_format"] != "hidden":
        raise ValueError(
            f"layout='specforge': SpecForge trains from final hidden states, and {source.describe()} was built with "
            f"--target-format {manifest['identity']['target_format']}. Read it with layout='nemo', or build the cache "
            "again with --target-format hidden."
        )
    if expect:
        check_expected(manifest, expect, source.describe())
    check_shard_files(source, manifest)
    decode = RowDecoder(manifest)
    wanted = list(decode.columns) if layout != "raw" else checked_columns(columns, manifest)  # decoded layouts: every tensor column
    hf, memory_mapped = _load_rows(source, split, streaming, wanted, block_size, _arrow_cache_dir(manifest), retry)
    part = distributed_rank(rank, world_size) if split_by_rank or rank is not None or world_size is not None else (0, 1)
    hf = split_for_rank(hf, *part, rows_per_file={shard["name"]: shard["rows"] for shard in manifest["shards"]})
    if shuffle_buffer and not streaming:
        hf = hf.shuffle(seed=seed)
    elif shuffle_buffer:  # shard order only: rows are shuffled in resumable windows by StreamingCacheDataset
        hf = hf.shuffle(seed=seed, buffer_size=1, max_buffer_input_shards=1)
    if layout == "raw":
        transform = decode
    else:
        transform = SampleDecoder(source, manifest, layout, draft_vocab_size=draft_vocab_size, spread_tail=spread_tail, aux_dtype=aux_dtype)
    if streaming:
        # The exit waits only on files a stream read through: a memory-mapped shard has none, and a closed
        # file of one that the user's own code keeps is no read of Arrow's to wait for.
        shards = () if memory_mapped else tuple(f"{source.prefix}data/{shard['name']}" for shard in manifest["shards"])
        track_shards(shards)
        describe = functools.partial(local_read_error, source=source)
        if source.on_hub:
            describe = functools.partial(hub_read_error, source=source, revision=revision)
        dataset = StreamingCacheDataset(
            hf,
            transform,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            split=part,
            fingerprint=manifest["fingerprint"],
            retry=retry,
            describe=describe,
            shards=shards,
        )
    else:
        dataset = CacheDataset(hf, transform)
    dataset.manifest = manifest
    dataset.source = source
    return dataset


_READ_AUX_DTYPES = ("bf16", "fp16", "fp32")


def read_aux_dtype(aux_dtype) -> torch.dtype | None:
    """`aux_dtype=` as a torch dtype: a floating torch dtype, or a name `expect=` also takes
    ("bf16", "bfloat16", "fp32", "float32", ...). None: the default for the stored dtype."""
    if aux_dtype is None or (isinstance(aux_dtype, torch.dtype) and aux_dtype.is_floating_point):
        return aux_dtype
    name = _DTYPE_NAMES.get(aux_dtype, aux_dtype) if isinstance(aux_dtype, str) else None
    if name in _READ_AUX_DTYPES:
        return TORCH_DTYPES[name]
    names = [*_READ_AUX_DTYPES, *(key for key in _DTYPE_NAMES if isinstance(key, str))]
    raise ConfigError(
        "aux_dtype",
        aux_dtype,
        "a floating torch dtype or one of " + ", ".join(repr(name) for name in names),
        "Pass e.g. aux_dtype=torch.bfloat16 or aux_dtype='bf16' (or None for the default)",
    )


def refuse_decoding_options(**options) -> None:
    """A raw read yields the stored tensors as they are: an option only a decoded layout applies would be ignored,
    and the trainer would get the stored draft vocabulary or aux dtype without a word."""
    for option, value in options.items():
        if value is not None and value is not False:
            raise ConfigError(
                option,
                value,
                f"{'False' if option == 'spread_tail' else 'None'} with layout='raw', which yields the stored tensors as they are",
                f"Read with layout='nemo' (or 'specforge') for {option}= to apply, or leave it out",
            )


def checked_split(split, streaming: bool) -> None:
    """`split=` at the open: a cache holds one split, `train` (`datasets` would call another one a shard it
    could not open, after preparing every shard of a map-style read). A map-style read takes `datasets`' slices of it."""
    import re

    parts = [re.sub(r"\[[^\]]*\]$", "", part.strip()) for part in str(split).split("+")]
    if split == "train" or (not streaming and all(part == "train" for part in parts)):
        return
    if streaming and parts == ["train"]:
        expected, hint = "'train' for a streamed read", "A stream takes no slice: read split='train' and stop early with itertools.islice"
    else:
        expected, hint = (
            "'train' (a cache holds one split, train)",
            "Pass split='train', or a slice of it such as 'train[:10%]' with streaming=False",
        )
    raise ConfigError("split", split, expected, hint)


def checked_seed(seed) -> int:
    """The shuffle's seed: a fixed non-negative int. No random one is drawn for None: every rank and
    DataLoader worker must shuffle alike, and a resumed run must shuffle as the saved one did."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(
            "seed",
            seed,
            "a non-negative int",
            "The shuffle needs one fixed seed, the same on every rank and on resume: pass seed=0 (the default) or any fixed number",
        )
    return int(seed)


def checked_columns(columns, manifest: dict) -> list[str] | None:
    """`columns=` of a raw read, checked at open: a non-empty list of the cache's column names (None: all).
    `datasets` would otherwise read no column at all for `[]` (no rows, or a split-size error), fail at
    the first read for an unknown name, and split a bare string into its characters."""
    if columns is None:
        return None
    known = list(manifest["columns"])
    if isinstance(columns, (str, bytes)) or not isinstance(columns, (list, tuple)) or not columns:
        raise ConfigError(
            "columns",
            columns,
            "a non-empty list of column names (or None for every column)",
            f"Write columns=[{columns!r}] for one column; this cache's columns are {known}"
            if isinstance(columns, str)
            else f"This cache's columns are {known}",
        )
    unknown = [name for name in columns if name not in known]
    if unknown:
        raise ConfigError("columns", columns, "names of this cache's columns", f"Not in this cache: {unknown}; its columns are {known}")
    return list(columns)


def collate_nemo(samples: list[dict], pad_to: int | None = None) -> dict:
    """Stack NeMo-layout samples, right-padding every field with zeros to the longest (or `pad_to`).

    Each field's batch is allocated once and every sample copied into its row. In a DataLoader
    worker the fields of a batch share one shared-memory block, so handing the batch to the
    main process copies nothing and passes one file descriptor, not one per field (each costs
    `multiprocessing` a connection of its own); `.clone()` a field to keep it on its own.
    A sample longer than `pad_to` is refused: cutting it would drop supervised positions unseen."""
    refuse_other_layouts(samples[0])
    longest = max(s["input_ids"].shape[0] for s in samples)
    if pad_to and longest > pad_to:
        raise ConfigError(
            "pad_to",
            pad_to,
            f"a length no sample exceeds, and this batch holds one of {longest} tokens",
            "Cutting it would drop its supervision unseen: pad to the cache's seq_length (the --seq-length it was built with, "
            "dataset.manifest['identity']['seq_length']), which no sample exceeds",
        )
    width = pad_to or longest
    specs = {key: ((len(samples), width, *first.shape[1:]), first.dtype) for key, first in samples[0].items()}
    out = _new_batch(specs)
    for key, batch in out.items():
        for row, s in enumerate(samples):
            t = s[key]
            batch[row, : t.shape[0]] = t
            batch[row, t.shape[0] :] = 0
    return out


def refuse_other_layouts(sample: dict) -> None:
    """A sample of another layout (raw, specforge) lacks NeMo's keys and holds fields that are no
    tensors (`sample_id`): name what is missing rather than fail on the first string."""
    missing = [key for key in NEMO_KEYS if key not in sample]
    if missing:
        raise ConfigError(
            "samples",
            sorted(sample),
            f"NeMo-layout samples, holding {', '.join(NEMO_KEYS)}",
            f"They lack {', '.join(missing)}: read the cache with load_cache(..., layout='nemo') to batch it with collate_nemo",
        )


def _new_batch(specs: dict[str, tuple[tuple, torch.dtype]]) -> dict[str, torch.Tensor]:
    """Uninitialised tensors of the given shapes and dtypes; in a DataLoader worker, views of one
    shared-memory block from the start (`default_collate` allocates shared memory the same way)."""
    offsets, end = {}, 0
    for key, (shape, dtype) in specs.items():
        offsets[key] = -(-end // 64) * 64  # aligned for any dtype
        end = offsets[key] + math.prod(shape) * dtype.itemsize
    if torch.utils.data.get_worker_info() is None or end == 0:
        return {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in specs.items()}
    storage = torch.UntypedStorage._new_shared(end)
    return {key: torch.empty(0, dtype=dtype).set_(storage, offsets[key] // dtype.itemsize, shape) for key, (shape, dtype) in specs.items()}
