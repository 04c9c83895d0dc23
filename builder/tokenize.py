"""Conversations -> (input_ids, loss_mask), per the contract in docs/supervision.md, and the cached `datasets.map` over them.

The mask follows NeMo Automodel's chat formatting, so a cache supervises exactly what its
trainer would. A template that refuses a system role renders the conversation as NeMo's
tokenizer does, with the system message folded into the first user turn. Assistant tokens
come from
- the template's `{% generation %}` blocks (`return_assistant_tokens_mask`), or
- for a template without them, token prefix lengths: turn `i` spans the tokens between
  the renderings of `messages[:i]` and `messages[:i+1]`, so it includes the role header
  and whatever else the template writes for the turn (its end-of-turn tokens too). A
  leading assistant turn starts after what the template renders for no messages.

Two options then take tokens out, whichever way the turns were found:
- `mask_generation_prompt`: the tokens the generation prompt supplies at the start of a
  turn (role header, an empty `<think></think>`), found by rendering `messages[:i]` with
  and without `add_generation_prompt`; in both thinking modes when the template reads
  `enable_thinking`;
- `mask_reasoning_content`: the tokens that differ when a turn's `reasoning_content` is
  cleared.
Right truncation keeps the first `seq_length` tokens and their mask, as NeMo's truncated
renderings do.
"""

from __future__ import annotations

import hashlib
import json
import re
import weakref
from pathlib import Path

import datasets
import numpy as np
from jinja2.exceptions import TemplateError

from .conversations import BadRow, normalize_row, opens_with_row_system, parse_raw_row, row_tools, without_arrow_filled_nulls
from .errors import InputError

# A tag without spaces (`{%-generation-%}`) is one, as Jinja reads it; NeMo Automodel's detection wants
# a space and gives such a template its prefix-span mask (docs/supervision.md).
GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")


# The code whose output the tokenizing map caches: reading input rows (inputs.py; a saved or Hub
# dataset's rows are keyed by `datasets` alone), normalising conversations, tokenizing and masking.
CODE_FILES = ("tokenize.py", "conversations.py", "inputs.py")
BUILDER_DIR = Path(__file__).resolve().parent


def _code_hash(folder: Path = BUILDER_DIR) -> str:
    """The source of CODE_FILES: an edit to any of them invalidates cached maps."""
    return hashlib.sha256(b"".join((folder / name).read_bytes() for name in CODE_FILES)).hexdigest()[:16]


TOKENIZE_CODE_VERSION = _code_hash()


def has_generation_blocks(template: str) -> bool:
    return bool(GENERATION_BLOCK.search(template))


def encode_messages(
    messages,
    tokenizer,
    template: str,
    seq_length: int,
    *,
    tools: list[dict] | None = None,
    mask_generation_prompt: bool = False,
    mask_reasoning_content: bool = False,
) -> tuple[list[int], list[int]]:
    """Token ids and unshifted loss mask, right-truncated to `seq_length`; raises BadRow.
    `template` is one template, or named templates (see `template_for`)."""
    template = template_for(template, tools)
    options = dict(mask_generation_prompt=mask_generation_prompt, mask_reasoning_content=mask_reasoning_content)

    def render(conversation):
        return _ids_and_mask(conversation, _Chat(tokenizer, template, tools), seq_length, **options)

    try:
        ids, mask = render(messages)
    except BadRow as bad:
        if not _refused_for_the_row_system(bad, messages, render):
            raise
        raise BadRow(bad.reason, f"{bad.detail}; {ROW_SYSTEM_REFUSED}") from None
    ids, mask = ids[:seq_length], mask[:seq_length]
    if not any(mask):
        raise BadRow("no_loss_tokens_after_truncation", f"no assistant token within the first {seq_length} tokens")
    return ids, mask


def _ids_and_mask(messages, chat, seq_length, *, mask_generation_prompt, mask_reasoning_content):
    """The untruncated token ids and loss mask; raises BadRow."""
    try:
        if has_generation_blocks(chat.template):
            ids, mask = _encode_with_generation_blocks(messages, chat)
        else:
            ids = chat.ids(messages)
            mask = _prefix_span_mask(messages, chat, ids, seq_length)
        if mask_generation_prompt:
            mask = _without(mask, _generation_prompt_positions(messages, chat, ids, seq_length))
        if mask_reasoning_content:
            mask = _without(mask, _reasoning_positions(messages, chat, ids, seq_length))
    except BadRow:
        raise
    except Exception as err:  # a user template may raise anything (jinja, raise_exception, ...)
        raise BadRow("template_error", f"{type(err).__name__}: {' '.join(str(err).split())}") from None
    return ids, mask


ROW_SYSTEM_REFUSED = (
    "the row's 'system' field was added as a system message, which this chat template does not accept; drop the field "
    "from the input or pass --chat-template with a template that takes a system message"
)


def _refused_for_the_row_system(bad: BadRow, messages, render) -> bool:
    """Whether the template refused the conversation for the system message the row's `system`
    field opened it with: templates without a system role (Mistral's, Mixtral's) raise or render
    it where prefixes cannot locate turns, and say nothing of where it came from. Only a
    conversation that renders without it is refused for it."""
    if bad.reason not in ("template_error", "template_not_prefix_stable") or not opens_with_row_system(messages):
        return False
    try:
        render(messages[1:])
    except BadRow:
        return False
    return True


class _Chat:
    """One conversation's renderings with one template and tool list, as token ids; plain
    renderings of its prefixes are kept, since several masks ask for the same ones."""

    def __init__(self, tokenizer, template: str, tools: list[dict] | None):
        self.tokenizer, self.template, self.tools = tokenizer, template, tools
        self.eos_token_id = tokenizer.eos_token_id
        self._prefixes: dict[int, list[int]] = {}

    def ids(self, messages, **template_kwargs) -> list[int]:
        # transformers refuses to render no messages, yet that rendering (a BOS, a default system
        # prompt) is where a leading assistant turn starts: a batch of one empty conversation
        # renders it as the template writes it.
        conversation = list(messages) or [[]]
        text = _apply_chat_template(
            self.tokenizer, conversation, chat_template=self.template, tools=self.tools, tokenize=False, **template_kwargs
        )
        text = text if messages else text[0]
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prefix(self, messages, k: int) -> list[int]:
        if k not in self._prefixes:
            self._prefixes[k] = self.ids(messages[:k])
        return self._prefixes[k]

    def starts(self, prefix: list[int], whole: list[int]) -> bool:
        """Whether `prefix` renders the start of `whole`. As in NeMo Automodel, a last token
        that is the EOS may differ: some templates end a conversation, not a turn, with it."""
        if len(prefix) > len(whole):
            return False
        if prefix == whole[: len(prefix)]:
            return True
        return len(prefix) > 1 and prefix[-1] == self.eos_token_id and prefix[:-1] == whole[: len(prefix) - 1]


# What a template that takes no system role raises for one (Gemma's do).
SYSTEM_ROLE_REFUSED = "System role not supported"


def _apply_chat_template(tokenizer, conversation, **kwargs):
    """The tokenizer's `apply_chat_template`, and what NeMo Automodel's tokenizer does when the
    template refuses a system role: render again with the system message folded into the
    first user turn. Every rendering goes through here, so prefixes fold as the whole does."""
    try:
        return tokenizer.apply_chat_template(conversation, **kwargs)
    except TemplateError as err:
        if SYSTEM_ROLE_REFUSED not in str(err) or not _system_messages(conversation):
            raise
    return tokenizer.apply_chat_template(_with_system_in_first_user_turn(conversation), **kwargs)


def _system_messages(conversation) -> list[dict]:
    return [m for m in conversation if isinstance(m, dict) and m.get("role") == "system"]


def _with_system_in_first_user_turn(conversation) -> list:
    """NeMo Automodel's fold: the system message's text, a newline, then the first user turn's
    text; a conversation without a user turn opens with the system text as one."""
    systems = _system_messages(conversation)
    if len(systems) > 1:
        raise BadRow(
            "template_error",
            f"the chat template refuses a system role ({SYSTEM_ROLE_REFUSED!r}) and the conversation has {len(systems)} "
            "system messages; a single one is folded into the first user turn (as NeMo Automodel does), several cannot be: "
            "merge them into one, or pass --chat-template with a template that accepts a system role",
        )
    system = systems[0].get("content", "")
    folded, merged = [], False
    for message in conversation:
        role = message.get("role") if isinstance(message, dict) else None
        if role == "system":
            continue
        if not merged and role == "user":
            message, merged = {**message, "content": f"{system}\n{message['content']}"}, True
        folded.append(message)
    return folded if merged else [{"role": "user", "content": system}, *folded]


def _encode_with_generation_blocks(messages, chat):
    if not getattr(chat.tokenizer, "is_fast", False):  # transformers maps the blocks' characters to tokens by offsets
        raise BadRow(
            "template_error",
            "the chat template marks assistant turns with {% generation %} blocks, whose loss mask needs a fast tokenizer's "
            f"character offsets; found {type(chat.tokenizer).__name__}, a pure-Python tokenizer without them: give the target "
            "a tokenizer.json (a fast tokenizer), or pass --chat-template with a template without generation blocks",
        )
    out = _apply_chat_template(
        chat.tokenizer,
        messages,
        chat_template=chat.template,
        tools=chat.tools,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    return list(out["input_ids"]), [int(m) for m in out["assistant_masks"]]


def _prefix_span_mask(messages, chat, ids, seq_length):
    """Each assistant turn's tokens, header included, from prefix lengths. The prefixes are
    checked within the first `seq_length` tokens (what NeMo's truncated renderings see);
    a template that rewrites earlier turns as later ones arrive fails the check."""
    window = ids[:seq_length]

    def boundary(k: int) -> int:
        if k == len(messages):
            return len(ids)
        prefix = chat.prefix(messages, k) if k else _rendering_of_no_messages(chat, messages)
        if not chat.starts(prefix[:seq_length], window):
            raise BadRow(
                "template_not_prefix_stable",
                f"the chat template does not render messages[:{k}] as a prefix of the whole conversation "
                "(it rewrites earlier turns as later ones arrive), so assistant tokens cannot be located; "
                "pass --chat-template with a template that has {% generation %} blocks around assistant content",
            )
        return len(prefix)

    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            for t in range(boundary(i), min(boundary(i + 1), len(ids))):
                mask[t] = 1
    return mask


def _rendering_of_no_messages(chat, messages) -> list[int]:
    """What the template writes before any message, where a leading assistant turn starts."""
    try:
        return chat.prefix(messages, 0)
    except Exception as err:  # templates that read messages[0] unguarded
        raise BadRow(
            "template_error",
            f"the chat template cannot render no messages ({type(err).__name__}: {' '.join(str(err).split())}), so where "
            "the leading assistant turn starts is unknown; pass --chat-template with a template that renders an empty "
            "conversation or has {% generation %} blocks around assistant content",
        ) from None


def _window_of_extra_renderings(ids, seq_length):
    """How NeMo reads the extra renderings of the two options: whole when the conversation
    reaches `seq_length` (it then compares against the untruncated rendering), cut to
    `seq_length` otherwise."""
    return (lambda other: other) if len(ids) >= seq_length else (lambda other: other[:seq_length])


def _generation_prompt_positions(messages, chat, ids, seq_length) -> set[int]:
    """Tokens that open an assistant turn exactly as the generation prompt would: the prompt
    must append a block to the unchanged rendering of `messages[:i]`, and the turn must start
    with that whole block; otherwise (or when `messages[:i]` is not a prefix) nothing of the
    turn is taken out, since a partial match cannot tell template tokens from the message.
    Both prefixes must be exact, as in NeMo Automodel: the last EOS the turn spans let differ
    would put the block one token off, so a template that ends the conversation with its EOS
    keeps its turns whole."""
    cut = _window_of_extra_renderings(ids, seq_length)
    modes = [{"enable_thinking": True}, {"enable_thinking": False}] if "enable_thinking" in chat.template else [{}]
    positions: set[int] = set()
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            base = cut(chat.prefix(messages, i))
            if not _is_prefix(base, ids):
                continue
            prompts = [cut(chat.ids(messages[:i], add_generation_prompt=True, **mode)) for mode in modes]
        except Exception:
            if i:
                raise
            continue  # a leading assistant turn of a template that cannot render no messages: its header stays in the loss
        turn = ids[len(base) :]
        length = max(_appended_block_length(base, prompt, turn) for prompt in prompts)
        positions.update(range(len(base), len(base) + length))
    return positions


def _is_prefix(prefix: list[int], whole: list[int]) -> bool:
    return prefix == whole[: len(prefix)]


def _appended_block_length(base, prompt, turn) -> int:
    if not _is_prefix(base, prompt):
        return 0
    block = prompt[len(base) :]
    return len(block) if block and turn[: len(block)] == block else 0


def _reasoning_positions(messages, chat, ids, seq_length) -> set[int]:
    """For each assistant turn with reasoning, the tokens between the longest common prefix
    and suffix of the rendering and the rendering with that turn's reasoning cleared."""
    cut = _window_of_extra_renderings(ids, seq_length)
    positions: set[int] = set()
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or not message.get("reasoning_content"):
            continue
        cleared = cut(chat.ids([*messages[:i], {**message, "reasoning_content": ""}, *messages[i + 1 :]]))
        start = _common_prefix_length(ids, cleared)
        limit = min(len(ids), len(cleared)) - start
        suffix = _common_prefix_length(ids[::-1][:limit], cleared[::-1][:limit])
        positions.update(range(start, len(ids) - suffix))
    return positions


def _common_prefix_length(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _without(mask: list[int], positions: set[int]) -> list[int]:
    return [0 if t in positions else m for t, m in enumerate(mask)]


def template_of(tokenizer, override: str | dict[str, str] | None) -> str | dict[str, str]:
    """The chat template in use: one template, or named templates (a tokenizer whose
    tokenizer_config.json lists `{"name", "template"}` objects; `template_for` picks one per
    row). A template that does not compile (syntax error, unknown filter or test) is refused
    here, before any data loads, instead of failing every row."""
    template = override if override is not None else tokenizer.chat_template
    if not template:
        raise InputError("the tokenizer has no chat template; expected one in tokenizer_config.json or a file given with --chat-template")
    where = "--chat-template: the template file" if override is not None else "the tokenizer's chat template"
    if isinstance(template, list):  # named templates as tokenizer_config.json stores them
        template = _named_templates_from_list(template, where)
    if isinstance(template, dict):
        template = _checked_named_templates(template, where)
        for name, text in template.items():
            _check_compiles(text, f"{where} (template {name!r})", override is not None)
        return template
    _check_compiles(template, where, override is not None)
    return template


def template_for(template: str | dict[str, str], tools: list[dict] | None) -> str:
    """The template a row renders with, picked among named templates as transformers'
    `apply_chat_template` picks: `tool_use` when the row has tools and there is one,
    `default` otherwise."""
    if isinstance(template, str):
        return template
    return template["tool_use"] if tools and "tool_use" in template else template["default"]


def template_bytes(template: str | dict[str, str]) -> bytes:
    """What identifies the template(s): the text, or every named template, so that a change to
    any template a row may render with changes the build's identity."""
    return template.encode() if isinstance(template, str) else json.dumps(template, sort_keys=True).encode()


def read_template_file(path: str | Path) -> str | dict[str, str]:
    """--chat-template: a Jinja file, or a JSON file holding `{"chat_template": ...}` as model
    repositories ship it (chat_template.json), whose value is a template or named templates."""
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors write one) is no template text
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if path.suffix.lower() == ".json":
            raise InputError(
                f"--chat-template: {path} is named .json but is not valid JSON ({err.msg} at line {err.lineno}); "
                'expected a Jinja template file, or JSON holding {"chat_template": "..."}: fix the file or pass the Jinja template itself'
            ) from None
        return text
    if not isinstance(data, (dict, list)):  # a JSON scalar is also text a Jinja template may be
        return text
    template = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(template, list):
        template = _named_templates_from_list(template, f"--chat-template: {path}")
    if isinstance(template, (str, dict)) and template:
        return template
    found = f"an object with keys {sorted(data)}" if isinstance(data, dict) else "a JSON array"
    if isinstance(data, dict) and "chat_template" in data:
        found = f"'chat_template' holding {type(data['chat_template']).__name__} {data['chat_template']!r:.60}"
    raise InputError(
        f"--chat-template: {path} is JSON, but not a chat template file: expected an object whose 'chat_template' is the Jinja "
        f'template (or a list of {{"name", "template"}} objects), found {found}; pass a Jinja template file or a chat_template.json'
    )


def _named_templates_from_list(entries: list, where: str) -> dict:
    """tokenizer_config.json's form of named templates: a list of `{"name", "template"}`."""
    for entry in entries:
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and "template" in entry):
            raise InputError(
                f"{where}: 'chat_template' is a list, so each item must be an object with a 'name' and a 'template', "
                f"found {entry!r:.80}; fix the file"
            )
    return {entry["name"]: entry["template"] for entry in entries}


def _checked_named_templates(templates: dict, where: str) -> dict[str, str]:
    names = sorted(templates)
    for name in names:
        if not isinstance(name, str) or not isinstance(templates[name], str) or not templates[name]:
            raise InputError(f"{where} (template {name!r}) is {type(templates[name]).__name__}, not the text of a Jinja template; fix it")
    if "default" not in templates:
        raise InputError(
            f"{where} holds named templates {names} but none named 'default', the one rows without tools render with "
            "(as in transformers); pass --chat-template with the template to use"
        )
    return {name: templates[name] for name in names}


def _check_compiles(template: str, where: str, from_file: bool) -> None:
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a private helper; without it, a broken template shows up as template_error rows
        return
    try:
        _compile_jinja_template(template)  # the environment apply_chat_template renders with
    except Exception as err:
        fix = "fix the template file" if from_file else "pass --chat-template with a working template"
        line = f" (line {err.lineno})" if getattr(err, "lineno", None) else ""
        raise InputError(
            f"{where} does not compile{line}: {type(err).__name__}: {' '.join(str(err).split()).rstrip('.')}; "
            f"expected a Jinja chat template: {fix}"
        ) from None


def tokenizer_hash(tokenizer, template: str | dict[str, str]) -> str:
    """Identity of everything in the tokenizer that shapes token ids and masks."""
    return _hash_with(_tokenizer_model(tokenizer), tokenizer, template)


def recorded_tokenizer_hashes(tokenizer, template: str | dict[str, str]) -> frozenset[str]:
    """The hashes a cache may have recorded for this tokenizer: `tokenizer_hash`, and, for a backend
    that loaded with truncation or padding, the one earlier versions recorded where the build process
    never encoded (more than one --num-proc, a rerun reusing the tokenized rows): the backend as
    loaded, those settings in."""
    found = tokenizer_hash(tokenizer, template)
    as_loaded = _backend_as_loaded(tokenizer)
    if as_loaded is None:
        return frozenset({found})
    return frozenset({found, _hash_with(as_loaded.to_str().encode(), tokenizer, template)})


def _hash_with(model: bytes, tokenizer, template: str | dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(model)
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())  # {{ bos_token }} etc.
    h.update(template_bytes(template))
    return h.hexdigest()


# Each loaded tokenizer's backend truncation and padding, as load_tokenizer found them: transformers
# turns both off on the first encode call, and an earlier version's hash may hold them.
_LOADED_SETTINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def note_loaded_settings(tokenizer) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        _LOADED_SETTINGS[tokenizer] = (backend.truncation, backend.padding)


def _backend_as_loaded(tokenizer):
    """A copy of the backend with the truncation and padding it loaded with (those it has now, for a
    tokenizer load_tokenizer did not load); None where it has no backend or loaded with neither."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    truncation, padding = _LOADED_SETTINGS.get(tokenizer, (backend.truncation, backend.padding))
    if truncation is None and padding is None:
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    if truncation is None:
        copy.no_truncation()
    else:
        copy.enable_truncation(**truncation)
    if padding is None:
        copy.no_padding()
    else:
        copy.enable_padding(**padding)
    return copy


def _tokenizer_model(tokenizer) -> bytes:
    """A fast tokenizer's whole model as its JSON; a pure-Python one (remote-code tiktoken or
    sentencepiece tokenizers have no `backend_tokenizer`) as its class, its vocabulary files and its ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return _without_truncation_and_padding(backend).to_str().encode()
    import tempfile

    parts = [f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}".encode()]
    with tempfile.TemporaryDirectory() as folder:
        try:
            saved = tokenizer.save_vocabulary(folder) or ()
        except NotImplementedError:
            saved = ()
        parts += [Path(f).read_bytes() for f in sorted(map(str, saved)) if Path(f).is_file()]
    parts.append(json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]), default=str).encode())
    return b"\0".join(parts)


def _without_truncation_and_padding(backend):
    """The backend with no truncation or padding. transformers sets both anew on every encode call
    (turning off those a tokenizer.json ships with on the first), and the builder truncates in its own
    code: they tell which calls ran before in this process, not how rows tokenize. A backend with
    neither is returned as it is, so caches recorded before keep their hash; one with either, as a
    copy with both off, so the caller's tokenizer is left as it was."""
    if backend.truncation is None and backend.padding is None:
        return backend
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


# ---- the datasets.map over selected rows -------------------------------------------------


def _tokenize_batch(batch, indices, *, tokenizer, template, seq_length, source_indices, mask_options):
    columns = list(batch)
    out = {
        k: []
        for k in ("sample_id", "source_index", "input_ids", "loss_mask", "num_tokens", "num_loss_tokens", "skip_reason", "skip_detail")
    }
    for j, position in enumerate(indices):
        row = {k: batch[k][j] for k in columns}
        source_index = int(source_indices[position])
        ids, mask, reason, detail, parsed = [], [], "", "", None
        try:
            parsed = parse_raw_row(row["raw"]) if columns == ["raw"] else without_arrow_filled_nulls(row)
            messages, tools = normalize_row(parsed), row_tools(parsed)
            ids, mask = encode_messages(messages, tokenizer, template, seq_length, tools=tools, **mask_options)
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


def library_versions() -> str:
    """The libraries that render templates and encode text: another release of one may tokenize the same rows otherwise."""
    import jinja2
    import tokenizers
    import transformers

    return f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, jinja2 {jinja2.__version__}"


def tokenize_rows(
    rows: datasets.Dataset,
    source_indices: np.ndarray,
    tokenizer,
    template: str | dict[str, str],
    seq_length: int,
    num_proc: int,
    *,
    mask_generation_prompt: bool = False,
    mask_reasoning_content: bool = False,
) -> datasets.Dataset:
    """Tokenize every selected row (bad rows keep a reason); cached by an explicit fingerprint.

    The fingerprint names what shapes the output (rows, tokenizer, template, length, mask
    options, code, library versions), so a rerun with the same inputs reuses the cache whatever `datasets`
    thinks of hashing a tokenizer object.
    """
    mask_options = dict(mask_generation_prompt=mask_generation_prompt, mask_reasoning_content=mask_reasoning_content)
    fingerprint = hashlib.sha256(
        "|".join(
            [
                rows._fingerprint,
                tokenizer_hash(tokenizer, template),
                str(seq_length),
                json.dumps(mask_options, sort_keys=True),
                TOKENIZE_CODE_VERSION,
                library_versions(),
            ]
        ).encode()
    ).hexdigest()[:32]
    # In the `datasets` cache, never beside the rows' own files: a saved dataset's folder may be
    # read-only shared storage, and is the user's, not ours to write into.
    cache_file = Path(datasets.config.HF_DATASETS_CACHE) / "eagle3_cache_tokenized" / f"tokenized-{fingerprint}.arrow"
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    return rows.map(
        _tokenize_batch,
        cache_file_name=str(cache_file),
        batched=True,
        batch_size=256,
        with_indices=True,
        remove_columns=rows.column_names,
        features=TOKENIZED_FEATURES,
        num_proc=num_proc if num_proc > 1 and len(rows) >= 2 * num_proc else None,
        new_fingerprint=fingerprint,
        fn_kwargs=dict(
            tokenizer=tokenizer, template=template, seq_length=seq_length, source_indices=source_indices, mask_options=mask_options
        ),
        desc="Tokenizing",
    )
