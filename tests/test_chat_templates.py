"""Which chat template a build renders with: --chat-template as a Jinja file or as a
chat_template.json, and a tokenizer with named templates (`default`, `tool_use`)."""

import json
import shutil

import pytest
from helpers import says
from tiny_targets import tiny_tokenizer

from builder.config import BuildConfig
from builder.conversations import normalize_row, row_tools
from builder.embedded import EMBEDDED_TARGETS, NO_GENERATION_TEMPLATE, WITH_GENERATION_TEMPLATE
from builder.errors import InputError
from builder.prepare import prepare
from builder.tokenize import encode_messages, read_template_file, template_bytes, template_of, tokenizer_hash

WITH_GEN = WITH_GENERATION_TEMPLATE.read_text()
NO_GEN = NO_GENERATION_TEMPLATE.read_text()
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}]
ROWS = [
    {"id": "plain", "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]},
    {
        "id": "tools",
        "tools": TOOLS,
        "messages": [{"role": "user", "content": "Rain in Oslo?"}, {"role": "assistant", "content": "Yes, it rains."}],
    },
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def masked_text(tok, ids, mask):
    return tok.decode([t for t, m in zip(ids, mask) if m])


def prepared(tmp_path, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    settings = dict(target_model="tiny-llama", input_data=str(data), output_dir=str(tmp_path / "out"), seq_length=128, num_proc=1)
    return prepare(BuildConfig(**{**settings, **overrides}))


def samples_by_id(prep):
    return {row["sample_id"]: (row["input_ids"], row["loss_mask"]) for row in prep.samples}


# ---- --chat-template ------------------------------------------------------------------------


def test_chat_template_json_builds_what_its_jinja_template_builds(tmp_path, tok):
    # Model repositories ship chat_template.json: the template is its "chat_template" value.
    jinja = tmp_path / "template.jinja"
    jinja.write_text(NO_GEN)
    as_json = tmp_path / "chat_template.json"
    as_json.write_text(json.dumps({"chat_template": NO_GEN}, indent=2))
    assert read_template_file(as_json) == NO_GEN
    assert read_template_file(jinja) == NO_GEN

    from_json = prepared(tmp_path / "a", chat_template=str(as_json))
    from_jinja = prepared(tmp_path / "b", chat_template=str(jinja))
    assert samples_by_id(from_json) == samples_by_id(from_jinja)
    assert from_json.identity["chat_template_sha256"] == from_jinja.identity["chat_template_sha256"]
    ids, mask = samples_by_id(from_json)["plain"]
    assert ids == encode_messages(normalize_row(ROWS[0]), tok, NO_GEN, 128)[0]
    assert masked_text(tok, ids, mask) == "<|assistant|>\nHi!<|end|>\n"  # the prefix-span mask of NO_GEN, no JSON in it


def test_chat_template_json_with_named_templates(tmp_path):
    path = tmp_path / "chat_template.json"
    path.write_text(json.dumps({"chat_template": [{"name": "default", "template": WITH_GEN}, {"name": "tool_use", "template": NO_GEN}]}))
    assert read_template_file(path) == {"default": WITH_GEN, "tool_use": NO_GEN}


@pytest.mark.parametrize("name, text", [("template.jinja", NO_GEN), ("chat_template.json", json.dumps({"chat_template": NO_GEN}))])
def test_a_template_file_saved_with_a_byte_order_mark_reads_as_without(tmp_path, tok, name, text):
    """Editors on Windows start UTF-8 files with one: it is no part of the template, and would open every
    sample with its tokens (or refuse a chat_template.json as not JSON)."""
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert read_template_file(path) == NO_GEN
    ids, _ = encode_messages(normalize_row(ROWS[0]), tok, read_template_file(path), 128)
    assert ids == encode_messages(normalize_row(ROWS[0]), tok, NO_GEN, 128)[0]
    assert ids[0] == tok.bos_token_id


@pytest.mark.parametrize(
    "text, facts",
    [
        ('{"template": "{{ messages }}"}', ["is JSON, but not a chat template file", "'chat_template'", "keys ['template']"]),
        ('{"chat_template": 3}', ["is JSON, but not a chat template file", "'chat_template' holding int 3"]),
        ('{"chat_template": ""}', ["is JSON, but not a chat template file", "'chat_template' holding str ''"]),
        ('[{"name": "default", "template": "x"}]', ["is JSON, but not a chat template file", "found a JSON array"]),
        ('{"chat_template": [{"template": "x"}]}', ["each item must be an object with a 'name' and a 'template'"]),
        ('{"chat_template": "x",}', ["is named .json but is not valid JSON", "Jinja template file"]),
    ],
)
def test_chat_template_json_that_holds_no_template_is_refused(tmp_path, text, facts):
    path = tmp_path / "chat_template.json"
    path.write_text(text)
    with pytest.raises(InputError, match=says("--chat-template", str(path), *facts)):
        read_template_file(path)


def test_a_jinja_file_is_read_as_text_whatever_it_holds(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages }}")
    assert read_template_file(path) == "{{ messages }}"
    path.write_text('"quoted"')  # a JSON scalar is still template text
    assert read_template_file(path) == '"quoted"'


def test_rows_whose_system_field_a_template_refuses_say_so_when_none_is_usable(tmp_path):
    """LLaMA-Factory rows give their system prompt as a row-level `system`; a template without a
    system role (Mixtral-8x7B-Instruct's raises for one) refuses every such row, and the error
    says that the field is why and what to do."""
    template = tmp_path / "roles_alternate.jinja"
    template.write_text(
        "{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    rows = [
        {
            "id": f"r{i}",
            "system": "You are terse.",
            "conversations": [{"from": "human", "value": f"{i}+{i}?"}, {"from": "gpt", "value": f"{2 * i}."}],
        }
        for i in range(3)
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    settings = dict(target_model="tiny-llama", input_data=str(data), output_dir=str(tmp_path / "out"), seq_length=128, num_proc=1)
    facts = (
        "no usable rows",
        "{'template_error': 3}",
        "Conversation roles must alternate",
        "the row's 'system' field was added as a system message, which this chat template does not accept",
        "drop the field from the input or pass --chat-template with a template that takes a system message",
    )
    with pytest.raises(InputError, match=says(*facts)):
        prepare(BuildConfig(**settings, chat_template=str(template), dry_run=True))


# ---- named templates ------------------------------------------------------------------------


def named_template_target(tmp_path, templates):
    """The embedded target's config and tokenizer, with named templates in tokenizer_config.json."""
    target = tmp_path / "named-target"
    target.mkdir()
    source = EMBEDDED_TARGETS["tiny-llama"]
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        shutil.copy(source / name, target / name)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": name, "template": text} for name, text in templates.items()]
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


def test_named_templates_pick_tool_use_for_rows_with_tools(tmp_path, tok):
    # As transformers' apply_chat_template picks: tool_use when the row has tools, default otherwise.
    target = named_template_target(tmp_path, {"default": WITH_GEN, "tool_use": NO_GEN})
    prep = prepared(tmp_path, target_model=str(target))
    assert isinstance(prep.tokenizer.chat_template, dict)
    samples = samples_by_id(prep)
    plain, tools = normalize_row(ROWS[0]), normalize_row(ROWS[1])
    assert samples["plain"] == encode_messages(plain, tok, WITH_GEN, 128)
    assert samples["tools"] == encode_messages(tools, tok, NO_GEN, 128, tools=row_tools(ROWS[1]))
    assert masked_text(tok, *samples["plain"]) == "Hi!<|end|>"  # generation blocks
    assert masked_text(tok, *samples["tools"]) == "<|assistant|>\nYes, it rains.<|end|>\n"  # prefix spans


def test_named_templates_without_tool_use_render_every_row_with_default(tok):
    templates = {"default": NO_GEN, "other": WITH_GEN}
    row = normalize_row(ROWS[1])
    assert encode_messages(row, tok, templates, 128, tools=TOOLS) == encode_messages(row, tok, NO_GEN, 128, tools=TOOLS)


def test_the_identity_covers_every_named_template(tok):
    # A row with tools renders with tool_use: editing it must change the build's identity.
    before = {"default": WITH_GEN, "tool_use": NO_GEN}
    after = {"default": WITH_GEN, "tool_use": NO_GEN + "{# edited #}"}
    assert template_bytes(before) != template_bytes(after)
    assert tokenizer_hash(tok, before) != tokenizer_hash(tok, after)
    assert tokenizer_hash(tok, WITH_GEN) != tokenizer_hash(tok, {"default": WITH_GEN})


def test_named_templates_without_default_are_refused(tok):
    named = tiny_tokenizer()
    named.chat_template = {"tool_use": WITH_GEN, "rag": NO_GEN}
    with pytest.raises(InputError, match=says("the tokenizer's chat template", "['rag', 'tool_use']", "'default'", "--chat-template")):
        template_of(named, None)


def test_a_named_template_that_does_not_compile_is_named(tok):
    named = tiny_tokenizer()
    named.chat_template = {"default": WITH_GEN, "tool_use": "{% if %}"}
    with pytest.raises(InputError, match=says("the tokenizer's chat template (template 'tool_use') does not compile", "--chat-template")):
        template_of(named, None)
