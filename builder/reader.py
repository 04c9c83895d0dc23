"""Read a cache back as torch tensors: the stored (`raw`) fields, or NeMo Automodel's
shifted EAGLE-3 layout (`nemo`), from a local directory through `datasets`.

Tensor columns are decoded with `torch.frombuffer` straight from the row's bytes (no copy);
`datasets`' torch/numpy formatters never touch them (they would upcast to float32/int64).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .manifest import VOCAB_FILE
from .shards import TORCH_DTYPES

LAYOUTS = ("raw", "nemo")


def read_manifest(location: str | Path) -> dict:
    from huggingface_hub import DatasetCard

    card_path = Path(location) / "README.md"
    if not card_path.exists():
        raise FileNotFoundError(
            f"{location}: no README.md; expected a finished eagle3-cache directory (the card is written last, "
            "so an interrupted build has none: resume it with --resume)"
        )
    data = DatasetCard.load(card_path).data.to_dict()
    if "eagle3_cache" not in data:
        raise ValueError(f"{card_path} has no 'eagle3_cache' manifest block; it is not an eagle3-cache dataset card")
    return data["eagle3_cache"]


def read_vocab(location: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(location) / VOCAB_FILE))


def _frombuffer(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    if not data:  # torch.frombuffer refuses empty buffers
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():  # read-only bytes: the tensor must be treated as read-only
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=dtype)


class RowDecoder:
    """Stored row (bytes) -> tensors, per the manifest's column specs."""

    def __init__(self, manifest: dict):
        self.columns = {name: spec for name, spec in manifest["columns"].items() if spec["arrow"] == "binary"}
        self.widths = {name: spec["shape"][1] for name, spec in self.columns.items() if len(spec["shape"]) == 2}

    def __call__(self, row: dict) -> dict:
        out = {}
        for name, value in row.items():
            spec = self.columns.get(name)
            if spec is None:
                out[name] = value
                continue
            tensor = _frombuffer(value, TORCH_DTYPES[spec["dtype"]])
            out[name] = tensor.view(-1, self.widths[name]) if name in self.widths else tensor
        return out


def to_nemo(raw: dict, t2d: torch.Tensor) -> dict:
    """NeMo Automodel's EAGLE-3 sample: slot t carries aux[t] and everything of position t+1."""
    length = raw["input_ids"].numel()
    loss = raw["loss_mask"].bool()
    probs = raw["target_probs"]
    dense = probs.new_zeros(length, probs.shape[-1])
    dense[loss] = probs
    supervised = torch.zeros(length, dtype=torch.bool)
    supervised[loss] = t2d[raw["target_argmax"].long()]
    return {
        "input_ids": _shift(raw["input_ids"].long()),
        "attention_mask": torch.ones(length, dtype=torch.long),
        "loss_mask": _shift(loss.long()),
        "aux_hidden_states": raw["aux_hidden_states"],
        "target_probs": _shift(dense),
        "position_mask": _shift(supervised).unsqueeze(-1),
    }


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
    """Iterable: a streaming `datasets.IterableDataset` whose rows decode as they arrive."""

    def __init__(self, hf_dataset, transform):
        self.hf_dataset, self.transform = hf_dataset, transform

    def __iter__(self):
        for row in self.hf_dataset:
            yield self.transform(row)


def load_cache(location: str | Path, *, split: str = "train", streaming: bool = True, layout: str = "nemo", columns: list[str] | None = None):
    """A torch dataset over a cache directory.

    `layout="raw"`: the stored, unshifted fields as tensors in the stored dtype.
    `layout="nemo"`: `input_ids`, `attention_mask`, `loss_mask`, `aux_hidden_states`,
    `target_probs`, `position_mask` as NeMo Automodel's EAGLE-3 trainer consumes them;
    batch with `collate_nemo`.
    """
    import datasets

    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    manifest = read_manifest(location)
    decode = RowDecoder(manifest)
    hf = datasets.load_dataset(str(location), split=split, streaming=streaming)
    if layout == "nemo":
        t2d = torch.zeros(manifest["target_vocab_size"], dtype=torch.bool)
        t2d[read_vocab(location)["selected_token_ids"]] = True
        hf = hf.select_columns(["input_ids", "loss_mask", "aux_hidden_states", "target_probs", "target_argmax"])

        def transform(row):
            return to_nemo(decode(row), t2d)

    else:
        if columns is not None:
            hf = hf.select_columns(columns)
        transform = decode
    wrapper = StreamingCacheDataset if streaming else CacheDataset
    dataset = wrapper(hf, transform)
    dataset.manifest = manifest
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
