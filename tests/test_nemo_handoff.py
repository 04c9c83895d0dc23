"""`export --to nemo` handed to NeMo Automodel itself: its train_eagle3 recipe accepts the export
with its default options, and its `CachedEagle3Dataset` yields, sample for sample, what it yields
over NeMo's own `precompute_eagle3` cache of the same target, data and flags.

NeMo's precompute runs here on CPU with one change: its model loader (CUDA-only) is swapped for
`transformers.AutoModelForCausalLM`. Everything else (tokenizer, chat dataset, loss masks, draft
vocabulary, target forward, shard writer) is NeMo's own code.
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from tiny_targets import target_without_pad_token
from transformers import AutoConfig, AutoModelForCausalLM

from builder.config import BuildConfig
from builder.embedded import EMBEDDED_INPUTS, resolve_target
from builder.export import export_cache
from builder.formats import TORCH_DTYPES
from builder.pipeline import build
from builder.reader import load_cache

precompute_eagle3 = pytest.importorskip("nemo_automodel.components.speculative.precompute_eagle3")
eagle3_cache = pytest.importorskip("nemo_automodel.components.datasets.llm.eagle3_cache")
train_eagle3 = pytest.importorskip("nemo_automodel.recipes.llm.train_eagle3")
ConfigNode = pytest.importorskip("nemo_automodel.components.config.loader").ConfigNode
DistInfo = pytest.importorskip("nemo_automodel.components.distributed.init_utils").DistInfo

SEQ_LENGTH = 224  # two of the chats below are longer (truncated), the others shorter (padded)
DRAFT_VOCAB = 300
# A handful of the sample chats in both row formats, with roles NeMo's chat dataset accepts.
CHATS = {"sample-sharegpt": ("sg-000", "sg-001", "sg-002", "sg-004", "sg-007"), "sample-openai": ("oa-003", "oa-004", "oa-010")}
BUILD_HAS_MASK_FLAGS = "mask_generation_prompt" in {f.name for f in dataclasses.fields(BuildConfig)}


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    lines = []
    for name, ids in CHATS.items():
        rows = [json.loads(line) for line in EMBEDDED_INPUTS[name].read_text().splitlines() if line.strip()]
        lines += [json.dumps(row) for row in rows if row["id"] in ids]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_nemo_precompute(target: str, chats, out, mask_generation_prompt: bool) -> None:
    flags = ["--mask-generation-prompt"] if mask_generation_prompt else []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precompute_eagle3, "NeMoAutoModelForCausalLM", AutoModelForCausalLM)
        code = precompute_eagle3.main(
            [
                "--target-model",
                target,
                "--input-data",
                str(chats),
                "--output-dir",
                str(out),
                "--seq-length",
                str(SEQ_LENGTH),
                "--draft-vocab-size",
                str(DRAFT_VOCAB),
                "--batch-size",
                "2",
                "--shard-size",
                "4",
                "--dtype",
                "fp32",
                "--device",
                "cpu",
                "--log-level",
                "WARNING",
                *flags,
            ]
        )
    assert code == 0


def build_and_export(target: str, chats, root, mask_generation_prompt: bool, **overrides):
    flags = {"mask_generation_prompt": True} if mask_generation_prompt else {}
    settings = {"dtype": "fp32", **flags, **overrides}
    cfg = BuildConfig(
        target_model=target,
        input_data=str(chats),
        output_dir=str(root / "cache"),
        seq_length=SEQ_LENGTH,
        draft_vocab_size=DRAFT_VOCAB,
        shard_size=4,
        batch_size=2,
        **settings,
    )
    cache = build(cfg, progress=False).output_dir
    return cache, export_cache(cache, "nemo", root / "nemo-export", progress=False)


# The embedded template's {% generation %} blocks never hold the assistant header, so NeMo's masks
# are the same with and without --mask-generation-prompt (only the recorded option differs): both
# runs must then yield the same tensors and record the option each was given.
# A target whose tokenizer has no pad token: NeMo loads it with pad id 0, which its draft vocabulary
# then holds among the special ids, and pads with.
HANDOFFS = {
    "default-options": dict(mask_generation_prompt=False, pad_token=True),
    "mask-generation-prompt": dict(mask_generation_prompt=True, pad_token=True),
    "target-without-pad-token": dict(mask_generation_prompt=False, pad_token=False),
}


@pytest.fixture(scope="module", params=list(HANDOFFS))
def handoff(request, chats, tmp_path_factory):
    mask_generation_prompt, pad_token = HANDOFFS[request.param]["mask_generation_prompt"], HANDOFFS[request.param]["pad_token"]
    if mask_generation_prompt and not BUILD_HAS_MASK_FLAGS:
        pytest.skip("this build has no --mask-generation-prompt option")
    root = tmp_path_factory.mktemp(request.param)
    target = resolve_target("tiny-llama") if pad_token else str(target_without_pad_token(root / "target"))
    run_nemo_precompute(target, chats, root / "nemo-own", mask_generation_prompt)
    cache, export = build_and_export("tiny-llama" if pad_token else target, chats, root, mask_generation_prompt)
    return SimpleNamespace(
        target=target,
        theirs=root / "nemo-own",
        export=export,
        cache=cache,
        mask_generation_prompt=mask_generation_prompt,
        pad_token=pad_token,
    )


def recipe_config(mask_generation_prompt: bool = False) -> ConfigNode:
    settings = {"micro_batch_size": 2}
    if mask_generation_prompt:
        settings["mask_generation_prompt"] = True  # otherwise the recipe's own default (False) applies
    return ConfigNode(settings)


def setup_cached_target(export, target: str, recipe_cfg: ConfigNode):
    """The recipe's offline-cache setup (`TrainEagle3Recipe._setup_cached_target`): manifest checks
    against its options, draft vocabulary, target embeddings, the cached dataloader."""
    recipe = SimpleNamespace(cached_target_path=str(export), dist_env=SimpleNamespace(world_size=1, is_main=True))
    selected, mask = train_eagle3.TrainEagle3Recipe._setup_cached_target(recipe, recipe_cfg, AutoConfig.from_pretrained(target))
    return recipe, selected, mask


def test_recipe_accepts_the_export(handoff):
    """With its default options (or, for a build with --mask-generation-prompt, that option set)."""
    recipe, selected, mask = setup_cached_target(handoff.export, handoff.target, recipe_config(handoff.mask_generation_prompt))
    ours, theirs = eagle3_cache.read_manifest(str(handoff.export)), eagle3_cache.read_manifest(str(handoff.theirs))
    assert torch.equal(selected, torch.tensor(theirs["selected_token_ids"])) and int(mask.sum()) == DRAFT_VOCAB
    assert torch.equal(recipe._cached_embed_source.weight, eagle3_cache.read_target_embeddings(str(handoff.theirs)))
    assert len(recipe.train_dataloader.dataset) == theirs["num_samples"]
    # Every field NeMo records, with NeMo's value, except the names the two runs were given.
    named = {"target_model", "input_data", "split"}
    assert ours.keys() == theirs.keys()
    assert {k: v for k, v in ours.items() if k not in named} == {k: v for k, v in theirs.items() if k not in named}
    assert ours["mask_generation_prompt"] is handoff.mask_generation_prompt and ours["mask_reasoning_content"] is False


def test_recipe_refuses_the_export_under_other_mask_options(handoff):
    other = not handoff.mask_generation_prompt
    with pytest.raises(
        ValueError, match=rf"was built with mask_generation_prompt={not other}, but the recipe sets mask_generation_prompt={other}"
    ):
        setup_cached_target(handoff.export, handoff.target, recipe_config(other))


def assert_same_floats(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """fp32 values of the same forward. The two runs batch differently (NeMo: pairs in file order
    padded to seq_length; the builder: length-sorted token-budget batches), and CPU kernels round
    differently per batch shape: measured at most 3e-8 (aux) and 6e-7 (probs), most samples
    bit-identical. Any misalignment (a shift, a column order, a wrong mask) is orders larger."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def assert_same_attention_mask(ours: torch.Tensor, theirs: torch.Tensor, pad_token: bool) -> None:
    """Equal, except for a padded sample of a tokenizer without a pad token: its tokenizer pads with
    id 0, NeMo's chat dataset then looks for padding as eos tokens, finds none, and marks the whole
    row attended (storing the target's states at the padding too); the export marks the real tokens,
    as for any other tokenizer."""
    assert ours.dtype == theirs.dtype
    assert torch.equal(ours, theirs) or (not pad_token and bool(theirs.all()))


def test_nemo_reader_yields_nemo_own_cache(handoff):
    """Sample for sample (NeMo keeps a local file's order; ours is the build's permutation, so
    samples are matched by their row in the input): ids, masks everywhere; aux states at the real
    tokens (NeMo also stores them at padding); target_probs where position_mask is set (NeMo also
    stores them at unsupervised positions); equal up to fp32 rounding."""
    ours, theirs = eagle3_cache.CachedEagle3Dataset(str(handoff.export)), eagle3_cache.CachedEagle3Dataset(str(handoff.theirs))
    order = [row["source_index"] for row in load_cache(handoff.cache, layout="raw", streaming=False, columns=["source_index"])]
    assert len(ours) == len(theirs) == len(order) and sorted(order) == list(range(len(theirs)))
    lengths = []
    for i, source_index in enumerate(order):
        a, b = ours[i], theirs[source_index]
        for key in ("input_ids", "loss_mask", "position_mask"):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (source_index, key)
        assert_same_attention_mask(a["attention_mask"], b["attention_mask"], handoff.pad_token)
        real, supervised = a["attention_mask"].bool(), b["position_mask"].squeeze(-1)
        assert_same_floats(a["aux_hidden_states"][real], b["aux_hidden_states"][real])
        assert_same_floats(a["target_probs"][supervised], b["target_probs"][supervised])
        assert not a["target_probs"][~a["loss_mask"].bool()].any()  # ours: zero outside the loss mask
        lengths.append(int(real.sum()))
    # Both ends of the shifted-ids rule are exercised: padded samples and truncated ones.
    assert min(lengths) < SEQ_LENGTH and lengths.count(SEQ_LENGTH) == 2
    assert sum(int(theirs[i]["position_mask"].sum()) for i in range(len(theirs))) > 0


def test_topk_covering_the_draft_vocabulary_exports_dense(chats, tmp_path_factory):
    """--topk >= Vd keeps every column: the export stores target_probs dense (NeMo's reader
    rebuilds top-k factorizations only when K < Vd), equal to NeMo's own probs up to fp32 rounding."""
    root = tmp_path_factory.mktemp("topk-dense")
    run_nemo_precompute(resolve_target("tiny-llama"), chats, root / "nemo-own", False)
    cache, export = build_and_export("tiny-llama", chats, root, False, target_format="topk", topk=DRAFT_VOCAB)
    manifest = eagle3_cache.read_manifest(str(export))
    assert manifest["target_probs_topk"] == DRAFT_VOCAB and not eagle3_cache.is_compressed(DRAFT_VOCAB, DRAFT_VOCAB)
    ours, theirs = eagle3_cache.CachedEagle3Dataset(str(export)), eagle3_cache.CachedEagle3Dataset(str(root / "nemo-own"))
    assert not ours._compressed
    order = [row["source_index"] for row in load_cache(cache, layout="raw", streaming=False, columns=["source_index"])]
    for i, source_index in enumerate(order):
        a, b = ours[i], theirs[source_index]
        supervised = b["position_mask"].squeeze(-1)
        assert torch.equal(a["position_mask"], b["position_mask"])
        assert a["target_probs"].shape == b["target_probs"].shape == (SEQ_LENGTH, DRAFT_VOCAB)
        assert_same_floats(a["target_probs"][supervised], b["target_probs"][supervised])


def test_an_export_in_smaller_shards_reads_the_same_through_nemo(chats, tmp_path, monkeypatch):
    """The export caps NeMo shards at NeMo's 256 samples (a shard is padded in memory); NeMo's
    reader follows the size its manifest names, so the samples are the same whatever the cap."""
    import builder.export as export_module

    cache, export = build_and_export("tiny-llama", chats, tmp_path, mask_generation_prompt=False)
    monkeypatch.setattr(export_module, "NEMO_SHARD_SIZE", 3)
    smaller = tmp_path / "smaller"
    export_cache(cache, "nemo", smaller, progress=False)
    assert json.loads((smaller / "manifest.json").read_text())["shard_size"] == 3
    assert len(list(smaller.glob("shard-*.safetensors"))) == -(-len(CHATS["sample-sharegpt"] + CHATS["sample-openai"]) // 3)
    ours, reference = eagle3_cache.CachedEagle3Dataset(str(smaller)), eagle3_cache.CachedEagle3Dataset(str(export))
    assert len(ours) == len(reference) == 8
    for i in range(len(reference)):
        a, b = ours[i], reference[i]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), i


# ---- training on the export ----------------------------------------------------------------


def nemo_recipe(export, output_dir, monkeypatch):
    """NeMo's TrainEagle3Recipe set up over the export as its train_eagle3 entry point sets it up:
    draft, trainer module and optimizer, with one change: a single process, without the global
    process group it would initialize (and leave behind for the other tests)."""
    monkeypatch.setattr(train_eagle3, "initialize_distributed", lambda **_: DistInfo("gloo", 0, 1, None, True))
    monkeypatch.setattr(train_eagle3, "setup_logging", lambda: None)
    settings = {
        "target_model_name_or_path": resolve_target("tiny-llama"),
        "cached_target_path": str(export),
        "micro_batch_size": 2,
        "ttt_steps": 3,
        "num_epochs": 1,
        "output_dir": str(output_dir),
        "seq_length": SEQ_LENGTH,
    }
    torch.manual_seed(0)
    recipe = train_eagle3.TrainEagle3Recipe(ConfigNode({"recipe_args": settings, "optimizer": {"lr": 1e-3}}))
    recipe.setup()
    return recipe


MIXED_DTYPES = {
    "bf16-cache-fp32-aux": dict(dtype="bf16", aux_dtype="fp32"),
    "fp32-cache-fp8-aux": dict(dtype="fp32", aux_dtype="fp8"),
}


@pytest.mark.parametrize("dtypes", list(MIXED_DTYPES))
def test_nemo_trains_on_the_export_of_a_cache_whose_aux_dtype_is_not_its_dtype(dtypes, chats, tmp_path, monkeypatch):
    """NeMo's format holds one float dtype, its manifest's `dtype`: its recipe feeds the aux states
    uncast into the draft's fc, built in its compute dtype (bf16 on a GPU, fp32 on the CPU). The
    export writes them in the cache's --dtype, whatever --aux-dtype stored them as, and one step of
    NeMo's own training (its forward, then backward and optimizer step) runs on them; the draft is
    cast to the cache's dtype, as a GPU run of a bf16 cache has it."""
    _, export = build_and_export("tiny-llama", chats, tmp_path, False, **MIXED_DTYPES[dtypes])
    dtype = TORCH_DTYPES[eagle3_cache.read_manifest(str(export))["dtype"]]
    for shard in sorted(export.glob("shard-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            assert f.get_tensor("aux_hidden_states").dtype == dtype, shard.name
    recipe = nemo_recipe(export, tmp_path / "train", monkeypatch)
    recipe.draft_model.to(dtype)
    fc = recipe.draft_model.get_parameter("model.fc.weight")
    before = fc.detach().clone()
    batch = next(iter(recipe.train_dataloader))
    assert batch["aux_hidden_states"].dtype == dtype
    metrics = recipe._forward_batch(batch)
    metrics.loss.backward()
    recipe.optimizer.step()
    assert torch.isfinite(metrics.loss) and int(metrics.valid_tokens) > 0
    assert not torch.equal(fc.detach(), before)
