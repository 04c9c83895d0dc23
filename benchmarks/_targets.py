"""Random-weight Llama targets for the speed benchmarks, and the arithmetic that says how they
compare with a real 8B target (compute per byte written).

Every target shares the embedded tokenizer (`builder/assets/tiny-llama`, 1,024 tokens), so it
builds from the embedded sample chats with no download. Weights are seeded normal(0.02):
speed does not depend on what the weights are.
"""

from __future__ import annotations

from pathlib import Path

# Llama-3.1-8B's shape: the yardstick for "compute per byte written".
LLAMA_8B = dict(
    hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256
)


def llama_params(
    hidden_size: int,
    num_hidden_layers: int,
    intermediate_size: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    vocab_size: int,
    **_,
) -> dict:
    """Parameter counts of a Llama (untied head): decoder (without embeddings), embedding, head."""
    head_dim = hidden_size // num_attention_heads
    attn = 2 * hidden_size * num_attention_heads * head_dim + 2 * hidden_size * num_key_value_heads * head_dim
    mlp = 3 * hidden_size * intermediate_size
    norms = 2 * hidden_size
    decoder = num_hidden_layers * (attn + mlp + norms) + hidden_size
    return {
        "decoder": decoder,
        "embedding": vocab_size * hidden_size,
        "head": vocab_size * hidden_size,
        "total": decoder + 2 * vocab_size * hidden_size,
    }


def flops_per_token(shape: dict, loss_share: float) -> float:
    """Forward FLOPs per token as the build runs it: 2 x decoder params at every token, plus the
    lm_head (2 x H x V) at the loss-masked share of tokens (the build computes logits there only).
    Attention's sequence-length term is left out (a few % at 2,048 tokens for an 8B)."""
    p = llama_params(**shape)
    return 2 * p["decoder"] + 2 * p["head"] * loss_share


def bytes_per_token(
    hidden_size: int,
    draft_vocab: int,
    loss_share: float,
    *,
    target_format: str = "probs",
    dtype: str = "bf16",
    aux_dtype: str = "bf16",
    topk: int = 64,
    aux_layers: int = 3,
) -> float:
    """Cache bytes per token (raw tensor bytes; Parquet adds < 0.1%), from the builder's own Layout."""
    from builder.formats import Layout

    layout = Layout(target_format, dtype, aux_dtype, min(topk, draft_vocab), draft_vocab, aux_layers * hidden_size, hidden_size)
    per_token, per_loss = layout.bytes_per_position()
    return per_token + loss_share * per_loss


def make_random_llama(
    directory: Path,
    *,
    hidden_size: int,
    num_hidden_layers: int,
    intermediate_size: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    vocab_size: int = 1024,
    seed: int = 0,
    save_dtype=None,
    device: str = "cpu",
) -> dict:
    """Save a random-weight LlamaForCausalLM with the embedded tokenizer into `directory`; return
    its shape and parameter counts. vocab_size above 1,024 leaves the extra rows unused by the
    tokenizer (fine for speed: the head and the embedding still have that many rows)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from builder.embedded import EMBEDDED_TARGETS

    tok = AutoTokenizer.from_pretrained(EMBEDDED_TARGETS["tiny-llama"])
    if vocab_size < len(tok):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the embedded tokenizer's {len(tok)}")
    shape = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        intermediate_size=intermediate_size,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        vocab_size=vocab_size,
    )
    config = LlamaConfig(
        **shape,
        head_dim=hidden_size // num_attention_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    save_dtype = save_dtype or torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=save_dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).to(p.dtype) * 0.02)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    counted = sum(p.numel() for p in model.parameters())
    del model
    params = llama_params(**shape)
    assert params["total"] == counted, (params, counted)
    return {"shape": shape, "params": params}


def make_shaped_llama(directory: Path, shape: str) -> dict:
    """`make_random_llama` of a command line's "hidden,layers,intermediate,heads,kv_heads,vocab",
    built and saved in bf16 on the GPU where there is one (fp32 on a CPU, whose bf16 matmuls are slow)."""
    import torch

    hidden, layers, intermediate, heads, kv_heads, vocab = (int(x) for x in shape.split(","))
    on_gpu = torch.cuda.is_available()
    return make_random_llama(
        directory,
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        save_dtype=torch.bfloat16 if on_gpu else torch.float32,
        device="cuda" if on_gpu else "cpu",
    )


def compute_per_byte(
    shape: dict,
    *,
    draft_vocab: int,
    loss_share: float,
    target_format: str = "probs",
    aux_dtype: str = "bf16",
    dtype: str = "bf16",
    topk: int = 64,
) -> dict:
    """FLOPs per token, cache bytes per token and FLOPs per byte written."""
    flops = flops_per_token(shape, loss_share)
    nbytes = bytes_per_token(
        shape["hidden_size"], draft_vocab, loss_share, target_format=target_format, dtype=dtype, aux_dtype=aux_dtype, topk=topk
    )
    return {
        "flops_per_token": flops,
        "bytes_per_token": nbytes,
        "flops_per_byte": flops / nbytes,
        "draft_vocab": draft_vocab,
        "loss_share": loss_share,
        "target_format": target_format,
        "aux_dtype": aux_dtype,
    }
