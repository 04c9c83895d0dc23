"""Exports: NeMo Automodel's cached_target_path (format 2) and SpecForge's offline files hold
exactly what the reader yields."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import small_config
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from builder.build import build
from builder.cli import main
from builder.embedded import resolve_target
from builder.export import ExportError, export_cache
from builder.reader import collate_nemo, load_cache


def read_safetensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def probs_cache(tmp_path_factory):
    return build(small_config(tmp_path_factory.mktemp("probs") / "cache", dtype="bf16"), progress=False).output_dir


@pytest.fixture(scope="module")
def hidden_cache(tmp_path_factory):
    return build(small_config(tmp_path_factory.mktemp("hidden") / "cache", target_format="hidden"), progress=False).output_dir


def test_nemo_export_matches_the_reader_padded_to_seq_length(probs_cache, tmp_path, capsys):
    out = tmp_path / "nemo"
    assert main(["export", str(probs_cache), "--to", "nemo", str(out)]) == 0
    samples = list(load_cache(probs_cache, layout="nemo", streaming=False))
    names = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert names == [f"shard-{i:06d}.safetensors" for i in range(4)]
    expected_dtypes = {"input_ids": torch.int64, "attention_mask": torch.int64, "loss_mask": torch.int64,
                       "aux_hidden_states": torch.bfloat16, "position_mask": torch.bool, "target_probs": torch.bfloat16}
    for i, name in enumerate(names):
        shard = read_safetensors(out / name)
        want = collate_nemo(samples[4 * i : 4 * i + 4], pad_to=96)
        n = len(samples[4 * i : 4 * i + 4])
        assert {k: v.dtype for k, v in shard.items()} == expected_dtypes
        assert shard["input_ids"].shape == (n, 96) and shard["aux_hidden_states"].shape == (n, 96, 192)
        assert shard["target_probs"].shape == (n, 96, 300) and shard["position_mask"].shape == (n, 96, 1)
        for key in expected_dtypes:
            assert torch.equal(shard[key], want[key]), key
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["num_samples"] == 14 and manifest["shard_size"] == 4
    assert manifest["dtype"] == "bf16" and manifest["aux_hidden_dim"] == 192 and manifest["aux_layer_ids"] == [1, 3, 4]
    assert manifest["draft_vocab_size"] == len(manifest["selected_token_ids"]) == 300 and manifest["target_probs_topk"] is None
    embeddings = read_safetensors(out / "target_embeddings.safetensors")["weight"]
    model = AutoModelForCausalLM.from_pretrained(resolve_target("tiny-llama"), dtype=torch.float32)
    assert embeddings.dtype == torch.float32 and torch.equal(embeddings, model.get_input_embeddings().weight)


def test_nemo_export_of_a_topk_cache_stores_values_and_indices(tmp_path):
    cache = build(small_config(tmp_path / "cache", target_format="topk", topk=8), progress=False).output_dir
    export_cache(cache, "nemo", tmp_path / "nemo", progress=False)
    shard = read_safetensors(tmp_path / "nemo" / "shard-000000.safetensors")
    assert shard["target_probs_indices"].dtype == torch.int32 and shard["target_probs_values"].shape == (4, 96, 8)
    want = collate_nemo(list(load_cache(cache, layout="nemo", streaming=False))[:4], pad_to=96)["target_probs"]
    rebuilt = torch.zeros_like(want).scatter(-1, shard["target_probs_indices"].long(), shard["target_probs_values"])
    assert torch.equal(rebuilt, want)
    assert json.loads((tmp_path / "nemo" / "manifest.json").read_text())["target_probs_topk"] == 8


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
    selected = torch.nonzero(mapping["t2d"]).squeeze(-1)
    assert mapping["t2d"].dtype == torch.bool and mapping["t2d"].sum() == 300
    assert torch.equal(torch.sort(mapping["d2t"] + torch.arange(300)).values, selected)


def test_export_errors_are_clear(probs_cache, tmp_path):
    with pytest.raises(ExportError, match=r"SpecForge trains from final hidden states; .* --target-format probs\. Rebuild with --target-format hidden"):
        export_cache(probs_cache, "specforge", tmp_path / "sf", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ExportError, match="is not empty"):
        export_cache(probs_cache, "nemo", tmp_path / "full", progress=False)
