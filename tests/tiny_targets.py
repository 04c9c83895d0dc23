"""Tiny random-weight targets of several architectures, built offline for tests.

Every target shares the embedded tokenizer (builder/assets/tiny-llama), so token
ids, vocab size and chat template are the same whatever the architecture.

    make_tiny_target(tmp_path / "m", "qwen3_moe")  # -> directory loadable by
    AutoModelForCausalLM.from_pretrained / AutoTokenizer.from_pretrained

Caveat (transformers 5.x): for model_type "qwen2" AutoTokenizer ignores
tokenizer_config's class and loads Qwen2Tokenizer, which keeps the vocab, merges,
special tokens and chat template but swaps in Qwen's pre-tokenizer (digits split
one by one, NFC): the same text can get different ids than with the other archs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3Config,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from builder.embedded import EMBEDDED_TARGETS, NO_GENERATION_TEMPLATE

ARCHITECTURES = (
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "qwen3_moe",
    "mixtral",
    "text_config",
    "llama_tied",
    "gpt2",
)
NUM_LAYERS = 8  # the default aux layers [1, N//2-1, N-4] are distinct from 7 on
HIDDEN = 64


def tiny_tokenizer(generation_template: bool = True):
    """The embedded tokenizer; with generation_template=False its template has no
    {% generation %} blocks, which forces the prefix-rendering loss-mask path."""
    tok = AutoTokenizer.from_pretrained(EMBEDDED_TARGETS["tiny-llama"])
    if not generation_template:
        tok.chat_template = NO_GENERATION_TEMPLATE.read_text(encoding="utf-8")
    return tok


def _text_settings(tok, **overrides) -> dict:
    settings = dict(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HIDDEN // 4,  # Qwen3 and Gemma3 default to much wider heads
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    settings.update(overrides)
    return settings


def _gemma3_config(tok) -> Gemma3Config:
    # Multimodal wrapper: the decoder's settings live in config.text_config and
    # AutoModelForCausalLM loads Gemma3ForConditionalGeneration. No soft-capping,
    # so logits are plain lm_head outputs like the other architectures.
    text = _text_settings(tok, sliding_window=16, final_logit_softcapping=None, attn_logit_softcapping=None)
    text.pop("tie_word_embeddings")
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    # 28/14 = 2x2 patches pooled to mm_tokens_per_image = 4 (must be a square).
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, tie_word_embeddings=False)


def _gpt2_config(tok) -> GPT2Config:
    # Its decoder layers sit in `transformer.h`, not in a list named `layers`; learned positions.
    text = _text_settings(tok)
    tokens = {k: text[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")}
    return GPT2Config(n_embd=HIDDEN, n_layer=NUM_LAYERS, n_head=4, n_positions=text["max_position_embeddings"], **tokens)


def _config(arch: str, tok) -> PretrainedConfig:
    moe = dict(num_experts_per_tok=2)
    builders = {
        "llama": lambda: LlamaConfig(**_text_settings(tok)),
        "llama_tied": lambda: LlamaConfig(**_text_settings(tok, tie_word_embeddings=True)),
        "qwen2": lambda: Qwen2Config(**_text_settings(tok)),
        "qwen3": lambda: Qwen3Config(**_text_settings(tok)),
        "mistral": lambda: MistralConfig(**_text_settings(tok, sliding_window=None)),
        "qwen3_moe": lambda: Qwen3MoeConfig(**_text_settings(tok, num_experts=4, moe_intermediate_size=32, decoder_sparse_step=1, **moe)),
        "mixtral": lambda: MixtralConfig(**_text_settings(tok, num_local_experts=4, **moe)),
        "text_config": lambda: _gemma3_config(tok),
        "gpt2": lambda: _gpt2_config(tok),
    }
    if arch not in builders:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ARCHITECTURES}")
    return builders[arch]()


def _init_weights(model, seed: int) -> None:
    """Seeded normal(0.02) matrices, a wider embedding (0.05) so token identity shows
    in the logits, and a wide lm_head (0.5) so the softmax is peaked rather than near
    uniform; 1-D params (norms, biases) keep their defaults. A tied head is also the
    embedding, which then dominates the residual stream: 0.5 there would predict the
    input token with probability ~1, so a tied matrix gets 0.1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        if head is embed:
            head.copy_(torch.randn(head.shape, generator=gen) * 0.1)
        else:
            embed.copy_(torch.randn(embed.shape, generator=gen) * 0.05)
            head.copy_(torch.randn(head.shape, generator=gen) * 0.5)


def make_tiny_target(directory: Path, arch: str, *, seed: int = 0, generation_template: bool = True) -> Path:
    """Save a tiny fp32 model of `arch` plus the embedded tokenizer into `directory`."""
    directory = Path(directory)
    tok = tiny_tokenizer(generation_template)
    config = _config(arch, tok)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _init_weights(model, seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def target_without_pad_token(directory: Path) -> Path:
    """A copy of the embedded target whose tokenizer defines no pad token (as Llama 3's does not), with
    bos moved to id 3 and no unk token, so id 0 is no special of its own."""
    import json
    import shutil

    directory = Path(shutil.copytree(EMBEDDED_TARGETS["tiny-llama"], directory))
    settings = json.loads((directory / "tokenizer_config.json").read_text())
    settings = {k: v for k, v in settings.items() if k not in ("pad_token", "unk_token")} | {"bos_token": "<|unk|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    return directory


OWN_CODE = """from transformers import LlamaForCausalLM

SCALE = {scale}


class ScaledLlamaForCausalLM(LlamaForCausalLM):
    \"\"\"Llama with layer 0's output scaled by SCALE: what it computes is in its code, not its config.\"\"\"

    def __init__(self, config):
        super().__init__(config)
        self.model.layers[0].register_forward_hook(scaled)


def scaled(module, args, output):
    return (output[0] * SCALE, *output[1:]) if isinstance(output, tuple) else output * SCALE
"""


def target_with_own_code(directory: Path, scale: float = 1.0) -> Path:
    """A copy of the embedded target whose config's auto_map names code of its own (run with
    trust_remote_code), which scales layer 0's output by `scale` (see `write_own_code`)."""
    import json
    import shutil

    directory = Path(shutil.copytree(EMBEDDED_TARGETS["tiny-llama"], directory))
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_scaled.ScaledLlamaForCausalLM"}
    (directory / "config.json").write_text(json.dumps(config))
    return write_own_code(directory, scale)


def write_own_code(directory: Path, scale: float) -> Path:
    """The target's code edited: its weights and config stay as they are."""
    (Path(directory) / "modeling_scaled.py").write_text(OWN_CODE.format(scale=scale))
    return Path(directory)


def target_with_truncation_and_padding(directory: Path) -> Path:
    """A copy of the embedded target whose tokenizer.json ships truncation and padding settings, as
    tokenizers saved after training often do; transformers turns both off on the first encode call."""
    import json
    import shutil

    directory = Path(shutil.copytree(EMBEDDED_TARGETS["tiny-llama"], directory))
    settings = json.loads((directory / "tokenizer.json").read_text())
    settings["truncation"] = {"direction": "Right", "max_length": 4096, "strategy": "LongestFirst", "stride": 0}
    settings["padding"] = {
        "strategy": "BatchLongest",
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 0,
        "pad_type_id": 0,
        "pad_token": "<|pad|>",
    }
    (directory / "tokenizer.json").write_text(json.dumps(settings))
    return directory


def target_with_another_tokenizer(directory: Path) -> Path:
    """The truncation and padding target (same weights) whose tokenizer names another bos token."""
    import json

    directory = target_with_truncation_and_padding(directory)
    settings = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps(settings | {"bos_token": "<|unk|>"}))
    return directory


def poisoned_target(tmp_path: Path, token_id: int | list[int]) -> Path:
    """A target whose embeddings of these tokens are NaN: every sample holding one goes non-finite."""
    from safetensors.torch import load_file, save_file

    target = make_tiny_target(tmp_path / "target", "llama")
    weights = load_file(target / "model.safetensors")
    weights["model.embed_tokens.weight"][token_id] = float("nan")
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def tokenizer_hash_of_earlier_versions(target: Path) -> str:
    """The tokenizer_sha256 versions before this one recorded for a target's tokenizer (and its own
    chat template) where the build process never encoded: the hash of its backend as loaded, the
    truncation and padding its tokenizer.json ships left in."""
    import hashlib
    import json

    from transformers import AutoTokenizer

    from builder.tokenize import template_bytes, template_of

    tokenizer = AutoTokenizer.from_pretrained(target)
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(template_bytes(template_of(tokenizer, None)))
    return h.hexdigest()


class SequentialDecoderConfig(PretrainedConfig):
    model_type = "eagle3_cache_sequential_decoder"

    def __init__(self, vocab_size=1024, hidden_size=16, num_hidden_layers=NUM_LAYERS, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        super().__init__(**kwargs)


class SequentialDecoder(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        width = config.hidden_size
        self.blocks = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(config.num_hidden_layers)))


class SequentialDecoderForCausalLM(PreTrainedModel):
    config_class = SequentialDecoderConfig
    base_model_prefix = "decoder"

    def __init__(self, config):
        super().__init__(config)
        self.decoder = SequentialDecoder(config)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


def sequential_decoder_config(**settings) -> SequentialDecoderConfig:
    """The config of an architecture, registered with transformers' Auto classes, whose decoder keeps
    its layers in a torch.nn.Sequential, not a ModuleList: there is no list of layers to hook."""
    AutoConfig.register(SequentialDecoderConfig.model_type, SequentialDecoderConfig, exist_ok=True)
    AutoModelForCausalLM.register(SequentialDecoderConfig, SequentialDecoderForCausalLM, exist_ok=True)
    return SequentialDecoderConfig(**settings)
