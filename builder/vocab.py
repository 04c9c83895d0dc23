"""Draft vocabulary from token ids alone (no model weights), per DESIGN §2.

Order: the tokenizer's valid special ids (bos, eos, pad, unk; deduplicated), then the other
tokens by descending count over loss-masked tokens (ties: lower id first), then unseen ids
ascending. A draft size >= V, or none, is the identity.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def count_loss_tokens(samples, vocab_size: int) -> np.ndarray:
    """Counts `[V]` of every loss-masked token over the (valid) tokenized samples."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    table = samples.with_format("arrow")
    for batch in table.iter(batch_size=4096):
        ids = pc.list_flatten(batch["input_ids"]).to_numpy(zero_copy_only=False)
        mask = pc.list_flatten(batch["loss_mask"]).to_numpy(zero_copy_only=False).astype(bool)
        masked = ids[mask]
        if masked.size and masked.max() >= vocab_size:
            raise ValueError(
                f"token id {int(masked.max())} is outside the target's vocabulary of {vocab_size}; "
                "the tokenizer does not match the target model"
            )
        counts += np.bincount(masked, minlength=vocab_size)
    return counts


def special_token_ids(tokenizer, vocab_size: int) -> list[int]:
    ids = []
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id):
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


def array_hash(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype="<i8").tobytes()).hexdigest()
