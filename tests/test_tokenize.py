"""Tokenization and loss mask (docs/supervision.md): generation blocks vs prefix spans, truncation,
template failures, and the cached `datasets.map`. (The two mask options on other template
styles, and the comparison with NeMo Automodel: tests/test_masks.py.)"""

import json

import pytest
from helpers import says
from tiny_targets import target_with_truncation_and_padding, tiny_tokenizer, tokenizer_hash_of_earlier_versions

import builder.tokenize as tokenize_mod
from builder.conversations import BadRow, normalize_row
from builder.embedded import EMBEDDED_INPUTS, NO_GENERATION_TEMPLATE, WITH_GENERATION_TEMPLATE
from builder.inputs import load_rows, select_rows
from builder.tokenize import encode_messages, has_generation_blocks, template_of, tokenize_rows

WITH_GEN = WITH_GENERATION_TEMPLATE.read_text()
NO_GEN = NO_GENERATION_TEMPLATE.read_text()
TEMPLATES = {"generation_blocks": WITH_GEN, "prefix_spans": NO_GEN}

SYSTEM_MULTI_TURN = [
    {"role": "system", "content": "You are a terse math tutor."},
    {"role": "user", "content": "What is 7 times 6?"},
    {"role": "assistant", "content": "42."},
    {"role": "user", "content": "And 7 times 7?"},
    {"role": "assistant", "content": "49, one more seven."},
]
WITH_TOOL = [
    {"role": "system", "content": "You can call a weather tool."},
    {"role": "user", "content": "Is it raining in Oslo?"},
    {"role": "assistant", "content": "Let me check the weather."},
    {"role": "tool", "content": '{"city": "Oslo", "rain": true}'},
    {"role": "assistant", "content": "Yes, it is raining in Oslo."},
]
NO_SYSTEM = [
    {"role": "user", "content": "Say hi."},
    {"role": "assistant", "content": "Hi!"},
]
# A greeting before the user speaks: the turn starts after what the template renders for no messages (its BOS).
ASSISTANT_FIRST = [
    {"role": "assistant", "content": "Hello, how can I help?"},
    {"role": "user", "content": "Say hi."},
    {"role": "assistant", "content": "Hi!"},
]
CHATS = {"system_multi_turn": SYSTEM_MULTI_TURN, "with_tool": WITH_TOOL, "no_system": NO_SYSTEM, "assistant_first": ASSISTANT_FIRST}

# Hand-written: the assistant texts; the loss mask selects, per contiguous masked run,
ASSISTANT_TEXTS = {
    "system_multi_turn": ["42.", "49, one more seven."],
    "with_tool": ["Let me check the weather.", "Yes, it is raining in Oslo."],
    "no_system": ["Hi!"],
    "assistant_first": ["Hello, how can I help?", "Hi!"],
}
# - with generation blocks: the text and <|end|> (what the block wraps);
# - with prefix spans (NeMo Automodel's default): all the template writes for the turn, the
#   <|assistant|> header the generation prompt supplies and the newline after <|end|> too;
# - with prefix spans and --mask-generation-prompt: all that but the header.
EXPECTED_RUNS = {
    ("generation_blocks", False): lambda text: f"{text}<|end|>",
    ("generation_blocks", True): lambda text: f"{text}<|end|>",
    ("prefix_spans", False): lambda text: f"<|assistant|>\n{text}<|end|>\n",
    ("prefix_spans", True): lambda text: f"{text}<|end|>\n",
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def masked_runs(tok, ids, mask):
    """Decode each contiguous run of loss-masked tokens."""
    runs, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(run) for run in runs]


def test_the_two_templates_take_the_two_paths(tok):
    assert has_generation_blocks(WITH_GEN)
    assert not has_generation_blocks(NO_GEN)
    assert has_generation_blocks(tok.chat_template)  # the embedded target's own template


@pytest.mark.parametrize("tag", ["{%- generation %}", "{%generation%}", "{%-generation-%}", "{%- generation -%}", "{%\tgeneration\n%}"])
def test_a_generation_tag_is_one_with_or_without_spaces(tok, tag):
    """Jinja reads `{%generation%}` as the tag `{% generation %}` is, so the template has blocks and
    they mark the turns (docs/supervision.md: NeMo Automodel's detection, wanting a space, does not)."""
    template = WITH_GEN.replace("{%- generation %}", tag)
    assert WITH_GEN.count("{%- generation %}") == 1 and tag in template
    assert has_generation_blocks(template)
    ids, mask = encode_messages(SYSTEM_MULTI_TURN, tok, template, 4096)
    assert masked_runs(tok, ids, mask) == ["42.<|end|>", "49, one more seven.<|end|>"]


def test_an_end_tag_or_the_word_alone_is_no_generation_block():
    assert not has_generation_blocks("{% endgeneration %}{{ 'generation' }}{% if generation %}{% endif %}")


@pytest.mark.parametrize("mask_generation_prompt", [False, True])
@pytest.mark.parametrize("name", sorted(CHATS))
@pytest.mark.parametrize("path", sorted(TEMPLATES))
def test_masked_tokens_are_exactly_the_assistant_turns(tok, name, path, mask_generation_prompt):
    ids, mask = encode_messages(CHATS[name], tok, TEMPLATES[path], 4096, mask_generation_prompt=mask_generation_prompt)
    assert masked_runs(tok, ids, mask) == [EXPECTED_RUNS[path, mask_generation_prompt](t) for t in ASSISTANT_TEXTS[name]]
    assert tok.decode(ids) == tok.apply_chat_template(CHATS[name], chat_template=WITH_GEN, tokenize=False)
    assert ids[0] == tok.bos_token_id and mask[0] == 0


@pytest.mark.parametrize("name", sorted(CHATS))
def test_generation_blocks_ignore_both_options_here(tok, name):
    # The embedded template's blocks leave the header out and its turns carry no reasoning.
    default = encode_messages(CHATS[name], tok, WITH_GEN, 4096)
    both = encode_messages(CHATS[name], tok, WITH_GEN, 4096, mask_generation_prompt=True, mask_reasoning_content=True)
    assert both == default


def test_mask_values_on_the_shortest_chat(tok):
    ids, mask = encode_messages(NO_SYSTEM, tok, NO_GEN, 4096)
    tokens = tok.convert_ids_to_tokens(ids)
    # <bos><|user|>\nSay hi.<|end|>\n [<|assistant|>\nHi!<|end|>\n]
    start = tokens.index("<|assistant|>")
    assert mask == [0] * start + [1] * (len(tokens) - start)
    assert tokens[-2:] == ["<|end|>", "Ċ"] and tokens[start + 1] == "Ċ"
    _, without_header = encode_messages(NO_SYSTEM, tok, NO_GEN, 4096, mask_generation_prompt=True)
    assert without_header == [0] * (start + 2) + [1] * (len(tokens) - start - 2)


@pytest.mark.parametrize("path", sorted(TEMPLATES))
def test_a_tokenizer_that_adds_a_bos_itself_gets_only_the_templates(tok, path):
    """The template writes the BOS; a tokenizer whose post-processor adds one too (as Llama's do) must
    not add a second: a rendering is text the template wrote whole, tokenized without special tokens.
    (The generation-block path renders and tokenizes in one call, which adds none either.)"""
    from tokenizers.processors import TemplateProcessing

    adds_bos = tiny_tokenizer()
    bos = (adds_bos.bos_token, adds_bos.bos_token_id)
    adds_bos.backend_tokenizer.post_processor = TemplateProcessing(single=f"{bos[0]} $A", special_tokens=[bos])
    assert adds_bos("Hi!")["input_ids"] == [bos[1], *tok("Hi!")["input_ids"]]  # the premise
    ids, mask = encode_messages(SYSTEM_MULTI_TURN, adds_bos, TEMPLATES[path], 4096)
    assert (ids, mask) == encode_messages(SYSTEM_MULTI_TURN, tok, TEMPLATES[path], 4096)
    assert ids[0] == bos[1] and ids.count(bos[1]) == 1


def test_every_sample_chat_on_both_paths(tok):
    rows = [json.loads(line) for path in (EMBEDDED_INPUTS["sample-sharegpt"], EMBEDDED_INPUTS["sample-openai"]) for line in path.open()]
    assert len(rows) == 300
    for row in rows:
        messages = normalize_row(row)
        texts = [m["content"] for m in messages if m["role"] == "assistant"]
        with_gen = encode_messages(messages, tok, WITH_GEN, 4096)
        assert masked_runs(tok, *with_gen) == [EXPECTED_RUNS["generation_blocks", False](t) for t in texts], row.get("id")
        prefix = encode_messages(messages, tok, NO_GEN, 4096, mask_generation_prompt=True)
        assert prefix[0] == with_gen[0], row.get("id")
        assert masked_runs(tok, *prefix) == [EXPECTED_RUNS["prefix_spans", True](t) for t in texts], row.get("id")


def test_trailing_whitespace_is_masked_with_the_turn(tok):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "two lines\n\n"}]
    assert masked_runs(tok, *encode_messages(messages, tok, WITH_GEN, 4096)) == ["two lines\n\n<|end|>"]
    assert masked_runs(tok, *encode_messages(messages, tok, NO_GEN, 4096)) == ["<|assistant|>\ntwo lines\n\n<|end|>\n"]


# ---- truncation ---------------------------------------------------------------------------


@pytest.mark.parametrize("mask_generation_prompt", [False, True])
@pytest.mark.parametrize("path", sorted(TEMPLATES))
def test_right_truncation_is_a_prefix(tok, path, mask_generation_prompt):
    full_ids, full_mask = encode_messages(WITH_TOOL, tok, TEMPLATES[path], 4096, mask_generation_prompt=mask_generation_prompt)
    first_loss = full_mask.index(1)
    for n in (first_loss + 1, first_loss + 5, len(full_ids) - 1, len(full_ids), len(full_ids) + 10):
        ids, mask = encode_messages(WITH_TOOL, tok, TEMPLATES[path], n, mask_generation_prompt=mask_generation_prompt)
        assert len(ids) == min(n, len(full_ids))
        assert ids == full_ids[:n] and mask == full_mask[:n]


def test_truncation_mid_turn_keeps_the_start_of_the_turn(tok):
    full_ids, full_mask = encode_messages(WITH_TOOL, tok, WITH_GEN, 4096)
    n = full_mask.index(1) + 3
    ids, mask = encode_messages(WITH_TOOL, tok, WITH_GEN, n)
    assert masked_runs(tok, ids, mask) == [tok.decode(full_ids[n - 3 : n])]
    assert "Let me check the weather.".startswith(masked_runs(tok, ids, mask)[0])


@pytest.mark.parametrize("path", sorted(TEMPLATES))
def test_no_assistant_token_within_seq_length(tok, path):
    messages = [{"role": "user", "content": "a long question " * 20}, {"role": "assistant", "content": "ok"}]
    _, full_mask = encode_messages(messages, tok, TEMPLATES[path], 4096)
    first_loss = full_mask.index(1)
    assert first_loss > 40
    with pytest.raises(BadRow, match=says("no_loss_tokens_after_truncation", f"first {first_loss} tokens")) as info:
        encode_messages(messages, tok, TEMPLATES[path], first_loss)
    assert info.value.reason == "no_loss_tokens_after_truncation"
    assert sum(encode_messages(messages, tok, TEMPLATES[path], first_loss + 1)[1]) == 1


# ---- templates that fail -----------------------------------------------------------------

RAISES = "{{ bos_token }}{% for m in messages %}{{ raise_exception('no tools here') if m['role'] == 'tool' else m['content'] }}{% endfor %}"
RAISES_WITH_GEN = "{% for m in messages %}{% generation %}{{ m['content'] + 1 }}{% endgeneration %}{% endfor %}"
LAST_MESSAGE_ONLY = (
    "{{ bos_token }}{% set m = messages[-1] %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DROPS_EARLIER_ASSISTANT_TURNS = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] != 'assistant' or loop.last %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_template_that_raises_is_a_template_error(tok):
    with pytest.raises(BadRow, match="^template_error: TemplateError: no tools here") as info:
        encode_messages(WITH_TOOL, tok, RAISES, 4096)
    assert info.value.reason == "template_error"
    # The same template is fine on a conversation that does not reach the raise.
    ids, mask = encode_messages(NO_SYSTEM, tok, RAISES, 4096)
    assert tok.decode(ids) == "<|bos|>Say hi.Hi!" and any(mask)


def test_template_with_generation_blocks_that_raises(tok):
    with pytest.raises(BadRow, match="^template_error: TypeError: .*str.*int") as info:
        encode_messages(NO_SYSTEM, tok, RAISES_WITH_GEN, 4096)
    assert info.value.reason == "template_error"


@pytest.mark.parametrize("template", [LAST_MESSAGE_ONLY, DROPS_EARLIER_ASSISTANT_TURNS], ids=["last_message_only", "drops_assistant_turns"])
def test_template_not_prefix_stable(tok, template):
    with pytest.raises(BadRow, match=r"^template_not_prefix_stable: .*messages\[:\d\].*--chat-template") as info:
        encode_messages(SYSTEM_MULTI_TURN, tok, template, 4096)
    assert info.value.reason == "template_not_prefix_stable"


def test_template_not_prefix_stable_names_the_turn(tok):
    with pytest.raises(BadRow, match=r"messages\[:2\]"):
        encode_messages(SYSTEM_MULTI_TURN, tok, LAST_MESSAGE_ONLY, 4096)


READS_THE_FIRST_MESSAGE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|system|>\nBe kind.<|end|>\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_a_leading_assistant_turn_needs_a_template_that_renders_no_messages(tok):
    """Where the turn starts is what the template writes before any message (here a default
    system prompt): a template that cannot render no messages cannot say, so the row is skipped."""
    with pytest.raises(BadRow, match=says("template_error", "leading assistant turn", "no messages", "{% generation %}")) as info:
        encode_messages(ASSISTANT_FIRST, tok, READS_THE_FIRST_MESSAGE, 4096)
    assert info.value.reason == "template_error"
    ids, mask = encode_messages(NO_SYSTEM, tok, READS_THE_FIRST_MESSAGE, 4096)
    assert masked_runs(tok, ids, mask) == ["<|assistant|>\nHi!<|end|>\n"]


# Templates without a system role, written for these tests after Mixtral-8x7B-Instruct's (which
# raises for one) and Mistral v0.3's (which writes it into the conversation's last turn, when
# that is the user's, so prefixes do not render as prefixes).
ROLES_MUST_ALTERNATE = (
    "{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
SYSTEM_IN_LAST_USER_TURN = (
    "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}{{ bos_token }}{% for m in turns %}"
    "{% if m['role'] == 'user' and loop.last and system is defined %}[INST] {{ system }}\n\n{{ m['content'] }}[/INST]"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }}[/INST]{% else %} {{ m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
ROW_SYSTEM_REFUSED = ("the row's 'system' field was added as a system message", "drop the field", "--chat-template")


@pytest.mark.parametrize(
    "template, reason, detail",
    [
        (ROLES_MUST_ALTERNATE, "template_error", "TemplateError: Conversation roles must alternate"),
        (SYSTEM_IN_LAST_USER_TURN, "template_not_prefix_stable", "the chat template does not render messages[:"),
    ],
    ids=["raises", "not_prefix_stable"],
)
def test_a_template_without_a_system_role_says_the_row_system_field_is_why(tok, template, reason, detail):
    """A row's `system` field opens the conversation as a system message; a template that takes
    none refuses the row saying nothing of the field, so the reason names it and the fix."""
    turns = [{"from": "human", "value": "What is 7 times 6?"}, {"from": "gpt", "value": "42."}]
    with pytest.raises(BadRow, match=says(f"{reason}: {detail}", *ROW_SYSTEM_REFUSED)) as info:
        encode_messages(normalize_row({"system": "You are terse.", "conversations": turns}), tok, template, 4096)
    assert info.value.reason == reason
    # The same system message as the conversation's own turn is refused as the template refuses it.
    own = normalize_row({"conversations": [{"from": "system", "value": "You are terse."}, *turns]})
    with pytest.raises(BadRow, match=f"^{reason}: ") as info:
        encode_messages(own, tok, template, 4096)
    assert "'system' field" not in str(info.value)
    # Without the field the row builds.
    ids, mask = encode_messages(normalize_row({"conversations": turns}), tok, template, 4096)
    assert masked_runs(tok, ids, mask)[-1].startswith(" 42." if template is SYSTEM_IN_LAST_USER_TURN else "42.")


def test_a_row_system_field_is_not_blamed_where_the_template_refuses_the_row_anyway(tok):
    row = {"system": "You can call tools.", "messages": WITH_TOOL[1:]}
    with pytest.raises(BadRow, match="^template_error: TemplateError: no tools here$"):
        encode_messages(normalize_row(row), tok, RAISES, 4096)


def test_template_of(tok):
    assert template_of(tok, None) == tok.chat_template
    assert template_of(tok, NO_GEN) == NO_GEN
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match=says("no chat template", "--chat-template")):
        template_of(bare, None)


# ---- the cached datasets.map ---------------------------------------------------------------


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def twelve_rows():
    rows = []
    for i in range(12):
        if i % 2:
            rows.append(
                {
                    "id": f"oa-{i}",
                    "messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}],
                }
            )
        else:
            rows.append(
                {
                    "id": f"sg-{i}",
                    "conversations": [
                        {"from": "system", "value": "Be short."},
                        {"from": "human", "value": f"Q{i}"},
                        {"from": "gpt", "value": f"A{i}"},
                    ],
                }
            )
    rows[5] = {"id": "bad-5", "messages": [{"role": "user", "content": "no answer"}]}
    return rows


def tokenized(path, tok, num_proc, seq_length=64):
    rows, _ = load_rows(str(path))
    rows, order = select_rows(rows, seed=3, max_samples=None)
    return tokenize_rows(rows, order, tok, tok.chat_template, seq_length, num_proc), order


def test_tokenize_rows_values(tmp_path, tok):
    rows = twelve_rows()
    out, order = tokenized(write_jsonl(tmp_path / "a" / "chats.jsonl", rows), tok, 1)
    assert out["source_index"] == [int(i) for i in order]
    assert out["sample_id"] == [rows[i]["id"] for i in order]
    for record, i in zip(out, order):
        if rows[i]["id"] == "bad-5":
            assert record["skip_reason"] == "no_assistant_turn" and record["input_ids"] == []
            continue
        ids, mask = encode_messages(normalize_row(rows[i]), tok, tok.chat_template, 64)
        assert (record["input_ids"], record["loss_mask"]) == (ids, mask)
        assert record["num_tokens"] == len(ids) and record["num_loss_tokens"] == sum(mask)
        assert record["skip_reason"] == ""


def test_a_row_without_an_id_is_named_by_its_input_row(tmp_path, tok):
    """A sample's id is the row's `id` (a string, or an integer as text), else the index of its input
    row: not its place in the shuffled order, and bad rows are named alike."""
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(6)]
    rows[1]["id"], rows[2]["id"], rows[3]["id"], rows[4]["id"] = None, 7, "named", 1.5
    rows[5] = {"messages": [{"role": "user", "content": "no answer"}]}
    out, order = tokenized(write_jsonl(tmp_path / "chats.jsonl", rows), tok, 1)
    assert list(order) != sorted(order)  # the premise: a place in the order is not the input row
    names = {0: "0", 1: "1", 2: "7", 3: "named", 4: "4", 5: "5"}
    assert out["sample_id"] == [names[int(i)] for i in order]
    assert out["source_index"] == [int(i) for i in order]
    assert dict(zip(out["sample_id"], out["skip_reason"]))["5"] == "no_assistant_turn"


def test_tokenize_rows_same_output_at_num_proc_1_and_2(tmp_path, tok):
    rows = twelve_rows()
    # The same rows in files of other bytes (a trailing blank line is no row), so neither run can be
    # served from the other's cache, which is keyed by content.
    one, _ = tokenized(write_jsonl(tmp_path / "one" / "chats.jsonl", rows), tok, 1)
    two = write_jsonl(tmp_path / "two" / "chats.jsonl", rows)
    two.write_text(two.read_text() + "\n")
    two, _ = tokenized(two, tok, 2)
    assert len(two.cache_files) == 2  # really ran in two shards
    assert one.to_list() == two.to_list()


@pytest.mark.parametrize("num_proc", [1, 2])
def test_second_call_is_served_from_the_cache(tmp_path, tok, monkeypatch, num_proc):
    path = write_jsonl(tmp_path / "chats.jsonl", twelve_rows())
    first, _ = tokenized(path, tok, num_proc)
    assert first.cache_files

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenized again instead of reusing the cache")

    monkeypatch.setattr(tokenize_mod, "_tokenize_batch", must_not_run)
    second, _ = tokenized(path, tok, num_proc)
    assert [f["filename"] for f in second.cache_files] == [f["filename"] for f in first.cache_files]
    assert second.to_list() == first.to_list()


def test_cache_is_not_reused_when_seq_length_changes(tmp_path, tok):
    path = write_jsonl(tmp_path / "chats.jsonl", twelve_rows())
    long, _ = tokenized(path, tok, 1, seq_length=64)
    short, _ = tokenized(path, tok, 1, seq_length=15)
    assert long.cache_files != short.cache_files
    assert max(short["num_tokens"]) == 15 < max(long["num_tokens"])
    assert "no_loss_tokens_after_truncation" in short["skip_reason"]
    assert "no_loss_tokens_after_truncation" not in long["skip_reason"]


def test_not_prefix_stable_rows_are_skipped_by_tokenize_rows(tmp_path, tok):
    path = write_jsonl(tmp_path / "chats.jsonl", twelve_rows())
    rows, _ = load_rows(str(path))
    rows, order = select_rows(rows, seed=3, max_samples=None)
    out = tokenize_rows(rows, order, tok, DROPS_EARLIER_ASSISTANT_TURNS, 64, 1)
    # Every row has one assistant turn, which this template keeps: all are stable but "bad-5".
    assert [r for r in out["skip_reason"] if r] == ["no_assistant_turn"]
    out = tokenize_rows(rows, order, tok, LAST_MESSAGE_ONLY, 64, 1)
    by_id = dict(zip(out["sample_id"], out["skip_reason"]))
    assert by_id.pop("bad-5") == "no_assistant_turn"
    assert set(by_id.values()) == {"template_not_prefix_stable"} and len(by_id) == 11


def test_mask_options_are_part_of_the_map_fingerprint(tmp_path, tok):
    path = write_jsonl(tmp_path / "chats.jsonl", twelve_rows())
    rows, _ = load_rows(str(path))
    rows, order = select_rows(rows, seed=3, max_samples=None)
    plain = tokenize_rows(rows, order, tok, NO_GEN, 64, 1)
    masked = tokenize_rows(rows, order, tok, NO_GEN, 64, 1, mask_generation_prompt=True)
    assert plain.cache_files != masked.cache_files
    header = len(tok("<|assistant|>\n", add_special_tokens=False)["input_ids"])
    valid = [i for i, r in enumerate(plain["skip_reason"]) if not r]
    assert [plain["num_loss_tokens"][i] - masked["num_loss_tokens"][i] for i in valid] == [header] * len(valid)


def test_the_tokenizing_cache_follows_the_chat_template(tmp_path, tok):
    """The same rows and tokenizer with another chat template, given with --chat-template or edited in
    the tokenizer's own config, are tokenized anew: the cached rows of the template before are not reused."""
    path = write_jsonl(tmp_path / "chats.jsonl", twelve_rows())
    rows, _ = load_rows(str(path))
    rows, order = select_rows(rows, seed=3, max_samples=None)
    edited = tok.chat_template.replace("{{- bos_token }}", "{{- bos_token ~ '<|system|>\\nBe kind.<|end|>\\n' }}")
    assert edited != tok.chat_template
    edited_tok = tiny_tokenizer()
    edited_tok.chat_template = edited
    before = tokenize_rows(rows, order, tok, template_of(tok, None), 64, 1)
    for other_tok, override in ((tok, edited), (edited_tok, None)):  # --chat-template, the tokenizer's own
        after = tokenize_rows(rows, order, other_tok, template_of(other_tok, override), 64, 1)
        assert after.cache_files != before.cache_files
        for record, i in zip(after, order):
            if not record["skip_reason"]:
                assert (record["input_ids"], record["loss_mask"]) == encode_messages(normalize_row(twelve_rows()[i]), tok, edited, 64)
                assert "Be kind." in tok.decode(record["input_ids"])


# ---- rows of every turn shape, from JSON and from Parquet ------------------------------------

SHAPES_ROWS = [
    # ShareGPT turns with LLaMA-Factory's row-level system prompt (first: Arrow takes a table's
    # columns from its first row).
    {"id": "sharegpt", "system": "Be brief.", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
    # SpecForge's rows: OpenAI messages under "conversations".
    {"id": "specforge", "conversations": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]},
]
SHAPES_MESSAGES = {
    "specforge": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    "sharegpt": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
    ],
}


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_rows_of_either_turn_shape_encode_alike_from_json_and_parquet(tmp_path, tok, suffix):
    # In Parquet the two shapes share one column: every turn has all four keys, two of them null.
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / f"chats.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, SHAPES_ROWS)
    else:
        pq.write_table(pa.Table.from_pylist(SHAPES_ROWS), path)
    rows, _ = load_rows(str(path))
    rows, order = select_rows(rows, seed=3, max_samples=None)
    out = tokenize_rows(rows, order, tok, tok.chat_template, 64, 1)
    assert out["skip_reason"] == ["", ""]
    for record in out:
        expected = encode_messages(SHAPES_MESSAGES[record["sample_id"]], tok, tok.chat_template, 64)
        assert (record["input_ids"], record["loss_mask"]) == expected
    by_id = {record["sample_id"]: record for record in out}
    assert masked_runs(tok, by_id["specforge"]["input_ids"], by_id["specforge"]["loss_mask"]) == ["4.<|end|>"]
    assert "Be brief." in tok.decode(by_id["sharegpt"]["input_ids"])


def test_a_row_system_prompt_encodes_alike_whatever_the_turn_shape(tmp_path, tok):
    # LLaMA-Factory's top-level `system` with from/value turns, role/content turns under
    # `messages`, and role/content turns under `conversations` (its sharegpt format allows those tags).
    openai_turns = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    rows = [
        {"id": "sharegpt", "system": "Be brief.", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "messages", "system": "Be brief.", "messages": openai_turns},
        {"id": "role_content_conversations", "system": "Be brief.", "conversations": openai_turns},
    ]
    out, _ = tokenized(write_jsonl(tmp_path / "chats.jsonl", rows), tok, 1)
    assert out["skip_reason"] == ["", "", ""]
    by_id = {record["sample_id"]: (record["input_ids"], record["loss_mask"]) for record in out}
    assert by_id["messages"] == by_id["role_content_conversations"] == by_id["sharegpt"]
    assert by_id["sharegpt"] == encode_messages(SHAPES_MESSAGES["sharegpt"], tok, tok.chat_template, 64)


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_text_parts_without_a_type_encode_alike_from_json_and_parquet(tmp_path, tok, suffix):
    # In Parquet a part without "type" gets a null one, as the parts that have it make it a field.
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "id": "typed",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Hi?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
            ],
        },
        {
            "id": "untyped",
            "messages": [{"role": "user", "content": [{"text": "Hi?"}]}, {"role": "assistant", "content": [{"text": "Hello."}]}],
        },
    ]
    path = tmp_path / f"chats.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    out, _ = tokenized(path, tok, 1)
    assert out["skip_reason"] == ["", ""]
    expected = encode_messages([{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}], tok, tok.chat_template, 64)
    assert [(record["input_ids"], record["loss_mask"]) for record in out] == [expected, expected]


def char_tokenizer(letters: int = 256):
    """A pure-Python tokenizer, as remote-code tiktoken and sentencepiece tokenizers are: no `backend_tokenizer`."""
    from transformers import PreTrainedTokenizer

    class CharTokenizer(PreTrainedTokenizer):
        def __init__(self, **kwargs):
            self.letters = {chr(i): i for i in range(letters)}
            super().__init__(**kwargs)

        @property
        def vocab_size(self):
            return len(self.letters)

        def get_vocab(self):
            return dict(self.letters, **self.added_tokens_encoder)

        def _tokenize(self, text):
            return list(text)

        def _convert_token_to_id(self, token):
            return self.letters.get(token, 0)

        def _convert_id_to_token(self, index):
            return chr(index)

    tokenizer = CharTokenizer(eos_token="<|eos|>", bos_token="<|bos|>")
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
    return tokenizer


def test_a_pure_python_tokenizer_tokenizes_and_has_an_identity():
    import datasets
    import numpy as np

    from builder.tokenize import tokenizer_hash

    tok = char_tokenizer()
    assert getattr(tok, "backend_tokenizer", None) is None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rows = datasets.Dataset.from_list([{"raw": json.dumps({"messages": messages}).encode()}])
    out = tokenize_rows(rows, np.arange(1), tok, tok.chat_template, 64, 1)
    ids, mask = encode_messages(messages, tok, tok.chat_template, 64)
    assert out[0]["input_ids"] == list(ids) and sum(mask) > 0
    assert tokenizer_hash(tok, tok.chat_template) == tokenizer_hash(char_tokenizer(), tok.chat_template)
    assert tokenizer_hash(tok, tok.chat_template) != tokenizer_hash(char_tokenizer(200), tok.chat_template)  # another vocabulary


def test_generation_blocks_with_a_pure_python_tokenizer_say_what_they_need():
    """The blocks' mask maps the template's character spans to tokens by a fast tokenizer's offsets, which a
    pure-Python one has not: each row says so and what to do, not `TypeError: 'NoneType' object ...`."""
    tok = char_tokenizer()
    template = (
        "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}"
        "{% endgeneration %}{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    facts = ("{% generation %}", "fast tokenizer", "CharTokenizer", "tokenizer.json", "--chat-template", "without generation blocks")
    with pytest.raises(BadRow, match="^template_error: " + says(*facts)[4:]):
        encode_messages(messages, tok, template, 64)


def test_the_tokenizer_hash_leaves_out_truncation_and_padding_transformers_turns_off(tmp_path):
    """A tokenizer.json may ship truncation and padding settings, which transformers turns off on the
    first encode call: the hash is the same before and after it, and the same as without them."""
    from transformers import AutoTokenizer

    from builder.tokenize import tokenizer_hash

    tok = AutoTokenizer.from_pretrained(target_with_truncation_and_padding(tmp_path / "target"))
    assert tok.backend_tokenizer.truncation is not None and tok.backend_tokenizer.padding is not None
    before = tokenizer_hash(tok, WITH_GEN)
    tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=True)
    assert tok.backend_tokenizer.truncation is None and tok.backend_tokenizer.padding is None
    assert tokenizer_hash(tok, WITH_GEN) == before == tokenizer_hash(tiny_tokenizer(), WITH_GEN)


def test_the_tokenizer_hash_of_a_tokenizer_without_truncation_or_padding_is_the_one_recorded_before(tok):
    """Caches built before recorded the hash of the backend's JSON as it is: a usual tokenizer.json
    (no truncation, no padding) keeps that hash, so those caches still resume, export and verify."""
    import hashlib

    from builder.tokenize import template_bytes, tokenizer_hash

    recorded_before = hashlib.sha256()
    recorded_before.update(tok.backend_tokenizer.to_str().encode())
    recorded_before.update(json.dumps(tok.special_tokens_map, sort_keys=True, default=str).encode())
    recorded_before.update(template_bytes(WITH_GEN))
    assert tokenizer_hash(tok, WITH_GEN) == recorded_before.hexdigest()


def test_a_tokenizer_may_be_recorded_under_the_hash_earlier_versions_gave_it_as_loaded(tmp_path):
    """Earlier versions hashed the backend as it was when hashed: as loaded, truncation and padding in,
    where the build process had not encoded. That hash stays among those the tokenizer may be recorded
    under after an encode call turned both off; a tokenizer.json without either has its one hash."""
    from builder.embedded import resolve_target
    from builder.target import load_tokenizer
    from builder.tokenize import recorded_tokenizer_hashes, template_of, tokenizer_hash

    target = target_with_truncation_and_padding(tmp_path / "target")
    tok = load_tokenizer(str(target), None, False)
    template = template_of(tok, None)
    tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=True)
    assert tok.backend_tokenizer.truncation is None and tok.backend_tokenizer.padding is None
    earlier = tokenizer_hash_of_earlier_versions(target)
    assert recorded_tokenizer_hashes(tok, template) == {tokenizer_hash(tok, template), earlier}
    assert earlier != tokenizer_hash(tok, template)
    plain = load_tokenizer(resolve_target("tiny-llama"), None, False)
    assert recorded_tokenizer_hashes(plain, template) == {tokenizer_hash(plain, template)}


def test_tokenizing_a_saved_dataset_writes_nothing_into_its_folder(tmp_path, tok):
    """The folder may be read-only shared storage, and is the user's: the tokenized rows go to the `datasets` cache."""
    import datasets

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(6)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    before = sorted(p.name for p in (tmp_path / "saved").iterdir())
    ds, _ = load_rows(str(tmp_path / "saved"))
    ds, order = select_rows(ds, 0, 4)
    out = tokenize_rows(ds, order, tok, tok.chat_template, 64, 1)
    assert len(out) == 4 and sorted(p.name for p in (tmp_path / "saved").iterdir()) == before


@pytest.mark.parametrize("edited", ["tokenize.py", "conversations.py", "inputs.py"])
def test_the_tokenizing_cache_follows_the_code_that_reads_the_rows(tmp_path, tok, monkeypatch, edited):
    """A saved or Hub dataset's rows keep the fingerprint `datasets` gives them: the code that reads
    them into rows (inputs.py) and into conversations (conversations.py) keys the tokenizing map along
    with the code that tokenizes them, so another release of any of the three tokenizes anew."""
    from pathlib import Path

    code = tmp_path / "builder"
    code.mkdir()
    for name in ("tokenize.py", "conversations.py", "inputs.py"):
        (code / name).write_bytes((Path(tokenize_mod.__file__).parent / name).read_bytes())
    assert tokenize_mod._code_hash(code) == tokenize_mod.TOKENIZE_CODE_VERSION  # these files, as installed
    with open(code / edited, "a") as f:
        f.write("# another release\n")
    path = write_jsonl(tmp_path / "chats.jsonl", twelve_rows())
    before, _ = tokenized(path, tok, 1)
    monkeypatch.setattr(tokenize_mod, "TOKENIZE_CODE_VERSION", tokenize_mod._code_hash(code))
    assert tokenize_mod.TOKENIZE_CODE_VERSION != tokenize_mod._code_hash()
    assert tokenized(path, tok, 1)[0].cache_files != before.cache_files


def test_another_transformers_release_tokenizes_the_rows_anew(tmp_path, tok, monkeypatch):
    """The same rows, tokenizer and template, under a transformers release that renders templates
    otherwise (here, a space before each `<|end|>`): its tokens, not the cached ones of the release before."""
    import transformers
    from transformers.utils import chat_template_utils

    path = write_jsonl(tmp_path / "chats.jsonl", twelve_rows())
    before, order = tokenized(path, tok, 1)
    compile_template = chat_template_utils._compile_jinja_template
    monkeypatch.setattr(chat_template_utils, "_compile_jinja_template", lambda t: compile_template(t.replace("<|end|>", " <|end|>")))
    monkeypatch.setattr(transformers, "__version__", f"{transformers.__version__}.later")
    after, _ = tokenized(path, tok, 1)
    rows = twelve_rows()
    for record, i in zip(after, order):
        if not record["skip_reason"]:
            ids, mask = encode_messages(normalize_row(rows[i]), tok, tok.chat_template, 64)
            assert (record["input_ids"], record["loss_mask"]) == (ids, mask)
    assert after["input_ids"] != before["input_ids"] and after.cache_files != before.cache_files


@pytest.mark.parametrize("library", ["tokenizers", "jinja2"])
def test_the_tokenizing_cache_follows_the_library_versions(tmp_path, tok, monkeypatch, library):
    import importlib

    path = write_jsonl(tmp_path / "chats.jsonl", twelve_rows())
    before, _ = tokenized(path, tok, 1)
    module = importlib.import_module(library)
    monkeypatch.setattr(module, "__version__", f"{module.__version__}.later")
    assert tokenized(path, tok, 1)[0].cache_files != before.cache_files
