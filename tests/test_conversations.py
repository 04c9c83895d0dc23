"""Row normalisation: ShareGPT and OpenAI rows -> messages, and every BadRow it raises."""

import json

import pytest

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
        ("tool", "tool"),
    ],
)
def test_sharegpt_role_alias(speaker, role):
    row = sharegpt((speaker, "first"), ("gpt", "reply"))
    assert normalize_row(row) == [{"role": role, "content": "first"}, {"role": "assistant", "content": "reply"}]


def test_every_alias_is_covered_above():
    assert set(ROLE_ALIASES) == {"human", "user", "gpt", "assistant", "chatgpt", "bot", "model", "system", "tool"}


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


def test_openai_list_of_text_parts_is_joined():
    row = openai(
        ("user", [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]),
        ("assistant", [{"text": "Four"}, "."]),  # a part without "type" counts as text, as does a bare string
    )
    assert normalize_row(row) == [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."}]


def test_openai_none_content_is_empty_string():
    row = openai(("user", "call the tool"), ("assistant", None), ("tool", "42"), ("assistant", "It is 42."))
    assert normalize_row(row)[1] == {"role": "assistant", "content": ""}


def test_openai_missing_content_is_empty_string():
    # (a row whose every assistant turn is empty is skipped: see test_bad_inputs.py)
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}, {"role": "assistant", "content": "ok"}]}
    assert normalize_row(row)[1] == {"role": "assistant", "content": ""}


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
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                {"role": "assistant", "content": "a"},
            ]
        },
        "wrong_type",
        "turn 0: content part .* is not text",
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
    ({"messages": [{"role": "function", "content": "q"}]}, "unknown_role", "turn 0: unknown role 'function'"),
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


def test_bad_rows_cover_every_reason_raised_before_tokenizing():
    raised = {reason for _, reason, _ in BAD_ROWS} | {"unparseable_json"}
    # The other reasons come from tokenizing (tests/test_tokenize.py).
    assert raised == set(SKIP_REASONS) - {"template_error", "template_not_prefix_stable", "no_loss_tokens_after_truncation"}


def test_unknown_reason_is_a_programming_error():
    with pytest.raises(AssertionError, match="not_a_reason"):
        BadRow("not_a_reason", "x")
