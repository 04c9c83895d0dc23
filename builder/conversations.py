"""Normalise chat rows (ShareGPT or OpenAI) into OpenAI-style message lists.

Every way a row can be unusable is a `BadRow` with a short reason code; the build skips
and counts those (or, with --strict, stops on the first one before any model loads).
"""

from __future__ import annotations

import json
from typing import Any

# ShareGPT speaker names -> chat-template roles.
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
}

# Reason codes, in the order a row is checked. They are stable: the manifest keeps them.
SKIP_REASONS = (
    "unparseable_json",
    "missing_messages",
    "wrong_type",
    "unknown_role",
    "empty_conversation",
    "no_assistant_turn",
    "template_error",
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


def normalize_row(row: dict) -> list[dict[str, str]]:
    """Return `[{"role", "content"}]` with string content, or raise BadRow."""
    if row.get("conversations") is not None:
        turns, role_key, text_key = row["conversations"], "from", "value"
    elif row.get("messages") is not None:
        turns, role_key, text_key = row["messages"], "role", "content"
    else:
        raise BadRow("missing_messages", "row has neither 'conversations' (ShareGPT) nor 'messages' (OpenAI)")
    if not isinstance(turns, list):
        raise BadRow("wrong_type", f"expected a list of turns, found {type(turns).__name__}")
    if not turns:
        raise BadRow("empty_conversation", "the conversation has no turns")
    messages = [_normalize_turn(turn, role_key, text_key, i) for i, turn in enumerate(turns)]
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise BadRow("no_assistant_turn", "no assistant turn to supervise")
    # Empty or None content is an empty message (OpenAI tool-call turns have none), but a row
    # whose every assistant turn is empty would only supervise the template's end-of-turn tokens.
    if not any(text.strip() for text in assistant):
        raise BadRow("no_assistant_turn", f"all {len(assistant)} assistant turns are empty; no assistant text to supervise")
    return messages


def _normalize_turn(turn: Any, role_key: str, text_key: str, index: int) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise BadRow("wrong_type", f"turn {index}: expected an object, found {type(turn).__name__}")
    speaker = turn.get(role_key)
    if not isinstance(speaker, str):
        raise BadRow("wrong_type", f"turn {index}: '{role_key}' must be a string, found {speaker!r}")
    role = ROLE_ALIASES.get(speaker.strip().lower())
    if role is None:
        raise BadRow("unknown_role", f"turn {index}: unknown role {speaker!r}")
    return {"role": role, "content": _content_text(turn.get(text_key), index)}


def _content_text(content: Any, index: int) -> str:
    """OpenAI content may be a string, a list of text parts, or None (an empty message)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise BadRow("wrong_type", f"turn {index}: content part {part!r} is not text")
        return "".join(texts)
    raise BadRow("wrong_type", f"turn {index}: content must be a string, found {type(content).__name__}")
