"""The forward loop's host-side pieces: batch padding, the loss rows counted on the host, the
GIL switch interval the loop runs under, and rank 0's progress bar."""

from __future__ import annotations

import json
import os
import sys
import weakref
from types import SimpleNamespace

import pytest
import torch
from helpers import small_config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import builder.forward as forward
import builder.shards as shards
from builder.batching import pad_batch
from builder.build_state import BUILD_STATE_DIR, sidecar_path
from builder.forward import all_finite, finite_rows, gil_switch_interval
from builder.pipeline import build


def test_pad_batch_right_pads_and_never_supervises_padding():
    ids, attention, loss = pad_batch([[5, 6, 7], [8]], [[0, 1, 1], [1]], pad_id=2)
    assert torch.equal(ids, torch.tensor([[5, 6, 7], [8, 2, 2]]))
    assert torch.equal(attention, torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(loss, torch.tensor([[False, True, True], [True, False, False]]))
    assert (ids.dtype, attention.dtype, loss.dtype) == (torch.long, torch.long, torch.bool)


def test_switch_interval_is_lowered_inside_and_restored_after_even_on_error():
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.004)
        with pytest.raises(RuntimeError, match="inside"):
            with gil_switch_interval(0.0005):
                assert sys.getswitchinterval() == pytest.approx(0.0005, rel=0.05)
                raise RuntimeError("failed inside")
        assert sys.getswitchinterval() == pytest.approx(0.004, rel=0.05)
        sys.setswitchinterval(0.0001)  # already shorter: left as the user set it
        with gil_switch_interval(0.0005):
            assert sys.getswitchinterval() == pytest.approx(0.0001, rel=0.05)
        assert sys.getswitchinterval() == pytest.approx(0.0001, rel=0.05)
    finally:
        sys.setswitchinterval(before)


def test_supervise_finds_the_loss_rows_of_a_host_mask_as_a_boolean_index_would(tmp_path):
    from tiny_targets import make_tiny_target
    from transformers import AutoModelForCausalLM

    from builder.target import Target

    model = AutoModelForCausalLM.from_pretrained(make_tiny_target(tmp_path / "llama", "llama")).eval()
    target = Target(model, [0, 1, 2])
    ids = torch.randint(0, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    loss = torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) > 0.5
    selected = torch.arange(0, model.config.vocab_size, 2)
    live = target.supervise(ids, attention, loss, selected)
    want = target.logits_at(target.forward(ids, attention)[1][loss])
    assert torch.equal(live["loss_positions"], loss.reshape(-1).nonzero().squeeze(1))
    assert torch.equal(live["argmax"], want.argmax(-1))
    assert torch.equal(live["probs"], torch.softmax(want.index_select(-1, selected).float(), -1))
    target.close()


def test_a_half_precision_target_that_softcaps_its_logits_in_fp32_is_supervised_as_its_own_forward_gives_them():
    """Beam widens its bf16 lm_head output to fp32 before the tanh cap: the head path must too, or the
    capped logits are rounded to bf16 (up to 1/16 near a cap of 30), which the model's forward never does."""
    from tiny_targets import _init_weights, tiny_tokenizer
    from transformers import AutoModelForCausalLM, BeamConfig

    from builder.target import Target

    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    moe = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, sliding_window=16)
    model = AutoModelForCausalLM.from_config(BeamConfig(vocab_size=len(tiny_tokenizer()), **settings, **moe), dtype=torch.float32)
    _init_weights(model, 0)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)  # logits near the cap, where rounding the capped values shows
    model = model.to(torch.bfloat16).eval()
    target = Target(model, [1, 3, 4])
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    own = model(input_ids=ids, attention_mask=attention).logits[0]
    assert own.dtype == torch.float32 and own.abs().max() > 29  # the model's own fp32 cap, reached
    selected = torch.arange(0, model.config.vocab_size, 3)
    live = target.supervise(ids, attention, torch.ones_like(ids), selected)
    assert torch.equal(live["probs"], torch.softmax(own.index_select(-1, selected), -1))
    assert torch.equal(live["argmax"], own.argmax(-1))
    assert target.check_head(ids) == 0.0
    target.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_flags_exactly_the_rows_holding_inf_or_nan_even_where_a_sum_would_overflow(dtype):
    largest = torch.finfo(dtype).max
    rows = torch.full((6, 3, 256), largest, dtype=dtype)  # finite, yet their float32 sum overflows
    rows[1] = -largest
    rows[2, 1, 17] = float("nan")
    rows[3, 0, 0] = float("inf")
    rows[4, 2, 255] = -float("inf")
    rows[5, :, ::2] = -largest  # finite values summing to zero
    want = torch.tensor([True, True, False, False, False, True])
    assert torch.equal(all_finite(rows, (6,), bounded=False), want)
    by_token = all_finite(rows, (6, 3), bounded=False)
    assert torch.equal(by_token.all(-1), want) and by_token.sum().item() == 18 - 3
    assert torch.equal(all_finite(rows[:0], (0,), bounded=False), torch.ones(0, dtype=torch.bool))


def aux_finite_rows(aux: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """finite_rows of a batch whose probs are all finite: only the per-token aux states decide."""
    loss_positions = attention.reshape(-1).nonzero().squeeze(1)
    live = {"loss_positions": loss_positions, "probs": torch.full((len(loss_positions), 6), 1 / 6)}
    return finite_rows(live, {"aux_hidden_states": aux}, attention, frozenset())


def test_one_inf_in_a_real_tokens_aux_state_fails_its_sample_and_only_it():
    attention = torch.ones(3, 3, dtype=torch.long)
    aux = torch.zeros(3, 3, 4, dtype=torch.bfloat16)
    aux[1, 1, 2] = float("inf")  # one value of one token of three
    assert torch.equal(aux_finite_rows(aux, attention), torch.tensor([True, False, True]))


def test_nan_only_in_a_samples_padding_does_not_fail_it():
    """Padding positions are never stored: what the target computed there does not matter."""
    attention = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    aux = torch.zeros(3, 3, 4, dtype=torch.bfloat16)
    aux[1, 2, 0] = float("nan")
    aux[2, 1:] = float("nan")
    assert torch.equal(aux_finite_rows(aux, attention), torch.tensor([True, True, True]))


def test_supervise_gives_empty_outputs_of_the_right_shapes_when_no_row_is_supervised_and_cuts_the_chunk_padding(tmp_path):
    from tiny_targets import make_tiny_target
    from transformers import AutoModelForCausalLM

    from builder.supervision import HEAD_CHUNK_ROWS
    from builder.target import Target

    model = AutoModelForCausalLM.from_pretrained(make_tiny_target(tmp_path / "llama", "llama")).eval()
    target = Target(model, [0, 1, 2])
    selected = torch.arange(0, model.config.vocab_size, 3)
    ids = torch.randint(0, model.config.vocab_size, (2, HEAD_CHUNK_ROWS), generator=torch.Generator().manual_seed(2))
    attention = torch.ones_like(ids)
    none = target.supervise(ids, attention, torch.zeros_like(ids, dtype=torch.bool), selected)
    assert none["probs"].shape == (0, len(selected)) and none["probs"].dtype == torch.float32
    assert none["argmax"].shape == none["log_draft_mass"].shape == none["loss_positions"].shape == (0,)
    loss = torch.ones_like(ids, dtype=torch.bool)
    loss[1, 5:] = False  # HEAD_CHUNK_ROWS + 5 rows: a second chunk padded with zero rows
    live = target.supervise(ids, attention, loss, selected)
    assert live["probs"].shape == (HEAD_CHUNK_ROWS + 5, len(selected)) and live["log_draft_mass"].shape == (HEAD_CHUNK_ROWS + 5,)
    logits = target.logits_at(target.forward(ids, attention)[1][loss]).float()
    assert torch.equal(live["argmax"], logits.argmax(-1))
    assert torch.equal(live["probs"], torch.softmax(logits.index_select(-1, selected), -1))
    want_mass = torch.logsumexp(logits.index_select(-1, selected), -1) - torch.logsumexp(logits, -1)
    assert torch.equal(live["log_draft_mass"], want_mass)
    target.close()


def test_a_pad_token_past_the_embedding_table_pads_like_one_inside_it_in_the_build_and_its_recompute(tmp_path):
    """A pad token added to the tokenizer without resizing the model's embeddings: batches that need
    padding still run, their rows equal those of a build padded with an id inside the table, and
    `verify --recompute` rebuilds them from the pad id the manifest records."""
    import shutil

    from helpers import assert_same_content, decoded_rows, small_config
    from transformers import AutoConfig, AutoTokenizer

    from builder.embedded import EMBEDDED_TARGETS
    from builder.pipeline import build
    from builder.reader import read_manifest
    from builder.verify import verify_cache

    target = shutil.copytree(EMBEDDED_TARGETS["tiny-llama"], tmp_path / "target")
    tokenizer = AutoTokenizer.from_pretrained(target)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.save_pretrained(target)
    pad_id = AutoTokenizer.from_pretrained(target).pad_token_id
    assert pad_id >= AutoConfig.from_pretrained(target).vocab_size
    # Batches of 3 samples of unequal lengths (96 tokens would cut every sample to one length); the whole
    # vocabulary as the draft's, which the pad id would otherwise join as a special token in one build only.
    settings = dict(seq_length=256, draft_vocab_size=None)
    past = build(small_config(tmp_path / "past", target, **settings), progress=False).output_dir
    inside = build(small_config(tmp_path / "inside", **settings), progress=False).output_dir
    assert read_manifest(past)["build"]["pad_token_id"] == pad_id
    assert_same_content(decoded_rows(past), decoded_rows(inside))
    assert verify_cache(past, recompute=14) == []


def test_padding_past_the_embedding_table_becomes_id_0_and_everything_else_is_kept():
    from builder.target import padding_in_table

    ids = torch.tensor([[5, 9, 7, 12], [8, 12, 12, 3]])
    attention = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert torch.equal(padding_in_table(ids, attention, 10), torch.tensor([[5, 9, 7, 0], [8, 0, 0, 3]]))


def _family_configs():
    from transformers import BloomConfig, FalconConfig, GPT2Config, GPTBigCodeConfig, GPTJConfig, LlamaConfig, MptConfig

    tokens = dict(vocab_size=64, bos_token_id=0, eos_token_id=1)
    return {
        "llama": (LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, **tokens), "model.layers"),
        "gpt2": (GPT2Config(n_embd=32, n_layer=3, n_head=4, **tokens), "transformer.h"),
        "falcon": (FalconConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, **tokens), "transformer.h"),
        "bloom": (BloomConfig(hidden_size=32, n_layer=3, n_head=4, **tokens), "transformer.h"),
        "gptj": (GPTJConfig(n_embd=32, n_layer=3, n_head=4, rotary_dim=4, **tokens), "transformer.h"),
        "gpt_bigcode": (GPTBigCodeConfig(n_embd=32, n_layer=3, n_head=4, **tokens), "transformer.h"),
        "mpt": (MptConfig(d_model=32, n_layers=3, n_heads=4, **tokens), "transformer.blocks"),
    }


@pytest.mark.parametrize("family", ["llama", "gpt2", "falcon", "bloom", "gptj", "gpt_bigcode", "mpt"])
def test_decoder_layers_are_found_by_structure_whatever_their_name(family):
    from builder.placement import meta_model
    from builder.target import decoder_layers

    config, path = _family_configs()[family]
    model = meta_model(config)
    assert decoder_layers(model, config.num_hidden_layers) is model.get_submodule(path)


def test_decoder_layers_of_a_multimodal_wrapper_are_the_language_models_not_the_vision_encoders(tmp_path):
    from tiny_targets import _config, tiny_tokenizer

    from builder.placement import meta_model
    from builder.target import decoder_layers

    config = _config("text_config", tiny_tokenizer())
    config.vision_config.num_hidden_layers = config.text_config.num_hidden_layers  # two lists of the same length
    model = meta_model(config)
    assert decoder_layers(model, config.text_config.num_hidden_layers) is model.get_submodule("model.language_model.layers")


def test_a_decoder_without_a_list_of_its_layers_is_refused_with_what_was_looked_for():
    from helpers import says
    from tiny_targets import sequential_decoder_config

    from builder.errors import InputError
    from builder.placement import meta_model
    from builder.target import decoder_layers

    model = meta_model(sequential_decoder_config(num_hidden_layers=4))
    with pytest.raises(
        InputError,
        match=says(
            "--target-model",
            "the 4 decoder layers of SequentialDecoderForCausalLM",
            "ModuleList of 4 modules",
            "SequentialDecoder",
            "found no ModuleList",
        ),
    ):
        decoder_layers(model, 4)


@pytest.fixture
def bars(monkeypatch):
    """Every progress bar the builds of a test open, as (Progress, its count and total when closed)."""
    opened = []

    class Recorded(forward.Progress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append(self)

        def close(self):
            self.closed_at = (self.bar.n, self.bar.total)
            super().close()

    monkeypatch.setattr(forward, "Progress", Recorded)
    return opened


def recorded_bytes(out) -> int:
    return sum(json.loads(p.read_text())["bytes"] for p in (out / BUILD_STATE_DIR / "shards").glob("*.json"))


def test_the_bar_counts_each_shard_of_its_rank_once_even_when_it_looks_while_the_shard_is_published(tmp_path, monkeypatch, bars):
    """A shard's record is written before the shard is renamed into place: a look at the records right then
    (a slow fsync on a busy disk) must not take the rank's own shard for another rank's."""
    publish = shards.ShardWriter.publish

    def look_then_publish(writer):
        bars[0].poll_other_ranks()  # the record is on disk, the shard not yet in place
        publish(writer)

    monkeypatch.setattr(shards.ShardWriter, "publish", look_then_publish)
    result = build(small_config(tmp_path / "cache"), progress=True)
    assert bars[0].closed_at == (14, 14)
    assert bars[0].bytes == recorded_bytes(result.output_dir)


def test_the_bar_of_a_resume_that_rebuilds_a_damaged_shard_counts_that_shard(tmp_path, bars):
    cfg = small_config(tmp_path / "cache")
    build(cfg, progress=False)
    shard = tmp_path / "cache" / "data" / "train-00001-of-00004.parquet"
    os.truncate(shard, shard.stat().st_size // 2)
    resumed = build(cfg.replace(resume=True), progress=True)
    assert resumed.written == ["train-00001-of-00004.parquet"]
    assert bars[-1].closed_at == (4, 4)


def test_rank_0s_bar_counts_another_ranks_shard_once_it_is_published_and_never_its_own_records(tmp_path):
    """Two ranks, four shards (4, 4, 4, 2 rows); rank 1 owns shards 1 and 3. Shard 1 is complete from an
    earlier run, shard 3 damaged (its record stale), shard 0 of rank 0 has a record but is not in place yet."""
    out = tmp_path / "cache"
    names = [f"train-0000{k}-of-00004.parquet" for k in range(4)]
    (out / "data").mkdir(parents=True)
    (out / BUILD_STATE_DIR / "shards").mkdir(parents=True)

    def record(name, nbytes, **extra):
        sidecar_path(out, name).write_text(json.dumps({"rows": 4, "tokens": 100, "bytes": nbytes} | extra))

    record(names[1], 10)
    (out / "data" / names[1]).write_bytes(b"x" * 10)
    record(names[3], 10)
    (out / "data" / names[3]).write_bytes(b"x" * 5)  # damaged: rank 1 rebuilds it
    prep = SimpleNamespace(samples=range(14), cfg=SimpleNamespace(shard_size=4))
    progress = forward.Progress(prep, out, True, [0, 2], names, rank=0, world_size=2)
    assert progress.bar.total == 4 + 4 + 2  # rank 0's two shards and rank 1's shard 3

    (out / "data" / names[3]).unlink()  # rank 1 rebuilds shard 3: its record first, then the shard
    record(names[3], 7, tokens=30)
    record(names[0], 8)  # rank 0 writes its shard 0's record
    progress.poll_other_ranks()
    assert (progress.bar.n, progress.tokens, progress.bytes) == (0, 0, 0)
    (out / "data" / names[3]).write_bytes(b"x" * 7)
    (out / "data" / names[0]).write_bytes(b"x" * 8)
    progress.poll_other_ranks()
    progress.poll_other_ranks()
    assert (progress.bar.n, progress.tokens, progress.bytes) == (2, 30, 7)
    progress.close()


def test_a_batchs_device_outputs_are_freed_before_the_next_batchs_forward(tmp_path, monkeypatch):
    """The memory plan budgets one batch's aux states, final hidden state and probs at a time: once a
    batch is handed on (and its consumer drops it), nothing may keep them through the next forward."""
    import weakref

    from builder.placement import load_placed_model
    from builder.prepare import prepare
    from builder.target import Target

    prep = prepare(small_config(tmp_path / "cache", target_format="topk", topk=8, batch_size=2))
    target = Target(load_placed_model(prep), prep.aux_layer_ids)
    head = forward.HeadRows.of(target, prep.selected_token_ids, prep.cfg.target_format)
    previous: dict[str, weakref.ref] = {}
    alive_at_each_start = []
    supervise = Target.supervise

    def watched(self, *args, **kwargs):
        alive_at_each_start.append(sorted(name for name, ref in previous.items() if ref() is not None))
        live = supervise(self, *args, **kwargs)
        previous.update({name: weakref.ref(live[name]) for name in ("aux", "final_hidden", "probs")})
        return live

    monkeypatch.setattr(Target, "supervise", watched)
    window = [prep.samples[i] for i in range(6)]
    batches = 0
    for batch in forward.forward_window(prep, target, window, head):
        del batch  # the consumer drops each batch at once, as the writer does with its host copies
        batches += 1
    assert batches == 3 and alive_at_each_start == [[], [], []]
    target.close()


@pytest.mark.parametrize("target_format", ["probs", "topk", "hidden"])
def test_only_a_hidden_build_holds_the_heads_draft_rows_and_the_plan_counts_what_it_holds(tmp_path, target_format):
    """A `hidden` build rebuilds probs from an fp32 copy of the head's draft rows (start-up check, quality
    figures); the other formats never read them, so they hold no copy: [Vd, H] fp32 beside the weights
    (2.1 GB for a 128k vocabulary at H 4096) would be device memory no plan counted."""
    from helpers import AllocatedBytes
    from tiny_targets import make_tiny_target
    from transformers import AutoModelForCausalLM

    from builder.placement import memory_plan
    from builder.target import Target

    model = AutoModelForCausalLM.from_pretrained(make_tiny_target(tmp_path / "llama", "llama")).eval()
    target = Target(model, [0, 1, 2])
    selected = list(range(0, model.config.vocab_size, 2))
    with AllocatedBytes([*model.parameters(), *model.buffers()]) as allocated:
        head = forward.HeadRows.of(target, selected, target_format)
    rows_bytes = len(selected) * model.config.hidden_size * 4
    ids_bytes = len(selected) * 8
    prep = SimpleNamespace(
        cfg=small_config(tmp_path / "cache", target_format=target_format),
        model_config=model.config,
        aux_layer_ids=[0, 1, 2],
        selected_token_ids=selected,
    )
    plan = memory_plan(prep, dtype_bytes=4)
    if target_format == "hidden":
        assert torch.equal(head.draft_rows, model.lm_head.weight[selected])
        assert allocated.live == rows_bytes + ids_bytes
        assert plan.head_rows == rows_bytes
    else:
        assert head.draft_rows is None and head.transform is None
        assert allocated.live == ids_bytes
        assert plan.head_rows == 0
    target.close()


@pytest.mark.parametrize("arch", ["llama", "text_config", "gpt2", "mixtral"])
def test_a_samples_supervision_does_not_depend_on_the_samples_that_share_its_batch(tmp_path, arch):
    """Each sample of a right-padded batch against the same sample alone (fp32, CPU). The head is
    exact: a row's logits come from fixed-shape chunks, so the same final hidden rows give the same
    probs and argmax bit for bit whatever rows share the chunk. The decoder is exact up to kernel
    rounding only: a padded batch hands SDPA a mask (another kernel path than the plain causal one of
    a lone sample), and a mixture of experts groups each expert's tokens over the whole batch, so
    sums run in another order: within 1e-6 of the states' largest magnitude (a few fp32 ulps), the
    argmax unchanged."""
    from tiny_targets import make_tiny_target
    from transformers import AutoModelForCausalLM

    from builder.target import Target

    model = AutoModelForCausalLM.from_pretrained(make_tiny_target(tmp_path / arch, arch)).eval()
    target = Target(model, [0, 3, 7])  # 7: the last layer, stored before the final norm
    generator = torch.Generator().manual_seed(0)
    lengths = [40, 23, 31, 7]
    sequences = [torch.randint(5, 300, (n,), generator=generator).tolist() for n in lengths]
    masks = [(torch.rand(n, generator=generator) > 0.3).tolist() for n in lengths]
    masks = [[1, *m[1:-1], 1] for m in masks]  # the first and the last position of each sample supervised
    selected = torch.arange(0, 400, dtype=torch.long)
    batch = target.supervise(*pad_batch(sequences, masks, 0), selected)
    offset = 0
    for row, (sequence, mask) in enumerate(zip(sequences, masks)):
        alone = target.supervise(*pad_batch([sequence], [mask], 0), selected)
        rows = slice(offset, offset + sum(mask))
        offset += sum(mask)
        scale = alone["aux"].abs().max().item()  # Gemma's scaled embeddings make its states ~50x Llama's
        torch.testing.assert_close(batch["aux"][row, : len(sequence)], alone["aux"][0], rtol=0, atol=1e-6 * scale)
        torch.testing.assert_close(batch["probs"][rows], alone["probs"], rtol=1e-5, atol=1e-6)
        assert torch.equal(batch["argmax"][rows], alone["argmax"])
        # the same final hidden rows: probs and argmax exactly as alone, whatever else the chunk holds
        hidden = batch["final_hidden"][row, : len(sequence)][torch.tensor(mask, dtype=torch.bool)]
        logits = target.logits_at(hidden)
        assert torch.equal(batch["probs"][rows], torch.softmax(logits.index_select(-1, selected), -1))
        assert torch.equal(batch["argmax"][rows], logits.argmax(-1))
    assert offset == len(batch["probs"])
    target.close()


class LargestMadeFrom(TorchDispatchMode):
    """The bytes of the largest storage that ops inside it make from `source`'s data: from `source`, a
    view of it, or a tensor made from it; storages that already existed (an in-place copy's target) are
    not made there."""

    def __init__(self, source: torch.Tensor):
        super().__init__()
        self.derived, self.seen, self.largest = {source.untyped_storage().data_ptr()}, set(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        from_source = any(t.untyped_storage().data_ptr() in self.derived for t in inputs)
        known = {t.untyped_storage().data_ptr() for t in inputs} | self.seen
        out = func(*args, **(kwargs or {}))
        for tensor in (t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)):
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in known or key in self.derived or storage.nbytes() == 0:
                continue
            self.seen.add(key)
            weakref.finalize(storage, self.seen.discard, key)
            if from_source:
                self.derived.add(key)
                weakref.finalize(storage, self.derived.discard, key)
                self.largest = max(self.largest, storage.nbytes())
        return out


def test_the_head_file_is_converted_to_fp32_a_chunk_of_rows_at_a_time_and_holds_the_same_bytes(tmp_path, monkeypatch):
    """With --store-full-head the head file holds every row of the head in fp32. Converted whole, that
    is [V, H] fp32 beside the weights on the device at start-up (4.2 GB at a 128k vocabulary and H 8192),
    which the memory plan does not count; converted HEAD_COPY_ROWS rows at a time (the draft rows too),
    the device holds one chunk's rows, and the file's bytes are those of the whole conversion."""
    from safetensors.torch import load_file
    from tiny_targets import make_tiny_target
    from transformers import AutoModelForCausalLM

    from builder.manifest import LM_HEAD_FILE
    from builder.target import Target

    # bf16, as a GPU loads it: the conversion makes new fp32 rows (an fp32 head on the CPU needs none)
    model = AutoModelForCausalLM.from_pretrained(make_tiny_target(tmp_path / "llama", "llama"), dtype=torch.bfloat16).eval()
    weight = model.lm_head.weight
    assert weight.shape == (1024, 64)
    target = Target(model, [0, 1, 2])
    selected = list(range(0, 1024, 3))  # 342 draft rows: three chunks of 96 and one of 54
    prep = SimpleNamespace(cfg=SimpleNamespace(store_full_head=True), selected_token_ids=selected)
    monkeypatch.setattr(forward, "HEAD_COPY_ROWS", 96, raising=False)
    (tmp_path / "cache" / "vocab").mkdir(parents=True)
    with torch.inference_mode(), LargestMadeFrom(weight) as made:
        forward.write_head_rows(tmp_path / "cache", prep, target)
    stored = load_file(tmp_path / "cache" / LM_HEAD_FILE)
    assert sorted(stored) == ["draft_rows", "weight"]
    assert stored["weight"].dtype == stored["draft_rows"].dtype == torch.float32
    assert torch.equal(stored["weight"], weight.float())
    assert torch.equal(stored["draft_rows"], weight[selected].float())
    # one chunk of 96 rows in fp32, not the head's 1024 rows (262,144 bytes)
    assert made.largest == 96 * 64 * 4 == 24_576
    target.close()
