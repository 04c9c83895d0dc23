"""The embedded assets (tiny target, tokenizer, sample chats) and the tiny test targets."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_targets import ARCHITECTURES, NUM_LAYERS, make_tiny_target, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from builder.embedded import (
    DEFAULT_INPUT,
    DEFAULT_TARGET,
    EMBEDDED_INPUTS,
    EMBEDDED_TARGETS,
    NO_GENERATION_TEMPLATE,
    WITH_GENERATION_TEMPLATE,
    describe_embedded,
    resolve_input,
    resolve_target,
)

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "tool": "tool",
}
TWO_TURNS = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 17 times 23?"},
    {"role": "assistant", "content": "It is 391."},
    {"role": "user", "content": "And 17 times 24?"},
    {"role": "assistant", "content": "That is 408, one more 17."},
]


def has_generation_tags(template: str) -> bool:
    return re.search(r"\{%-?\s*(end)?generation\s*-?%\}", template) is not None


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def as_openai(row: dict) -> list[dict]:
    """A sample row as OpenAI messages with string content (what the template expects)."""
    if "conversations" in row:
        return [{"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in row["conversations"]]
    out = []
    for m in row["messages"]:
        content = m["content"]
        if isinstance(content, list):
            content = "".join(part["text"] for part in content)
        out.append({"role": m["role"], "content": content or ""})
    return out


def all_sample_conversations() -> list[list[dict]]:
    rows = [*read_jsonl(EMBEDDED_INPUTS["sample-sharegpt"]), *read_jsonl(EMBEDDED_INPUTS["sample-openai"])]
    return [as_openai(row) for row in rows]


# --- embedded target and tokenizer -----------------------------------------


def test_embedded_target_loads_offline_with_peaked_logits():
    path = resolve_target(DEFAULT_TARGET)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    cfg = model.config
    shape = (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size)
    assert shape == ("llama", 8, 64, 1024)
    assert cfg.tie_word_embeddings is False and model.dtype == torch.float32
    assert len(tok) == cfg.vocab_size and tok.model_max_length == 4096
    ids = tok.apply_chat_template(TWO_TURNS, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    probs = out.logits.float().softmax(-1)[0]
    assert len(out.hidden_states) == 9
    # Random but not uniform: uniform would give max prob 1/1024.
    assert probs.max(-1).values.mean() > 0.1
    assert probs.argmax(-1).unique().numel() > 3


def test_embedded_target_loads_in_offline_process(tmp_path):
    # A fresh interpreter (the Hub client reads HF_HUB_OFFLINE at import) with an
    # empty cache: nothing may be fetched or looked up.
    code = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "print(type(m).__name__, len(t))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", code, resolve_target("tiny-llama")], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["LlamaForCausalLM", "1024"]


def test_embedded_target_is_small():
    size = sum(f.stat().st_size for f in EMBEDDED_TARGETS["tiny-llama"].iterdir())
    assert size < 3 * 2**20


def test_special_token_ids():
    tok = tiny_tokenizer()
    assert tok.convert_tokens_to_ids(SPECIALS) == list(range(9))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    # The chat markers are single tokens, never split into bytes.
    assert tok.encode("<|assistant|>hi<|end|>", add_special_tokens=False)[0] == 6
    assert tok.encode("<|assistant|>hi<|end|>", add_special_tokens=False)[-1] == 8


def test_text_round_trips():
    tok = tiny_tokenizer()
    text = "Mix 1 cup of milk with vinegar: café, naïve, 55 °C!\n\tdone"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_rendering_exact():
    tok = tiny_tokenizer()
    text = tok.apply_chat_template(TWO_TURNS[:3], tokenize=False, add_generation_prompt=False)
    assert text == ("<|bos|><|system|>\nAnswer briefly.<|end|>\n<|user|>\nWhat is 17 times 23?<|end|>\n<|assistant|>\nIt is 391.<|end|>\n")
    prompt = tok.apply_chat_template(TWO_TURNS[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|end|>\n<|assistant|>\n") and text.startswith(prompt)


def test_assistant_mask_marks_content_and_end():
    tok = tiny_tokenizer()
    out = tok.apply_chat_template(TWO_TURNS, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    masked = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(masked) == "It is 391.<|end|>That is 408, one more 17.<|end|>"
    # Exactly two spans, each ending on <|end|> and followed by an unmasked newline.
    starts = [t for t in range(len(mask)) if mask[t] and (t == 0 or not mask[t - 1])]
    ends = [t for t in range(len(mask)) if mask[t] and (t + 1 == len(mask) or not mask[t + 1])]
    assert len(starts) == 2
    assert all(ids[t] == 8 and tok.decode(ids[t + 1]) == "\n" for t in ends)
    assert all(ids[t - 1] == tok.convert_tokens_to_ids("\u010a") for t in starts)  # byte-level "\n"


def test_templates_render_identically():
    with_gen = WITH_GENERATION_TEMPLATE.read_text(encoding="utf-8")
    no_gen = NO_GENERATION_TEMPLATE.read_text(encoding="utf-8")
    assert has_generation_tags(with_gen) and not has_generation_tags(no_gen)
    tok = tiny_tokenizer()
    assert tok.chat_template == with_gen
    assert tiny_tokenizer(generation_template=False).chat_template == no_gen
    for messages in all_sample_conversations()[:40]:
        assert tok.apply_chat_template(messages, tokenize=False, chat_template=no_gen) == tok.apply_chat_template(messages, tokenize=False)


def test_no_generation_template_has_no_mask():
    tok = tiny_tokenizer(generation_template=False)
    out = tok.apply_chat_template(TWO_TURNS, return_dict=True, return_assistant_tokens_mask=True)
    assert set(out["assistant_masks"]) == {0}


def test_prefix_stable_on_every_sample():
    # The fallback loss mask relies on render(messages[:i]) being a prefix of
    # render(messages[:i+1]), as strings and as token ids.
    tok = tiny_tokenizer(generation_template=False)
    for messages in all_sample_conversations():
        texts = [tok.apply_chat_template(messages[: i + 1], tokenize=False) for i in range(len(messages))]
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        for i in range(1, len(messages)):
            assert texts[i].startswith(texts[i - 1])
            assert ids[i][: len(ids[i - 1])] == ids[i - 1]


def test_mask_matches_prefix_spans_on_samples():
    # Both loss-mask strategies agree: the generation mask covers exactly the tokens
    # added by each assistant message except the trailing newline.
    tok = tiny_tokenizer()
    for messages in all_sample_conversations()[::10]:
        out = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        expected = "".join(m["content"] + "<|end|>" for m in messages if m["role"] == "assistant")
        masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
        assert tok.decode(masked) == expected


# --- sample chats -----------------------------------------------------------


def test_sharegpt_sample():
    rows = read_jsonl(EMBEDDED_INPUTS["sample-sharegpt"])
    assert len(rows) == 150
    assert [r["id"] for r in rows] == [f"sg-{i:03d}" for i in range(150)]
    roles = {m["from"] for r in rows for m in r["conversations"]}
    assert roles <= set(SHAREGPT_ROLES) and {"human", "gpt", "system", "tool"} <= roles
    assert len(roles & {"gpt", "assistant", "chatgpt", "bot", "model"}) >= 3
    for r in rows:
        turns = r["conversations"]
        assert all(isinstance(m["value"], str) and m["value"] for m in turns)
        assert any(SHAREGPT_ROLES[m["from"]] == "assistant" for m in turns)
    with_system = sum(r["conversations"][0]["from"] == "system" for r in rows)
    assert 0.25 < with_system / len(rows) < 0.55


def test_openai_sample():
    rows = read_jsonl(EMBEDDED_INPUTS["sample-openai"])
    assert len(rows) == 150
    assert [r["id"] for r in rows] == [f"oa-{i:03d}" for i in range(150)]
    kinds = {"str": 0, "parts": 0, "none": 0}
    for r in rows:
        assert any(m["role"] == "assistant" and m["content"] for m in r["messages"])
        for m in r["messages"]:
            assert m["role"] in {"system", "user", "assistant", "tool"}
            c = m["content"]
            if c is None:
                kinds["none"] += 1
                assert m["role"] == "system"
            elif isinstance(c, list):
                kinds["parts"] += 1
                assert all(p["type"] == "text" and isinstance(p["text"], str) for p in c)
            else:
                kinds["str"] += 1
    rows_with_parts = sum(any(isinstance(m["content"], list) for m in r["messages"]) for r in rows)
    assert 5 <= rows_with_parts <= 30 and kinds["none"] == 2 and kinds["str"] > kinds["parts"]


def test_samples_mix_lengths_turns_and_tools():
    tok = tiny_tokenizer()
    convs = all_sample_conversations()
    lengths = [len(tok.apply_chat_template(m, return_dict=False)) for m in convs]
    assert min(lengths) < 100 and 3 <= sum(n > 512 for n in lengths) <= 60 and max(lengths) < 4096
    exchanges = [sum(m["role"] == "user" for m in c) for c in convs]
    assert set(exchanges) == {1, 2, 3, 4}
    tool_convs = [c for c in convs if any(m["role"] == "tool" for m in c)]
    assert tool_convs
    for c in tool_convs:  # a tool turn sits between two assistant turns
        roles = [m["role"] for m in c]
        i = roles.index("tool")
        assert roles[i - 1] == "assistant" and roles[i + 1] == "assistant"


# --- short names --------------------------------------------------------------


def test_resolve_names():
    target = Path(resolve_target("tiny-llama"))
    assert target.is_absolute() and (target / "config.json").is_file()
    assert AutoTokenizer.from_pretrained(target).bos_token == "<|bos|>"
    assert resolve_target("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert resolve_target("./some/dir") == "./some/dir"
    assert Path(resolve_input(DEFAULT_INPUT)).is_dir()
    assert Path(resolve_input("sample-sharegpt")).name == "sharegpt.jsonl"
    assert Path(resolve_input("sample-openai")).is_file()
    assert resolve_input("HuggingFaceH4/ultrachat_200k") == "HuggingFaceH4/ultrachat_200k"
    help_text = describe_embedded()
    assert all(name in help_text for name in [*EMBEDDED_TARGETS, *EMBEDDED_INPUTS])


# --- tiny targets of every architecture -------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_target_builds_and_runs(tmp_path, arch):
    path = make_tiny_target(tmp_path / arch, arch)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    text_cfg = model.config.get_text_config()
    assert text_cfg.num_hidden_layers == NUM_LAYERS and text_cfg.vocab_size == len(tok) == 1024
    if arch == "text_config":
        assert model.config.text_config is text_cfg and text_cfg.final_logit_softcapping is None
    assert model.config.tie_word_embeddings is (arch == "llama_tied")
    ids = tok.apply_chat_template(TWO_TURNS, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert out.logits.shape == (1, ids.shape[1], 1024)
    assert torch.isfinite(out.logits).all()
    assert len(out.hidden_states) == NUM_LAYERS + 1
    assert all(h.shape == (1, ids.shape[1], text_cfg.hidden_size) for h in out.hidden_states)
    probs = out.logits.softmax(-1)[0]
    assert 0.02 < probs.max(-1).values.mean() < 0.99  # peaked, not degenerate


def test_tiny_target_is_seeded(tmp_path):
    a = make_tiny_target(tmp_path / "a", "qwen3", seed=1)
    b = make_tiny_target(tmp_path / "b", "qwen3", seed=1)
    c = make_tiny_target(tmp_path / "c", "qwen3", seed=2)
    wa, wb, wc = (AutoModelForCausalLM.from_pretrained(p).lm_head.weight for p in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_tiny_target_without_generation_template(tmp_path):
    path = make_tiny_target(tmp_path / "m", "llama", generation_template=False)
    tok = AutoTokenizer.from_pretrained(path)
    assert not has_generation_tags(tok.chat_template)
    reference = tiny_tokenizer().apply_chat_template(TWO_TURNS, tokenize=False)
    assert tok.apply_chat_template(TWO_TURNS, tokenize=False) == reference
