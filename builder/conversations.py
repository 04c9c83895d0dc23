"""Normalise chat rows (ShareGPT or OpenAI) into OpenAI-style message lists.

A row's turns sit under `conversations` or `messages`; what the turns hold, not the list's
name, says how to read them: `role`/`content` turns are OpenAI messages (SpecForge writes
them under `conversations`), `from`/`value` turns are ShareGPT turns. When no turn has the
role key of the other shape, the list's name decides (`conversations`: ShareGPT). A row
with both lists is read from `messages`. A turn's text is under its shape's key, else the
other shape's (`content` for a ShareGPT turn, `value` for an OpenAI one), and a ShareGPT
turn without `from` names its role with `role`, as NeMo Automodel reads them; a turn with no
text key at all is a bad row (its text is under a key this reader does not know), not an
empty message.

What reaches the chat template follows NeMo Automodel's chat dataset, so that a cache
supervises what its trainer would: an OpenAI message keeps its other fields
(`reasoning_content`, `tool_calls`, `tool_call_id`, `name`, ...), with tool calls in the
shape templates expect (OpenAI's legacy `function_call` becomes one of them); a ShareGPT
turn gives its role and text only, except LLaMA-Factory's `function_call` turn, an
assistant tool call whose text is the call as JSON (`{"name", "arguments"}`, or a list of
them), which becomes the message's `tool_calls`. A row's top-level `system` string
(LLaMA-Factory's system prompt, with either shape of turn) opens the conversation as a system
message unless a system turn already does; NeMo Automodel ignores it, which would train the row
without the prompt it gives. The row's `tools` (a list, or that list as a JSON string; a
blank string is none) is passed alongside. A field whose value is null
counts as absent: Arrow tables fill missing fields with nulls, and the same conversation
must encode alike from JSON and from Parquet.

Every way a row can be unusable is a `BadRow` with a short reason code; the build skips
and counts those (or, with --strict, stops on the first one before any model loads).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

# Speaker names (ShareGPT `from`, OpenAI `role`) -> chat-template roles: OpenAI's `developer`
# role is its system role, its legacy `function` role and LLaMA-Factory's `observation` give a
# tool's result.
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
    "developer": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}
# LLaMA-Factory's ShareGPT speaker for an assistant turn that calls tools.
TOOL_CALL_SPEAKER = "function_call"


class TurnShape(NamedTuple):
    """How a turn is read: its role under the first of `role_keys` that is set, its text under
    the first of `text_keys`, and whether its other fields reach the template."""

    role_keys: tuple[str, ...]
    text_keys: tuple[str, ...]
    keeps_fields: bool


# NeMo Automodel reads a ShareGPT turn's role from `from`, else `role`, and its text from
# `value`, else `content`, whatever the tags of the list's other turns: rows that mix the two
# forms build there, so they build here. An OpenAI message's text is read from `value` where it
# has no `content` alike.
OPENAI_TURN = TurnShape(("role",), ("content", "value"), True)
SHAREGPT_TURN = TurnShape(("from", "role"), ("value", "content"), False)

# Reason codes, in the order a row is checked. They are stable: the manifest keeps them.
SKIP_REASONS = (
    "unparseable_json",
    "missing_messages",
    "wrong_type",
    "unknown_role",
    "empty_conversation",
    "no_assistant_turn",
    "template_error",
    "template_not_prefix_stable",
    "no_loss_tokens_after_truncation",
)


class BadRow(Exception):
    """A row that cannot become a sample; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def parse_raw_row(raw: bytes) -> dict:
    """Rows read from JSON/JSONL files arrive as bytes so that one bad line cannot fail the load."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise BadRow("unparseable_json", f"invalid UTF-8 at byte {err.start}") from None
    except json.JSONDecodeError as err:
        raise BadRow("unparseable_json", f"invalid JSON ({err.msg} at char {err.pos})") from None
    if not isinstance(row, dict):
        raise BadRow("wrong_type", f"expected a JSON object per row, found {type(row).__name__}")
    return row


# The columns of a row a build reads (its conversation, system prompt, tools and id); any other is carried nowhere.
ROW_COLUMNS_READ = ("messages", "conversations", "system", "tools", "id")


def normalize_row(row: dict) -> list[dict[str, Any]]:
    """Return OpenAI-style messages (role, string content, and an OpenAI message's other
    fields), or raise BadRow."""
    # A row with both lists is read from `messages`, as NeMo Automodel's chat dataset reads it.
    if row.get("messages") is not None:
        turns, shape = row["messages"], OPENAI_TURN
    elif row.get("conversations") is not None:
        turns, shape = row["conversations"], SHAREGPT_TURN
    else:
        raise BadRow(
            "missing_messages", f"row has neither 'conversations' (ShareGPT) nor 'messages' (OpenAI): found {_keys_held(row)}; {PUT_TURNS}"
        )
    if not isinstance(turns, list):
        raise BadRow("wrong_type", f"expected a list of turns, found {type(turns).__name__}")
    if not turns:
        raise BadRow("empty_conversation", "the conversation has no turns")
    shape = _turn_shape(turns, shape)
    messages = _with_row_system(row, [_normalize_turn(turn, shape, i) for i, turn in enumerate(turns)])
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise BadRow("no_assistant_turn", "no assistant turn to supervise")
    # Empty or None content is an empty message (OpenAI tool-call turns have none), but a row
    # whose every assistant turn has neither text, reasoning nor tool calls would only
    # supervise the template's end-of-turn tokens.
    if not any(_has_output(m) for m in assistant):
        raise BadRow("no_assistant_turn", f"all {len(assistant)} assistant turns are empty; no assistant text to supervise")
    return messages


PUT_TURNS = "put the list of turns under 'messages' (role/content turns) or 'conversations' (from/value turns), or drop the row"


def _keys_held(row: dict, limit: int = 10) -> str:
    """The keys holding a value (Arrow gives a row every column, null where it has none): where the turns
    may be under another name (`conversation`), or what the row holds instead (`instruction`, `output`)."""
    held = sorted(str(key) for key, value in row.items() if value is not None)
    if not held:
        return "no key with a value"
    return f"the keys {held[:limit]}{' ...' if len(held) > limit else ''}"


def _turn_shape(turns: list, by_name: tuple) -> tuple:
    """The shape the list's name implies, unless no turn has its role key and some turn has the
    other shape's. A null counts as absent (Arrow gives a list's turns every key any row uses)."""
    other = SHAREGPT_TURN if by_name is OPENAI_TURN else OPENAI_TURN

    def some_turn_has(key: str) -> bool:
        return any(isinstance(turn, dict) and turn.get(key) is not None for turn in turns)

    return other if not some_turn_has(by_name.role_keys[0]) and some_turn_has(other.role_keys[0]) else by_name


class RowSystemMessage(dict):
    """The system message a row's top-level `system` field opens the conversation with, told
    apart from a system turn of the conversation's own: where a template refuses the row for it,
    the skip's reason says the field is why."""


def opens_with_row_system(messages: list[dict]) -> bool:
    return bool(messages) and isinstance(messages[0], RowSystemMessage)


def _with_row_system(row: dict, messages: list[dict]) -> list[dict]:
    """LLaMA-Factory's rows give the system prompt as a top-level `system` string, whichever
    shape their turns have (its sharegpt format allows `role`/`content` tags too)."""
    system = row.get("system")
    if system is None or system == "":
        return messages
    if not isinstance(system, str):
        raise BadRow("wrong_type", f"the row's 'system' must be a string (the system prompt), found {type(system).__name__}")
    if messages[0]["role"] == "system":  # a system turn of the conversation wins, as in LLaMA-Factory
        return messages
    return [RowSystemMessage(role="system", content=system), *messages]


def without_arrow_filled_nulls(row: dict) -> dict:
    """An Arrow row (Parquet, a saved or Hub dataset) without the nulls in its tool definitions and tool calls:
    a table gives each object of a column every key any of them has, null where one has none, so a call's
    arguments would read {"city": "Oslo", "query": null} and train keys no call held, and a tool's schema
    another tool's properties. Arrow cannot tell those nulls from ones the data held: both are absent, as a
    turn's null field is. (A JSON row keeps its nulls: they are the data's.)"""
    out = dict(row)
    if isinstance(row.get("tools"), list):
        out["tools"] = _without_nulls(row["tools"])
    for key in ("messages", "conversations"):
        if isinstance(row.get(key), list):
            out[key] = [_turn_without_call_nulls(turn) for turn in row[key]]
    return out


def _turn_without_call_nulls(turn: Any) -> Any:
    if not isinstance(turn, dict):
        return turn
    return {key: _without_nulls(value) if key in ("tool_calls", "function_call") else value for key, value in turn.items()}


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def row_tools(row: dict) -> list[dict] | None:
    """The row's tool definitions for the template: a list of objects, or that list as a
    JSON string (how JSONL and Parquet datasets usually store them); none, empty or a blank
    string (LLaMA-Factory's rows without tools, as with `system`) is None."""
    tools = row.get("tools")
    if isinstance(tools, str) and not tools.strip():
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise BadRow("wrong_type", f"'tools' is a string but not valid JSON ({err.msg} at char {err.pos})") from None
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise BadRow("wrong_type", f"'tools' must be a list of tool definitions (objects), found {_describe(tools)}")
    return tools or None


def _describe(value: Any) -> str:
    if isinstance(value, list):
        kinds = sorted({type(item).__name__ for item in value})
        return f"a list of {', '.join(kinds)}"
    return type(value).__name__


def _has_output(message: dict) -> bool:
    return bool(message["content"].strip() or message.get("reasoning_content") or message.get("tool_calls"))


def _no_calls(key: str, value: Any) -> bool:
    return key in ("tool_calls", "function_call") and value in ([], {})


def _normalize_turn(turn: Any, shape: TurnShape, index: int) -> dict[str, Any]:
    if not isinstance(turn, dict):
        raise BadRow("wrong_type", f"turn {index}: expected an object, found {type(turn).__name__}")
    role_key = _first_set(turn, shape.role_keys)
    speaker = turn.get(role_key)
    if not isinstance(speaker, str):
        raise BadRow("wrong_type", f"turn {index}: '{role_key}' must be a string, found {speaker!r}")
    if not shape.keeps_fields and speaker.strip().lower() == TOOL_CALL_SPEAKER:
        return _tool_call_turn(turn.get(_text_key(turn, shape, index)), index)
    role = ROLE_ALIASES.get(speaker.strip().lower())
    if role is None:
        raise BadRow(
            "unknown_role",
            f"turn {index}: unknown role {speaker!r}: expected one of {_accepted_roles(shape)} (case and surrounding "
            "spaces aside); rename the role to one of them, or drop the row",
        )
    text_key = _text_key(turn, shape, index)
    message = {"role": role, "content": _content_text(turn.get(text_key), index)}
    if shape.keeps_fields:
        # An empty call list is no call: API responses (vLLM, OpenAI) carry `tool_calls: []` on plain answers, and
        # templates that test `'tool_calls' in message` would render the turn as calls and drop its text.
        extra = {k: v for k, v in turn.items() if k not in (role_key, text_key) and v is not None and not _no_calls(k, v)}
        if role == "assistant":
            if "reasoning_content" in extra and not isinstance(extra["reasoning_content"], str):
                found = type(extra["reasoning_content"]).__name__
                raise BadRow("wrong_type", f"turn {index}: 'reasoning_content' must be a string, found {found}")
            if "function_call" in extra:
                extra = _with_function_call_as_tool_call(extra, index)
            if "tool_calls" in extra:
                extra["tool_calls"] = _normalize_tool_calls(extra["tool_calls"], index)
        message.update(extra)
    return message


def _accepted_roles(shape: TurnShape) -> list[str]:
    return sorted([*ROLE_ALIASES, *([] if shape.keeps_fields else [TOOL_CALL_SPEAKER])])


def _first_set(turn: dict, keys: tuple[str, ...]) -> str:
    """The first of `keys` whose value is not null (a null counts as absent), else the first."""
    return next((key for key in keys if turn.get(key) is not None), keys[0])


def _text_key(turn: dict, shape: TurnShape, index: int) -> str | None:
    """The key the turn's text is read from (its value may be null: an empty message); None for
    an OpenAI message that calls tools and leaves `content` out, as the API allows. A turn with
    no text key at all is a bad row, not an empty message: its text is most likely under a key
    this reader does not know, and would silently train an empty turn."""
    present = tuple(key for key in shape.text_keys if key in turn)
    if present:
        return _first_set(turn, present)
    if shape.keeps_fields and _calls_tools(turn):
        return None
    expected = f"'{shape.text_keys[0]}'" + "".join(f" (or '{key}')" for key in shape.text_keys[1:])
    raise BadRow(
        "wrong_type",
        f"turn {index}: no text: expected the turn's text under {expected} (a null for an empty message), "
        f"found the keys {sorted(map(str, turn))}; put the text under '{shape.text_keys[0]}', or drop the row",
    )


def _calls_tools(turn: dict) -> bool:
    return any(turn.get(key) not in (None, [], {}) for key in ("tool_calls", "function_call"))


def _with_function_call_as_tool_call(fields: dict[str, Any], index: int) -> dict[str, Any]:
    """OpenAI's legacy `function_call` (`{"name", "arguments"}`) is one tool call: templates read
    `tool_calls` only, and would render the turn empty."""
    call = fields["function_call"]
    if not isinstance(call, dict):
        raise BadRow("wrong_type", f"""turn {index}: 'function_call' must be an object {{"name": ..., "arguments": ...}}, found {call!r}""")
    if "tool_calls" in fields:
        raise BadRow(
            "wrong_type",
            f"turn {index}: the assistant message has both 'function_call' (OpenAI's legacy form) and 'tool_calls'; expected one of them",
        )
    others = {k: v for k, v in fields.items() if k != "function_call"}
    return {**others, "tool_calls": [{"function": call}]}


def _tool_call_turn(value: Any, index: int) -> dict[str, Any]:
    """A `function_call` turn: the assistant calls the tools its text names, as JSON."""
    expected = 'a JSON object {"name": ..., "arguments": ...} or a list of them'
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"turn {index}: a function_call turn's 'value' must be {expected} as a string, found {value!r}")
    try:
        calls = json.loads(value)
    except json.JSONDecodeError as err:
        raise BadRow(
            "wrong_type", f"turn {index}: a function_call turn's 'value' must be {expected}; it is not JSON ({err.msg} at char {err.pos})"
        ) from None
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list):
        raise BadRow("wrong_type", f"turn {index}: a function_call turn's 'value' must be {expected}, found {type(calls).__name__}")
    functions = [{"function": call} for call in calls]
    return {"role": "assistant", "content": "", "tool_calls": _normalize_tool_calls(functions, index)}


def _normalize_tool_calls(calls: Any, index: int) -> list[dict]:
    """OpenAI tool calls in the shape chat templates read: each has an `id` (default
    `call_<n>`), a `type` (default `function`) and a `function` with a name and its
    `arguments` as a JSON string (an object is serialised, as NeMo Automodel does)."""
    where = f"turn {index}: tool_calls"
    if not isinstance(calls, list):
        raise BadRow("wrong_type", f"{where} must be a list, found {type(calls).__name__}")
    normalized = []
    for n, call in enumerate(calls):
        if not isinstance(call, dict):
            raise BadRow("wrong_type", f"{where}[{n}] must be an object, found {type(call).__name__}")
        function = call.get("function")
        if not isinstance(function, dict):
            raise BadRow("wrong_type", f"{where}[{n}].function must be an object with 'name' and 'arguments', found {function!r}")
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str) or not name:
            raise BadRow("wrong_type", f"{where}[{n}].function.name must be a non-empty string, found {name!r}")
        if arguments is None:
            raise BadRow("wrong_type", f"{where}[{n}].function.arguments is missing; expected a JSON string or object")
        call_id, kind = call.get("id"), call.get("type")
        call_id = f"call_{n}" if call_id in (None, "") else call_id
        kind = "function" if kind in (None, "") else kind
        for field, value in (("id", call_id), ("type", kind)):
            if not isinstance(value, str):
                raise BadRow("wrong_type", f"{where}[{n}].{field} must be a string, found {type(value).__name__}")
        if not isinstance(arguments, str):
            function = {**function, "arguments": json.dumps(arguments)}
        normalized.append({**call, "id": call_id, "type": kind, "function": function})
    return normalized


def _content_text(content: Any, index: int) -> str:
    """OpenAI content may be a string, a list of text parts (joined with a space, as NeMo
    Automodel's chat dataset joins them), or None (an empty message)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif _is_text_part(part):
                texts.append(part["text"])
            else:
                raise BadRow(
                    "wrong_type",
                    f"turn {index}: content part {part!r} is not text: expected a string or {{'type': 'text', 'text': <string>}} "
                    "(the target reads text only); drop the part, or the row",
                )
        return " ".join(texts)
    raise BadRow("wrong_type", f"turn {index}: content must be a string, found {type(content).__name__}")


def _is_text_part(part: Any) -> bool:
    """A part without a `type` is text; so is one whose `type` is null, as Arrow fills it in for
    a part that has none in a table whose other parts do."""
    return isinstance(part, dict) and part.get("type") in (None, "text") and isinstance(part.get("text"), str)
