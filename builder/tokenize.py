"""Conversations -> (input_ids, loss_mask), per DESIGN §2, and the cached `datasets.map` over them.

Two ways to find assistant tokens, giving the same mask for the same template:
- the template's `{% generation %}` blocks (`return_assistant_tokens_mask`);
- otherwise, the character span each assistant turn adds to the rendering, found by
  rendering `messages[:i]` (with the generation prompt) and `messages[:i+1]`.
A token is masked when it overlaps an assistant span, as transformers does.
"""

from __future__ import annotations

import hashlib
import json
import re

import datasets
import numpy as np

from .conversations import BadRow, normalize_row, parse_raw_row
from .errors import Eagle3CacheError, InputError

GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")
# Bump when the tokenization or masking code changes, so stale map caches are not reused.
def _code_hash() -> str:
    """The source of tokenization and normalisation: an edit to either invalidates cached maps."""
    from pathlib import Path

    here = Path(__file__).resolve().parent
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in ("tokenize.py", "conversations.py"))).hexdigest()[:16]


TOKENIZE_CODE_VERSION = _code_hash()


class TemplateNotPrefixStable(Eagle3CacheError, ValueError):
    pass


def has_generation_blocks(template: str) -> bool:
    return bool(GENERATION_BLOCK.search(template))


def encode_messages(messages, tokenizer, template: str, seq_length: int) -> tuple[list[int], list[int]]:
    """Token ids and unshifted loss mask, right-truncated to `seq_length`; raises BadRow."""
    try:
        if has_generation_blocks(template):
            ids, mask = _encode_with_generation_blocks(messages, tokenizer, template)
        else:
            ids, mask = _encode_with_prefix_spans(messages, tokenizer, template)
    except (BadRow, TemplateNotPrefixStable):
        raise
    except Exception as err:  # a user template may raise anything (jinja, raise_exception, ...)
        raise BadRow("template_error", f"{type(err).__name__}: {' '.join(str(err).split())}") from None
    ids, mask = ids[:seq_length], mask[:seq_length]
    if not any(mask):
        raise BadRow("no_loss_tokens_after_truncation", f"no assistant token within the first {seq_length} tokens")
    return ids, mask


def _encode_with_generation_blocks(messages, tokenizer, template):
    out = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), [int(m) for m in out["assistant_masks"]]


def _encode_with_prefix_spans(messages, tokenizer, template):
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    spans = list(_assistant_spans(messages, tokenizer, template, text))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(start < span_end and end > span_start for span_start, span_end in spans)) for start, end in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def _assistant_spans(messages, tokenizer, template, full_text):
    def render(prefix, add_generation_prompt):
        return tokenizer.apply_chat_template(
            prefix, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], add_generation_prompt=True)
        if not full_text.startswith(before):
            before = render(messages[:i], add_generation_prompt=False)  # templates without a header prompt
        upto = render(messages[: i + 1], add_generation_prompt=False)
        if not (full_text.startswith(before) and full_text.startswith(upto)):
            raise TemplateNotPrefixStable(
                f"the chat template does not render messages[:{i}] as a prefix of the whole conversation, "
                "so assistant tokens cannot be located; pass --chat-template with a template that has "
                "{% generation %} blocks around assistant content"
            )
        yield len(before), _turn_end(upto, len(before), message["content"])


def _turn_end(upto: str, start: int, content: str) -> int:
    """Where a turn's span ends: whitespace the template adds after the turn (the newline
    before the next header) is not the assistant's, as generation blocks agree; the
    content's own trailing whitespace is."""
    end = len(upto.rstrip())
    at = upto.find(content, start) if content else -1
    return max(start, end, at + len(content) if at >= 0 else 0)


def template_of(tokenizer, override: str | None) -> str:
    """The chat template in use; one that does not compile (syntax error, unknown filter or
    test) is refused here, before any data loads, instead of failing every row."""
    template = override if override is not None else tokenizer.chat_template
    if not template:
        raise InputError(
            "the tokenizer has no chat template; expected one in tokenizer_config.json or a file given "
            "with --chat-template"
        )
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a private helper; without it, a broken template shows up as template_error rows
        return template
    try:
        _compile_jinja_template(template)  # the environment apply_chat_template renders with
    except Exception as err:
        where = "--chat-template: the template file" if override is not None else "the tokenizer's chat template"
        fix = "fix the template file" if override is not None else "pass --chat-template with a working template"
        line = f" (line {err.lineno})" if getattr(err, "lineno", None) else ""
        raise InputError(
            f"{where} does not compile{line}: {type(err).__name__}: {' '.join(str(err).split()).rstrip('.')}; "
            f"expected a Jinja chat template: {fix}"
        ) from None
    return template


def tokenizer_hash(tokenizer, template: str) -> str:
    """Identity of everything in the tokenizer that shapes token ids and masks."""
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())  # {{ bos_token }} etc.
    h.update(template.encode())
    return h.hexdigest()


# ---- the datasets.map over selected rows -------------------------------------------------


def _tokenize_batch(batch, indices, *, tokenizer, template, seq_length, source_indices):
    columns = list(batch)
    out = {k: [] for k in ("sample_id", "source_index", "input_ids", "loss_mask", "num_tokens", "num_loss_tokens", "skip_reason", "skip_detail")}
    for j, position in enumerate(indices):
        row = {k: batch[k][j] for k in columns}
        source_index = int(source_indices[position])
        ids, mask, reason, detail, parsed = [], [], "", "", None
        try:
            parsed = parse_raw_row(row["raw"]) if columns == ["raw"] else row
            ids, mask = encode_messages(normalize_row(parsed), tokenizer, template, seq_length)
        except BadRow as bad:
            reason, detail = bad.reason, bad.detail
        row_id = parsed.get("id") if isinstance(parsed, dict) else None  # bad rows keep their id too
        out["sample_id"].append(str(row_id) if isinstance(row_id, (str, int)) else str(source_index))
        out["source_index"].append(source_index)
        out["input_ids"].append(ids)
        out["loss_mask"].append(mask)
        out["num_tokens"].append(len(ids))
        out["num_loss_tokens"].append(sum(mask))
        out["skip_reason"].append(reason)
        out["skip_detail"].append(detail)
    return out


TOKENIZED_FEATURES = datasets.Features(
    {
        "sample_id": datasets.Value("string"),
        "source_index": datasets.Value("int64"),
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "loss_mask": datasets.Sequence(datasets.Value("int8")),
        "num_tokens": datasets.Value("int32"),
        "num_loss_tokens": datasets.Value("int32"),
        "skip_reason": datasets.Value("string"),
        "skip_detail": datasets.Value("string"),
    }
)


def tokenize_rows(rows: datasets.Dataset, source_indices: np.ndarray, tokenizer, template: str, seq_length: int, num_proc: int) -> datasets.Dataset:
    """Tokenize every selected row (bad rows keep a reason); cached by an explicit fingerprint.

    The fingerprint names what shapes the output (rows, tokenizer, template, length, code),
    so a rerun with the same inputs reuses the cache whatever `datasets` thinks of hashing
    a tokenizer object.
    """
    fingerprint = hashlib.sha256(
        "|".join(
            [rows._fingerprint, tokenizer_hash(tokenizer, template), str(seq_length), TOKENIZE_CODE_VERSION]
        ).encode()
    ).hexdigest()[:32]
    return rows.map(
        _tokenize_batch,
        batched=True,
        batch_size=256,
        with_indices=True,
        remove_columns=rows.column_names,
        features=TOKENIZED_FEATURES,
        num_proc=num_proc if num_proc > 1 and len(rows) >= 2 * num_proc else None,
        new_fingerprint=fingerprint,
        fn_kwargs=dict(tokenizer=tokenizer, template=template, seq_length=seq_length, source_indices=source_indices),
        desc="Tokenizing",
    )
