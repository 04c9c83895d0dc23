"""The bad-input matrix, end to end through `eagle3-cache build`.

Every case has one of two outcomes:

- **skipped and counted**: the bad row is left out, `manifest["skipped"]` counts it under
  its reason, the valid rows are still built; with `--strict` the same input stops with
  exit 2 and one `error: --strict: input row N (id ...) is invalid: REASON: ...` line,
  before any weights load and with nothing written;
- **clear error**: exit 2, one `error: ...` line on stderr naming the flag, what was
  expected or found and what to do, no traceback, `load_model` never called, and the
  output directory never created.

Each case, its outcome and the test that shows it:

- invalid JSON line: skipped, unparseable_json.
  test_bad_row_is_skipped_and_counted[invalid_json_line]
- missing `conversations`/`messages`: skipped, missing_messages.
  test_bad_row_is_skipped_and_counted[missing_messages]
- wrong types (row, turn list, turn, role): skipped, wrong_type.
  test_bad_row_is_skipped_and_counted[wrong_types]
- unknown role: skipped, unknown_role.
  test_bad_row_is_skipped_and_counted[unknown_role]
- empty or None content: kept (empty message); all-empty assistant turns: skipped,
  no_assistant_turn; no turns: skipped, empty_conversation.
  test_bad_row_is_skipped_and_counted[empty_or_none_content],
  test_empty_and_none_content_are_empty_messages
- non-string content (number, object, image part): skipped, wrong_type.
  test_bad_row_is_skipped_and_counted[non_string_content]
- no assistant turn: skipped, no_assistant_turn.
  test_bad_row_is_skipped_and_counted[no_assistant_turn]
- assistant-only conversation: kept and built (only its content is supervised).
  test_assistant_only_conversation_is_built
- longer than --seq-length before the first assistant token: skipped,
  no_loss_tokens_after_truncation.
  test_bad_row_is_skipped_and_counted[longer_than_seq_length_before_assistant]
- invalid UTF-8 in a JSON Lines row: skipped, unparseable_json.
  test_bad_row_is_skipped_and_counted[invalid_utf8]
- template that raises on some rows: skipped, template_error.
  test_bad_row_is_skipped_and_counted[template_raises_on_some_rows]
- template that raises on every row: error, no usable rows (counts + first row).
  test_template_that_raises_on_every_row
- template that does not compile (undefined filter): error before any data loads.
  test_template_that_does_not_compile
- duplicate ids: all kept and built; counted (`Prepared.duplicate_ids`, a warning).
  test_duplicate_ids_are_kept_and_counted
- Hub dataset id that does not exist (offline): error.
  test_hub_dataset_that_does_not_exist
- Hub model id that does not exist (offline): error before any data loads.
  test_hub_model_that_does_not_exist
- model path without tokenizer: error before any data loads.
  test_model_path_without_tokenizer
- model path without (or with a broken) config.json: error before any data loads.
  test_model_path_without_config
- model path whose weight files are missing or truncated: error when the weights load.
  test_model_path_with_missing_or_truncated_weights
- unknown dtype: error before anything loads.
  test_validation.py::test_cli_bad_flag_is_one_error_line[--dtype],
  test_validation.py::test_validate_rejects[dtype=*]
- directory with no data files: error.
  test_directory_with_no_data_files (load level: test_inputs.py::test_empty_directory)
- data file with no rows (empty, blank lines, `[]`): error.
  test_data_file_with_no_rows
- every row invalid: error, no usable rows.
  test_template_that_raises_on_every_row, test_every_row_invalid
- empty --input-data, a --split the input lacks, --input-config on a local path: error.
  test_input_flags_that_cannot_apply (load level: test_input_splits.py)
- a data folder of train and test files: --split builds that split alone, recorded in the manifest.
  test_split_of_a_data_folder_is_built_alone
- a target whose decoder layers are not one list of modules (found by structure, whatever the
  name: `layers`, GPT-2's `h`, MPT's `blocks`): error before any data loads.
  test_a_target_whose_decoder_layers_are_not_one_list_is_refused_before_anything_loads

Related, tested elsewhere: a JSON array file that is not valid JSON, a missing path,
a wrong suffix, mixed Parquet/JSON and Parquet files with different columns
(test_inputs.py, test_validation.py::test_cli_unreadable_input_is_one_error_line); how
a folder resolves into splits and configurations, a byte-order mark, a lone surrogate
escape and Parquet parts of differing nested schemas (test_input_splits.py); a
template that is not prefix-stable (test_validation.py); --strict for every reason at
the prepare() level (test_inputs.py::test_strict_names_the_row_and_reason); a token id past
the target's vocabulary, in a supervised turn or not (a tokenizer that does not match the
model): error naming the row, before the weights load (test_vocab.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import assert_same_content, decoded_rows

import builder.placement as placement_mod
import builder.prepare as prepare_mod
import builder.target as target_mod
from builder.cli import main
from builder.config import BuildConfig
from builder.embedded import EMBEDDED_TARGETS
from builder.pipeline import build
from builder.reader import read_manifest

SEQ = 64
COMMON = ["--quiet", "--seq-length", str(SEQ), "--dtype", "fp32", "--draft-vocab-size", "200", "--shard-size", "16"]


def good_row(i: int) -> dict:
    """A valid row: ShareGPT for even i, OpenAI for odd i."""
    if i % 2 == 0:
        return {
            "id": f"ok-{i}",
            "conversations": [{"from": "human", "value": f"What is {i} plus {i}?"}, {"from": "gpt", "value": f"It is {2 * i}."}],
        }
    return {
        "id": f"ok-{i}",
        "messages": [{"role": "user", "content": f"Name item {i}."}, {"role": "assistant", "content": f"Item {i} is a box."}],
    }


def openai_row(row_id, *turns) -> dict:
    return {"id": row_id, "messages": [{"role": r, "content": c} for r, c in turns]}


def line(row) -> bytes:
    return json.dumps(row).encode()


GOOD = [line(good_row(i)) for i in range(4)]
GOOD_IDS = [f"ok-{i}" for i in range(4)]

# Like the embedded template, but raises on a message that contains FORBIDDEN.
RAISE_ON_FORBIDDEN = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if 'FORBIDDEN' in m['content'] %}{{ raise_exception('the word FORBIDDEN is not allowed') }}{% endif %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>\n{% generation %}{{ m['content'] ~ '<|end|>' }}{% endgeneration %}\n"
    "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# (case, bad JSONL lines, expected manifest["skipped"], chat template or None)
SKIP_CASES = [
    (
        "invalid_json_line",
        [b'{"id": "bad-json", "messages": [{"role": "user", "content": "hi"}', b"{'id': 1}"],
        {"unparseable_json": 2},
        None,
    ),
    (
        "missing_messages",
        [line({"id": "bad-missing", "text": "hello"}), line({"id": "bad-null", "conversations": None, "messages": None})],
        {"missing_messages": 2},
        None,
    ),
    (
        "wrong_types",
        [
            b"[1, 2, 3]",  # the row is not an object
            line({"id": "bad-str", "messages": "user: hi"}),  # turns not a list
            line({"id": "bad-turn", "messages": ["hi", {"role": "assistant", "content": "x"}]}),  # a turn not an object
            line({"id": "bad-role-type", "conversations": [{"from": 1, "value": "hi"}, {"from": "gpt", "value": "x"}]}),
        ],
        {"wrong_type": 4},
        None,
    ),
    (
        "unknown_role",
        [line({"id": "bad-role", "conversations": [{"from": "human", "value": "q"}, {"from": "narrator", "value": "a"}]})],
        {"unknown_role": 1},
        None,
    ),
    (
        "empty_or_none_content",
        [
            line(openai_row("bad-empty-assistant", ("user", "hi"), ("assistant", ""))),
            line(openai_row("bad-none-assistant", ("user", "hi"), ("assistant", None), ("assistant", "  \n"))),
            line({"id": "bad-no-turns", "messages": []}),
            line(openai_row("ok-none-user", ("user", None), ("assistant", "Hello."))),  # kept
            line(openai_row("ok-tool-call", ("user", "Look it up."), ("assistant", None), ("tool", "{}"), ("assistant", "Found."))),  # kept
        ],
        {"no_assistant_turn": 2, "empty_conversation": 1},
        None,
    ),
    (
        "non_string_content",
        [
            line(openai_row("bad-int", ("user", 5), ("assistant", "five"))),
            line(openai_row("bad-dict", ("user", "hi"), ("assistant", {"text": "x"}))),
            line(openai_row("bad-image", ("user", [{"type": "image_url", "image_url": {"url": "x.png"}}]), ("assistant", "a cat"))),
        ],
        {"wrong_type": 3},
        None,
    ),
    ("no_assistant_turn", [line(openai_row("bad-noassistant", ("system", "be brief"), ("user", "q")))], {"no_assistant_turn": 1}, None),
    (
        "longer_than_seq_length_before_assistant",
        [line(openai_row("bad-long", ("user", "a very long question " * 40), ("assistant", "ok")))],
        {"no_loss_tokens_after_truncation": 1},
        None,
    ),
    (
        "invalid_utf8",
        [b'{"id": "bad-utf8", "messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}'],
        {"unparseable_json": 1},
        None,
    ),
    (
        "template_raises_on_some_rows",
        [line(openai_row("bad-template", ("user", "say FORBIDDEN"), ("assistant", "no")))],
        {"template_error": 1},
        RAISE_ON_FORBIDDEN,
    ),
]
KEPT_IDS = {"empty_or_none_content": ["ok-none-user", "ok-tool-call"]}


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["build", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def built_rows(out: Path) -> list[dict]:
    """sample_id and source_index of every stored row, read from the shards themselves."""
    rows = []
    for shard in sorted((out / "data").glob("*.parquet")):
        rows += pq.read_table(shard, columns=["sample_id", "source_index"]).to_pylist()
    return rows


@pytest.fixture
def no_weights(monkeypatch):
    """Make loading the target's weights fail the test."""

    def fail(*args, **kwargs):
        raise AssertionError("model weights loaded")

    monkeypatch.setattr(target_mod, "load_model", fail)
    monkeypatch.setattr(placement_mod, "load_model", fail)
    return monkeypatch


@pytest.fixture
def no_data(no_weights):
    """Also make loading the input data fail the test."""
    no_weights.setattr(prepare_mod, "load_rows", lambda *a, **k: pytest.fail("input data loaded"))
    return no_weights


def assert_clean_error(code: int, out: str, err: str, pattern: str, out_dir: Path) -> str:
    """Exit 2, exactly one `error:` line (the last thing on stderr), no traceback, nothing written."""
    assert code == 2, (out, err)
    errors = [text for text in err.splitlines() if text.startswith("error: ")]
    assert len(errors) == 1 and err.endswith(errors[0] + "\n"), err
    assert "Traceback" not in err and out == ""
    assert re.search(pattern, errors[0]), errors[0]
    assert not out_dir.exists()
    return errors[0]


# ---- rows that are skipped and counted ---------------------------------------------------------


@pytest.mark.parametrize("case, bad, skipped, template", SKIP_CASES, ids=[c[0] for c in SKIP_CASES])
def test_bad_row_is_skipped_and_counted(tmp_path, capsys, monkeypatch, case, bad, skipped, template):
    lines = GOOD[:2] + bad + GOOD[2:]
    data = write_lines(tmp_path / "rows.jsonl", lines)
    extra = []
    if template:
        (tmp_path / "template.jinja").write_text(template)
        extra = ["--chat-template", str(tmp_path / "template.jinja")]
    kept = GOOD_IDS + KEPT_IDS.get(case, [])

    out = tmp_path / "out"
    code, stdout, err = cli(capsys, *COMMON, "--input-data", str(data), "--output-dir", str(out), *extra)
    assert code == 0, err
    assert f"  skipped by reason: {json.dumps(dict(sorted(skipped.items())))}" in stdout
    manifest = read_manifest(out)
    assert manifest["skipped"] == skipped
    assert manifest["totals"]["samples"] == len(kept)
    rows = built_rows(out)
    assert sorted(r["sample_id"] for r in rows) == sorted(kept)  # the valid rows were built, the bad ones not
    assert len({r["source_index"] for r in rows}) == len(kept)

    # --strict: the same input stops at the first bad row, before any weights load.
    monkeypatch.setattr(target_mod, "load_model", lambda *a, **k: pytest.fail("model weights loaded"))
    monkeypatch.setattr(placement_mod, "load_model", lambda *a, **k: pytest.fail("model weights loaded"))
    strict_out = tmp_path / "strict"
    code, stdout, err = cli(capsys, *COMMON, "--input-data", str(data), "--output-dir", str(strict_out), "--strict", *extra)
    reasons = "|".join(skipped)
    assert_clean_error(
        code,
        stdout,
        err,
        rf"^error: --strict: input row \d+ \(id '[^']*'\) is invalid: ({reasons}): .*"
        r"Fix or drop the row, or run without --strict",
        strict_out,
    )


def test_empty_and_none_content_are_empty_messages(tmp_path):
    """None content (OpenAI tool-call turns) and "" are empty messages, not errors; only a row
    whose every assistant turn is empty is skipped, since it would supervise nothing but the
    template's end-of-turn tokens."""
    from builder.conversations import BadRow, normalize_row

    assert normalize_row(openai_row("a", ("user", None), ("assistant", "Hi"))) == [
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "Hi"},
    ]
    assert normalize_row(openai_row("b", ("user", "q"), ("assistant", None), ("tool", ""), ("assistant", "Done")))[1] == {
        "role": "assistant",
        "content": "",
    }
    for turns in ([("user", "q"), ("assistant", "")], [("user", "q"), ("assistant", None), ("assistant", " \n\t")]):
        with pytest.raises(BadRow, match=r"^no_assistant_turn: all \d assistant turns are empty"):
            normalize_row(openai_row("c", *turns))
    with pytest.raises(BadRow, match=r"^empty_conversation: the conversation has no turns$"):
        normalize_row({"messages": []})


def test_assistant_only_conversation_is_built(tmp_path, capsys):
    """A conversation with assistant turns only (no prompt) is valid: the template renders it and
    its content is supervised; nothing is skipped."""
    rows = [
        openai_row("assistant-only", ("assistant", "Once upon a time there was a box.")),
        openai_row("two-assistant-turns", ("assistant", "First part."), ("assistant", "Second part.")),
    ]
    data = write_lines(tmp_path / "rows.jsonl", GOOD + [line(r) for r in rows])
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, *COMMON, "--input-data", str(data), "--output-dir", str(out))
    assert code == 0, err
    manifest = read_manifest(out)
    assert manifest["skipped"] == {}
    assert sorted(r["sample_id"] for r in built_rows(out)) == sorted(GOOD_IDS + [r["id"] for r in rows])

    prep = prepare_mod.prepare(
        BuildConfig(target_model="tiny-llama", input_data=str(data), output_dir=str(out), seq_length=SEQ, dry_run=True)
    )
    sample = next(s for s in prep.samples if s["sample_id"] == "assistant-only")
    supervised = prep.tokenizer.decode([t for t, m in zip(sample["input_ids"], sample["loss_mask"]) if m])
    assert supervised == "Once upon a time there was a box.<|end|>"
    assert sample["loss_mask"][0] == 0  # the bos and the assistant header are not supervised


def test_duplicate_ids_are_kept_and_counted(tmp_path, caplog):
    """Ids are informational: rows sharing one are all kept and built (`source_index` is the
    stable key), never skipped, even with --strict. A row without an id gets its source index
    as id, so it can collide with a row whose id is that number. The count of samples whose id
    an earlier sample already has is `Prepared.duplicate_ids`, and a warning says so."""
    rows = [good_row(0), {**good_row(1), "id": "same"}, {**good_row(2), "id": "same"}, good_row(3), {**good_row(5), "id": "3"}]
    del rows[3]["id"]  # source index 3 -> sample_id "3", like the last row's id
    data = write_lines(tmp_path / "rows.jsonl", [line(r) for r in rows])
    cfg = BuildConfig(
        target_model="tiny-llama",
        input_data=str(data),
        output_dir=str(tmp_path / "out"),
        seq_length=SEQ,
        dtype="fp32",
        draft_vocab_size=200,
        strict=True,
    )
    result = build(cfg, progress=False)
    assert result.prepared.duplicate_ids == 2
    assert "2 of 5 samples share their id with another sample; all are kept" in caplog.text
    assert result.manifest["skipped"] == {}
    assert result.manifest["totals"]["samples"] == 5
    stored = built_rows(tmp_path / "out")
    assert sorted(r["sample_id"] for r in stored) == ["3", "3", "ok-0", "same", "same"]
    assert sorted(r["source_index"] for r in stored) == [0, 1, 2, 3, 4]
    by_index = {r["source_index"]: r["sample_id"] for r in stored}
    assert by_index[3] == "3" and by_index[4] == "3" and by_index[1] == by_index[2] == "same"


# ---- whole-input problems: one clear error, nothing loaded or written ------------------------------


def test_template_that_raises_on_every_row(tmp_path, capsys, no_weights):
    """Every row skipped as template_error leaves nothing to build: refused (instead of an empty
    cache) with the counts and the first row's reason, before any weights load."""
    template = tmp_path / "boom.jinja"
    template.write_text("{{ raise_exception('boom') }}")
    out = tmp_path / "out"
    code, stdout, err = cli(
        capsys, *COMMON, "--input-data", "sample-chats", "--max-samples", "6", "--output-dir", str(out), "--chat-template", str(template)
    )
    assert_clean_error(
        code,
        stdout,
        err,
        r"^error: no usable rows: all 6 selected rows of --input-data were skipped "
        r"\(by reason: \{'template_error': 6\}\); the first, input row \d+ \(id '[^']+'\), is template_error: "
        r"TemplateError: boom\. Fix the input or the chat template \(--chat-template\)$",
        out,
    )
    # The dry run refuses alike: its plan would show 0 valid samples.
    code, stdout, err = cli(
        capsys,
        *COMMON,
        "--input-data",
        "sample-chats",
        "--max-samples",
        "6",
        "--output-dir",
        str(out),
        "--chat-template",
        str(template),
        "--dry-run",
    )
    assert_clean_error(code, stdout, err, r"^error: no usable rows: all 6 selected rows", out)


def test_every_row_invalid(tmp_path, capsys, no_weights):
    data = write_lines(tmp_path / "rows.jsonl", [b"not json", line({"id": "x", "text": "hi"})])
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, *COMMON, "--input-data", str(data), "--output-dir", str(out))
    assert_clean_error(
        code,
        stdout,
        err,
        r"^error: no usable rows: all 2 selected rows of --input-data were skipped "
        r"\(by reason: \{'missing_messages': 1, 'unparseable_json': 1\}\); the first, input row \d",
        out,
    )


@pytest.mark.parametrize(
    "template, found",
    [
        ("{% for m in messages %}{{ m['content'] | nosuchfilter }}{% endfor %}", r"TemplateAssertionError: No filter named 'nosuchfilter'"),
        ("{% for m in messages %}{{ m['content'] }}", r"TemplateSyntaxError: Unexpected end of template"),
    ],
    ids=["undefined_filter", "syntax_error"],
)
def test_template_that_does_not_compile(tmp_path, capsys, no_data, template, found):
    """Checked once when the template is read, before any data loads, instead of failing every row."""
    path = tmp_path / "broken.jinja"
    path.write_text(template)
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, *COMMON, "--output-dir", str(out), "--chat-template", str(path))
    assert_clean_error(
        code,
        stdout,
        err,
        rf"^error: --chat-template: the template file does not compile \(line 1\): {found}.*; "
        r"expected a Jinja chat template: fix the template file$",
        out,
    )


def test_hub_dataset_that_does_not_exist(tmp_path, capsys, no_weights):
    """Offline (HF_HUB_OFFLINE=1, set by conftest) `datasets` raises ConnectionError; the user
    sees what the string was taken for, what was expected and what to do."""
    out = tmp_path / "out"
    for spec in ("no-such-org/no-such-dataset", "data/typo-of-a-local-dir", "a/b/c"):
        code, stdout, err = cli(capsys, *COMMON, "--input-data", spec, "--output-dir", str(out))
        assert_clean_error(
            code,
            stdout,
            err,
            rf"^error: --input-data: '{re.escape(spec)}' is not a local path, and as a Hub dataset it "
            r"could not be loaded \((ConnectionError|FileNotFoundError): .*\); expected a \.json/\.jsonl/\.parquet file, "
            r"a directory of them, a saved dataset or a reachable Hub dataset id: HF_HUB_OFFLINE is set, so only "
            r"datasets already in the local cache load: unset it, or give a local path$",
            out,
        )


def test_hub_model_that_does_not_exist(tmp_path, capsys, no_data):
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, *COMMON, "--target-model", "no-such-org/no-such-model", "--output-dir", str(out))
    assert_clean_error(
        code,
        stdout,
        err,
        r"^error: --target-model: 'no-such-org/no-such-model' is not a local path, and as a Hub "
        r"model id its config could not be loaded \(OSError: .*\); HF_HUB_OFFLINE is set, so only models already "
        r"in the local cache load: unset it, download the model first, or give a local model directory$",
        out,
    )


def test_model_path_without_tokenizer(tmp_path, capsys, no_data):
    model = tmp_path / "weights-only"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(EMBEDDED_TARGETS["tiny-llama"] / name, model / name)
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, *COMMON, "--target-model", str(model), "--output-dir", str(out))
    assert_clean_error(
        code,
        stdout,
        err,
        rf"^error: --target-model: '{re.escape(str(model))}' has no tokenizer files \(found "
        r"\['config\.json', 'model\.safetensors'\]\); expected tokenizer\.json and tokenizer_config\.json beside "
        r"config\.json: copy them from the model the weights came from$",
        out,
    )


def test_model_path_without_config(tmp_path, capsys, no_data):
    model = tmp_path / "tokenizer-only"
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EMBEDDED_TARGETS["tiny-llama"] / name, model / name)
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, *COMMON, "--target-model", str(model), "--output-dir", str(out))
    assert_clean_error(
        code,
        stdout,
        err,
        rf"^error: --target-model: '{re.escape(str(model))}' has no config\.json \(found "
        r"\['tokenizer\.json', 'tokenizer_config\.json'\]\); expected a model directory with config\.json, "
        r"weights and tokenizer files$",
        out,
    )
    (model / "config.json").write_text("{not json")
    code, stdout, err = cli(capsys, *COMMON, "--target-model", str(model), "--output-dir", str(out))
    assert_clean_error(
        code,
        stdout,
        err,
        rf"^error: --target-model: cannot read a model config from the local path "
        rf"'{re.escape(str(model))}' \((OSError|ValueError): .*\); expected a model directory with its config\.json$",
        out,
    )


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_model_path_with_missing_or_truncated_weights(tmp_path, capsys, damage):
    """Only loading them shows it: one clear error naming the folder and what transformers found, no traceback."""
    model = Path(shutil.copytree(EMBEDDED_TARGETS["tiny-llama"], tmp_path / "model"))
    weights = model / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    args = ("--input-data", "sample-chats", "--max-samples", "4", "--target-model", str(model), "--output-dir", str(tmp_path / "out"))
    code, stdout, err = cli(capsys, *COMMON, *args)
    assert code == 2 and stdout == "" and "Traceback" not in err, err
    assert re.search(
        rf"^error: --target-model: cannot load the weights in '{re.escape(str(model))}' \((OSError|SafetensorError): .+\); "
        r"expected its complete weight files beside config\.json .*: copy or download them again from the model's source\n$",
        err.splitlines(keepends=True)[-1],
    ), err


def test_a_build_whose_target_failed_to_load_is_started_over_by_the_same_command_once_fixed(tmp_path, capsys, caplog):
    """The failed start left its build state, naming the weights as they were: a --resume refuses the
    restored ones as another target, saying to start over; the same command starts over and builds the
    cache a build of the intact target builds."""
    model = Path(shutil.copytree(EMBEDDED_TARGETS["tiny-llama"], tmp_path / "model"))
    weights = model / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])
    out = tmp_path / "out"
    args = ("--input-data", "sample-chats", "--max-samples", "4", "--target-model", str(model), "--output-dir", str(out))
    assert cli(capsys, *COMMON, *args)[0] == 2
    weights.write_bytes(intact)
    code, _, err = cli(capsys, *COMMON, *args, "--resume")
    assert code == 2 and "target.weights_sample_sha256" in err and "run without --resume to start it over" in err, err
    assert cli(capsys, *COMMON, *args)[0] == 0
    assert "wrote no shard; starting it over" in caplog.text
    reference = tmp_path / "reference"
    assert cli(capsys, *COMMON, *args[:-1], str(reference))[0] == 0
    assert_same_content(decoded_rows(reference), decoded_rows(out))
    assert read_manifest(out)["fingerprint"] == read_manifest(reference)["fingerprint"]


def test_directory_with_no_data_files(tmp_path, capsys, no_weights):
    data = tmp_path / "chats"
    data.mkdir()
    (data / "README.md").write_text("no data here")
    (data / "rows.csv").write_text("a,b\n")
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, *COMMON, "--input-data", str(data), "--output-dir", str(out))
    assert_clean_error(
        code,
        stdout,
        err,
        rf"^error: --input-data: directory '{re.escape(str(data))}' holds no "
        r"\.jsonl/\.json/\.parquet files; point it at a directory with data files$",
        out,
    )


@pytest.mark.parametrize("name, content", [("empty.jsonl", b""), ("blank.jsonl", b"\n  \n\n"), ("empty-array.json", b"[]")])
def test_data_file_with_no_rows(tmp_path, capsys, no_weights, name, content):
    data = tmp_path / name
    data.write_bytes(content)
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, *COMMON, "--input-data", str(data), "--output-dir", str(out))
    assert_clean_error(
        code,
        stdout,
        err,
        rf"^error: --input-data: {re.escape(name)} holds no rows; expected one JSON object per "
        r"line \(JSON Lines\) or a JSON array of objects$",
        out,
    )


def test_split_of_a_data_folder_is_built_alone(tmp_path, capsys):
    """SpecForge's prepare_data.py --split-eval writes <name>_train.jsonl beside <name>_test.jsonl:
    --split test builds the test rows only, and the manifest says which split it read."""
    data = tmp_path / "sharegpt"
    data.mkdir()
    write_lines(data / "sharegpt_train.jsonl", GOOD[:2])
    write_lines(data / "sharegpt_test.jsonl", GOOD[2:])
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, *COMMON, "--input-data", str(data), "--split", "test", "--output-dir", str(out))
    assert code == 0, err
    assert sorted(r["sample_id"] for r in built_rows(out)) == GOOD_IDS[2:]
    assert read_manifest(out)["identity"]["input"]["split"] == "test"


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--input-data", ""], r"^error: --input-data is empty; expected a \.json/\.jsonl/\.parquet file, .* or a Hub dataset id$"),
        (["--split", "validation"], r"^error: --split: '.*sharegpt' has splits \['test', 'train'\], not 'validation'; pass --split"),
        (["--input-config", "default"], r"^error: --input-config: 'default' names a configuration, .*; drop --input-config$"),
    ],
    ids=["empty_input_data", "absent_split", "input_config_of_a_local_path"],
)
def test_input_flags_that_cannot_apply(tmp_path, capsys, no_weights, flags, pattern):
    data = tmp_path / "sharegpt"
    data.mkdir()
    write_lines(data / "sharegpt_train.jsonl", GOOD[:2])
    write_lines(data / "sharegpt_test.jsonl", GOOD[2:])
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, *COMMON, "--input-data", str(data), *flags, "--output-dir", str(out))
    assert_clean_error(code, stdout, err, pattern, out)


@pytest.mark.parametrize("name", ["out[1]", "x::y", "o$HOME"])
def test_a_cache_written_under_a_path_datasets_would_misread_says_to_rename_it(tmp_path, capsys, name):
    """The build writes it whole; the summary does not offer a `load_cache` call that would be refused."""
    data = write_lines(tmp_path / "chats.jsonl", GOOD)
    out = tmp_path / name
    code, stdout, err = cli(capsys, *COMMON, "--input-data", str(data), "--output-dir", str(out))
    assert code == 0, err
    assert (
        "read it: rename or move the folder first: `datasets` reads '*', '?', '[' and '::' in a path as a pattern or URL, "
        "and '$' as an environment variable"
    ) in stdout
    assert "load_cache(" not in stdout
    assert sorted(r["sample_id"] for r in built_rows(out)) == GOOD_IDS


def test_an_output_dir_under_a_file_is_refused_before_anything_loads(tmp_path, capsys, no_weights):
    (tmp_path / "afile").write_text("not a folder")
    out = tmp_path / "afile" / "cache"
    code, stdout, err = cli(capsys, *COMMON, "--input-data", "sample-chats", "--output-dir", str(out))
    assert code == 2 and not stdout, err
    expected = rf"error: --output-dir: expected a directory \(or a path to create\), got '{re.escape(str(out))}'\. "
    assert re.search(expected + rf"{re.escape(str(tmp_path / 'afile'))} is a file, not a folder", err), err


@pytest.mark.parametrize("readme", ["# my project\n", "---\ntitle: [unclosed\n---\n# my project\n"], ids=["markdown", "broken-yaml"])
@pytest.mark.parametrize("resume", [False, True])
def test_an_output_dir_holding_someone_elses_readme_is_refused_and_kept(tmp_path, capsys, no_weights, resume, readme):
    out = tmp_path / "project"
    out.mkdir()
    (out / "README.md").write_text(readme)
    flags = ["--resume"] if resume else []
    code, stdout, err = cli(capsys, *COMMON, *flags, "--input-data", "sample-chats", "--output-dir", str(out))
    assert code == 2 and not stdout, err
    assert "It holds a README.md that is not an eagle3-cache card, which the build's card would replace" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["README.md"] and (out / "README.md").read_text() == readme


def test_a_new_output_dir_under_a_read_only_folder_is_refused_before_anything_loads(tmp_path, capsys, no_data):
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    out = read_only / "new"
    try:
        try:
            (read_only / "probe").mkdir()
        except PermissionError:
            pass  # the folder is read-only to this process, as the test needs
        else:
            pytest.skip("this process writes into a folder whatever its mode (root): test_validation.py covers it with /proc/self")
        code, stdout, err = cli(capsys, *COMMON, "--input-data", "sample-chats", "--output-dir", str(out))
    finally:
        read_only.chmod(0o755)
    assert_clean_error(
        code,
        stdout,
        err,
        rf"^error: --output-dir: expected a directory this build can create .*, got '{re.escape(str(out))}'\. "
        rf"{re.escape(str(read_only))}, the nearest folder of it that exists, is not writable\. Choose a writable --output-dir\.$",
        out,
    )


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux's /proc")
def test_an_output_dir_that_cannot_be_created_is_one_clear_error(tmp_path, capsys, no_weights):
    """/proc takes no new folder: as root, whom permission checks let through, the build gets as far as
    creating its lock file, which fails; either way the user reads one error saying what to change."""
    out = Path("/proc/eagle3-cache-new")
    code, stdout, err = cli(capsys, *COMMON, "--input-data", "sample-chats", "--output-dir", str(out))
    assert_clean_error(
        code,
        stdout,
        err,
        r"^error: --output-dir: expected a directory this build can create .*, got '/proc/eagle3-cache-new'\. .*"
        r"Choose a writable --output-dir\.$",
        out,
    )


# ---- flags the target or the resolved draft vocabulary cannot take ---------------------------------


def config_only_target(directory: Path, config) -> Path:
    """A target folder of a config and the embedded tokenizer, no weights: enough for every check before loading."""
    from tiny_targets import tiny_tokenizer

    config.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def tiny_text_settings(**overrides) -> dict:
    from tiny_targets import _text_settings, tiny_tokenizer

    return _text_settings(tiny_tokenizer(), **overrides)


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_seq_length_past_learned_positions_is_refused_before_anything_is_written(tmp_path, capsys, no_weights, arch):
    """OPT and GPT-2 learn one position embedding per position: a longer sample would index past the
    table mid-build. The longest tokenized sample decides, so --seq-length is refused only where it bites."""
    from transformers import GPT2Config, OPTConfig

    settings = tiny_text_settings()
    tokens = {k: settings[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    if arch == "opt":
        config = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=8, num_attention_heads=4, max_position_embeddings=32, **tokens)
    else:
        config = GPT2Config(n_embd=64, n_layer=8, n_head=4, n_positions=32, **tokens)
    target = config_only_target(tmp_path / arch, config)
    out = tmp_path / "out"
    code, stdout, err = cli(
        capsys, *COMMON, "--target-model", str(target), "--input-data", "sample-chats", "--max-samples", "6", "--output-dir", str(out)
    )
    line = assert_clean_error(code, stdout, err, r"^error: --seq-length: expected at most the target's context of 32 tokens", out)
    assert f"got {SEQ}. The longest sample has {SEQ} tokens" in line and "lower --seq-length to 32" in line


@pytest.mark.parametrize("arch", ["llama", "gptj", "jamba"])
def test_seq_length_past_rotary_context_warns_that_supervision_is_extrapolated(tmp_path, caplog, arch):
    """Rotary positions (Llama, GPT-J), or none at all (Jamba's Mamba layers): the target runs past its context."""
    from transformers import GPTJConfig, JambaConfig, LlamaConfig

    from builder.prepare import prepare

    settings = tiny_text_settings(max_position_embeddings=32)
    tokens = {k: settings[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    if arch == "llama":
        config = LlamaConfig(**settings)
    elif arch == "gptj":
        config = GPTJConfig(n_embd=64, n_layer=8, n_head=4, n_positions=32, rotary_dim=16, **tokens)
    else:
        shape = dict(hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
        config = JambaConfig(**shape, max_position_embeddings=32, num_experts=1, attn_layer_period=2, attn_layer_offset=1, **tokens)
    target = config_only_target(tmp_path / arch, config)
    settings = dict(target_model=str(target), input_data="sample-chats", max_samples=6, seq_length=SEQ, draft_vocab_size=200)
    with caplog.at_level("WARNING", logger="builder.prepare"):
        prep = prepare(BuildConfig(output_dir=str(tmp_path / "out"), **settings))
    assert max(prep.samples["num_tokens"]) == SEQ > 32
    assert f"--seq-length {SEQ}: the longest sample has {SEQ} tokens, past the target's context of 32" in caplog.text
    assert "extrapolated" in caplog.text and not (tmp_path / "out").exists()
    caplog.clear()
    with caplog.at_level("WARNING", logger="builder.prepare"):
        prepare(BuildConfig(output_dir=str(tmp_path / "out"), **settings | {"seq_length": 32}))
    assert "extrapolated" not in caplog.text


@pytest.mark.parametrize(
    "flags, vd, source",
    [
        ([], 1024, "the target's full vocabulary, 1024 tokens, as no --draft-vocab-size was given"),
        (["--draft-vocab-size", "5000"], 1024, "--draft-vocab-size 5000 capped at the target's vocabulary"),
    ],
    ids=["no_draft_vocab_size", "draft_vocab_size_past_the_vocab"],
)
def test_topk_larger_than_the_resolved_draft_vocab_is_refused(tmp_path, capsys, no_weights, flags, vd, source):
    out = tmp_path / "out"
    argv = ["--quiet", "--seq-length", str(SEQ), "--target-format", "topk", "--topk", "2000", *flags]
    code, stdout, err = cli(capsys, *argv, "--input-data", "sample-chats", "--max-samples", "4", "--output-dir", str(out))
    line = assert_clean_error(code, stdout, err, r"^error: --topk: expected at most the draft vocabulary size", out)
    assert source in line and "got 2000" in line and f"Lower --topk to {vd} or less" in line


def test_a_target_whose_decoder_layers_are_not_one_list_is_refused_before_anything_loads(tmp_path, capsys, no_data):
    """The aux states are hooked on the decoder's layer list, found by its structure under the base model:
    a target without one is refused from a weightless copy, before the input or the weights load."""
    from tiny_targets import sequential_decoder_config

    target = config_only_target(tmp_path / "sequential", sequential_decoder_config())
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, *COMMON, "--target-model", str(target), "--input-data", "sample-chats", "--output-dir", str(out))
    line = assert_clean_error(
        code, stdout, err, r"^error: --target-model: expected the 8 decoder layers of SequentialDecoderForCausalLM", out
    )
    assert "one torch.nn.ModuleList of 8 modules under its base model SequentialDecoder, found no ModuleList" in line
    assert "Use a target whose decoder keeps its layers in one list" in line
