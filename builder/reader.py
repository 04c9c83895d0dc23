"""Read a cache back as torch tensors: the stored (`raw`) fields, or NeMo Automodel's
shifted EAGLE-3 layout (`nemo`), from a local directory or a Hub repo through `datasets`.

Tensor columns are decoded with `torch.frombuffer` straight from the row's bytes (no copy);
`datasets`' torch/numpy formatters never touch them (they would upcast to float32/int64).

From the Hub, every read is pinned to the commit the revision points at when the cache is
opened (card, vocab and shards of one version, even if the branch moves meanwhile); only
the columns the layout needs are requested (Parquet column projection), and under
`torch.distributed` each rank reads its own shards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dataset_card import data_prefix

from .errors import Eagle3CacheError
from .manifest import VOCAB_FILE
from .shards import PLANES_ZSTD, RAW, TORCH_DTYPES, decode_value, frombuffer

log = logging.getLogger(__name__)
LAYOUTS = ("raw", "nemo", "specforge")


class CacheMismatch(Eagle3CacheError, ValueError):
    """The cache was built with settings other than the trainer's (`load_cache(expect=...)`)."""

    def __init__(self, location: str, differences: dict):
        lines = [f"  {field}: trainer expects {want!r}, cache has {have!r}" for field, (want, have) in sorted(differences.items())]
        super().__init__(
            f"{location} does not match the trainer's settings:\n" + "\n".join(lines)
            + "\nUse a cache built with these settings (or build one), or change the trainer's settings to the cache's."
        )
        self.differences = differences


@dataclass
class CacheSource:
    """Where a cache's pieces are: local folder, or a Hub repo pinned to one commit."""

    location: str
    prefix: str  # the config's folder ("" for a cache at the root)
    name: str | None
    commit: str | None = None  # Hub only
    token: str | None = None

    @property
    def on_hub(self) -> bool:
        return self.commit is not None

    def file(self, relative: str) -> Path:
        if self.on_hub:
            from .hub import download_file

            return download_file(self.location, f"{self.prefix}{relative}", self.commit, self.token)
        return Path(self.location) / self.prefix / relative

    def describe(self) -> str:
        where = f"{self.location}@{self.commit[:12]}" if self.on_hub else self.location
        return f"{where} (config {self.name})" if self.name else where


def open_source(location: str | Path, *, revision: str | None = None, name: str | None = None, token: str | None = None) -> CacheSource:
    from .hub import is_hub_location, resolve_commit

    if is_hub_location(location):
        commit = resolve_commit(str(location), revision, token)
        return CacheSource(str(location), data_prefix(name), name, commit, token)
    if revision is not None:
        raise ValueError(f"revision={revision!r}: only a Hub repo id has revisions, {location} is a local path")
    return CacheSource(str(location), data_prefix(name), name)


def read_manifest(location: str | Path, *, revision: str | None = None, name: str | None = None, token: str | None = None) -> dict:
    source = location if isinstance(location, CacheSource) else open_source(location, revision=revision, name=name, token=token)
    return _manifest_of(source)


def _manifest_of(source: CacheSource) -> dict:
    from huggingface_hub import DatasetCard

    try:
        card_path = source.file("README.md")
    except FileNotFoundError:
        card_path = None
    if card_path is None or not card_path.exists():
        raise FileNotFoundError(
            f"{source.describe()}: no README.md; expected a finished eagle3-cache directory (the card is written last, "
            "so an interrupted build has none: resume it with --resume)"
        )
    data = DatasetCard.load(card_path).data.to_dict()
    if "eagle3_cache" not in data:
        if data.get("eagle3_cache_index"):
            raise ValueError(f"{source.describe()} holds several caches: pass name= one of {sorted(data['eagle3_cache_index'])}")
        raise ValueError(f"{card_path} has no 'eagle3_cache' manifest block; it is not an eagle3-cache dataset card")
    return data["eagle3_cache"]


def read_vocab(location: str | Path, *, revision: str | None = None, name: str | None = None, token: str | None = None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    source = location if isinstance(location, CacheSource) else open_source(location, revision=revision, name=name, token=token)
    return load_file(str(source.file(VOCAB_FILE)))


def _frombuffer(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    return frombuffer(data, dtype)


class RowDecoder:
    """Stored row (bytes) -> tensors, per the manifest's column specs: `raw` values are viewed
    in place (no copy), `byte_planes_zstd` values decoded (bit-exact)."""

    def __init__(self, manifest: dict):
        self.columns = {name: spec for name, spec in manifest["columns"].items() if spec["arrow"] == "binary"}
        self.widths = {name: spec["shape"][1] for name, spec in self.columns.items() if len(spec["shape"]) == 2}
        self.dtypes = {name: TORCH_DTYPES[spec["dtype"]] for name, spec in self.columns.items()}
        self.encoded = {name for name, spec in self.columns.items() if spec.get("encoding", RAW) != RAW}
        unknown = {spec["encoding"] for spec in self.columns.values() if spec.get("encoding", RAW) not in (RAW, PLANES_ZSTD)}
        if unknown:
            raise ValueError(f"the cache's columns use encoding(s) {sorted(unknown)}; this eagle3-cache reads {RAW!r} and "
                             f"{PLANES_ZSTD!r}: upgrade eagle3-cache to read it")

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


def to_nemo(raw: dict, t2d: torch.Tensor, probs_rows: torch.Tensor | None = None, aux: torch.Tensor | None = None) -> dict:
    """NeMo Automodel's EAGLE-3 sample: slot t carries aux[t] and everything of position t+1.
    `probs_rows` (`[n_loss, Vd]`) defaults to the stored `target_probs`; `aux` to the stored aux."""
    length = raw["input_ids"].numel()
    loss = raw["loss_mask"].bool()
    probs = raw["target_probs"] if probs_rows is None else probs_rows
    dense = probs.new_zeros(length, probs.shape[-1])
    dense[loss] = probs
    supervised = torch.zeros(length, dtype=torch.bool)
    supervised[loss] = t2d[raw["target_argmax"].long()]
    return {
        "input_ids": _shift(raw["input_ids"].long()),
        "attention_mask": torch.ones(length, dtype=torch.long),
        "loss_mask": _shift(loss.long()),
        "aux_hidden_states": raw["aux_hidden_states"] if aux is None else aux,
        "target_probs": _shift(dense),
        "position_mask": _shift(supervised).unsqueeze(-1),
    }


class SampleDecoder:
    """Stored row -> a trainer's sample, for every target format and aux dtype: the same keys
    and shapes whatever the format. A class, not a closure, so DataLoader workers can pickle it.

    `draft_vocab_size` (hidden caches) re-derives a smaller or, with --store-full-head, any
    draft vocabulary from the stored token counts, with no rebuild.
    """

    def __init__(self, source, manifest: dict, layout_name: str, *, draft_vocab_size: int | None = None,
                 spread_tail: bool = False, aux_dtype: torch.dtype | None = None):
        from .formats import Layout, head_transform_from

        self.decode = RowDecoder(manifest)
        self.layout = Layout(**manifest["layout"])
        self.layout_name, self.spread_tail = layout_name, spread_tail
        stored = TORCH_DTYPES[self.layout.dtype]
        self.float_dtype = stored
        self.aux_dtype = aux_dtype or (torch.bfloat16 if self.layout.aux_dtype == "fp8" else TORCH_DTYPES[self.layout.aux_dtype])
        vocab = read_vocab(source)
        selected, self.draft_rows, self.transform = vocab["selected_token_ids"], None, None
        if self.layout.target_format == "hidden":
            head = _read_safetensors(source, manifest["lm_head_file"]["path"])
            self.transform = head_transform_from(manifest.get("head_transform"))
            selected, self.draft_rows = _draft_rows(manifest, vocab, head, draft_vocab_size)
        elif draft_vocab_size not in (None, len(selected)):
            raise ValueError(
                f"draft_vocab_size: a {self.layout.target_format} cache holds supervision for its {len(selected)}-token "
                f"draft vocabulary only; got {draft_vocab_size}. Only `hidden` caches can change it at read time."
            )
        self.selected = selected
        self.t2d = torch.zeros(manifest["target_vocab_size"], dtype=torch.bool)
        self.t2d[selected] = True

    def __call__(self, row: dict) -> dict:
        from .formats import decode_aux, supervised_probs

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
        if self.layout.target_format == "probs":
            probs = raw["target_probs"]  # stored exactly: no round trip through fp32
        else:
            probs = supervised_probs(self.layout, raw, loss, self.draft_rows, self.transform, self.spread_tail).to(self.float_dtype)
        return to_nemo(raw, self.t2d, probs, aux)


def _read_safetensors(source, path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(source.file(path)))


def _draft_rows(manifest: dict, vocab: dict, head: dict, draft_vocab_size: int | None):
    """(selected ids, their head rows) for the requested draft size, from what the cache stores."""
    from .vocab import select_draft_vocab

    stored = vocab["selected_token_ids"]
    if draft_vocab_size is None or draft_vocab_size == len(stored):
        return stored, head["draft_rows"]
    selected = torch.as_tensor(select_draft_vocab(vocab["token_counts"].numpy(), draft_vocab_size, manifest["special_token_ids"]))
    if "weight" in head:
        return selected, head["weight"].index_select(0, selected)
    if len(selected) <= len(stored) and torch.equal(selected, stored[: len(selected)]):
        return selected, head["draft_rows"][: len(selected)]  # the draft order is a ranking: a prefix
    raise ValueError(
        f"draft_vocab_size: {draft_vocab_size} needs lm_head rows this cache did not store (it keeps {len(stored)}); "
        "rebuild with --store-full-head to read any draft vocabulary size"
    )


def _shift(tensor: torch.Tensor) -> torch.Tensor:
    """Left by one along the sequence, last slot zero."""
    return torch.cat([tensor[1:], tensor.new_zeros((1, *tensor.shape[1:]))])


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
    In DataLoader workers, `datasets` hands each worker its own shards."""

    def __init__(self, hf_dataset, transform):
        self.hf_dataset, self.transform = hf_dataset, transform

    def __iter__(self):
        for row in self.hf_dataset:
            yield self.transform(row)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle (shard order and buffer) differently each epoch when a shuffle buffer is set."""
        self.hf_dataset.set_epoch(epoch)

    @property
    def num_shards(self) -> int:
        return self.hf_dataset.num_shards


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
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", "bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "half": "fp16", "float": "fp32"}


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


def distributed_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values win; else torch.distributed when initialised; else a single process."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None or not 0 <= rank < world_size:
            raise ValueError(f"rank/world_size: expected 0 <= rank < world_size, both given, got rank={rank}, world_size={world_size}")
        return rank, world_size
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def split_for_rank(hf, rank: int, world_size: int):
    """Disjoint parts per rank. Streaming: whole shards (files, or row groups when files are
    fewer than ranks), so no rank reads another's data; only a cache with fewer row groups
    than ranks falls back to every rank reading all and keeping one row in `world_size`."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    if world_size == 1:
        return hf
    if not isinstance(hf, datasets.IterableDataset):
        return split_dataset_by_node(hf, rank=rank, world_size=world_size)
    if hf.num_shards < world_size:
        hf = hf.reshard()  # Parquet: one shard per row group
    if hf.num_shards >= world_size:
        return split_dataset_by_node(hf, rank=rank, world_size=world_size, strategy="shards")
    log.warning("the cache has %d row groups for %d ranks: every rank reads all of it and keeps 1 row in %d", hf.num_shards, world_size, world_size)
    return split_dataset_by_node(hf, rank=rank, world_size=world_size, strategy="examples")


def _arrow_cache_dir(manifest: dict) -> str:
    """A `datasets` cache folder per cache content: `datasets` keys local Parquet folders by name and
    file names, so two caches both called `cache/` would otherwise share (wrong) Arrow files."""
    import hashlib
    import json

    import datasets

    key = hashlib.sha256(json.dumps([manifest["fingerprint"], [s.get("checksum") or s["sha256"] for s in manifest["shards"]]]).encode()).hexdigest()[:16]
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "eagle3_cache" / key)


def _load_rows(source: CacheSource, split: str, streaming: bool, columns: list[str] | None, block_size: int | None, cache_dir: str | None = None):
    import datasets

    kwargs: dict = {"split": split, "streaming": streaming}
    if cache_dir is not None and not streaming:
        kwargs["cache_dir"] = cache_dir
    if columns is not None:
        kwargs["columns"] = list(columns)  # pushed down to the Parquet reader: other columns are never fetched
    if source.on_hub:
        kwargs.update(revision=source.commit, token=source.token)
        if block_size is not None:
            kwargs["storage_options"] = {"hf": {"block_size": block_size}}
    return datasets.load_dataset(source.location, source.name, **kwargs)


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
    rank: int | None = None,
    world_size: int | None = None,
    token: str | None = None,
    block_size: int | None = None,
    draft_vocab_size: int | None = None,
    spread_tail: bool = False,
    aux_dtype: torch.dtype | None = None,
):
    """A torch dataset over a cache: a local directory or a Hub dataset repo id.

    `layout="raw"`: the stored, unshifted fields as tensors in the stored dtype (`columns`
    selects some). `layout="nemo"`: `input_ids`, `attention_mask`, `loss_mask`,
    `aux_hidden_states`, `target_probs`, `position_mask` as NeMo Automodel's EAGLE-3 trainer
    consumes them; batch with `collate_nemo`. `layout="specforge"` (hidden caches): SpecForge's
    offline sample (`input_ids`, `loss_mask`, `hidden_state`, `aux_hidden_state`).

    Every format yields the same keys and shapes: `topk` is rebuilt renormalised over the kept
    K (or, `spread_tail=True`, with the missing mass spread evenly), `hidden` recomputes the
    probs with the stored head rows (`draft_vocab_size` picks another draft vocabulary), fp8
    aux states are decoded to `aux_dtype` (default bf16).

    Hub: `revision` (branch, tag or commit; pinned to its commit at open), `name` (config of
    a repo holding several caches), `token`, `block_size` (bytes per ranged read).
    `expect={field: value}` raises `CacheMismatch` naming each field that differs (see
    `EXPECTABLE`). Under `torch.distributed` (or with explicit `rank`/`world_size`) each rank
    gets a disjoint part, whole shards when possible; DataLoader workers split it further.
    `shuffle_buffer`: streaming shuffle (shard order + a buffer of that many rows), seeded
    by `seed`; call `set_epoch` each epoch. Map-style datasets are shuffled fully instead.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    source = open_source(location, revision=revision, name=name, token=token)
    manifest = _manifest_of(source)
    if expect:
        check_expected(manifest, expect, source.describe())
    decode = RowDecoder(manifest)
    wanted = list(decode.columns) if layout != "raw" else columns  # decoded layouts: every tensor column, no scalar one
    hf = _load_rows(source, split, streaming, wanted, block_size, _arrow_cache_dir(manifest))
    hf = split_for_rank(hf, *distributed_rank(rank, world_size))
    if shuffle_buffer:
        hf = hf.shuffle(seed=seed, buffer_size=shuffle_buffer) if streaming else hf.shuffle(seed=seed)
    if layout == "raw":
        transform = decode
    else:
        transform = SampleDecoder(source, manifest, layout, draft_vocab_size=draft_vocab_size, spread_tail=spread_tail, aux_dtype=aux_dtype)
    wrapper = StreamingCacheDataset if streaming else CacheDataset
    dataset = wrapper(hf, transform)
    dataset.manifest = manifest
    dataset.source = source
    return dataset


def collate_nemo(samples: list[dict], pad_to: int | None = None) -> dict:
    """Stack NeMo-layout samples, right-padding every field with zeros to the longest (or `pad_to`)."""
    width = pad_to or max(s["input_ids"].shape[0] for s in samples)
    out = {}
    for key in samples[0]:
        padded = []
        for s in samples:
            t = s[key][:width]
            pad = t.new_zeros((width - t.shape[0], *t.shape[1:]))
            padded.append(torch.cat([t, pad]))
        out[key] = torch.stack(padded)
    return out
