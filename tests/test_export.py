"""Exports: NeMo Automodel's cached_target_path (format 2) and SpecForge's offline files hold
exactly what the reader yields, in each trainer's own conventions. (NeMo's own code reading the
export: tests/test_nemo_handoff.py.)"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import resource
import shutil
import signal
import stat
import types
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import export_signalled_at, folder_of_caches, hub_cache_holding, record_in_card, says, small_config
from hub_server import hub_fixtures
from safetensors import safe_open
from tiny_targets import _init_weights, _text_settings, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, CohereConfig, Gemma2Config, PhiConfig

import builder.export as export_module
from builder.cli import main
from builder.embedded import resolve_target
from builder.errors import Eagle3CacheError
from builder.export import ExportError, export_cache, nemo_manifest, nemo_pad_id
from builder.faults import FAULT_ENV, FaultPoints
from builder.pipeline import build
from builder.reader import collate_nemo, load_cache, read_manifest, read_vocab


def read_safetensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def probs_cache(tmp_path_factory):
    # long enough that some samples are padded, not only truncated
    return build(small_config(tmp_path_factory.mktemp("probs") / "cache", dtype="bf16", seq_length=256), progress=False).output_dir


@pytest.fixture(scope="module")
def probs_fp32_cache(tmp_path_factory):
    return build(small_config(tmp_path_factory.mktemp("probs32") / "cache"), progress=False).output_dir


@pytest.fixture(scope="module")
def hidden_cache(tmp_path_factory):
    return build(small_config(tmp_path_factory.mktemp("hidden") / "cache", target_format="hidden"), progress=False).output_dir


def nemo_ids(samples: list[dict], seq_length: int, pad_id: int) -> torch.Tensor:
    """NeMo's shifted ids: the unshifted ids padded with pad_id to seq_length, shifted left, 0 last."""
    rows = []
    for sample in samples:
        # the reader's shifted ids are x1 .. x(L-1), 0: back at positions 1 .. L-1 (position 0 is shifted out)
        unshifted = torch.cat([sample["input_ids"][:1], sample["input_ids"][:-1]])
        padded = torch.full((seq_length,), pad_id, dtype=torch.long)
        padded[: unshifted.numel()] = unshifted
        rows.append(torch.cat([padded[1:], torch.zeros(1, dtype=torch.long)]))
    return torch.stack(rows)


def test_nemo_export_matches_the_reader_padded_to_seq_length(probs_cache, tmp_path, capsys):
    out = tmp_path / "nemo"
    assert main(["export", str(probs_cache), "--to", "nemo", str(out)]) == 0
    samples = list(load_cache(probs_cache, layout="nemo", streaming=False))
    names = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert names == [f"shard-{i:06d}.safetensors" for i in range(4)]
    expected_dtypes = {
        "input_ids": torch.int64,
        "attention_mask": torch.int64,
        "loss_mask": torch.int64,
        "aux_hidden_states": torch.bfloat16,
        "position_mask": torch.bool,
        "target_probs": torch.bfloat16,
    }
    pad_id = AutoTokenizer.from_pretrained(resolve_target("tiny-llama")).pad_token_id
    lengths = []
    for i, name in enumerate(names):
        shard = read_safetensors(out / name)
        want = collate_nemo(samples[4 * i : 4 * i + 4], pad_to=256)
        want["input_ids"] = nemo_ids(samples[4 * i : 4 * i + 4], 256, pad_id)
        n = len(samples[4 * i : 4 * i + 4])
        assert {k: v.dtype for k, v in shard.items()} == expected_dtypes
        assert shard["input_ids"].shape == (n, 256) and shard["aux_hidden_states"].shape == (n, 256, 192)
        assert shard["target_probs"].shape == (n, 256, 300) and shard["position_mask"].shape == (n, 256, 1)
        for key in expected_dtypes:
            assert torch.equal(shard[key], want[key]), key
        lengths += shard["attention_mask"].sum(-1).tolist()
    assert min(lengths) < 256 and max(lengths) == 256  # padded samples and truncated ones
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["num_samples"] == 14 and manifest["shard_size"] == 4
    assert manifest["dtype"] == "bf16" and manifest["aux_hidden_dim"] == 192 and manifest["aux_layer_ids"] == [1, 3, 4]
    assert manifest["draft_vocab_size"] == len(manifest["selected_token_ids"]) == 300 and manifest["target_probs_topk"] == 0
    assert manifest["mask_generation_prompt"] is False and manifest["mask_reasoning_content"] is False
    embeddings = read_safetensors(out / "target_embeddings.safetensors")["weight"]
    model = AutoModelForCausalLM.from_pretrained(resolve_target("tiny-llama"), dtype=torch.float32)
    assert embeddings.dtype == torch.float32 and torch.equal(embeddings, model.get_input_embeddings().weight)


def test_export_paths_with_a_tilde_are_in_the_home_folder(probs_cache, tmp_path, monkeypatch):
    """`~` means the home folder, as the command line's shell reads it, for the cache and OUT alike:
    not a folder named `~` under the working directory."""
    monkeypatch.setenv("HOME", str(probs_cache.parent))
    monkeypatch.chdir(tmp_path)
    assert export_cache(f"~/{probs_cache.name}", "nemo", "~/nemo", progress=False) == probs_cache.parent / "nemo"
    assert json.loads((probs_cache.parent / "nemo" / "manifest.json").read_text())["num_samples"] == 14
    assert not (tmp_path / "~").exists()


def test_nemo_pad_id_is_the_one_nemo_loads_the_tokenizer_with(tmp_path):
    """NeMo's tokenizer pads with its pad id, 0 where it has none (as NeMo's loader sets it) or where it is 0."""
    from tiny_targets import target_without_pad_token

    tokenizer = AutoTokenizer.from_pretrained(resolve_target("tiny-llama"))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (2, 1) and nemo_pad_id(tokenizer) == 2
    tokenizer.pad_token_id = 0
    assert nemo_pad_id(tokenizer) == 0
    tokenizer = AutoTokenizer.from_pretrained(target_without_pad_token(tmp_path / "target"))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (None, 1) and nemo_pad_id(tokenizer) == 0


@pytest.mark.parametrize(
    "recorded",
    [
        {},
        {"mask_generation_prompt": True},
        {"mask_reasoning_content": True},
        {"mask_generation_prompt": True, "mask_reasoning_content": False},
    ],
)
def test_nemo_manifest_records_the_mask_options_the_build_applied(probs_cache, recorded):
    manifest = read_manifest(probs_cache)
    manifest = {**manifest, "identity": {**manifest["identity"], **recorded}}
    written = nemo_manifest(probs_cache, manifest, 14)
    assert written["mask_generation_prompt"] is recorded.get("mask_generation_prompt", False)
    assert written["mask_reasoning_content"] is recorded.get("mask_reasoning_content", False)


@pytest.mark.parametrize("dtype, values_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_nemo_export_of_a_topk_cache_stores_values_and_indices(tmp_path, dtype, values_dtype):
    """The values in the cache's dtype, which the export's manifest names (the top K are picked in fp32)."""
    cache = build(small_config(tmp_path / "cache", target_format="topk", topk=8, dtype=dtype), progress=False).output_dir
    export_cache(cache, "nemo", tmp_path / "nemo", progress=False)
    shard = read_safetensors(tmp_path / "nemo" / "shard-000000.safetensors")
    assert shard["target_probs_indices"].dtype == torch.int32 and shard["target_probs_values"].shape == (4, 96, 8)
    assert shard["target_probs_values"].dtype == values_dtype
    want = collate_nemo(list(load_cache(cache, layout="nemo", streaming=False))[:4], pad_to=96)["target_probs"]
    rebuilt = torch.zeros_like(want).scatter(-1, shard["target_probs_indices"].long(), shard["target_probs_values"])
    assert torch.equal(rebuilt, want)
    manifest = json.loads((tmp_path / "nemo" / "manifest.json").read_text())
    assert manifest["target_probs_topk"] == 8 and manifest["dtype"] == dtype


def test_nemo_export_of_a_topk_covering_the_draft_vocabulary_is_dense(tmp_path):
    """K >= Vd compresses nothing: NeMo's reader expects dense target_probs then."""
    cache = build(small_config(tmp_path / "cache", target_format="topk", topk=300), progress=False).output_dir
    export_cache(cache, "nemo", tmp_path / "nemo", progress=False)
    shard = read_safetensors(tmp_path / "nemo" / "shard-000000.safetensors")
    assert "target_probs_values" not in shard and "target_probs_indices" not in shard
    want = collate_nemo(list(load_cache(cache, layout="nemo", streaming=False))[:4], pad_to=96)["target_probs"]
    assert shard["target_probs"].shape == (4, 96, 300) and torch.equal(shard["target_probs"], want)
    assert json.loads((tmp_path / "nemo" / "manifest.json").read_text())["target_probs_topk"] == 300


def test_specforge_export(hidden_cache, tmp_path):
    out = export_cache(hidden_cache, "specforge", tmp_path / "sf", progress=False)
    raw = list(load_cache(hidden_cache, layout="raw", streaming=False))
    assert len(list(out.glob("data_*.ckpt"))) == len(raw) == 14
    for i, row in enumerate(raw):
        sample = torch.load(out / f"data_{i}.ckpt", weights_only=True)
        assert set(sample) == {"input_ids", "loss_mask", "hidden_state", "aux_hidden_state"}
        assert sample["input_ids"].dtype == torch.int64 and torch.equal(sample["input_ids"], row["input_ids"].long())
        assert torch.equal(sample["loss_mask"], row["loss_mask"].long())
        assert torch.equal(sample["hidden_state"], row["final_hidden"][None]) and sample["hidden_state"].shape == (1, row["num_tokens"], 64)
        assert torch.equal(sample["aux_hidden_state"], row["aux_hidden_states"][None])
    mapping = torch.load(out / "vocab_mapping.pt", weights_only=True)
    assert mapping["t2d"].dtype == torch.bool and mapping["t2d"].shape == (1024,) and mapping["t2d"].sum() == 300
    assert mapping["d2t"].dtype == torch.int64 and mapping["d2t"].shape == (300,)


def test_specforge_supervision_equals_a_probs_cache(hidden_cache, probs_fp32_cache, tmp_path):
    """Computed SpecForge's way -- target = softmax(lm_head(hidden_state)[..., t2d]), draft column i
    <-> token i + d2t[i] -- an exported sample's supervision is the probs cache's, column by token id."""
    out = export_cache(hidden_cache, "specforge", tmp_path / "sf", progress=False)
    mapping = torch.load(out / "vocab_mapping.pt", weights_only=True)
    lm_head = AutoModelForCausalLM.from_pretrained(resolve_target("tiny-llama"), dtype=torch.float32).lm_head
    draft_token = torch.arange(300) + mapping["d2t"]  # SpecForge's meaning of its draft column i
    assert torch.equal(mapping["t2d"].nonzero().squeeze(-1), draft_token)  # the columns t2d picks, in its order
    column_of_token = torch.full((1024,), -1, dtype=torch.long)
    column_of_token[draft_token] = torch.arange(300)
    selected = read_vocab(probs_fp32_cache)["selected_token_ids"]  # the probs cache's columns (NeMo's order)
    columns = column_of_token[selected.long()]
    assert (columns >= 0).all() and not torch.equal(columns, torch.arange(300))  # same tokens, other order
    probs_rows = list(load_cache(probs_fp32_cache, layout="raw", streaming=False))
    for i, row in enumerate(probs_rows):
        sample = torch.load(out / f"data_{i}.ckpt", weights_only=True)
        assert torch.equal(sample["input_ids"], row["input_ids"].long())
        loss = sample["loss_mask"].bool()
        with torch.no_grad():
            logits = lm_head(sample["hidden_state"][0][loss])
        specforge_target = torch.softmax(logits[..., mapping["t2d"]], dim=-1)
        # fp32 of the same logits, summed in another column order (and a per-sample head matmul
        # against the build's batched one): equal up to rounding; a wrong column is ~1e-2 off.
        torch.testing.assert_close(specforge_target[:, columns], row["target_probs"], rtol=1e-5, atol=1e-7)


def test_exports_write_aux_states_in_the_caches_dtype(tmp_path):
    """Each trainer's files hold one float dtype: aux states stored as --aux-dtype fp8 are exported
    as the fp32 the reader decodes them to (the scale applied in fp32), beside fp32 final states."""
    cache = build(small_config(tmp_path / "cache", target_format="hidden", max_samples=4, aux_dtype="fp8"), progress=False).output_dir
    nemo = export_cache(cache, "nemo", tmp_path / "nemo", progress=False)
    specforge = export_cache(cache, "specforge", tmp_path / "sf", progress=False)
    samples = list(load_cache(cache, layout="nemo", streaming=False, aux_dtype=torch.float32))
    shard = read_safetensors(nemo / "shard-000000.safetensors")
    assert torch.equal(shard["aux_hidden_states"], collate_nemo(samples, pad_to=96)["aux_hidden_states"])
    assert shard["aux_hidden_states"].dtype == shard["target_probs"].dtype == torch.float32
    for i, sample in enumerate(samples):
        written = torch.load(specforge / f"data_{i}.ckpt", weights_only=True)
        assert torch.equal(written["aux_hidden_state"], sample["aux_hidden_states"][None])
        assert written["hidden_state"].dtype == torch.float32


def large_residual_target(folder):
    """The tiny target with its embeddings 1e7 times larger: its residual stream, and so its aux
    states, reach about 2e6, past fp16's range; the norms keep its logits as they were."""
    target = copy_of_target(folder)
    name = "model.embed_tokens.weight"
    rewrite_weights(target, lambda tensors: tensors | {name: tensors[name] * 1e7})
    return target


def test_exports_refuse_aux_states_beyond_the_range_of_the_caches_dtype(tmp_path):
    target = large_residual_target(tmp_path / "target")
    cfg = small_config(tmp_path / "cache", target=target, target_format="hidden", max_samples=4, dtype="fp16", aux_dtype="fp32")
    cache = build(cfg, progress=False).output_dir
    for to in ("nemo", "specforge"):
        with pytest.raises(
            ExportError, match=says("sample 0", "beyond the range of fp16", "65504", "--aux-dtype fp32", "--dtype bf16 or fp32")
        ):
            export_cache(cache, to, tmp_path / to, progress=False)
        assert not (tmp_path / to).exists()


@pytest.fixture
def nothing_made(monkeypatch):
    """Fails a test whose export begins writing: every refusal comes before anything is made."""

    def refused_too_late(out, *args):
        raise AssertionError(f"the export began writing {out} before refusing")

    monkeypatch.setattr(export_module, "export_folder", refused_too_late)


def test_export_errors_are_clear(probs_cache, tmp_path, nothing_made):
    with pytest.raises(ExportError, match=says("SpecForge", "hidden states", "--target-format probs", "--target-format hidden")):
        export_cache(probs_cache, "specforge", tmp_path / "sf", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ExportError, match=says("is not empty", "never overwrites", "pass a new directory")):
        export_cache(probs_cache, "nemo", tmp_path / "full", progress=False)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ExportError, match=says(f"{tmp_path / 'a-file'} is a file", "expected a new or empty directory")):
        export_cache(probs_cache, "nemo", tmp_path / "a-file", progress=False)
    with pytest.raises(ExportError, match=says("--to: expected one of nemo, specforge", "'megatron'")):
        export_cache(probs_cache, "megatron", tmp_path / "mg", progress=False)
    assert left_in(tmp_path) == ["a-file", "full"]


@pytest.mark.parametrize("to, trainer, target_format", [("nemo", "NeMo", "probs"), ("specforge", "SpecForge", "hidden")])
def test_export_refuses_a_cache_without_three_aux_layers(tmp_path, nothing_made, to, trainer, target_format):
    """NeMo's and SpecForge's EAGLE-3 drafts take exactly three aux layers' states: a cache of two is
    refused before anything is made, not handed to NeMo, whose recipe would call it a cache of another
    target, or to SpecForge, whose draft fails its width check at the first step."""
    cfg = small_config(tmp_path / "cache", max_samples=2, aux_layer_ids=(1, 3), target_format=target_format)
    cache = build(cfg, progress=False).output_dir
    (tmp_path / "out").mkdir()
    expected = (f"export --to {to}", f"{trainer}'s EAGLE-3 draft", "exactly 3 aux layers", "holds 2", "--aux-layer-ids 1 3", "three")
    with pytest.raises(ExportError, match=says(*expected)):
        export_cache(cache, to, tmp_path / "out", progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def head_term_target(directory: Path, term: str) -> Path:
    """A tiny random target whose head applies `term` after lm_head's weight."""
    tok = tiny_tokenizer()
    configs = {
        "final_logit_softcapping=5.0": lambda: Gemma2Config(**_text_settings(tok, final_logit_softcapping=5.0, sliding_window=16)),
        "logit_scale=0.25": lambda: CohereConfig(**_text_settings(tok, logit_scale=0.25)),
        "an lm_head bias": lambda: PhiConfig(**{k: v for k, v in _text_settings(tok).items() if k != "head_dim"}),
    }
    model = AutoModelForCausalLM.from_config(configs[term](), dtype=torch.float32)
    _init_weights(model, 0)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("term", ["final_logit_softcapping=5.0", "logit_scale=0.25", "an lm_head bias"])
def test_specforge_export_refuses_a_target_whose_head_is_more_than_lm_head(tmp_path, nothing_made, term):
    """SpecForge's offline TargetHead is a bare lm_head weight: it would drop the target's logit term or
    bias and train the draft toward other distributions, so such a cache is refused before anything is
    made, naming the term and the exports that carry the target's distributions."""
    target = head_term_target(tmp_path / "target", term)
    cache = build(small_config(tmp_path / "cache", target, target_format="hidden", max_samples=2), progress=False).output_dir
    (tmp_path / "out").mkdir()
    expected = ("export --to specforge", term, "TargetHead", "not be the target's distributions", "--to nemo", "--target-format probs")
    with pytest.raises(ExportError, match=says(*expected)):
        export_cache(cache, "specforge", tmp_path / "out", progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_head_term_that_changes_no_logit_does_not_stop_a_specforge_export():
    """A multiplier or divisor of 1 (Granite's default logits_scaling) leaves lm_head's logits as they are."""
    source = types.SimpleNamespace(location="cache")
    unit_scales = {"logits_scaling": 1.0, "logit_scale": 1, "lm_head_multiplier": 1.0, "final_logit_softcapping": None}
    export_module.check_bare_lm_head(source, unit_scales)
    with pytest.raises(ExportError, match=says("logits_scaling=4.0", "lm_head_multiplier=0.5")):
        export_module.check_bare_lm_head(source, {"logits_scaling": 4.0, "logit_scale": 1, "lm_head_multiplier": 0.5})


def test_an_out_holding_only_a_killed_exports_hidden_folder_says_so(probs_cache, tmp_path, nothing_made):
    out = tmp_path / "out"
    (out / ".export.tmp-4242").mkdir(parents=True)
    with pytest.raises(ExportError, match=says("holds only .export.tmp-4242", "killed before it finished", "delete that folder")):
        export_cache(probs_cache, "nemo", out, progress=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=says("is not empty", "never overwrites")):
        export_cache(probs_cache, "nemo", out, progress=False)


def test_the_hidden_folder_a_killed_export_left_beside_a_new_out_is_named_never_deleted(probs_cache, tmp_path, nothing_made):
    """An export into a new OUT writes in `.OUT.tmp-PID` beside it: killed, it leaves that folder, as
    large as the export. The next export into OUT names it, new or empty (another export into OUT
    could be writing it)."""
    out = tmp_path / "nemo"
    left = tmp_path / ".nemo.tmp-4242"
    left.mkdir()
    (left / "shard-000000.safetensors-part").write_bytes(b"what the killed export wrote")
    refused = says(
        f"beside {out} is the hidden folder {left}",
        f"an export into {out} that was killed before it finished",
        f"If no export into {out} is running, delete that folder",
        "run the export again",
    )
    with pytest.raises(ExportError, match=refused):
        export_cache(probs_cache, "nemo", out, progress=False)
    out.mkdir()
    with pytest.raises(ExportError, match=refused):
        export_cache(probs_cache, "nemo", out, progress=False)
    assert left_in(tmp_path) == [".nemo.tmp-4242", "nemo"] and left_in(left) == ["shard-000000.safetensors-part"]
    shutil.rmtree(left)
    for others in (".nemo.tmp-old", ".nemo-2.tmp-17", ".nemo.tmp-17.log"):  # not the name an export into OUT writes in
        (tmp_path / others).mkdir()
    with pytest.raises(AssertionError, match="began writing"):  # every check passed
        export_cache(probs_cache, "nemo", out, progress=False)


@pytest.mark.parametrize("kind", ["file", "link to a folder"])
def test_a_file_or_link_named_like_a_killed_exports_hidden_folder_makes_out_not_empty(probs_cache, tmp_path, nothing_made, kind):
    """Only a folder of its own is an export's hidden folder: anything else by that name is someone's."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "theirs").mkdir()
    named = out / ".export.tmp-4242"
    named.write_text("mine") if kind == "file" else named.symlink_to(tmp_path / "theirs")
    not_empty = says(f"{out} is not empty: it holds .export.tmp-4242", "never overwrites", "pass a new directory")
    with pytest.raises(ExportError, match=not_empty):
        export_cache(probs_cache, "nemo", out, progress=False)


def test_a_link_beside_a_new_out_named_like_a_killed_exports_folder_is_left_alone(probs_cache, tmp_path):
    """A link named `.OUT.tmp-PID` beside OUT, even to a folder, is no export's hidden folder: the export
    runs, and neither the link nor the folder it names is touched."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    link = tmp_path / ".nemo.tmp-4242"
    link.symlink_to(theirs)
    out = export_cache(probs_cache, "nemo", tmp_path / "nemo", progress=False)
    assert (out / "manifest.json").is_file() and left_in(tmp_path) == [".nemo.tmp-4242", "nemo", "theirs"]
    assert link.is_symlink() and os.readlink(link) == str(theirs) and left_in(theirs) == ["notes.txt"]
    assert (theirs / "notes.txt").read_text() == "mine"


def test_export_refuses_a_folder_that_holds_no_finished_cache(tmp_path, nothing_made):
    missing = tmp_path / "missing"
    with pytest.raises(ExportError, match=says(f"{missing} does not exist", "expected a cache directory", "eagle3-cache build")):
        export_cache(missing, "nemo", tmp_path / "nemo", progress=False)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ExportError, match=says("a-file is not a directory", "expected a cache directory")):
        export_cache(tmp_path / "a-file", "specforge", tmp_path / "sf", progress=False)
    (tmp_path / "interrupted").mkdir()
    with pytest.raises(ExportError, match=says("no README.md", "expected a finished eagle3-cache directory", "--resume")):
        export_cache(tmp_path / "interrupted", "nemo", tmp_path / "nemo", progress=False)
    assert left_in(tmp_path) == ["a-file", "interrupted"]


def test_a_config_a_local_folder_does_not_hold_is_refused_by_its_root_card(probs_cache, tmp_path, nothing_made, capsys):
    """As for a repo on the Hub: a name its index card does not list, or a name for a folder holding one cache at
    its root, is refused by what the root card holds, not as an interrupted build."""
    several = folder_of_caches(tmp_path / "copy", {"one": probs_cache, "two": probs_cache})
    not_listed = "the directory holds the caches ['one', 'two'], not 'three': pass one of them as --name"
    assert main(["export", str(several), "--name", "three", "--to", "nemo", str(tmp_path / "three")]) == 2
    assert not_listed in (refusal := capsys.readouterr().err) and "--resume" not in refusal
    with pytest.raises(FileNotFoundError, match=re.escape(f"no three/README.md; {not_listed}")):
        read_manifest(several, name="three")
    at_root = "the directory holds one cache, at its root, and no configs: leave out --name one (name= in Python)"
    assert main(["export", str(probs_cache), "--name", "one", "--to", "nemo", str(tmp_path / "one")]) == 2
    assert at_root in (refusal := capsys.readouterr().err) and "--resume" not in refusal
    assert left_in(tmp_path) == ["copy"]


def test_a_folder_of_caches_without_an_index_card_is_told_to_pass_the_caches_own_directory(probs_cache, tmp_path, nothing_made, capsys):
    """Caches copied side by side into a folder: a config's folder has its card, but the reader finds a
    config by the root card's index, which the folder has none of."""
    caches = tmp_path / "caches"
    for name in ("one", "two"):
        shutil.copytree(probs_cache, caches / name)
    no_index = (f"{caches} has no index card", f"pass the cache's own directory ({caches / 'one'}) and no --name")
    assert main(["export", str(caches), "--name", "one", "--to", "nemo", str(tmp_path / "out")]) == 2
    refusal = capsys.readouterr().err
    assert refusal.startswith(f"error: export: {caches} (config one): ") and all(fact in refusal for fact in no_index)
    with pytest.raises(Eagle3CacheError, match=says("BuilderConfig 'one' not found", *no_index)):
        load_cache(caches, name="one")
    assert left_in(tmp_path) == ["caches"]


def test_a_config_of_a_local_copy_of_a_repo_holding_several_caches_is_exported_by_its_name(probs_cache, tmp_path):
    several = folder_of_caches(tmp_path / "copy", {"one": probs_cache, "two": probs_cache})
    assert main(["export", str(several), "--name", "two", "--to", "nemo", str(tmp_path / "two")]) == 0
    direct = export_cache(probs_cache, "nemo", tmp_path / "direct", progress=False)
    assert {path.name: path.read_bytes() for path in (tmp_path / "two").iterdir()} == {
        path.name: path.read_bytes() for path in direct.iterdir()
    }


def test_a_single_cache_is_exported_by_the_name_default_as_without_a_name(probs_cache, tmp_path):
    """`default` is the config at the root, as load_cache, read_manifest and verify read it."""
    assert main(["export", str(probs_cache), "--name", "default", "--to", "nemo", str(tmp_path / "named")]) == 0
    unnamed = export_cache(probs_cache, "nemo", tmp_path / "unnamed", progress=False)
    assert {path.name: path.read_bytes() for path in (tmp_path / "named").iterdir()} == {
        path.name: path.read_bytes() for path in unnamed.iterdir()
    }


def test_a_revision_with_a_local_cache_is_refused_as_a_flag_it_would_ignore(probs_cache, tmp_path, nothing_made, capsys):
    """A directory has no revisions: --revision is for a repo id, as the usage says, not silently dropped."""
    assert main(["export", str(probs_cache), "--revision", "v1", "--to", "nemo", str(tmp_path / "nemo")]) == 2
    refusal = capsys.readouterr().err
    for fact in ("--revision 'v1' is for a Hub dataset repo id", "a local directory, which has no revisions", "leave it out"):
        assert fact in refusal
    assert left_in(tmp_path) == []
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    usage = capsys.readouterr().out
    assert "DIR|REPO" in usage and "--revision REVISION" in usage and "--name CONFIG" in usage


def test_a_revision_with_a_local_folder_named_as_a_repo_id_says_the_folder_hides_the_repo(
    probs_cache, tmp_path, monkeypatch, nothing_made, capsys
):
    """A download of a repo into a folder of its own name, here: the repo id given with --revision reads the folder."""
    shutil.copytree(probs_cache, tmp_path / "tester" / "sel")
    monkeypatch.chdir(tmp_path)
    assert main(["export", "tester/sel", "--revision", "next", "--to", "nemo", "out"]) == 2
    refusal = capsys.readouterr().err
    hidden = ("tester/sel is one, but it is also a local directory here", "hides the repo of that name")
    to_do = ("run the command from another directory", "rename or move the folder tester/sel", "leave out --revision")
    assert all(fact in refusal for fact in hidden + to_do) and "export REPO_ID" not in refusal
    assert left_in(tmp_path) == ["tester"]


def test_export_command_refuses_without_a_traceback(probs_cache, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    assert main(["export", str(tmp_path / "missing"), "--to", "nemo", str(tmp_path / "e1")]) == 2
    assert main(["export", str(probs_cache), "--to", "specforge", str(tmp_path / "e2")]) == 2
    assert main(["export", str(probs_cache), "--to", "nemo", str(tmp_path / "a-file")]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert [line.split(";")[0] for line in errors] == [
        f"error: export: {tmp_path / 'missing'} does not exist",
        "error: export --to specforge: SpecForge trains from final hidden states",
        f"error: export: {tmp_path / 'a-file'} is a file",
    ]
    assert left_in(tmp_path) == ["a-file"]


# ---- OUT complete or as it was: a write that fails leaves nothing ----------------------------


def fail_on_call(monkeypatch, module, name: str, call: int, fail) -> None:
    """The writer `module.name` runs `fail(real, *args)` on its `call`-th call instead of writing."""
    real, calls = getattr(module, name), [0]

    def writer(*args):
        calls[0] += 1
        return fail(real, *args) if calls[0] == call else real(*args)

    monkeypatch.setattr(module, name, writer)


@contextmanager
def file_size_limit(nbytes: int):
    """Writes past `nbytes` fail with the OS's own EFBIG, as on a file system whose files cannot grow."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the error, not the signal that kills by default
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)


def disk_full_partway(real, tensors, path):
    with open(path, "wb") as f:
        f.write(b"x" * 1000)
    raise OSError(errno.ENOSPC, "No space left on device", path)


def left_in(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_nemo_export_on_a_full_disk_leaves_no_out_and_can_be_rerun(probs_cache, tmp_path, monkeypatch):
    fail_on_call(monkeypatch, export_module, "save_file", 3, disk_full_partway)
    out = tmp_path / "exports" / "nemo"
    no_space = says("no space left writing shard-000002.safetensors", f"nothing was left at {out}", "Free space")
    with pytest.raises(ExportError, match=no_space):
        export_cache(probs_cache, "nemo", out, progress=False)
    assert left_in(tmp_path) == []  # no OUT, no hidden partial export, not even the parent made for it
    monkeypatch.undo()
    assert main(["export", str(probs_cache), "--to", "nemo", str(out)]) == 0  # not refused as "not empty"
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 14 and left_in(out.parent) == ["nemo"]


def test_nemo_export_that_safetensors_cannot_write_leaves_an_empty_out_as_it_was(probs_cache, tmp_path, monkeypatch, capsys):
    def too_large(real, tensors, path):
        with file_size_limit(1000):
            return real(tensors, path)  # safetensors' own error, carrying the OS's in its text

    fail_on_call(monkeypatch, export_module, "save_file", 2, too_large)
    out = tmp_path / "nemo"
    out.mkdir()
    out.chmod(0o2770)
    inode = out.stat().st_ino
    assert main(["export", str(probs_cache), "--to", "nemo", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no space left writing shard-000001.safetensors (File too large)" in err and "Traceback" not in err
    assert f"nothing was left at {out}" in err and "Free space" in err
    assert left_in(tmp_path) == ["nemo"] and left_in(out) == []
    assert (out.stat().st_ino, mode_of(out)) == (inode, 0o2770)


def test_specforge_export_that_torch_cannot_write_leaves_no_out(hidden_cache, tmp_path, monkeypatch):
    def too_large(real, obj, path):
        with file_size_limit(1000):
            return real(obj, path)  # torch.save's own error, which names no cause

    fail_on_call(monkeypatch, torch, "save", 3, too_large)
    with pytest.raises(ExportError, match=says("writing data_2.ckpt failed", "nothing was left at", "Free space if the disk is full")):
        export_cache(hidden_cache, "specforge", tmp_path / "sf", progress=False)
    assert left_in(tmp_path) == []


def test_nemo_export_failing_for_another_reason_says_to_fix_it(probs_cache, tmp_path, monkeypatch):
    def io_error(real, tensors, path):
        raise OSError(errno.EIO, "Input/output error", path)

    fail_on_call(monkeypatch, export_module, "save_file", 1, io_error)
    fix = says("writing shard-000000.safetensors failed (Input/output error)", "nothing was left at", "Fix the cause")
    with pytest.raises(ExportError, match=fix):
        export_cache(probs_cache, "nemo", tmp_path / "nemo", progress=False)
    assert left_in(tmp_path) == []


def test_an_export_never_replaces_an_out_filled_while_it_ran(probs_cache, tmp_path, monkeypatch):
    out = tmp_path / "nemo"
    out.mkdir()

    def someone_writes_into_out(real, tensors, path):
        (out / "theirs.txt").write_text("not ours")
        return real(tensors, path)

    fail_on_call(monkeypatch, export_module, "save_file", 1, someone_writes_into_out)
    with pytest.raises(ExportError, match=says(f"{out} was filled", "never overwrites", "Pass a new directory")):
        export_cache(probs_cache, "nemo", out, progress=False)
    assert left_in(tmp_path) == ["nemo"] and left_in(out) == ["theirs.txt"]


# ---- an existing empty OUT is filled in place ----------------------------------------------


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o002, 0o077], ids=["umask-022", "umask-002", "umask-077"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def test_every_file_of_a_cache_and_its_exports_gets_the_mode_the_umask_gives(umask, tmp_path):
    """safetensors makes its files 0600; those of a cache (the draft vocabulary, a hidden cache's head)
    and of an export (NeMo's shards and target embeddings) get the mode every other file gets, so a
    cache or export in a group-shared folder is readable by the group, and a private one stays private.
    The build's lock files too: under umask 002 the group can open them, so a member can resume the build."""
    cache = build(small_config(tmp_path / "cache", target_format="hidden"), progress=False).output_dir
    export_cache(cache, "nemo", tmp_path / "nemo", progress=False)
    export_cache(cache, "specforge", tmp_path / "sf", progress=False)
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    names = {path.name for path in written}
    assert {"vocab.safetensors", "lm_head.safetensors", "shard-000000.safetensors", "target_embeddings.safetensors"} <= names
    assert {"data_0.ckpt", "vocab_mapping.pt", "manifest.json", "README.md"} <= names
    assert {str(path.relative_to(tmp_path)): mode_of(path) for path in written} == {
        str(path.relative_to(tmp_path)): 0o666 & ~umask for path in written
    }


def test_an_export_into_an_existing_empty_out_keeps_the_folder_its_mode_and_group(hidden_cache, tmp_path):
    """A folder prepared private (group-shared, setgid, nothing for others) stays that folder."""
    out = tmp_path / "sf"
    out.mkdir()
    out.chmod(0o2770)
    before = out.stat()
    assert export_cache(hidden_cache, "specforge", out, progress=False) == out
    after = out.stat()
    assert (after.st_ino, after.st_gid, mode_of(out)) == (before.st_ino, before.st_gid, 0o2770)
    assert len(list(out.glob("data_*.ckpt"))) == 14 and (out / "vocab_mapping.pt").is_file()
    assert [name for name in left_in(out) if name.startswith(".")] == [] and left_in(tmp_path) == ["sf"]


def test_an_export_into_the_current_directory_fills_it(hidden_cache, tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    inode = os.stat(".").st_ino
    assert main(["export", str(hidden_cache), "--to", "specforge", "."]) == 0
    assert os.stat(".").st_ino == inode and len(os.listdir(".")) == 15 and "vocab_mapping.pt" in os.listdir(".")


def test_an_export_fills_an_empty_mount_point(hidden_cache, tmp_path, monkeypatch):
    """A mount point (a container's volume) cannot be replaced; filled in place, it need not be."""
    out = tmp_path / "volume"
    out.mkdir()
    monkeypatch.setattr("os.path.ismount", lambda path: str(path) == str(out))
    export_cache(hidden_cache, "specforge", out, progress=False)
    assert (out / "vocab_mapping.pt").is_file() and left_in(tmp_path) == ["volume"]


def fresh_file_system_root(path: Path) -> Path:
    """A folder as the root of a freshly made ext file system is: empty but for lost+found (root's alone)."""
    (path / "lost+found").mkdir(parents=True)
    (path / "lost+found" / "#1234").write_text("recovered")
    (path / "lost+found").chmod(0o700)
    return path


def mounted_at(monkeypatch, root: Path) -> Path:
    """`root` taken for a mount point (making one needs root), as os.path.ismount answers for it."""
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == root.resolve() or real(path))
    return root


def test_an_export_fills_a_mount_point_holding_only_lost_found_and_leaves_that_folder_alone(hidden_cache, tmp_path, monkeypatch):
    out = mounted_at(monkeypatch, fresh_file_system_root(tmp_path / "volume"))
    before = (out / "lost+found").stat()
    assert main(["export", str(hidden_cache), "--to", "specforge", str(out)]) == 0
    assert len(list(out.glob("data_*.ckpt"))) == 14 and (out / "vocab_mapping.pt").is_file()
    assert [name for name in left_in(out) if not name.startswith("data_")] == ["lost+found", "vocab_mapping.pt"]
    after = (out / "lost+found").stat()
    assert (after.st_ino, after.st_mtime_ns, mode_of(out / "lost+found")) == (before.st_ino, before.st_mtime_ns, 0o700)
    assert left_in(out / "lost+found") == ["#1234"]


def test_only_a_lost_found_folder_is_left_out_of_what_makes_out_not_empty(hidden_cache, tmp_path, nothing_made):
    not_empty = says("is not empty", "never overwrites", "pass a new directory")
    beside = fresh_file_system_root(tmp_path / "beside")
    (beside / "notes").write_text("mine")
    a_file = tmp_path / "a-file"
    a_file.mkdir()
    (a_file / "lost+found").write_text("a file of that name")  # not the file system's folder
    for out in (beside, a_file):
        with pytest.raises(ExportError, match=not_empty):
            export_cache(hidden_cache, "specforge", out, progress=False)
    assert left_in(beside) == ["lost+found", "notes"] and left_in(a_file) == ["lost+found"]


def test_a_lost_found_folder_counts_in_an_out_that_is_no_mount_point(hidden_cache, tmp_path, monkeypatch, nothing_made):
    """Only a file system's root holds its lost+found: elsewhere the folder is the user's, and SpecForge's
    reader, which walks OUT's folders, would read the samples in it as the export's."""
    out = fresh_file_system_root(tmp_path / "folder")
    (out / "lost+found" / "data_3.ckpt").write_bytes(b"a sample of another export")
    found = says(f"{out} is not empty: it holds lost+found", "left out only at a mount point", "pass a new directory")
    with pytest.raises(ExportError, match=found):
        export_cache(hidden_cache, "specforge", out, progress=False)
    assert main(["export", str(hidden_cache), "--to", "specforge", str(out)]) == 2
    assert left_in(out) == ["lost+found"] and left_in(out / "lost+found") == ["#1234", "data_3.ckpt"]
    assert not export_module.is_mount_point(out) and export_module.is_mount_point(mounted_at(monkeypatch, out))


def test_the_remains_of_a_killed_export_in_a_mount_point_are_named_without_its_lost_found(hidden_cache, tmp_path, monkeypatch):
    out = fresh_file_system_root(tmp_path / "volume")
    kill_after_moving_up(monkeypatch, mounted_at(monkeypatch, out), "data_10.ckpt", "hard links")
    with pytest.raises(Killed):
        export_cache(hidden_cache, "specforge", out, progress=False)
    monkeypatch.undo()
    mounted_at(monkeypatch, out)
    killed = says("holds the remains of an export that was killed", f"delete those (everything in {out} but lost+found)")
    with pytest.raises(ExportError, match=killed):
        export_cache(hidden_cache, "specforge", out, progress=False)
    assert left_in(out / "lost+found") == ["#1234"]


def names_made_in(folder: Path, monkeypatch) -> list[str]:
    """The names that appear in `folder` by a link or a rename, in order, as the export makes them."""
    made = []
    for name in ("link", "rename"):
        real = getattr(os, name)

        def recorded(source, target, *args, real=real, **kwargs):
            real(source, target, *args, **kwargs)
            if Path(target).parent == folder:
                made.append(Path(target).name)

        monkeypatch.setattr(os, name, recorded)
    return made


@pytest.mark.parametrize(
    ("to", "cache", "last"), [("nemo", "probs_cache", "manifest.json"), ("specforge", "hidden_cache", "vocab_mapping.pt")]
)
def test_the_file_that_marks_a_complete_export_appears_in_out_last(to, cache, last, request, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    made = names_made_in(out, monkeypatch)
    export_cache(request.getfixturevalue(cache), to, out, progress=False)
    assert sorted(made) == left_in(out) and made[-1] == last


def test_an_export_failing_while_its_files_move_into_out_leaves_it_empty_as_it_was(hidden_cache, tmp_path, monkeypatch):
    out = tmp_path / "sf"
    out.mkdir()
    out.chmod(0o2770)
    inode = out.stat().st_ino

    def io_error(real, source, target):
        raise OSError(errno.EIO, "Input/output error", target)

    fail_on_call(monkeypatch, os, "link", 5, io_error)
    with pytest.raises(
        ExportError, match=says(f"writing {out} failed (Input/output error)", f"nothing was left at {out}", "Fix the cause")
    ):
        export_cache(hidden_cache, "specforge", out, progress=False)
    assert left_in(out) == [] and (out.stat().st_ino, mode_of(out)) == (inode, 0o2770) and left_in(tmp_path) == ["sf"]


def no_hard_links(real, source, target):
    raise OSError(errno.EPERM, "Operation not permitted", target)


@pytest.mark.parametrize("links", ["hard links", "no hard links"])
def test_an_export_never_replaces_a_name_made_in_out_while_its_files_move_in(hidden_cache, tmp_path, monkeypatch, links):
    """Someone's vocab_mapping.pt made once the export's first files are in OUT stays theirs; the
    export's own files are taken back out."""
    out = tmp_path / "sf"
    out.mkdir()
    real_link, calls = os.link, [0]

    def someone_writes_into_out(source, target):
        calls[0] += 1
        if calls[0] == 3:
            (out / "vocab_mapping.pt").write_text("theirs")
        return no_hard_links(real_link, source, target) if links == "no hard links" else real_link(source, target)

    monkeypatch.setattr(os, "link", someone_writes_into_out)
    with pytest.raises(ExportError, match=says(f"{out} was filled", "never overwrites", "Pass a new directory")):
        export_cache(hidden_cache, "specforge", out, progress=False)
    assert left_in(out) == ["vocab_mapping.pt"] and (out / "vocab_mapping.pt").read_text() == "theirs"


@pytest.mark.parametrize("links", ["hard links", "no hard links"])
def test_an_export_interrupted_right_after_moving_a_file_up_leaves_out_empty_as_it_was(hidden_cache, tmp_path, monkeypatch, links):
    """Ctrl-C the moment a file is in OUT (the link or rename done, the export not yet told) takes it back out too."""
    out = tmp_path / "sf"
    out.mkdir()
    inode = out.stat().st_ino
    if links == "no hard links":
        monkeypatch.setattr(os, "link", functools.partial(no_hard_links, os.link))
    move_name = "link" if links == "hard links" else "rename"
    real, calls = getattr(os, move_name), [0]

    def interrupted_after(source, target, *args, **kwargs):
        real(source, target, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(os, move_name, interrupted_after)
    with pytest.raises(KeyboardInterrupt):
        export_cache(hidden_cache, "specforge", out, progress=False)
    assert calls[0] == 3 and left_in(out) == [] and out.stat().st_ino == inode and left_in(tmp_path) == ["sf"]


class Killed(BaseException):
    """The process dying: the export's own cleanup never runs."""


def kill_after_moving_up(monkeypatch, out: Path, name: str, links: str) -> None:
    """The export dies once its file `name` is in OUT: hard-linked (still in its hidden folder too),
    or, without hard links, renamed."""
    monkeypatch.setattr(export_module, "discard", lambda *args: None)
    if links == "no hard links":
        monkeypatch.setattr(os, "link", functools.partial(no_hard_links, os.link))
    move_name = "link" if links == "hard links" else "rename"
    real = getattr(os, move_name)

    def move(source, target, *args, **kwargs):
        real(source, target, *args, **kwargs)
        if Path(target) == out / name:
            raise Killed

    monkeypatch.setattr(os, move_name, move)


def remove_everything_in(folder: Path) -> None:
    for entry in folder.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


@pytest.mark.parametrize("links", ["hard links", "no hard links"])
def test_an_out_left_by_an_export_killed_while_moving_its_files_up_says_what_to_delete(hidden_cache, tmp_path, monkeypatch, links):
    out = tmp_path / "sf"
    out.mkdir()
    kill_after_moving_up(monkeypatch, out, "data_10.ckpt", links)
    with pytest.raises(Killed):
        export_cache(hidden_cache, "specforge", out, progress=False)
    monkeypatch.undo()
    hidden = f".export.tmp-{os.getpid()}"
    remains = [hidden, "data_0.ckpt", "data_1.ckpt", "data_10.ckpt"]
    assert left_in(out) == remains
    killed = says(
        f"{out} holds the remains of an export that was killed before it finished",
        f"hidden folder {hidden} and the files it had moved up (data_0.ckpt, data_1.ckpt, data_10.ckpt)",
        "no vocab_mapping.pt, the file that marks a complete export",
        "If no export into it is running, delete those",
        "run the export again",
    )
    for to in ("specforge", "nemo"):  # whatever the export run again
        with pytest.raises(ExportError, match=killed):
            export_cache(hidden_cache, to, out, progress=False)
    assert left_in(out) == remains  # nothing deleted: another export could be moving its files up
    remove_everything_in(out)
    export_cache(hidden_cache, "specforge", out, progress=False)
    assert len(left_in(out)) == 15 and "vocab_mapping.pt" in left_in(out)


def test_an_out_left_by_a_nemo_export_killed_before_its_manifest_says_what_to_delete(probs_cache, tmp_path, monkeypatch):
    out = tmp_path / "nemo"
    out.mkdir()
    kill_after_moving_up(monkeypatch, out, "target_embeddings.safetensors", "hard links")
    with pytest.raises(Killed):
        export_cache(probs_cache, "nemo", out, progress=False)
    monkeypatch.undo()
    moved = "shard-000000.safetensors … target_embeddings.safetensors (5 files)"
    with pytest.raises(ExportError, match=says("killed before it finished", f"had moved up ({moved}), but no manifest.json")):
        export_cache(probs_cache, "nemo", out, progress=False)


def test_an_out_holding_more_than_a_killed_exports_remains_is_not_empty(hidden_cache, tmp_path, monkeypatch):
    """Only what a killed export leaves is called its remains, never a file someone else made."""
    out = tmp_path / "sf"
    out.mkdir()
    kill_after_moving_up(monkeypatch, out, "data_10.ckpt", "hard links")
    with pytest.raises(Killed):
        export_cache(hidden_cache, "specforge", out, progress=False)
    monkeypatch.undo()
    not_empty = says(f"{out} is not empty", "never overwrites", "pass a new directory")
    someone_elses = {
        "README.md": "mine",  # not a file of an export (though moved before the ones left in the hidden folder, by name)
        "data_99.ckpt": "mine",  # named like one, but not moved before the ones left in the hidden folder
        "vocab_mapping.pt": "mine",  # the file that marks a complete export
    }
    for name, text in someone_elses.items():
        (out / name).write_text(text)
        with pytest.raises(ExportError, match=not_empty):
            export_cache(hidden_cache, "specforge", out, progress=False)
        (out / name).unlink()
    (out / "data_10.ckpt").unlink()
    (out / "data_10.ckpt").write_text("mine")  # the name of the file still in the hidden folder, another file
    with pytest.raises(ExportError, match=not_empty):
        export_cache(hidden_cache, "specforge", out, progress=False)
    assert left_in(out) == [f".export.tmp-{os.getpid()}", "data_0.ckpt", "data_1.ckpt", "data_10.ckpt"]


# ---- an export killed, or terminated ----------------------------------------------------------


def test_an_export_killed_into_a_new_out_leaves_its_folder_beside_it_which_the_next_one_names(probs_cache, tmp_path):
    out = tmp_path / "nemo"
    killed = export_signalled_at(probs_cache, "nemo", out, "export_file:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (left,) = tmp_path.iterdir()
    assert re.fullmatch(r"\.nemo\.tmp-\d+", left.name) and len(left_in(left)) == 2
    with pytest.raises(ExportError, match=says(f"beside {out} is the hidden folder {left}", "killed before it finished")):
        export_cache(probs_cache, "nemo", out, progress=False)
    shutil.rmtree(left)
    export_cache(probs_cache, "nemo", out, progress=False)
    assert left_in(tmp_path) == ["nemo"] and (out / "manifest.json").is_file()


@pytest.mark.parametrize("out_exists", [True, False], ids=["existing empty OUT", "new OUT"])
def test_an_export_terminated_while_writing_removes_what_it_wrote_and_ends_by_the_signal(probs_cache, tmp_path, out_exists):
    """SIGTERM (a scheduler's time limit, `docker stop`, `kill`) stops the export as Ctrl-C does:
    what it wrote is removed, inside OUT or beside it, the user is told so, and the process ends by the
    signal."""
    out = tmp_path / "nemo"
    if out_exists:
        out.mkdir()
    terminated = export_signalled_at(probs_cache, "nemo", out, "export_file:3:SIGTERM")
    assert terminated.returncode == -signal.SIGTERM, terminated.stderr[-2000:]
    assert f"error: export: stopped by SIGTERM; the partial export was removed: nothing was left at {out}." in terminated.stderr
    assert left_in(tmp_path) == (["nemo"] if out_exists else []) and (not out_exists or left_in(out) == [])


def test_an_export_terminated_in_a_program_handling_sigterm_removes_what_it_wrote_then_calls_its_handler(
    hidden_cache, tmp_path, monkeypatch
):
    """A program with its own SIGTERM handler gets it called once the export is removed, and the
    export raises, saying it was stopped."""
    out = tmp_path / "sf"
    out.mkdir()
    received = []

    def terminated_partway(real, obj, path):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(obj, path)

    def handler(signum, frame):
        received.append(sorted(p.name for p in out.rglob("*")))  # what is in OUT when it runs

    fail_on_call(monkeypatch, export_module, "_torch_save", 4, terminated_partway)
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(ExportError, match=says("stopped by SIGTERM", f"nothing was left at {out}", "Run the export again")):
            export_cache(hidden_cache, "specforge", out, progress=False)
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == [[]] and left_in(tmp_path) == ["sf"]


def files_in(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def nemo_export(probs_cache, tmp_path_factory) -> dict[str, bytes]:
    """The files of an uninterrupted nemo export of probs_cache."""
    return files_in(export_cache(probs_cache, "nemo", tmp_path_factory.mktemp("export") / "nemo", progress=False))


@pytest.mark.parametrize("out_exists", [True, False], ids=["existing empty OUT", "new OUT"])
def test_an_export_terminated_once_complete_stays_complete_and_ends_by_the_signal(probs_cache, nemo_export, tmp_path, out_exists):
    """SIGTERM once OUT holds the complete export (its marker moved up, or its folder renamed to OUT) is
    held until the export is done, then ends the process: the complete export is never removed."""
    out = tmp_path / "nemo"
    if out_exists:
        out.mkdir()
    terminated = export_signalled_at(probs_cache, "nemo", out, "export_complete:1:SIGTERM")
    assert terminated.returncode == -signal.SIGTERM, terminated.stderr[-2000:]
    assert left_in(tmp_path) == ["nemo"] and files_in(out) == nemo_export  # no hidden folder, inside OUT or beside it


@pytest.mark.parametrize("out_exists", [True, False], ids=["existing empty OUT", "new OUT"])
def test_an_export_terminated_once_complete_in_a_program_handling_sigterm_calls_its_handler_and_returns(
    probs_cache, nemo_export, tmp_path, monkeypatch, out_exists
):
    """A program with its own SIGTERM handler gets it called once the export is complete, and the
    export returns: nothing was removed, so nothing is said to be."""
    out = tmp_path / "nemo"
    if out_exists:
        out.mkdir()
    monkeypatch.setenv(FAULT_ENV, "export_complete:1:SIGTERM")
    monkeypatch.setattr(export_module, "EXPORT_FAULTS", FaultPoints())
    received = []

    def handler(signum, frame):
        received.append((left_in(tmp_path), left_in(out)))  # what is beside OUT and in it when it runs

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        assert export_cache(probs_cache, "nemo", out, progress=False) == out
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == [(["nemo"], sorted(nemo_export))] and files_in(out) == nemo_export


@pytest.mark.parametrize("out_exists", [True, False], ids=["existing empty OUT", "new OUT"])
def test_ctrl_c_once_the_export_is_complete_stops_it_and_leaves_the_export(probs_cache, nemo_export, tmp_path, monkeypatch, out_exists):
    """Ctrl-C is not held as SIGTERM is, so it stops the export where it stands: once OUT holds the
    complete export, what stands is the export, which stays whole, with no hidden folder left."""
    out = tmp_path / "nemo"
    if out_exists:
        out.mkdir()
    monkeypatch.setenv(FAULT_ENV, "export_complete:1:SIGINT")
    monkeypatch.setattr(export_module, "EXPORT_FAULTS", FaultPoints())
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            export_cache(probs_cache, "nemo", out, progress=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert left_in(tmp_path) == ["nemo"] and files_in(out) == nemo_export


# ---- OUT in a folder this process cannot write to --------------------------------------------


@pytest.fixture(params=["chmod", "simulated"])
def make_read_only(request, monkeypatch):
    """Makes a folder one this process cannot change the entries of: mode 0o555 (skipped where a
    mode stops nothing: root), or, for every user, the calls that change entries refused as the OS
    refuses them there (os.access saying so, mkdir, rename, link... failing with EACCES)."""
    read_only: set[Path] = set()

    def inside(path) -> bool:
        return isinstance(path, str | os.PathLike) and Path(os.path.abspath(path)).parent in read_only

    def refuse(name: str, paths: int) -> None:
        real = getattr(os, name)

        def refused(*args, **kwargs):
            if not kwargs.get("dir_fd") and any(inside(path) for path in args[:paths]):
                raise PermissionError(errno.EACCES, "Permission denied", str(args[0]))
            return real(*args, **kwargs)

        monkeypatch.setattr(os, name, refused)

    def simulated(folder: Path) -> None:
        if not read_only:
            for name, paths in [("mkdir", 1), ("rmdir", 1), ("unlink", 1), ("remove", 1), ("rename", 2), ("replace", 2), ("link", 2)]:
                refuse(name, paths)
            real_access = os.access

            def access(path, mode, **kwargs):
                writes = Path(os.path.abspath(path)) in read_only and mode & os.W_OK
                return not writes and real_access(path, mode, **kwargs)

            monkeypatch.setattr(os, "access", access)
        read_only.add(Path(folder))

    def by_mode(folder: Path) -> None:
        folder.chmod(0o555)
        request.addfinalizer(lambda: folder.chmod(0o755))
        try:
            (folder / ".probe").mkdir()
        except PermissionError:
            return  # the folder is read-only to this process, as the test needs
        (folder / ".probe").rmdir()
        pytest.skip("this process writes into a folder whatever its mode (root): the simulated case covers it")

    return by_mode if request.param == "chmod" else simulated


def test_an_export_fills_a_writable_empty_out_in_a_folder_it_cannot_write_to(hidden_cache, tmp_path, make_read_only):
    """A scratch folder of the system's, with the user's own folder in it."""
    scratch, out = tmp_path / "scratch", tmp_path / "scratch" / "mine"
    out.mkdir(parents=True)
    out.chmod(0o2770)
    make_read_only(scratch)
    export_cache(hidden_cache, "specforge", out, progress=False)
    assert len(list(out.glob("data_*.ckpt"))) == 14 and (out / "vocab_mapping.pt").is_file()
    assert mode_of(out) == 0o2770 and left_in(scratch) == ["mine"]


def test_an_out_the_export_cannot_write_is_refused_naming_it_before_anything_is_made(hidden_cache, tmp_path, make_read_only, nothing_made):
    scratch, locked = tmp_path / "scratch", tmp_path / "locked"
    scratch.mkdir()
    locked.mkdir()
    make_read_only(scratch)
    make_read_only(locked)
    new = scratch / "new" / "sf"
    cannot_create = says(
        f"{new} cannot be created", f"{scratch}, the nearest folder of it that exists, is not writable", "pass another directory"
    )
    with pytest.raises(ExportError, match=cannot_create):
        export_cache(hidden_cache, "specforge", new, progress=False)
    with pytest.raises(ExportError, match=says(f"{locked} is not writable", "check its permissions or pass another directory")):
        export_cache(hidden_cache, "specforge", locked, progress=False)
    assert left_in(scratch) == [] and left_in(locked) == []


@pytest.mark.parametrize("mode", [0o644, 0o755])
def test_an_out_under_a_file_is_refused_naming_the_file_before_anything_is_made(hidden_cache, tmp_path, nothing_made, mode):
    """OUT's path goes through a file (a typo, a file where a folder was meant): not a folder that is
    not writable (a file without x bits fails os.access), nor a failed write once the cache is read
    (one with x bits, a script, passes it)."""
    (tmp_path / "notes").write_text("x")
    (tmp_path / "notes").chmod(mode)
    out = tmp_path / "notes" / "sf"
    with pytest.raises(ExportError, match=says(f"{out} cannot be created", f"{tmp_path / 'notes'} is a file", "pass another directory")):
        export_cache(hidden_cache, "specforge", out, progress=False)
    assert left_in(tmp_path) == ["notes"] and (tmp_path / "notes").read_text() == "x"


def test_an_out_the_export_cannot_list_is_refused_before_anything_is_made(hidden_cache, tmp_path, monkeypatch, nothing_made, capsys):
    """A drop-box folder (mode 0o733: others may write in it, not list it): whether it is empty cannot
    be told, so it is refused as one the export cannot use, not with a traceback. Simulated, as root
    lists any folder."""
    out = tmp_path / "drop-box"
    out.mkdir()
    real = os.listdir

    def listdir(path=".", *args):
        if Path(os.path.abspath(path)) == out:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args)

    monkeypatch.setattr(os, "listdir", listdir)
    expected = (f"export: {out} cannot be listed", "Permission denied", "expected a new or empty directory", "pass another directory")
    with pytest.raises(ExportError, match=says(*expected)):
        export_cache(hidden_cache, "specforge", out, progress=False)
    assert main(["export", str(hidden_cache), "--to", "specforge", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: export: {out} cannot be listed")
    monkeypatch.setattr(os, "listdir", real)
    assert left_in(out) == []


# ---- the target the export takes its embeddings and pad id from ----------------------------


def copy_of_target(folder):
    import shutil

    return shutil.copytree(resolve_target("tiny-llama"), folder)


def rewrite_weights(folder, change) -> None:
    """Save `change(tensors)` over the folder's model.safetensors, as a retrained checkpoint would be."""
    from safetensors.torch import save_file

    tensors = read_safetensors(folder / "model.safetensors")
    save_file(change(tensors), str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_nemo_export_refuses_a_target_overwritten_after_the_build(tmp_path, nothing_made):
    target = copy_of_target(tmp_path / "target")
    cache = build(small_config(tmp_path / "cache", target=target, max_samples=4), progress=False).output_dir
    rewrite_weights(target, lambda t: t | {"model.layers.0.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"] + 1})
    with pytest.raises(
        ExportError, match=says("is not the model this cache was built from", "target.weights_sample_sha256: cache has", "--target-model")
    ):
        export_cache(cache, "nemo", tmp_path / "nemo", progress=False)
    assert not (tmp_path / "nemo").exists()


def test_nemo_export_of_a_cache_whose_target_folder_is_gone_says_to_pass_target_model(tmp_path, nothing_made, capsys):
    """The manifest names the folder the build read the target from, which a cache copied or pulled
    onto another machine does not have: the export says where that name came from and which of its
    own flags to pass, not the build's --target-revision, nor that the user's --target-model is wrong."""
    target = copy_of_target(tmp_path / "target")
    cache = build(small_config(tmp_path / "cache", target=target, max_samples=2), progress=False).output_dir
    shutil.rmtree(target)
    with pytest.raises(
        ExportError,
        match=says("export --to nemo", f"the target the cache was built from, {str(target)!r}", "does not exist here", "--target-model"),
    ) as refused:
        export_cache(cache, "nemo", tmp_path / "nemo", progress=False)
    assert "--target-revision" not in str(refused.value)
    missing = tmp_path / "elsewhere"
    with pytest.raises(ExportError, match=says("export --to nemo", f"--target-model {str(missing)!r}", "does not exist")) as refused:
        export_cache(cache, "nemo", tmp_path / "nemo", target_model=str(missing), progress=False)
    assert "--target-revision" not in str(refused.value)
    assert main(["export", str(cache), "--to", "nemo", str(tmp_path / "nemo")]) == 2
    assert "--target-revision" not in capsys.readouterr().err
    assert not (tmp_path / "nemo").exists()


def test_nemo_export_of_a_cache_built_from_a_relative_target_folder_run_elsewhere_says_to_pass_target_model(tmp_path, monkeypatch):
    """`--target-model models/llama` is recorded as given, written like a Hub id: the build recorded no
    commit for it, so it was a folder, and the export, run from another directory, says so."""
    copy_of_target(tmp_path / "work" / "models" / "llama")
    monkeypatch.chdir(tmp_path / "work")
    cache = build(small_config(tmp_path / "cache", target="models/llama", max_samples=2), progress=False).output_dir
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ExportError,
        match=says("export --to nemo", "the target the cache was built from, 'models/llama'", "does not exist here", "--target-model"),
    ):
        export_cache(cache, "nemo", tmp_path / "nemo", progress=False)
    assert not (tmp_path / "nemo").exists()
    export_cache(cache, "nemo", tmp_path / "nemo", target_model=str(tmp_path / "work" / "models" / "llama"), progress=False)
    assert json.loads((tmp_path / "nemo" / "manifest.json").read_text())["num_samples"] == 2


def test_nemo_export_refuses_a_local_folder_for_a_hub_builds_target(tmp_path, monkeypatch):
    """A Hub build recorded its commit, not fingerprints: a local folder cannot be matched against it, so a
    retrained one must not pass for its target (the export would hand over that model's embeddings)."""
    from huggingface_hub import constants

    commit = "0123456789abcdef" * 2 + "01234567"
    hub_cache_holding(tmp_path / "hub", "someorg/tiny", commit, Path(resolve_target("tiny-llama")))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_built = build(small_config(tmp_path / "hub-built", "someorg/tiny", max_samples=4), progress=False).output_dir
    retrained = copy_of_target(tmp_path / "retrained")
    rewrite_weights(retrained, lambda t: t | {"model.embed_tokens.weight": t["model.embed_tokens.weight"] + 1})
    with pytest.raises(
        ExportError,
        match=says(
            "is not the model this cache was built from", f"target.revision: cache has '{commit}'", "a local folder", "'someorg/tiny'"
        ),
    ):
        export_cache(hub_built, "nemo", tmp_path / "nemo", target_model=str(retrained), progress=False)
    assert not (tmp_path / "nemo").exists()
    export_cache(hub_built, "nemo", tmp_path / "nemo", progress=False)  # its own target, by its Hub id, still passes


def test_nemo_export_refuses_a_target_whose_own_code_changed_after_the_build(tmp_path):
    """The code a target's auto_map names is part of what the target is, as its weights are."""
    from tiny_targets import target_with_own_code, write_own_code

    target = target_with_own_code(tmp_path / "export_scaled_target", scale=2.0)
    cache = build(small_config(tmp_path / "cache", target=target, max_samples=4, trust_remote_code=True), progress=False).output_dir
    write_own_code(target, scale=3.0)
    with pytest.raises(ExportError, match=says("is not the model this cache was built from", "target.code_sha256: cache has")):
        export_cache(cache, "nemo", tmp_path / "nemo", progress=False)
    assert not (tmp_path / "nemo").exists()
    write_own_code(target, scale=2.0)
    export_cache(cache, "nemo", tmp_path / "nemo", progress=False)
    assert json.loads((tmp_path / "nemo" / "manifest.json").read_text())["num_samples"] == 4


def test_nemo_export_accepts_a_target_tokenizer_an_earlier_version_recorded_as_loaded(tmp_path):
    """Earlier versions recorded the hash of the tokenizer's backend as loaded, its tokenizer.json's
    truncation and padding in, where the build process never encoded (more than one --num-proc, a
    rerun reusing the tokenized rows): the export accepts that target, and refuses another tokenizer."""
    from tiny_targets import target_with_another_tokenizer, target_with_truncation_and_padding, tokenizer_hash_of_earlier_versions

    target = target_with_truncation_and_padding(tmp_path / "target")
    cache = build(small_config(tmp_path / "cache", target=target, max_samples=4), progress=False).output_dir
    record_in_card(cache, tokenizer_sha256=tokenizer_hash_of_earlier_versions(target))
    export_cache(cache, "nemo", tmp_path / "nemo", progress=False)
    assert json.loads((tmp_path / "nemo" / "manifest.json").read_text())["num_samples"] == 4
    other = target_with_another_tokenizer(tmp_path / "other")  # the same weights
    with pytest.raises(ExportError, match=says("tokenizer_sha256: cache has")):
        export_cache(cache, "nemo", tmp_path / "nemo2", target_model=str(other), progress=False)


def test_nemo_export_refuses_another_model_given_with_target_model(probs_cache, tmp_path):
    from tiny_targets import make_tiny_target

    other = make_tiny_target(tmp_path / "qwen3", "qwen3")  # same tokenizer and vocabulary, another model
    with pytest.raises(ExportError, match=says("target.config_sha256: cache has", "target.weights_sample_sha256: cache has")):
        export_cache(probs_cache, "nemo", tmp_path / "nemo", target_model=str(other), progress=False)
    repadded = copy_of_target(tmp_path / "repadded")  # the same weights, another pad token
    settings = json.loads((repadded / "tokenizer_config.json").read_text())
    (repadded / "tokenizer_config.json").write_text(json.dumps(settings | {"pad_token": settings["eos_token"]}))
    with pytest.raises(ExportError, match=says("tokenizer_sha256: cache has")):
        export_cache(probs_cache, "nemo", tmp_path / "nemo2", target_model=str(repadded), progress=False)
    moved = copy_of_target(tmp_path / "moved")  # the same checkpoint elsewhere is accepted
    export_cache(probs_cache, "nemo", tmp_path / "nemo3", target_model=str(moved), progress=False)
    assert json.loads((tmp_path / "nemo3" / "manifest.json").read_text())["num_samples"] == 14


def test_nemo_export_after_a_build_with_another_chat_template_checks_the_special_tokens(tmp_path):
    """The tokenizer hash covers the template the build rendered with (--chat-template), which the
    export does not have: the same tokenizer is accepted, another pad token is refused."""
    from builder.embedded import NO_GENERATION_TEMPLATE

    target = copy_of_target(tmp_path / "target")
    cfg = small_config(tmp_path / "cache", target=target, max_samples=4, chat_template=str(NO_GENERATION_TEMPLATE))
    cache = build(cfg, progress=False).output_dir
    export_cache(cache, "nemo", tmp_path / "nemo", progress=False)
    assert json.loads((tmp_path / "nemo" / "manifest.json").read_text())["num_samples"] == 4
    settings = json.loads((target / "tokenizer_config.json").read_text())
    (target / "tokenizer_config.json").write_text(json.dumps(settings | {"pad_token": settings["unk_token"]}))
    with pytest.raises(ExportError, match=says("special_token_ids: cache has", "--target-model")):
        export_cache(cache, "nemo", tmp_path / "nemo2", progress=False)


# ---- streamed from the cache, no Arrow copy --------------------------------------------------


def test_exports_stream_the_cache_and_leave_no_arrow_copy(probs_cache, hidden_cache, tmp_path, monkeypatch):
    import datasets
    from safetensors.torch import save

    from builder.export import nemo_shard

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    export_cache(probs_cache, "nemo", tmp_path / "nemo", progress=False)
    export_cache(hidden_cache, "specforge", tmp_path / "sf", progress=False)
    assert not list((tmp_path / "hf").rglob("*.arrow")) and not (tmp_path / "hf" / "eagle3_cache").exists()
    # byte for byte what the map-style reader's samples make, in order
    samples = list(load_cache(probs_cache, layout="nemo", streaming=False))
    pad_id = AutoTokenizer.from_pretrained(resolve_target("tiny-llama")).pad_token_id
    for i in range(4):
        shard = nemo_shard(samples[4 * i : 4 * i + 4], 256, None, pad_id)
        assert (tmp_path / "nemo" / f"shard-{i:06d}.safetensors").read_bytes() == save({k: v.contiguous() for k, v in shard.items()})
    rows = load_cache(hidden_cache, layout="specforge", streaming=False)
    assert len(list((tmp_path / "sf").glob("data_*.ckpt"))) == len(rows) == 14
    for i in range(len(rows)):
        (tmp_path / "want").mkdir(exist_ok=True)
        torch.save(rows[i], tmp_path / "want" / f"data_{i}.ckpt")  # same name: torch.save records it in the archive
        assert (tmp_path / "sf" / f"data_{i}.ckpt").read_bytes() == (tmp_path / "want" / f"data_{i}.ckpt").read_bytes()


# ---- the embedding table read alone --------------------------------------------------------


def sharded_target(folder, arch):
    """A tiny target saved in two shards, its input embedding alone in the first; with the model's
    full fp32 embeddings, read before the second shard is made unreadable."""
    from safetensors.torch import save_file
    from tiny_targets import make_tiny_target

    target = make_tiny_target(folder, arch)
    full = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).get_input_embeddings().weight.detach()
    tensors = read_safetensors(target / "model.safetensors")
    name = next(k for k in tensors if k.endswith("embed_tokens.weight"))
    rest = {k: v for k, v in tensors.items() if k != name}
    save_file({name: tensors[name]}, str(target / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(rest, str(target / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {name: "model-00001-of-00002.safetensors"} | dict.fromkeys(rest, "model-00002-of-00002.safetensors")
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (target / "model.safetensors").unlink()
    (target / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 64)  # every other weight unreadable
    return target, full


@pytest.mark.parametrize("arch", ["llama", "llama_tied", "text_config"])
def test_target_embeddings_read_only_the_embedding_tensor(tmp_path, arch):
    """Every weight but the embedding lives in a shard that cannot be read: a full load fails,
    the export reads the embeddings, equal to a full fp32 load's."""
    from builder.export import target_embeddings
    from builder.target import load_config

    target, full = sharded_target(tmp_path / arch, arch)
    with pytest.raises(Exception):  # noqa: B017 -- a full load has to read them
        AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    embeddings = target_embeddings(str(target), None, load_config(str(target), None, False))
    assert embeddings.dtype == torch.float32 and torch.equal(embeddings, full)


hub_server, hub = hub_fixtures()


def test_target_embeddings_of_a_hub_model_download_only_the_embedding_shard(hub, tmp_path):
    from huggingface_hub import HfApi

    from builder.export import target_embeddings
    from builder.target import load_config

    target, full = sharded_target(tmp_path / "llama", "llama")
    api = HfApi()
    api.create_repo("user/tiny-sharded")
    commit = api.upload_folder(repo_id="user/tiny-sharded", folder_path=target).oid
    config = load_config("user/tiny-sharded", commit, False)
    embeddings = target_embeddings("user/tiny-sharded", commit, config)
    assert torch.equal(embeddings, full)
    assert hub.requests("GET", "model-00001-of-00002") and not hub.requests("GET", "model-00002-of-00002")
