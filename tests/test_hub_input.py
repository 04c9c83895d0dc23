"""A Hub dataset as --input-data, against the loopback Hub: its identity is the data files read, not
the repo's commit, so a commit that leaves them as they are resumes; --input-revision pins a commit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import assert_same_content, decoded_rows, says, small_config
from hub_server import TOKEN, hub_fixtures

import builder.forward as forward_module
from builder.build_state import BUILD_STATE_FILE, INPUT_SOURCE_FILE
from builder.config import validate
from builder.errors import ConfigError, InputError, ResumeMismatch
from builder.inputs import load_rows
from builder.manifest import fingerprint, read_manifest
from builder.pipeline import build

hub_server, hub = hub_fixtures()


def chat_lines(n: int, tag: str = "a") -> bytes:
    rows = (
        {
            "id": f"{tag}{i}",
            "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{2 * i}."}],
        }
        for i in range(n)
    )
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def commit_file(hub, repo_id: str, path: str, data: bytes) -> str:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
    return api.upload_file(path_or_fileobj=data, path_in_repo=path, repo_id=repo_id, repo_type="dataset").oid


def hub_dataset(hub, repo_id: str, n: int = 10) -> str:
    """A Hub dataset of `n` chats in train.jsonl; returns the commit holding them."""
    return commit_file(hub, repo_id, "train.jsonl", chat_lines(n))


def interrupted_build(cfg, monkeypatch, shards: int = 2) -> None:
    """A build stopped after writing `shards` shards."""
    real, done = forward_module.write_one_shard, []

    def stop(*args, **kwargs):
        if len(done) == shards:
            raise KeyboardInterrupt
        done.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(forward_module, "write_one_shard", stop)
    with pytest.raises(KeyboardInterrupt):
        build(cfg, progress=False)
    monkeypatch.setattr(forward_module, "write_one_shard", real)


def hub_config(out, repo_id: str, **overrides):
    return small_config(out, input_data=repo_id, max_samples=None, shard_size=3, **overrides)


# ---- the identity of a Hub input: its data files ---------------------------------------------


def test_a_commit_that_leaves_the_data_files_as_they_are_resumes_and_equals_an_uninterrupted_build(hub, tmp_path, monkeypatch):
    read = hub_dataset(hub, "tester/notes-edited")
    cfg = hub_config(tmp_path / "cache", "tester/notes-edited")
    interrupted_build(cfg, monkeypatch)
    edited = commit_file(hub, "tester/notes-edited", "NOTES.md", b"Where these chats come from.\n")
    result = build(cfg.replace(resume=True), progress=False)
    assert len(result.written) == 2  # the two shards the first run wrote are kept
    reference = build(hub_config(tmp_path / "reference", "tester/notes-edited"), progress=False).output_dir
    assert_same_content(decoded_rows(result.output_dir), decoded_rows(reference))
    assert read_manifest(result.output_dir)["fingerprint"] == read_manifest(reference)["fingerprint"]
    assert read_manifest(reference)["input_revision"] == edited != read


def test_the_content_hash_follows_the_split_s_data_files_only(hub):
    commit_file(hub, "tester/two-splits", "data/train.jsonl", chat_lines(3, "tr"))
    commit_file(hub, "tester/two-splits", "data/test.jsonl", chat_lines(2, "te"))
    _, train = load_rows("tester/two-splits")
    _, test = load_rows("tester/two-splits", split="test")
    commit_file(hub, "tester/two-splits", "data/test.jsonl", chat_lines(4, "te"))
    _, train_after = load_rows("tester/two-splits")
    _, test_after = load_rows("tester/two-splits", split="test")
    assert train_after["content_hash"] == train["content_hash"]
    assert test_after["content_hash"] != test["content_hash"]
    assert train_after["revision"] == test_after["revision"] != train["revision"]


def test_a_commit_that_changes_a_data_file_is_refused_naming_the_commit_the_build_read(hub, tmp_path, monkeypatch):
    read = hub_dataset(hub, "tester/data-changed")
    cfg = hub_config(tmp_path / "cache", "tester/data-changed")
    interrupted_build(cfg, monkeypatch)
    commit_file(hub, "tester/data-changed", "train.jsonl", chat_lines(12))
    with pytest.raises(ResumeMismatch, match=says("input.content_hash", "'tester/data-changed'", f"--input-revision {read}")):
        build(cfg.replace(resume=True), progress=False)
    # pinned to the commit it read, the build continues as it began
    result = build(cfg.replace(resume=True, input_revision=read), progress=False)
    assert len(result.written) == 2
    reference = build(hub_config(tmp_path / "reference", "tester/data-changed", input_revision=read), progress=False).output_dir
    assert_same_content(decoded_rows(result.output_dir), decoded_rows(reference))
    assert read_manifest(result.output_dir)["input_revision"] == read


# ---- the card: what `datasets` makes the rows from besides the data files ---------------------------


def chat_rows(n: int, tag: str) -> list[dict]:
    return [json.loads(line) for line in chat_lines(n, tag).decode().splitlines()]


def card(configs: str, prose: str = "Chats.") -> bytes:
    return f"---\n{configs}---\n{prose}\n".encode()


FIELD = "configs:\n- config_name: default\n  data_files: chats.json\n  field: {}\n"
ORDER = "configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: [{}, {}]\n"
TYPED = (
    "configs:\n- config_name: default\n  data_files: typed.jsonl\n"
    "dataset_info:\n  features:\n  - name: id\n    dtype: string\n  - name: n\n    dtype: {}\n"
)


def card_dataset(hub, repo_id: str) -> None:
    """Data files that `datasets` reads into other rows as the card says: a JSON file's fields, two
    JSON Lines parts, a column whose type the card declares."""
    commit_file(hub, repo_id, "chats.json", json.dumps({"curated": chat_rows(3, "good"), "rejected": chat_rows(3, "bad")}).encode())
    commit_file(hub, repo_id, "part-a.jsonl", chat_lines(2, "a"))
    commit_file(hub, repo_id, "part-b.jsonl", chat_lines(2, "b"))
    commit_file(hub, repo_id, "typed.jsonl", b'{"id": "x", "n": 1}\n{"id": "y", "n": 2}\n')


@pytest.mark.parametrize(
    "edit,before,after",
    [
        pytest.param("json-field", card(FIELD.format("curated")), card(FIELD.format("rejected")), id="json-field"),
        pytest.param(
            "file-order",
            card(ORDER.format("part-a.jsonl", "part-b.jsonl")),
            card(ORDER.format("part-b.jsonl", "part-a.jsonl")),
            id="file-order",
        ),
        pytest.param("declared-features", card(TYPED.format("int64")), card(TYPED.format("string")), id="declared-features"),
    ],
)
def test_a_card_edit_that_changes_the_rows_changes_the_content_hash(hub, edit, before, after):
    repo_id = f"tester/card-{edit}"
    card_dataset(hub, repo_id)
    commit_file(hub, repo_id, "README.md", before)
    rows, info = load_rows(repo_id)
    commit_file(hub, repo_id, "README.md", after)
    rows_after, info_after = load_rows(repo_id)
    assert list(rows_after) != list(rows)  # the same data files, other rows
    assert info_after["content_hash"] != info["content_hash"]


def test_the_standalone_yaml_s_settings_are_hashed_as_the_card_s(hub):
    card_dataset(hub, "tester/card-yaml")
    commit_file(hub, "tester/card-yaml", ".huggingface.yaml", FIELD.format("curated").encode())
    rows, info = load_rows("tester/card-yaml")
    commit_file(hub, "tester/card-yaml", ".huggingface.yaml", FIELD.format("rejected").encode())
    rows_after, info_after = load_rows("tester/card-yaml")
    assert [row["id"] for row in rows] == ["good0", "good1", "good2"] and [row["id"] for row in rows_after] == ["bad0", "bad1", "bad2"]
    assert info_after["content_hash"] != info["content_hash"]


def test_the_standalone_yaml_s_settings_go_over_the_readme_s(hub, monkeypatch):
    """`datasets` reads .huggingface.yaml over the README's header: a README edit it overrides changes no row,
    online or offline."""
    card_dataset(hub, "tester/card-both")
    commit_file(hub, "tester/card-both", "README.md", card(FIELD.format("curated")))
    commit_file(hub, "tester/card-both", ".huggingface.yaml", FIELD.format("rejected").encode())
    rows, info = load_rows("tester/card-both")
    commit_file(hub, "tester/card-both", "README.md", card(FIELD.format("rejected")))
    rows_after, info_after = load_rows("tester/card-both")
    assert [row["id"] for row in rows] == [row["id"] for row in rows_after] == ["bad0", "bad1", "bad2"]
    assert info_after["revision"] != info["revision"] and info_after["content_hash"] == info["content_hash"]
    go_offline(monkeypatch)
    assert load_rows("tester/card-both", revision=info["revision"])[1]["content_hash"] == info["content_hash"]


def test_a_card_edit_that_leaves_the_configuration_s_settings_as_they_are_keeps_the_content_hash(hub):
    other = "- config_name: other\n  data_files: chats.json\n  field: {}\n"
    card_dataset(hub, "tester/card-prose")
    commit_file(hub, "tester/card-prose", "README.md", card(FIELD.format("curated") + other.format("curated")))
    _, info = load_rows("tester/card-prose")
    edited = commit_file(hub, "tester/card-prose", "README.md", card(FIELD.format("curated") + other.format("rejected"), "Chats, rated."))
    _, info_after = load_rows("tester/card-prose")
    assert info_after["revision"] == edited != info["revision"]
    assert info_after["content_hash"] == info["content_hash"]


def test_offline_the_card_and_the_files_in_the_local_hub_cache_give_the_content_hash_read_online(hub, monkeypatch):
    card_dataset(hub, "tester/card-offline")
    commit_file(hub, "tester/card-offline", ".huggingface.yaml", b"pretty_name: Chats\n")
    commit_file(hub, "tester/card-offline", "README.md", card(ORDER.format("part-b.jsonl", "part-a.jsonl")))
    _, online = load_rows("tester/card-offline")
    go_offline(monkeypatch)
    _, offline = load_rows("tester/card-offline")
    assert offline["content_hash"] == online["content_hash"] and offline["revision"] == online["revision"]


def test_offline_an_lfs_data_file_the_card_s_settings_and_a_copied_file_give_the_content_hash_read_online(hub, monkeypatch):
    """The Hub names an LFS file's bytes by their sha256, as the local Hub cache names its blob; the card's settings
    are read from the cache; a data file copied into the snapshot, not linked to its blob, is named by no id there."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from builder.hub_inputs import snapshot_folder

    table = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([row | {"source": "web"} for row in chat_rows(4, "p")]), table)
    commit_file(hub, "tester/offline-identity", "train.parquet", table.getvalue())
    columns = "configs:\n- config_name: default\n  data_files: train.parquet\n  columns: [id, messages]\n"
    read = commit_file(hub, "tester/offline-identity", "README.md", card(columns))
    assert hub.files_at("tester/offline-identity", read)["train.parquet"].lfs
    rows, online = load_rows("tester/offline-identity")
    assert rows.column_names == ["id", "messages"]  # the card's setting made the rows
    go_offline(monkeypatch)
    _, offline = load_rows("tester/offline-identity")
    assert offline["content_hash"] == online["content_hash"] and offline["revision"] == read
    linked = snapshot_folder("tester/offline-identity", read) / "train.parquet"
    data = linked.read_bytes()
    linked.unlink()
    linked.write_bytes(data)
    _, copied = load_rows("tester/offline-identity")
    assert copied["content_hash"] == online["content_hash"]


def test_a_card_edit_that_changes_the_rows_refuses_the_resume_naming_the_commit_the_build_read(hub, tmp_path, monkeypatch):
    chats = {"curated": chat_rows(9, "good"), "rejected": chat_rows(9, "bad")}
    commit_file(hub, "tester/card-resumed", "chats.json", json.dumps(chats).encode())
    read = commit_file(hub, "tester/card-resumed", "README.md", card(FIELD.format("curated")))
    cfg = hub_config(tmp_path / "cache", "tester/card-resumed")
    interrupted_build(cfg, monkeypatch)
    commit_file(hub, "tester/card-resumed", "README.md", card(FIELD.format("rejected")))
    with pytest.raises(ResumeMismatch, match=says("input.content_hash", "'tester/card-resumed'", f"--input-revision {read}")):
        build(cfg.replace(resume=True), progress=False)
    result = build(cfg.replace(resume=True, input_revision=read), progress=False)
    assert {row["sample_id"] for row in decoded_rows(result.output_dir)} == {f"good{i}" for i in range(9)}


# ---- --input-revision ---------------------------------------------------------------------------


def test_input_revision_pins_an_older_commit(hub):
    from huggingface_hub import HfApi

    first = commit_file(hub, "tester/pinned", "train.jsonl", chat_lines(3, "old"))
    HfApi(endpoint=hub.url, token=TOKEN).create_tag("tester/pinned", tag="v1", repo_type="dataset")
    commit_file(hub, "tester/pinned", "train.jsonl", chat_lines(5, "new"))
    latest, latest_info = load_rows("tester/pinned")
    assert [row["id"] for row in latest] == [f"new{i}" for i in range(5)]
    for revision in (first, "v1"):
        pinned, info = load_rows("tester/pinned", revision=revision)
        assert [row["id"] for row in pinned] == ["old0", "old1", "old2"]
        assert info["revision"] == first and info["content_hash"] != latest_info["content_hash"]


def test_an_input_revision_the_dataset_lacks_is_an_input_error(hub):
    hub_dataset(hub, "tester/no-such-revision", 3)
    with pytest.raises(InputError, match=says("--input-data", "'tester/no-such-revision'", "--input-revision")):
        load_rows("tester/no-such-revision", revision="v9")


@pytest.mark.parametrize("input_data", ["sample-chats", "local"])
def test_input_revision_is_refused_for_a_local_or_embedded_input(tmp_path, input_data):
    local = tmp_path / "chats.jsonl"
    local.write_bytes(chat_lines(3))
    spec = str(local) if input_data == "local" else input_data
    with pytest.raises(ConfigError, match=r"^--input-revision: expected a Hub dataset id as --input-data, got 'v1'\. .* no revisions"):
        validate(small_config(tmp_path / "out", input_data=spec, input_revision="v1"))
    with pytest.raises(InputError, match=says("--input-revision", "'v1'", "drop --input-revision")):
        load_rows(str(local), revision="v1")


# ---- builds an earlier version recorded ---------------------------------------------------------


def test_a_build_that_recorded_the_rows_fingerprint_resumes_at_the_same_commit_with_its_identity(hub, tmp_path, monkeypatch):
    """Earlier versions recorded `datasets`' fingerprint of the rows, which follows the commit: at the same
    commit it is still this input, and the build keeps the identity, so its fingerprint, as recorded."""
    hub_dataset(hub, "tester/recorded-earlier")
    cfg = hub_config(tmp_path / "cache", "tester/recorded-earlier")
    interrupted_build(cfg, monkeypatch)
    _, info = load_rows("tester/recorded-earlier")
    state = tmp_path / "cache" / BUILD_STATE_FILE
    identity = json.loads(state.read_text())
    identity["input"]["content_hash"] = info["earlier_content_hashes"][0]
    state.write_text(json.dumps(identity))
    (tmp_path / "cache" / INPUT_SOURCE_FILE).unlink()  # earlier versions wrote none
    result = build(cfg.replace(resume=True), progress=False)
    manifest = read_manifest(result.output_dir)
    assert manifest["identity"] == identity and manifest["fingerprint"] == fingerprint(identity)
    reference = build(hub_config(tmp_path / "reference", "tester/recorded-earlier"), progress=False).output_dir
    assert_same_content(decoded_rows(result.output_dir), decoded_rows(reference))


def files_only_hash(files: dict[str, bytes]) -> str:
    """The content hash a version that hashed a Hub input's data files alone recorded: their paths and
    git blob ids, sorted."""
    import hashlib

    from hub_server import git_blob_oid

    h = hashlib.sha256()
    for path, data in sorted(files.items()):
        h.update(f"{path}\0{git_blob_oid(data)}\n".encode())
    return h.hexdigest()


def test_the_data_files_hash_an_earlier_version_recorded_does_not_follow_the_order_they_are_read_in(hub):
    """That version hashed the files sorted by path: a card that lists them in another order still names its builds."""
    commit_file(hub, "tester/earlier-order", "part-a.jsonl", chat_lines(2, "a"))
    commit_file(hub, "tester/earlier-order", "part-b.jsonl", chat_lines(2, "b"))
    read = commit_file(hub, "tester/earlier-order", "README.md", card(ORDER.format("part-b.jsonl", "part-a.jsonl")))
    rows, info = load_rows("tester/earlier-order")
    assert [row["id"] for row in rows] == ["b0", "b1", "a0", "a1"]
    files = {"part-a.jsonl": chat_lines(2, "a"), "part-b.jsonl": chat_lines(2, "b")}
    assert info["earlier_content_hashes"][1:] == [f"{files_only_hash(files)}@{read}"]


def test_a_build_that_recorded_the_data_files_hash_alone_resumes_at_the_commit_it_read_with_its_identity(hub, tmp_path, monkeypatch):
    """That hash does not tell a card edit that changed the rows: it names the input at the commit the build
    read (which that version recorded), and elsewhere the resume is refused, naming that commit."""
    data = chat_lines(10)
    read = commit_file(hub, "tester/recorded-files", "train.jsonl", data)
    cfg = hub_config(tmp_path / "cache", "tester/recorded-files")
    interrupted_build(cfg, monkeypatch)
    state = tmp_path / "cache" / BUILD_STATE_FILE
    identity = json.loads(state.read_text())
    identity["input"]["content_hash"] = files_only_hash({"train.jsonl": data})
    state.write_text(json.dumps(identity))
    commit_file(hub, "tester/recorded-files", "README.md", b"Where these chats come from.\n")
    with pytest.raises(ResumeMismatch, match=says("input.content_hash", f"--input-revision {read}")):
        build(cfg.replace(resume=True), progress=False)
    result = build(cfg.replace(resume=True, input_revision=read), progress=False)
    manifest = read_manifest(result.output_dir)
    assert manifest["identity"] == identity and manifest["fingerprint"] == fingerprint(identity)
    reference = build(hub_config(tmp_path / "reference", "tester/recorded-files"), progress=False).output_dir
    assert_same_content(decoded_rows(result.output_dir), decoded_rows(reference))


# ---- offline: the local caches -------------------------------------------------------------------


def go_offline(monkeypatch) -> None:
    import datasets
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_a_build_begun_online_resumes_offline_from_the_local_caches(hub, tmp_path, monkeypatch):
    read = hub_dataset(hub, "tester/offline")
    cfg = hub_config(tmp_path / "cache", "tester/offline")
    interrupted_build(cfg, monkeypatch)
    go_offline(monkeypatch)
    hub.reset_counters()
    result = build(cfg.replace(resume=True), progress=False)
    assert hub.requests() == []
    assert read_manifest(result.output_dir)["input_revision"] == read
    reference = build(hub_config(tmp_path / "reference", "tester/offline"), progress=False).output_dir
    assert read_manifest(reference)["identity"]["input"] == read_manifest(result.output_dir)["identity"]["input"]


def forget_hub_copy(repo_id: str) -> None:
    """The local Hub cache's copy of a dataset deleted (`hf cache delete`); `datasets`' cached rows stay."""
    import shutil

    from huggingface_hub import constants

    shutil.rmtree(Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}")


def test_a_build_begun_online_resumes_offline_from_the_cached_rows_alone(hub, tmp_path, monkeypatch):
    """The local Hub cache's copy of the files gone, the rows `datasets` cached are told by the note left beside them."""
    read = hub_dataset(hub, "tester/rows-only")
    cfg = hub_config(tmp_path / "cache", "tester/rows-only")
    interrupted_build(cfg, monkeypatch)
    online = load_rows("tester/rows-only")[1]
    forget_hub_copy("tester/rows-only")
    go_offline(monkeypatch)
    offline = load_rows("tester/rows-only")[1]
    assert offline["content_hash"] == online["content_hash"] and offline["revision"] == read
    result = build(cfg.replace(resume=True), progress=False)
    assert len(result.written) == 2 and read_manifest(result.output_dir)["input_revision"] == read
    reference = build(hub_config(tmp_path / "reference", "tester/rows-only"), progress=False).output_dir
    assert_same_content(decoded_rows(result.output_dir), decoded_rows(reference))
    assert read_manifest(reference)["identity"]["input"] == read_manifest(result.output_dir)["identity"]["input"]


def test_offline_rows_whose_making_cannot_be_told_are_not_called_changed(hub, tmp_path, monkeypatch, caplog):
    """Rows cached with no note beside them (by an earlier version), the Hub cache's copy gone: the resume is
    refused saying that what made them could not be told and how to tell it, not that the dataset changed."""
    import datasets

    from builder.hub_inputs import NOTES_FOLDER

    hub_dataset(hub, "tester/untold")
    cache = build(hub_config(tmp_path / "cache", "tester/untold"), progress=False).output_dir
    interrupted_build(hub_config(tmp_path / "stopped", "tester/untold"), monkeypatch)
    rows_fingerprint = load_rows("tester/untold")[1]["earlier_content_hashes"][0]
    (datasets.config.HF_DATASETS_CACHE / NOTES_FOLDER / f"{rows_fingerprint}.json").unlink(missing_ok=True)
    forget_hub_copy("tester/untold")
    go_offline(monkeypatch)
    with pytest.raises(ResumeMismatch, match=says("could not tell", "'tester/untold'", "unset HF_HUB_OFFLINE")) as refused:
        build(hub_config(tmp_path / "stopped", "tester/untold", resume=True), progress=False)
    assert "--input-revision" not in str(refused.value) and "changed" not in str(refused.value)
    warnings = verify_warnings(cache, caplog)
    assert "could not be told" in warnings and "changed" not in warnings


def test_offline_an_input_revision_reads_that_commit_s_cached_copy_not_the_newest(hub, tmp_path, monkeypatch):
    """Offline `datasets` reads the newest copy in its cache whatever revision is asked for: a build that
    read another commit, refused unpinned, resumes pinned to the commit it read, as the refusal says."""
    import os

    import datasets

    read = hub_dataset(hub, "tester/offline-two")
    cfg = hub_config(tmp_path / "cache", "tester/offline-two")
    interrupted_build(cfg, monkeypatch)
    newer = commit_file(hub, "tester/offline-two", "train.jsonl", chat_lines(12))
    _, at_newer = load_rows("tester/offline-two")  # another build read the newer commit: both are cached
    _, at_read = load_rows("tester/offline-two", revision=read)
    newest = datasets.config.HF_DATASETS_CACHE / "tester___offline-two" / "default" / "0.0.0" / newer
    os.utime(newest, (newest.stat().st_atime, newest.stat().st_mtime + 60))
    go_offline(monkeypatch)
    assert load_rows("tester/offline-two")[1]["revision"] == newer
    for commit, online in ((read, at_read), (newer, at_newer)):
        offline = load_rows("tester/offline-two", revision=commit)[1]
        assert offline["revision"] == commit and offline["content_hash"] == online["content_hash"]
    with pytest.raises(ResumeMismatch, match=f"--input-revision {read}"):
        build(cfg.replace(resume=True), progress=False)
    hub.reset_counters()
    result = build(cfg.replace(resume=True, input_revision=read), progress=False)
    assert hub.requests() == [] and len(result.written) == 2
    reference = build(hub_config(tmp_path / "reference", "tester/offline-two", input_revision=read), progress=False).output_dir
    assert_same_content(decoded_rows(result.output_dir), decoded_rows(reference))
    assert read_manifest(result.output_dir)["input_revision"] == read


def test_offline_an_input_revision_with_no_cached_copy_is_refused_naming_the_cached_commits(hub, monkeypatch):
    first = hub_dataset(hub, "tester/offline-pinned", 3)
    latest = commit_file(hub, "tester/offline-pinned", "train.jsonl", chat_lines(4))
    load_rows("tester/offline-pinned")  # the latest commit, cached
    go_offline(monkeypatch)
    with pytest.raises(InputError, match=says("--input-revision", "'tester/offline-pinned'", f"no copy of commit {first}", latest)):
        load_rows("tester/offline-pinned", revision=first)
    with pytest.raises(InputError, match=says("--input-revision", "revision 'v9'", "the local Hub cache does not know", latest)):
        load_rows("tester/offline-pinned", revision="v9")


# ---- verify --recompute: the input rows as the build read them ---------------------------------


def verify_warnings(cache, caplog) -> str:
    import logging

    from builder.cli import main

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["verify", str(cache), "--recompute", "2"]) == 0
    return caplog.text


def test_verify_reads_the_hub_dataset_at_the_commit_the_build_read(hub, tmp_path, caplog):
    hub_dataset(hub, "tester/verified-input", 6)
    cache = build(hub_config(tmp_path / "cache", "tester/verified-input"), progress=False).output_dir
    commit_file(hub, "tester/verified-input", "train.jsonl", chat_lines(8, "z"))
    assert "not compared with their input rows" not in verify_warnings(cache, caplog)


def test_verify_that_cannot_read_the_hub_input_says_what_it_needs_not_the_builds_flags(hub, tmp_path, caplog, monkeypatch):
    import datasets

    read = hub_dataset(hub, "tester/verify-unread", 6)
    cache = build(hub_config(tmp_path / "cache", "tester/verify-unread"), progress=False).output_dir
    forget_hub_copy("tester/verify-unread")
    shutil.rmtree(Path(datasets.config.HF_DATASETS_CACHE) / "tester___verify-unread")  # and the rows `datasets` cached
    go_offline(monkeypatch)
    warnings = verify_warnings(cache, caplog)
    assert "the build's input 'tester/verify-unread' cannot be read here (" in warnings
    assert (
        f": verify reads Hub dataset 'tester/verify-unread' at commit {read} (the manifest's input_revision); run it where the Hub "
        "can be reached (HF_HUB_OFFLINE unset, logged in where the dataset is private), or where the local Hub cache holds a copy of "
        "that commit" in " ".join(warnings.split())
    )
    assert "--input" not in warnings and "give a local path" not in warnings  # the build's flags: verify has none


def test_verify_reads_a_hub_input_an_earlier_version_recorded_by_its_rows_fingerprint(hub, tmp_path, caplog):
    from helpers import record_in_card

    hub_dataset(hub, "tester/verified-earlier", 6)
    cache = build(hub_config(tmp_path / "cache", "tester/verified-earlier"), progress=False).output_dir
    _, info = load_rows("tester/verified-earlier")
    recorded = read_manifest(cache)["identity"]["input"] | {"content_hash": info["earlier_content_hashes"][0]}
    record_in_card(cache, input=recorded)
    assert "not compared with their input rows" not in verify_warnings(cache, caplog)


# ---- the Hub failing while the data files are listed --------------------------------------------


@pytest.fixture
def retry_waits(monkeypatch) -> list[float]:
    """The waits of our retries, recorded rather than slept."""
    import types

    import builder.hub as hub_module

    waits: list[float] = []
    monkeypatch.setattr(hub_module, "time", types.SimpleNamespace(sleep=waits.append))
    return waits


def test_a_transient_failure_listing_the_data_files_is_retried(hub, retry_waits):
    read = hub_dataset(hub, "tester/listing-flaky", 3)
    busy = hub.add_fault("POST", r"/paths-info/", status=503)
    rows, info = load_rows("tester/listing-flaky")
    assert busy.fired == 1 and len(retry_waits) == 1
    assert info["revision"] == read and len(rows) == 3
    hub.clear_faults()
    assert load_rows("tester/listing-flaky")[1]["content_hash"] == info["content_hash"]


def test_a_hub_that_keeps_failing_to_list_the_data_files_is_an_input_error(hub, tmp_path, caplog, retry_waits):
    read = hub_dataset(hub, "tester/listing-down", 6)
    cache = build(hub_config(tmp_path / "cache", "tester/listing-down"), progress=False).output_dir
    hub.add_fault("POST", r"/paths-info/", status=503, times=None)
    with pytest.raises(InputError, match=says("'tester/listing-down'", f"commit {read}", "503", "re-run", "HF_HUB_OFFLINE=1")):
        load_rows("tester/listing-down")
    assert "not compared with their input rows" in verify_warnings(cache, caplog)  # verify says so, and goes on


def test_a_data_file_the_hub_does_not_list_at_the_commit_read_is_an_input_error(hub, monkeypatch):
    """The input is named by the ids of the files `datasets` read: one the Hub's listing lacks names nothing."""
    import hub_server

    read = hub_dataset(hub, "tester/listing-lacks", 3)
    real = hub_server.Handler.paths_info

    def listing_without_the_data_file(handler, *args):
        send = handler._send_json
        handler._send_json = lambda entries, *rest, **kwargs: send([e for e in entries if e["path"] != "train.jsonl"], *rest, **kwargs)
        try:
            return real(handler, *args)
        finally:
            del handler._send_json  # the connection's next requests are answered as they are

    monkeypatch.setattr(hub_server.Handler, "paths_info", listing_without_the_data_file)
    with pytest.raises(InputError, match=says("the Hub lists no train.jsonl", "'tester/listing-lacks'", f"commit {read}", "try again")):
        load_rows("tester/listing-lacks")


def test_verify_reads_a_hub_input_an_earlier_version_recorded_by_its_data_files_hash_alone(hub, tmp_path, caplog):
    from helpers import record_in_card

    data = chat_lines(6)
    commit_file(hub, "tester/verified-files", "train.jsonl", data)
    cache = build(hub_config(tmp_path / "cache", "tester/verified-files"), progress=False).output_dir
    commit_file(hub, "tester/verified-files", "train.jsonl", chat_lines(8, "z"))
    recorded = read_manifest(cache)["identity"]["input"] | {"content_hash": files_only_hash({"train.jsonl": data})}
    record_in_card(cache, input=recorded)
    assert "not compared with their input rows" not in verify_warnings(cache, caplog)


# ---- columns `datasets` types as Json: the data files read row by row, as local files are -------------------

# Text content and a list of parts in one column make `datasets` type it as Json, which reads a string that
# parses as JSON back as that JSON: the reply `"Hello"` as Hello, the reply `42` as a number (a row skipped).
MIXED_CONTENT = [
    {"id": "parts", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "hello"}]},
    {"id": "quoted", "messages": [{"role": "user", "content": "Say it in quotes"}, {"role": "assistant", "content": '"Hello"'}]},
    {"id": "number", "messages": [{"role": "user", "content": "A number"}, {"role": "assistant", "content": "42"}]},
    {"id": "object", "messages": [{"role": "user", "content": "An object"}, {"role": "assistant", "content": '{"a": 1}'}]},
]
MIXED_LINES = "".join(json.dumps(row) + "\n" for row in MIXED_CONTENT).encode()


def local_build(tmp_path, data: bytes):
    local = tmp_path / "mixed.jsonl"
    local.write_bytes(data)
    return build(small_config(tmp_path / "local", input_data=str(local), max_samples=None, shard_size=3), progress=False).output_dir


def assert_built_as_the_local_file(cache, local) -> None:
    assert read_manifest(cache)["skipped"] == read_manifest(local)["skipped"] == {}
    hub_rows, local_rows = decoded_rows(cache), decoded_rows(local)
    assert [row["sample_id"] for row in hub_rows] == [row["sample_id"] for row in local_rows]
    assert len(hub_rows) == len(MIXED_CONTENT)
    assert_same_content(hub_rows, local_rows)  # input_ids and loss masks with torch.equal


def test_a_hub_json_column_of_mixed_types_builds_the_rows_of_the_same_file_given_locally(hub, tmp_path):
    commit_file(hub, "tester/mixed-content", "train.jsonl", MIXED_LINES)
    cache = build(hub_config(tmp_path / "cache", "tester/mixed-content"), progress=False).output_dir
    assert_built_as_the_local_file(cache, local_build(tmp_path, MIXED_LINES))


def test_a_hub_json_column_of_mixed_types_is_read_row_by_row_offline_too(hub, tmp_path, monkeypatch):
    commit_file(hub, "tester/mixed-offline", "train.jsonl", MIXED_LINES)
    load_rows("tester/mixed-offline")  # online: `datasets` and the local Hub cache hold the dataset
    go_offline(monkeypatch)
    hub.reset_counters()
    cache = build(hub_config(tmp_path / "cache", "tester/mixed-offline"), progress=False).output_dir
    assert hub.requests() == []
    assert_built_as_the_local_file(cache, local_build(tmp_path, MIXED_LINES))


def test_a_hub_json_column_of_mixed_types_is_read_row_by_row_at_a_pinned_revision_online_and_offline(hub, tmp_path, monkeypatch):
    pinned = commit_file(hub, "tester/mixed-pinned", "train.jsonl", MIXED_LINES)
    commit_file(hub, "tester/mixed-pinned", "train.jsonl", chat_lines(5))
    local = local_build(tmp_path, MIXED_LINES)
    online = build(hub_config(tmp_path / "online", "tester/mixed-pinned", input_revision=pinned), progress=False).output_dir
    assert_built_as_the_local_file(online, local)
    load_rows("tester/mixed-pinned")  # the newest commit cached too: offline, `datasets` reads that one unpinned
    go_offline(monkeypatch)
    offline = build(hub_config(tmp_path / "offline", "tester/mixed-pinned", input_revision=pinned), progress=False).output_dir
    assert_built_as_the_local_file(offline, local)
    assert read_manifest(offline)["identity"]["input"] == read_manifest(online)["identity"]["input"]


def test_offline_a_json_column_whose_data_files_the_local_hub_cache_no_longer_holds_is_refused(hub, monkeypatch):
    """`datasets`' cached rows hold the changed text: without the files, there are no rows to read."""
    read = commit_file(hub, "tester/json-forgotten", "train.jsonl", MIXED_LINES)
    load_rows("tester/json-forgotten")
    forget_hub_copy("tester/json-forgotten")
    go_offline(monkeypatch)
    with pytest.raises(InputError, match=says("'tester/json-forgotten'", "as Json", f"commit {read}", "unset HF_HUB_OFFLINE")):
        load_rows("tester/json-forgotten")


def test_the_sample_openai_rows_on_the_hub_are_the_rows_of_the_local_file(hub):
    """Its rows mix text and lists of parts, and a tool's reply is a JSON object written as text."""
    from builder.embedded import resolve_input

    local = Path(resolve_input("sample-openai"))
    commit_file(hub, "tester/sample-openai", "train.jsonl", local.read_bytes())
    assert list(load_rows("tester/sample-openai")[0]) == list(load_rows(str(local))[0])


# The card's features for MIXED_CONTENT, typing `content` as Json
JSON_CONTENT = (
    "dataset_info:\n  features:\n  - name: id\n    dtype: string\n  - name: messages\n    list:\n"
    "    - name: role\n      dtype: string\n    - name: content\n      dtype: json\n"
)


def test_a_column_the_card_types_as_json_is_read_row_by_row_too(hub, tmp_path):
    local = tmp_path / "typed.jsonl"
    local.write_bytes(MIXED_LINES)
    commit_file(hub, "tester/json-declared", "train.jsonl", MIXED_LINES)
    commit_file(hub, "tester/json-declared", "README.md", card(JSON_CONTENT))
    assert list(load_rows("tester/json-declared")[0]) == list(load_rows(str(local))[0])


def test_a_json_column_read_with_a_card_setting_the_row_by_row_reader_does_not_apply_is_refused(hub):
    commit_file(hub, "tester/json-field", "chats.json", json.dumps({"curated": MIXED_CONTENT[1:]}).encode())
    commit_file(hub, "tester/json-field", "README.md", card(FIELD.format("curated") + JSON_CONTENT))
    with pytest.raises(InputError, match=says("'tester/json-field'", "messages[].content", "as Json", '"field": "curated"', "JSON Lines")):
        load_rows("tester/json-field")


def test_a_json_column_of_compressed_data_files_is_refused(hub):
    import gzip

    commit_file(hub, "tester/json-compressed", "train.jsonl.gz", gzip.compress(MIXED_LINES, mtime=0))
    with pytest.raises(InputError, match=says("'tester/json-compressed'", "as Json", "train.jsonl.gz", "decompress")):
        load_rows("tester/json-compressed")


ENCODED = "configs:\n- config_name: default\n  data_files: train.jsonl\n  encoding: {}\n"


def test_a_json_column_of_a_file_with_a_byte_order_mark_read_as_utf_8_sig_is_read_row_by_row(hub, tmp_path):
    with_mark = b"\xef\xbb\xbf" + MIXED_LINES
    commit_file(hub, "tester/json-utf-8-sig", "train.jsonl", with_mark)
    commit_file(hub, "tester/json-utf-8-sig", "README.md", card(ENCODED.format("utf-8-sig")))
    local = tmp_path / "with-mark.jsonl"
    local.write_bytes(with_mark)
    rows, info = load_rows("tester/json-utf-8-sig")
    assert "altered_content_hashes" in info
    assert list(rows) == list(load_rows(str(local))[0])
    assert [json.loads(raw)["id"] for raw in rows["raw"]] == [row["id"] for row in MIXED_CONTENT]


def test_a_json_column_of_a_file_the_card_reads_as_latin_1_is_refused(hub):
    """The row-by-row reader reads UTF-8: the file's accented letters would be other text, or bad rows."""
    latin_1 = MIXED_LINES.decode().replace("A number", "Un numéro").encode("latin-1")
    commit_file(hub, "tester/json-latin-1", "train.jsonl", latin_1)
    commit_file(hub, "tester/json-latin-1", "README.md", card(ENCODED.format("latin-1")))
    with pytest.raises(InputError, match=says("'tester/json-latin-1'", "as Json", '"encoding": "latin-1"', "JSON Lines")):
        load_rows("tester/json-latin-1")


def text_chat_lines(n: int) -> bytes:
    """Chats whose replies do not parse as JSON: `datasets` keeps them as they are."""
    rows = (
        {"id": f"t{i}", "messages": [{"role": "user", "content": f"Name {i}."}, {"role": "assistant", "content": f"It is {i}."}]}
        for i in range(n)
    )
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def test_a_build_of_the_rows_datasets_changed_is_not_resumed_with_the_rows_read_row_by_row(hub, tmp_path, monkeypatch):
    """An earlier version built from the rows `datasets` made, whose text it changed: the resume is refused, naming
    the content hash and saying why, also pinned to the commit that build read."""
    import builder.hub_inputs as hub_inputs_module

    read = commit_file(hub, "tester/json-resumed", "train.jsonl", MIXED_LINES + text_chat_lines(8))
    cfg = hub_config(tmp_path / "cache", "tester/json-resumed")
    with monkeypatch.context() as earlier_version:  # one that took `datasets`' rows as they came
        earlier_version.setattr(hub_inputs_module, "json_columns", lambda features: [], raising=False)
        interrupted_build(cfg, monkeypatch)
    for revision in (None, read):
        with pytest.raises(ResumeMismatch, match=says("input.content_hash", "'tester/json-resumed'", "as Json", "another --output-dir")):
            build(cfg.replace(resume=True, input_revision=revision), progress=False)


def chats_with_mixed_metadata(n: int) -> bytes:
    """Chats whose `meta` column mixes text and objects, which `datasets` types as Json: a column no build reads."""
    rows = (
        {
            "id": f"m{i}",
            "meta": "web" if i % 2 else {"src": "web"},
            "messages": [{"role": "user", "content": f"Name {i}."}, {"role": "assistant", "content": f"It is {i}."}],
        }
        for i in range(n)
    )
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def test_a_json_column_no_build_reads_leaves_the_rows_and_their_identity_as_datasets_makes_them(hub):
    """Only a column the conversation is read from can carry changed text: a metadata column typed as Json
    neither re-reads the rows nor marks their hash (a build of them begun before still resumes)."""
    import gzip

    commit_file(hub, "tester/json-metadata", "train.jsonl", chats_with_mixed_metadata(6))
    rows, info = load_rows("tester/json-metadata")
    assert "meta" in rows.column_names and "altered_content_hashes" not in info
    commit_file(hub, "tester/json-metadata-gz", "train.jsonl.gz", gzip.compress(chats_with_mixed_metadata(6), mtime=0))
    rows, info = load_rows("tester/json-metadata-gz")  # compressed files are not refused: nothing is read again
    assert len(rows) == 6 and "altered_content_hashes" not in info


def test_a_json_id_column_is_read_row_by_row_as_the_sample_ids_come_from_it(hub):
    """`datasets`' Json reads an id "1e3" back as the number 1000.0: the sample's id would change."""
    lines = [json.loads(line) for line in text_chat_lines(4).decode().splitlines()]
    lines[0]["id"], lines[1]["id"] = "1e3", 7
    commit_file(hub, "tester/json-ids", "train.jsonl", "".join(json.dumps(row) + "\n" for row in lines).encode())
    rows, info = load_rows("tester/json-ids")
    assert "altered_content_hashes" in info and json.loads(rows[0]["raw"])["id"] == "1e3"
