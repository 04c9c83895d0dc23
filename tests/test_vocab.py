"""Draft vocabulary (docs/supervision.md): specials first, counts descending with ties to the lower id,
unseen ids ascending; counts over loss-masked tokens of the whole input."""

import json
import shutil
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
from helpers import says

from builder.cli import main
from builder.config import BuildConfig
from builder.embedded import EMBEDDED_TARGETS
from builder.errors import InputError
from builder.prepare import prepare
from builder.tokenize import TOKENIZED_FEATURES
from builder.vocab import (
    array_hash,
    count_loss_tokens,
    d2t_t2d,
    earlier_special_token_ids,
    select_draft_vocab,
    special_token_ids,
    vocab_coverage,
)

# id:         0  1  2  3  4  5  6  7  8  9
COUNTS = np.array([5, 9, 3, 3, 0, 7, 1, 3, 0, 0])
SPECIALS = [4, 1]  # bos=4 (never seen), eos=1 (the most frequent id, yet placed by being special)
# By hand: specials 4, 1; then 5 (7), 0 (5), the tie 2, 3, 7 (3 each, lower id first), 6 (1);
# then the unseen 8, 9 ascending.
FULL_ORDER = [4, 1, 5, 0, 2, 3, 7, 6, 8, 9]


def tokenizer(bos=None, eos=None, pad=None, unk=None):
    return SimpleNamespace(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, unk_token_id=unk)


@pytest.mark.parametrize("size", range(1, 10))
def test_select_draft_vocab_hand_checked(size):
    selected = select_draft_vocab(COUNTS, size, SPECIALS)
    assert selected.dtype == np.int64
    assert selected.tolist() == FULL_ORDER[:size]


def test_select_draft_vocab_spelled_out():
    assert select_draft_vocab(COUNTS, 6, SPECIALS).tolist() == [4, 1, 5, 0, 2, 3]
    assert select_draft_vocab(COUNTS, 9, SPECIALS).tolist() == [4, 1, 5, 0, 2, 3, 7, 6, 8]
    assert select_draft_vocab(COUNTS, 4, []).tolist() == [1, 5, 0, 2]


@pytest.mark.parametrize("size", [None, 10, 11, 10_000])
def test_select_draft_vocab_identity(size):
    assert select_draft_vocab(COUNTS, size, SPECIALS).tolist() == list(range(10))


def test_all_ties_fall_back_to_id_order():
    assert select_draft_vocab(np.zeros(6, dtype=np.int64), 4, [5]).tolist() == [5, 0, 1, 2]
    assert select_draft_vocab(np.full(6, 2), 3, []).tolist() == [0, 1, 2]


def test_special_token_ids_order_dedup_and_validity():
    assert special_token_ids(tokenizer(bos=4, eos=1, pad=4, unk=None), 10) == [4, 1]
    assert special_token_ids(tokenizer(bos=0, eos=1, pad=2, unk=3), 10) == [0, 1, 2, 3]
    assert special_token_ids(tokenizer(bos=None, eos=7, pad=7, unk=7), 10) == [7]
    assert special_token_ids(tokenizer(bos=12, eos=3, pad=-1, unk=10), 10) == [3]  # out of range dropped


def test_a_tokenizer_without_a_pad_token_gets_pad_id_zero_as_nemo_loads_it():
    """NeMo Automodel loads such a tokenizer with pad id 0, which its draft vocabulary then forces in
    at pad's place; caches of earlier versions left it out (earlier_special_token_ids)."""
    assert special_token_ids(tokenizer(bos=3, eos=1, unk=5), 10) == [3, 1, 0, 5]
    assert earlier_special_token_ids(tokenizer(bos=3, eos=1, unk=5), 10) == [3, 1, 5]
    assert special_token_ids(tokenizer(bos=0, eos=1), 10) == [0, 1]  # id 0 already bos: once
    assert special_token_ids(tokenizer(eos=7, unk=0), 10) == [7, 0]
    assert special_token_ids(tokenizer(), 10) == [0]
    assert earlier_special_token_ids(tokenizer(), 10) == []
    assert select_draft_vocab(COUNTS, 5, special_token_ids(tokenizer(bos=4, eos=1), 10)).tolist() == [4, 1, 0, 5, 2]


def test_select_with_specials_from_a_tokenizer():
    specials = special_token_ids(tokenizer(bos=4, eos=1, pad=1, unk=99), 10)
    assert select_draft_vocab(COUNTS, 5, specials).tolist() == [4, 1, 5, 0, 2]


def test_d2t_t2d():
    selected = select_draft_vocab(COUNTS, 5, SPECIALS)
    d2t, t2d = d2t_t2d(selected, 10)
    assert d2t.tolist() == [4, 0, 3, -3, -2]
    assert (d2t + np.arange(5)).tolist() == selected.tolist()
    assert t2d.dtype == bool
    assert t2d.tolist() == [True, True, True, False, True, True, False, False, False, False]
    d2t, t2d = d2t_t2d(np.arange(10), 10)
    assert not d2t.any() and t2d.all()


def test_vocab_coverage():
    assert vocab_coverage(COUNTS, select_draft_vocab(COUNTS, 5, SPECIALS)) == pytest.approx((0 + 9 + 7 + 5 + 3) / 31)
    assert vocab_coverage(COUNTS, np.arange(10)) == 1.0
    assert vocab_coverage(np.zeros(10, dtype=np.int64), np.arange(3)) == 0.0


def test_array_hash_depends_on_order_not_dtype():
    a = np.array([4, 1, 5])
    assert array_hash(a) == array_hash(a.astype(np.int32))
    assert array_hash(a) != array_hash(a[::-1])


# ---- counting ------------------------------------------------------------------------------


def samples(ids, masks):
    n = len(ids)
    return datasets.Dataset.from_dict(
        {
            "sample_id": [str(i) for i in range(n)],
            "source_index": list(range(n)),
            "input_ids": ids,
            "loss_mask": masks,
            "num_tokens": [len(x) for x in ids],
            "num_loss_tokens": [sum(m) for m in masks],
            "skip_reason": [""] * n,
            "skip_detail": [""] * n,
        },
        features=TOKENIZED_FEATURES,
    )


def test_count_loss_tokens_counts_only_masked_tokens():
    ds = samples([[1, 2, 3, 2], [2, 5], [7, 7, 7]], [[0, 1, 1, 1], [1, 0], [0, 0, 0]])
    assert count_loss_tokens(ds, 8).tolist() == [0, 0, 3, 1, 0, 0, 0, 0]


def test_count_loss_tokens_on_a_selection_and_across_batches():
    ds = samples([[1, 2], [3, 4], [5, 6]] * 2000, [[1, 1], [0, 1], [1, 0]] * 2000)  # 6000 rows > one 4096-row batch
    assert count_loss_tokens(ds, 8).tolist() == [0, 2000, 2000, 0, 2000, 2000, 0, 0]
    picked = ds.select([2, 0, 3])  # an indices mapping: rows [5, 6]+[1, 0], [1, 2]+[1, 1] twice
    assert count_loss_tokens(picked, 8).tolist() == [0, 2, 2, 0, 0, 1, 0, 0]
    assert count_loss_tokens(ds.select([]), 8).tolist() == [0] * 8


@pytest.mark.parametrize("supervised", [True, False], ids=["loss_masked", "unmasked"])
def test_count_loss_tokens_rejects_ids_outside_the_vocab_and_names_the_sample(supervised):
    """An id past the table stops the forward whether or not its turn is supervised."""
    ids, masks = [[1, 2], [3, 4], [5, 6]] * 2000, [[1, 1], [0, 1], [1, 0]] * 2000
    ids[5000], masks[5000] = [3, 9, 12], [0, int(supervised), 1]  # in the second 4096-row batch; 12 is not the first
    with pytest.raises(
        InputError,
        match=says(
            "--target-model",
            "input row 5000 (id '5000')",
            "token id 9",
            "vocabulary of 8",
            "ids 0..7",
            "tokenizer does not match",
            "resize",
        ),
    ):
        count_loss_tokens(samples(ids, masks), 8)
    with pytest.raises(InputError, match=says("input row 5000 (id '5000')", "token id 9")):
        count_loss_tokens(samples(ids, masks).select([4, 5000, 1]), 8)


# ---- through prepare(): the whole input, not a shard ------------------------------------------


def hand_count(prep):
    counts = np.zeros(prep.vocab_size, dtype=np.int64)
    for row in prep.samples:
        for token, m in zip(row["input_ids"], row["loss_mask"]):
            counts[token] += m
    return counts


def test_draft_vocab_counts_use_the_whole_input(tmp_path):
    common = dict(target_model="tiny-llama", input_data="sample-chats", output_dir=str(tmp_path / "out"), draft_vocab_size=64)
    small = prepare(BuildConfig(shard_size=7, **common))
    assert len(small.samples) == 300 and small.num_shards == 43
    counts = hand_count(small)
    assert small.token_counts.tolist() == counts.tolist()
    assert small.token_counts.sum() == sum(small.samples["num_loss_tokens"])

    # The contract by hand: bos, eos, pad, unk (ids 0..3), then by count, ties to the lower id.
    assert special_token_ids(small.tokenizer, small.vocab_size) == [0, 1, 2, 3]
    rest = sorted(range(4, small.vocab_size), key=lambda i: (-counts[i], i))
    assert small.selected_token_ids.tolist() == [0, 1, 2, 3] + rest[:60]

    large = prepare(BuildConfig(shard_size=1000, **common))
    assert large.token_counts.tolist() == small.token_counts.tolist()
    assert large.selected_token_ids.tolist() == small.selected_token_ids.tolist()


def test_draft_vocab_follows_max_samples(tmp_path):
    prep = prepare(BuildConfig(target_model="tiny-llama", input_data="sample-chats", output_dir=str(tmp_path / "out"), max_samples=20))
    assert len(prep.samples) == 20
    assert prep.token_counts.tolist() == hand_count(prep).tolist()
    assert prep.selected_token_ids.tolist() == list(range(prep.vocab_size))  # no size: the identity


def test_cli_refuses_a_tokenizer_beyond_the_config_vocab(tmp_path, capsys):
    # The embedded target's tokenizer with a config whose vocab_size is too small for it.
    target = tmp_path / "small-vocab"
    shutil.copytree(EMBEDDED_TARGETS["tiny-llama"], target, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((target / "config.json").read_text())
    config["vocab_size"] = 40
    (target / "config.json").write_text(json.dumps(config))
    args = ["build", "--dry-run", "--target-model", str(target), "--input-data", "sample-chats", "--max-samples", "3", "--quiet"]
    assert main([*args, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --target-model: input row ") and "Traceback" not in err
    assert "outside the target's vocabulary of 40 (vocab_size in its config.json; expected ids 0..39)" in err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_token_the_tokenizer_added_in_an_unsupervised_turn_before_the_weights_load(tmp_path, capsys, monkeypatch):
    """A special token added to the tokenizer without resizing the model, in a user turn only: no loss
    token is past the vocabulary, yet the forward would index past the embedding table."""
    from transformers import AutoTokenizer

    import builder.placement as placement_mod
    import builder.target as target_mod

    target = shutil.copytree(EMBEDDED_TARGETS["tiny-llama"], tmp_path / "target")
    tokenizer = AutoTokenizer.from_pretrained(target)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    tokenizer.save_pretrained(target)
    extra = tokenizer.convert_tokens_to_ids("<extra>")
    assert extra == json.loads((target / "config.json").read_text())["vocab_size"]
    chats = tmp_path / "chats.jsonl"
    rows = [("fine", "hi there"), ("extra", "hi <extra> there")]
    chats.write_text(
        "".join(
            json.dumps({"id": i, "conversations": [{"from": "human", "value": v}, {"from": "gpt", "value": "hello"}]}) + "\n"
            for i, v in rows
        )
    )
    for module in (target_mod, placement_mod):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("model weights loaded"))
    args = ["build", "--target-model", str(target), "--input-data", str(chats), "--quiet", "--output-dir", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: --target-model: input row 1 (id 'extra') holds token id {extra}, outside the target's vocabulary of {extra} "
    )
    assert "Traceback" not in err and "resize the model's embeddings" in err
    assert not (tmp_path / "out").exists()
