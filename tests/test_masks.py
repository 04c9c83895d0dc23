"""Loss masks with NeMo Automodel's semantics on templates in the style of Llama-3, of
ChatML with think blocks, of Phi-3 (an EOS that ends the conversation) and of Gemma (no
system role): assistant spans from prefix renderings (header included), the
two options --mask-generation-prompt and --mask-reasoning-content, reasoning, tool calls and
tools reaching the template, and rows whose template rewrites history.

Expected masks are written out by hand as segments of the rendered text, each marked with
what it is (prompt, the header the generation prompt supplies, reasoning, the rest of the
turn); the optional comparison with NeMo Automodel's own ChatDataset runs only where
nemo_automodel is installed.
"""

import json
from itertools import product

import pytest
from helpers import says
from tiny_targets import tiny_tokenizer

import builder.placement as placement_mod
import builder.target as target_mod
from builder.config import BuildConfig
from builder.conversations import BadRow, normalize_row, row_tools
from builder.embedded import NO_GENERATION_TEMPLATE, WITH_GENERATION_TEMPLATE
from builder.errors import BadRowError
from builder.inputs import load_rows, select_rows
from builder.pipeline import build
from builder.prepare import prepare
from builder.tokenize import encode_messages, has_generation_blocks, tokenize_rows

# Written on one line each (no newline right after a block tag: transformers renders with
# trim_blocks, which would eat it).
LLAMA3 = (
    "<|begin_of_text|>"
    "{% if tools %}<|start_header_id|>system<|end_header_id|>\n\n"
    "Tools:{% for t in tools %} {{ t | tojson }}{% endfor %}<|eot_id|>{% endif %}"
    "{% for m in messages %}"
    "<|start_header_id|>{{ 'ipython' if m.role == 'tool' else m.role }}<|end_header_id|>\n\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}"
    '{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments }}}{% endfor %}'
    "{% else %}{{ m.content }}{% endif %}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def chatml_think(generation_blocks: bool) -> str:
    """Qwen3-style: think blocks only on assistant turns after the last user message; the
    non-thinking generation prompt opens with an empty think block."""
    open_block, close_block = ("{% generation %}", "{% endgeneration %}") if generation_blocks else ("", "")
    return (
        "{% if tools %}<|im_start|>system\n# Tools{% for t in tools %} {{ t | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
        "{% set ns = namespace(last_query=-1) %}"
        "{% for m in messages %}{% if m.role == 'user' %}{% set ns.last_query = loop.index0 %}{% endif %}{% endfor %}"
        "{% for m in messages %}"
        "{% if m.role == 'assistant' %}<|im_start|>assistant\n"
        + open_block
        + "{% if loop.index0 > ns.last_query %}<think>\n{{ m.reasoning_content or '' }}\n</think>\n\n{% endif %}"
        "{{ m.content }}"
        "{% for c in m.tool_calls or [] %}<tool_call>\n"
        '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments }}}\n</tool_call>{% endfor %}'
        "<|im_end|>\n"
        + close_block
        + "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
        "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
    )


# Phi-3-style: the turns have no EOS; the conversation ends with it, unless a generation prompt ends it.
ENDS_WITH_EOS = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)


def refuses_system_role(generation_blocks: bool) -> str:
    """Gemma-style: a system message stops the rendering with the error Gemma's templates raise."""
    open_block, close_block = ("{% generation %}", "{% endgeneration %}") if generation_blocks else ("", "")
    return (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% if m.role == 'assistant' %}<|assistant|>\n"
        + open_block
        + "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}{{ m.content }}<|end|>\n"
        + close_block
        + "{% else %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )


NO_SYSTEM_ROLE = refuses_system_role(generation_blocks=False)
NO_SYSTEM_ROLE_GEN = refuses_system_role(generation_blocks=True)
CHATML = chatml_think(generation_blocks=False)
CHATML_GEN = chatml_think(generation_blocks=True)

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
]
AGENT_ROW = {
    "id": "agent",
    "tools": json.dumps(TOOLS),  # as JSONL and Parquet datasets store it
    "messages": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Is it raining in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "I should check the weather.",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}],
        },
        {"role": "tool", "tool_call_id": "call_0", "content": '{"rain": true}'},
        {"role": "assistant", "content": "Yes, it is raining.", "reasoning_content": "The tool says rain."},
    ],
}
PLAIN_ROW = {
    "id": "plain",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 7 times 6?"},
        {"role": "assistant", "content": "42."},
        {"role": "user", "content": "And 7 times 7?"},
        {"role": "assistant", "content": "49."},
    ],
}
NO_REASONING_ROW = {"id": "no-reasoning", "messages": [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Sure."}]}
# Two user turns: the Qwen3-style template drops the first turn's think block once a later
# user message arrives, so messages[:2] does not render as a prefix of the whole.
REWRITE_ROW = {
    "id": "rewrite",
    "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet back."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye.", "reasoning_content": "Say bye."},
    ],
}
SHAREGPT_ROW = {
    "id": "sharegpt",
    "tools": TOOLS,
    "conversations": [{"from": "human", "value": "Weather?"}, {"from": "gpt", "value": "Let me look.", "reasoning_content": "dropped"}],
}

OPTIONS = [dict(mask_generation_prompt=g, mask_reasoning_content=r) for g, r in product((False, True), repeat=2)]
OPTION_IDS = [f"gen{int(o['mask_generation_prompt'])}-reason{int(o['mask_reasoning_content'])}" for o in OPTIONS]


def make_tokenizer():
    """The embedded tokenizer plus the control tokens of the two template styles (added, as
    the real tokenizers have them)."""
    tok = tiny_tokenizer()
    tok.add_tokens(
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"], special_tokens=True
    )
    tok.add_tokens(["<think>", "</think>"])
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def encode_row(row, tok, template, seq_length=4096, **options):
    return encode_messages(normalize_row(row), tok, template, seq_length, tools=row_tools(row), **options)


def expected(tok, segments, mask_generation_prompt=False, mask_reasoning_content=False):
    """Ids and mask of hand-marked segments: `prompt` is never supervised, `header` (what the
    generation prompt supplies) unless --mask-generation-prompt, `reasoning` unless
    --mask-reasoning-content, `turn` (the rest of an assistant turn) always."""
    keep = {"prompt": False, "header": not mask_generation_prompt, "reasoning": not mask_reasoning_content, "turn": True}
    ids, mask = [], []
    for kind, text in segments:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [int(keep[kind])] * len(piece)
    return ids, mask


LLAMA3_PLAIN = [
    (
        "prompt",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 7 times 6?<|eot_id|>",
    ),
    ("header", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("turn", "42.<|eot_id|>"),
    ("prompt", "<|start_header_id|>user<|end_header_id|>\n\nAnd 7 times 7?<|eot_id|>"),
    ("header", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("turn", "49.<|eot_id|>"),
]

TOOL_CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
CHATML_AGENT = [
    (
        "prompt",
        f"<|im_start|>system\n# Tools {json.dumps(TOOLS[0])}<|im_end|>\n"
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nIs it raining in Oslo?<|im_end|>\n",
    ),
    ("header", "<|im_start|>assistant\n"),
    ("turn", "<think>\n"),
    ("reasoning", "I should check the weather."),
    ("turn", f"\n</think>\n\n{TOOL_CALL_TEXT}<|im_end|>\n"),
    ("prompt", '<|im_start|>user\n<tool_response>\n{"rain": true}\n</tool_response><|im_end|>\n'),
    ("header", "<|im_start|>assistant\n"),
    ("turn", "<think>\n"),
    ("reasoning", "The tool says rain."),
    ("turn", "\n</think>\n\nYes, it is raining.<|im_end|>\n"),
]
# Without reasoning the turn opens with an empty think block: the non-thinking generation
# prompt supplies it together with the header, so --mask-generation-prompt takes out both.
CHATML_NO_REASONING = [
    ("prompt", "<|im_start|>user\nHello?<|im_end|>\n"),
    ("header", "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    ("turn", "Sure.<|im_end|>\n"),
]


# Reasoning that ends with a newline, as the template's text after it begins: the rendering with the
# reasoning cleared ends the same way, and its newline before the reasoning matches the reasoning's own.
TRAILING_NEWLINE_ROW = {
    "id": "trailing-newline",
    "messages": [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Sure.", "reasoning_content": "Say yes.\n"}],
}
CHATML_TRAILING_NEWLINE = [
    ("prompt", "<|im_start|>user\nHello?<|im_end|>\n"),
    ("header", "<|im_start|>assistant\n"),
    ("turn", "<think>\n"),
    ("reasoning", "Say yes.\n"),
    ("turn", "\n</think>\n\nSure.<|im_end|>\n"),
]


def test_templates_take_the_prefix_path():
    assert not has_generation_blocks(LLAMA3) and not has_generation_blocks(CHATML) and has_generation_blocks(CHATML_GEN)


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_llama3_header_is_supervised_unless_masked(tok, options):
    assert encode_row(PLAIN_ROW, tok, LLAMA3, **options) == expected(tok, LLAMA3_PLAIN, **options)


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_chatml_agent_row(tok, options):
    """Reasoning, the tool call of a turn without content, and the tools (given as a JSON
    string) all reach the template; each option takes out exactly its part."""
    assert encode_row(AGENT_ROW, tok, CHATML, **options) == expected(tok, CHATML_AGENT, **options)


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_chatml_empty_think_block_belongs_to_the_generation_prompt(tok, options):
    assert encode_row(NO_REASONING_ROW, tok, CHATML, **options) == expected(tok, CHATML_NO_REASONING, **options)


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_reasoning_that_ends_as_the_text_after_it_begins_is_masked_whole(tok, options):
    """The reasoning lies between the longest common prefix and suffix of the rendering and the rendering
    with it cleared. Both end in "\\n\\n</think>...", but in the cleared one the first of those newlines is
    the template's after "<think>", which the common prefix holds already: a suffix sought past the prefix
    would take it for the reasoning's last newline, which would then stay supervised."""
    assert encode_row(TRAILING_NEWLINE_ROW, tok, CHATML, **options) == expected(tok, CHATML_TRAILING_NEWLINE, **options)


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_options_apply_to_generation_blocks_too(tok, options):
    """With {% generation %} blocks the header lies outside the block, but an empty think
    block inside it is still what the generation prompt supplies, and reasoning is removed
    alike: the block's mask minus the same parts."""
    ids, mask = encode_row(NO_REASONING_ROW, tok, CHATML_GEN, **options)
    header, empty_think = (
        tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"],
        tok("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"],
    )
    prompt = tok("<|im_start|>user\nHello?<|im_end|>\n", add_special_tokens=False)["input_ids"]
    turn = tok("Sure.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert ids == prompt + header + empty_think + turn
    think_kept = 0 if options["mask_generation_prompt"] else 1
    assert mask == [0] * (len(prompt) + len(header)) + [think_kept] * len(empty_think) + [1] * len(turn)

    ids, mask = encode_row(AGENT_ROW, tok, CHATML_GEN, **options)
    want_ids, want_mask = expected(tok, CHATML_AGENT, **options)
    kinds = [kind for kind, text in CHATML_AGENT for _ in tok(text, add_special_tokens=False)["input_ids"]]
    assert ids == want_ids
    assert mask == [0 if kind == "header" else m for kind, m in zip(kinds, want_mask)]


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("template", [LLAMA3, CHATML], ids=["llama3", "chatml"])
def test_right_truncation_keeps_a_prefix(tok, template, options):
    full_ids, full_mask = encode_row(AGENT_ROW, tok, template, **options)
    first = full_mask.index(1)
    for n in (first, first + 1, first + 7, len(full_ids) - 3, len(full_ids)):
        if not any(full_mask[:n]):
            with pytest.raises(BadRow, match="^no_loss_tokens_after_truncation"):
                encode_row(AGENT_ROW, tok, template, n, **options)
            continue
        assert encode_row(AGENT_ROW, tok, template, n, **options) == (full_ids[:n], full_mask[:n])


def masked_runs(tok, ids, mask):
    """The decoded text of each run of supervised tokens."""
    runs, run = [], []
    for token, m in [*zip(ids, mask), (None, 0)]:
        if m:
            run.append(token)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_a_template_that_ends_the_conversation_with_eos(tok, options):
    """Rendered alone, messages[:i] ends with the EOS where the whole conversation goes on. As in
    NeMo Automodel, the turn spans let that last token differ, so each span starts a token late
    and ends a token late; the generation prompt is taken out only after an exact prefix, so
    --mask-generation-prompt takes nothing out of these turns."""
    ids, mask = encode_row(PLAIN_ROW, tok, ENDS_WITH_EOS, **options)
    assert tok.decode(ids) == (
        "<|system|>\nYou are terse.<|end|>\n<|user|>\nWhat is 7 times 6?<|end|>\n<|assistant|>\n42.<|end|>\n"
        "<|user|>\nAnd 7 times 7?<|end|>\n<|assistant|>\n49.<|end|>\n<|eos|>"
    )
    assert masked_runs(tok, ids, mask) == ["\n42.<|end|>\n<|user|>", "\n49.<|end|>\n<|eos|>"]


@pytest.mark.parametrize("mask_generation_prompt", [False, True])
@pytest.mark.parametrize("template", [NO_SYSTEM_ROLE, NO_SYSTEM_ROLE_GEN], ids=["prefix_spans", "generation_blocks"])
def test_a_template_that_refuses_a_system_role_gets_it_in_the_first_user_turn(tok, template, mask_generation_prompt):
    """As NeMo Automodel's tokenizer renders it: the system text, a newline, the user's text.
    Every rendering folds alike (the prefixes too), so the turns are found as without a system."""
    ids, mask = encode_row(PLAIN_ROW, tok, template, mask_generation_prompt=mask_generation_prompt)
    assert tok.decode(ids) == (
        "<|bos|><|user|>\nYou are terse.\nWhat is 7 times 6?<|end|>\n<|assistant|>\n42.<|end|>\n"
        "<|user|>\nAnd 7 times 7?<|end|>\n<|assistant|>\n49.<|end|>\n"
    )
    header = "" if mask_generation_prompt or template == NO_SYSTEM_ROLE_GEN else "<|assistant|>\n"
    assert masked_runs(tok, ids, mask) == [f"{header}42.<|end|>\n", f"{header}49.<|end|>\n"]
    # LLaMA-Factory's row-level system prompt, and a system message without a user turn after it.
    sharegpt = {
        "system": "You are terse.",
        "conversations": [{"from": "human", "value": "What is 7 times 6?"}, {"from": "gpt", "value": "42."}],
    }
    openai = {"messages": PLAIN_ROW["messages"][:3]}
    assert encode_row(sharegpt, tok, template) == encode_row(openai, tok, template)
    alone = {"messages": [{"role": "system", "content": "You are terse."}, {"role": "assistant", "content": "Hi."}]}
    assert tok.decode(encode_row(alone, tok, template)[0]) == "<|bos|><|user|>\nYou are terse.<|end|>\n<|assistant|>\nHi.<|end|>\n"


def test_several_system_messages_cannot_fold_into_one_user_turn(tok):
    row = {"messages": [{"role": "system", "content": "Be terse."}, *PLAIN_ROW["messages"][1:3], {"role": "system", "content": "Be kind."}]}
    for template in (NO_SYSTEM_ROLE, NO_SYSTEM_ROLE_GEN):
        with pytest.raises(
            BadRow, match=says("template_error", "'System role not supported'", "2 system messages", "merge them", "--chat-template")
        ):
            encode_row(row, tok, template)
    assert any(encode_row(row, tok, LLAMA3)[1])  # a template that takes system messages renders both


# ---- the generation prompt, the EOS leniency and the truncation window at their edges -------


def wraps_the_header(counts_messages: bool) -> str:
    """A template whose generation blocks hold the role header too; one variant opens with the
    number of messages, so no earlier rendering is a prefix of the whole (the count changes)."""
    count = "<|system|>\n{{ messages | length }}<|end|>\n" if counts_messages else ""
    return (
        "{{ bos_token }}" + count + "{% for m in messages %}{% if m.role == 'assistant' %}"
        "{% generation %}<|assistant|>\n{{ m.content }}<|end|>\n{% endgeneration %}"
        "{% else %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )


@pytest.mark.parametrize("counts_messages", [False, True])
def test_the_generation_prompt_is_taken_out_only_after_an_exact_prefix(tok, counts_messages):
    """Generation blocks need no prefix renderings, so a template that rewrites what came before
    (here a message count) still builds; but where messages[:i] is not the start of the whole, the
    turn cannot be placed against the generation prompt, and --mask-generation-prompt keeps it whole."""
    template = wraps_the_header(counts_messages)
    ids, mask = encode_row(PLAIN_ROW, tok, template, mask_generation_prompt=True)
    header = "<|assistant|>\n" if counts_messages else ""
    assert masked_runs(tok, ids, mask) == [f"{header}42.<|end|>\n", f"{header}49.<|end|>\n"]
    assert masked_runs(tok, *encode_row(PLAIN_ROW, tok, template)) == ["<|assistant|>\n42.<|end|>\n", "<|assistant|>\n49.<|end|>\n"]


# The generation prompt always opens an empty think block; a turn with reasoning writes only its start.
EMPTY_THINK_PROMPT = (
    "{% for m in messages %}{% if m.role == 'assistant' %}"
    "<|im_start|>assistant\n<think>\n{{ m.reasoning_content or '' }}\n</think>\n\n{{ m.content }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}"
)
PARTLY_PROMPTED = [
    ("prompt", "<|im_start|>user\nHi<|im_end|>\n"),
    ("turn", "<|im_start|>assistant\n<think>\n"),
    ("reasoning", "Greet back."),
    ("turn", "\n</think>\n\nHello.<|im_end|>\n"),
    ("prompt", "<|im_start|>user\nBye<|im_end|>\n"),
    ("header", "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    ("turn", "Bye.<|im_end|>\n"),
]


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_a_turn_that_opens_with_part_of_the_generation_prompt_keeps_it(tok, options):
    """The generation prompt is taken out only where the turn starts with all of it: the turn with
    reasoning shares the header and `<think>` with the prompt, not the rest, and a partial match
    cannot tell template tokens from the message's, so that turn keeps its header."""
    row = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet back."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Bye."},
        ]
    }
    assert encode_row(row, tok, EMPTY_THINK_PROMPT, **options) == expected(tok, PARTLY_PROMPTED, **options)


def test_a_generation_prompt_that_fails_after_the_first_turn_is_a_template_error(tok):
    raises = LLAMA3.replace(
        "{% if add_generation_prompt %}", "{% if add_generation_prompt %}{{ raise_exception('no generation prompt here') }}"
    )
    assert encode_row(PLAIN_ROW, tok, raises) == encode_row(PLAIN_ROW, tok, LLAMA3)  # the option off: never rendered
    with pytest.raises(BadRow, match="^template_error: TemplateError: no generation prompt here$") as info:
        encode_row(PLAIN_ROW, tok, raises, mask_generation_prompt=True)
    assert info.value.reason == "template_error"


ASSISTANT_FIRST_ROW = {
    "messages": [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]
}


def test_a_leading_turn_of_a_template_that_cannot_render_no_messages_keeps_its_header(tok):
    """With generation blocks a leading assistant turn needs no rendering of no messages, but its
    generation prompt does: a template that reads messages[0] unguarded leaves that turn's header
    in the loss under --mask-generation-prompt, and the later turns lose theirs."""
    template = wraps_the_header(False).replace(
        "{{ bos_token }}", "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|system|>\nBe kind.<|end|>\n{% endif %}"
    )
    row = ASSISTANT_FIRST_ROW
    ids, mask = encode_row(row, tok, template, mask_generation_prompt=True)
    assert masked_runs(tok, ids, mask) == ["<|assistant|>\nHello.<|end|>\n", "Yes.<|end|>\n"]
    assert tok.decode(ids).startswith("<|bos|><|system|>\nBe kind.<|end|>\n<|assistant|>\nHello.")


def test_an_eos_alone_does_not_render_the_start_of_a_conversation(tok):
    """A rendering may end with an EOS where the whole goes on (ENDS_WITH_EOS), but only after
    something else, as in NeMo Automodel: this template renders no messages as the EOS alone, which
    says nothing of where a leading assistant turn starts, so the row is refused. With a BOS before
    the EOS the turn is located, a token late as the template's other turns are."""
    row = ASSISTANT_FIRST_ROW
    assert tok.apply_chat_template([[]], chat_template=ENDS_WITH_EOS, tokenize=False) == [tok.eos_token]
    with pytest.raises(BadRow, match=r"^template_not_prefix_stable: .*messages\[:0\]") as info:
        encode_row(row, tok, ENDS_WITH_EOS)
    assert info.value.reason == "template_not_prefix_stable"
    assert masked_runs(tok, *encode_row({"messages": row["messages"][1:]}, tok, ENDS_WITH_EOS)) == ["\nYes.<|end|>\n<|eos|>"]
    with_bos = "{{ bos_token }}" + ENDS_WITH_EOS
    assert tok.apply_chat_template([[]], chat_template=with_bos, tokenize=False) == [tok.bos_token + tok.eos_token]
    assert masked_runs(tok, *encode_row(row, tok, with_bos)) == ["\nHello.<|end|>\n<|user|>", "\nYes.<|end|>\n<|eos|>"]


# Clearing the reasoning lengthens the rendering: the template writes a placeholder in its place.
REASONING_PLACEHOLDER = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'assistant' %}"
    "<|assistant|>\n<think>{{ m.reasoning_content or 'nothing was thought through here' }}</think>{{ m.content }}<|end|>\n"
    "{% else %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_the_rendering_without_reasoning_is_read_whole_from_a_conversation_of_seq_length_tokens(tok):
    """As NeMo Automodel reads it: a conversation that reaches seq_length is compared with the
    untruncated rendering without its reasoning, one shorter with that rendering cut to seq_length.
    Here the cut one (longer than the conversation) loses the end it shares with it, so all after
    the reasoning's start leaves the loss; the whole one takes out the reasoning alone."""
    row = {"messages": [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Sure.", "reasoning_content": "Yes."}]}
    ids, _ = encode_row(row, tok, REASONING_PLACEHOLDER)
    n = len(ids)
    runs = {s: masked_runs(tok, *encode_row(row, tok, REASONING_PLACEHOLDER, s, mask_reasoning_content=True)) for s in (n, n + 1)}
    assert runs[n] == ["<|assistant|>\n<think>", "</think>Sure.<|end|>\n"]
    assert runs[n + 1] == ["<|assistant|>\n<think>"]


def test_llama3_tool_call_turn_and_tools(tok):
    ids, mask = encode_row(AGENT_ROW, tok, LLAMA3)
    text = tok.decode(ids)
    assert f"Tools: {json.dumps(TOOLS[0])}<|eot_id|>" in text
    # The template does not render reasoning_content, so --mask-reasoning-content changes nothing.
    assert encode_row(AGENT_ROW, tok, LLAMA3, mask_reasoning_content=True) == (ids, mask)
    call = '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>'
    supervised = tok.decode([t for t, m in zip(ids, mask) if m])
    assert supervised == call + "<|start_header_id|>assistant<|end_header_id|>\n\nYes, it is raining.<|eot_id|>"


def test_sharegpt_rows_give_role_and_text_and_pass_tools(tok):
    messages = normalize_row(SHAREGPT_ROW)
    assert messages == [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Let me look."}]
    assert row_tools(SHAREGPT_ROW) == TOOLS
    ids, _ = encode_row(SHAREGPT_ROW, tok, CHATML)
    assert tok.decode(ids).startswith(f"<|im_start|>system\n# Tools {json.dumps(TOOLS[0])}<|im_end|>\n")
    assert "dropped" not in tok.decode(ids)


def test_openai_legacy_function_call_renders_as_the_tool_call(tok):
    """OpenAI's legacy `function_call` and `function` role are the `tool_calls` and `tool` role templates read."""
    legacy = {
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": "Is it raining in Oslo?"},
            {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"role": "function", "name": "get_weather", "content": '{"rain": true}'},
            {"role": "assistant", "content": "Yes, it is raining."},
        ],
    }
    tool_calls = json.loads(json.dumps(legacy))
    tool_calls["messages"][1:3] = [
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": legacy["messages"][1]["function_call"]}]},
        {"role": "tool", "name": "get_weather", "content": '{"rain": true}'},
    ]
    for template in (LLAMA3, CHATML):
        ids, mask = encode_row(legacy, tok, template)
        assert (ids, mask) == encode_row(tool_calls, tok, template)
        assert '"name": "get_weather"' in tok.decode([t for t, m in zip(ids, mask) if m])


SEARCH_TOOL = {
    "type": "function",
    "function": {"name": "search", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}},
}
# Tool definitions and call arguments as objects, with keys the other row's lack.
OBJECT_CALL_ROWS = [
    {
        "id": "weather",
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": "Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
            {"role": "tool", "content": "rain"},
            {"role": "assistant", "content": "Rain."},
        ],
    },
    {
        "id": "search",
        "tools": [SEARCH_TOOL],
        "messages": [
            {"role": "user", "content": "Find x."},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "search", "arguments": {"query": "x"}}}]},
            {"role": "tool", "content": "found"},
            {"role": "assistant", "content": "Found."},
        ],
    },
]


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_tool_calls_and_tools_encode_alike_from_json_and_parquet(tmp_path, tok, suffix):
    """Arrow gives each object of a column every key the column's objects have, null where one has none:
    from Parquet the weather call's arguments would read {"city": "Oslo", "query": null}, a key no call held,
    in the supervised tokens, and the search tool's schema a "city" property."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / f"calls.{suffix}"
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in OBJECT_CALL_ROWS))
    else:
        pq.write_table(pa.Table.from_pylist(OBJECT_CALL_ROWS), path)
    rows, _ = load_rows(str(path))
    rows, order = select_rows(rows, seed=0, max_samples=None)
    out = {record["sample_id"]: record for record in tokenize_rows(rows, order, tok, LLAMA3, 256, 1)}
    for row in OBJECT_CALL_ROWS:
        assert (out[row["id"]]["input_ids"], out[row["id"]]["loss_mask"]) == encode_row(row, tok, LLAMA3, 256), row["id"]
    weather = out["weather"]
    supervised = tok.decode([t for t, m in zip(weather["input_ids"], weather["loss_mask"]) if m])
    assert supervised.startswith(
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>'
    )
    assert f"Tools: {json.dumps(SEARCH_TOOL)}<|eot_id|>" in tok.decode(out["search"]["input_ids"])


# ---- templates that rewrite history: skipped and counted, or --strict ----------------------


def test_rewriting_template_is_a_bad_row(tok):
    with pytest.raises(BadRow, match=r"^template_not_prefix_stable: .*messages\[:2\].*--chat-template") as info:
        encode_row(REWRITE_ROW, tok, CHATML)
    assert info.value.reason == "template_not_prefix_stable"
    # With generation blocks the same row needs no prefix renderings.
    _, mask = encode_row(REWRITE_ROW, tok, CHATML_GEN)
    assert any(mask)


def write_inputs(tmp_path, rows, template):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "template.jinja"
    path.write_text(template)
    return dict(target_model="tiny-llama", input_data=str(data), chat_template=str(path), output_dir=str(tmp_path / "out"), seq_length=256)


# (PLAIN_ROW would be skipped too: the template drops the empty think block of its first turn.)
ROWS = [AGENT_ROW, NO_REASONING_ROW, REWRITE_ROW, SHAREGPT_ROW]


def test_not_prefix_stable_row_is_skipped_and_counted(tmp_path):
    prep = prepare(BuildConfig(**write_inputs(tmp_path, ROWS, CHATML)))
    assert prep.skipped == {"template_not_prefix_stable": 1}
    assert sorted(prep.samples["sample_id"]) == ["agent", "no-reasoning", "sharegpt"]


def test_strict_stops_on_a_not_prefix_stable_row_before_the_model_loads(tmp_path, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("model weights loaded")

    monkeypatch.setattr(target_mod, "load_model", no_weights)
    monkeypatch.setattr(placement_mod, "load_model", no_weights)
    cfg = BuildConfig(**write_inputs(tmp_path, ROWS, CHATML), strict=True)
    with pytest.raises(BadRowError, match=says("--strict", "input row 2", "'rewrite'", "template_not_prefix_stable", "messages[:2]")):
        build(cfg, progress=False)
    assert not (tmp_path / "out").exists()


# ---- the same masks as NeMo Automodel's own chat dataset -----------------------------------

NEMO_ROWS = [
    AGENT_ROW,
    PLAIN_ROW,
    NO_REASONING_ROW,
    TRAILING_NEWLINE_ROW,
    REWRITE_ROW,
    SHAREGPT_ROW,
    {
        "id": "string-arguments",
        "messages": [
            {"role": "user", "content": "Oslo?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "rain"},
            {"role": "assistant", "content": "Rain.", "reasoning_content": ""},
        ],
    },
    {
        "id": "text-parts",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "It is"}, {"type": "text", "text": "4."}]},
        ],
    },
    {
        "id": "both-lists",
        "messages": [{"role": "user", "content": "Asked in messages?"}, {"role": "assistant", "content": "Answered in messages."}],
        "conversations": [{"from": "human", "value": "Asked in conversations?"}, {"from": "gpt", "value": "Answered in conversations."}],
    },
]
NEMO_TEMPLATES = {
    "llama3": LLAMA3,
    "chatml": CHATML,
    "chatml_generation_blocks": CHATML_GEN,
    "embedded_no_generation": NO_GENERATION_TEMPLATE.read_text(),
    "embedded_with_generation": WITH_GENERATION_TEMPLATE.read_text(),
    "ends_with_eos": ENDS_WITH_EOS,
    "refuses_system_role": NO_SYSTEM_ROLE,
    "refuses_system_role_generation_blocks": NO_SYSTEM_ROLE_GEN,
}


def nemo_tokenizer(tmp_path):
    """The tokenizer as NeMo's precompute loads it, through NeMoAutoTokenizer (whose
    apply_chat_template folds a system message into the first user turn when the template
    refuses a system role)."""
    auto_tokenizer = pytest.importorskip("nemo_automodel._transformers.auto_tokenizer")
    make_tokenizer().save_pretrained(tmp_path / "tokenizer")
    return auto_tokenizer.NeMoAutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))


def nemo_samples(tmp_path, template, seq_length, options):
    """NeMo's EAGLE-3 dataset as its precompute builds it (padded to seq_length, unshifted),
    unpadded again; a row NeMo refuses gives the error text."""
    chat_dataset = pytest.importorskip("nemo_automodel.components.datasets.llm.chat_dataset")
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in NEMO_ROWS))
    dataset = chat_dataset.ChatDataset(
        str(path),
        tokenizer=nemo_tokenizer(tmp_path),
        seq_length=seq_length,
        padding="max_length",
        truncation=True,
        unshifted=True,
        chat_template=template,
        **options,
    )
    out = []
    for i in range(len(dataset)):
        try:
            sample = dataset[i]
        except ValueError as err:
            out.append(str(err))
            continue
        n = sum(sample["attention_mask"])
        assert not any(sample["loss_mask"][n:])
        out.append((sample["input_ids"][:n], sample["loss_mask"][:n]))
    return out


@pytest.mark.parametrize("seq_length", [4096, 48])
@pytest.mark.parametrize("name", sorted(NEMO_TEMPLATES))
def test_masks_equal_nemo_automodel(tmp_path, tok, name, seq_length):
    template = NEMO_TEMPLATES[name]
    for options in OPTIONS:
        theirs = nemo_samples(tmp_path, template, seq_length, options)
        for row, nemo in zip(NEMO_ROWS, theirs):
            where = (name, seq_length, options, row["id"])
            try:
                ours = encode_row(row, tok, template, seq_length, **options)
            except BadRow as bad:
                if bad.reason == "template_not_prefix_stable":
                    assert isinstance(nemo, str) and "does not reproduce a prefix" in nemo, where
                else:
                    assert bad.reason == "no_loss_tokens_after_truncation" and not any(nemo[1]), where
                continue
            assert ours == (list(nemo[0]), list(nemo[1])), where


# ---- the options as build settings: flags, identity, resume, card ---------------------------


def test_cli_flags_default_off():
    from builder.cli import build_parser, config_from_args

    parser = build_parser()
    cfg = config_from_args(parser.parse_args(["build"]))
    assert (cfg.mask_generation_prompt, cfg.mask_reasoning_content) == (False, False)
    cfg = config_from_args(parser.parse_args(["build", "--mask-generation-prompt", "--mask-reasoning-content"]))
    assert (cfg.mask_generation_prompt, cfg.mask_reasoning_content) == (True, True)


def test_identity_records_the_options_and_the_fingerprint_tells_them_apart(tmp_path):
    from builder.manifest import fingerprint

    settings = write_inputs(tmp_path, ROWS, CHATML)
    identities = [prepare(BuildConfig(**settings, dry_run=True, **options)).identity for options in OPTIONS]
    for identity, options in zip(identities, OPTIONS):
        assert {k: identity[k] for k in options} == options
    assert len({fingerprint(identity) for identity in identities}) == len(OPTIONS)


def test_resume_refuses_a_changed_option_before_the_model_loads(tmp_path, monkeypatch):
    from builder.build_state import BUILD_STATE_FILE
    from builder.errors import ResumeMismatch
    from builder.files import write_json_atomic

    cfg = BuildConfig(**write_inputs(tmp_path, ROWS, CHATML))
    # What an interrupted build leaves before its first shard: the identity it was started with.
    write_json_atomic(tmp_path / "out" / BUILD_STATE_FILE, prepare(cfg).identity)
    monkeypatch.setattr(placement_mod, "load_model", lambda *a, **k: pytest.fail("weights loaded before the identity check"))
    for field in ("mask_generation_prompt", "mask_reasoning_content"):
        with pytest.raises(ResumeMismatch, match=rf"(?m)^  {field}: cache has False, this run has True$"):
            build(cfg.replace(resume=True, **{field: True}), progress=False)


def test_built_cache_holds_the_masks_and_shows_the_options(tmp_path):
    from helpers import decoded_rows

    from builder.reader import read_manifest

    cfg = BuildConfig(**write_inputs(tmp_path, ROWS, CHATML), mask_generation_prompt=True, dtype="fp32", draft_vocab_size=64)
    build(cfg, progress=False)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["identity"]["mask_generation_prompt"] is True and manifest["identity"]["mask_reasoning_content"] is False
    assert manifest["skipped"] == {"template_not_prefix_stable": 1}
    text = " ".join((tmp_path / "out" / "README.md").read_text().split("\n---\n", 1)[1].split())  # the card's prose
    assert (
        "Loss mask: assistant turns with NeMo Automodel's options `mask_generation_prompt: true` (without the role header "
        "the generation prompt supplies) and `mask_reasoning_content: false` (with the rendered reasoning)"
    ) in text
    tok = tiny_tokenizer()
    by_id = {row["id"]: row for row in ROWS}
    rows = decoded_rows(tmp_path / "out")
    assert sorted(r["sample_id"] for r in rows) == ["agent", "no-reasoning", "sharegpt"]
    for r in rows:
        ids, mask = encode_row(by_id[r["sample_id"]], tok, CHATML, cfg.seq_length, mask_generation_prompt=True)
        assert r["input_ids"].tolist() == ids and r["loss_mask"].tolist() == mask
