"""A smaller draft vocabulary at read time, and the NeMo-layout decode and batching.

`probs` caches serve any smaller draft vocabulary exactly (the draft vocabulary is ranked by
count, so a smaller one is a prefix; supervision restricted and renormalised is the softmax
over the smaller vocabulary): compared here with real fresh builds of the same samples.
`topk` caches drop the kept columns outside it and report the mass that survives.
The decode and collate write every field once; they must equal the plain definition
(shift by concatenation, pad by concatenation) bit for bit.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import says, small_config
from safetensors.torch import load_file, save_file
from tiny_targets import target_without_pad_token

import builder.prepare as prepare_module
from builder.embedded import NO_GENERATION_TEMPLATE
from builder.export import export_cache
from builder.pipeline import build
from builder.reader import (
    collate_nemo,
    draft_vocab,
    load_cache,
    read_draft_vocab,
    read_manifest,
    read_vocab,
    restrict_probs,
    to_nemo,
)
from builder.verify import verify_cache
from builder.vocab import d2t_t2d, earlier_special_token_ids, select_draft_vocab

SMALL = 100


def build_cache(tmp_path_factory, name, **overrides):
    return build(small_config(tmp_path_factory.mktemp(name) / "cache", **overrides), progress=False)


@pytest.fixture(scope="module")
def probs300(tmp_path_factory):
    return build_cache(tmp_path_factory, "probs300")  # fp32, Vd 300


@pytest.fixture(scope="module")
def fresh100(tmp_path_factory):
    return build_cache(tmp_path_factory, "probs100", draft_vocab_size=SMALL)


@pytest.fixture(scope="module")
def topk300(tmp_path_factory):
    return build_cache(tmp_path_factory, "topk300", target_format="topk", topk=16)


def stored_selected(result) -> torch.Tensor:
    return read_vocab(result.output_dir)["selected_token_ids"]


# ---- probs: exact ------------------------------------------------------------------------------


def test_a_smaller_vocab_is_a_prefix_of_the_stored_one(probs300, fresh100):
    vocab = read_vocab(probs300.output_dir)
    manifest = probs300.manifest
    wanted = select_draft_vocab(vocab["token_counts"].numpy(), SMALL, manifest["special_token_ids"])
    assert torch.equal(torch.as_tensor(wanted), vocab["selected_token_ids"][:SMALL])
    assert torch.equal(stored_selected(fresh100), vocab["selected_token_ids"][:SMALL])


def test_probs_cache_reads_a_smaller_vocab_like_a_fresh_build(probs300, fresh100):
    got = load_cache(probs300.output_dir, streaming=False, draft_vocab_size=SMALL)
    want = load_cache(fresh100.output_dir, streaming=False)
    assert len(got) == len(want) == 14
    supervised = worst = 0
    for i in range(len(want)):
        g, w = got[i], want[i]
        assert set(g) == set(w)
        assert g["target_probs"].shape == w["target_probs"].shape == (g["input_ids"].shape[0], SMALL)
        assert g["target_probs"].dtype == torch.float32
        for key in ("input_ids", "attention_mask", "loss_mask", "aux_hidden_states", "position_mask"):
            assert torch.equal(g[key], w[key]), key
        mask = w["position_mask"].squeeze(-1)
        supervised += int(mask.sum())
        worst = max([worst, *(g["target_probs"][mask] - w["target_probs"][mask]).abs().flatten().tolist()])
        assert not g["target_probs"][w["loss_mask"] == 0].any()  # no supervision off the loss mask
    assert supervised >= 50  # a random-weight target's argmax is often outside a 100-token vocabulary
    assert worst <= 1e-6


def test_position_mask_follows_the_vocab_read(probs300):
    full = load_cache(probs300.output_dir, streaming=False)
    small = load_cache(probs300.output_dir, streaming=False, draft_vocab_size=SMALL)
    raw = load_cache(probs300.output_dir, layout="raw", streaming=False)
    in_small = torch.zeros(probs300.manifest["target_vocab_size"], dtype=torch.bool)
    in_small[stored_selected(probs300)[:SMALL]] = True
    fewer = 0
    for i in range(len(raw)):
        r = raw[i]
        loss = r["loss_mask"].bool()
        expected = torch.zeros(len(loss), dtype=torch.bool)
        expected[loss] = in_small[r["target_argmax"].long()]  # from the stored full-vocab argmax
        assert torch.equal(small[i]["position_mask"].squeeze(-1), torch.cat([expected[1:], torch.zeros(1, dtype=torch.bool)]))
        fewer += int(full[i]["position_mask"].sum() - small[i]["position_mask"].sum())
    assert fewer > 0  # some argmaxes left the smaller vocabulary


def test_vocab_tensors_follow_the_vocab_read(probs300, fresh100):
    fresh = stored_selected(fresh100)
    size = probs300.manifest["target_vocab_size"]
    for vocab in (draft_vocab(load_cache(probs300.output_dir, draft_vocab_size=SMALL)), read_draft_vocab(probs300.output_dir, SMALL)):
        assert torch.equal(vocab.selected_token_ids, fresh) and len(vocab) == SMALL
        d2t, t2d = d2t_t2d(fresh.numpy(), size)
        assert torch.equal(vocab.d2t, torch.as_tensor(d2t)) and torch.equal(vocab.t2d, torch.as_tensor(t2d))
        nemo, specforge = vocab.mapping("nemo"), vocab.mapping("specforge")
        assert torch.equal(nemo["d2t"], vocab.d2t) and torch.equal(specforge["t2d"], vocab.t2d)
        ascending = fresh.sort().values
        assert torch.equal(specforge["d2t"], ascending - torch.arange(SMALL))
        assert torch.equal(fresh[vocab.specforge_columns], ascending)  # NeMo column -> SpecForge column
    stored = draft_vocab(load_cache(probs300.output_dir, layout="raw"))
    assert torch.equal(stored.selected_token_ids, stored_selected(probs300))
    with pytest.raises(ValueError, match="convention: expected 'nemo' or 'specforge', got 'eagle'"):
        stored.mapping("eagle")


def test_an_identity_bf16_vocab_serves_a_smaller_one_by_its_counts(tmp_path_factory, fresh100):
    """Vd >= V stores the identity (id order, not a ranking): the smaller vocabulary is then a
    subset, picked by the stored counts. bf16: exact up to the cache dtype's rounding."""
    whole = build_cache(tmp_path_factory, "whole", draft_vocab_size=None, dtype="bf16")
    assert torch.equal(stored_selected(whole), torch.arange(whole.manifest["target_vocab_size"]))
    got = load_cache(whole.output_dir, streaming=False, draft_vocab_size=SMALL)
    want = load_cache(fresh100.output_dir, streaming=False)  # fp32
    assert torch.equal(draft_vocab(got).selected_token_ids, stored_selected(fresh100))
    for i in range(len(want)):
        assert got[i]["target_probs"].dtype == torch.bfloat16
        assert torch.equal(got[i]["position_mask"], want[i]["position_mask"])
        mask = want[i]["position_mask"].squeeze(-1)
        # bf16 rounds by at most 2^-8 relative: the stored value, the sum it is divided by (at most), the result
        torch.testing.assert_close(got[i]["target_probs"][mask].float(), want[i]["target_probs"][mask], rtol=3 * 2**-8, atol=1e-6)


def test_a_column_order_that_ends_at_the_last_column_is_no_prefix():
    """The columns of a vocabulary read from a whole-vocabulary cache come in rank order, not id order:
    a permutation of the first columns, though it ends at the last of them, is read column by column."""
    rows = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    got = restrict_probs(rows, torch.tensor([1, 0, 2]))
    torch.testing.assert_close(got, torch.tensor([[2 / 6, 1 / 6, 3 / 6]]), rtol=1e-6, atol=0)


def test_the_stored_size_reads_exactly_as_stored(probs300):
    default = load_cache(probs300.output_dir, streaming=False)
    same = load_cache(probs300.output_dir, streaming=False, draft_vocab_size=300)
    for i in (0, 7, 13):
        for key in default[i]:
            assert torch.equal(default[i][key], same[i][key]), key


def test_dataloader_workers_read_a_smaller_vocab(probs300):
    loader = torch.utils.data.DataLoader(
        load_cache(probs300.output_dir, draft_vocab_size=SMALL), batch_size=4, collate_fn=collate_nemo, num_workers=2
    )
    batches = list(loader)
    assert sum(b["input_ids"].shape[0] for b in batches) == 14
    assert {b["target_probs"].shape[-1] for b in batches} == {SMALL}


# ---- topk: what the kept ids allow -------------------------------------------------------------


def test_topk_cache_drops_columns_outside_and_reports_kept_mass(topk300, fresh100):
    raw = load_cache(topk300.output_dir, layout="raw", streaming=False)
    got = load_cache(topk300.output_dir, streaming=False, draft_vocab_size=SMALL)
    fresh = load_cache(fresh100.output_dir, streaming=False)
    dropped_some = False
    for i in range(len(raw)):
        r, g, w = raw[i], got[i], fresh[i]
        assert torch.equal(g["position_mask"], w["position_mask"])
        loss = r["loss_mask"].bool()
        slots = loss.nonzero().squeeze(-1) - 1  # no loss mask at position 0 in these samples
        assert slots.min() >= 0
        kept = r["topk_logprobs"].float().exp()
        inside = r["topk_ids"].long() < SMALL  # the smaller vocabulary is the first SMALL columns
        dropped_some |= bool((~inside).any())
        # renormalised over the surviving columns: the fresh build's probs renormalised over the same columns
        live = w["target_probs"][slots]
        survivors = torch.zeros_like(live, dtype=torch.bool)
        for row, (ids, keep) in enumerate(zip(r["topk_ids"].long(), inside)):
            survivors[row, ids[keep]] = True
        want = torch.where(survivors, live, torch.zeros_like(live))
        want = want / want.sum(-1, keepdim=True).clamp(min=1e-30)
        torch.testing.assert_close(g["target_probs"][slots], want, rtol=0, atol=2e-6)
        assert not g["target_probs"][slots][~survivors].any()
        # kept mass: surviving mass over (1 - dropped mass), a lower bound on the new vocabulary's share
        surviving = (kept * inside).sum(-1)
        expected = surviving / (1 - (kept * ~inside).sum(-1))
        torch.testing.assert_close(g["kept_mass"][slots], expected, rtol=1e-6, atol=0)
        true_share = (live * survivors).sum(-1)
        assert (g["kept_mass"][slots] <= true_share + 1e-6).all()
        off = torch.ones(len(g["kept_mass"]), dtype=torch.bool)
        off[slots] = False
        assert not g["kept_mass"][off].any()
    assert dropped_some


def test_topk_spread_tail_over_a_smaller_vocab(topk300):
    raw = load_cache(topk300.output_dir, layout="raw", streaming=False)
    got = load_cache(topk300.output_dir, streaming=False, draft_vocab_size=SMALL, spread_tail=True)
    for i in (0, 5, 13):
        r, g = raw[i], got[i]
        slots = r["loss_mask"].bool().nonzero().squeeze(-1) - 1
        rows = g["target_probs"][slots]
        torch.testing.assert_close(rows.sum(-1), torch.ones(len(rows)), rtol=0, atol=1e-5)
        kept = r["topk_logprobs"].float().exp()
        inside = r["topk_ids"].long() < SMALL
        scale = 1 - (kept * ~inside).sum(-1, keepdim=True)
        for row in range(len(rows)):
            ids = r["topk_ids"][row].long()[inside[row]]
            torch.testing.assert_close(rows[row, ids], kept[row][inside[row]] / scale[row], rtol=1e-6, atol=0)


def test_an_identity_topk_vocab_serves_a_smaller_one_at_its_token_ids(tmp_path_factory, fresh100):
    """A whole-vocabulary top-K cache keeps token ids: read at a smaller vocabulary (ranked by count, not
    in id order), each kept id lands in its own column there, renormalised over the kept ids that
    vocabulary holds, as the fresh build's probs are over the same ids."""
    whole = build_cache(tmp_path_factory, "whole-topk", draft_vocab_size=None, target_format="topk", topk=16)
    raw = load_cache(whole.output_dir, layout="raw", streaming=False)
    got = load_cache(whole.output_dir, streaming=False, draft_vocab_size=SMALL)
    fresh = load_cache(fresh100.output_dir, streaming=False)
    selected = stored_selected(fresh100)
    assert torch.equal(draft_vocab(got).selected_token_ids, selected)
    surviving = 0
    for i in range(len(raw)):
        r = raw[i]
        slots = r["loss_mask"].bool().nonzero().squeeze(-1) - 1  # no loss mask at position 0 in these samples
        survivors = torch.stack([torch.isin(selected, ids) for ids in r["topk_ids"].long()])
        want = torch.where(survivors, fresh[i]["target_probs"][slots], torch.zeros(()))
        want = want / want.sum(-1, keepdim=True).clamp(min=1e-30)
        torch.testing.assert_close(got[i]["target_probs"][slots], want, rtol=0, atol=2e-6)
        surviving += int(survivors.sum())
    assert surviving > 0


# Only the assistant turns, each in a generation block: the loss mask starts at position 0.
ASSISTANT_TURNS_ONLY = (
    "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|end|>{% endgeneration %}{% endif %}{% endfor %}"
)


def test_topk_kept_mass_of_a_sample_supervised_from_position_0_lands_in_its_rows_slots(tmp_path_factory):
    """Position 0 has no slot (slot t carries position t + 1), so its row is dropped: every other row's
    kept mass lands in that row's slot, as its target_probs do."""
    template = tmp_path_factory.mktemp("template") / "assistant_turns.jinja"
    template.write_text(ASSISTANT_TURNS_ONLY)
    result = build_cache(tmp_path_factory, "from-position-0", target_format="topk", topk=16, max_samples=4, chat_template=str(template))
    raw = load_cache(result.output_dir, layout="raw", streaming=False)
    got = load_cache(result.output_dir, streaming=False, draft_vocab_size=SMALL)
    for i in range(len(raw)):
        r, g = raw[i], got[i]
        positions = r["loss_mask"].bool().nonzero().squeeze(-1)
        assert positions[0] == 0  # the premise
        kept, inside = r["topk_logprobs"].float().exp()[1:], r["topk_ids"].long()[1:] < SMALL
        expected = (kept * inside).sum(-1) / (1 - (kept * ~inside).sum(-1))
        assert (expected[1:] != expected[:-1]).any()  # rows a slot off would show
        torch.testing.assert_close(g["kept_mass"][positions[1:] - 1], expected, rtol=1e-6, atol=0)
        off = torch.ones(len(g["kept_mass"]), dtype=torch.bool)
        off[positions[1:] - 1] = False
        assert not g["kept_mass"][off].any()


def test_topk_at_its_own_size_has_no_kept_mass_field(topk300):
    assert "kept_mass" not in load_cache(topk300.output_dir, streaming=False)[0]


# ---- a cache an earlier version built for a tokenizer without a pad token ----------------------


@pytest.fixture(scope="module")
def earlier_padless(tmp_path_factory):
    """Built the way earlier versions built it: no pad id 0 among the special ids, in its draft
    vocabulary and in the card's `special_token_ids`. With another chat template, so the checks of
    the target compare those special ids (the tokenizer's hash covers the template it renders)."""
    root = tmp_path_factory.mktemp("earlier-padless")
    target = target_without_pad_token(root / "target")
    cfg = small_config(root / "cache", target=target, max_samples=6, chat_template=str(NO_GENERATION_TEMPLATE))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare_module, "special_token_ids", earlier_special_token_ids)
        return root, build(cfg, progress=False).output_dir


def test_a_cache_built_without_pad_id_zero_reads_verifies_and_exports_with_its_recorded_specials(earlier_padless):
    root, cache = earlier_padless
    stored = read_vocab(cache)["selected_token_ids"]
    assert read_manifest(cache)["special_token_ids"] == [3, 1] and stored[:2].tolist() == [3, 1] and int(stored[2]) != 0
    # a smaller vocabulary is ranked by the specials it recorded: a prefix of its own
    assert torch.equal(read_draft_vocab(cache, SMALL).selected_token_ids, stored[:SMALL])
    assert verify_cache(cache, recompute=2) == []  # the live recompute checks the target first
    export = export_cache(cache, "nemo", root / "nemo", progress=False)
    assert json.loads((export / "manifest.json").read_text())["selected_token_ids"] == stored.tolist()


# ---- refusals ----------------------------------------------------------------------------------


def test_a_larger_vocab_is_refused_clearly(probs300, topk300):
    with pytest.raises(
        ValueError,
        match=says("asked for 400", "probs cache", "300-token draft vocabulary", "draft_vocab_size <= 300", "--draft-vocab-size 400"),
    ):
        load_cache(probs300.output_dir, draft_vocab_size=400)
    with pytest.raises(ValueError, match=says("301", "topk cache", "300-token draft vocabulary")):
        read_draft_vocab(topk300.output_dir, 301)
    with pytest.raises(ValueError, match=says("draft_vocab_size", "positive int", "300", "got 0")):
        load_cache(probs300.output_dir, draft_vocab_size=0)


def test_a_vocab_not_ranked_by_its_counts_is_refused(probs300, tmp_path):
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(probs300.output_dir, copy)
    vocab_file = copy / "vocab" / "vocab.safetensors"
    vocab = load_file(str(vocab_file))
    counts = vocab["token_counts"].clone()
    outside = torch.ones(len(counts), dtype=torch.bool)
    outside[vocab["selected_token_ids"]] = False
    outsider = int(outside.nonzero()[0])  # an id the stored vocabulary left out ...
    counts[outsider] = counts.max() + 1  # ... now ranked first among the non-special ids
    save_file({"selected_token_ids": vocab["selected_token_ids"], "token_counts": counts}, str(vocab_file))
    with pytest.raises(
        ValueError,
        match=says("100-token vocabulary", "not within its stored 300-token draft vocabulary", "--draft-vocab-size 100"),
    ):
        load_cache(copy, draft_vocab_size=SMALL)


# ---- the decode and collate are the plain definition, bit for bit ---------------------------


def reference_shift(tensor):
    return torch.cat([tensor[1:], tensor.new_zeros((1, *tensor.shape[1:]))])


def reference_to_nemo(raw, t2d, probs_rows=None, aux=None):
    length = raw["input_ids"].numel()
    loss = raw["loss_mask"].bool()
    probs = raw["target_probs"] if probs_rows is None else probs_rows
    dense = probs.new_zeros(length, probs.shape[-1])
    dense[loss] = probs
    supervised = torch.zeros(length, dtype=torch.bool)
    supervised[loss] = t2d[raw["target_argmax"].long()]
    return {
        "input_ids": reference_shift(raw["input_ids"].long()),
        "attention_mask": torch.ones(length, dtype=torch.long),
        "loss_mask": reference_shift(loss.long()),
        "aux_hidden_states": raw["aux_hidden_states"] if aux is None else aux,
        "target_probs": reference_shift(dense),
        "position_mask": reference_shift(supervised).unsqueeze(-1),
    }


def reference_collate(samples, pad_to=None):
    width = pad_to or max(s["input_ids"].shape[0] for s in samples)
    out = {}
    for key in samples[0]:
        padded = []
        for s in samples:
            t = s[key][:width]
            padded.append(torch.cat([t, t.new_zeros((width - t.shape[0], *t.shape[1:]))]))
        out[key] = torch.stack(padded)
    return out


def random_raw(generator, length, loss, dtype=torch.float32, vocab=7, width=3):
    loss = torch.as_tensor(loss, dtype=torch.uint8)
    n = int(loss.sum())
    return {
        "input_ids": torch.randint(0, 50, (length,), generator=generator, dtype=torch.int32),
        "loss_mask": loss,
        "aux_hidden_states": torch.randn(length, width, generator=generator).to(dtype),
        "target_probs": torch.rand(n, vocab, generator=generator).to(dtype),
        "target_argmax": torch.randint(0, 50, (n,), generator=generator, dtype=torch.int32),
    }


EDGE_MASKS = [
    [0, 1, 1, 0, 1],  # ordinary
    [1, 1, 0, 0, 1, 1],  # a loss mask at position 0 (dropped by the shift) and at the last position
    [1],  # one token
    [0, 0, 0],  # nothing supervised
    [1, 1, 1, 1],  # everything supervised
    [0, 1] * 70,  # 70 separate runs: scattered positions
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_to_nemo_and_collate_equal_the_plain_definition(dtype):
    generator = torch.Generator().manual_seed(0)
    t2d = torch.rand(50, generator=generator) > 0.5
    raws = [random_raw(generator, len(mask), mask, dtype) for mask in EDGE_MASKS]
    samples = []
    for raw in raws:
        got, want = to_nemo(raw, t2d), reference_to_nemo(raw, t2d)
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
        rows = raw["target_probs"].float() * 2  # given rows (another dtype) and aux
        aux = raw["aux_hidden_states"].float()
        for key, value in reference_to_nemo(raw, t2d, rows, aux).items():
            assert torch.equal(to_nemo(raw, t2d, rows, aux)[key], value), key
        samples.append(got)
    longest = max(len(mask) for mask in EDGE_MASKS)
    for pad_to in (None, longest, longest + 9):  # the longest, by default and given, and longer than all
        got, want = collate_nemo(samples, pad_to), reference_collate(samples, pad_to)
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), (key, pad_to)


def test_real_samples_decode_and_collate_as_the_plain_definition(probs300, topk300, tmp_path):
    for result in (probs300, topk300):
        raw = load_cache(result.output_dir, layout="raw", streaming=False)
        nemo = load_cache(result.output_dir, streaming=False)
        t2d = draft_vocab(nemo).t2d
        samples = [nemo[i] for i in range(len(nemo))]
        if result is probs300:
            for i, sample in enumerate(samples):
                for key, value in reference_to_nemo(raw[i], t2d).items():
                    assert torch.equal(sample[key], value), key
        for pad_to in (None, 96):
            want = reference_collate(samples, pad_to)
            got = collate_nemo(samples, pad_to)
            for key, value in got.items():
                assert torch.equal(value, want[key]), key
            save_file(got, str(tmp_path / "batch.safetensors"))  # in process, every field has its own storage


class Samples(torch.utils.data.Dataset):
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def test_collate_in_workers_equals_collate_in_process():
    generator = torch.Generator().manual_seed(1)
    t2d = torch.rand(50, generator=generator) > 0.5
    masks = [np.random.default_rng(i).integers(0, 2, size=n).tolist() for i, n in enumerate([5, 9, 2, 7, 4, 8, 3, 6])]
    samples = [to_nemo(random_raw(generator, len(m), m, torch.bfloat16), t2d) for m in masks]
    loader = torch.utils.data.DataLoader(Samples(samples), batch_size=3, collate_fn=collate_nemo, num_workers=2)
    batches = list(loader)
    assert len(batches) == 3
    for index, batch in enumerate(batches):
        want = reference_collate(samples[3 * index : 3 * index + 3])
        for key, value in want.items():
            assert batch[key].dtype == value.dtype and torch.equal(batch[key], value), key
        # one shared-memory block per batch, crossing to this process as one file descriptor
        assert len({t.untyped_storage().data_ptr() for t in batch.values()}) == 1 and batch["target_probs"].is_shared()
