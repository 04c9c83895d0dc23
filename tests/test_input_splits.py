"""Local inputs resolve into splits as `datasets.load_dataset(folder)` does; --split picks one,
--input-config is refused where it cannot apply, and file quirks (a byte-order mark, a lone
surrogate escape, Parquet parts of differing nested schemas) cost no rows."""

import json
import logging

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import says

from builder.conversations import parse_raw_row
from builder.errors import InputError
from builder.inputs import load_rows


def chat(row_id, question="q", answer="a"):
    return {"id": row_id, "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ids(ds):
    """Row ids of a loaded input, whether its rows are raw JSON lines or columns."""
    if ds.column_names == ["raw"]:
        return [parse_raw_row(raw)["id"] for raw in ds["raw"]]
    return ds["id"]


def split_rows(split, n):
    return [chat(f"{split}-{i}", f"q{i}", f"a{i}") for i in range(n)]


# ---- folders with splits ---------------------------------------------------------------


@pytest.fixture
def hub_download(tmp_path):
    """The layout of a Hub dataset repo downloaded with `hf download --local-dir`."""
    root = tmp_path / "my-dataset"
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(split_rows("train", 6)), root / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(split_rows("test", 3)), root / "data" / "test-00000-of-00001.parquet")
    (root / "README.md").write_text("# my dataset\n")
    return root


def test_sharded_split_files_are_separate_splits(hub_download):
    train, info = load_rows(str(hub_download))
    assert ids(train) == [f"train-{i}" for i in range(6)]
    assert info["split"] == "train" and info["kind"] == "files"
    test, test_info = load_rows(str(hub_download), split="test")
    assert ids(test) == ["test-0", "test-1", "test-2"]
    assert test_info["split"] == "test"
    assert test_info["content_hash"] != info["content_hash"]


def test_absent_split_of_a_folder_lists_the_splits(hub_download):
    with pytest.raises(InputError, match=says("--split", "['test', 'train']", "not 'validation'", "pass --split with one of them")):
        load_rows(str(hub_download), split="validation")


def test_split_names_in_file_names_are_separate_splits(tmp_path):
    """What SpecForge's prepare_data.py --split-eval writes: <name>_train.jsonl beside <name>_test.jsonl."""
    write_jsonl(tmp_path / "sharegpt" / "sharegpt_train.jsonl", split_rows("train", 6))
    write_jsonl(tmp_path / "sharegpt" / "sharegpt_test.jsonl", split_rows("test", 2))
    train, info = load_rows(str(tmp_path / "sharegpt"))
    assert ids(train) == [f"train-{i}" for i in range(6)]
    assert info["split"] == "train"
    test, _ = load_rows(str(tmp_path / "sharegpt"), split="test")
    assert ids(test) == ["test-0", "test-1"]


def test_split_folders_are_separate_splits(tmp_path):
    write_jsonl(tmp_path / "d" / "train" / "part-0.jsonl", split_rows("train", 2))
    write_jsonl(tmp_path / "d" / "train" / "part-1.jsonl", split_rows("train", 4)[2:])
    write_jsonl(tmp_path / "d" / "validation" / "part-0.jsonl", split_rows("validation", 1))
    train, _ = load_rows(str(tmp_path / "d"))
    assert ids(train) == ["train-0", "train-1", "train-2", "train-3"]
    validation, _ = load_rows(str(tmp_path / "d"), split="validation")
    assert ids(validation) == ["validation-0"]


def test_folder_without_split_names_is_one_train_split(tmp_path):
    write_jsonl(tmp_path / "d" / "chats-a.jsonl", [chat("a0"), chat("a1")])
    write_jsonl(tmp_path / "d" / "more" / "chats-b.jsonl", [chat("b0")])
    ds, info = load_rows(str(tmp_path / "d"))
    assert ids(ds) == ["a0", "a1", "b0"]
    assert info["split"] == "train"
    with pytest.raises(InputError, match=says("--split", "['train']", "not 'test'")):
        load_rows(str(tmp_path / "d"), split="test")


def test_hidden_folders_are_not_read(tmp_path):
    """A data folder opened in Jupyter holds older copies under .ipynb_checkpoints/."""
    rows = [chat(f"r{i}") for i in range(3)]
    write_jsonl(tmp_path / "d" / "chats.jsonl", rows)
    write_jsonl(tmp_path / "d" / ".ipynb_checkpoints" / "chats-checkpoint.jsonl", rows[:2])
    write_jsonl(tmp_path / "d" / ".cache" / "train.jsonl", [chat("hidden")])
    ds, _ = load_rows(str(tmp_path / "d"))
    assert ids(ds) == ["r0", "r1", "r2"]


def test_files_outside_every_split_are_named_in_a_warning(tmp_path, caplog):
    write_jsonl(tmp_path / "d" / "train.jsonl", [chat("t0")])
    write_jsonl(tmp_path / "d" / "extra.jsonl", [chat("x0")])
    with caplog.at_level(logging.WARNING, logger="builder.inputs"):
        ds, _ = load_rows(str(tmp_path / "d"))
    assert ids(ds) == ["t0"]
    assert "1 data file(s) match no split (extra.jsonl) and are not read" in caplog.text


def test_a_compressed_file_outside_every_split_is_named_and_not_refused(tmp_path, caplog):
    """An old archive beside the split files is never read: it is named in the warning, and the folder is read."""
    import gzip

    write_jsonl(tmp_path / "d" / "train.jsonl", split_rows("train", 3))
    write_jsonl(tmp_path / "d" / "test.jsonl", split_rows("test", 2))
    (tmp_path / "d" / "archive").mkdir()
    (tmp_path / "d" / "archive" / "old-2023.jsonl.gz").write_bytes(gzip.compress(json.dumps(chat("old")).encode() + b"\n"))
    with caplog.at_level(logging.WARNING, logger="builder.inputs"):
        train, _ = load_rows(str(tmp_path / "d"))
    assert ids(train) == ["train-0", "train-1", "train-2"]
    assert "1 data file(s) match no split (archive/old-2023.jsonl.gz, compressed) and are not read" in caplog.text
    test, _ = load_rows(str(tmp_path / "d"), split="test")
    assert ids(test) == ["test-0", "test-1"]


@pytest.mark.parametrize("beside", ["train.py", "test.py", "notes_test.txt", "eval/plots.png"])
def test_a_file_that_is_no_data_names_no_split(tmp_path, beside):
    """`datasets` names splits from any file; a script or note beside the data named a split that held none of it."""
    write_jsonl(tmp_path / "d" / "chats.jsonl", [chat("a0"), chat("a1")])
    write_jsonl(tmp_path / "d" / "more.jsonl", [chat("b0")])
    (tmp_path / "d" / beside).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "d" / beside).write_text("print('hello')\n")
    ds, info = load_rows(str(tmp_path / "d"))
    assert ids(ds) == ["a0", "a1", "b0"]
    assert info["split"] == "train"


def test_split_names_come_from_the_data_files_beside_a_folder_and_a_file_named_like_splits(tmp_path):
    write_jsonl(tmp_path / "d" / "chats_train.jsonl", split_rows("train", 2))
    write_jsonl(tmp_path / "d" / "chats_test.jsonl", split_rows("test", 1))
    (tmp_path / "d" / "validation").mkdir()
    (tmp_path / "d" / "validation" / "loss.png").write_bytes(b"\x89PNG")  # a folder's name goes before file names
    (tmp_path / "d" / "make_train.py").write_text("pass\n")
    assert ids(load_rows(str(tmp_path / "d"))[0]) == ["train-0", "train-1"]
    assert ids(load_rows(str(tmp_path / "d"), split="test")[0]) == ["test-0"]
    with pytest.raises(InputError, match=says("--split", "['test', 'train']", "not 'validation'")):
        load_rows(str(tmp_path / "d"), split="validation")


def test_dataset_info_json_does_not_make_a_saved_dataset(tmp_path):
    """LLaMA-Factory's data folders hold a dataset_info.json that describes the files beside it."""
    write_jsonl(tmp_path / "data" / "chats.jsonl", [chat(f"r{i}") for i in range(3)])
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"chats": {"file_name": "chats.jsonl", "formatting": "sharegpt"}}))
    ds, info = load_rows(str(tmp_path / "data"))
    assert ids(ds) == ["r0", "r1", "r2"]
    assert info["kind"] == "files"


# ---- --split and --input-config where they cannot apply ----------------------------------


def test_single_file_is_the_train_split(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [chat("r0")])
    ds, info = load_rows(str(path), split="train")
    assert ids(ds) == ["r0"] and info["split"] == "train"
    with pytest.raises(InputError, match=says("--split", "chats.jsonl", "['train']", "not 'test'")):
        load_rows(str(path), split="test")


def test_saved_dataset_has_one_split(tmp_path):
    datasets.Dataset.from_list([chat(f"r{i}") for i in range(3)]).save_to_disk(str(tmp_path / "saved"))
    ds, info = load_rows(str(tmp_path / "saved"), split="train")
    assert ids(ds) == ["r0", "r1", "r2"] and info["split"] == "train"
    with pytest.raises(InputError, match=says("--split", "['train']", "not 'validation'")):
        load_rows(str(tmp_path / "saved"), split="validation")


@pytest.mark.parametrize(
    "damage, found",
    [
        ("arrow_file_gone", "FileNotFoundError"),
        ("state_cut_short", "JSONDecodeError"),
        ("arrow_file_cut_short", "ArrowInvalid"),
    ],
)
def test_a_damaged_saved_dataset_is_an_input_error(tmp_path, damage, found):
    """A saved dataset missing a file or holding one cut short (an interrupted copy) is named, with the fix."""
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([chat(f"r{i}") for i in range(3)]).save_to_disk(str(saved))
    arrow = next(saved.glob("*.arrow"))
    if damage == "arrow_file_gone":
        arrow.unlink()
    elif damage == "state_cut_short":
        (saved / "state.json").write_text("{")
    else:
        arrow.write_bytes(arrow.read_bytes()[:100])
    with pytest.raises(InputError, match=says("--input-data", str(saved), "saved dataset", found, "save_to_disk")):
        load_rows(str(saved))


@pytest.mark.parametrize("name", ["validation", "train[:2]"])
def test_saved_split_keeps_its_name(tmp_path, name):
    """A split saved by itself (`load_dataset(..., split=...)` then `save_to_disk`) is read whole, under its name."""
    datasets.Dataset.from_list([chat("v0"), chat("v1")], split=datasets.NamedSplit(name)).save_to_disk(str(tmp_path / "saved"))
    for wanted in (None, name):
        ds, info = load_rows(str(tmp_path / "saved"), split=wanted)
        assert ids(ds) == ["v0", "v1"] and info["split"] == name
    with pytest.raises(InputError, match=says("--split", f"[{name!r}]", "not 'test'")):
        load_rows(str(tmp_path / "saved"), split="test")


@pytest.mark.parametrize("kind", ["file", "folder", "saved"])
def test_input_config_is_refused_for_local_inputs(tmp_path, kind):
    path = write_jsonl(tmp_path / "d" / "chats.jsonl", [chat("r0")])
    if kind == "folder":
        path = path.parent
    elif kind == "saved":
        path = tmp_path / "saved"
        datasets.Dataset.from_list([chat("r0")]).save_to_disk(str(path))
    with pytest.raises(InputError, match=says("--input-config", "'sharegpt'", "local path", "drop --input-config")):
        load_rows(str(path), config="sharegpt")


@pytest.mark.parametrize("spec", ["", "  "])
def test_empty_input_data_is_refused(tmp_path, monkeypatch, spec):
    write_jsonl(tmp_path / "chats.jsonl", [chat("r0")])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=says("--input-data is empty", "expected a .json/.jsonl/.parquet file")):
        load_rows(spec)


# ---- file quirks ---------------------------------------------------------------------------


def test_byte_order_mark_costs_no_row(tmp_path):
    rows = [chat(f"r{i}") for i in range(3)]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8-sig")
    array = tmp_path / "bom_array.json"
    array.write_text(json.dumps(rows, indent=1), encoding="utf-8-sig")
    assert jsonl.read_bytes().startswith(b"\xef\xbb\xbf") and array.read_bytes().startswith(b"\xef\xbb\xbf")
    for path in (jsonl, array):
        ds, _ = load_rows(str(path))
        assert ids(ds) == ["r0", "r1", "r2"]


LONE_SURROGATE_LINE = '{"id": "bad", "messages": [{"role": "user", "content": "smile \\ud83d"}, {"role": "assistant", "content": "ok"}]}'


def test_lone_surrogate_in_a_json_array_is_one_row_like_in_jsonl(tmp_path):
    """Half an emoji ("\\ud83d") is valid JSON text; the row holding it is judged alone, in either file kind."""
    good = [chat(f"r{i}") for i in range(3)]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in good) + LONE_SURROGATE_LINE + "\n")
    array = tmp_path / "rows.json"
    array.write_text("[" + ",".join(json.dumps(r) for r in good) + "," + LONE_SURROGATE_LINE + "]")
    from_jsonl, _ = load_rows(str(jsonl))
    from_array, _ = load_rows(str(array))
    assert ids(from_array) == ids(from_jsonl) == ["r0", "r1", "r2", "bad"]
    assert [parse_raw_row(raw) for raw in from_array["raw"]] == [parse_raw_row(raw) for raw in from_jsonl["raw"]]


def test_non_ascii_array_rows_stay_readable(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([chat("r0", "¿qué tal? 😀")], ensure_ascii=False), encoding="utf-8")
    ds, _ = load_rows(str(path))
    assert ds["raw"] == [json.dumps(chat("r0", "¿qué tal? 😀"), ensure_ascii=False).encode()]


def parquet_parts(folder, parts):
    """Each part written by itself, as chunked writers do: pyarrow infers each file's schema from its rows."""
    folder.mkdir()
    for i, rows in enumerate(parts):
        pq.write_table(pa.Table.from_pylist(rows), folder / f"part-{i}.parquet")
    return folder


def test_parquet_parts_whose_nested_structs_differ_load_as_one_table(tmp_path):
    tool_turns = [
        {"role": "user", "content": "rain?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "content": "yes"},
        {"role": "assistant", "content": "Yes."},
    ]
    folder = parquet_parts(tmp_path / "pq", [[chat("p0", "hi", "yo")], [{"id": "p1", "messages": tool_turns}]])
    ds, _ = load_rows(str(folder))
    assert ds["id"] == ["p0", "p1"]
    assert ds[0]["messages"] == [
        {"role": "user", "content": "hi", "tool_calls": None},
        {"role": "assistant", "content": "yo", "tool_calls": None},
    ]
    assert ds[1]["messages"][1]["tool_calls"] == [{"type": "function", "function": {"name": "w", "arguments": "{}"}}]
    assert [m["content"] for m in ds[1]["messages"]] == ["rain?", None, "yes", "Yes."]


def test_parquet_parts_whose_types_conflict_name_the_files(tmp_path):
    as_number = {"id": "p1", "messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": 6}]}
    folder = parquet_parts(tmp_path / "pq", [[chat("p0")], [as_number]])
    with pytest.raises(InputError, match=says("--input-data", "part-0.parquet", "part-1.parquet", "one schema", "JSON Lines")):
        load_rows(str(folder))


# ---- configurations of a downloaded Hub dataset ---------------------------------------------

CARD = """---
configs:
- config_name: clean
  default: true
  data_files:
  - split: train
    path: clean/train-*.jsonl
  - split: test
    path: clean/test-*.jsonl
- config_name: raw
  data_files: raw/*.jsonl
---
# chats
"""


@pytest.fixture
def configured(tmp_path):
    """A Hub dataset downloaded with `hf download --local-dir`: its card's `configs` say which files each holds."""
    root = tmp_path / "chats"
    write_jsonl(root / "clean" / "train-0.jsonl", [chat("clean-train-0"), chat("clean-train-1")])
    write_jsonl(root / "clean" / "test-0.jsonl", [chat("clean-test-0")])
    write_jsonl(root / "raw" / "dump-0.jsonl", [chat("raw-0")])
    write_jsonl(root / "raw" / "dump-1.jsonl", [chat("raw-1")])
    (root / "README.md").write_text(CARD)
    return root


def test_card_configs_choose_the_files(configured):
    ds, info = load_rows(str(configured))
    assert ids(ds) == ["clean-train-0", "clean-train-1"]
    assert info["split"] == "train"
    test, _ = load_rows(str(configured), split="test")
    assert ids(test) == ["clean-test-0"]
    raw, _ = load_rows(str(configured), config="raw")
    assert ids(raw) == ["raw-0", "raw-1"]
    with pytest.raises(InputError, match=says("--split", "['train']", "not 'test'")):
        load_rows(str(configured), config="raw", split="test")


def test_the_configuration_read_is_recorded_by_name_whether_given_or_the_default(configured):
    assert load_rows(str(configured))[1]["config"] == load_rows(str(configured), config="clean")[1]["config"] == "clean"
    assert load_rows(str(configured), config="raw")[1]["config"] == "raw"
    (configured / "README.md").write_text("# chats\n")
    assert load_rows(str(configured))[1]["config"] is None  # no configurations


def test_absent_card_config_lists_the_configs(configured):
    with pytest.raises(InputError, match=says("--input-config", "['clean', 'raw']", "not 'other'", "pass --input-config")):
        load_rows(str(configured), config="other")


def test_card_configs_without_a_default_need_input_config(configured):
    (configured / "README.md").write_text(CARD.replace("  default: true\n", ""))
    with pytest.raises(InputError, match=says("--input-config", "['clean', 'raw']", "no default", "pass --input-config")):
        load_rows(str(configured))
    ds, _ = load_rows(str(configured), config="clean")
    assert ids(ds) == ["clean-train-0", "clean-train-1"]


def test_card_without_configs_splits_by_file_names(configured):
    (configured / "README.md").write_text("# chats\n")
    ds, _ = load_rows(str(configured))
    assert ids(ds) == ["clean-train-0", "clean-train-1"]
    with pytest.raises(InputError, match=says("--input-config", "'raw'", "local path", "drop --input-config")):
        load_rows(str(configured), config="raw")


def test_card_configs_that_match_none_of_the_data_files_say_so(configured):
    """Not that the folder holds no data files: it does, and the card names what the splits are."""
    (configured / "README.md").write_text(
        CARD.replace("clean/train-*.jsonl", "cleaned/train-*.jsonl").replace("clean/test-*", "cleaned/test-*")
    )
    with pytest.raises(
        InputError,
        match=says(
            "--input-data",
            "holds data files (clean/test-0.jsonl, clean/train-0.jsonl",
            "configuration 'clean'",
            "cleaned/train-*.jsonl",
            "README.md",
        ),
    ):
        load_rows(str(configured))


def test_damaged_parquet_part_names_the_files(tmp_path):
    folder = parquet_parts(tmp_path / "pq", [[chat(f"p{i}", "q" * 50) for i in range(20)], [chat("p20")]])
    damaged = bytearray((folder / "part-0.parquet").read_bytes())
    damaged[4:200] = b"\xff" * 196  # the first page, not the footer that holds the schema
    (folder / "part-0.parquet").write_bytes(bytes(damaged))
    with pytest.raises(InputError, match=says("--input-data", "part-0.parquet, part-1.parquet", "damaged", "JSON Lines")):
        load_rows(str(folder))


def test_unreadable_card_configs_are_an_input_error(configured):
    (configured / "README.md").write_text("---\nconfigs: clean\n---\n")
    with pytest.raises(InputError, match=says("--input-data", "README.md", "configs", "fix it, or remove the README.md")):
        load_rows(str(configured))


def test_the_train_split_of_local_files_is_recorded_as_before_splits_were_read():
    """Builds begun when local inputs recorded no split still resume: their identity is unchanged."""
    from builder.prepare import recorded_split

    assert recorded_split({"kind": "files", "split": "train"}) is None
    assert recorded_split({"kind": "saved_dataset", "split": "train"}) is None
    assert recorded_split({"kind": "files", "split": "test"}) == "test"
    assert recorded_split({"kind": "hub", "split": "train"}) == "train"


@pytest.mark.parametrize("kind", ["numpy", "torch", "pandas"])
def test_a_dataset_saved_with_a_format_is_read_as_python_rows(tmp_path, kind):
    rows = [chat(f"r{i}", question=f"question {i}") for i in range(3)]
    plain = datasets.Dataset.from_list(rows)
    formatted = datasets.Dataset.from_list(rows)
    formatted.set_format(kind)  # saved with the dataset, and given back by load_from_disk
    formatted.save_to_disk(str(tmp_path / "saved"))
    ds, info = load_rows(str(tmp_path / "saved"))
    assert [ds[i] for i in range(3)] == [plain[i] for i in range(3)]
    assert info["content_hash"] == datasets.load_from_disk(str(tmp_path / "saved"))._fingerprint


def test_a_build_from_a_dataset_saved_with_the_torch_format_equals_one_from_plain_rows(tmp_path):
    import torch
    from helpers import decoded_rows, small_config

    from builder.pipeline import build

    rows = [chat(f"r{i}", question=f"question {i} about the sea", answer=f"answer {i} about the sky") for i in range(4)]
    caches = {}
    for kind in (None, "torch"):
        saved = datasets.Dataset.from_list(rows)
        if kind:
            saved.set_format(kind)
        saved.save_to_disk(str(tmp_path / f"saved-{kind}"))
        caches[kind] = decoded_rows(
            build(small_config(tmp_path / f"cache-{kind}", input_data=str(tmp_path / f"saved-{kind}")), progress=False).output_dir
        )
    assert len(caches[None]) == len(caches["torch"]) == 4
    for got, want in zip(caches["torch"], caches[None]):
        assert got["sample_id"] == want["sample_id"]
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["aux_hidden_states"], want["aux_hidden_states"])


ORDERED_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path:
    - part-b.jsonl
    - part-a.jsonl
---
"""


@pytest.mark.parametrize("layout", ["sibling folders", "card order"])
def test_a_folder_s_files_are_read_in_the_order_datasets_reads_them(tmp_path, layout):
    """The rows' positions (`source_index`, the --max-samples draw) are those `datasets`, and so a build of
    the same files from the Hub, gives them: whole path strings sorted (`en-gb/` before `en/`), and the
    card's patterns in the order listed."""
    root = tmp_path / "d"
    if layout == "sibling folders":
        for folder in ("en", "en-gb", "en/z"):
            write_jsonl(root / "data" / folder / "part.jsonl", [chat(f"{folder}-0"), chat(f"{folder}-1")])
    else:
        write_jsonl(root / "part-a.jsonl", [chat("a0")])
        write_jsonl(root / "part-b.jsonl", [chat("b0")])
        (root / "README.md").write_text(ORDERED_CARD)
    expected = datasets.load_dataset(str(root), split="train", cache_dir=str(tmp_path / "hf"))["id"]
    assert ids(load_rows(str(root))[0]) == expected
    assert expected[0] in ("en-gb-0", "b0")  # the order differs from sorting the paths part by part


def test_a_card_naming_a_missing_file_is_refused_as_datasets_refuses_it(configured, tmp_path):
    """A file the card names outright and the folder lacks is not skipped: the build would read fewer rows
    than the card says the split holds."""
    (configured / "README.md").write_text(CARD.replace("clean/train-*.jsonl", "[clean/train-0.jsonl, clean/train-1.jsonl]"))
    with pytest.raises(FileNotFoundError):
        datasets.load_dataset(str(configured), split="train", cache_dir=str(tmp_path / "hf"))
    with pytest.raises(
        InputError, match=says("--input-data", "README.md", "'clean/train-1.jsonl'", "no such file", "restore it, or fix data_files")
    ):
        load_rows(str(configured))
    write_jsonl(configured / "clean" / "train-1.jsonl", [chat("clean-train-2")])
    assert ids(load_rows(str(configured))[0]) == ["clean-train-0", "clean-train-1", "clean-train-2"]


def test_a_card_naming_a_file_that_is_not_data_is_refused(configured):
    (configured / "clean" / "notes.txt").write_text("not chats\n")
    (configured / "README.md").write_text(CARD.replace("clean/train-*.jsonl", "[clean/train-0.jsonl, clean/notes.txt]"))
    with pytest.raises(InputError, match=says("--input-data", "'clean/notes.txt' as a data file", ".jsonl", "convert it")):
        load_rows(str(configured))


def test_a_file_two_patterns_match_is_read_twice_as_datasets_reads_it(configured, tmp_path):
    """The rows' positions stay those of `datasets`, and so of a build of the same files from the Hub."""
    (configured / "README.md").write_text(CARD.replace("clean/train-*.jsonl", "[clean/train-*.jsonl, clean/train-0.jsonl]"))
    expected = datasets.load_dataset(str(configured), split="train", cache_dir=str(tmp_path / "hf"))["id"]
    assert expected == ["clean-train-0", "clean-train-1"] * 2
    assert ids(load_rows(str(configured))[0]) == expected


DATA_DIR_CARD = """---
configs:
- config_name: raw
  data_dir: raw
- config_name: clean
  data_dir: clean
  data_files:
  - split: train
    path: train-*.jsonl
---
"""


def test_a_card_configuration_s_data_dir_holds_its_files(configured, tmp_path):
    """A configuration's `data_dir` is the folder its files lie in, and its `data_files` are relative to it."""
    (configured / "README.md").write_text(DATA_DIR_CARD)
    for config, expected in (("raw", ["raw-0", "raw-1"]), ("clean", ["clean-train-0", "clean-train-1"])):
        assert datasets.load_dataset(str(configured), config, split="train", cache_dir=str(tmp_path / "hf"))["id"] == expected
        ds, info = load_rows(str(configured), config=config)
        assert ids(ds) == expected and info["config"] == config


def test_card_configs_with_several_defaults_need_input_config(configured, tmp_path):
    (configured / "README.md").write_text(CARD.replace("- config_name: raw\n", "- config_name: raw\n  default: true\n"))
    with pytest.raises(ValueError, match="several default configs"):
        datasets.load_dataset(str(configured), split="train", cache_dir=str(tmp_path / "hf"))
    with pytest.raises(InputError, match=says("--input-config", "['clean', 'raw']", "several defaults", "pass --input-config")):
        load_rows(str(configured))
    assert ids(load_rows(str(configured), config="raw")[0]) == ["raw-0", "raw-1"]


def test_dotted_file_names_in_a_folder_are_data(tmp_path):
    """`chats.v2.jsonl` is JSON Lines by its last suffix, as `datasets` reads it."""
    write_jsonl(tmp_path / "d" / "chats.v2.jsonl", [chat("v2-0"), chat("v2-1")])
    write_jsonl(tmp_path / "d" / "chats.v3.jsonl", [chat("v3-0")])
    expected = datasets.load_dataset(str(tmp_path / "d"), split="train", cache_dir=str(tmp_path / "hf"))["id"]
    assert ids(load_rows(str(tmp_path / "d"))[0]) == expected == ["v2-0", "v2-1", "v3-0"]


def test_parquet_parts_whose_columns_are_in_another_order_load_as_one_table(tmp_path):
    """Chunked writers do not keep the order of a row's keys: the same columns in another order are one schema."""
    reordered = {"messages": chat("p1", "hey", "ho")["messages"], "id": "p1"}
    folder = parquet_parts(tmp_path / "pq", [[chat("p0", "hi", "yo")], [reordered]])
    assert pq.read_schema(folder / "part-1.parquet").names == ["messages", "id"]
    expected = datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "hf"))
    ds, _ = load_rows(str(folder))
    assert [ds[i] for i in range(2)] == [expected[i] for i in range(2)] == [chat("p0", "hi", "yo"), chat("p1", "hey", "ho")]
