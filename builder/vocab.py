"""Draft vocabulary from token ids alone (no model weights), per docs/supervision.md.

Order: the tokenizer's valid special ids (bos, eos, pad, unk; deduplicated; pad id 0 when the
tokenizer has none, as NeMo Automodel loads it), then the other tokens by descending count over
loss-masked tokens (ties: lower id first), then unseen ids ascending. A draft size >= V, or none,
is the identity.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import torch

from .errors import InputError


def count_loss_tokens(samples, vocab_size: int) -> np.ndarray:
    """Counts `[V]` of every loss-masked token over the (valid) tokenized samples. Every token id,
    supervised or not, is checked against the vocabulary on the way: an id past the embedding table
    would stop the forward after the weights load, maybe after shards were written."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    table = samples.with_format("arrow")
    for batch in table.iter(batch_size=4096):
        ids = pc.list_flatten(batch["input_ids"]).to_numpy(zero_copy_only=False)
        check_in_vocabulary(batch, ids, vocab_size)
        mask = pc.list_flatten(batch["loss_mask"]).to_numpy(zero_copy_only=False).astype(bool)
        counts += np.bincount(ids[mask], minlength=vocab_size)
    return counts


def check_in_vocabulary(batch, ids: np.ndarray, vocab_size: int) -> None:
    """Refuse (InputError) the first sample of `batch` holding an id outside 0..vocab_size-1; `ids`:
    its flattened `input_ids`."""
    outside = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if not len(outside):
        return
    first = int(outside[0])
    row = int(pc.list_parent_indices(batch["input_ids"]).to_numpy()[first])
    source_index, sample_id = batch["source_index"][row].as_py(), batch["sample_id"][row].as_py()
    raise InputError(
        f"--target-model: input row {source_index} (id {sample_id!r}) holds token id {int(ids[first])}, outside the target's "
        f"vocabulary of {vocab_size} (vocab_size in its config.json; expected ids 0..{vocab_size - 1}): the tokenizer does "
        "not match the target model (tokens added to the tokenizer without resizing the model's embeddings, or another "
        "model's tokenizer). Use the tokenizer files of the model the config and weights come from, or resize the model's "
        "embeddings to the tokenizer and save it"
    )


# NeMo Automodel loads a tokenizer that defines no pad token with pad id 0, and its draft vocabulary
# then forces id 0 in as the pad special: this one does the same, to select what NeMo selects.
PAD_ID_WITHOUT_PAD_TOKEN = 0


def special_token_ids(tokenizer, vocab_size: int) -> list[int]:
    """The ids the draft vocabulary starts with: bos, eos, pad, unk in that order, pad id 0 where the
    tokenizer has no pad token; ids outside 0..vocab_size-1 (or none) left out, each id once."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else PAD_ID_WITHOUT_PAD_TOKEN
    return valid_unique_ids((tokenizer.bos_token_id, tokenizer.eos_token_id, pad, tokenizer.unk_token_id), vocab_size)


def earlier_special_token_ids(tokenizer, vocab_size: int) -> list[int]:
    """The special ids caches built by earlier versions started with: no pad id where the tokenizer
    has no pad token. Their draft vocabulary and recorded `special_token_ids` follow this rule."""
    return valid_unique_ids((tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id), vocab_size)


def valid_unique_ids(token_ids, vocab_size: int) -> list[int]:
    ids = []
    for token_id in token_ids:
        if isinstance(token_id, int) and 0 <= token_id < vocab_size and token_id not in ids:
            ids.append(token_id)
    return ids


def select_draft_vocab(counts: np.ndarray, draft_vocab_size: int | None, specials: list[int]) -> np.ndarray:
    """`selected_token_ids` (int64 `[Vd]`)."""
    vocab_size = len(counts)
    if draft_vocab_size is None or draft_vocab_size >= vocab_size:
        return np.arange(vocab_size, dtype=np.int64)
    rest = np.ones(vocab_size, dtype=bool)
    rest[specials] = False
    candidates = np.flatnonzero(rest)
    # Stable sort on -count keeps ascending id order among ties and among unseen ids.
    ranked = candidates[np.argsort(-counts[candidates], kind="stable")]
    order = np.concatenate([np.asarray(specials, dtype=np.int64), ranked])
    return order[:draft_vocab_size].astype(np.int64)


def vocab_coverage(counts: np.ndarray, selected: np.ndarray) -> float:
    """Share of loss-masked tokens whose id is in the draft vocabulary."""
    total = counts.sum()
    return float(counts[selected].sum() / total) if total else 0.0


def d2t_t2d(selected: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """EAGLE-3's mapping tensors: `d2t[i] = selected[i] - i`, `t2d` a bool mask `[V]`."""
    t2d = np.zeros(vocab_size, dtype=bool)
    t2d[selected] = True
    return selected - np.arange(len(selected)), t2d


def columns_in(stored: np.ndarray, wanted: np.ndarray) -> np.ndarray | None:
    """The column of each `wanted` id in the draft vocabulary `stored`, or None when one is missing."""
    stored, wanted = np.asarray(stored, dtype=np.int64), np.asarray(wanted, dtype=np.int64)
    if not len(wanted):
        return np.zeros(0, dtype=np.int64)
    position = np.full(int(max(stored.max(initial=-1), wanted.max())) + 1, -1, dtype=np.int64)
    position[stored] = np.arange(len(stored))
    columns = position[wanted]
    return None if (columns < 0).any() else columns


@dataclass(frozen=True)
class DraftVocab:
    """A draft vocabulary and EAGLE-3's mapping tensors in each trainer's column order.

    NeMo Automodel orders the draft columns as `selected_token_ids` (specials, then by count):
    `d2t[i] = selected_token_ids[i] - i`. SpecForge orders them by ascending token id (its
    target is `softmax(logits[..., t2d])`): `d2t[i] = sorted_ids[i] - i`, and its column `i`
    is NeMo's column `specforge_columns[i]`. `t2d` (bool `[V]`) is the same in both.
    """

    selected_token_ids: torch.Tensor  # int64 [Vd], NeMo's column order
    target_vocab_size: int

    def __len__(self) -> int:
        return len(self.selected_token_ids)

    @property
    def t2d(self) -> torch.Tensor:
        t2d = torch.zeros(self.target_vocab_size, dtype=torch.bool)
        t2d[self.selected_token_ids] = True
        return t2d

    @property
    def d2t(self) -> torch.Tensor:
        """NeMo's order: `selected_token_ids[i] - i`."""
        return self.selected_token_ids - torch.arange(len(self))

    @property
    def sorted_token_ids(self) -> torch.Tensor:
        return self.selected_token_ids.sort().values

    @property
    def specforge_d2t(self) -> torch.Tensor:
        """SpecForge's order: `sorted_ids[i] - i`."""
        return self.sorted_token_ids - torch.arange(len(self))

    @property
    def specforge_columns(self) -> torch.Tensor:
        """NeMo-ordered probs -> SpecForge-ordered probs: `probs[..., specforge_columns]`."""
        return self.selected_token_ids.argsort()

    def mapping(self, convention: str = "nemo") -> dict[str, torch.Tensor]:
        """`{"d2t": int64 [Vd], "t2d": bool [V]}` in `convention` ("nemo" or "specforge")."""
        if convention not in ("nemo", "specforge"):
            raise ValueError(f"convention: expected 'nemo' or 'specforge', got {convention!r}")
        return {"d2t": self.d2t if convention == "nemo" else self.specforge_d2t, "t2d": self.t2d}


def array_hash(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype="<i8").tobytes()).hexdigest()
