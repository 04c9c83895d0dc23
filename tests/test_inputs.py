"""Input loading: every local kind of input gives the same rows and the same seeded
selection; bad inputs raise InputError; bad rows are skipped and counted (or --strict)."""

import json
import re

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import says
from hub_server import TOKEN, hub_fixtures

import builder.inputs as inputs_mod
import builder.placement as placement_mod
import builder.target as target_mod
from builder.config import BuildConfig
from builder.conversations import SKIP_REASONS, normalize_row, parse_raw_row
from builder.errors import BadRowError, InputError
from builder.inputs import load_rows, select_rows
from builder.pipeline import build
from builder.prepare import prepare

hub_server, hub = hub_fixtures()


def sharegpt(i, turns):
    return {"id": f"sg-{i}", "conversations": [{"from": s, "value": v} for s, v in turns]}


def openai(i, turns):
    return {"id": f"oa-{i}", "messages": [{"role": r, "content": c} for r, c in turns]}


def conversations(n=20):
    """Alternating ShareGPT and OpenAI rows, some with system prompts and tool turns."""
    rows = []
    for i in range(n):
        if i % 2 == 0:
            turns = [("human", f"What is {i} squared?"), ("gpt", f"It is {i * i}.")]
            if i % 4 == 0:
                turns.insert(0, ("system", "Answer with a number."))
            rows.append(sharegpt(i, turns))
        else:
            turns = [
                ("user", f"Look up item {i}."),
                ("assistant", None),
                ("tool", json.dumps({"item": i})),
                ("assistant", f"Item {i} is in stock."),
            ]
            if i % 3 == 0:
                turns.insert(0, ("system", "You manage a shop."))
            rows.append(openai(i, turns))
    return rows


def arrow_rows(rows):
    """Arrow infers a table's columns from its first row: give every row both columns."""
    return [{"id": r["id"], "conversations": r.get("conversations"), "messages": r.get("messages")} for r in rows]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_kind(kind, rows, root):
    """Write `rows` as one kind of input under `root`; returns the --input-data path."""
    root.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        return write_jsonl(root / "chats.jsonl", rows)
    if kind == "json_array":
        path = root / "chats.json"
        path.write_text(json.dumps(rows, indent=2))
        return path
    if kind == "parquet":
        path = root / "chats.parquet"
        pq.write_table(pa.Table.from_pylist(arrow_rows(rows)), path)
        return path
    if kind == "jsonl_directory":
        half = len(rows) // 2
        write_jsonl(root / "dir" / "part-0.jsonl", rows[:half])
        write_jsonl(root / "dir" / "part-1.jsonl", rows[half:])
        (root / "dir" / "README.md").write_text("not data")
        write_jsonl(root / "dir" / ".hidden.jsonl", [{"junk": 1}])
        return root / "dir"
    if kind == "saved_dataset":
        datasets.Dataset.from_list(arrow_rows(rows)).save_to_disk(str(root / "saved"))
        return root / "saved"
    if kind == "saved_dataset_dict":
        other = datasets.Dataset.from_list(arrow_rows(conversations(4)[::-1]))
        datasets.DatasetDict({"test": other, "train": datasets.Dataset.from_list(arrow_rows(rows))}).save_to_disk(str(root / "saved_dict"))
        return root / "saved_dict"
    raise ValueError(kind)


KINDS = ["jsonl", "json_array", "parquet", "jsonl_directory", "saved_dataset", "saved_dataset_dict"]


def row_messages(ds, i):
    row = ds[i]
    if list(row) == ["raw"]:
        row = parse_raw_row(row["raw"])
    return normalize_row(row), row["id"]


def selected_messages(path, seed, max_samples):
    ds, info = load_rows(str(path))
    selected, order = select_rows(ds, seed, max_samples)
    return [row_messages(selected, i) for i in range(len(selected))], order, info


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_loads_the_same_rows_in_order(tmp_path, kind):
    rows = conversations()
    ds, info = load_rows(str(write_kind(kind, rows, tmp_path)))
    assert len(ds) == len(rows)
    assert [row_messages(ds, i) for i in range(len(ds))] == [(normalize_row(r), r["id"]) for r in rows]
    assert info["kind"] == ("saved_dataset" if kind.startswith("saved") else "files")
    assert info["content_hash"]


@pytest.mark.parametrize("kind", KINDS)
def test_shuffle_and_max_samples_pick_the_same_conversations_for_every_kind(tmp_path, kind):
    rows = conversations()
    picked, order, _ = selected_messages(write_kind(kind, rows, tmp_path), seed=7, max_samples=9)
    reference, reference_order, _ = selected_messages(write_kind("jsonl", rows, tmp_path / "ref"), seed=7, max_samples=9)
    assert picked == reference
    assert list(order) == list(reference_order)
    assert len(picked) == 9
    assert picked == [(normalize_row(rows[i]), rows[i]["id"]) for i in order]
    assert sorted(order) != list(range(9))  # shuffled, not the first nine


def test_selection_depends_on_seed_and_max_samples(tmp_path):
    path = write_kind("jsonl", conversations(), tmp_path)
    ds, _ = load_rows(str(path))
    _, a = select_rows(ds, 7, None)
    _, b = select_rows(ds, 8, None)
    _, c = select_rows(ds, 7, 5)
    assert sorted(a) == list(range(20)) and list(a) != list(b)
    assert list(c) == list(a[:5])  # max_samples cuts the same permutation
    _, d = select_rows(ds, 7, 500)
    assert list(d) == list(a)


def test_json_file_of_openai_content_parts(tmp_path):
    rows = [openai(0, [("user", [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]), ("assistant", "Hello")])]
    ds, _ = load_rows(str(write_kind("json_array", rows, tmp_path)))
    assert row_messages(ds, 0)[0] == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]


def test_content_hash_changes_with_the_bytes(tmp_path):
    path = write_kind("jsonl", conversations(), tmp_path)
    _, before = load_rows(str(path))
    write_jsonl(path, conversations()[:-1])
    ds, after = load_rows(str(path))
    assert before["content_hash"] != after["content_hash"]
    assert len(ds) == 19  # not a stale cached load


def split_in_two(folder, data: bytes, at: int):
    """`data` as two files of a folder, the first holding its first `at` bytes."""
    folder.mkdir(parents=True)
    (folder / "part-0.jsonl").write_bytes(data[:at])
    (folder / "part-1.jsonl").write_bytes(data[at:])
    return folder


def test_the_content_hash_marks_where_each_file_ends(tmp_path):
    """Bytes moved from the end of one file to the start of the next are other rows: a row cut in two is two bad rows."""
    lines = [line + b"\n" for line in valid_lines(6)]
    data, boundary = b"".join(lines), len(b"".join(lines[:3]))
    whole, whole_info = load_rows(str(split_in_two(tmp_path / "whole", data, boundary)))
    cut, cut_info = load_rows(str(split_in_two(tmp_path / "cut", data, boundary + 20)))
    assert (len(whole), len(cut)) == (6, 7)
    assert cut_info["content_hash"] != whole_info["content_hash"]


def test_the_content_hash_sees_an_edit_past_the_first_4_mib_of_a_file(tmp_path):
    rows = [openai(i, [("user", f"Summarize text {i}."), ("assistant", "x" * (1 << 20))]) for i in range(5)]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    before, before_info = load_rows(str(path))
    data = bytearray(path.read_bytes())
    assert len(data) > 5 << 20
    edited = data.rindex(b"x")  # in the last row's reply, past 4 MiB
    assert edited > 4 << 20
    data[edited : edited + 1] = b"y"
    path.write_bytes(bytes(data))
    after, after_info = load_rows(str(path))
    assert after_info["content_hash"] != before_info["content_hash"]
    assert parse_raw_row(after["raw"][-1])["messages"][1]["content"] == "x" * ((1 << 20) - 1) + "y"


# ---- DatasetDict splits ---------------------------------------------------------------


def test_dataset_dict_without_split_picks_train(tmp_path):
    path = write_kind("saved_dataset_dict", conversations(6), tmp_path)
    ds, _ = load_rows(str(path))
    assert ds["id"] == [f"{'sg' if i % 2 == 0 else 'oa'}-{i}" for i in range(6)]
    test, info = load_rows(str(path), split="test")
    assert test["id"] == ["oa-3", "sg-2", "oa-1", "sg-0"]
    assert info["split"] == "test"


def test_dataset_dict_without_train_split_lists_the_splits(tmp_path):
    rows = arrow_rows(conversations(4))
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "d")
    )
    with pytest.raises(InputError, match=says("--split", "['test', 'validation']", "'train'")):
        load_rows(str(tmp_path / "d"))
    with pytest.raises(InputError, match=r"has splits \['test', 'validation'\], not 'dev'"):
        load_rows(str(tmp_path / "d"), split="dev")


# ---- inputs that cannot be read --------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match=says("--input-data", "nope.jsonl", "does not exist", ".jsonl")):
        load_rows(str(tmp_path / "nope.jsonl"))


def test_a_missing_data_file_given_by_a_relative_name_is_said_not_to_exist(tmp_path, monkeypatch):
    """A name that ends like a data file is a local path: not looked for on the Hub as a dataset id."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=says("--input-data: 'chats.jsonl' does not exist", "expected a .json/.jsonl/.parquet file")):
        load_rows("chats.jsonl")


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=says("--input-data", "empty", "no .jsonl/.json/.parquet files")):
        load_rows(str(tmp_path / "empty"))


def test_wrong_suffix(tmp_path):
    path = tmp_path / "chats.csv"
    path.write_text("a,b\n")
    with pytest.raises(InputError, match=says("--input-data", "chats.csv", "'.csv'", ".jsonl, .json, .parquet")):
        load_rows(str(path))


def test_mixed_parquet_and_json_directory(tmp_path):
    write_kind("parquet", conversations(4), tmp_path / "mixed")
    write_jsonl(tmp_path / "mixed" / "more.jsonl", conversations(4))
    with pytest.raises(InputError, match=says("mixes Parquet and JSON", "one kind per input")):
        load_rows(str(tmp_path / "mixed"))


def test_parquet_files_with_different_columns(tmp_path):
    rows = conversations(4)
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist([r for r in rows if "conversations" in r]), tmp_path / "pq" / "a.parquet")
    pq.write_table(pa.Table.from_pylist([r for r in rows if "messages" in r]), tmp_path / "pq" / "b.parquet")
    with pytest.raises(
        InputError,
        match=says("a.parquet", "['id', 'conversations']", "b.parquet", "['id', 'messages']"),
    ):
        load_rows(str(tmp_path / "pq"))


@pytest.mark.parametrize("spec", ["folder", "file"])
def test_a_parquet_file_cut_short_is_named(tmp_path, spec):
    """An interrupted download or copy leaves a Parquet file without its footer."""
    folder = tmp_path / "pq"
    folder.mkdir()
    rows = arrow_rows(conversations(8))
    pq.write_table(pa.Table.from_pylist(rows), folder / "train-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows), folder / "train-00001.parquet")
    whole = (folder / "train-00001.parquet").read_bytes()
    (folder / "train-00001.parquet").write_bytes(whole[: len(whole) // 2])
    path = folder if spec == "folder" else folder / "train-00001.parquet"
    with pytest.raises(InputError, match=says("--input-data", "train-00001.parquet", "not a readable Parquet file", "cut short")):
        load_rows(str(path))


def test_invalid_json_array(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"messages": []},\n  {"messages": ')
    with pytest.raises(InputError, match=says("broken.json", "not valid JSON", "JSON Lines")):
        load_rows(str(path))


def test_json_lines_whose_first_line_is_an_array_skip_that_line_alone(tmp_path):
    """No JSON file holds more after a whole first-line value: those are rows, the array among them a bad one."""
    prep = prepare_lines(tmp_path, [b"[1, 2]"] + valid_lines(4))
    assert prep.skipped == {"wrong_type": 1}
    assert sorted(prep.samples["sample_id"]) == sorted(r["id"] for r in conversations(4))


def test_a_json_array_on_one_line_is_still_an_array(tmp_path):
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(conversations(3)) + "\n\n")
    ds, _ = load_rows(str(path))
    assert [parse_raw_row(raw)["id"] for raw in ds["raw"]] == [r["id"] for r in conversations(3)]


# ---- bad rows through prepare() with the embedded target ---------------------------------

# Raises on any message that asks for it, and drops a DRAFT assistant turn once another
# message follows it (so that row is not prefix-stable); no generation blocks.
RAISING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if 'FORBIDDEN' in m['content'] %}{{ raise_exception('forbidden word') }}{% endif %}"
    "{% if m['role'] == 'assistant' %}{% if loop.last or 'DRAFT' not in m['content'] %}"
    "<|assistant|>\n{{ m['content'] ~ '<|end|>' }}\n{% endif %}"
    "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# One raw JSONL line per reason (bytes: one of them is not UTF-8).
BAD_LINES = {
    "unparseable_json": b'{"id": "bad-json", "messages": [',
    "missing_messages": b'{"id": "bad-missing", "text": "hello"}',
    "wrong_type": b'{"id": "bad-type", "messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}',
    "unknown_role": b'{"id": "bad-role", "conversations": [{"from": "human", "value": "q"}, {"from": "narrator", "value": "a"}]}',
    "empty_conversation": b'{"id": "bad-empty", "messages": []}',
    "no_assistant_turn": b'{"id": "bad-noassistant", "messages": [{"role": "user", "content": "q"}]}',
    "template_error": b'{"id": "bad-template", "messages": [{"role": "user", "content": "say FORBIDDEN"}, '
    b'{"role": "assistant", "content": "no"}]}',
    "template_not_prefix_stable": b'{"id": "bad-prefix", "messages": [{"role": "user", "content": "q"}, '
    b'{"role": "assistant", "content": "DRAFT a"}, '
    b'{"role": "user", "content": "again"}, {"role": "assistant", "content": "b"}]}',
    "no_loss_tokens_after_truncation": json.dumps(
        {"id": "bad-long", "messages": [{"role": "user", "content": "very long question " * 40}, {"role": "assistant", "content": "ok"}]}
    ).encode(),
}
INVALID_UTF8 = b'{"id": "bad-utf8", "messages": [{"role": "user", "content": "\xff\xfe"}]}'


def test_bad_lines_cover_every_reason():
    assert set(BAD_LINES) == set(SKIP_REASONS)


def valid_lines(n):
    return [json.dumps(r).encode() for r in conversations(n)]


def prepare_lines(tmp_path, lines, **overrides):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    template = tmp_path / "template.jinja"
    template.write_text(RAISING_TEMPLATE)
    settings = dict(
        target_model="tiny-llama", input_data=str(path), output_dir=str(tmp_path / "out"), seq_length=64, chat_template=str(template)
    )
    settings.update(overrides)
    return prepare(BuildConfig(**settings))


def test_bad_rows_are_skipped_and_counted_by_reason(tmp_path):
    good = valid_lines(10)
    lines = good[:3] + list(BAD_LINES.values()) + good[3:6] + [INVALID_UTF8, b"   ", b"[1, 2]"] + good[6:]
    prep = prepare_lines(tmp_path, lines)
    expected = {reason: 1 for reason in SKIP_REASONS}
    expected["unparseable_json"] = 2  # the bad JSON line and the invalid UTF-8 line
    expected["wrong_type"] = 2  # int content, and a row that is a JSON array; the blank line is not a row
    assert prep.skipped == expected
    assert len(prep.samples) == 10
    assert sorted(prep.samples["sample_id"]) == sorted(r["id"] for r in conversations(10))
    assert not (tmp_path / "out").exists()


def test_bad_rows_keep_their_ids_in_the_accounting(tmp_path):
    from tiny_targets import tiny_tokenizer

    from builder.tokenize import tokenize_rows

    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join([BAD_LINES["unknown_role"], BAD_LINES["unparseable_json"]]) + b"\n")
    rows, order = select_rows(load_rows(str(path))[0], 0, None)
    tok = tiny_tokenizer()
    out = tokenize_rows(rows, order, tok, tok.chat_template, 64, 1)
    by_index = {r["source_index"]: r for r in out}
    assert by_index[0]["sample_id"] == "bad-role" and by_index[0]["skip_reason"] == "unknown_role"
    assert by_index[1]["sample_id"] == "1" and by_index[1]["skip_reason"] == "unparseable_json"  # no id to read


@pytest.mark.parametrize("reason", SKIP_REASONS)
def test_strict_names_the_row_and_reason(tmp_path, reason):
    lines = valid_lines(3)
    lines.insert(2, BAD_LINES[reason])
    row_id = "2" if reason == "unparseable_json" else json.loads(BAD_LINES[reason])["id"]
    with pytest.raises(BadRowError, match=says("--strict", "input row 2", f"'{row_id}'", reason, "without --strict")):
        prepare_lines(tmp_path, lines, strict=True)
    # Without --strict the same input prepares, skipping that one row.
    prep = prepare_lines(tmp_path, lines)
    assert prep.skipped == {reason: 1} and len(prep.samples) == 3


def test_strict_stops_before_the_model_loads(tmp_path, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("model weights loaded")

    monkeypatch.setattr(target_mod, "load_model", no_weights)
    monkeypatch.setattr(placement_mod, "load_model", no_weights)
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(valid_lines(3) + [BAD_LINES["no_assistant_turn"]]) + b"\n")
    cfg = BuildConfig(target_model="tiny-llama", input_data=str(path), output_dir=str(tmp_path / "out"), strict=True)
    with pytest.raises(BadRowError, match=says("input row 3", "'bad-noassistant'", "no_assistant_turn")):
        build(cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_valid_samples_match_direct_encoding(tmp_path):
    from builder.tokenize import encode_messages

    prep = prepare_lines(tmp_path, valid_lines(6), max_samples=4, shuffle_seed=5)
    template = (tmp_path / "template.jinja").read_text()
    rows = conversations(6)
    order = np.random.default_rng(5).permutation(6)[:4]
    assert prep.samples["source_index"] == [int(i) for i in order]
    for record, i in zip(prep.samples, order):
        ids, mask = encode_messages(normalize_row(rows[i]), prep.tokenizer, template, 64)
        assert record["input_ids"] == ids and record["loss_mask"] == mask


# ---- paths datasets would glob --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["parquet", "jsonl_directory"])
@pytest.mark.parametrize("name, found", [("chats[1]", "["), ("chats$PART", "$")])
def test_an_input_path_datasets_would_read_as_a_pattern_is_refused(tmp_path, monkeypatch, kind, name, found):
    """`datasets` globs the paths it is given, and expands environment variables in the files it reads:
    data under `chats[1]`, or `chats$PART` with PART=1, would be read from a `chats1` beside it."""
    monkeypatch.setenv("PART", "1")
    path = write_kind(kind, conversations(), tmp_path / name)
    write_kind(kind, conversations(4), tmp_path / "chats1")
    with pytest.raises(
        InputError,
        match=rf"--input-data: the path '.*{re.escape(name)}.*' contains '{re.escape(found)}', which `datasets` reads as a file "
        "pattern, a chained URL or an environment variable",
    ):
        load_rows(str(path))


def test_a_json_lines_file_under_such_a_path_is_read_as_it_is(tmp_path):
    """A JSON file is read by this project, not globbed: its rows are its own."""
    path = write_kind("jsonl", conversations(), tmp_path / "chats[1]")
    write_kind("jsonl", conversations(4), tmp_path / "chats1")
    ds, _ = load_rows(str(path))
    assert [row_messages(ds, i) for i in range(len(ds))] == [
        row_messages(load_rows(str(write_kind("jsonl", conversations(), tmp_path / "plain")))[0], i) for i in range(20)
    ]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_file_rewritten_with_its_size_and_mtime_is_read_anew(tmp_path, kind):
    """`cp -p`, `rsync -a` and `tar x` keep a file's modification time over new bytes: the rows must
    still come from the bytes the recorded content hash describes."""
    import os

    first = conversations(6)
    second = json.loads(json.dumps(first).replace("squared", "SQUARED"))  # the same lengths
    path = write_kind(kind, first, tmp_path / "input")
    before, before_info = load_rows(str(path))
    stat = path.stat()
    write_kind(kind, second, tmp_path / "input")
    assert path.stat().st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after, after_info = load_rows(str(path))
    expected, _ = load_rows(str(write_kind(kind, second, tmp_path / "fresh")))
    assert after_info["content_hash"] != before_info["content_hash"]
    assert [row_messages(after, i) for i in range(6)] == [row_messages(expected, i) for i in range(6)]
    assert [row_messages(after, i) for i in range(6)] != [row_messages(before, i) for i in range(6)]


def test_a_folder_with_compressed_data_files_is_refused(tmp_path):
    """`datasets.load_dataset(folder)` would read `part-1.jsonl.gz` too: leaving it out would lose its rows unseen."""
    import gzip

    rows = conversations(6)
    write_jsonl(tmp_path / "chats" / "part-0.jsonl", rows[:3])
    (tmp_path / "chats" / "part-1.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows[3:]).encode()))
    with pytest.raises(
        InputError, match=r"--input-data: part-1\.jsonl\.gz in .*chats is compressed; expected \.jsonl/\.json/\.parquet files"
    ):
        load_rows(str(tmp_path / "chats"))


def test_a_pretty_printed_json_object_is_refused_as_one_object(tmp_path):
    path = tmp_path / "chats.json"
    path.write_text(json.dumps({"version": 1, "data": conversations(3)}, indent=2))
    with pytest.raises(InputError, match=r"chats\.json is one JSON object spread over several lines, not rows; expected JSON Lines"):
        load_rows(str(path))


def test_a_release_that_reads_json_otherwise_reads_the_same_file_anew(tmp_path, monkeypatch):
    """`datasets` knows the JSON reader by its name, not its code: rows (and their tokens) cached by a
    release that read the same bytes otherwise (here, one that kept a leading byte-order mark) are not
    taken by this one."""
    good = valid_lines(4)
    lines = [inputs_mod.UTF8_BOM + good[0], *good[1:]]
    with monkeypatch.context() as earlier:
        earlier.setattr(inputs_mod, "UTF8_BOM", b"\0(an earlier reader kept the mark)")
        earlier.setattr(inputs_mod, "READER_CODE_VERSION", "earlier", raising=False)
        assert prepare_lines(tmp_path, lines).skipped == {"unparseable_json": 1}
    prep = prepare_lines(tmp_path, lines)
    assert prep.skipped == {} and len(prep.samples) == 4


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_the_rows_fingerprint_follows_the_reading_code_and_the_recorded_hash_does_not(tmp_path, monkeypatch, kind):
    path = write_kind(kind, conversations(6), tmp_path / "input")
    rows, info = load_rows(str(path))
    monkeypatch.setattr(inputs_mod, "READER_CODE_VERSION", "another release", raising=False)
    other_rows, other_info = load_rows(str(path))
    assert other_rows._fingerprint != rows._fingerprint
    assert other_info["content_hash"] == info["content_hash"]  # the input is the same: a build of it still resumes


def counted_reads(monkeypatch) -> list[int]:
    """The sizes of every read through the files builder.inputs opens from now on."""
    sizes = []

    class Counted:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, size=-1):
            data = self.f.read(size)
            sizes.append(len(data))
            return data

        def readline(self, size=-1):
            data = self.f.readline(size)
            sizes.append(len(data))
            return data

        def __iter__(self):
            for line in self.f:
                sizes.append(len(line))
                yield line

    monkeypatch.setattr(inputs_mod, "open", lambda *args, **kwargs: Counted(open(*args, **kwargs)), raising=False)
    return sizes


HEAD_BYTES = 1 << 11  # the head that decides a JSON file's form, made small here for files of a few rows


def test_json_lines_whose_first_line_was_cut_short_are_rows_told_from_the_head_alone(tmp_path, monkeypatch):
    """An interrupted append or a cut head leaves a first line that is no JSON: the file is still JSON
    Lines, that line one skipped row, and telling so reads the head, never the whole file."""
    good = valid_lines(40)
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join([good[0][:25], *good]) + b"\n")
    assert path.stat().st_size > 2 * HEAD_BYTES
    monkeypatch.setattr(inputs_mod, "FORM_HEAD_BYTES", HEAD_BYTES, raising=False)
    sizes = counted_reads(monkeypatch)
    assert not inputs_mod._is_one_json_object(str(path))
    assert 0 < sum(sizes) <= HEAD_BYTES + 1
    monkeypatch.undo()
    monkeypatch.setattr(inputs_mod, "FORM_HEAD_BYTES", HEAD_BYTES, raising=False)
    prep = prepare_lines(tmp_path, [good[0][:25], *good])
    assert prep.skipped == {"unparseable_json": 1} and len(prep.samples) == 40


def test_a_pretty_printed_json_object_larger_than_the_head_is_refused_from_the_head(tmp_path, monkeypatch):
    path = tmp_path / "chats.json"
    path.write_text(json.dumps({"version": 1, "data": conversations(40)}, indent=2, ensure_ascii=False))
    assert path.stat().st_size > 2 * HEAD_BYTES
    monkeypatch.setattr(inputs_mod, "FORM_HEAD_BYTES", HEAD_BYTES, raising=False)
    sizes = counted_reads(monkeypatch)
    assert inputs_mod._is_one_json_object(str(path))
    assert sum(sizes) <= HEAD_BYTES + 1
    with pytest.raises(InputError, match=r"chats\.json is one JSON object spread over several lines, not rows; expected JSON Lines"):
        load_rows(str(path))


@pytest.mark.parametrize("cut_after", [b'{"messages": [{"role": "user", "content": "hi"},', b'{"messages":'])
def test_json_lines_whose_cut_first_line_is_followed_by_a_row_longer_than_the_head_are_rows(tmp_path, monkeypatch, cut_after):
    """The cut first line and the start of the long row after it can read as the start of one JSON
    value: a row beginning at a line's start still tells JSON Lines."""
    long_row = json.dumps({"messages": [{"role": "user", "content": "x" * (3 * HEAD_BYTES)}, {"role": "assistant", "content": "y"}]})
    lines = [cut_after, long_row.encode(), *valid_lines(20)]
    monkeypatch.setattr(inputs_mod, "FORM_HEAD_BYTES", HEAD_BYTES, raising=False)
    (tmp_path / "rows.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert not inputs_mod._is_one_json_object(str(tmp_path / "rows.jsonl"))
    rows, _ = load_rows(str(tmp_path / "rows.jsonl"))
    assert len(rows) == 22  # the cut line is a row to skip, not a refusal


@pytest.mark.parametrize("indent", [2, 0])
def test_a_pretty_printed_object_whose_head_holds_an_empty_nested_object_is_refused(tmp_path, monkeypatch, indent):
    """A nested `{}` or `{` on a line of its own is part of the object, not a row."""
    path = tmp_path / "chats.json"
    path.write_text(json.dumps({"meta": {"filters": [{}]}, "data": conversations(40)}, indent=indent, ensure_ascii=False))
    assert path.stat().st_size > 2 * HEAD_BYTES
    monkeypatch.setattr(inputs_mod, "FORM_HEAD_BYTES", HEAD_BYTES, raising=False)
    with pytest.raises(InputError, match=r"chats\.json is one JSON object spread over several lines, not rows; expected JSON Lines"):
        load_rows(str(path))


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_file_rewritten_with_its_mtime_is_tokenized_anew(tmp_path, kind):
    """The tokenizing map's cache follows the bytes the recorded content hash describes, not the
    path and modification time `datasets` fingerprints Parquet files by."""
    import os

    first = conversations(6)
    second = json.loads(json.dumps(first).replace("squared", "SQUARED"))

    def tokens(path):
        cfg = BuildConfig(target_model="tiny-llama", input_data=str(path), output_dir=str(tmp_path / "out"), seq_length=64)
        return list(prepare(cfg).samples["input_ids"])

    path = write_kind(kind, first, tmp_path / "input")
    before = tokens(path)
    stat = path.stat()
    write_kind(kind, second, tmp_path / "input")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    expected = tokens(write_kind(kind, second, tmp_path / "fresh"))
    assert expected != before
    assert tokens(path) == expected


def test_a_hub_dataset_with_a_malformed_line_says_to_read_it_locally(hub):
    """`datasets` fails the whole load of a Hub dataset on one bad JSON line; a local copy is read row by row."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("tester/chats-one-bad-line", repo_type="dataset")
    lines = valid_lines(3)
    lines.insert(1, BAD_LINES["unparseable_json"])
    api.upload_file(
        path_or_fileobj=b"\n".join(lines) + b"\n", path_in_repo="train.jsonl", repo_id="tester/chats-one-bad-line", repo_type="dataset"
    )
    with pytest.raises(
        InputError,
        match=says(
            "--input-data: `datasets` cannot load Hub dataset 'tester/chats-one-bad-line'",
            "JSON parse error",
            "hf download tester/chats-one-bad-line --repo-type dataset --local-dir",
            "skipped and counted",
        ),
    ):
        load_rows("tester/chats-one-bad-line")


def test_a_hub_dataset_records_the_configuration_it_was_read_with(hub):
    """Without --input-config, `datasets` reads the dataset's default: named or not, the same one is recorded."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("tester/chats-one-config", repo_type="dataset")
    api.upload_file(
        path_or_fileobj=b"\n".join(valid_lines(3)) + b"\n",
        path_in_repo="train.jsonl",
        repo_id="tester/chats-one-config",
        repo_type="dataset",
    )
    _, left = load_rows("tester/chats-one-config")
    _, named = load_rows("tester/chats-one-config", config="default")
    assert left["config"] == named["config"] == "default"
    assert left["content_hash"] == named["content_hash"]


@pytest.fixture
def hub_with_two_configs(hub):
    """A Hub dataset whose card has configurations `en` and `fr`, neither the default."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=TOKEN)
    repo_id = "tester/chats-two-configs"
    api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
    card = "---\nconfigs:\n" + "".join(
        f"- config_name: {name}\n  data_files:\n  - split: train\n    path: {name}/*.jsonl\n" for name in ("en", "fr")
    )
    api.upload_file(path_or_fileobj=(card + "---\n").encode(), path_in_repo="README.md", repo_id=repo_id, repo_type="dataset")
    for name in ("en", "fr"):
        lines = b"\n".join(valid_lines(2)) + b"\n"
        api.upload_file(path_or_fileobj=lines, path_in_repo=f"{name}/chats.jsonl", repo_id=repo_id, repo_type="dataset")
    return repo_id


@pytest.mark.parametrize(
    "config, facts",
    [
        ("de", ["has configurations ['en', 'fr'], not 'de'", "pass --input-config with one of them"]),
        (None, ["has configurations ['en', 'fr'] and no default", "pass --input-config with one of them"]),
    ],
)
def test_a_hub_configuration_that_cannot_be_read_is_an_input_config_error(hub_with_two_configs, config, facts):
    """As for a local folder's card: the dataset was reached, so the error is the configuration, not the path or the network."""
    with pytest.raises(InputError, match=says("--input-config", repr(hub_with_two_configs), *facts)) as raised:
        load_rows(hub_with_two_configs, config=config)
    assert "not a local path" not in str(raised.value) and "network" not in str(raised.value)
    ds, info = load_rows(hub_with_two_configs, config="fr")
    assert len(ds) == 2 and info["config"] == "fr"
