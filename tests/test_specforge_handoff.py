"""`export --to specforge` handed to SpecForge 0.2.0 itself: its offline training reader yields,
sample for sample, what our reader yields; its draft model loads our vocab mapping and its own checks
accept it; and its target path for `target_repr="hidden_state"` (its TargetHead over the exported
final hidden states, then its draft-vocab softmax through `t2d`) gives the probs cache's
distributions, column by token id.

SpecForge's conventions, from its code: a file holds `input_ids` and `loss_mask` `[L]` (unshifted),
`hidden_state` `[1, L, H]` (the final hidden state, its training `target`) and `aux_hidden_state`
`[1, L, 3H]` (its training `hidden_state`); its TargetHead shifts `target` left by one, so slot `t`
carries the distribution of position `t + 1`: the probs cache's row for position `t + 1`.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import signal
import sys
import types
from collections import Counter

import pytest
import torch
from helpers import export_signalled_at, says, small_config
from safetensors import safe_open
from transformers import LlamaConfig

from builder.embedded import resolve_target
from builder.export import ExportError, export_cache
from builder.pipeline import build
from builder.reader import load_cache, read_vocab

pytestmark = [pytest.mark.usefixtures("specforge_site"), pytest.mark.filterwarnings("ignore:flash_attn is not found")]

DRAFT_VOCAB, TARGET_VOCAB, NUM_SAMPLES = 300, 1024, 14
MAX_LEN = 2048  # SpecForge's default; longer than every sample, so nothing is cut
TTT_LENGTH = 7  # SpecForge's default: the padding its target path adds past the sequence


@pytest.fixture(scope="module")
def hidden_cache(tmp_path_factory):
    return build(small_config(tmp_path_factory.mktemp("hidden") / "cache", target_format="hidden"), progress=False).output_dir


@pytest.fixture(scope="module")
def probs_fp32_cache(tmp_path_factory):
    return build(small_config(tmp_path_factory.mktemp("probs32") / "cache"), progress=False).output_dir


@pytest.fixture(scope="module")
def exported(hidden_cache, tmp_path_factory):
    return export_cache(hidden_cache, "specforge", tmp_path_factory.mktemp("export") / "sf", progress=False)


def file_index(path: str) -> int:
    """The sample a file holds: the export names sample i `data_{i}.ckpt`, as SpecForge's own
    prepare_hidden_states does (its reader lists files in name order: data_10 before data_2)."""
    name = path.rsplit("/", 1)[-1]
    assert name.startswith("data_") and name.endswith(".ckpt"), name
    return int(name[len("data_") : -len(".ckpt")])


def specforge_batches(export_dir, batch_size: int = 1):
    """`(files, batch)` as SpecForge's offline EAGLE-3 training reads them: the algorithm's own
    offline reader, normalizer and collator (as its launcher wires them) under its feature loader."""
    from specforge.algorithms.builtin import builtin_algorithm_registry
    from specforge.runtime.data_plane.feature_dataloader import FeatureDataLoader
    from specforge.runtime.data_plane.feature_store import LocalFeatureStore

    provider = builtin_algorithm_registry().resolve("eagle3").providers.offline_for("text")
    refs = provider.build_reader(str(export_dir), run_id="handoff", ttt_length=TTT_LENGTH, max_len=MAX_LEN).read()
    loader = FeatureDataLoader(
        LocalFeatureStore("handoff"),
        refs=refs,
        batch_size=batch_size,
        collate_fn=provider.build_collator(),
        per_sample_transform=provider.build_normalizer(MAX_LEN, ttt_length=TTT_LENGTH),
        strategy="eagle3",
        drop_last=False,
    )
    files = {ref.sample_id: ref.feature_store_uri.removeprefix("file://") for ref in refs}
    for batch in loader:
        yield [files[sample_id] for sample_id in batch.sample_ids], batch


def expected_training_sample(row: dict) -> dict:
    """What SpecForge's training should see for one of our raw rows: every tensor as stored, with a
    batch dimension, its last loss slot off (SpecForge's normalizer clears it: no next token)."""
    loss_mask = row["loss_mask"].long().clone()
    loss_mask[-1] = 0
    return {
        "input_ids": row["input_ids"].long()[None],
        "attention_mask": torch.ones(1, row["num_tokens"], dtype=torch.long),
        "loss_mask": loss_mask[None],
        "hidden_state": row["aux_hidden_states"][None],
        "target": row["final_hidden"][None],
    }


def test_specforge_offline_training_reader_yields_our_samples(hidden_cache, exported):
    rows = list(load_cache(hidden_cache, layout="raw", streaming=False))
    seen = []
    for files, batch in specforge_batches(exported):
        (index,) = [file_index(path) for path in files]
        want = expected_training_sample(rows[index])
        assert batch.metadata["target_repr"] == "hidden_state"
        assert set(batch.tensors) == set(want)
        for key, tensor in want.items():
            assert batch.tensors[key].dtype == tensor.dtype and torch.equal(batch.tensors[key], tensor), (index, key)
        seen.append(index)
    assert sorted(seen) == list(range(NUM_SAMPLES))
    # its eager check of every file (keys present, tensors with shapes and dtypes) accepts them too
    from specforge.runtime.data_plane.offline_reader import OfflineManifestReader

    refs = OfflineManifestReader(str(exported), validate_files=True).read()
    specs = {file_index(ref.feature_store_uri): ref.feature_specs for ref in refs}
    assert sorted(specs) == list(range(NUM_SAMPLES))
    assert {tuple(spec) for spec in specs.values()} == {("input_ids", "loss_mask", "hidden_state", "aux_hidden_state")}


def test_specforge_offline_dataset_and_collator_read_our_samples(hidden_cache, exported):
    """The dataset class its offline scripts use, and its padding collator over samples of several lengths."""
    from specforge.data.preprocessing import build_offline_eagle3_dataset
    from specforge.data.utils import DataCollatorWithPadding

    rows = list(load_cache(hidden_cache, layout="raw", streaming=False))
    dataset = build_offline_eagle3_dataset(str(exported), max_len=MAX_LEN)
    assert len(dataset) == NUM_SAMPLES
    samples = [dataset[i] for i in range(len(dataset))]
    indices = [file_index(path) for path in dataset.datapaths]
    for index, sample in zip(indices, samples):
        want = expected_training_sample(rows[index])
        for key, tensor in want.items():
            assert sample[key].dtype == tensor.dtype and torch.equal(sample[key], tensor), (index, key)
    batch = DataCollatorWithPadding()(samples)
    longest = max(row["num_tokens"] for row in rows)
    assert batch["hidden_state"].shape == (NUM_SAMPLES, longest, 192) and batch["target"].shape == (NUM_SAMPLES, longest, 64)
    for slot, index in enumerate(indices):
        length = rows[index]["num_tokens"]
        assert torch.equal(batch["target"][slot, :length], rows[index]["final_hidden"])
        assert not batch["target"][slot, length:].any() and not batch["attention_mask"][slot, length:].any()


def test_specforge_reads_no_sample_from_an_export_into_an_existing_out_killed_while_writing(hidden_cache, tmp_path):
    """Killed (SIGKILL: the OOM killer, a preempted node) after writing 6 of its 15 files into its
    hidden folder inside OUT, an export leaves files SpecForge's reader does not take for samples,
    though it walks into hidden folders and takes every `.ckpt`: OUT is no smaller dataset to it."""
    from specforge.runtime.data_plane.offline_reader import OfflineManifestReader

    out = tmp_path / "sf"
    out.mkdir()
    killed = export_signalled_at(hidden_cache, "specforge", out, "export_file:6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (hidden,) = out.iterdir()
    assert re.fullmatch(r"\.export\.tmp-\d+", hidden.name) and len(list(hidden.iterdir())) == 6
    assert OfflineManifestReader(str(out), validate_files=True).read() == []
    with pytest.raises(ExportError, match=says(f"holds only {hidden.name}", "killed before it finished", "delete that folder")):
        export_cache(hidden_cache, "specforge", out, progress=False)


# ---- the vocab mapping -----------------------------------------------------------------------


def specforge_draft_model():
    """SpecForge's EAGLE-3 draft model for the tiny target, whose buffers `load_vocab_mapping` fills."""
    from specforge.modeling.draft import LlamaForCausalLMEagle3

    config = LlamaConfig.from_pretrained(resolve_target("tiny-llama"))
    config.draft_vocab_size, config.num_hidden_layers = DRAFT_VOCAB, 1
    return LlamaForCausalLMEagle3(config)


def test_specforge_draft_model_loads_our_vocab_mapping_and_its_checks_accept_it(hidden_cache, exported):
    from specforge.core.compact_teacher import validate_compact_teacher_config, validate_vocab_mapping_consistency

    draft = specforge_draft_model()
    mapping = torch.load(exported / "vocab_mapping.pt", weights_only=True)
    # load_vocab_mapping copy_s into buffers it allocated, which would cast another dtype silently
    for name in ("t2d", "d2t"):
        assert (mapping[name].dtype, mapping[name].shape) == (getattr(draft, name).dtype, getattr(draft, name).shape), name
    draft.load_vocab_mapping(str(exported / "vocab_mapping.pt"))
    assert torch.equal(draft.t2d, mapping["t2d"]) and torch.equal(draft.d2t, mapping["d2t"])
    validate_vocab_mapping_consistency(draft.t2d, draft.d2t)
    validate_compact_teacher_config(draft_vocab_size=DRAFT_VOCAB, vocab_size=TARGET_VOCAB, t2d=draft.t2d)
    # draft id i is token i + d2t[i]: every token of our draft vocabulary, once
    selected = read_vocab(hidden_cache)["selected_token_ids"].long()
    assert torch.equal(torch.arange(DRAFT_VOCAB) + draft.d2t, selected.sort().values)


def test_specforge_builds_the_same_mapping_from_our_draft_vocabulary(hidden_cache, exported):
    from specforge.data.preprocessing import process_token_dict_to_mappings

    selected = read_vocab(hidden_cache)["selected_token_ids"].tolist()
    d2t, t2d = process_token_dict_to_mappings(Counter(dict.fromkeys(selected, 1)), DRAFT_VOCAB, TARGET_VOCAB)
    mapping = torch.load(exported / "vocab_mapping.pt", weights_only=True)
    assert d2t.dtype == mapping["d2t"].dtype and torch.equal(d2t, mapping["d2t"])
    assert t2d.dtype == mapping["t2d"].dtype and torch.equal(t2d, mapping["t2d"])


def test_specforge_counts_our_export_as_we_counted_and_picks_the_same_tokens_but_ties_and_specials(hidden_cache, exported):
    """Without --vocab-mapping SpecForge derives one from the files' loss-masked tokens: the same
    counts as ours. Its pick differs from our draft vocabulary only where ours is a choice of ours:
    the tokenizer's special ids, always in it, and ties at the cut (ours: lower id first)."""
    from specforge.data.preprocessing import process_token_dict_to_mappings
    from specforge.training.vocab_mapping import count_effective_feature_tokens

    vocab = read_vocab(hidden_cache)
    ours = {token: int(count) for token, count in enumerate(vocab["token_counts"].tolist()) if count}
    counts = count_effective_feature_tokens(str(exported), target_vocab_size=TARGET_VOCAB)
    assert dict(counts) == ours
    d2t, _ = process_token_dict_to_mappings(counts, DRAFT_VOCAB, TARGET_VOCAB)
    theirs, selected = set((torch.arange(DRAFT_VOCAB) + d2t).tolist()), set(vocab["selected_token_ids"].tolist())
    cut = min(counts[token] for token in theirs)
    specials = {0, 1, 2, 3}  # tiny-llama's unk, bos, eos, pad
    assert all(counts[token] == cut for token in theirs - selected)
    assert all(counts[token] == cut for token in selected - theirs - specials)


# ---- the target distribution ---------------------------------------------------------------


def target_with_index(folder):
    """The tiny target as a checkpoint with a weight index: SpecForge's TargetHead reads lm_head
    through `*.index.json` only (every sharded checkpoint has one; this single-file one gets it)."""
    target = shutil.copytree(resolve_target("tiny-llama"), folder)
    with safe_open(str(target / "model.safetensors"), framework="pt") as f:
        weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return target


def specforge_target_head(folder):
    """SpecForge's TargetHead with its own weight loader, kept in fp32 on the CPU (its
    from_pretrained moves it to bf16 on the training device: a rounding, not another target)."""
    from specforge.modeling.target.target_head import TargetHead

    head = TargetHead(str(folder))
    head.load_weights(model_path=str(folder))
    head.freeze_weights()
    return head.eval()


def import_eagle3_model():
    """SpecForge's EAGLE-3 training model module. It imports triton for a loss kernel the target
    path does not use; the CPU build of torch has no triton, so a stand-in serves the import there."""
    try:
        importlib.import_module("triton")
    except ImportError:
        torch.compile(lambda tensor: tensor)  # torch's compile machinery probes triton once, on first use: not the stand-in
        triton, language = types.ModuleType("triton"), types.ModuleType("triton.language")
        triton.jit, triton.language, language.constexpr = (lambda fn: fn), language, int
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(sys.modules, "triton", triton)
            patch.setitem(sys.modules, "triton.language", language)
            return importlib.import_module("specforge.algorithms.eagle3.model")
    return importlib.import_module("specforge.algorithms.eagle3.model")


def probs_columns_in_specforge_order(probs_cache, t2d: torch.Tensor) -> torch.Tensor:
    """For each column of the probs cache (`selected_token_ids` order), SpecForge's column of that
    token: `target[..., t2d]` takes the draft tokens in ascending id order."""
    column_of_token = torch.full((TARGET_VOCAB,), -1, dtype=torch.long)
    column_of_token[t2d.nonzero().squeeze(-1)] = torch.arange(DRAFT_VOCAB)
    columns = column_of_token[read_vocab(probs_cache)["selected_token_ids"].long()]
    assert (columns >= 0).all() and not torch.equal(columns, torch.arange(DRAFT_VOCAB))  # same tokens, another order
    return columns


@pytest.mark.parametrize("teacher", ["full_logits", "compact"])
def test_specforge_target_from_our_hidden_states_equals_the_probs_cache(exported, probs_fp32_cache, tmp_path, teacher):
    """Its default teacher (TargetHead logits, then `_compute_target_p`) and its compact one (the
    `t2d` rows of the head's weight): slot t's distribution is the probs cache's row of position
    t + 1, the columns mapped by token id, and its target token is the cache's full-vocab argmax."""
    from specforge.core.compact_teacher import compute_target_p_padded_from_hidden
    from specforge.training.strategies.base import _prepare_eagle_target

    eagle3_model = import_eagle3_model()
    head = specforge_target_head(target_with_index(tmp_path / "target"))
    draft = specforge_draft_model()
    draft.load_vocab_mapping(str(exported / "vocab_mapping.pt"))
    columns = probs_columns_in_specforge_order(probs_fp32_cache, draft.t2d)
    probs_rows = list(load_cache(probs_fp32_cache, layout="raw", streaming=False))
    compared = 0
    for files, batch in specforge_batches(exported):
        (index,) = [file_index(path) for path in files]
        t = batch.tensors
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):  # its torch.compile'd functions, run as written
            if teacher == "full_logits":  # Eagle3TrainStrategy.forward_loss without --compact-teacher
                _, logits, loss_mask = _prepare_eagle_target(
                    target_head=head,
                    target_repr=batch.metadata["target_repr"],
                    input_ids=t["input_ids"],
                    target=t["target"],
                    loss_mask=t["loss_mask"],
                    device=torch.device("cpu"),
                )
                target_p, _, target_ids, _ = eagle3_model._compute_target_p_padded(logits, draft.t2d, loss_mask, TTT_LENGTH)
            else:  # with --compact-teacher: the head's weight, over the hidden states TargetHead.preprocess shifts
                _, hidden, loss_mask = head.preprocess(t["input_ids"], t["target"], t["loss_mask"])
                target_p, _, target_ids, _ = compute_target_p_padded_from_hidden(hidden, head.fc.weight, draft.t2d, loss_mask, TTT_LENGTH)
        row = probs_rows[index]
        assert torch.equal(t["input_ids"][0], row["input_ids"].long())  # the same sample in both caches
        positions = row["loss_mask"].bool().nonzero().squeeze(-1)
        kept = positions > 0  # position 0 has no slot before it
        slots = positions[kept] - 1
        # fp32 of the same logits, summed in another column order: equal up to rounding; a wrong column is ~1e-2 off
        torch.testing.assert_close(target_p[0, slots][:, columns], row["target_probs"][kept], rtol=1e-5, atol=1e-7)
        assert torch.equal(target_ids[0, slots], row["target_argmax"][kept].long())
        compared += len(slots)
    assert compared > 500


# ---- a cache whose aux states are stored in another dtype ------------------------------------

MIXED_DTYPES = {
    "bf16-cache-fp32-aux": dict(dtype="bf16", aux_dtype="fp32"),
    "fp32-cache-fp8-aux": dict(dtype="fp32", aux_dtype="fp8"),
}


@pytest.mark.parametrize("dtypes", list(MIXED_DTYPES))
def test_specforge_draft_takes_the_aux_states_of_a_cache_whose_aux_dtype_is_not_its_dtype(dtypes, tmp_path):
    """SpecForge's capture writes a sample's hidden states in one dtype, the target's, and its draft
    (built in its `model.torch_dtype`) takes them into its fc uncast. The export writes the aux states
    in the cache's --dtype, that of the final hidden states, whatever --aux-dtype stored them as."""
    cache = build(small_config(tmp_path / "cache", target_format="hidden", max_samples=4, **MIXED_DTYPES[dtypes]), progress=False)
    exported = export_cache(cache.output_dir, "specforge", tmp_path / "sf", progress=False)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[MIXED_DTYPES[dtypes]["dtype"]]
    draft = specforge_draft_model().to(dtype)
    for _, batch in specforge_batches(exported):
        aux, target = batch.tensors["hidden_state"], batch.tensors["target"]
        with torch.no_grad():
            projected = draft.project_hidden_states(aux)
        assert projected.dtype == dtype and projected.isfinite().all()
        assert (aux.dtype, target.dtype) == (dtype, dtype)
