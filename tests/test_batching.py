"""Which samples share a forward batch: sort windows and token-budget batches."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from builder.batching import expected_rows, plan_batches, row_windows, window_bytes
from builder.config import BuildConfig
from builder.formats import Layout

# An 8B-like target (hidden 4096, three aux layers) storing dense probs over a 32,000-token draft vocab.
LAYOUT_8B = Layout("probs", "bf16", "bf16", 64, 32000, 3 * 4096, 4096)


def chat_like_rows(count: int) -> list[dict]:
    lengths = np.clip(np.random.default_rng(0).lognormal(6.3, 0.8, count).astype(int), 16, 2048)
    return [{"num_tokens": int(n), "num_loss_tokens": int(0.77 * n)} for n in lengths]


def padding(rows: list[dict], window: int, max_tokens: int, batch_size: int) -> float:
    """The share of forward tokens spent on padding when the build batches `rows`."""
    per_token, per_loss = LAYOUT_8B.bytes_per_position()
    padded = 0
    for rows_of_window in row_windows(rows, per_token, per_loss, window):
        lengths = [r["num_tokens"] for r in rows_of_window]
        padded += sum(len(b) * max(lengths[i] for i in b) for b in plan_batches(lengths, max_tokens, batch_size))
    return 1 - sum(r["num_tokens"] for r in rows) / padded


def default(name: str):
    return next(f.default for f in dataclasses.fields(BuildConfig) if f.name == name)


def test_a_window_holds_the_rows_whose_bytes_fit_it_in_order():
    rows = [{"num_tokens": n, "num_loss_tokens": 0, "i": i} for i, n in enumerate([5, 5, 5, 20, 1, 1])]
    windows = [[r["i"] for r in w] for w in row_windows(rows, 2, 100, 20)]
    assert windows == [[0, 1], [2], [3], [4, 5]]  # a row bigger than a window gets one of its own


def test_the_default_sort_window_pads_little_where_rows_are_big():
    """Rows of 8B-like dense probs run to tens of MB: four 128 MiB row groups held about 13 of them,
    so a token-budget batch mixed short and long samples and half its compute was padding."""
    rows = chat_like_rows(1000)
    batch_size, seq_length = default("batch_size"), 2048
    legacy = padding(rows, window_bytes({"row_group_bytes": default("row_group_bytes")}), batch_size * seq_length, batch_size)
    now = padding(rows, default("sort_window_bytes"), batch_size * seq_length, batch_size)
    assert legacy > 0.4 and now < 0.15, (legacy, now)


@pytest.mark.parametrize(
    ("record", "window"),
    [
        ({"row_group_bytes": 8 << 20}, 32 << 20),  # recorded before the sort window had a setting of its own
        ({"row_group_bytes": 8 << 20, "sort_window_bytes": 1 << 30}, 1 << 30),
    ],
)
def test_a_shards_record_names_its_sort_window(record, window):
    assert window_bytes(record) == window


def test_batches_run_longest_first_and_fill_the_token_budget_exactly():
    """Lengths 10, 10, 5, 4, 3, 2 (ties in position order): two rows of 10 fill 20 tokens exactly,
    a third would need 30; then four rows of at most 5 fill 20 again."""
    assert plan_batches([3, 10, 4, 10, 2, 5], 20) == [[1, 3], [5, 2, 0, 4]]


def test_a_new_batch_is_as_wide_as_its_own_longest_row():
    """After the 8-token row, the next batch is 2 tokens wide: four rows fit 8 tokens."""
    assert plan_batches([8, 2, 2, 2, 2], 8) == [[0], [1, 2, 3, 4]]


def test_a_batch_holds_at_most_the_batch_size_rows_whatever_the_budget():
    assert plan_batches([1] * 7, 100, max_batch_size=3) == [[0, 1, 2], [3, 4, 5], [6]]


def test_each_shard_expects_its_own_share_of_the_samples_and_the_last_the_rest():
    prep = SimpleNamespace(cfg=SimpleNamespace(shard_size=4), samples=[None] * 10)
    assert [expected_rows(prep, k) for k in range(3)] == [4, 4, 2]
