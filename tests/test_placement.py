"""Targets placed over several devices: the cache does not depend on placement, and the memory
planner refuses what cannot fit before any weights load."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from helpers import assert_same_content, decoded_rows, says, small_config
from tiny_targets import ARCHITECTURES, make_tiny_target
from transformers import AutoConfig, GPT2Config, LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Qwen2MoeConfig, Qwen3MoeConfig

import builder.placement as placement_module
from builder.errors import ConfigError
from builder.pipeline import build
from builder.placement import (
    GiB,
    check_fits,
    check_placement,
    group_gpus,
    max_memory_map,
    memory_plan,
    meta_model,
    parse_bytes,
    plan_memory,
)

LLAMA_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256
)
LLAMA_70B = dict(
    hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256
)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return make_tiny_target(tmp_path_factory.mktemp("placed") / "target", "llama")


@pytest.fixture(scope="module")
def single_device(tmp_path_factory, target):
    return build(small_config(tmp_path_factory.mktemp("single") / "cache", target), progress=False).output_dir


def test_explicit_per_layer_device_map_gives_the_same_cache(tmp_path, target, single_device):
    layers = {f"model.layers.{i}": "cpu" for i in range(8)}
    device_map = {"model.embed_tokens": "cpu", **layers, "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    result = build(small_config(tmp_path / "cache", target, device_map=json.dumps(device_map)), progress=False)
    assert set(result.placement["device_map"]) == {"cpu"} and result.placement["device_map"]["cpu"] > 0
    assert_same_content(decoded_rows(single_device), decoded_rows(result.output_dir))


@pytest.mark.parametrize("arch", ["llama", "llama_tied"])
def test_the_meta_model_ties_a_head_as_the_loaded_target_does(arch):
    """Its parameters are the weights the memory plan and the device map place: a tied head is the
    embedding itself, counted once, as in the target loaded with its weights."""
    from tiny_targets import _config, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    config = _config(arch, tiny_tokenizer())
    loaded = AutoModelForCausalLM.from_config(config)
    model = meta_model(config)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == config.tie_word_embeddings == (arch == "llama_tied")
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in loaded.parameters())
    plan = dict(gpus_per_target=1, max_tokens=64, num_aux_layers=3)
    assert plan_memory(config, **plan) == plan_memory(config, **plan, model=loaded)  # the plan builds its own meta model


def test_meta_planned_two_device_map_gives_the_same_cache(tmp_path, target, single_device):
    """Plan a 2-GPU placement on the meta model (no weights), then run it with both 'GPUs' as the CPU."""
    from accelerate import infer_auto_device_map

    model = meta_model(AutoConfig.from_pretrained(target))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    planned = infer_auto_device_map(
        model, max_memory={0: int(weights * 0.6), 1: int(weights * 0.6)}, no_split_module_classes=["LlamaDecoderLayer"]
    )
    assert set(planned.values()) == {0, 1}  # the layers really were split over two devices
    on_cpu = {module: "cpu" for module in planned}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(on_cpu))
    result = build(small_config(tmp_path / "cache", target, device_map=str(path)), progress=False)
    assert_same_content(decoded_rows(single_device), decoded_rows(result.output_dir))


def test_planner_counts_real_parameter_totals():
    assert round(plan_memory(LlamaConfig(**LLAMA_8B), gpus_per_target=1, max_tokens=16384, num_aux_layers=3).parameters / 1e9, 2) == 8.03
    assert round(plan_memory(LlamaConfig(**LLAMA_70B), gpus_per_target=8, max_tokens=16384, num_aux_layers=3).parameters / 1e9, 2) == 70.55


def test_planner_refuses_what_cannot_fit_and_passes_what_can():
    config = LlamaConfig(**LLAMA_70B)
    one_gpu = plan_memory(config, gpus_per_target=1, max_tokens=16384, num_aux_layers=3)
    with pytest.raises(
        ConfigError,
        match=r"(?s)(?=.*fits 80\.0 GiB per GPU)(?=.*needs 1\d\d\.\d GiB per GPU over 1 GPU)(?=.*Raise --gpus-per-target)",
    ):
        check_fits(one_gpu, 80 * GiB)
    check_fits(plan_memory(config, gpus_per_target=4, max_tokens=16384, num_aux_layers=3), 80 * GiB)
    check_fits(plan_memory(LlamaConfig(**LLAMA_8B), gpus_per_target=1, max_tokens=16384, num_aux_layers=3), 80 * GiB)


def test_build_refuses_before_loading_weights(tmp_path, target, monkeypatch):
    monkeypatch.setattr(placement_module, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ConfigError, match=r"expected a placement that fits 0\.5 GiB per GPU; the target needs 1\.\d GiB"):
        build(small_config(tmp_path / "cache", target, max_memory_per_gpu="512MiB"), progress=False)
    assert not (tmp_path / "cache").exists()


@pytest.fixture
def two_gpus(monkeypatch):
    """A node of two GPUs as the start-up placement check sees it, on any machine: their size comes
    from --max-memory-per-gpu, and nothing is ever loaded on them."""
    import torch
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())  # this process's state, as `build` sets it up
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def group_prep(tmp_path, budget: int | None = None):
    """The tiny target (8 layers, weights well under a GiB) over a group of two GPUs of `budget` bytes."""
    from builder.embedded import EMBEDDED_TARGETS

    flags = {"max_memory_per_gpu": str(budget)} if budget is not None else {}
    return SimpleNamespace(
        cfg=small_config(tmp_path / "cache", gpus_per_target=2, **flags),
        model_config=AutoConfig.from_pretrained(EMBEDDED_TARGETS["tiny-llama"]),
        aux_layer_ids=[1, 3, 4],
        selected_token_ids=range(300),
    )


def loaders_device_map(prep, budget: int) -> dict:
    """Where `from_pretrained(device_map="auto")` puts each module with the max_memory the build gives
    it: transformers' own placement, run on the meta model in the dtype the weights load in."""
    import torch
    from transformers.integrations.accelerate import _get_device_map

    model = meta_model(prep.model_config).to(torch.bfloat16)
    return _get_device_map(model, "auto", max_memory_map([0, 1], budget, memory_plan(prep)), None)


def test_a_group_the_plan_approves_keeps_every_layer_on_its_gpus(tmp_path, two_gpus):
    """An even split of the weights leaves the last layers over (the loader places whole layers and
    keeps a layer's room free on the first GPU): at a budget of exactly the plan, every module still
    lands on the group's GPUs."""
    budget = memory_plan(group_prep(tmp_path)).per_gpu
    prep = group_prep(tmp_path, budget)
    check_placement(prep)
    assert set(loaders_device_map(prep, budget).values()) == {0, 1}


def test_a_group_the_loader_would_offload_is_refused_before_any_weights_load(tmp_path, two_gpus, monkeypatch):
    """Whatever the plan's estimate misses (here, as the plan once did, room for whole layers), the
    start-up check runs the loader's own placement on the meta model and refuses one that would put
    weights on disk, saying what and what to do."""
    monkeypatch.setattr(placement_module, "LAYER_SLACK", 0)
    budget = memory_plan(group_prep(tmp_path)).per_gpu
    prep = group_prep(tmp_path, budget)
    assert "disk" in loaders_device_map(prep, budget).values()
    with pytest.raises(
        ConfigError,
        match=says(
            "--gpus-per-target: expected a placement that keeps every weight on the group's GPUs [0, 1], got 2",
            "model.layers.7, model.norm, model.rotary_emb, lm_head",
            "on disk",
            "Raise --gpus-per-target, lower --batch-size or --max-tokens-per-batch",
        ),
    ):
        check_placement(prep)


def test_dry_run_prints_the_estimate_for_an_8b_config(tmp_path, capsys):
    from tiny_targets import tiny_tokenizer

    from builder.cli import main

    model_dir = tmp_path / "llama-8b-config-only"
    LlamaConfig(**LLAMA_8B).save_pretrained(model_dir)  # no weights: the planner never needs them
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(model_dir)
    code = main(
        [
            "build",
            "--dry-run",
            "--quiet",
            "--target-model",
            str(model_dir),
            "--max-samples",
            "10",
            "--output-dir",
            str(tmp_path / "out"),
            "--aux-layer-ids",
            "1,15,28",
            "--draft-vocab-size",
            "32000",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "GPU memory (bf16)    25.5 GiB per GPU over 1 GPU(s)" in out and "8.03B parameters" in out


def test_group_gpus_and_sizes():
    assert group_gpus(1, 4, 8) == [4, 5, 6, 7]
    with pytest.raises(
        ConfigError,
        match=says("--gpus-per-target", "8 GPUs", "local rank 2", "[8, 9, 10, 11]", "--num_processes 2"),
    ):
        group_gpus(2, 4, 8)
    assert parse_bytes("70GiB") == 70 * GiB and parse_bytes("80GB") == 80 * 10**9 and parse_bytes("1024") == 1024
    with pytest.raises(ConfigError, match="--max-memory-per-gpu: expected a size like 70GiB"):
        parse_bytes("lots")


@pytest.mark.parametrize("text", ["1.5.3GiB", ".", "1..5GB", "..GiB"])
def test_a_size_with_a_malformed_number_is_the_same_config_error(tmp_path, text):
    from builder.config import validate

    with pytest.raises(ConfigError, match=says("--max-memory-per-gpu", "a size like 70GiB", repr(text))):
        parse_bytes(text)
    with pytest.raises(ConfigError, match=says("--max-memory-per-gpu", repr(text))):
        validate(small_config(tmp_path / "cache", max_memory_per_gpu=text))
    assert parse_bytes("1.5GiB") == 3 * GiB // 2 and parse_bytes(".5GiB") == GiB // 2 and parse_bytes("2.GB") == 2 * 10**9


def test_the_plan_sizes_the_largest_batch_batch_size_allows(tmp_path):
    """--batch-size caps every batch at batch_size x seq_length tokens: a larger --max-tokens-per-batch
    does not make batches any larger, so it must not make the plan refuse a build that fits."""
    from builder.placement import memory_plan

    def prep(**flags):
        cfg = small_config(tmp_path, batch_size=8, seq_length=2048, **flags)
        return SimpleNamespace(cfg=cfg, model_config=LlamaConfig(**LLAMA_8B), aux_layer_ids=[1, 15, 28], selected_token_ids=range(32000))

    config = LlamaConfig(**LLAMA_8B)
    # small_config stores fp32; rows of up to 2048 tokens, padded to the longest of their batch
    sizes = dict(gpus_per_target=1, num_aux_layers=3, draft_vocab_size=32000, aux_dtype="fp32", longest_row=2048, padded=True)
    eight_rows = plan_memory(config, max_tokens=8 * 2048, **sizes)
    budget_bound = plan_memory(config, max_tokens=4096, **sizes)
    assert memory_plan(prep(max_tokens_per_batch=1 << 20), dtype_bytes=2) == eight_rows
    assert memory_plan(prep(max_tokens_per_batch=4096), dtype_bytes=2) == budget_bound
    check_fits(memory_plan(prep(max_tokens_per_batch=1 << 20), dtype_bytes=2), 40 * GiB)
    big_batches = plan_memory(config, gpus_per_target=1, max_tokens=1 << 18, num_aux_layers=3, draft_vocab_size=32000)
    with pytest.raises(
        ConfigError, match=says("--gpus-per-target", "fits 40.0 GiB per GPU", "lower --batch-size or --max-tokens-per-batch")
    ):
        check_fits(big_batches, 40 * GiB)


@pytest.mark.parametrize(
    "spec, found",
    [
        ("[0]", "It holds a JSON list"),
        ("{}", "It holds an empty object"),
        ("balanced-low-0", "It is neither a JSON object nor an existing file"),
        ("no-such-map.json", "It is neither a JSON object nor an existing file"),
        ('{"model": "gpu"}', "Not a device: {'model': 'gpu'}"),
        ('{"model": -1}', "Not a device: {'model': -1}"),
    ],
)
def test_a_device_map_that_is_not_one_is_refused_with_the_flags(tmp_path, spec, found):
    from builder.config import validate

    with pytest.raises(ConfigError, match=says("--device-map: expected", "a JSON object {module name: device}", repr(spec), found)):
        validate(small_config(tmp_path / "cache", device_map=spec))
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("spec", ['{"model": "cpu", "lm_head": "disk"}', '{"model.embed_tokens": 0, "model.layers": "disk", "lm_head": 0}'])
def test_a_device_map_that_offloads_to_disk_is_refused_before_anything_is_written(tmp_path, spec):
    """The build reads every weight on every batch (the head's rows directly): weights left on disk
    cannot run, and the loader would put them there without a word."""
    from builder.config import validate

    on_disk = [module for module, device in json.loads(spec).items() if device == "disk"]
    with pytest.raises(
        ConfigError,
        match=says(
            "--device-map: expected", 'a GPU index, "cpu" or "cuda:N"', repr(spec), f'It puts {on_disk} on "disk"', "place them on a GPU"
        ),
    ):
        validate(small_config(tmp_path / "cache", device_map=spec))
    assert not (tmp_path / "cache").exists()


def test_a_target_the_loader_put_on_disk_is_refused_as_it_loads(tmp_path, target, monkeypatch):
    """accelerate's strategies ("sequential" here) decide the placement only as the weights load, and
    may put the last modules on disk: the loaded target is refused, naming them, before it runs."""
    import torch

    from builder.placement import load_placed_model

    def offloading_loader(*args, **kwargs):
        model = torch.nn.Linear(2, 2)
        model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "disk", "lm_head": "disk"}
        return model

    monkeypatch.setattr(placement_module, "load_model", offloading_loader)
    cfg = small_config(tmp_path / "cache", target, device_map="sequential")
    prep = SimpleNamespace(cfg=cfg, model_path=str(target), model_config=AutoConfig.from_pretrained(target))
    with pytest.raises(
        ConfigError,
        match=says(
            "--device-map: expected a placement that keeps every weight in memory, got 'sequential'",
            "put model.norm, lm_head on disk",
            "raise --gpus-per-target",
            '--device-map on GPUs and "cpu"',
        ),
    ):
        load_placed_model(prep)


@pytest.mark.parametrize("strategy", ["auto", "balanced", "balanced_low_0", "sequential"])
def test_accelerates_placement_strategies_are_taken_as_they_are(tmp_path, strategy):
    from builder.config import validate
    from builder.placement import read_device_map

    validate(small_config(tmp_path / "cache", device_map=strategy))
    assert read_device_map(strategy) == strategy


def test_a_device_map_file_is_read_and_checked(tmp_path):
    from builder.config import validate

    path = tmp_path / "map.json"
    path.write_text('{"model": 0, "lm_head": "cuda:1"}')
    validate(small_config(tmp_path / "cache", device_map=str(path)))
    path.write_text("[0, 1]")
    with pytest.raises(ConfigError, match=says("--device-map", str(path), "It holds a JSON list")):
        validate(small_config(tmp_path / "cache", device_map=str(path)))
    path.write_text("{model: 0")
    with pytest.raises(ConfigError, match=says("--device-map", f"The file {path} does not hold valid JSON")):
        validate(small_config(tmp_path / "cache", device_map=str(path)))


def test_a_device_map_this_target_cannot_use_is_refused_before_anything_is_written(tmp_path, target, monkeypatch):
    import torch

    monkeypatch.setattr(placement_module, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    absent_gpu = torch.cuda.device_count()
    layers = {f"model.layers.{i}": "cpu" for i in range(8)}
    cases = [
        ({"": absent_gpu}, f"GPU(s) [{absent_gpu}] do not exist here"),
        ({"model": "cpu", "head": "cpu"}, "It has no module ['head']; its top modules are ['model', 'model.embed_tokens'"),
        ({"model.embed_tokens": "cpu", **layers, "model.norm": "cpu"}, "1 weight(s) have none, such as ['lm_head.weight']"),
    ]
    for device_map, found in cases:
        out = tmp_path / "cache"
        with pytest.raises(ConfigError, match=says("--device-map", found)):
            build(small_config(out, target, device_map=json.dumps(device_map)), progress=False)
        assert not out.exists()


def test_a_gpu_group_without_gpus_is_refused_before_anything_is_written(tmp_path, target, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks a machine where no GPU is visible")
    monkeypatch.setattr(placement_module, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ConfigError, match=says("--gpus-per-target: expected 1 on a machine where no GPU is visible", "got 2")):
        build(small_config(tmp_path / "cache", target, gpus_per_target=2), progress=False)
    assert not (tmp_path / "cache").exists()


def tiny_gpt2(n_inner: int | None) -> GPT2Config:
    """TINY_DECODER's shape in GPT-2's names: it has no key-value heads of its own to set."""
    return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=1024, n_inner=n_inner, bos_token_id=0, eos_token_id=0)


TINY_DECODER = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    max_position_embeddings=512,
)


def tiny_target(config):
    import torch
    from transformers import AutoModelForCausalLM

    from builder.target import Target

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return Target(model, [0, 1])


def masks_given_to_sdpa(monkeypatch, config, lengths: list[int]) -> tuple[dict, int]:
    """Run `config`'s target on right-padded rows of `lengths` tokens: {storage: bytes} of each mask
    transformers passes to SDPA (kept through the forward), and the bytes of the largest one as the
    additive mask SDPA makes of it in the query's dtype."""
    import torch

    from builder.batching import pad_batch

    held, additive = {}, 0
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def watched(query, key, value, attn_mask=None, **kwargs):
        nonlocal additive
        if attn_mask is not None:
            assert attn_mask.dtype == torch.bool and attn_mask.shape == (len(lengths), 1, max(lengths), max(lengths))
            held[attn_mask.untyped_storage().data_ptr()] = attn_mask.nbytes
            additive = max(additive, attn_mask.numel() * query.element_size())
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", watched)
    ids, attention, _ = pad_batch([[5] * n for n in lengths], [[1] * n for n in lengths], 0)
    tiny_target(config).forward(ids, attention)
    return held, additive


@pytest.mark.parametrize(
    "config, batch_size, lengths, masks",
    [
        (LlamaConfig(intermediate_size=128, **TINY_DECODER), 4, [64, 64, 63, 64], 1),  # one row shorter: padded
        (LlamaConfig(intermediate_size=128, **TINY_DECODER), 1, [64], 0),  # plainly causal: no mask
        # every layer slides over 32 tokens: a mask as soon as a row reaches the window, padded or not
        (MistralConfig(intermediate_size=128, sliding_window=32, **TINY_DECODER), 1, [64], 1),
        # a full and a sliding layer: a mask of each kind, both kept through the forward
        (
            Qwen2Config(intermediate_size=128, use_sliding_window=True, sliding_window=32, max_window_layers=1, **TINY_DECODER),
            2,
            [64, 40],
            2,
        ),
    ],
    ids=["padded", "one-row", "sliding-window", "full-and-sliding"],
)
def test_the_plan_counts_the_attention_masks_sdpa_is_given_for_the_largest_batch(tmp_path, monkeypatch, config, batch_size, lengths, masks):
    """transformers gives SDPA a boolean [rows, 1, T, T] mask for a padded batch (and for sliding-window
    layers) and SDPA makes an additive copy of it in the compute dtype: at --batch-size rows of --seq-length
    tokens, both are in the plan."""
    seq_length = max(lengths)
    cfg = small_config(tmp_path, batch_size=batch_size, seq_length=seq_length)
    prep = SimpleNamespace(cfg=cfg, model_config=config, aux_layer_ids=[0, 1], selected_token_ids=range(config.vocab_size))
    plan = memory_plan(prep, dtype_bytes=4)  # fp32, as the target below computes on the CPU
    held, additive = masks_given_to_sdpa(monkeypatch, config, lengths)
    assert len(held) == masks
    assert plan.attention_masks >= sum(held.values()) + additive
    assert (plan.attention_masks == 0) == (masks == 0)


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(intermediate_size=128, **TINY_DECODER),
        MixtralConfig(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2, **TINY_DECODER),
        Qwen3MoeConfig(
            intermediate_size=128, moe_intermediate_size=128, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[], **TINY_DECODER
        ),
        # experts four times as wide as the hidden state: their gate-up output and activated gate lead
        Qwen3MoeConfig(
            intermediate_size=64, moe_intermediate_size=256, num_experts=8, num_experts_per_tok=4, mlp_only_layers=[], **TINY_DECODER
        ),
        # a shared expert far wider than the routed ones, run on every token beside them
        Qwen2MoeConfig(
            intermediate_size=64,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=512,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[],
            **TINY_DECODER,
        ),
        # GPT-2's MLP, 4 x n_embd wide by default, and 16 x n_embd where its config sets n_inner
        tiny_gpt2(None),
        tiny_gpt2(1024),
    ],
    ids=["dense", "mixtral", "qwen3_moe", "qwen3_moe-wide-experts", "qwen2_moe-shared-expert", "gpt2", "gpt2-n_inner"],
)
def test_the_forwards_peak_above_the_weights_fits_the_plans_activations_and_aux_states(config):
    """A mixture of experts runs each token through num_experts_per_tok experts as that many sorted rows:
    the plan budgets their working set, not one dense MLP's, whatever the expert width, and any shared
    expert beside them. GPT-2's ungated MLP is as wide as its n_inner."""
    import torch
    from helpers import AllocatedBytes

    target, tokens = tiny_target(config), 1024
    ids = torch.randint(3, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    with AllocatedBytes([*target.model.parameters(), *target.model.buffers(), ids, attention]) as allocated:
        target.forward(ids, attention)
    plan = plan_memory(config, gpus_per_target=1, max_tokens=tokens, num_aux_layers=2, dtype_bytes=4, aux_dtype="fp32")
    assert allocated.peak <= plan.activations + plan.aux_capture


@pytest.mark.parametrize("n_inner, width", [(None, 4 * 64), (1024, 1024)])
def test_the_plan_takes_gpt2s_mlp_width_from_n_inner_as_transformers_does(n_inner, width):
    """GPT-2's config names its MLP width n_inner (None: 4 x n_embd), not intermediate_size. Its MLP (c_fc,
    gelu_new, c_proj) holds c_fc's output and gelu_new's temporaries: four values of that width per token."""
    config = tiny_gpt2(n_inner)
    assert placement_module.mlp_width(config) == 4 * width
    plan = plan_memory(config, gpus_per_target=1, max_tokens=1000, num_aux_layers=2, dtype_bytes=2)
    # residual stream and norms (4H), the MLP (4I), q, k and v (3H), in bf16
    assert plan.activations == 1000 * 2 * (4 * 64 + 4 * width + 3 * 64)
    assert placement_module.dense_mlp_width(config) == width


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_plan_reads_the_mlp_width_each_tiny_architecture_builds(arch):
    """The width the planner reads from a config is the one the target's MLP is built with: the
    activations its last projection (down_proj, each expert's, or GPT-2's c_proj) takes."""
    from tiny_targets import _config, tiny_tokenizer

    from builder.target import EXPERT_COUNT_FIELDS, decoder_layers, text_config

    config = _config(arch, tiny_tokenizer())
    cfg = text_config(config)
    params = dict(decoder_layers(meta_model(config), cfg.num_hidden_layers)[0].mlp.named_parameters())
    if "c_proj.weight" in params:  # GPT-2's Conv1D stores [in, out]
        built = params["c_proj.weight"].shape[0]
    else:  # nn.Linear [out, in]; experts [E, out, in]
        built = next(p for name, p in params.items() if "down_proj" in name).shape[-1]
    experts = any(getattr(cfg, field, None) for field in EXPERT_COUNT_FIELDS)
    planned = placement_module.expert_width(cfg) if experts else placement_module.dense_mlp_width(cfg)
    assert planned == built == {"gpt2": 256, "qwen3_moe": 32}.get(arch, 128)
