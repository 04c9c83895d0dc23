"""The manifest, without a build: assembled from given records, fingerprinted, put in a card
and read back (as text, from a folder), refused when a card has none or a newer format."""

from __future__ import annotations

import copy
import re

import pytest
import xxhash
from helpers import says
from manifest_inputs import IDENTITY, SHARDS, VOCAB_BYTES, prepared, write_vocab_file

from builder.manifest import (
    FORMAT_VERSION,
    CardNotFound,
    ManifestError,
    assemble_manifest,
    check_format_version,
    fingerprint,
    manifest_from_card,
    read_manifest,
)
from dataset_card import index_entry, render_card, render_index_card


@pytest.fixture
def manifest(tmp_path):
    write_vocab_file(tmp_path)
    return assemble_manifest(tmp_path, prepared(tmp_path), SHARDS, ranks=[{"rank": 0, "samples": 5}])


def test_assembled_from_the_shard_records(manifest):
    assert [s["name"] for s in manifest["shards"]] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert "failed" not in manifest["shards"][0]  # per-shard records stay small; failures are listed once
    assert manifest["failed"] == SHARDS[0]["failed"]
    assert manifest["totals"] == {
        "samples": 5,
        "tokens": 100,
        "loss_tokens": 40,
        "bytes": 1600,
        "bytes_per_token": 16.0,
        "argmax_coverage": 34 / 40,
        "token_coverage": 0.7,  # 70 of the 100 loss-masked tokens have an id in SELECTED
    }
    assert manifest["identity"] == IDENTITY and manifest["skipped"] == {"too_long": 2, "no_assistant_turn": 1}
    assert manifest["duplicate_ids"] == 1 and manifest["build"]["ranks"] == [{"rank": 0, "samples": 5}]
    assert manifest["special_token_ids"] == [0, 1, 2, 3]  # the tiny tokenizer's bos, eos, pad, unk
    assert manifest["target_vocab_size"] == 1024 and manifest["hidden_size"] == 16
    assert manifest["layout"]["topk"] == 2 and manifest["layout"]["aux_width"] == 3 * 16


def test_files_and_columns_are_described(manifest):
    assert manifest["checksum_algorithm"] == "xxh3_128"
    assert manifest["vocab_file"] == {"path": "vocab/vocab.safetensors", "checksum": xxhash.xxh3_128(VOCAB_BYTES).hexdigest()}
    assert "lm_head_file" not in manifest  # only `hidden` caches store head rows
    assert manifest["columns"]["sample_id"] == {"arrow": "string"}
    assert manifest["columns"]["topk_logprobs"]["shape"] == ["n_loss", 2]
    assert manifest["columns"]["input_ids"]["encoding"] == "raw"  # a few bytes per token: stored as is
    assert manifest["columns"]["aux_hidden_states"]["encoding"] == "byte_planes_zstd"


def test_fingerprint_is_of_the_identity_alone(manifest):
    assert manifest["fingerprint"] == fingerprint(IDENTITY) and len(manifest["fingerprint"]) == 16
    assert fingerprint(dict(reversed(IDENTITY.items()))) == fingerprint(IDENTITY)  # key order does not matter
    for field, value in (("seq_length", 64), ("target", {"model": "tiny-llama", "revision": "abc"})):
        assert fingerprint(IDENTITY | {field: value}) != fingerprint(IDENTITY), field


def test_a_card_gives_back_the_manifest_it_was_rendered_from(manifest, tmp_path):
    text = render_card(manifest, location="user/cache", config="small", revision="v1")
    assert manifest_from_card(text) == manifest
    (tmp_path / "README.md").write_text(text)
    assert read_manifest(tmp_path) == manifest


def test_a_card_without_a_manifest_is_refused(manifest, tmp_path):
    with pytest.raises(ManifestError, match="README.md has no 'eagle3_cache' manifest block; it is not an eagle3-cache"):
        manifest_from_card("---\nlicense: mit\n---\n# some other dataset\n", "README.md")
    index = render_index_card("user/caches", {"small": index_entry(manifest, "small", "v1"), "large": index_entry(manifest, "large")})
    with pytest.raises(ManifestError, match=r"holds several caches: pass one of \['large', 'small'\] as --name \(name= in Python\)"):
        manifest_from_card(index, "user/caches")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no README.md; expected a finished eagle3-cache directory.*--resume"):
        read_manifest(tmp_path / "empty")


def test_a_local_directory_holding_several_caches_is_told_to_pass_one_of_its_sub_folders(manifest, tmp_path, monkeypatch):
    """A local copy of a repo holding several caches: push has no --name, but every command takes a config's
    folder as the directory (it is a cache of its own)."""
    from builder.cli import main
    from builder.push import PushTarget, push_cache

    copy_of_repo = tmp_path / "copy"
    copy_of_repo.mkdir()
    index = {"small": index_entry(manifest, "small", "v1"), "large": index_entry(manifest, "large")}
    (copy_of_repo / "README.md").write_text(render_index_card("user/caches", index))
    pick = (
        rf"holds several caches: pass one of its sub-folders as the directory \({re.escape(str(copy_of_repo / 'large'))}\), "
        r"or, to verify, export or load_cache, pass one of \['large', 'small'\] as --name \(name= in Python\)$"
    )
    with pytest.raises(ManifestError, match=pick):
        read_manifest(copy_of_repo)
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # a push needs one; this one is refused before the Hub is asked anything
    with pytest.raises(ManifestError, match=pick):
        push_cache(copy_of_repo, PushTarget("user/other"))
    assert main(["push", str(copy_of_repo), "user/other"]) == 2


def test_a_directory_of_caches_built_one_by_one_is_told_to_pass_one_of_them_not_to_resume(manifest, tmp_path, monkeypatch, capsys):
    """Caches built into OUT/a and OUT/b, with no index card at OUT: every command given OUT is told to pass
    one of the sub-folders, not that OUT is an interrupted build to resume."""
    from builder.cli import main
    from builder.push import PushTarget, push_cache

    folder = tmp_path / "caches"
    for name in ("small", "large"):
        (folder / name).mkdir(parents=True)
        (folder / name / "README.md").write_text(render_card(manifest, location=f"user/{name}"))
    (folder / "notes").mkdir()  # a folder of the user's own, with a card that is not a cache's
    (folder / "notes" / "README.md").write_text("---\nlicense: mit\n---\n# notes\n")
    pick = (
        r"no README.md; its sub-folders \['large', 'small'\] hold caches of their own: "
        rf"pass one of them as the directory \({re.escape(str(folder / 'large'))}\)$"
    )
    with pytest.raises(CardNotFound, match=pick):
        read_manifest(folder)
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # a push needs one; this one is refused before the Hub is asked anything
    with pytest.raises(CardNotFound, match=pick):
        push_cache(folder, PushTarget("user/other"))
    capsys.readouterr()
    assert main(["verify", str(folder)]) != 0
    told = capsys.readouterr().err
    assert f"hold caches of their own: pass one of them as the directory ({folder / 'large'})" in told and "--resume" not in told


def test_a_path_that_is_no_directory_is_said_to_be_none_not_an_interrupted_build(tmp_path):
    missing, a_file = tmp_path / "no" / "such" / "dir", tmp_path / "a-file"
    a_file.write_text("x")
    expected = "expected a finished eagle3-cache directory: check the path"
    with pytest.raises(CardNotFound, match=rf"^{re.escape(str(missing))}: the path does not exist; {expected}$"):
        read_manifest(missing)
    with pytest.raises(CardNotFound, match=rf"^{re.escape(str(a_file))}: the path is not a directory; {expected}$"):
        read_manifest(a_file)


def test_a_card_whose_front_matter_is_not_yaml_is_refused_naming_the_file_and_line(manifest, tmp_path):
    text = render_card(manifest, location="user/cache")
    lines = text.split("\n")
    lines[1] = "configs: default: x"  # the card's second line
    (tmp_path / "README.md").write_text("\n".join(lines))
    problem = r"expected YAML front matter .*\(line 2: mapping values are not allowed here\).*restore it, or rebuild"
    with pytest.raises(ManifestError, match=rf"the card of {tmp_path}: {problem}"):
        manifest_from_card("\n".join(lines), f"the card of {tmp_path}")
    damaged = f"{tmp_path}: README.md is damaged: its YAML front matter, which holds the manifest, does not parse"
    with pytest.raises(ManifestError, match=says(damaged, "at line 2 of the card", "run the build command again with --resume")):
        read_manifest(tmp_path)  # as verify calls it
    with pytest.raises(ManifestError, match=r"README.md: expected the front matter to be a YAML mapping"):
        manifest_from_card("---\n- a list\n---\n", "README.md")


WHY_NO_CARD = (
    "no README.md; expected a finished eagle3-cache directory (the card is written last, so an interrupted build has none: "
    "resume it with --resume)"
)


@pytest.mark.parametrize(
    "command, message",
    [
        (
            ["push", "{dir}", "user/x"],
            "push: {dir} does not exist; expected a local cache directory (the --output-dir of a finished `eagle3-cache build`): "
            "check the path",
        ),
        (
            ["export", "{dir}", "--to", "nemo", "{out}"],
            "export: {dir} does not exist; expected a cache directory: the --output-dir of a finished `eagle3-cache build`",
        ),
    ],
    ids=["push", "export"],
)
def test_a_folder_without_a_card_is_one_error_line_not_a_traceback(tmp_path, capsys, monkeypatch, command, message):
    """Still a FileNotFoundError for code that catches that, and a project error the CLI reports."""
    from builder.cli import main

    monkeypatch.setenv("HF_TOKEN", "hf_present")
    missing = tmp_path / "nope"
    with pytest.raises(CardNotFound) as info:
        read_manifest(missing)
    assert isinstance(info.value, FileNotFoundError)
    assert main([part.format(dir=missing, out=tmp_path / "out") for part in command]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {message.format(dir=missing)}\n"
    assert not captured.out


def test_pushing_a_folder_that_holds_no_card_says_an_interrupted_build_has_none(tmp_path, capsys, monkeypatch):
    from builder.cli import main

    monkeypatch.setenv("HF_TOKEN", "hf_present")
    folder = tmp_path / "interrupted"
    (folder / "data").mkdir(parents=True)
    assert main(["push", str(folder), "user/x"]) == 2
    assert capsys.readouterr().err == f"error: {folder}: {WHY_NO_CARD}\n"


def test_a_newer_format_version_is_refused_an_older_one_read(manifest):
    newer = copy.deepcopy(manifest)
    newer["identity"]["format_version"] = FORMAT_VERSION + 1
    text = render_card(newer, location="user/cache")
    newer_than = f"format version {FORMAT_VERSION + 1}, newer than the {FORMAT_VERSION} this eagle3-cache reads; upgrade"
    with pytest.raises(ManifestError, match=newer_than):
        manifest_from_card(text, "user/cache")
    check_format_version({"identity": {"format_version": 1}})  # raw columns, sha256 checksums: still read
    for broken in ({}, {"identity": {"format_version": "2"}}, {"identity": {"format_version": 0}}):
        with pytest.raises(ManifestError, match="expected identity.format_version to be a positive integer"):
            check_format_version(broken, "README.md")


@pytest.mark.parametrize(
    "edit, found",
    [
        (lambda m: "restored later", "its 'eagle3_cache' block to be a mapping, found str 'restored later'"),
        (lambda m: [1], "its 'eagle3_cache' block to be a mapping, found list [1]"),
        (lambda m: m | {"identity": "tiny-llama"}, "its identity to be a mapping, found str 'tiny-llama'"),
    ],
)
def test_a_manifest_block_edited_into_no_mapping_is_refused_saying_so(manifest, edit, found):
    """Not an AttributeError from the first `.get` on it."""
    import yaml

    text = render_card(manifest, location="user/cache")
    _, front, body = text.split("---\n", 2)
    data = yaml.safe_load(front)
    data["eagle3_cache"] = edit(data["eagle3_cache"])
    edited = "---\n" + yaml.safe_dump(data, sort_keys=False) + "---\n" + body
    with pytest.raises(ManifestError, match=f"^user/cache: expected {re.escape(found)}; the card was edited: restore the card, or rebuild"):
        manifest_from_card(edited, "user/cache")
