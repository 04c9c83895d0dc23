"""Row normalisation: ShareGPT and OpenAI rows -> messages, and every BadRow it raises."""

import json
import re

import pytest
from helpers import says

from builder.conversations import ROLE_ALIASES, SKIP_REASONS, BadRow, normalize_row, parse_raw_row, row_tools


def sharegpt(*turns):
    return {"conversations": [{"from": speaker, "value": text} for speaker, text in turns]}


def openai(*turns):
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


# ---- ShareGPT -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "speaker, role",
    [
        ("human", "user"),
        ("user", "user"),
        ("gpt", "assistant"),
        ("assistant", "assistant"),
        ("chatgpt", "assistant"),
        ("bot", "assistant"),
        ("model", "assistant"),
        ("system", "system"),
        ("developer", "system"),
        ("tool", "tool"),
        ("function", "tool"),
        ("observation", "tool"),
    ],
)
def test_sharegpt_role_alias(speaker, role):
    row = sharegpt((speaker, "first"), ("gpt", "reply"))
    assert normalize_row(row) == [{"role": role, "content": "first"}, {"role": "assistant", "content": "reply"}]


def test_every_alias_is_covered_above():
    assert set(ROLE_ALIASES) == {
        "human",
        "user",
        "gpt",
        "assistant",
        "chatgpt",
        "bot",
        "model",
        "system",
        "developer",
        "tool",
        "function",
        "observation",
    }


def test_sharegpt_speaker_names_ignore_case_and_padding():
    row = sharegpt(("Human ", "hi"), (" GPT", "hello"))
    assert normalize_row(row) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_sharegpt_multi_turn_keeps_order_and_text():
    row = sharegpt(("system", "Be terse."), ("human", "2+2?"), ("gpt", "4"), ("human", "and 3+3?"), ("gpt", "6"))
    assert normalize_row(row) == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"},
    ]


# ---- OpenAI ---------------------------------------------------------------------------


def test_openai_string_content():
    row = openai(("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello"), ("tool", '{"ok": true}'), ("assistant", "Done"))
    assert normalize_row(row) == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "tool", "content": '{"ok": true}'},
        {"role": "assistant", "content": "Done"},
    ]


def test_openai_list_of_text_parts_is_joined_with_a_space():
    # As NeMo Automodel's chat dataset joins them, so that both render the same text.
    row = openai(
        ("user", [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]),
        ("assistant", [{"text": "Four"}, "then"]),  # a part without "type" counts as text, as does a bare string
    )
    assert normalize_row(row) == [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four then"}]


def test_a_text_part_whose_type_is_null_is_text():
    # Arrow fills a part without "type" with a null when other parts of the table have one:
    # read from Parquet, it must give what the same part gives from JSON.
    row = openai(
        ("user", [{"type": "text", "text": "What is"}, {"type": None, "text": "2+2?"}]), ("assistant", [{"type": None, "text": "Four"}])
    )
    assert normalize_row(row) == [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four"}]


def test_openai_none_content_is_empty_string():
    row = openai(("user", "call the tool"), ("assistant", None), ("tool", "42"), ("assistant", "It is 42."))
    assert normalize_row(row)[1] == {"role": "assistant", "content": ""}


def test_a_turn_without_a_text_key_is_a_bad_row_not_an_empty_message():
    # Its text is under a key the reader does not know: built, the row would train an empty prompt.
    row = {"messages": [{"role": "user", "text": "What is 7 times 6?"}, {"role": "assistant", "content": "42."}]}
    facts = ("wrong_type: turn 0: no text", "'content' (or 'value')", "['role', 'text']", "drop the row")
    with pytest.raises(BadRow, match=says(*facts)) as info:
        normalize_row(row)
    assert info.value.reason == "wrong_type"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}, {"role": "assistant", "content": "ok"}]}
    with pytest.raises(BadRow, match=says("wrong_type: turn 1: no text", "['role']")):
        normalize_row(row)
    # A null is an empty message (as Arrow gives a field a turn leaves out), and so is no content
    # on an assistant message that calls tools, which OpenAI's API allows.
    row["messages"][1] = {"role": "assistant", "content": None}
    assert normalize_row(row)[1] == {"role": "assistant", "content": ""}
    calls = [{"function": {"name": "f", "arguments": "{}"}}]
    for fields in ({"tool_calls": calls}, {"function_call": calls[0]["function"]}):
        row["messages"][1] = {"role": "assistant", **fields}
        assert normalize_row(row)[1]["content"] == "" and normalize_row(row)[1]["tool_calls"][0]["function"]["name"] == "f"
    row["messages"][1] = {"role": "assistant", "tool_calls": []}  # no call
    with pytest.raises(BadRow, match="^wrong_type: turn 1: no text"):
        normalize_row(row)


def test_a_sharegpt_turn_that_calls_tools_without_text_is_a_bad_row_as_its_calls_are_not_read():
    # A ShareGPT turn gives its role and text only, so its `tool_calls` would not reach the template: built,
    # the row would train the call as an empty turn. Only an OpenAI message may call tools and leave its text out.
    calls = [{"function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]
    row = {"conversations": [{"from": "human", "value": "Rain?"}, {"from": "gpt", "tool_calls": calls}, {"from": "gpt", "value": "No."}]}
    detail = (
        "turn 1: no text: expected the turn's text under 'value' (or 'content') (a null for an empty message), "
        "found the keys ['from', 'tool_calls']; put the text under 'value', or drop the row"
    )
    with pytest.raises(BadRow, match=f"^wrong_type: {re.escape(detail)}$") as info:
        normalize_row(row)
    assert info.value.reason == "wrong_type"


def test_openai_message_fields_reach_the_template():
    # As NeMo Automodel passes them: every field of an OpenAI message; a null one counts as absent.
    row = {
        "id": "x",
        "source": "web",
        "messages": [
            {"role": "user", "content": "a", "name": "bob", "weight": None},
            {"role": "assistant", "content": "b", "reasoning_content": "think", "tool_calls": None},
            {"role": "tool", "content": "42", "tool_call_id": "call_0", "name": "calc"},
        ],
    }
    assert normalize_row(row) == [
        {"role": "user", "content": "a", "name": "bob"},
        {"role": "assistant", "content": "b", "reasoning_content": "think"},
        {"role": "tool", "content": "42", "tool_call_id": "call_0", "name": "calc"},
    ]


def test_sharegpt_turns_give_role_and_text_only():
    # As NeMo Automodel converts them: other fields of a ShareGPT turn are not read.
    row = {"conversations": [{"from": "human", "value": "a", "name": "bob"}, {"from": "gpt", "value": "b", "reasoning_content": "x"}]}
    assert normalize_row(row) == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]


def test_tool_calls_take_the_shape_templates_read():
    calls = [
        {"function": {"name": "add", "arguments": {"a": 1, "b": 2}}},  # no id, no type, arguments an object
        {"id": "c7", "type": "function", "function": {"name": "now", "arguments": "{}"}, "index": 1},
    ]
    row = {"messages": [{"role": "user", "content": "1+2, and the time?"}, {"role": "assistant", "content": None, "tool_calls": calls}]}
    assert normalize_row(row)[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}},
            {"id": "c7", "type": "function", "function": {"name": "now", "arguments": "{}"}, "index": 1},
        ],
    }
    assert calls[0] == {"function": {"name": "add", "arguments": {"a": 1, "b": 2}}}  # the row is not modified


def test_an_empty_call_id_or_type_takes_its_default_as_nemo_gives_it():
    # Arrow and some exporters write "" for a field a call leaves out: it is that field's default, not a name.
    calls = [
        {"id": "", "type": "", "function": {"name": "add", "arguments": "{}"}},
        {"id": "c7", "type": "", "function": {"name": "now", "arguments": "{}"}},
    ]
    messages = [{"role": "user", "content": "1+2, and the time?"}, {"role": "assistant", "content": None, "tool_calls": calls}]
    out = normalize_row({"messages": messages})
    assert out[1]["tool_calls"] == [
        {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": "{}"}},
        {"id": "c7", "type": "function", "function": {"name": "now", "arguments": "{}"}},
    ]
    chat_dataset = pytest.importorskip("nemo_automodel.components.datasets.llm.chat_dataset")
    assert out == chat_dataset._normalize_messages(messages)


def test_only_an_assistant_message_has_its_calls_and_reasoning_checked_and_reshaped_as_nemo_does():
    # NeMo Automodel checks and reshapes an assistant's `reasoning_content` and `tool_calls` only; another
    # message's fields reach the template as they are, so the row is not refused for them either.
    user = {"role": "user", "content": "q", "reasoning_content": 5, "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]}
    messages = [user, {"role": "assistant", "content": "a"}]
    out = normalize_row({"messages": messages})
    assert out == [user, {"role": "assistant", "content": "a"}]
    chat_dataset = pytest.importorskip("nemo_automodel.components.datasets.llm.chat_dataset")
    assert out == chat_dataset._normalize_messages(messages)


def test_an_empty_call_list_on_a_plain_answer_is_no_call():
    """API responses carry `tool_calls: []` on plain answers; templates that test for the key (DeepSeek-V3,
    Llama 3.1) would render the turn as calls and drop its text."""
    for empty in ({"tool_calls": []}, {"function_call": {}}, {"tool_calls": [], "function_call": None}):
        row = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello there.", **empty}]}
        assert normalize_row(row)[1] == {"role": "assistant", "content": "Hello there."}, empty


def test_deepseek_style_template_keeps_the_text_of_an_answer_with_an_empty_call_list():
    from jinja2 import Environment

    template = Environment().from_string(
        "{% for m in messages %}{% if m.role == 'assistant' and 'tool_calls' in m %}<calls>{% for c in m.tool_calls %}"
        "{{ c.function.name }}{% endfor %}</calls>{% else %}<{{ m.role }}>{{ m.content }}{% endif %}{% endfor %}"
    )
    row = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello there.", "tool_calls": []}]}
    assert template.render(messages=normalize_row(row)) == "<user>Hi?<assistant>Hello there."


def test_a_turn_with_only_tool_calls_or_reasoning_is_supervisable():
    call = {"function": {"name": "f", "arguments": "{}"}}
    for assistant in (
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "assistant", "content": "", "reasoning_content": "hmm"},
    ):
        row = {"messages": [{"role": "user", "content": "q"}, assistant]}
        assert normalize_row(row)[1]["content"] == ""
    empty = {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [], "reasoning_content": ""}]
    }
    with pytest.raises(BadRow, match="^no_assistant_turn: all 1 assistant turns are empty"):
        normalize_row(empty)


@pytest.mark.parametrize(
    "tools, expected",
    [
        (None, None),
        ([], None),
        ("[]", None),
        ("", None),  # LLaMA-Factory's rows without tools
        (" \n", None),
        ([{"type": "function", "function": {"name": "f"}}], [{"type": "function", "function": {"name": "f"}}]),
        ('[{"type": "function", "function": {"name": "f"}}]', [{"type": "function", "function": {"name": "f"}}]),
    ],
)
def test_row_tools(tools, expected):
    assert row_tools({"messages": [], "tools": tools}) == expected


@pytest.mark.parametrize(
    "tools, detail",
    [
        ("[{", r"'tools' is a string but not valid JSON \(Expecting"),
        ({"name": "f"}, "'tools' must be a list of tool definitions .objects., found dict"),
        (["f", {"name": "g"}], "'tools' must be a list of tool definitions .objects., found a list of dict, str"),
    ],
)
def test_bad_tools(tools, detail):
    with pytest.raises(BadRow, match=f"^wrong_type: {detail}") as info:
        row_tools({"tools": tools})
    assert info.value.reason == "wrong_type"


def test_sharegpt_key_wins_when_messages_is_null():
    # Parquet/Arrow rows of a mixed file carry both columns, the other one null.
    row = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "messages": None}
    assert [m["role"] for m in normalize_row(row)] == ["user", "assistant"]
    row = {"conversations": None, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    assert [m["content"] for m in normalize_row(row)] == ["a", "b"]


def test_a_row_with_both_lists_is_read_from_messages():
    # As NeMo Automodel's chat dataset reads it: `conversations` only when `messages` is absent or null.
    row = {
        "messages": [{"role": "user", "content": "Q from messages"}, {"role": "assistant", "content": "A from messages"}],
        "conversations": [{"from": "human", "value": "Q from conversations"}, {"from": "gpt", "value": "A from conversations"}],
    }
    assert normalize_row(row) == row["messages"]


# ---- turn shape, not list name ---------------------------------------------------------


def test_openai_turns_under_conversations_are_openai_messages():
    # SpecForge's own rows: OpenAI messages under "conversations"; they keep their other fields.
    row = {
        "id": "x",
        "conversations": [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4.", "reasoning_content": "add"},
        ],
    }
    assert normalize_row(row) == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4.", "reasoning_content": "add"},
    ]


def test_sharegpt_turns_under_messages_give_role_and_text_only():
    row = {"messages": [{"from": "human", "value": "hi", "name": "bob"}, {"from": "gpt", "value": "yo"}]}
    assert normalize_row(row) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_turn_shape_ignores_null_keys_of_the_other_shape():
    # A Parquet column holding both shapes gives every turn all four keys, the unused ones null.
    openai_turns = [
        {"from": None, "value": None, "role": "user", "content": "a"},
        {"from": None, "value": None, "role": "assistant", "content": "b"},
    ]
    sharegpt_turns = [
        {"from": "human", "value": "a", "role": None, "content": None},
        {"from": "gpt", "value": "b", "role": None, "content": None},
    ]
    expected = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert normalize_row({"conversations": openai_turns}) == expected
    assert normalize_row({"messages": sharegpt_turns}) == expected


MIXED_TAG_ROWS = {
    "from_content": [{"from": "human", "content": "What is 7 times 6?"}, {"from": "gpt", "content": "42."}],
    "role_value": [{"from": "human", "value": "What is 7 times 6?"}, {"role": "assistant", "value": "42."}],
    "mixed_turns": [{"from": "human", "value": "What is 7 times 6?"}, {"role": "assistant", "content": "42."}],
    "openai_value": [{"role": "user", "value": "What is 7 times 6?"}, {"role": "assistant", "value": "42."}],
    "system_from_role": [
        {"role": "system", "content": "Be terse."},
        {"from": "human", "value": "What is 7 times 6?"},
        {"from": "gpt", "value": "42."},
    ],
}


@pytest.mark.parametrize("name", MIXED_TAG_ROWS)
def test_turns_with_the_other_forms_keys_read_as_nemo_reads_them(name):
    # NeMo Automodel reads a ShareGPT turn's role from `from`, else `role`, and its text from
    # `value`, else `content`: it builds these rows, and so does the cache, alike.
    turns = MIXED_TAG_ROWS[name]
    messages = normalize_row({"conversations": turns})
    assert [m["content"] for m in messages][-2:] == ["What is 7 times 6?", "42."]
    chat_dataset = pytest.importorskip("nemo_automodel.components.datasets.llm.chat_dataset")
    assert messages == chat_dataset._normalize_messages(chat_dataset._conversations_to_messages(turns))


def test_a_sharegpt_turn_reads_the_other_text_key_when_its_own_is_null():
    # Arrow gives every turn of a column both keys; the one a turn left out is null.
    turns = [{"from": "human", "value": None, "content": "Hi?"}, {"from": "gpt", "value": "Hello.", "content": None}]
    assert normalize_row({"conversations": turns}) == [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    turns[0] = {"from": "human", "value": None, "content": None}
    assert normalize_row({"conversations": turns})[0] == {"role": "user", "content": ""}


def test_an_openai_message_with_its_text_under_value():
    # The other form's text key, in either list; where NeMo reads `messages` it takes the text as empty.
    turns = [{"role": "user", "value": "Hi?", "name": "bob"}, {"role": "assistant", "content": "Hello.", "value": "unread"}]
    expected = [{"role": "user", "content": "Hi?", "name": "bob"}, {"role": "assistant", "content": "Hello.", "value": "unread"}]
    assert normalize_row({"messages": turns}) == normalize_row({"conversations": turns}) == expected


def test_the_list_name_decides_when_turns_carry_both_role_keys():
    # Such rows were read by the list's name before; they still are.
    turns = [
        {"from": "human", "value": "a", "role": "user", "content": "x"},
        {"from": "gpt", "value": "b", "role": "assistant", "content": "y"},
    ]
    assert normalize_row({"conversations": turns}) == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert normalize_row({"messages": turns}) == [
        {"role": "user", "content": "x", "from": "human", "value": "a"},
        {"role": "assistant", "content": "y", "from": "gpt", "value": "b"},
    ]


# ---- other roles -----------------------------------------------------------------------


def test_openai_developer_and_legacy_function_roles():
    row = {
        "messages": [
            {"role": "developer", "content": "Be terse."},
            {"role": "user", "content": "hi"},
            {"role": "function", "name": "f", "content": "1"},
            {"role": "assistant", "content": "yo"},
        ]
    }
    assert normalize_row(row) == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "hi"},
        {"role": "tool", "content": "1", "name": "f"},
        {"role": "assistant", "content": "yo"},
    ]


def test_openai_legacy_function_call_is_a_tool_call():
    call = {"name": "weather", "arguments": {"city": "Oslo"}}
    row = {"messages": [{"role": "user", "content": "Rain?"}, {"role": "assistant", "content": None, "function_call": call}]}
    assert normalize_row(row)[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}],
    }


@pytest.mark.parametrize(
    "fields, detail",
    [
        ({"function_call": "auto"}, """turn 1: 'function_call' must be an object {"name": ..., "arguments": ...}, found 'auto'"""),
        (
            {"function_call": {"name": "a", "arguments": "{}"}, "tool_calls": [{"function": {"name": "b", "arguments": "{}"}}]},
            "turn 1: the assistant message has both 'function_call' (OpenAI's legacy form) and 'tool_calls'; expected one of them",
        ),
    ],
)
def test_bad_openai_legacy_function_call(fields, detail):
    row = {"messages": [{"role": "user", "content": "go"}, {"role": "assistant", "content": None, **fields}]}
    with pytest.raises(BadRow, match=f"^wrong_type: {re.escape(detail)}"):
        normalize_row(row)


def test_llama_factory_function_call_and_observation():
    row = {
        "conversations": [
            {"from": "human", "value": "Rain in Oslo?"},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
            {"from": "observation", "value": '{"rain": true}'},
            {"from": "gpt", "value": "Yes."},
        ],
        "tools": '[{"name": "weather", "parameters": {}}]',
    }
    assert normalize_row(row) == [
        {"role": "user", "content": "Rain in Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}],
        },
        {"role": "tool", "content": '{"rain": true}'},
        {"role": "assistant", "content": "Yes."},
    ]


def test_llama_factory_function_call_with_several_calls_is_supervisable_alone():
    calls = [{"name": "a", "arguments": "{}"}, {"name": "b", "arguments": {"x": 1}}]
    row = sharegpt(("human", "go"), ("function_call", json.dumps(calls)))
    assert normalize_row(row)[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": "a", "arguments": "{}"}},
            {"id": "call_1", "type": "function", "function": {"name": "b", "arguments": '{"x": 1}'}},
        ],
    }


def openai_under_conversations(*turns):
    # SpecForge's rows, and LLaMA-Factory's sharegpt format with role/content tags.
    return {"conversations": openai(*turns)["messages"]}


ROW_SHAPES = {
    "sharegpt": lambda *turns: sharegpt(*((ROLE_OF_SPEAKER[role], text) for role, text in turns)),
    "openai": openai,
    "openai_under_conversations": openai_under_conversations,
}
ROLE_OF_SPEAKER = {"system": "system", "user": "human", "assistant": "gpt"}


@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_row_system_opens_the_conversation_whatever_the_turn_shape(shape):
    # LLaMA-Factory's top-level system prompt: a row that gives it must not train without it.
    make = ROW_SHAPES[shape]
    row = {"system": "You are a pirate.", **make(("user", "hi"), ("assistant", "Arr."))}
    assert normalize_row(row) == [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Arr."},
    ]
    # A system turn of the conversation wins; an empty or null one is no system prompt.
    own = {"system": "You are a pirate.", **make(("system", "Be brief."), ("user", "hi"), ("assistant", "Arr."))}
    assert [m["content"] for m in normalize_row(own)] == ["Be brief.", "hi", "Arr."]
    for empty in ("", None):
        assert normalize_row({"system": empty, **make(("user", "hi"), ("assistant", "Arr."))})[0] == {"role": "user", "content": "hi"}


@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_a_row_system_that_is_not_a_string_is_a_bad_row_whatever_the_turn_shape(shape):
    row = {"system": ["be", "brief"], **ROW_SHAPES[shape](("user", "q"), ("assistant", "a"))}
    with pytest.raises(BadRow, match="the row's 'system' must be a string .the system prompt., found list"):
        normalize_row(row)


# ---- raw rows ---------------------------------------------------------------------------


def test_parse_raw_row_round_trip():
    row = openai(("user", "héllo ✓"), ("assistant", "ok"))
    assert parse_raw_row(json.dumps(row, ensure_ascii=False).encode()) == row


def test_unparseable_json_line():
    with pytest.raises(BadRow, match=r"^unparseable_json: invalid JSON \(Expecting") as info:
        parse_raw_row(b'{"messages": [}')
    assert info.value.reason == "unparseable_json"


def test_invalid_utf8_bytes():
    with pytest.raises(BadRow, match=r"^unparseable_json: invalid UTF-8 at byte 16") as info:
        parse_raw_row(b'{"messages": "ab\xff\xfe"}')
    assert info.value.reason == "unparseable_json"


def test_row_that_is_not_an_object():
    with pytest.raises(BadRow, match="^wrong_type: expected a JSON object per row, found list") as info:
        parse_raw_row(b'[{"role": "user", "content": "hi"}]')
    assert info.value.reason == "wrong_type"


# ---- every reason normalisation raises ---------------------------------------------------

BAD_ROWS = [
    ({"text": "hello"}, "missing_messages", "row has neither 'conversations' .ShareGPT. nor 'messages' .OpenAI."),
    ({"messages": None}, "missing_messages", "row has neither"),
    ({"messages": "hi"}, "wrong_type", "expected a list of turns, found str"),
    ({"conversations": {"from": "human"}}, "wrong_type", "expected a list of turns, found dict"),
    ({"messages": ["hi", "there"]}, "wrong_type", "turn 0: expected an object, found str"),
    ({"messages": [{"role": 3, "content": "hi"}]}, "wrong_type", "turn 0: 'role' must be a string, found 3"),
    ({"conversations": [{"value": "hi"}]}, "wrong_type", "turn 0: 'from' must be a string, found None"),
    (
        {"messages": [{"role": "user", "text": "q"}, {"role": "assistant", "content": "a"}]},
        "wrong_type",
        r"turn 0: no text: expected the turn's text under 'content' .or 'value'. .a null for an empty message., "
        r"found the keys \['role', 'text'\]; put the text under 'content', or drop the row",
    ),
    (
        {"conversations": [{"from": "human", "text": "q"}, {"from": "gpt", "value": "a"}]},
        "wrong_type",
        r"turn 0: no text: expected the turn's text under 'value' .or 'content'. .a null for an empty message., "
        r"found the keys \['from', 'text'\]; put the text under 'value', or drop the row",
    ),
    (
        sharegpt(("human", "q"), ("gpt", "a")) | {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call"}]},
        "wrong_type",
        r"turn 1: no text: expected the turn's text under 'value' .or 'content'.",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                {"role": "assistant", "content": "a"},
            ]
        },
        "wrong_type",
        "turn 0: content part .* is not text: expected a string or {'type': 'text', 'text': <string>}",
    ),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "wrong_type", "turn 0: content part"),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}]},
        "wrong_type",
        "turn 1: content must be a string, found int",
    ),
    (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "narrator", "value": "a"}]},
        "unknown_role",
        "turn 1: unknown role 'narrator'",
    ),
    ({"messages": [{"role": "narrator", "content": "q"}]}, "unknown_role", "turn 0: unknown role 'narrator'"),
    ({"messages": [{"role": "function_call", "content": "{}"}]}, "unknown_role", "turn 0: unknown role 'function_call'"),
    (
        {"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]},
        "unknown_role",
        re.escape(
            "turn 0: unknown role 'narrator': expected one of ['assistant', 'bot', 'chatgpt', 'developer', 'function', "
            "'function_call', 'gpt', 'human', 'model', 'observation', 'system', 'tool', 'user'] (case and surrounding spaces "
            "aside); rename the role to one of them, or drop the row"
        ),
    ),
    (
        {"messages": [{"role": "narrator", "content": "q"}]},
        "unknown_role",
        r"turn 0: unknown role 'narrator': expected one of \['assistant', 'bot', 'chatgpt', 'developer', 'function', 'gpt', ",
    ),
    (
        sharegpt(("human", "q"), ("function_call", "weather(city='Oslo')")),
        "wrong_type",
        "turn 1: a function_call turn's 'value' must be a JSON object .* it is not JSON",
    ),
    (sharegpt(("human", "q"), ("function_call", '"weather"')), "wrong_type", "turn 1: a function_call turn's 'value' must be .*found str"),
    (
        sharegpt(("human", "q"), ("function_call", '{"arguments": {}}')),
        "wrong_type",
        r"turn 1: tool_calls\[0\].function.name must be a non-empty string, found None",
    ),
    (
        {"system": ["be", "brief"], **sharegpt(("human", "q"), ("gpt", "a"))},
        "wrong_type",
        "the row's 'system' must be a string .the system prompt., found list",
    ),
    ({"messages": []}, "empty_conversation", "the conversation has no turns"),
    ({"conversations": []}, "empty_conversation", "the conversation has no turns"),
    (
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
        "no_assistant_turn",
        "no assistant turn to supervise",
    ),
    ({"conversations": [{"from": "human", "value": "q"}]}, "no_assistant_turn", "no assistant turn"),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": ["x"]}]},
        "wrong_type",
        "turn 1: 'reasoning_content' must be a string, found list",
    ),
    (
        {"messages": [{"role": "assistant", "content": "", "tool_calls": {"name": "f"}}]},
        "wrong_type",
        "turn 0: tool_calls must be a list, found dict",
    ),
    (
        {"messages": [{"role": "assistant", "content": "", "tool_calls": ["f"]}]},
        "wrong_type",
        r"turn 0: tool_calls\[0\] must be an object, found str",
    ),
    (
        {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}]},
        "wrong_type",
        r"turn 0: tool_calls\[0\].function must be an object with 'name' and 'arguments', found None",
    ),
    (
        {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "", "arguments": "{}"}}]}]},
        "wrong_type",
        r"turn 0: tool_calls\[0\].function.name must be a non-empty string, found ''",
    ),
    (
        {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}]},
        "wrong_type",
        r"turn 0: tool_calls\[0\].function.arguments is missing; expected a JSON string or object",
    ),
    (
        {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": 3, "function": {"name": "f", "arguments": "{}"}}]}]},
        "wrong_type",
        r"turn 0: tool_calls\[0\].id must be a string, found int",
    ),
]


@pytest.mark.parametrize("row, reason, detail", BAD_ROWS)
def test_bad_row_reason(row, reason, detail):
    with pytest.raises(BadRow, match=f"^{reason}: {detail}") as info:
        normalize_row(row)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "row, found",
    [
        (
            {"conversation_id": "c1", "conversation": [{"role": "user", "content": "hi"}], "model": None},
            "the keys ['conversation', 'conversation_id']",
        ),
        ({"instruction": "Say hi.", "output": "Hi!", "messages": None}, "the keys ['instruction', 'output']"),
        ({"messages": None, "conversations": None}, "no key with a value"),
    ],
)
def test_a_row_without_either_list_names_the_keys_it_has(row, found):
    """Its turns are most likely under another name (lmsys-chat-1m's `conversation`), or it is no chat (Alpaca's
    instruction/output): the reason says which keys the row has, and where its turns should be."""
    with pytest.raises(BadRow, match=says("missing_messages", f"found {found}", "put the list of turns under 'messages'")):
        normalize_row(row)


def test_bad_rows_cover_every_reason_raised_before_tokenizing():
    raised = {reason for _, reason, _ in BAD_ROWS} | {"unparseable_json"}
    # The other reasons come from tokenizing (tests/test_tokenize.py).
    assert raised == set(SKIP_REASONS) - {"template_error", "template_not_prefix_stable", "no_loss_tokens_after_truncation"}


def test_unknown_reason_is_a_programming_error():
    with pytest.raises(AssertionError, match="not_a_reason"):
        BadRow("not_a_reason", "x")
