"""Share and stream through a loopback Hub (tests/hub_server.py): the real `huggingface_hub`
and `datasets` clients push caches over HTTP on 127.0.0.1 and stream them back."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from helpers import MIXED_KEYS, MIXED_VALUES, assert_same_content, card_edited_by_user, decoded_rows, says, small_config
from hub_server import TOKEN, hub_fixtures, point_clients_at

from builder.cli import main
from builder.files import file_hash
from builder.hub import HubError, Retry
from builder.lock import CacheLocked, WriterHold
from builder.manifest import card_data_of
from builder.pipeline import build
from builder.push import PushTarget, ShardUploader, push_cache, validate_target, with_shard_sha256
from builder.reader import CacheMismatch, ShardFilesMismatch, load_cache, read_manifest, read_vocab

hub_server, hub = hub_fixtures()
FAST = Retry(retries=2, backoff=0.01)  # our own retries: quick in tests
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    """14 samples in 4 shards, each shard several row groups."""
    return build(small_config(tmp_path_factory.mktemp("v1") / "cache", row_group_bytes=150_000), progress=False).output_dir


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    """A second version: other settings, other shard names (3 shards of 5)."""
    cfg = small_config(tmp_path_factory.mktemp("v2") / "cache", shard_size=5, seq_length=80, row_group_bytes=150_000)
    return build(cfg, progress=False).output_dir


def push(cache, repo, retry=FAST, **kwargs):
    return push_cache(cache, PushTarget(repo, **kwargs), retry=retry)


def without_shard_sha256(manifest: dict) -> dict:
    """A pushed card's manifest as the local card holds it (the push adds each shard's sha256)."""
    return manifest | {"shards": [{k: v for k, v in shard.items() if k != "sha256"} for shard in manifest["shards"]]}


def sample_ids(dataset) -> list[str]:
    return [row["sample_id"] for row in dataset]


def data_files(hub, repo, revision) -> list[str]:
    return sorted(p for p in hub.files_at(repo, revision) if "data/" in p)


# ---- push, then stream back -------------------------------------------------------------------


def test_a_cache_path_with_a_tilde_is_pushed_from_the_home_folder(hub, v1, tmp_path, monkeypatch):
    """`~` means the home folder, as the command line's shell reads it; a repo id is no path and is left as it is."""
    monkeypatch.setenv("HOME", str(v1.parent))
    monkeypatch.chdir(tmp_path)
    result = push(f"~/{v1.name}", "tester/from-home")
    assert len(result.uploaded) == 4 and not result.skipped
    assert data_files(hub, "tester/from-home", "main") == [f"data/{shard.name}" for shard in sorted((v1 / "data").iterdir())]


def test_push_then_stream_yields_the_local_cache(hub, v1):
    result = push(v1, "tester/roundtrip", tag="v1")
    assert result.tag == "v1" and len(result.uploaded) == 4 and not result.skipped
    assert hub.repo("tester/roundtrip").tags["v1"] == result.commit
    for layout in ("raw", "nemo"):
        remote = list(load_cache("tester/roundtrip", revision="v1", layout=layout, streaming=True))
        assert_same_content(remote, decoded_rows(v1, layout=layout))  # torch.equal, every field, every sample
    # Without this package: plain `datasets` opens the same rows.
    plain = datasets.load_dataset("tester/roundtrip", revision="v1", split="train", streaming=True)
    assert sample_ids(plain) == sample_ids(decoded_rows(v1))
    assert torch.equal(read_vocab("tester/roundtrip", revision="v1")["selected_token_ids"], read_vocab(v1)["selected_token_ids"])
    downloaded = load_cache("tester/roundtrip", revision="v1", layout="raw", streaming=False)  # map-style: downloads once
    assert_same_content([downloaded[i] for i in range(len(downloaded))], decoded_rows(v1))


def test_a_hub_stream_stopped_mid_shard_leaves_no_file_for_the_exit_to_wait_on(hub, v1):
    import gc

    import builder.stream_exit as stream_exit

    push(v1, "tester/stop-early", tag="v1")
    rows = iter(load_cache("tester/stop-early", revision="v1", layout="raw", columns=["sample_id"], streaming=True))
    next(rows)
    gc.collect()  # closed files of the push still in reference cycles: not the stream's, and a collection frees them
    reading = stream_exit.shard_files(closed_only=False)  # the fsspec file `datasets` streams the shard from
    assert len(reading) == 1 and reading[0].path.endswith("/data/train-00000-of-00004.parquet") and not reading[0].closed
    del reading
    rows.close()  # stopped mid-shard, as a `break` stops it
    del rows
    gc.collect()
    stream_exit.wait_for_released_shards(timeout=60)
    assert stream_exit.shard_files(closed_only=True) == []  # an exit right now has nothing left to wait for


def test_card_names_repo_and_revision_and_shows_pictures(hub, v1):
    push(v1, "tester/card", tag="release-1")
    files = hub.files_at("tester/card", "release-1")
    assert {"README.md", "vocab/vocab.safetensors", "images/length_histogram.png", "images/vocab_coverage.png"} <= set(files)
    for picture in ("images/length_histogram.png", "images/vocab_coverage.png"):
        assert hub.state.blob_path(files[picture].sha256).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    card = hub.state.blob_path(files["README.md"].sha256).read_text()
    assert "load_cache('tester/card', revision='release-1', layout=\"nemo\", streaming=True)" in card
    assert f"]({hub.url}/datasets/tester/card/resolve/release-1/images/length_histogram.png)" in card
    sha256 = {p.name: file_hash(p, "sha256") for p in (v1 / "data").glob("*.parquet")}
    assert read_manifest("tester/card", revision="release-1") == with_shard_sha256(read_manifest(v1), sha256)  # + each LFS oid
    local_card = (v1 / "README.md").read_text()
    assert "](images/vocab_coverage.png)" in local_card  # the local card shows the local files


def test_second_version_leaves_the_first_tag_unchanged(hub, v1, v2):
    first = push(v1, "tester/versions", tag="v1")
    files_v1 = hub.files_at("tester/versions", "v1")
    # The final commit (card + deletion of v1's shards) lands but its answer is lost: the retry,
    # on a branch that moved, is answered 412, recomputed on top, and finds nothing left to do.
    lost = hub.add_fault("POST", r"/commit/", action="drop_after", skip=1)
    second = push(v2, "tester/versions", tag="v2")
    assert lost.fired == 1 and ("POST", "/api/datasets/tester/versions/commit/main", 412) in hub.requests("POST")
    assert hub.repo("tester/versions").tags == {"v1": first.commit, "v2": second.commit}
    assert hub.files_at("tester/versions", "v1") == files_v1
    assert_same_content(list(load_cache("tester/versions", revision="v1", layout="raw")), decoded_rows(v1))
    assert_same_content(list(load_cache("tester/versions", revision="v2", layout="raw")), decoded_rows(v2))
    # v1's 4 shards were removed from the branch by v2's final commit, so the branch reads as v2
    assert data_files(hub, "tester/versions", "main") == [f"data/train-0000{k}-of-00003.parquet" for k in range(3)]
    assert sorted(second.deleted) == [f"data/train-0000{k}-of-00004.parquet" for k in range(4)]


def test_interrupted_push_resumes_and_is_never_tagged_early(hub, v1):
    # The connection drops on every commit after the first: shards 0 lands, then the push fails.
    hub.add_fault("POST", r"/commit/", action="drop", skip=1, times=None)
    with pytest.raises(HubError, match="re-run the same command"):
        push_cache(v1, PushTarget("tester/interrupted", tag="v1"), retry=FAST, shards_per_commit=1)
    assert hub.repo("tester/interrupted").tags == {}  # no tag before completion
    assert data_files(hub, "tester/interrupted", "main") == ["data/train-00000-of-00004.parquet"]
    assert "README.md" not in hub.files_at("tester/interrupted", "main")
    with pytest.raises(FileNotFoundError, match=r"no README.md; the card is pushed last, so a push that stopped partway.*re-run"):
        load_cache("tester/interrupted")

    hub.clear_faults()
    hub.reset_counters()
    result = push_cache(v1, PushTarget("tester/interrupted", tag="v1"), retry=FAST, shards_per_commit=1)
    assert result.skipped == ["train-00000-of-00004.parquet"] and len(result.uploaded) == 3
    # Shard 0 is committed and shard 1 reached LFS storage before its commit dropped: neither is sent again.
    sent = {path.rsplit("/", 1)[1] for _, path, _ in hub.requests("PUT", r"/lfs-upload/")}
    shas = [file_hash(v1 / "data" / s["name"], "sha256") for s in read_manifest(v1)["shards"]]
    assert not sent & set(shas[:2]) and set(shas[2:]) <= sent
    assert hub.repo("tester/interrupted").tags["v1"] == result.commit
    assert_same_content(list(load_cache("tester/interrupted", revision="v1", layout="raw")), decoded_rows(v1))


def test_transient_failures_are_retried(hub, v1):
    hub.add_fault("POST", r"/preupload/", status=503)  # retried by the client (http_backoff)
    hub.add_fault("PUT", r"/lfs-upload/", action="drop")  # connection dropped mid-body, retried by the client
    hub.add_fault("POST", r"/commit/", action="drop_after")  # commit applied, answer lost: our retry is a no-op
    hub.add_fault("POST", r"/tag/", status=502)  # retried by us
    result = push(v1, "tester/flaky", tag="v1")
    assert hub.repo("tester/flaky").tags["v1"] == result.commit
    assert_same_content(list(load_cache("tester/flaky", revision="v1", layout="raw")), decoded_rows(v1))
    assert [f.fired for f in hub.state.faults] == [1, 1, 1, 1], hub.state.faults


@pytest.mark.parametrize("status", [409, 412])
def test_a_shard_commit_racing_another_commit_is_retried(hub, v1, status):
    # 409: another commit to the branch is in progress; 412: one landed meanwhile. A shard commit names
    # no parent commit, so it simply goes again, on top of the other one.
    raced = hub.conflict_next_commits(FAST.retries, status=status, skip=1)  # every try of the second shard but the last
    result = push_cache(v1, PushTarget(f"tester/raced-{status}", tag="v1"), retry=FAST, shards_per_commit=1)
    assert raced.fired == FAST.retries
    assert hub.repo(f"tester/raced-{status}").tags["v1"] == result.commit and len(result.uploaded) == 4
    assert_same_content(list(load_cache(f"tester/raced-{status}", revision="v1", layout="raw")), decoded_rows(v1))


class Answered(Exception):
    """A Hub answer with this status, as the client raises it."""

    def __init__(self, status: int):
        super().__init__(f"{status} answered")
        self.response = SimpleNamespace(status_code=status, headers={})


def test_a_commit_naming_its_parent_is_refused_on_a_412_not_retried():
    calls = []

    def commit():
        calls.append(1)
        if len(calls) < 3:
            raise Answered(412)
        return "committed"

    moved = r"commit card on tester/x failed: the branch moved while pushing \(someone else committed\): re-run"
    with pytest.raises(HubError, match=moved):
        Retry(retries=4, backoff=0)("commit card", commit, "tester/x")  # it was checked against that parent
    assert len(calls) == 1
    assert Retry(retries=4, backoff=0)("upload", commit, "tester/x", conflicts=True) == "committed"  # no parent
    assert len(calls) == 3


def test_a_card_commit_the_hub_refuses_as_its_branch_moved_is_checked_again_each_time(hub, v1):
    refused = hub.conflict_next_commits(10, status=412, skip=1)  # every commit after the one of the 4 shards
    with pytest.raises(HubError, match=r"tester/moved@main: the branch moved 3 times while pushing"):
        push(v1, "tester/moved", tag="v1")
    assert refused.fired == 3  # one card commit per check of the new head: never sent again unchecked
    assert "v1" not in hub.repo("tester/moved").tags


def test_a_card_commit_answered_409_as_another_commit_is_under_way_is_sent_again(hub, v1):
    # 409: the Hub was applying another commit to the branch. The card commit names its parent, so
    # sending it again is safe: it lands on that parent, or a 412 says the branch moved meanwhile.
    busy = hub.conflict_next_commits(2, status=409, skip=1)  # the card commit's first two tries
    result = push_cache(v1, PushTarget("tester/card-409", tag="v1"), retry=FAST)
    assert busy.fired == 2
    assert hub.repo("tester/card-409").tags["v1"] == result.commit
    assert_same_content(list(load_cache("tester/card-409", revision="v1", layout="raw")), decoded_rows(v1))


def test_slow_server_still_streams(hub, v1):
    push(v1, "tester/slow", tag="v1")
    hub.add_fault("GET", r"/resolve/.*parquet", action="delay", delay=0.2, times=3)
    assert len(list(load_cache("tester/slow", revision="v1", layout="raw", columns=["sample_id"]))) == 14


def test_permanent_errors_fail_at_once_with_what_to_do(hub, v1):
    hub.add_fault("POST", r"/api/repos/create", status=403, times=None)
    with pytest.raises(HubError, match="no write access to tester/forbidden"):
        push(v1, "tester/forbidden", retry=Retry(retries=3, backoff=5.0))  # would take 35 s if it retried


def test_existing_tag_is_never_moved(hub, v1, v2):
    push(v1, "tester/tagged", tag="v1")
    hub.reset_counters()
    again = push(v1, "tester/tagged", tag="v1")  # the same cache: nothing to do
    assert again.skipped and not hub.requests("POST", r"/commit/")
    with pytest.raises(HubError, match="--hub-tag v1: the tag already exists"):
        push(v2, "tester/tagged", tag="v1")
    assert hub.state.bytes_uploaded == 0 and not hub.requests("POST", r"/commit/")


# ---- several caches in one repo ---------------------------------------------------------------


def test_configs_in_sub_folders_with_an_index_card(hub, v1, v2, tmp_path):
    from huggingface_hub import snapshot_download

    push(v1, "tester/multi", config="llama", tag="llama-v1")
    push(v2, "tester/multi", config="short", tag="short-v1")
    files = hub.files_at("tester/multi", "main")
    assert {"llama/README.md", "short/README.md", "llama/vocab/vocab.safetensors", "short/images/vocab_coverage.png"} <= set(files)
    root = hub.state.blob_path(files["README.md"].sha256).read_text()
    assert (
        "config_name: llama" in root
        and "config_name: short" in root
        and "name='short', revision='short-v1'" in root
        and "name='llama', revision='llama-v1'" in root
    )
    assert_same_content(list(load_cache("tester/multi", name="llama", revision="llama-v1", layout="raw")), decoded_rows(v1))
    assert_same_content(list(load_cache("tester/multi", name="short", layout="raw")), decoded_rows(v2))
    plain = datasets.load_dataset("tester/multi", "short", split="train", streaming=True)
    assert sample_ids(plain) == sample_ids(decoded_rows(v2))
    downloaded = Path(snapshot_download("tester/multi", repo_type="dataset", allow_patterns="short/*", local_dir=tmp_path / "dl"))
    assert_same_content(list(load_cache(downloaded / "short", layout="raw")), decoded_rows(v2))  # a config's folder alone
    with pytest.raises(ValueError, match=r"several caches: pass one of \['llama', 'short'\] as --name \(name= in Python\)"):
        load_cache("tester/multi")
    with pytest.raises(
        FileNotFoundError,
        match=r"no mistral/README.md; the repo holds the caches \['llama', 'short'\], not 'mistral': "
        r"pass one of them as --name \(name= in Python\)$",
    ):
        load_cache("tester/multi", name="mistral")
    with pytest.raises(HubError, match="holds several caches in sub-folders"):
        push(v1, "tester/multi")
    push(v1, "tester/single")
    with pytest.raises(
        FileNotFoundError,
        match=r"no short/README.md; the repo holds one cache, at its root, and no configs: leave out --name short \(name= in Python\)$",
    ):
        load_cache("tester/single", name="short")
    with pytest.raises(HubError, match="holds a cache at its root"):
        push(v2, "tester/single", config="other")


def test_a_config_whose_folder_holds_a_card_but_that_an_intact_index_does_not_list_is_not_offered(hub, v1, v2):
    """`datasets` refuses a config the root card does not list: where that card is intact, the refusal names the
    configs it holds, as for a config with no folder at all, not `datasets`' own "BuilderConfig not found"."""
    from helpers import front_matter_edited

    from builder.reader import ShardsNotOpened

    repo = "tester/unlisted"
    push(v1, repo, config="llama")
    push(v2, repo, config="short")

    def unlisted(data: dict) -> None:
        data["configs"] = [config for config in data["configs"] if config["config_name"] != "llama"]
        del data["eagle3_cache_index"]["llama"]

    commit_card(hub, repo, "README.md", front_matter_edited(hub_text(hub, repo), unlisted))
    with pytest.raises(
        ShardsNotOpened, match=r"the repo holds the caches \['short'\], not 'llama': pass one of them as --name \(name= in Python\)$"
    ):
        load_cache(repo, name="llama", layout="raw")


def test_the_readme_says_to_push_the_first_cache_of_a_repo_holding_several_with_a_config_too():
    paragraph = next(p for p in (ROOT / "README.md").read_text(encoding="utf-8").split("\n\n") if "`--hub-config NAME` puts" in p)
    text = " ".join(paragraph.split())
    assert "cannot also take a config" in text and "with `--hub-config`, the first one too" in text


# ---- what users add to a card ------------------------------------------------------------------


def hub_text(hub, repo: str, revision: str = "main", path: str = "README.md") -> str:
    return hub.state.blob_path(hub.files_at(repo, revision)[path].sha256).read_text()


def edit_on_hub(hub, repo: str, path: str = "README.md", **edits) -> None:
    """A user's edit of a card on the Hub (`card_edited_by_user`), committed to main."""
    from huggingface_hub import CommitOperationAdd, HfApi

    text = card_edited_by_user(hub_text(hub, repo, path=path), **edits)
    HfApi(endpoint=hub.url, token=TOKEN).create_commit(
        repo, [CommitOperationAdd(path, text.encode())], commit_message="edit the card", repo_type="dataset"
    )


def assert_kept(card: str, **keys) -> None:
    data = card_data_of(card)
    assert {key: data.get(key) for key in keys} == keys and "team-x" in data["tags"]
    assert "Our intro." in card and "Cite team X." in card


def test_a_new_version_keeps_what_users_added_to_the_card_on_the_hub(hub, v1, v2):
    push(v1, "tester/edited", tag="v1")
    edit_on_hub(hub, "tester/edited")
    push(v2, "tester/edited", tag="v2")
    assert_kept(hub_text(hub, "tester/edited", "v2"), license="mit", pretty_name="Team X: cache")
    assert without_shard_sha256(read_manifest("tester/edited", revision="v2")) == read_manifest(v2)


def test_a_users_mapping_whose_keys_mix_types_is_kept_on_the_hub(hub, v1, v2):
    """Checking that the card reads back as written sorted its keys: the push failed after every shard was uploaded."""
    push(v1, "tester/mixed-keys", tag="v1")
    edit_on_hub(hub, "tester/mixed-keys", keys=MIXED_KEYS)
    push(v2, "tester/mixed-keys", tag="v2")
    assert_kept(hub_text(hub, "tester/mixed-keys", "v2"), **MIXED_VALUES)


def test_config_pushes_keep_what_users_added_to_the_index_and_config_cards(hub, v1, v2):
    push(v1, "tester/edited-configs", config="llama")
    edit_on_hub(hub, "tester/edited-configs", keys="license: apache-2.0\n")
    edit_on_hub(hub, "tester/edited-configs", "llama/README.md", keys="license: mit\n")
    push(v2, "tester/edited-configs", config="short")  # the index card is written again
    root = hub_text(hub, "tester/edited-configs")
    assert_kept(root, license="apache-2.0")
    assert sorted(card_data_of(root)["eagle3_cache_index"]) == ["llama", "short"]
    push(v2, "tester/edited-configs", config="llama")  # a new version of the config
    assert_kept(hub_text(hub, "tester/edited-configs", path="llama/README.md"), license="mit")
    assert without_shard_sha256(read_manifest("tester/edited-configs", name="llama")) == read_manifest(v2)
    assert_kept(hub_text(hub, "tester/edited-configs"), license="apache-2.0")


def commit_card(hub, repo: str, path: str, text: str) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    HfApi(endpoint=hub.url, token=TOKEN).create_commit(
        repo, [CommitOperationAdd(path, text.encode())], commit_message="edit", repo_type="dataset"
    )


def test_a_config_card_whose_yaml_was_broken_on_the_hub_is_written_again_keeping_the_users_text(hub, v1, v2, caplog):
    """Its manifest key shows it is eagle3-cache's: the push writes it again, keeping the text outside the
    markers (its keys cannot be read), as a --resume does with a local card broken so."""
    push(v1, "tester/broken-config", config="llama")
    edit_on_hub(hub, "tester/broken-config", "llama/README.md")
    broken = hub_text(hub, "tester/broken-config", path="llama/README.md").replace("---\n", "---\nlicense: mit: x\n", 1)
    commit_card(hub, "tester/broken-config", "llama/README.md", broken)
    with caplog.at_level(logging.WARNING, logger="builder.push"):
        push(v2, "tester/broken-config", config="llama")
    card = hub_text(hub, "tester/broken-config", path="llama/README.md")
    assert "Our intro." in card and "Cite team X." in card and "license" not in card_data_of(card)
    assert without_shard_sha256(read_manifest("tester/broken-config", name="llama")) == read_manifest(v2)
    assert re.search(
        says(
            "tester/broken-config@main: llama/README.md: its YAML front matter does not parse (",
            "mapping values are not allowed here, at line 2 of the card",
            "it is written again, keeping the text above and below the generated markers; the YAML keys added to it are "
            "lost: license (lines 2, 3), pretty_name (line 4), language (line 5); add them again",
        ),
        caplog.text,
    )
    assert "written anew" not in caplog.text  # one warning, saying what is kept and what is lost


def test_a_config_card_given_a_key_that_is_no_text_on_the_hub_is_written_again_by_a_push(hub, v1, v2, caplog):
    """`2024:` reads as a number key, which huggingface_hub's card cannot take: the push writes the card again,
    naming the key it could not keep, rather than stop on the card it cannot read."""
    push(v1, "tester/number-key", config="llama")
    edit_on_hub(hub, "tester/number-key", "llama/README.md")
    edited = hub_text(hub, "tester/number-key", path="llama/README.md").replace("---\n", "---\n2024: a good year\n", 1)
    commit_card(hub, "tester/number-key", "llama/README.md", edited)
    with caplog.at_level(logging.WARNING, logger="builder.push"):
        push(v2, "tester/number-key", config="llama")
    card = hub_text(hub, "tester/number-key", path="llama/README.md")
    assert "Our intro." in card and "Cite team X." in card and "a good year" not in card
    assert without_shard_sha256(read_manifest("tester/number-key", name="llama")) == read_manifest(v2)
    assert "holds top-level keys that are not text (2024: quote such a key)" in caplog.text
    assert "the YAML keys added to it are lost: 2024 (line 2)" in caplog.text


def test_a_config_card_cut_short_on_the_hub_is_written_anew_with_one_warning_naming_the_keys_it_lost(hub, v1, v2, caplog, tmp_path):
    """No markers left to keep text by: all of it is written anew, and the keys lost are named with their lines,
    those the local card has aside (the card written takes them from it)."""
    import shutil

    repo = "tester/cut-config"
    push(v1, repo, config="llama")
    edit_on_hub(hub, repo, "llama/README.md")
    card = hub_text(hub, repo, path="llama/README.md")
    commit_card(hub, repo, "llama/README.md", card[: card.index("eagle3_cache:") + 40])
    cache = Path(shutil.copytree(v2, tmp_path / "cache"))
    (cache / "README.md").write_text(card_edited_by_user((cache / "README.md").read_text(), keys="language:\n- fr\n"))
    with caplog.at_level(logging.WARNING, logger="builder.push"):
        push(cache, repo, config="llama")
    warnings = [record.getMessage() for record in caplog.records if "llama/README.md" in record.getMessage()]
    assert len(warnings) == 1
    assert re.search(
        says(
            "llama/README.md: its YAML front matter begins but is never closed",
            "so none of its text is known to be a user's: all of it is written anew",
            "the YAML keys added to it are lost: license (line 2), pretty_name (line 3); add them again",
        ),
        warnings[0],
    )
    assert "language" not in warnings[0] and "keeping the text" not in warnings[0]
    assert card_data_of(hub_text(hub, repo, path="llama/README.md"))["language"] == ["fr"]


def test_a_card_whose_yaml_does_not_parse_and_holds_no_manifest_is_refused_naming_the_line(hub, v1, v2):
    from builder.manifest import ManifestError

    theirs = "---\nlicense: mit: x\n---\n# Our notes\n"
    push(v1, "tester/their-broken-card", config="llama")
    commit_card(hub, "tester/their-broken-card", "llama/README.md", theirs)
    with pytest.raises(ManifestError, match=r"tester/their-broken-card@main: llama/README.md: expected YAML front matter .*\(line 2: "):
        push(v2, "tester/their-broken-card", config="llama")
    assert hub_text(hub, "tester/their-broken-card", path="llama/README.md") == theirs
    cut_before_its_manifest = hub_text(hub, "tester/their-broken-card")[:40]  # an index card's first lines: no key of eagle3-cache's
    commit_their_files(hub, "tester/cut-early", {"README.md": cut_before_its_manifest})
    with pytest.raises(HubError, match=r"has a dataset card that is not an eagle3-cache card: a push would replace it"):
        push(v1, "tester/cut-early")
    assert hub_text(hub, "tester/cut-early") == cut_before_its_manifest


def readme_quoting_a_key(key: str) -> str:
    """Another dataset's README opening with a `---` rule it never closes, that shows a key of
    eagle3-cache's in a code block below its own text."""
    return f"---\n# Our notes\n\nOur cards start like this:\n\n```yaml\n{key}:\n  format_version: 1\n```\n\nOur data is in data/.\n"


@pytest.mark.parametrize("key, config", [("eagle3_cache", None), ("eagle3_cache_index", "llama")])
def test_a_readme_never_closing_its_opening_rule_that_quotes_a_key_of_ours_is_another_datasets(hub, v1, key, config):
    """Front matter never closed holds a key of eagle3-cache's only where every line above the key is
    YAML: text above it (a heading, prose, a code fence) is a README's own, and the README is refused."""
    repo = f"tester/quotes-{key}".replace("_", "-")
    theirs = readme_quoting_a_key(key)
    commit_their_files(hub, repo, {"README.md": theirs, "data/train-00000-of-00001.parquet": "their rows"})
    files = sorted(hub.files_at(repo, "main"))
    with pytest.raises(HubError, match=rf"{repo}@main has a dataset card that is not an eagle3-cache card: a push would replace it"):
        push(v1, repo, config=config)
    assert hub_text(hub, repo) == theirs
    assert sorted(hub.files_at(repo, "main")) == files


def test_a_root_card_of_a_cache_cut_short_on_the_hub_is_written_again_by_a_push(hub, v1, v2):
    """Only a card cut short: the Hub refuses a root card whose YAML does not parse (a config's it takes)."""
    repo = "tester/cut-root"
    push(v1, repo)
    text = hub_text(hub, repo)
    commit_card(hub, repo, "README.md", text[: len(text) // 2])
    push(v2, repo, tag="v2")
    assert without_shard_sha256(read_manifest(repo, revision="v2")) == read_manifest(v2)
    commit_card(hub, repo, "README.md", text[: len(text) // 2])
    with pytest.raises(HubError, match="holds a cache at its root"):
        push(v1, repo, config="llama")


def test_an_index_card_damaged_on_the_hub_lists_the_configs_found_in_their_folders(hub, v1, v2, caplog):
    repo = "tester/damaged-index"
    push(v1, repo, config="llama", tag="llama-v1")
    push(v2, repo, config="short", tag="short-v1")
    text = hub_text(hub, repo)
    commit_card(hub, repo, "README.md", text[: text.index("eagle3_cache_index:") + 40])  # cut short, its index half gone
    with pytest.raises(HubError, match=r"holds several caches in sub-folders \(\['llama', 'short'\]\)"):
        push(v1, repo)
    with caplog.at_level(logging.WARNING, logger="builder.push"):
        push(v1, repo, config="llama", tag="llama-v2")
    root = hub_text(hub, repo)
    assert sorted(card_data_of(root)["eagle3_cache_index"]) == ["llama", "short"]
    assert "name='llama', revision='llama-v2'" in root and "name='short', layout=" in root  # its tag was only in the damaged card
    assert "lists the configs found in the repo's folders (llama, short)" in caplog.text
    assert_same_content(list(load_cache(repo, name="short", layout="raw")), decoded_rows(v2))


def test_a_config_whose_card_is_damaged_too_stays_in_an_index_written_again_and_may_be_pushed(hub, v1, v2, caplog):
    """Both the index and a config's card damaged: the index written again still lists that config (left out,
    its folder would be taken for another dataset's, refusing the push that restores its card)."""
    repo = "tester/damaged-both"
    push(v1, repo, config="llama", tag="llama-v1")
    push(v2, repo, config="short", tag="short-v1")
    text, short = hub_text(hub, repo), hub_text(hub, repo, path="short/README.md")
    commit_card(hub, repo, "README.md", text[: text.index("eagle3_cache_index:") + 40])
    commit_card(hub, repo, "short/README.md", short[: len(short) // 2])
    commit_card(hub, repo, "notes/README.md", "# Our notes\n")
    with caplog.at_level(logging.WARNING, logger="builder.push"):
        push(v1, repo, config="llama", tag="llama-v2")
    assert sorted(card_data_of(hub_text(hub, repo))["eagle3_cache_index"]) == ["llama", "short"]
    assert re.search(
        says(
            "README.md: the index card is damaged, so it lists the configs found in the repo's folders (llama, short), those of",
            "without the revision they were pushed with (short)",
            "listed although its card is damaged, so that pushing that config again restores it: short (its card's YAML front",
            "matter begins but is never closed",
            "not listed: notes (its README.md is not an eagle3-cache card)",
        ),
        caplog.text,
    )
    push(v2, repo, config="short", tag="short-v2")
    assert sorted(card_data_of(hub_text(hub, repo))["eagle3_cache_index"]) == ["llama", "short"]
    assert_same_content(list(load_cache(repo, name="short", layout="raw")), decoded_rows(v2))
    assert_same_content(list(load_cache(repo, name="llama", revision="llama-v2", layout="raw")), decoded_rows(v1))


def test_local_card_edits_reach_the_hub_and_win_over_the_hubs(hub, v1, tmp_path):
    import shutil

    cache = Path(shutil.copytree(v1, tmp_path / "cache"))
    (cache / "README.md").write_text(card_edited_by_user((cache / "README.md").read_text(), keys="license: mit\n"))
    assert read_manifest(cache) == read_manifest(v1)
    push(cache, "tester/edited-here", tag="v1")
    assert_kept(hub_text(hub, "tester/edited-here", "v1"), license="mit")
    edit_on_hub(hub, "tester/edited-here", keys="license: apache-2.0\npretty_name: On the Hub\n", tag="hub-tag")
    push(cache, "tester/edited-here")
    card = hub_text(hub, "tester/edited-here")
    assert_kept(card, license="mit", pretty_name="On the Hub")  # the local card's where both have one
    assert "hub-tag" in card_data_of(card)["tags"]


# ---- distributed streaming --------------------------------------------------------------------


@pytest.fixture
def pushed_v1(hub, v1):
    push(v1, "tester/dist", tag="v1")
    hub.reset_counters()
    return "tester/dist"


def test_ranks_read_disjoint_shards_covering_every_sample_once(hub, pushed_v1, v1):
    everything = sample_ids(decoded_rows(v1))
    for world_size in (2, 3, 5):  # 4 files: by file (even, uneven), then by row group
        parts = [
            sample_ids(load_cache(pushed_v1, revision="v1", layout="raw", columns=["sample_id"], rank=r, world_size=world_size))
            for r in range(world_size)
        ]
        assert all(parts), world_size
        assert sorted(sum(parts, [])) == sorted(everything), world_size
    hub.reset_counters()
    sample_ids(load_cache(pushed_v1, revision="v1", layout="raw", columns=["sample_id"], rank=1, world_size=2))
    touched = sorted(p for p in hub.state.bytes_served if p.startswith("data/"))
    assert touched == ["data/train-00001-of-00004.parquet", "data/train-00003-of-00004.parquet"]  # rank 1's shards only


def test_ranks_and_dataloader_workers_split_further(hub, pushed_v1, v1):
    seen = []
    for rank in range(2):
        dataset = load_cache(pushed_v1, revision="v1", layout="raw", columns=["sample_id", "input_ids"], rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=list)
        seen += [row["sample_id"] for batch in loader for row in batch]
    assert sorted(seen) == sorted(sample_ids(decoded_rows(v1)))


def test_two_torch_distributed_processes_split_only_when_asked(hub, pushed_v1, v1, tmp_path):
    script = (
        "import json, os, torch.distributed as dist\n"
        "from builder.reader import load_cache\n"
        "dist.init_process_group('gloo', init_method='file://' + os.environ['RDZV'], "
        "rank=int(os.environ['RANK']), world_size=2)\n"
        "def ids(**kw): return [r['sample_id'] for r in load_cache('tester/dist', revision='v1', layout='raw', "
        "columns=['sample_id'], **kw)]\n"
        "print(json.dumps({'rank': dist.get_rank(), 'world': dist.get_world_size(), 'all': ids(), "
        "'ids': ids(split_by_rank=True)}))\n"
        "dist.destroy_process_group()\n"
    )
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": TOKEN,
        "RDZV": str(tmp_path / "rdzv"),
        "PYTHONPATH": str(ROOT),
    }
    # Output to files, not pipes: a rank blocked on a full pipe nobody reads yet would stall the other
    # at a collective.
    logs = [(tmp_path / f"rank{r}.out", tmp_path / f"rank{r}.err") for r in range(2)]
    procs = []
    for r, (out_path, err_path) in enumerate(logs):
        with open(out_path, "w") as out, open(err_path, "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-c", script], env={**env, "RANK": str(r)}, stdout=out, stderr=err))
    outs = []
    for proc, (out_path, err_path) in zip(procs, logs):
        assert proc.wait() == 0, err_path.read_text()[-3000:]
        outs.append(json.loads(out_path.read_text().strip().splitlines()[-1]))
    assert sorted(o["rank"] for o in outs) == [0, 1] and all(o["world"] == 2 for o in outs)
    assert all(o["all"] == sample_ids(decoded_rows(v1)) for o in outs)  # not split: accelerate or a sampler will split
    a, b = (set(o["ids"]) for o in outs)
    assert a and b and not a & b
    assert sorted(outs[0]["ids"] + outs[1]["ids"]) == sorted(sample_ids(decoded_rows(v1)))


def test_shuffle_buffer_reorders_but_keeps_every_sample(hub, pushed_v1, v1):
    dataset = load_cache(pushed_v1, revision="v1", layout="raw", columns=["sample_id"], shuffle_buffer=8, seed=3)
    first = sample_ids(dataset)
    dataset.set_epoch(1)
    second = sample_ids(dataset)
    assert sorted(first) == sorted(second) == sorted(sample_ids(decoded_rows(v1)))
    assert first != sample_ids(decoded_rows(v1)) and first != second


# ---- reads that survive the network -----------------------------------------------------------------

DATA_FILE = r"/resolve/[0-9a-f]{{40}}/data/train-0000{}-of-00004\.parquet"


def test_streaming_epoch_survives_network_faults(hub, pushed_v1, v1):
    """Faults at named points: the Nth ranged GET of a data file. The client retries the first four
    itself; the outage outlasts its retries (six 503s), so the reader reopens and resumes."""
    faults = [
        hub.add_fault("GET", DATA_FILE.format(0), ranged=True, skip=1, action="truncate"),  # the body stops midway
        hub.add_fault("GET", DATA_FILE.format(1), ranged=True, skip=1, action="drop"),  # no answer at all
        hub.add_fault("GET", DATA_FILE.format(2), ranged=True, skip=1, status=502),
        hub.add_fault("GET", DATA_FILE.format(2), ranged=True, skip=3, action="delay", delay=0.3),  # a slow read
        hub.add_fault("GET", DATA_FILE.format(3), ranged=True, skip=1, status=503, times=6, headers={"Retry-After": "0"}),
    ]
    rows = list(load_cache(pushed_v1, revision="v1", layout="raw", block_size=32 << 10, retry=FAST))
    assert [f.fired for f in faults] == [1, 1, 1, 1, 6]
    assert_same_content(rows, decoded_rows(v1))  # every sample once, in order, every byte
    outage = [r for r in hub.requests("GET", DATA_FILE.format(3)) if r[2] == 503]
    assert len(outage) == 6  # 1 + the client's 5 retries: then the reader reopened


def test_permanent_read_failure_names_the_file_and_the_revision(hub, pushed_v1, v1):
    hub.add_fault("GET", DATA_FILE.format(2), ranged=True, skip=1, status=404)  # gone from the server mid-epoch
    seen = []
    with pytest.raises(
        HubError,
        match=says("tester/dist", "data/train-00002-of-00004.parquet", "revision 'v1'", "not in that commit"),
    ):
        for row in load_cache(pushed_v1, revision="v1", layout="raw", columns=["sample_id"], block_size=32 << 10, retry=FAST):
            seen.append(row["sample_id"])
    assert seen == sample_ids(decoded_rows(v1))[:8]  # shards 0 and 1 were read whole, nothing after


@pytest.fixture
def served_damaged(hub, pushed_v1):
    """The Hub serves shard 1 of tester/dist with bytes overwritten at a place the test names; its listing still
    gives the size and sha256 the card records. The stored bytes are put back afterwards: other repos share them."""
    blob = hub.state.blob_path(hub.files_at(pushed_v1, "v1")["data/train-00001-of-00004.parquet"].sha256)
    intact = blob.read_bytes()

    def damage(where: slice) -> None:
        damaged = bytearray(intact)
        damaged[where] = b"\xff" * len(damaged[where])
        blob.write_bytes(bytes(damaged))

    yield damage
    blob.write_bytes(intact)


@pytest.mark.parametrize("where", [slice(4, 40), slice(-40, -8)], ids=["page header", "footer"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_shard_damaged_on_the_hub_is_named_with_what_to_do_when_streamed(hub, pushed_v1, v1, served_damaged, where, num_workers):
    """Parquet's own error names no file ("Couldn't deserialize thrift"): the reader says which shard of which
    version cannot be read, how to check the repo and how to repair it, as it does for a local shard."""
    from builder.local_shards import DamagedShard

    served_damaged(where)
    seen = []
    dataset = load_cache(pushed_v1, revision="v1", layout="raw", columns=["sample_id"], retry=FAST)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=num_workers, collate_fn=sample_ids)
    with pytest.raises(
        DamagedShard,
        match=says(
            "streaming tester/dist: data/train-00001-of-00004.parquet at revision 'v1' (commit ",
            "the shard is damaged (",
            "`eagle3-cache verify tester/dist --revision v1` checks every shard against the checksums its card records",
            "push the cache to tester/dist at revision v1 again from an intact local copy",
        ),
    ):
        for batch in loader:
            seen += batch
    if num_workers == 0:
        assert seen == sample_ids(decoded_rows(v1))[:4]  # shard 0 whole, nothing of shard 1


def test_a_shard_damaged_on_the_hub_read_map_style_says_what_to_do(hub, pushed_v1, served_damaged, monkeypatch, tmp_path):
    """A map-style read prepares every shard at the open: `datasets`' own error only says that generating failed."""
    from builder.local_shards import DamagedShard

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")  # not an intact copy prepared before
    served_damaged(slice(4, 40))
    with pytest.raises(
        DamagedShard,
        match=says(
            "tester/dist@",
            "a shard is damaged: `datasets` could not read its shards (OSError: Couldn't deserialize thrift",
            "`eagle3-cache verify tester/dist --revision v1` checks every shard against the checksums its card records",
            "push the cache to tester/dist at revision v1 again from an intact local copy",
        ),
    ):
        load_cache(pushed_v1, revision="v1", layout="raw", streaming=False)


def test_only_the_needed_columns_are_downloaded(hub, pushed_v1, v1):
    total = sum(f.stat().st_size for f in (v1 / "data").glob("*.parquet"))
    rows = list(load_cache(pushed_v1, revision="v1", layout="raw", columns=["sample_id", "input_ids"], block_size=4 << 10))
    assert len(rows) == 14 and set(rows[0]) == {"sample_id", "input_ids"}
    fetched = sum(n for p, n in hub.state.bytes_served.items() if p.startswith("data/"))
    assert fetched < 0.25 * total, (fetched, total)  # aux states and probs (most bytes) never travel


# ---- compatibility check ------------------------------------------------------------------------


def test_expect_passes_on_matching_settings_and_names_each_mismatch(hub, pushed_v1, v1):
    manifest = read_manifest(v1)
    identity = manifest["identity"]
    matching = {
        "target_model": identity["target"]["model"],
        "aux_layer_ids": identity["aux_layer_ids"],
        "draft_vocab_size": 300,
        "seq_length": 96,
        "dtype": torch.float32,
        "selected_token_ids": read_vocab(v1)["selected_token_ids"],
        "hidden_size": manifest["hidden_size"],
    }
    assert without_shard_sha256(load_cache(pushed_v1, revision="v1", expect=matching).manifest) == manifest
    wrong = {**matching, "aux_layer_ids": [1, 2, 3], "dtype": "bf16", "seq_length": 2048, "selected_token_ids": torch.arange(300)}
    with pytest.raises(CacheMismatch) as err:
        load_cache(pushed_v1, revision="v1", expect=wrong)
    message = str(err.value)
    for name in ("aux_layer_ids", "dtype", "seq_length", "selected_token_ids"):
        assert f"  {name}: trainer expects" in message
    assert "target_model" not in message and set(err.value.differences) == {"aux_layer_ids", "dtype", "seq_length", "selected_token_ids"}
    with pytest.raises(ValueError, match="unknown field"):
        load_cache(v1, expect={"aux_layers": [1]})  # local caches are checked the same way


# skip 0: the revision's look-up fails; 1: `datasets`' own, as it opens the shards. "Retry-After: 0" asks for no wait at all.
@pytest.mark.parametrize("skip,status,wait", [(0, 429, "7"), (1, 503, "7"), (0, 503, "0")])
def test_a_transient_answer_while_opening_is_retried_after_the_wait_it_asks_for(hub, v1, monkeypatch, skip, status, wait):
    import types

    import builder.hub as hub_module

    repo = f"tester/opening-{skip}-{status}-{wait}"  # a commit `datasets` has not opened yet (it keeps what it learnt of one)
    push(v1, repo, tag="v1")
    waits: list[float] = []
    monkeypatch.setattr(hub_module, "time", types.SimpleNamespace(sleep=waits.append))
    busy = hub.add_fault("GET", rf"/api/datasets/{repo}/revision/", status=status, skip=skip, headers={"Retry-After": wait})
    assert len(list(load_cache(repo, revision="v1", layout="raw", columns=["sample_id"], retry=FAST))) == 14
    assert busy.fired == 1 and waits == [float(wait)]


# The client retries a plain download (the card, the vocab) itself only after 408/429: a 5xx is ours to retry.
@pytest.mark.parametrize("path", ["README.md", "vocab/vocab.safetensors"])
@pytest.mark.parametrize("status", [502, 503])
def test_a_5xx_on_the_card_or_the_vocab_while_opening_is_retried(hub, v1, path, status):
    repo = f"tester/reading-{path.replace('/', '-')}-{status}"  # a commit not in the local Hugging Face cache yet
    push(v1, repo, tag="v1")
    busy = hub.add_fault("GET", rf"/resolve/[0-9a-f]{{40}}/{re.escape(path)}$", status=status)
    rows = list(load_cache(repo, revision="v1", layout="nemo", retry=Retry(retries=3, backoff=0.01)))
    assert busy.fired == 1
    assert_same_content(rows, list(load_cache(v1, layout="nemo")))


@pytest.mark.parametrize("path", ["README.md", "vocab/vocab.safetensors"])
def test_a_card_or_vocab_the_hub_keeps_failing_to_serve_is_reported_with_what_to_do(hub, v1, path):
    repo = f"tester/unreadable-{path.replace('/', '-')}"
    push(v1, repo, tag="v1")
    down = hub.add_fault("GET", rf"/resolve/[0-9a-f]{{40}}/{re.escape(path)}$", status=503, times=None)
    with pytest.raises(
        HubError,
        match=rf"(?s)read {re.escape(path)} at commit [0-9a-f]{{12}} on {repo} failed: the Hub kept failing \(.*503.*\); "
        "re-run the same command once it answers again$",  # a read: no word of resuming a push
    ):
        load_cache(repo, revision="v1", layout="nemo", retry=Retry(retries=2, backoff=0.01))
    assert down.fired == 3  # the first try and two retries


@pytest.fixture
def client_waits_skipped(monkeypatch):
    """The client's own retries of a failing look-up, without their seconds of waiting."""
    import types

    import huggingface_hub.utils._http as client_http

    monkeypatch.setattr(client_http, "time", types.SimpleNamespace(sleep=lambda seconds: None, time=client_http.time.time))


# The client looks a file up (HEAD) before it downloads it; a look-up that keeps failing comes back
# as "not found locally", which is a failure of the Hub, not an answer that the file is missing.
@pytest.mark.parametrize("path", ["README.md", "vocab/vocab.safetensors"])
def test_a_card_or_vocab_look_up_the_hub_fails_is_retried_not_taken_for_a_missing_file(hub, v1, path, client_waits_skipped):
    repo = f"tester/look-up-{path.replace('/', '-')}"
    push(v1, repo, tag="v1")
    tries = hub.add_fault("HEAD", rf"/resolve/[0-9a-f]{{40}}/{re.escape(path)}$", status=503, times=None)
    with pytest.raises(HubError, match=rf"(?s)read {re.escape(path)} at commit [0-9a-f]{{12}} on {repo} failed: the Hub kept failing"):
        load_cache(repo, revision="v1", layout="nemo", retry=Retry(retries=2, backoff=0.01))
    client_tries = tries.fired // 3  # the client's own tries within each of ours
    assert client_tries > 1 and tries.fired == 3 * client_tries
    hub.clear_faults()
    hub.add_fault("HEAD", rf"/resolve/[0-9a-f]{{40}}/{re.escape(path)}$", status=503, times=client_tries)  # one of our tries' worth
    rows = list(load_cache(repo, revision="v1", layout="nemo", retry=Retry(retries=2, backoff=0.01)))
    assert_same_content(rows, list(load_cache(v1, layout="nemo")))


def test_a_root_card_the_hub_fails_to_serve_keeps_the_other_configs_in_the_index(hub, v1, v2, client_waits_skipped):
    from builder.manifest import card_data_of
    from dataset_card import index_from_card_data

    push(v1, "tester/index-kept", config="llama")
    outage = hub.add_fault("HEAD", r"/resolve/[0-9a-f]{40}/README\.md$", status=503, times=None)  # the root card only
    with pytest.raises(HubError, match=r"read root card.*the Hub kept failing"):
        push(v2, "tester/index-kept", config="short")  # an outage is not a repo without a root card
    assert outage.fired > 0
    hub.clear_faults()
    push(v2, "tester/index-kept", config="short")
    root = hub.state.blob_path(hub.files_at("tester/index-kept", "main")["README.md"].sha256).read_text()
    assert sorted(index_from_card_data(card_data_of(root))) == ["llama", "short"]
    assert_same_content(list(load_cache("tester/index-kept", name="llama", layout="raw")), decoded_rows(v1))


def test_an_unknown_revision_fails_at_once_with_the_known_ones(hub, pushed_v1, monkeypatch):
    import types

    import builder.hub as hub_module

    waits: list[float] = []
    monkeypatch.setattr(hub_module, "time", types.SimpleNamespace(sleep=waits.append))
    with pytest.raises(
        HubError,
        match=r"tester/dist: no revision 'v9'; branches and tags: \['main', 'v1'\]\. "
        r"Pass one of them as --revision \(revision= in Python\)",
    ):
        load_cache(pushed_v1, revision="v9", retry=Retry(retries=3))
    assert waits == [] and len(hub.requests("GET", r"/revision/v9")) == 1
    with pytest.raises(HubError, match=r"tester/missing: no local directory of that name, and no dataset repo on"):
        load_cache("tester/missing", retry=Retry(retries=3))
    assert waits == []


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Clients pointed at a loopback port nobody listens on (every connection refused), and our
    retries without their waits: the seconds they would have slept, in order."""
    import socket
    import types

    import builder.hub as hub_module

    with socket.socket() as probe:  # a free port, closed again: nothing answers there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    point_clients_at(f"http://127.0.0.1:{port}", monkeypatch)
    waits: list[float] = []
    monkeypatch.setattr(hub_module, "time", types.SimpleNamespace(sleep=waits.append))
    return types.SimpleNamespace(endpoint=f"http://127.0.0.1:{port}", waits=waits)


def test_a_mistyped_local_path_with_the_hub_unreachable_says_both(unreachable_hub, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # "caches/llama8b-sharegpt": no such folder here, and shaped like a repo id
    message = says(
        "caches/llama8b-sharegpt: no local directory of that name",
        f"the Hub at {unreachable_hub.endpoint} could not be reached",
        "check the path, or the network connection and HF_ENDPOINT",
    )
    with pytest.raises(HubError, match=message) as raised:
        load_cache("caches/llama8b-sharegpt", layout="nemo", retry=Retry(retries=2, backoff=0.01))
    assert "push" not in str(raised.value)  # a read: nothing to resume
    for command in (["export", "caches/llama8b-sharegpt", "--to", "nemo", "out"], ["verify", "caches/llama8b-sharegpt"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and "push" not in err, err
    # load_cache's own policy, then export's default one (verify's download is the client's, not retried)
    assert unreachable_hub.waits == [0.01, 0.02] + [Retry().wait(attempt) for attempt in range(Retry().retries)]


def test_a_push_to_a_hub_that_cannot_be_reached_says_to_check_the_network_and_the_endpoint(unreachable_hub, v1, capsys):
    message = says(
        f"the Hub at {unreachable_hub.endpoint}",
        "Connection refused",
        "check the network connection and HF_ENDPOINT",
        "re-run the same command",
    )
    with pytest.raises(HubError, match=message):
        push(v1, "tester/unreached")
    assert main(["push", str(v1), "tester/unreached"]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_push_refuses_a_directory_that_is_not_here_before_any_request(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubError, match=says("push: caches/llama8b-sharegpt does not exist", "expected a local cache directory")):
        push("caches/llama8b-sharegpt", "tester/x")
    (tmp_path / "a-file").write_text("")
    assert main(["push", "a-file", "tester/x"]) == 2
    assert "push: a-file is not a directory; expected a local cache directory" in capsys.readouterr().err
    assert not hub.requests()


# ---- access, arguments, command line ------------------------------------------------------------


def test_private_repo_needs_the_token(hub, v1, monkeypatch):
    push(v1, "tester/secret", private=True, tag="v1")
    assert hub.repo("tester/secret").private
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="private"):
        load_cache("tester/secret", revision="v1")
    assert len(list(load_cache("tester/secret", revision="v1", token=TOKEN, layout="raw", columns=["sample_id"]))) == 14


def test_a_repo_created_without_private_gets_its_namespaces_default_visibility(hub, v1):
    """As `hf upload` and `push_to_hub` do: only --private asks for a visibility; an organization whose new repos
    are private by default does not get a public dataset because the flag was left out."""
    hub.state.private_by_default.add("acme")
    push(v1, "acme/internal")
    assert hub.repo("acme/internal").private
    push(v1, "tester/open")
    assert not hub.repo("tester/open").private


# names the Hub refuses though made of the characters it takes
HUB_REFUSED_NAMES = ["tester/my--cache", "tester/my..cache", "tester/cache-", "tester/cache.", "tester-/cache", "tester/cache.git"]


def test_bad_arguments_fail_before_any_request(hub, v1, monkeypatch, tmp_path):
    for target, message in [
        (PushTarget("not a repo"), "repo id: expected 'user/name'"),
        *((PushTarget(name), f"repo id: expected 'user/name' .*got '{name}'") for name in HUB_REFUSED_NAMES),
        (PushTarget("tester/x", tag="v 1"), "--hub-tag: expected a git ref name"),
        (PushTarget("tester/x", config="data"), "--hub-config: expected a folder name"),
    ]:
        with pytest.raises(HubError, match=message):
            validate_target(target)
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    with pytest.raises(HubError, match=says("no Hugging Face token", "HF_TOKEN")):
        push(v1, "tester/x")
    with pytest.raises(FileNotFoundError, match="no README.md"):
        push_cache(tmp_path, PushTarget("tester/x", token=TOKEN))
    assert not hub.requests()


# git check-ref-format refuses these (and `git branch` a leading "-")
REFUSED_REFS = ["v1.", "a//b", "a/.b", ".v1", "x.lock/y", "x.lock", "a..b", "v1/", "v 1", "v1~", "a@{b", "-v1", "a\\b"]
ACCEPTED_REFS = ["v1", "v1.0", "release/2026-01", "a.b/c_d", "v1.lock.d", "x/lockd"]


@pytest.mark.parametrize("ref", REFUSED_REFS)
def test_a_tag_or_branch_name_git_refuses_is_refused_before_any_request(ref):
    for flag, target in (
        ("--hub-tag", PushTarget("tester/x", tag=ref, token=TOKEN)),
        ("--hub-branch", PushTarget("tester/x", branch=ref, token=TOKEN)),
    ):
        with pytest.raises(HubError, match=rf"^{flag}: expected a git ref name .*got {re.escape(repr(ref))}$"):
            validate_target(target)


@pytest.mark.parametrize("ref", ACCEPTED_REFS)
def test_a_tag_or_branch_name_git_accepts_is_accepted(ref):
    validate_target(PushTarget("tester/x", tag=ref, branch=ref, token=TOKEN))


def test_a_token_never_shows_in_the_repr_of_a_target_or_a_source():
    from builder.source import CacheSource

    target, source = PushTarget("tester/x", token="hf_secret_value"), CacheSource("tester/x", "", None, "0" * 40, "hf_secret_value")
    assert "hf_secret_value" not in repr(target) and "tester/x" in repr(target)
    assert "hf_secret_value" not in repr(source) and "tester/x" in repr(source)


def test_offline_mode_is_reported_and_not_retried(v1):  # no `hub` fixture: HF_HUB_OFFLINE=1 (conftest)
    with pytest.raises(HubError, match="no local directory of that name.*offline mode is enabled"):
        load_cache("tester/nowhere")
    with pytest.raises(HubError, match="offline mode is enabled"):
        push(v1, "tester/nowhere", retry=Retry(retries=3, backoff=5.0), token=TOKEN)  # would take 35 s if it retried


def test_push_command_line(hub, v1, capsys):
    assert main(["push", str(v1), "tester/cli", "--hub-branch", "dev", "--hub-tag", "dev-1", "--private"]) == 0
    out = capsys.readouterr().out
    assert "4 shards uploaded" in out and "load_cache('tester/cli', revision='dev-1', streaming=True)" in out
    repo = hub.repo("tester/cli")
    assert repo.private and repo.tags["dev-1"] == repo.branches["dev"]
    assert not data_files(hub, "tester/cli", "main")  # main untouched
    assert main(["push", str(v1), "tester/cli", "--hub-tag", "bad tag"]) == 2
    assert "--hub-tag: expected a git ref name" in capsys.readouterr().err


# ---- upload while building (the build calls ShardUploader; simulated here) ----------------------


def test_shard_uploader_keeps_few_shards_locally(hub, v1, tmp_path):
    import shutil

    out = tmp_path / "building"
    uploader = ShardUploader(PushTarget("tester/streamed", tag="v1"), delete_local=True, max_pending=1, retry=FAST)
    assert uploader.remote_shards() == {}
    for shard in read_manifest(v1)["shards"]:  # the build publishing shards one by one
        (out / "data").mkdir(parents=True, exist_ok=True)
        shutil.copy(v1 / "data" / shard["name"], out / "data" / shard["name"])
        uploader.upload(out / "data" / shard["name"])  # a fresh shard: the upload computes its sha256
        assert len(list((out / "data").glob("*.parquet"))) <= 3  # queued + uploading + just written
    uploader.wait()  # every rank, before the build's final barrier
    assert "README.md" not in hub.files_at("tester/streamed", "main") and not hub.repo("tester/streamed").tags
    for item in ("README.md", "vocab", "images"):  # rank 0 writes vocab, pictures and card last
        (shutil.copytree if (v1 / item).is_dir() else shutil.copy)(v1 / item, out / item)
    result = uploader.finish(out, read_manifest(v1))  # the build hands over the manifest it assembled
    assert not list((out / "data").glob("*.parquet")) and len(result.uploaded) == 4
    assert hub.repo("tester/streamed").tags["v1"] == result.commit
    assert_same_content(list(load_cache("tester/streamed", revision="v1", layout="raw")), decoded_rows(v1))
    assert set(ShardUploader(PushTarget("tester/streamed"), retry=FAST).remote_shards()) == {s["name"] for s in read_manifest(v1)["shards"]}


def test_a_cancelled_uploader_does_not_wait_for_a_request_that_never_returns(hub, v1, tmp_path, monkeypatch, caplog):
    # The Hub client sets no read timeout: a commit whose connection stalled never returns. A build
    # that failed or was interrupted meanwhile must still stop, and raise its own error.
    import shutil

    import builder.push as push_module

    stalled, released = threading.Event(), threading.Event()

    def a_request_that_stalls(self, shards):
        stalled.set()
        released.wait()  # until the test ends: the connection never answers
        raise ConnectionError("stalled")

    monkeypatch.setattr(push_module.HubPusher, "upload_shards", a_request_that_stalls)
    monkeypatch.setattr(push_module, "CANCEL_GRACE_S", 0.05)
    uploader = ShardUploader(PushTarget("tester/stalled", tag="v1"), delete_local=True, retry=FAST)
    name = read_manifest(v1)["shards"][0]["name"]
    (tmp_path / "data").mkdir()
    shutil.copy(v1 / "data" / name, tmp_path / "data" / name)
    uploader.upload(tmp_path / "data" / name)
    assert stalled.wait(60)  # the uploader thread is inside the request
    try:
        with caplog.at_level(logging.WARNING, logger="builder.push"):
            closing = threading.Thread(target=uploader.close, kwargs={"cancel": True})
            closing.start()
            closing.join(60)  # a bound for the failure case only: a stopping build returns within CANCEL_GRACE_S
        assert not closing.is_alive() and uploader._thread.is_alive()  # close returned though the request never will
        assert "did not end within" in caplog.text and "a --resume sends that shard" in caplog.text
        assert (tmp_path / "data" / name).read_bytes() == (v1 / "data" / name).read_bytes()  # kept for the resume
    finally:
        released.set()
    uploader._thread.join(60)
    assert (tmp_path / "data" / name).exists() and not hub.files_at("tester/stalled", "main").get(f"data/{name}")


def shards_being_built(v1, folder: Path) -> list[Path]:
    """v1's shards as a build writes them into `folder`, in order (no build records: nothing else is written)."""
    import shutil

    (folder / "data").mkdir(parents=True)
    return [Path(shutil.copy(v1 / "data" / shard["name"], folder / "data" / shard["name"])) for shard in read_manifest(v1)["shards"]]


def test_an_uploader_commits_at_most_as_many_shards_at_once_as_its_queue_holds(hub, v1, tmp_path, monkeypatch):
    """Local disk holds at most the queued shards, the one uploading and the one being written: a shard the
    build hands over while a commit's batch forms waits for the next commit, not joining this one."""
    import queue

    import builder.push as push_module

    class WriterWaitingForRoom(queue.Queue):
        """The uploader's queue as a build fills it: a shard handed over while it is full goes in as soon as
        a place frees, as the build's writer, waiting on the full queue, puts it there."""

        def __init__(self, maxsize: int):
            super().__init__(maxsize)
            self.waiting: list = []

        def put(self, item, block=True, timeout=None):
            with self.mutex:
                if self._qsize() >= self.maxsize:
                    self.waiting.append(item)
                    return
            super().put(item, block, timeout)

        def _get(self):
            item = super()._get()
            if self.waiting:
                self._put(self.waiting.pop(0))
            return item

    real_upload, batches, uploading, handed_over = push_module.HubPusher.upload_shards, [], threading.Event(), threading.Event()

    def upload_shards(self, shards):
        batches.append([Path(path).name for path, _ in shards])
        uploading.set()
        assert handed_over.wait(60)  # the first shard uploads while the build hands over the others
        return real_upload(self, shards)

    monkeypatch.setattr(push_module, "queue", SimpleNamespace(Queue=WriterWaitingForRoom, Empty=queue.Empty, Full=queue.Full))
    monkeypatch.setattr(push_module.HubPusher, "upload_shards", upload_shards)
    uploader = ShardUploader(PushTarget("tester/bounded-batches"), delete_local=True, max_pending=2, retry=FAST)
    shards = shards_being_built(v1, tmp_path)
    uploader.upload(shards[0])
    assert uploading.wait(60)
    for path in shards[1:]:
        uploader.upload(path)
    handed_over.set()
    uploader.wait()
    names = [path.name for path in shards]
    assert batches == [names[:1], names[1:3], names[3:]]
    assert data_files(hub, "tester/bounded-batches", "main") == [f"data/{name}" for name in names]
    assert not any(path.exists() for path in shards)


def test_after_a_failed_upload_the_queued_shards_are_neither_sent_nor_deleted(hub, v1, tmp_path, monkeypatch):
    """The build learns of the failure at its next hand-over; meanwhile a queued shard is not sent (the failure
    stops the uploads) and stays on disk, where a resume finds it."""
    import builder.push as push_module

    real_upload, uploading, queued = push_module.HubPusher.upload_shards, threading.Event(), threading.Event()

    def upload_shards(self, shards):
        uploading.set()
        assert queued.wait(60)  # the next shard is queued while this one uploads
        return real_upload(self, shards)

    monkeypatch.setattr(push_module.HubPusher, "upload_shards", upload_shards)
    repo = "tester/failed-upload"
    uploader = ShardUploader(PushTarget(repo), delete_local=True, max_pending=1, retry=FAST)
    shards = shards_being_built(v1, tmp_path)[:2]
    refused = hub.add_fault("POST", r"/commit/", status=403)  # the first commit only
    uploader.upload(shards[0])
    assert uploading.wait(60)
    uploader.upload(shards[1])
    queued.set()
    with pytest.raises(
        HubError, match=f"uploading shards to {repo} failed: upload {shards[0].name} on {repo} failed: the token has no write"
    ):
        uploader.wait()
    assert refused.fired == 1 and len(hub.requests("POST", r"/commit/")) == 1
    assert all(path.exists() for path in shards) and uploader.uploaded == []
    sent = {path.rsplit("/", 1)[1] for _, path, _ in hub.requests("PUT", r"/lfs-upload/")}
    assert file_hash(shards[1], "sha256") not in sent and data_files(hub, repo, "main") == []


def test_a_shard_whose_recorded_sha256_the_branch_lacks_is_uploaded_before_it_is_deleted(hub, v1, tmp_path):
    """A resumed build hands over the sha256 an earlier upload recorded: a shard the branch holds with it is
    not sent again, and one it does not hold (another branch's upload, a branch reset since) is sent before
    its local copy goes: never is a shard deleted here that the Hub lacks."""
    repo = "tester/recorded-sha256"
    on_hub, missing = shards_being_built(v1, tmp_path / "earlier")[0], shards_being_built(v1, tmp_path / "resumed")[:2]
    earlier = ShardUploader(PushTarget(repo), retry=FAST)
    earlier.upload(on_hub)
    earlier.wait()
    sha256 = {path.name: file_hash(path, "sha256") for path in missing}
    hub.reset_counters()
    uploader = ShardUploader(PushTarget(repo), delete_local=True, retry=FAST)
    for path in missing:
        uploader.upload(path, sha256[path.name])
    uploader.wait()
    assert uploader.uploaded == [missing[1].name] and not any(path.exists() for path in missing)
    files = hub.files_at(repo, "main")
    assert {name: files[f"data/{name}"].sha256 for name in sha256} == sha256
    assert [path.rsplit("/", 1)[1] for _, path, _ in hub.requests("PUT", r"/lfs-upload/")] == [sha256[missing[1].name]]


def test_loopback_hub_speaks_the_listing_and_range_api(hub, pushed_v1, v1):
    """The server itself, through the real client: paths-info, trees, refs, commits, HEAD, Range."""
    from huggingface_hub import HfApi, HfFileSystem

    api = HfApi(endpoint=hub.url, token=TOKEN)
    name = "data/train-00001-of-00004.parquet"
    (info,) = api.get_paths_info(pushed_v1, [name, "no/such/file"], repo_type="dataset", revision="v1")
    local = (v1 / name).read_bytes()
    assert info.size == len(local) and info.lfs.sha256 == file_hash(v1 / name, "sha256")
    top = {e.path for e in api.list_repo_tree(pushed_v1, repo_type="dataset", revision="v1")}
    assert {"README.md", ".gitattributes", "data", "vocab", "images"} == top
    assert [t.name for t in api.list_repo_refs(pushed_v1, repo_type="dataset").tags] == ["v1"]
    assert len(api.list_repo_commits(pushed_v1, repo_type="dataset", revision="v1")) == 3  # initial, shards, card
    assert api.file_exists(pushed_v1, name, repo_type="dataset", revision="v1")
    assert not api.file_exists(pushed_v1, "data/nope.parquet", repo_type="dataset", revision="v1")
    fs = HfFileSystem(endpoint=hub.url, token=TOKEN)
    with fs.open(f"datasets/{pushed_v1}@v1/{name}", "rb", block_size=256) as f:  # ranged reads
        f.seek(1000)
        assert f.read(64) == local[1000:1064]
    assert fs.cat_file(f"datasets/{pushed_v1}@v1/{name}", start=-8) == local[-8:]  # footer: a suffix Range


def test_a_shard_changed_after_the_build_is_never_pushed(hub, tmp_path):
    cfg = small_config(tmp_path / "cache", max_samples=8)
    cache = build(cfg, progress=False).output_dir
    reference = decoded_rows(cache)
    shard = sorted((cache / "data").glob("*.parquet"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1  # one bit, inside a value: the file still reads as Parquet
    shard.write_bytes(bytes(data))
    with pytest.raises(HubError, match=rf"{shard.name}: the manifest records xxh3_128 \w+, the file has xxh3_128 \w+: it changed"):
        push(cache, "tester/damaged", tag="v1")
    assert data_files(hub, "tester/damaged", "main") == []  # checked before the first upload
    assert "v1" not in hub.repo("tester/damaged").tags

    shard.unlink()  # as the message says: recompute it, then push
    build(cfg.replace(resume=True), progress=False)
    push(cache, "tester/damaged", tag="v1")
    assert_same_content(list(load_cache("tester/damaged", revision="v1", layout="raw")), reference)


# ---- the cache's lock: no push of a cache a build writes -------------------------------------

HOLD_BUILD_LOCK = """
import sys
from builder.lock import CacheLock
CacheLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()  # holds the lock until killed, however long the test takes
"""


def test_a_push_is_refused_while_a_build_writes_the_cache_naming_it(hub, v1, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_BUILD_LOCK, str(v1)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refusal = says(f"{v1} is being written by a build", f"pid {holder.pid}", "Nothing was uploaded", "Wait for that build to finish")
        with pytest.raises(CacheLocked, match=refusal):
            push(v1, "tester/building", tag="v1")
        assert main(["push", str(v1), "tester/building"]) == 2
        assert "run this push again" in capsys.readouterr().err
        assert not hub.requests()  # refused before any request
    finally:
        holder.kill()
        holder.wait()
    push(v1, "tester/building", tag="v1")  # the build is gone, and its lock with it
    assert_same_content(list(load_cache("tester/building", revision="v1", layout="raw")), decoded_rows(v1))


def test_a_push_by_a_user_who_may_not_write_the_lock_files_still_takes_the_lock(hub, v1, monkeypatch):
    """A group-shared cache whose lock files this user may only read (a umask 022 build): flock needs no write access."""
    import builder.lock as lock_module

    real_open = os.open

    def read_only_lock_files(path, flags, *args):
        if Path(path).parent == v1 / ".eagle3_build" and flags & os.O_ACCMODE != os.O_RDONLY:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    holder = subprocess.Popen([sys.executable, "-c", HOLD_BUILD_LOCK, str(v1)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(lock_module.os, "open", read_only_lock_files)
        with pytest.raises(CacheLocked, match=says(f"{v1} is being written by a build", f"pid {holder.pid}")):
            push(v1, "tester/shared-folder")
    finally:
        holder.kill()
        holder.wait()
    push(v1, "tester/shared-folder")


def test_a_cache_whose_build_records_this_user_may_not_write_is_pushed(hub, v1, tmp_path, monkeypatch):
    """A group member pushing a cache another member built (umask 022): the build records, where a push keeps each
    shard's sha256 to skip hashing it again, are read-only to them. Keeping it is a saving, not a need."""
    import shutil

    import builder.push as push_module

    cache = tmp_path / "cache"
    shutil.copytree(v1, cache)
    for record in (cache / ".eagle3_build" / "shards").glob("*.json"):  # as the build left them: no sha256 yet
        record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "sha256"}))
    records = {p.name: p.read_bytes() for p in (cache / ".eagle3_build" / "shards").glob("*.json")}

    def refused(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(push_module, "write_json_atomic", refused)
    result = push(cache, "tester/group-member", tag="v1")
    assert len(result.uploaded) == 4
    assert {p.name: p.read_bytes() for p in (cache / ".eagle3_build" / "shards").glob("*.json")} == records
    assert_same_content(list(load_cache("tester/group-member", revision="v1", layout="raw")), decoded_rows(v1))


def test_a_push_is_refused_while_ranks_of_a_build_whose_first_process_stopped_still_write(hub, v1):
    still_writing = WriterHold(v1)  # a rank of a build whose rank 0 (and its cache lock) is gone
    still_writing.hold()
    try:
        with pytest.raises(CacheLocked, match=says(f"{v1} is still being written by processes of a build", "Stop them", "push again")):
            push(v1, "tester/orphans")
        assert not hub.requests()
    finally:
        still_writing.release()
    push(v1, "tester/orphans")


def test_a_build_or_another_push_is_refused_while_a_push_reads_the_cache(hub, tmp_path, monkeypatch):
    import builder.push as push_module

    cfg = small_config(tmp_path / "cache", max_samples=4)
    cache = build(cfg, progress=False).output_dir
    before = published_files(cache)
    real_upload, refusals = push_module.HubPusher.upload_shards, []

    def others_start_meanwhile(self, shards):
        for start in (lambda: build(cfg.replace(resume=True), progress=False), lambda: push(cache, "tester/elsewhere")):
            with pytest.raises(CacheLocked, match=says(f"{cache} is being pushed", f"pid {os.getpid()}", "Wait for that push")) as err:
                start()
            refusals.append(str(err.value))
        return real_upload(self, shards)

    monkeypatch.setattr(push_module.HubPusher, "upload_shards", others_start_meanwhile)
    push(cache, "tester/pushing", tag="v1")
    assert len(refusals) == 2 and "run this build again" in refusals[0] and "run this push again" in refusals[1]
    assert "tester/elsewhere" not in {repo_id for _, repo_id in hub.state.repos}
    assert published_files(cache) == before  # nothing of the cache changed
    monkeypatch.setattr(push_module.HubPusher, "upload_shards", real_upload)
    push(cache, "tester/elsewhere")  # the push let go of the lock
    build(cfg.replace(resume=True), progress=False)


def published_files(cache: Path) -> dict[str, bytes]:
    """Every file of a cache but its build state."""
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file() and ".eagle3_build" not in p.parts}


def test_a_copied_cache_without_build_state_is_pushed_and_given_none(hub, v1, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(v1, copy, ignore=shutil.ignore_patterns(".eagle3_build"))
    push(copy, "tester/copied", tag="v1")
    assert not (copy / ".eagle3_build").exists()
    assert_same_content(list(load_cache("tester/copied", revision="v1", layout="raw")), decoded_rows(v1))


def commit_their_files(hub, repo: str, files: dict[str, str]) -> str:
    """Another dataset's files, committed to a new repo; returns the commit."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo(repo, repo_type="dataset")
    ops = [CommitOperationAdd(path, text.encode()) for path, text in files.items()]
    return api.create_commit(repo, ops, commit_message="their data", repo_type="dataset").oid


def test_a_repo_holding_other_data_keeps_its_card_and_files(hub, v1):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=TOKEN)
    card = "---\nlicense: mit\n---\n# Team chats\n"
    commit_their_files(hub, "tester/team", {"README.md": card, "data/chats.csv": "a,b\n"})
    commit_their_files(hub, "tester/cardless", {"data/chats.csv": "a,b\n"})

    with pytest.raises(HubError, match=r"tester/team@main has a dataset card that is not an eagle3-cache card: a push would replace it"):
        push(v1, "tester/team", tag="v1")
    with pytest.raises(HubError, match=r"not an eagle3-cache card"):
        push(v1, "tester/team", config="llama")  # an index card would replace it too
    assert Path(api.hf_hub_download("tester/team", "README.md", repo_type="dataset")).read_text() == card
    assert data_files(hub, "tester/team", "main") == ["data/chats.csv"]
    assert "v1" not in hub.repo("tester/team").tags

    push(v1, "tester/cardless", tag="v1")  # no card to replace: the cache goes in, beside their file
    assert "data/chats.csv" in data_files(hub, "tester/cardless", "v1")
    assert sample_ids(load_cache("tester/cardless", revision="v1", layout="raw")) == sample_ids(load_cache(v1, layout="raw"))

    # Their files may have names a cache's shards have (v1 has 4 shards): not its own, so never removed.
    theirs = [f"data/train-0000{k}-of-00003.parquet" for k in range(3)]
    for repo, config in (("tester/their-shards", None), ("tester/their-config", "llama")):
        prefix = f"{config}/" if config else ""
        commit_their_files(hub, repo, {f"{prefix}{path}": "their rows" for path in theirs})
        assert push(v1, repo, tag="v1", config=config).deleted == []
        assert {f"{prefix}{path}" for path in theirs} <= set(hub.files_at(repo, "v1"))
        rows = load_cache(repo, name=config, revision="v1", layout="raw")
        assert sample_ids(rows) == sample_ids(load_cache(v1, layout="raw"))


def test_a_push_never_writes_over_another_datasets_files(hub, v1):
    """In a folder no eagle3-cache card describes, a file of a name the push writes (or one its card
    would read as a shard) is another dataset's: the push is refused before anything is sent."""
    mine = sorted(p.name for p in (v1 / "data").glob("*.parquet"))
    cases = [  # repo, config, their files, those the push would write over or read as its shards
        ("tester/clash-shard", None, {f"data/{mine[1]}": "their rows", "data/notes.txt": "theirs"}, [f"data/{mine[1]}"]),
        ("tester/clash-stray", None, {"data/train-00009-of-00004.parquet": "their rows"}, ["data/train-00009-of-00004.parquet"]),
        ("tester/clash-vocab", None, {"vocab/vocab.safetensors": "their vocab"}, ["vocab/vocab.safetensors"]),
        (
            "tester/clash-config",
            "llama",
            {"llama/README.md": "# theirs\n", f"llama/data/{mine[0]}": "x"},
            [f"llama/data/{mine[0]}", "llama/README.md"],
        ),
    ]
    for repo, config, files, clashes in cases:
        before = commit_their_files(hub, repo, files)
        hub.reset_counters()
        folder = "folder llama/" if config else "its root"
        with pytest.raises(
            HubError,
            match=rf"{repo}@main: no eagle3-cache card describes {folder}, so its files are taken as another dataset's; expected "
            rf"none there .*, found {len(clashes)} \({re.escape(', '.join(clashes))}\)\. None of them was changed\. .*Push to a new repo",
        ) as refused:
            push(v1, repo, tag="v1", config=config)
        only_shards = all(name.startswith("data/") and name.endswith(".parquet") for name in clashes)
        assert ("an interrupted push or upload-while-building" in str(refused.value)) == only_shards, repo
        assert hub.repo(repo).branches["main"] == before and not hub.repo(repo).tags
        assert hub.state.bytes_uploaded == 0 and not hub.requests("POST", r"/preupload/|/commit/")

    # As the message says: once their file is gone, the cache goes in beside the rest of their data.
    from huggingface_hub import HfApi

    HfApi(endpoint=hub.url, token=TOKEN).delete_file(f"data/{mine[1]}", "tester/clash-shard", repo_type="dataset")
    push(v1, "tester/clash-shard", tag="v1")
    assert "data/notes.txt" in hub.files_at("tester/clash-shard", "v1")
    assert_same_content(list(load_cache("tester/clash-shard", revision="v1", layout="raw")), decoded_rows(v1))


def test_a_branch_in_the_middle_of_a_push_is_refused_and_its_tag_still_reads(hub, v1, v2):
    push(v1, "tester/midpush", tag="v1")
    hub.add_fault("POST", r"/commit/", action="drop", skip=1, times=None)  # v2's first shard lands, then the push stops
    with pytest.raises(HubError, match="re-run the same command"):
        push_cache(v2, PushTarget("tester/midpush", tag="v2"), retry=FAST, shards_per_commit=1)
    hub.clear_faults()
    # main: v1's card over v1's shards plus one of v2's, which has a name of its own (3 shards): v1's card
    # names its 2 shards exactly, so main still reads v1 (v2's shards of v1's names: the next test)
    from huggingface_hub import HfApi

    files = HfApi(endpoint=hub.url, token=TOKEN).list_repo_files("tester/midpush", repo_type="dataset")
    assert "data/train-00000-of-00003.parquet" in files
    assert_same_content(list(load_cache("tester/midpush", layout="raw")), decoded_rows(v1))
    assert_same_content(list(load_cache("tester/midpush", revision="v1", layout="raw")), decoded_rows(v1))
    # A card pushed before cards named the shard count (`data/train-*`) reads v2's shard too: refused.
    api, wide = HfApi(endpoint=hub.url, token=TOKEN), "tester/midpush-wide"
    push(v1, wide)
    card = Path(api.hf_hub_download(wide, "README.md", repo_type="dataset")).read_text()
    card = re.sub(r"path: data/\S+", "path: data/train-*", card)
    api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=wide, repo_type="dataset")
    shard = v2 / "data" / "train-00000-of-00003.parquet"
    api.upload_file(path_or_fileobj=shard.read_bytes(), path_in_repo=f"data/{shard.name}", repo_id=wide, repo_type="dataset")
    with pytest.raises(
        ShardFilesMismatch,
        match=r"tester/midpush-wide@\w+: the shard files in data/ are not the ones its card lists"
        r" \(not in the manifest: train-00000-of-00003\.parquet\)\. That revision is a push in progress.*read the tag"
        r" of a finished push \(--revision, revision= in Python\)",
    ):
        load_cache("tester/midpush-wide", layout="raw")


def test_a_push_under_way_with_shards_of_the_same_names_and_sizes_is_refused(hub, v1):
    """Builds that differ only in content (other aux layers, another checkpoint of one architecture)
    write shards of the same names and often the same sizes: the pushed card's sha256 tells them apart."""
    from huggingface_hub import HfApi

    push(v1, "tester/samesize", tag="v1")
    shards = sorted((v1 / "data").glob("*.parquet"))
    card = read_manifest("tester/samesize", revision="v1")
    assert [s["sha256"] for s in card["shards"]] == [file_hash(p, "sha256") for p in shards]  # each shard's LFS oid
    theirs = bytearray(shards[1].read_bytes())
    theirs[len(theirs) // 2] ^= 0xFF  # another build's shard: same name, same size, other bytes
    HfApi(endpoint=hub.url, token=TOKEN).upload_file(
        path_or_fileobj=bytes(theirs), path_in_repo=f"data/{shards[1].name}", repo_id="tester/samesize", repo_type="dataset"
    )
    with pytest.raises(
        ShardFilesMismatch,
        match=rf"are not the ones its card lists \(another sha256 than recorded: {shards[1].name}\)\. That revision is a push in progress",
    ):
        load_cache("tester/samesize", layout="raw")
    assert_same_content(list(load_cache("tester/samesize", revision="v1", layout="raw")), decoded_rows(v1))


def test_a_shard_replaced_while_the_card_is_committed_is_never_tagged(hub, v1, monkeypatch):
    from huggingface_hub import CommitOperationAdd, HfApi

    import builder.push as push_module

    api, real_commit, raced = HfApi(endpoint=hub.url, token=TOKEN), push_module.HubPusher._commit_on, []

    def another_push_lands_first(self, head, *args, **kwargs):  # between our shard check and our card commit
        if not raced:
            raced.append(
                api.create_commit(
                    "tester/raced",
                    [CommitOperationAdd("data/train-00000-of-00004.parquet", b"theirs")],
                    commit_message="another push",
                    repo_type="dataset",
                )
            )
        return real_commit(self, head, *args, **kwargs)

    monkeypatch.setattr(push_module.HubPusher, "_commit_on", another_push_lands_first)
    with pytest.raises(HubError, match=r"1 shard\(s\) of this cache are not on the branch, or were replaced there \(train-00000-of-00004"):
        push(v1, "tester/raced", tag="v1")
    assert ("POST", "/api/datasets/tester/raced/commit/main", 412) in hub.requests("POST")  # the card's commit, refused
    assert "v1" not in hub.repo("tester/raced").tags and "README.md" not in hub.files_at("tester/raced", "main")


def test_a_re_run_whose_card_commit_has_nothing_new_never_tags_a_shard_replaced_meanwhile(hub, v1, monkeypatch):
    """A re-run after the tag step failed finds its card already on the branch: the client then sends
    no commit and answers with the branch's head as it is now, which another push may have moved."""
    from huggingface_hub import CommitOperationAdd, HfApi

    import builder.push as push_module

    hub.add_fault("POST", r"/tag/", status=502, times=None)
    with pytest.raises(HubError, match="create tag on tester/noop-card failed"):
        push(v1, "tester/noop-card", tag="v1")
    hub.clear_faults()
    assert "README.md" in hub.files_at("tester/noop-card", "main") and "v1" not in hub.repo("tester/noop-card").tags

    api, real_commit, raced = HfApi(endpoint=hub.url, token=TOKEN), push_module.HubPusher._commit_on, []

    def another_push_lands_first(self, head, *args, **kwargs):  # between our shard check and our card commit
        if not raced:
            ours = CommitOperationAdd("data/train-00000-of-00004.parquet", b"theirs")
            raced.append(api.create_commit("tester/noop-card", [ours], commit_message="another push", repo_type="dataset").oid)
        return real_commit(self, head, *args, **kwargs)

    monkeypatch.setattr(push_module.HubPusher, "_commit_on", another_push_lands_first)
    with pytest.raises(HubError, match=r"1 shard\(s\) of this cache are not on the branch, or were replaced there \(train-00000-of-00004"):
        push(v1, "tester/noop-card", tag="v1")
    assert "v1" not in hub.repo("tester/noop-card").tags
    assert hub.repo("tester/noop-card").branches["main"] == raced[0]  # nothing committed on top of theirs


def test_a_branch_that_keeps_moving_under_the_card_commit_is_reported(hub, v1, monkeypatch):
    from huggingface_hub import CommitOperationAdd, HfApi

    import builder.push as push_module

    api, real_commit, others = HfApi(endpoint=hub.url, token=TOKEN), push_module.HubPusher._commit_on, []

    def another_commit_lands_first(self, head, *args, **kwargs):
        others.append(CommitOperationAdd(f"notes/{len(others)}.txt", b"theirs"))
        api.create_commit("tester/busy", [others[-1]], commit_message="their notes", repo_type="dataset")
        return real_commit(self, head, *args, **kwargs)

    monkeypatch.setattr(push_module.HubPusher, "_commit_on", another_commit_lands_first)
    with pytest.raises(HubError, match=r"tester/busy@main: the branch moved 3 times while pushing .* re-run the push once they are done"):
        push(v1, "tester/busy", tag="v1")
    assert len(others) == 3 and "v1" not in hub.repo("tester/busy").tags and "README.md" not in hub.files_at("tester/busy", "main")


def test_a_push_publishes_only_the_cache_and_a_later_version_removes_the_files_it_no_longer_has(hub, v1, tmp_path):
    from builder.card import existing_pictures

    hidden = build(small_config(tmp_path / "hidden", target_format="hidden", max_samples=8), progress=False).output_dir
    (hidden / "build.log").write_text("run by alice@node-7\n")  # e.g. `eagle3-cache build ... | tee caches/x/build.log`
    (hidden / "nemo").mkdir()
    (hidden / "nemo" / "target_embeddings.safetensors").write_bytes(b"the target's input-embedding table")
    (hidden / "vocab" / "vocab.safetensors.bak").write_bytes(b"a copy kept by hand")
    push(hidden, "tester/only-cache", tag="hidden")
    pictures = {path for path, _ in existing_pictures(hidden)}
    assert len(pictures) == 2
    expected = {".gitattributes", "README.md", "vocab/vocab.safetensors", "vocab/lm_head.safetensors", *pictures}
    assert set(hub.files_at("tester/only-cache", "hidden")) - set(data_files(hub, "tester/only-cache", "hidden")) == expected
    files_of_hidden = hub.files_at("tester/only-cache", "hidden")

    # A topk version replaces it: the hidden cache's head rows leave the branch with its shards; its tag keeps them.
    second = push(v1, "tester/only-cache", tag="topk")
    assert "vocab/lm_head.safetensors" in second.deleted and "vocab/lm_head.safetensors" not in hub.files_at("tester/only-cache", "topk")
    assert set(hub.files_at("tester/only-cache", "topk")) - set(data_files(hub, "tester/only-cache", "topk")) == expected - {
        "vocab/lm_head.safetensors"
    }
    assert hub.files_at("tester/only-cache", "hidden") == files_of_hidden
    assert_same_content(list(load_cache("tester/only-cache", revision="topk", layout="raw")), decoded_rows(v1))


def test_a_push_is_refused_before_any_upload_when_the_cache_misses_a_file_its_manifest_names(hub, tmp_path):
    cache = build(small_config(tmp_path / "cache", max_samples=4), progress=False).output_dir
    (cache / "vocab" / "vocab.safetensors").unlink()
    with pytest.raises(HubError, match=r"vocab\.safetensors: the manifest names this file, but the cache folder does not hold it\. Run"):
        push(cache, "tester/no-vocab", tag="v1")
    assert data_files(hub, "tester/no-vocab", "main") == [] and hub.state.bytes_uploaded == 0


def test_a_card_naming_the_head_rows_at_another_path_is_refused_before_any_upload(hub, tmp_path):
    """A push publishes a `hidden` cache's head rows where builds write them: a card edited to name another
    file would reach the Hub naming a file the push never sends, and no read of that push would open."""
    import shutil

    from helpers import front_matter_edited

    cache = build(small_config(tmp_path / "hidden", target_format="hidden", max_samples=4), progress=False).output_dir
    shutil.copy(cache / "vocab" / "lm_head.safetensors", cache / "vocab" / "head_rows.safetensors")  # the file the card names is here

    def head_rows_elsewhere(data: dict) -> None:
        data["eagle3_cache"]["lm_head_file"]["path"] = "vocab/head_rows.safetensors"

    (cache / "README.md").write_text(front_matter_edited((cache / "README.md").read_text(), head_rows_elsewhere))
    with pytest.raises(
        HubError,
        match=says(
            "the manifest names 'vocab/head_rows.safetensors' as the file of the head rows; expected 'vocab/lm_head.safetensors'",
            "The card was edited after the build: build the cache again, then push.",
        ),
    ):
        push(cache, "tester/head-rows-elsewhere", tag="v1")
    assert data_files(hub, "tester/head-rows-elsewhere", "main") == [] and hub.state.bytes_uploaded == 0


def test_a_tag_naming_another_configs_push_is_refused_before_any_upload(hub, v1, v2):
    """The tag's commit holds no card of this config: the tag names something else, which a push never moves."""
    repo = "tester/tag-of-another-config"
    first = push(v1, repo, config="llama", tag="v1")
    hub.reset_counters()
    with pytest.raises(
        HubError,
        match=says(
            f"--hub-tag v1: the tag already exists on {repo} and names something else, not this cache ({read_manifest(v2)['fingerprint']})",
            "choose a new tag",
        ),
    ):
        push(v2, repo, config="short", tag="v1")
    assert hub.state.bytes_uploaded == 0 and not hub.requests("POST", r"/preupload/|/commit/")
    assert hub.repo(repo).tags == {"v1": first.commit} and hub.repo(repo).branches["main"] == first.commit


def test_files_in_a_sub_folder_of_data_are_not_taken_as_shards(hub, v1):
    """A card's shard pattern reads the files of data/ itself, none of a sub-folder: another dataset's files
    there, named as this cache's shards are, neither refuse the push nor are read as its rows, and stay."""
    repo = "tester/data-sub-folder"
    theirs = "data/train-v0/train-00001-of-00004.parquet"
    commit_their_files(hub, repo, {theirs: "their rows"})
    result = push(v1, repo, tag="v1")
    assert result.deleted == [] and theirs in hub.files_at(repo, "v1")
    assert_same_content(list(load_cache(repo, revision="v1", layout="raw")), decoded_rows(v1))


def test_a_new_version_removes_only_the_shards_of_the_earlier_one_and_keeps_a_users_files(hub, v1, v2):
    """Files a user added beside the shards (notes, a backup copy of a shard) are not the cache's to remove."""
    repo = "tester/users-files"
    push(v1, repo, tag="v1")
    users = {"data/notes.txt": "where these rows come from\n", "data/train-00000-of-00004.parquet.bak": "a copy kept by hand"}
    for path, text in users.items():
        commit_card(hub, repo, path, text)
    second = push(v2, repo, tag="v2")
    assert second.deleted == [f"data/train-0000{k}-of-00004.parquet" for k in range(4)]
    assert data_files(hub, repo, "v2") == sorted([*users, *(f"data/train-0000{k}-of-00003.parquet" for k in range(3))])
    assert_same_content(list(load_cache(repo, revision="v2", layout="raw")), decoded_rows(v2))


def test_another_datasets_file_committed_while_the_shards_upload_is_never_written_over(hub, v1, monkeypatch):
    """The folder held nothing of another dataset when the push began; their vocab, committed while the shards
    uploaded, is found at the card's commit: the push stops there, and their file stays as they wrote it."""
    from huggingface_hub import CommitOperationAdd, HfApi

    import builder.push as push_module

    repo, api = "tester/theirs-meanwhile", HfApi(endpoint=hub.url, token=TOKEN)
    real_upload, theirs = push_module.HubPusher.upload_shards, []

    def their_commit_lands_meanwhile(self, shards):
        shas = real_upload(self, shards)
        if not theirs:
            ops = [CommitOperationAdd("vocab/vocab.safetensors", b"their vocab")]
            theirs.append(api.create_commit(repo, ops, commit_message="their data", repo_type="dataset").oid)
        return shas

    monkeypatch.setattr(push_module.HubPusher, "upload_shards", their_commit_lands_meanwhile)
    with pytest.raises(
        HubError,
        match=says(
            f"{repo}@main: no eagle3-cache card describes its root, so its files are taken as another dataset's",
            "found 1 (vocab/vocab.safetensors). None of them was changed.",
        ),
    ):
        push(v1, repo, tag="v1")
    assert hub.repo(repo).branches["main"] == theirs[0] and not hub.repo(repo).tags
    assert hub_text(hub, repo, path="vocab/vocab.safetensors") == "their vocab" and "README.md" not in hub.files_at(repo, "main")


def test_a_folder_the_index_card_does_not_list_is_another_datasets_and_left_alone(hub, v1, v2):
    """Only a config the root index lists is a folder of eagle3-cache's: in any other, a push of that config
    removes nothing, even files named as shards are."""
    repo = "tester/unlisted-folder"
    push(v1, repo, config="llama")
    theirs = ["short/data/train-00000-of-00002.parquet", "short/data/train-00001-of-00002.parquet"]
    for path in theirs:
        commit_card(hub, repo, path, "their rows")
    result = push(v2, repo, config="short", tag="short-v1")
    assert result.deleted == [] and set(theirs) <= set(hub.files_at(repo, "short-v1"))
    assert_same_content(list(load_cache(repo, name="short", revision="short-v1", layout="raw")), decoded_rows(v2))


def test_a_tag_another_push_created_meanwhile_is_reported_not_taken_for_this_one(hub, v1, monkeypatch):
    """Tags name immutable versions: one that another push created while this one ran names their commit, so
    the push fails saying what the tag names and how to name this cache; the tag stays theirs."""
    from huggingface_hub import HfApi

    import builder.push as push_module

    repo, api = "tester/tag-race", HfApi(endpoint=hub.url, token=TOKEN)
    real_commit_card, theirs, ours = push_module.HubPusher._commit_card, [], []

    def another_push_tags_first(self, *args, **kwargs):  # between our card commit and our tag
        commit, deleted = real_commit_card(self, *args, **kwargs)
        theirs.append(api.list_repo_commits(repo, repo_type="dataset")[-1].commit_id)  # the repo's first commit
        api.create_tag(repo, tag="v1", revision=theirs[0], repo_type="dataset")
        ours.append(commit)
        return commit, deleted

    monkeypatch.setattr(push_module.HubPusher, "_commit_card", another_push_tags_first)
    with pytest.raises(HubError) as raced:
        push(v1, repo, tag="v1")
    assert re.search(
        says(
            f"--hub-tag v1: the tag was created on {repo} by someone else while this push ran",
            f"expected it free, to name this push's commit {ours[0][:12]}, found it naming commit {theirs[0][:12]}",
            f"{repo}@main holds this cache at {ours[0][:12]}: push the same cache with a new --hub-tag to name it",
        ),
        str(raced.value),
    ), str(raced.value)
    assert hub.repo(repo).tags == {"v1": theirs[0]} and hub.repo(repo).branches["main"] == ours[0]
    monkeypatch.setattr(push_module.HubPusher, "_commit_card", real_commit_card)
    hub.reset_counters()
    again = push(v1, repo, tag="v2")  # as the message says
    assert again.skipped == [s["name"] for s in read_manifest(v1)["shards"]] and not again.uploaded and hub.state.bytes_uploaded == 0
    assert hub.repo(repo).tags == {"v1": theirs[0], "v2": again.commit}


# ---- exporting a Hub cache --------------------------------------------------------------------


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.parametrize(("to", "target_format", "writer"), [("nemo", "probs", "_save"), ("specforge", "hidden", "_torch_save")])
def test_an_export_of_a_hub_cache_holds_one_version_while_a_push_moves_the_branch(hub, tmp_path, monkeypatch, to, target_format, writer):
    """A new version pushed while the export writes its first file changes nothing in it: its samples
    and its draft vocabulary (NeMo's selected_token_ids, SpecForge's vocab_mapping.pt) are all the
    version's the branch pointed at when the export began, as a local export of that version holds."""
    import builder.export as export_module

    def version(name: str, **settings) -> Path:
        return build(small_config(tmp_path / name / "cache", target_format=target_format, **settings), progress=False).output_dir

    old, new = version("old"), version("new", max_samples=30, shuffle_seed=7)
    new_ids = read_vocab(new)["selected_token_ids"]
    assert not torch.equal(read_vocab(old)["selected_token_ids"], new_ids)  # the versions' draft vocabularies differ
    local = export_module.export_cache(old, to, tmp_path / "local", progress=False)
    repo = f"tester/export-{to}"
    push(old, repo)
    real_write, pushed = getattr(export_module, writer), []

    def write_once_the_new_version_is_pushed(obj, path):
        if not pushed:
            pushed.append(push(new, repo))
        real_write(obj, path)

    monkeypatch.setattr(export_module, writer, write_once_the_new_version_is_pushed)
    out = export_module.export_cache(repo, to, tmp_path / "from-hub", progress=False)
    assert pushed and torch.equal(read_vocab(repo)["selected_token_ids"], new_ids)  # the branch moved during the export
    assert files_of(out) == files_of(local)


def test_a_config_of_a_repo_holding_several_caches_is_exported_by_its_name(hub, v1, v2, tmp_path, capsys):
    """`export --name` picks the config, as verify's does; without it the refusal names the configs and the flag."""
    from builder.export import export_cache

    for config, cache in (("one", v1), ("two", v2)):
        push(cache, "tester/export-configs", config=config)
    assert main(["export", "tester/export-configs", "--to", "nemo", str(tmp_path / "unnamed")]) == 2
    assert "holds several caches: pass one of ['one', 'two'] as --name (name= in Python)" in capsys.readouterr().err
    assert main(["export", "tester/export-configs", "--name", "two", "--to", "nemo", str(tmp_path / "two")]) == 0
    local = export_cache(v2, "nemo", tmp_path / "local", progress=False)
    assert files_of(tmp_path / "two") == files_of(local) and not (tmp_path / "unnamed").exists()


def test_a_finished_push_to_a_branch_is_exported_by_its_revision(hub, v1, tmp_path, capsys):
    """`export --revision` reads the branch, tag or commit a push went to; main, which holds no card
    then, says to pass it with that flag."""
    from builder.export import export_cache

    pushed = push(v1, "tester/export-branch", branch="next", tag="v1")
    assert main(["export", "tester/export-branch", "--to", "nemo", str(tmp_path / "main")]) == 2
    assert "a push that stopped partway has none" in (refusal := capsys.readouterr().err)
    assert "read the branch or tag of a finished one with --revision (revision= in Python)" in refusal
    local = export_cache(v1, "nemo", tmp_path / "local", progress=False)
    for revision in ("next", "v1", pushed.commit):
        assert main(["export", "tester/export-branch", "--revision", revision, "--to", "nemo", str(tmp_path / revision)]) == 0
        assert files_of(tmp_path / revision) == files_of(local)
    assert not (tmp_path / "main").exists()
