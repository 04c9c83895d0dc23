"""The cache on disk: shards, row groups, round trip, card, resume."""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import xxhash
from helpers import assert_same_content, batch_rows, decoded_rows, hub_cache_holding, record_in_card, says, small_config
from tiny_targets import (
    make_tiny_target,
    poisoned_target,
    target_with_another_tokenizer,
    target_with_own_code,
    target_with_truncation_and_padding,
    target_without_pad_token,
    tokenizer_hash_of_earlier_versions,
    write_own_code,
)

import builder.forward as forward_module
import builder.placement as placement_module
import builder.prepare as prepare_module
import builder.shards as shards_module
import builder.tokenize as tokenize_module
from builder.build_state import BUILD_STATE_DIR, BUILD_STATE_FILE, identity_differences
from builder.cli import format_summary
from builder.conversations import BadRow
from builder.errors import ResumeMismatch, ResumeSamplesDiffer, ShardUnreadable
from builder.files import file_hash
from builder.kept_samples import SAMPLE_COLUMNS
from builder.manifest import fingerprint
from builder.pipeline import build
from builder.prepare import prepare, target_differences
from builder.reader import read_manifest, read_vocab
from builder.vocab import earlier_special_token_ids, special_token_ids

ROW_GROUP_BYTES = 150_000  # rows here are 20-90 kB: a 4-row shard needs 2+ groups


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One cache with small row groups, recording every sample's tensors in the batches the forward hands the writer."""
    out = tmp_path_factory.mktemp("built") / "cache"
    written = {}
    real_forward_window = forward_module.forward_window

    def recording_forward_window(*args, **kwargs):
        for batch in real_forward_window(*args, **kwargs):
            batch.wait()
            for row in batch_rows([batch]).values():
                sample_id = row.pop("sample_id")
                written[sample_id] = {name: t.clone() for name, t in row.items()}
            yield batch

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(forward_module, "forward_window", recording_forward_window)
        result = build(small_config(out, dtype="bf16", row_group_bytes=ROW_GROUP_BYTES), progress=False)
    return result, written


def test_every_field_round_trips(built):
    result, written = built
    rows = decoded_rows(result.output_dir)
    assert [r["sample_id"] for r in rows] == list(result.prepared.samples["sample_id"])
    assert len(rows) == len(written) == 14
    for row in rows:
        expected = written[row["sample_id"]]
        for key, tensor in expected.items():
            assert row[key].dtype == tensor.dtype, key
            assert torch.equal(row[key], tensor), key
        assert row["num_tokens"] == len(expected["input_ids"])
        assert row["target_probs"].shape[0] == int(expected["loss_mask"].sum())


def test_shards_hold_consecutive_build_positions(built):
    result, _ = built
    files = sorted((result.output_dir / "data").glob("*.parquet"))
    assert [f.name for f in files] == [f"train-{k:05d}-of-00004.parquet" for k in range(4)]
    ids = list(result.prepared.samples["sample_id"])
    for k, path in enumerate(files):
        assert pq.read_table(path, columns=["sample_id"])["sample_id"].to_pylist() == ids[4 * k : 4 * k + 4]
    assert [s["rows"] for s in result.manifest["shards"]] == [4, 4, 4, 2]


def test_row_groups_are_sized_by_bytes(built):
    result, _ = built
    meta = pq.ParquetFile(result.output_dir / "data" / "train-00000-of-00004.parquet").metadata
    assert meta.num_row_groups > 1
    sizes = [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]
    rows = decoded_rows(result.output_dir)
    largest_row = max(sum(t.numel() * t.element_size() for t in r.values() if isinstance(t, torch.Tensor)) for r in rows)
    assert ROW_GROUP_BYTES > 1.5 * largest_row  # so that several rows share a group
    assert max(sizes) < ROW_GROUP_BYTES + largest_row + 1024  # a group closes at the first row past the limit
    assert meta.num_row_groups < meta.num_rows


def test_manifest_records_checksums_and_totals(built):
    result, _ = built
    out = result.output_dir
    manifest = read_manifest(out)
    assert manifest == result.manifest
    assert manifest["checksum_algorithm"] == "xxh3_128"
    for shard in manifest["shards"]:
        path = out / "data" / shard["name"]
        assert shard["checksum"] == xxhash.xxh3_128(path.read_bytes()).hexdigest()
        assert shard["bytes"] == path.stat().st_size
    assert manifest["vocab_file"]["checksum"] == xxhash.xxh3_128((out / "vocab/vocab.safetensors").read_bytes()).hexdigest()
    assert manifest["totals"]["samples"] == 14
    assert manifest["totals"]["tokens"] == sum(result.prepared.samples["num_tokens"])
    assert manifest["totals"]["loss_tokens"] == sum(result.prepared.samples["num_loss_tokens"])
    assert manifest["columns"]["aux_hidden_states"] == {
        "arrow": "binary",
        "dtype": "bf16",
        "shape": ["L", 192],
        "per": "token",
        "byte_order": "little",
        "encoding": "byte_planes_zstd",
    }
    assert manifest["columns"]["loss_mask"]["encoding"] == "raw" and manifest["identity"]["compression"] == "zstd"
    assert not list(out.rglob(".*.tmp-*"))


def test_plain_load_dataset_opens_the_cache(built):
    result, _ = built
    ds = datasets.load_dataset(str(result.output_dir), split="train")
    assert ds.num_rows == 14
    assert ds.features["aux_hidden_states"] == datasets.Value("binary")
    streamed = next(iter(datasets.load_dataset(str(result.output_dir), split="train", streaming=True)))
    assert streamed["sample_id"] == ds[0]["sample_id"]
    card = (result.output_dir / "README.md").read_text()
    assert "eagle3_cache:" in card and "load_cache" in card and "bytes per token" in card


class Interrupt(Exception):
    pass


def interrupted_build(cfg, monkeypatch, after_shards: int):
    real = forward_module.write_one_shard
    done = []

    def stop_after(*args, **kwargs):
        if len(done) == after_shards:
            raise Interrupt()
        done.append(args[-2])  # the shard index
        return real(*args, **kwargs)

    monkeypatch.setattr(forward_module, "write_one_shard", stop_after)
    with pytest.raises(Interrupt):
        build(cfg, progress=False)
    monkeypatch.setattr(forward_module, "write_one_shard", real)


def snapshot(directory: Path) -> dict:
    return {
        str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.stat().st_ino, file_hash(p, "sha256"))
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_resume_after_interruption_gives_identical_content(tmp_path, monkeypatch):
    reference = build(small_config(tmp_path / "reference"), progress=False)
    cfg = small_config(tmp_path / "resumed")
    interrupted_build(cfg, monkeypatch, after_shards=2)
    first_two = snapshot(tmp_path / "resumed" / "data")
    assert len(first_two) == 2 and not (tmp_path / "resumed" / "README.md").exists()
    (tmp_path / "resumed" / "data" / ".train-00002-of-00004.parquet.tmp-999").write_bytes(b"partial")

    resumed = build(cfg.replace(resume=True), progress=False)
    assert resumed.written == ["train-00002-of-00004.parquet", "train-00003-of-00004.parquet"]
    after = snapshot(tmp_path / "resumed" / "data")
    assert {k: after[k] for k in first_two} == first_two  # finished shards never rewritten
    assert not list((tmp_path / "resumed" / "data").glob(".*"))  # leftover temp file cleaned
    assert_same_content(decoded_rows(reference.output_dir), decoded_rows(resumed.output_dir))
    assert resumed.manifest["fingerprint"] == reference.manifest["fingerprint"]


def test_a_resume_of_a_build_begun_without_pad_id_zero_continues_with_its_vocabulary(tmp_path, monkeypatch, caplog):
    """Earlier versions gave a tokenizer without a pad token no pad id among the draft vocabulary's
    special ids: a build one of them began holds shards supervised over that vocabulary, so its
    resume continues with it (saying so), never mixing two in one cache; a new build gets pad id 0."""
    target = target_without_pad_token(tmp_path / "target")
    cfg = small_config(tmp_path / "resumed", target=target, max_samples=8)
    monkeypatch.setattr(prepare_module, "special_token_ids", earlier_special_token_ids)  # as earlier versions chose
    reference = build(small_config(tmp_path / "reference", target=target, max_samples=8), progress=False)
    interrupted_build(cfg, monkeypatch, after_shards=1)
    monkeypatch.setattr(prepare_module, "special_token_ids", special_token_ids)  # this version from here on

    resumed = build(cfg.replace(resume=True), progress=False)
    assert resumed.written == ["train-00001-of-00002.parquet"]
    assert "began with an earlier version's draft vocabulary" in caplog.text
    assert resumed.manifest["special_token_ids"] == reference.manifest["special_token_ids"] == [3, 1]
    assert torch.equal(read_vocab(resumed.output_dir)["selected_token_ids"], read_vocab(reference.output_dir)["selected_token_ids"])
    assert resumed.manifest["fingerprint"] == reference.manifest["fingerprint"]
    assert_same_content(decoded_rows(reference.output_dir), decoded_rows(resumed.output_dir))
    assert prepare(small_config(tmp_path / "new", target=target, max_samples=8)).special_token_ids == [3, 1, 0]


def test_a_resume_with_a_tokenizer_shipping_truncation_continues(tmp_path, monkeypatch):
    """transformers turns a tokenizer.json's truncation and padding off on the first encode call: the
    interrupted run tokenized, its resume reuses the tokenized rows and never encodes, and both record
    the same tokenizer; so does the target loaded afresh, as export and verify load it."""
    from transformers import AutoConfig, AutoTokenizer

    target = target_with_truncation_and_padding(tmp_path / "target")
    cfg = small_config(tmp_path / "resumed", target=target, max_samples=8)
    interrupted_build(cfg, monkeypatch, after_shards=1)

    resumed = build(cfg.replace(resume=True), progress=False)
    assert resumed.written == ["train-00001-of-00002.parquet"]
    fresh = AutoTokenizer.from_pretrained(target)
    assert target_differences(resumed.manifest, str(target), AutoConfig.from_pretrained(target), fresh) == {}


def test_a_resume_of_a_build_an_earlier_version_recorded_with_the_tokenizer_as_loaded_continues(tmp_path, monkeypatch):
    """Earlier versions hashed the tokenizer's backend as it was at that moment: a build process that
    never encoded (more than one --num-proc, a rerun reusing the tokenized rows) recorded the
    truncation and padding its tokenizer.json ships. Such a build resumes and its cache verifies; one
    recorded with another tokenizer is still refused."""
    from builder.errors import Eagle3CacheError
    from builder.verify import verify_cache

    target = target_with_truncation_and_padding(tmp_path / "target")
    earlier = tokenizer_hash_of_earlier_versions(target)
    another = tokenizer_hash_of_earlier_versions(target_with_another_tokenizer(tmp_path / "other"))
    cfg = small_config(tmp_path / "resumed", target=target, max_samples=8)
    interrupted_build(cfg, monkeypatch, after_shards=1)
    state = Path(cfg.output_dir) / BUILD_STATE_FILE
    identity = json.loads(state.read_text())
    assert identity["tokenizer_sha256"] not in (earlier, another)

    state.write_text(json.dumps(identity | {"tokenizer_sha256": another}))
    with pytest.raises(ResumeMismatch, match=says(f"tokenizer_sha256: cache has '{another}'")):
        build(cfg.replace(resume=True), progress=False)
    state.write_text(json.dumps(identity | {"tokenizer_sha256": earlier}))
    resumed = build(cfg.replace(resume=True), progress=False)
    assert resumed.written == ["train-00001-of-00002.parquet"]
    # The same build goes on as recorded: its fingerprint, which a Hub tag and readers' `expect` pin, stays.
    assert resumed.manifest["identity"]["tokenizer_sha256"] == earlier
    assert resumed.manifest["fingerprint"] == fingerprint(identity | {"tokenizer_sha256": earlier})
    again = build(cfg.replace(resume=True), progress=False)
    assert again.written == [] and again.manifest["fingerprint"] == resumed.manifest["fingerprint"]

    record_in_card(resumed.output_dir, tokenizer_sha256=earlier)  # as the earlier version wrote its card
    assert verify_cache(resumed.output_dir, recompute=8) == []
    record_in_card(resumed.output_dir, tokenizer_sha256=another)
    with pytest.raises(Eagle3CacheError, match=says(f"tokenizer_sha256: the cache has {another}")):
        verify_cache(resumed.output_dir, recompute=8)


def test_resume_of_a_finished_cache_writes_no_shard(tmp_path):
    cfg = small_config(tmp_path / "cache")
    build(cfg, progress=False)
    before = snapshot(tmp_path / "cache" / "data")
    again = build(cfg.replace(resume=True), progress=False)
    assert again.written == [] and snapshot(tmp_path / "cache" / "data") == before


def test_a_resume_on_fewer_processes_records_only_its_own_ranks(tmp_path):
    """An earlier run on two processes left rank 1's record; the card and summary tell of this run's one rank."""
    cfg = small_config(tmp_path / "cache")
    build(cfg, progress=False)
    ranks = tmp_path / "cache" / BUILD_STATE_DIR / "ranks"
    earlier = {"rank": 1, "world_size": 2, "shards_written": ["train-00001-of-00004.parquet"], "samples": 3}
    (ranks / "rank-00001.json").write_text(json.dumps(earlier))
    again = build(cfg.replace(resume=True), progress=False)
    assert [(r["rank"], r["world_size"], r["shards_written"]) for r in again.manifest["build"]["ranks"]] == [(0, 1, [])]
    assert read_manifest(tmp_path / "cache")["build"]["ranks"] == again.manifest["build"]["ranks"]


def test_a_resume_finishes_the_card_past_an_earlier_runs_damaged_rank_record(tmp_path):
    """An earlier run's rank record cut short since (no rank of this run, which rewrites its own): the
    resume writes the card with this run's ranks, instead of stopping on a JSON error once every shard is done."""
    cfg = small_config(tmp_path / "cache")
    build(cfg, progress=False)
    (tmp_path / "cache" / BUILD_STATE_DIR / "ranks" / "rank-00003.json").write_text('{"rank": 3, "world')
    again = build(cfg.replace(resume=True), progress=False)
    assert [(r["rank"], r["world_size"], r["shards_written"]) for r in again.manifest["build"]["ranks"]] == [(0, 1, [])]
    assert read_manifest(tmp_path / "cache")["build"]["ranks"] == again.manifest["build"]["ranks"]


def test_resume_rebuilds_each_shard_that_does_not_match_its_record(tmp_path):
    """A shard file cut short, one whose footer is damaged at its full size, one without a record:
    each is rebuilt (to the same rows); the intact one is kept as it was."""
    cfg = small_config(tmp_path / "cache", max_samples=8, shard_size=2)
    reference = decoded_rows(build(cfg, progress=False).output_dir)
    data = tmp_path / "cache" / "data"
    names = sorted(p.name for p in data.glob("*.parquet"))
    whole = (data / names[0]).read_bytes()
    (data / names[0]).write_bytes(whole[: len(whole) // 2])
    footer_damaged = (data / names[1]).read_bytes()
    (data / names[1]).write_bytes(footer_damaged[:-8] + bytes(8))
    (tmp_path / "cache" / ".eagle3_build" / "shards" / f"{names[2]}.json").unlink()
    kept = snapshot(data)[names[3]]

    resumed = build(cfg.replace(resume=True), progress=False)
    assert resumed.written == names[:3]
    assert snapshot(data)[names[3]] == kept
    assert (data / names[0]).read_bytes() == whole
    assert_same_content(reference, decoded_rows(resumed.output_dir))


def test_resume_rebuilds_each_shard_whose_record_no_longer_decodes(tmp_path):
    """A shard's record cut short, or zeroed, since the build wrote it (its shard in place, or gone)
    counts as missing: the shard is rebuilt to the same bytes, not left to stop every resume on a JSON error."""
    cfg = small_config(tmp_path / "cache", max_samples=6, shard_size=2)
    build(cfg, progress=False)
    data, records = tmp_path / "cache" / "data", tmp_path / "cache" / ".eagle3_build" / "shards"
    names = sorted(p.name for p in data.glob("*.parquet"))
    written = {name: (data / name).read_bytes() for name in names}
    cut_short = records / f"{names[0]}.json"
    cut_short.write_text(cut_short.read_text()[:20])
    (records / f"{names[1]}.json").write_bytes(bytes(64))
    (data / names[1]).unlink()

    resumed = build(cfg.replace(resume=True), progress=False)
    assert resumed.written == names[:2]
    assert {name: (data / name).read_bytes() for name in names} == written
    assert [json.loads((records / f"{name}.json").read_text())["rows"] for name in names] == [2, 2, 2]


def test_resume_rebuilds_a_shard_whose_size_differs_from_its_record_though_it_holds_the_same_rows(tmp_path):
    """A finished shard written again by another tool (same rows and samples, other bytes): its
    footer and samples agree with its record, its size does not, and its checksum no longer holds.
    The resume rebuilds it to the bytes the build wrote; a cache keeping it would fail its checksum."""
    cfg = small_config(tmp_path / "cache", max_samples=8, shard_size=2)
    build(cfg, progress=False)
    data = tmp_path / "cache" / "data"
    names = sorted(p.name for p in data.glob("*.parquet"))
    written = (data / names[1]).read_bytes()
    pq.write_table(pq.read_table(data / names[1]), data / names[1], compression="snappy")
    assert (data / names[1]).stat().st_size != len(written)
    assert pq.read_table(data / names[1]).equals(pq.read_table(pa.BufferReader(written)))
    kept = {name: snapshot(data)[name] for name in names if name != names[1]}

    resumed = build(cfg.replace(resume=True), progress=False)
    assert resumed.written == [names[1]]
    assert (data / names[1]).read_bytes() == written
    assert {name: snapshot(data)[name] for name in kept} == kept


def test_resume_stops_at_a_shard_it_cannot_read_and_deletes_nothing(tmp_path, monkeypatch):
    """A read error (an I/O error, a stale handle, its permissions) says nothing about whether a
    shard is complete: the resume stops naming the file and the error, and deletes nothing; once
    the file reads again, the resume keeps it."""
    cfg = small_config(tmp_path / "cache", max_samples=8, shard_size=2)
    build(cfg, progress=False)
    data = tmp_path / "cache" / "data"
    unreadable = data / sorted(p.name for p in data.glob("*.parquet"))[1]
    before = snapshot(data)
    real_parquet_file = shards_module.pq.ParquetFile

    def denied(path, *args, **kwargs):  # as pyarrow reports it: no filename, the path in its text
        if Path(path) == unreadable:
            raise PermissionError(errno.EACCES, f"Failed to open local file '{path}'. Detail: [errno 13] Permission denied")
        return real_parquet_file(path, *args, **kwargs)

    monkeypatch.setattr(shards_module.pq, "ParquetFile", denied)
    with pytest.raises(ShardUnreadable, match=says(str(unreadable), "Permission denied", "nothing was deleted", "Rerun once")):
        build(cfg.replace(resume=True), progress=False)
    assert snapshot(data) == before
    monkeypatch.undo()
    assert build(cfg.replace(resume=True), progress=False).written == []


@pytest.fixture(scope="module")
def partial_cache(tmp_path_factory):
    """An interrupted build to try mismatched resumes on, plus what each change needs."""
    root = tmp_path_factory.mktemp("partial")
    cfg = small_config(root / "cache")
    with pytest.MonkeyPatch.context() as mp:
        interrupted_build(cfg, mp, after_shards=1)
    other_target = make_tiny_target(root / "other_target", "qwen3")
    template = root / "template.jinja"
    template.write_text((Path(__file__).parents[1] / "builder/assets/templates/no_generation.jinja").read_text())
    return root, cfg, other_target, template


IDENTITY_CHANGES = {
    "seq_length": dict(seq_length=80),
    "input.shuffle_seed": dict(shuffle_seed=7),
    "input.max_samples": dict(max_samples=13),
    "input.data": dict(input_data="sample-openai"),
    "draft_vocab_size": dict(draft_vocab_size=200),
    "dtype": dict(dtype="bf16"),
    "aux_layer_ids": dict(aux_layer_ids=(1, 2, 3)),
    "shard_size": dict(shard_size=5),
    "target.model": "other_target",
    "chat_template_sha256": "template",
}


@pytest.mark.parametrize("field", IDENTITY_CHANGES)
def test_resume_refuses_each_identity_change_before_loading_weights(partial_cache, monkeypatch, field):
    root, cfg, other_target, template = partial_cache
    change = IDENTITY_CHANGES[field]
    if change == "other_target":
        change = dict(target_model=str(other_target))
    elif change == "template":
        change = dict(chat_template=str(template))
    monkeypatch.setattr(placement_module, "load_model", lambda *a, **k: pytest.fail("weights loaded before the identity check"))
    before = snapshot(root / "cache")
    with pytest.raises(ResumeMismatch, match=rf"(?m)^  {re.escape(field)}: cache has"):
        build(cfg.replace(resume=True, **change), progress=False)
    assert snapshot(root / "cache") == before


@pytest.fixture(scope="module")
def full_vocabulary_partial(tmp_path_factory):
    """An interrupted build over the target's whole vocabulary: other tokens leave its identity as it
    was (a draft vocabulary's hash records the counts' ranking, which other tokens may change)."""
    root = tmp_path_factory.mktemp("full_vocabulary")
    cfg = small_config(root / "cache", draft_vocab_size=None)
    with pytest.MonkeyPatch.context() as mp:
        interrupted_build(cfg, mp, after_shards=1)
    return root / "cache", cfg


def files_as_they_were(out: Path) -> dict:
    """Every file of the cache: the lock's time aside (a resume takes the lock before it checks the shards)."""
    files = snapshot(out)
    lock = files.pop(f"{BUILD_STATE_DIR}/lock")
    return files | {"lock content": lock[2]}


def conversation_rules_change(monkeypatch, name: str, change) -> None:
    """Tokenize as another version of the conversation rules would: `change(row, messages)` gives a
    row's messages (or raises BadRow); the tokenizer's and template's files stay the same. An edit
    of conversations.py changes the tokenize cache's code version: so does this."""
    real = tokenize_module.normalize_row
    monkeypatch.setattr(tokenize_module, "normalize_row", lambda row: change(row, real(row)))
    monkeypatch.setattr(tokenize_module, "TOKENIZE_CODE_VERSION", f"{tokenize_module.TOKENIZE_CODE_VERSION}+{name}")


def spaced_questions(row: dict, messages: list[dict]) -> list[dict]:
    """A rule that writes a space before each question mark of the user's turns."""
    return [m | {"content": m["content"].replace("?", " ?")} if m["role"] == "user" else m for m in messages]


def invalid(*ids: str):
    """A rule under which the rows of these ids are no longer valid."""

    def change(row: dict, messages: list[dict]) -> list[dict]:
        if row.get("id") in ids:
            raise BadRow("no_assistant_turn", "refused by the new rule")
        return messages

    return change


def stored_ids(out: Path, shard: int) -> list[str]:
    return pq.read_table(out / "data" / f"train-{shard:05d}-of-00004.parquet", columns=["sample_id"])["sample_id"].to_pylist()


def test_a_resume_refuses_a_finished_shard_whose_tokens_differ_from_this_runs(full_vocabulary_partial, monkeypatch):
    """Same identity, other tokens: the finished shard 0 holds the rows as tokenized before; the
    resume refuses, naming the shard and its first differing sample, and changes nothing."""
    out, cfg = full_vocabulary_partial
    conversation_rules_change(monkeypatch, "spaced questions", spaced_questions)
    monkeypatch.setattr(placement_module, "load_model", lambda *a, **k: pytest.fail("weights loaded before the samples were checked"))
    before = files_as_they_were(out)
    with pytest.raises(
        ResumeSamplesDiffer,
        match=says(
            "shard train-00000-of-00004.parquet, which this build finished, holds other samples than this run would write",
            "its row 0 (input row ",
            "has input_ids ",
            "tokenized (or found valid) differently now than when that shard was written",
            "another eagle3-cache version's conversation rules, or another tokenizers or transformers version",
            "Finish the build with the eagle3-cache, tokenizers and transformers versions that began it",
            "new --output-dir",
        ),
    ):
        build(cfg.replace(resume=True), progress=False)
    assert files_as_they_were(out) == before


def test_a_resume_refuses_a_finished_shard_holding_a_row_no_longer_valid(full_vocabulary_partial, monkeypatch):
    """A row of shard 0 that the new rules skip shifts the samples after it: shard 0 holds another input row."""
    out, cfg = full_vocabulary_partial
    conversation_rules_change(monkeypatch, "second row invalid", invalid(stored_ids(out, 0)[1]))
    before = files_as_they_were(out)
    with pytest.raises(
        ResumeSamplesDiffer, match=says("shard train-00000-of-00004.parquet", "its row 1 holds input row ", "where this run has input row ")
    ):
        build(cfg.replace(resume=True), progress=False)
    assert files_as_they_were(out) == before


def test_a_resume_refuses_a_build_whose_samples_filled_another_number_of_shards(full_vocabulary_partial, monkeypatch):
    """Two rows of unwritten shards no longer valid: 12 samples fill 3 shards, and this run would not
    even name the shard written for 4; it would be left beside the cache as a stray."""
    out, cfg = full_vocabulary_partial
    unwritten = prepare(cfg.replace(resume=True)).samples["sample_id"][-2:]
    conversation_rules_change(monkeypatch, "two last rows invalid", invalid(*unwritten))
    before = files_as_they_were(out)
    with pytest.raises(
        ResumeSamplesDiffer,
        match=says("this build wrote train-00000-of-00004.parquet when its samples filled another number of shards", "12 samples fill 3"),
    ):
        build(cfg.replace(resume=True), progress=False)
    assert files_as_they_were(out) == before


def test_a_resume_refuses_a_finished_last_shard_holding_a_row_no_longer_valid(full_vocabulary_partial, tmp_path, monkeypatch):
    """The last row no longer valid leaves the number of shards as it was, and the finished last
    shard one sample more than this run has for it: refused as any other shard would be, not deleted
    as an incomplete one."""
    out, cfg = full_vocabulary_partial
    cfg = cfg.replace(resume=True, output_dir=str(tmp_path / "cache"))
    shutil.copytree(out, tmp_path / "cache")
    build(cfg, progress=False)
    last = prepare(cfg).samples["sample_id"][-1]
    conversation_rules_change(monkeypatch, "last row invalid", invalid(last))
    assert prepare(cfg).num_shards == 4
    before = files_as_they_were(tmp_path / "cache")
    with pytest.raises(ResumeSamplesDiffer, match=says("shard train-00003-of-00004.parquet", "it holds 2 samples, where this run has 1")):
        build(cfg, progress=False)
    assert files_as_they_were(tmp_path / "cache") == before


def flip_last_byte(shard: Path, column: str) -> None:
    """Flip a bit of the last byte of `column`'s first column chunk (stored raw: the high byte of its
    last token id, or its last loss mask value), the shard's size and footer left as they were."""
    parquet = pq.ParquetFile(shard)
    chunk = parquet.metadata.row_group(0).column(parquet.schema_arrow.names.index(column))
    data = bytearray(shard.read_bytes())
    data[chunk.data_page_offset + chunk.total_compressed_size - 1] ^= 1
    shard.write_bytes(bytes(data))


def test_a_resume_names_a_damaged_token_column_as_damage(full_vocabulary_partial, tmp_path):
    """A flipped byte in a finished shard's token ids, its size and footer intact: the checksum tells
    damage from another tokenization."""
    out, cfg = full_vocabulary_partial
    shutil.copytree(out, tmp_path / "cache")
    flip_last_byte(tmp_path / "cache" / "data" / "train-00000-of-00004.parquet", "input_ids")
    before = files_as_they_were(tmp_path / "cache")
    with pytest.raises(
        ResumeSamplesDiffer,
        match=says("shard train-00000-of-00004.parquet does not match the checksum its record holds: it is damaged", "Delete it and rerun"),
    ):
        build(cfg.replace(resume=True, output_dir=str(tmp_path / "cache")), progress=False)
    assert files_as_they_were(tmp_path / "cache") == before


def test_a_resume_names_a_token_column_parquet_cannot_decode_as_damage(full_vocabulary_partial, tmp_path):
    """A damaged page header in a finished shard's token ids (size and footer intact): Parquet's
    decode error is damage, to delete and rebuild, not a read error to wait out."""
    out, cfg = full_vocabulary_partial
    shutil.copytree(out, tmp_path / "cache")
    shard = tmp_path / "cache" / "data" / "train-00000-of-00004.parquet"
    parquet = pq.ParquetFile(shard)
    chunk = parquet.metadata.row_group(0).column(parquet.schema_arrow.names.index("input_ids"))
    data = bytearray(shard.read_bytes())
    data[chunk.data_page_offset : chunk.data_page_offset + 8] = bytes(
        b ^ 0xFF for b in data[chunk.data_page_offset : chunk.data_page_offset + 8]
    )
    shard.write_bytes(bytes(data))
    before = files_as_they_were(tmp_path / "cache")
    damaged = says(
        "shard train-00000-of-00004.parquet does not match the checksum its record holds: it is damaged",
        "Parquet cannot decode its sample columns",
        "Delete it and rerun",
    )
    with pytest.raises(ResumeSamplesDiffer, match=damaged):
        build(cfg.replace(resume=True, output_dir=str(tmp_path / "cache")), progress=False)
    assert files_as_they_were(tmp_path / "cache") == before


def test_a_resume_rebuilds_a_shard_whose_footer_parquet_cannot_decode(tmp_path):
    """A finished shard whose footer is damaged inside (its magic bytes and size intact) is no
    complete shard, as one without a footer is not: it is rebuilt, never left to stop every resume."""
    cfg = small_config(tmp_path / "cache", max_samples=4, shard_size=2)
    build(cfg, progress=False)
    shard = sorted((tmp_path / "cache" / "data").glob("*.parquet"))[1]
    whole = shard.read_bytes()
    footer_length = int.from_bytes(whole[-8:-4], "little")
    start = len(whole) - 8 - footer_length
    shard.write_bytes(whole[:start] + bytes(b ^ 0xFF for b in whole[start : start + 16]) + whole[start + 16 :])
    with pytest.raises(OSError, match="thrift"):
        pq.ParquetFile(shard)

    resumed = build(cfg.replace(resume=True), progress=False)
    assert resumed.written == [shard.name]
    assert shard.read_bytes() == whole


def test_a_resume_refuses_a_finished_shard_that_a_damaged_loss_mask_sets_apart(full_vocabulary_partial, tmp_path):
    """The loss masks are compared too: a flipped byte there, the token ids intact, is found."""
    out, cfg = full_vocabulary_partial
    shutil.copytree(out, tmp_path / "cache")
    flip_last_byte(tmp_path / "cache" / "data" / "train-00000-of-00004.parquet", "loss_mask")
    before = files_as_they_were(tmp_path / "cache")
    with pytest.raises(ResumeSamplesDiffer, match=says("shard train-00000-of-00004.parquet", "it is damaged", "has loss_mask ")):
        build(cfg.replace(resume=True, output_dir=str(tmp_path / "cache")), progress=False)
    assert files_as_they_were(tmp_path / "cache") == before


@pytest.fixture(scope="module")
def two_finished_shards(tmp_path_factory):
    """A build interrupted after its first two shards (of four)."""
    cfg = small_config(tmp_path_factory.mktemp("two_finished") / "cache")
    with pytest.MonkeyPatch.context() as mp:
        interrupted_build(cfg, mp, after_shards=2)
    return Path(cfg.output_dir), cfg


def test_a_resume_checks_the_samples_of_every_finished_shard_not_only_the_first(two_finished_shards, tmp_path):
    """The damage is in the second (and last) finished shard, the first intact: it is found there."""
    out, cfg = two_finished_shards
    shutil.copytree(out, tmp_path / "cache")
    flip_last_byte(tmp_path / "cache" / "data" / "train-00001-of-00004.parquet", "input_ids")
    before = files_as_they_were(tmp_path / "cache")
    with pytest.raises(
        ResumeSamplesDiffer,
        match=says("shard train-00001-of-00004.parquet does not match the checksum its record holds: it is damaged", "Delete it"),
    ):
        build(cfg.replace(resume=True, output_dir=str(tmp_path / "cache")), progress=False)
    assert files_as_they_were(tmp_path / "cache") == before


def test_a_resume_stops_at_a_finished_shard_whose_token_columns_cannot_be_read(two_finished_shards, tmp_path, monkeypatch):
    """The second finished shard's footer reads (its size and rows match its record) but its token
    columns do not (an I/O error in their pages): whether it holds this run's samples cannot be
    told, so the resume stops naming the file and the error, and deletes nothing; once the file
    reads again, the resume keeps it and finishes the build."""
    out, cfg = two_finished_shards
    shutil.copytree(out, tmp_path / "cache")
    cfg = cfg.replace(resume=True, output_dir=str(tmp_path / "cache"))
    unreadable = tmp_path / "cache" / "data" / "train-00001-of-00004.parquet"
    real_parquet_file, reads = shards_module.pq.ParquetFile, []

    def token_pages_unreadable(path, *args, **kwargs):
        parquet = real_parquet_file(path, *args, **kwargs)
        if Path(path) == unreadable:

            def read(columns=None, *args, **kwargs):
                reads.append(columns)
                raise OSError(errno.EIO, "Input/output error")

            parquet.read = read
        return parquet

    monkeypatch.setattr(shards_module.pq, "ParquetFile", token_pages_unreadable)
    before = files_as_they_were(tmp_path / "cache")
    with pytest.raises(ShardUnreadable, match=says(str(unreadable), "Input/output error", "nothing was deleted", "Rerun once")):
        build(cfg, progress=False)
    assert reads == [list(SAMPLE_COLUMNS)]  # the footer read fine: only the samples' read failed
    assert files_as_they_were(tmp_path / "cache") == before
    monkeypatch.undo()
    kept = snapshot(tmp_path / "cache" / "data")
    resumed = build(cfg, progress=False)
    assert resumed.written == ["train-00002-of-00004.parquet", "train-00003-of-00004.parquet"]
    assert {name: snapshot(tmp_path / "cache" / "data")[name] for name in kept} == kept


def test_a_resume_refuses_a_finished_shard_holding_fewer_samples_than_this_run_would_write(tmp_path, monkeypatch):
    """Shard 0's last sample failed (non-finite) and its record says so; under new rules that row is
    no longer valid and the next one takes its place. The shard's three rows match this run's first
    three, but this run would write four samples into it: keeping it would lose one. Built over
    the target's whole vocabulary: a draft vocabulary's ranking would change with the rows."""
    samples = prepare(small_config(tmp_path / "plan", draft_vocab_size=None)).samples
    last_of_shard_0 = samples[3]
    elsewhere = {t for k, ids in enumerate(samples["input_ids"]) if k != 3 for t in ids}
    (token, *_) = sorted(set(last_of_shard_0["input_ids"]) - elsewhere)
    cfg = small_config(tmp_path / "cache", poisoned_target(tmp_path, token), draft_vocab_size=None)
    build(cfg, progress=False)
    assert [failure["sample_id"] for failure in read_manifest(tmp_path / "cache")["failed"]] == [last_of_shard_0["sample_id"]]
    conversation_rules_change(monkeypatch, "failed row invalid", invalid(last_of_shard_0["sample_id"]))
    before = files_as_they_were(tmp_path / "cache")
    with pytest.raises(
        ResumeSamplesDiffer,
        match=says("shard train-00000-of-00004.parquet, which this build finished", "it holds 3 samples, where this run has 4"),
    ):
        build(cfg.replace(resume=True), progress=False)
    assert files_as_they_were(tmp_path / "cache") == before


def test_a_resume_reads_only_the_sample_columns_of_its_finished_shards(tmp_path, monkeypatch):
    """Nothing changed: the check reads the kept shard's token columns alone, and the resume ends
    with the shards of an uninterrupted build, byte for byte."""
    reference = build(small_config(tmp_path / "reference", max_samples=8), progress=False)
    cfg = small_config(tmp_path / "cache", max_samples=8)
    interrupted_build(cfg, monkeypatch, after_shards=1)
    real_read, reads = pq.ParquetFile.read, []

    def recording_read(self, columns=None, *args, **kwargs):
        reads.append(columns)
        return real_read(self, columns, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read", recording_read)
    resumed = build(cfg.replace(resume=True), progress=False)
    assert resumed.written == ["train-00001-of-00002.parquet"]
    assert reads == [list(SAMPLE_COLUMNS)]
    assert sorted(p.name for p in (tmp_path / "cache" / "data").iterdir()) == sorted(
        p.name for p in (reference.output_dir / "data").iterdir()
    )
    for shard in (reference.output_dir / "data").iterdir():
        assert (tmp_path / "cache" / "data" / shard.name).read_bytes() == shard.read_bytes(), shard.name


def test_a_resume_checks_again_once_it_holds_the_lock(tmp_path, monkeypatch):
    """Another build can take a new directory between a resume's first check and its lock: the
    resume then refuses, and never continues that build's shards under its own card."""
    import builder.pipeline as pipeline_module

    cfg = small_config(tmp_path / "cache")
    real_open_uploader = pipeline_module.open_uploader

    def another_build_starts_meanwhile(*args, **kwargs):
        monkeypatch.setattr(pipeline_module, "open_uploader", real_open_uploader)  # the other build passes straight on
        interrupted_build(cfg.replace(seq_length=80), monkeypatch, after_shards=1)
        return real_open_uploader(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "open_uploader", another_build_starts_meanwhile)
    with pytest.raises(ResumeMismatch, match=r"(?m)^  seq_length: cache has 80, this run has 96"):
        build(cfg.replace(resume=True), progress=False)
    assert json.loads((tmp_path / "cache" / BUILD_STATE_FILE).read_text())["seq_length"] == 80  # the other build's, untouched
    assert [p.name for p in (tmp_path / "cache" / "data").glob("*.parquet")] == ["train-00000-of-00004.parquet"]
    assert not (tmp_path / "cache" / "README.md").exists()


def test_a_resume_removes_every_killed_writers_temp_file(tmp_path, monkeypatch):
    cfg = small_config(tmp_path / "cache")
    interrupted_build(cfg, monkeypatch, after_shards=1)
    out = tmp_path / "cache"
    leftovers = [
        out / ".README.md.tmp-4242",
        out / "vocab" / ".lm_head.safetensors.tmp-4242",
        out / BUILD_STATE_DIR / ".identity.json.tmp-4242",
    ]
    leftovers.append(out / BUILD_STATE_DIR / "shards" / ".train-00001-of-00004.parquet.json.tmp-4242")
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half written")
    others = [  # writers of another cache nested in this one, and an export into a folder inside it
        out / "ablation" / "data" / ".train-00000-of-00001.parquet.tmp-4243",
        out / "exports" / "nemo" / ".export.tmp-4244" / "shard-000000.safetensors",
    ]
    for path in others:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"being written")
    (out / ".nemo.tmp-4245").mkdir()  # a new export's folder beside its OUT, at the cache's top
    build(cfg.replace(resume=True), progress=False)
    assert [p for p in leftovers if p.exists()] == []
    assert [p for p in others if not p.exists()] == [] and (out / ".nemo.tmp-4245").is_dir()


def test_resume_takes_the_same_local_target_and_input_under_another_spelling(tmp_path, monkeypatch):
    target = make_tiny_target(tmp_path / "models" / "tiny", "llama")
    chats = tmp_path / "data" / "chats.jsonl"
    chats.parent.mkdir()
    chats.write_bytes((Path(__file__).parents[1] / "builder/assets/chats/openai.jsonl").read_bytes())
    (tmp_path / "link").symlink_to(tmp_path / "models")
    cfg = small_config(tmp_path / "cache", target, input_data=str(chats))
    interrupted_build(cfg, monkeypatch, after_shards=1)
    respelled = cfg.replace(resume=True, target_model=f"{tmp_path}/link/tiny/", input_data=f"{tmp_path}/data/../data/chats.jsonl")
    assert len(build(respelled, progress=False).written) == 3  # resumed, not refused
    other = make_tiny_target(tmp_path / "models" / "other", "llama")  # another folder is still another target
    with pytest.raises(ResumeMismatch, match=r"target.model: cache has"):
        build(cfg.replace(resume=True, target_model=str(other)), progress=False)


CONFIGURED_CARD = """---
configs:
- config_name: clean
  default: true
  data_files:
  - split: train
    path: clean/train-*.jsonl
- config_name: raw
  data_files: raw/*.jsonl
---
"""


def configured_chats(root: Path) -> Path:
    """A Hub dataset downloaded with `hf download --local-dir`: configurations `clean` (its default) and `raw`."""
    lines = (Path(__file__).parents[1] / "builder/assets/chats/openai.jsonl").read_text().splitlines(keepends=True)
    for name, rows in (("clean/train-0.jsonl", lines[:8]), ("raw/dump-0.jsonl", lines[8:16])):
        (root / name).parent.mkdir(parents=True)
        (root / name).write_text("".join(rows))
    (root / "README.md").write_text(CONFIGURED_CARD)
    return root


@pytest.mark.parametrize(("began", "resumed"), [(None, "clean"), ("clean", None)])
def test_a_resume_naming_the_default_input_config_or_leaving_it_continues_the_build(tmp_path, monkeypatch, began, resumed):
    chats = configured_chats(tmp_path / "chats")
    reference = build(small_config(tmp_path / "reference", input_data=str(chats)), progress=False)
    cfg = small_config(tmp_path / "cache", input_data=str(chats), input_config=began)
    interrupted_build(cfg, monkeypatch, after_shards=1)
    resumed_build = build(cfg.replace(resume=True, input_config=resumed), progress=False)
    assert resumed_build.written == ["train-00001-of-00002.parquet"]
    assert resumed_build.manifest["identity"]["input"]["config"] == "clean"
    assert resumed_build.manifest["fingerprint"] == reference.manifest["fingerprint"]
    assert_same_content(decoded_rows(reference.output_dir), decoded_rows(resumed_build.output_dir))


def test_a_resume_of_a_build_that_recorded_no_input_config_takes_the_default_it_read(tmp_path, monkeypatch):
    """Earlier versions recorded --input-config as typed, None for the default: the same files are the
    same input, named or not; another configuration's are not."""
    chats = configured_chats(tmp_path / "chats")
    reference = build(small_config(tmp_path / "reference", input_data=str(chats)), progress=False)
    cfg = small_config(tmp_path / "cache", input_data=str(chats))
    interrupted_build(cfg, monkeypatch, after_shards=1)
    state = tmp_path / "cache" / BUILD_STATE_FILE
    older = json.loads(state.read_text())
    older["input"]["config"] = None  # as an earlier version recorded it
    state.write_text(json.dumps(older))
    with pytest.raises(ResumeMismatch, match=r"(?m)^  input\.config: cache has None"):
        build(cfg.replace(resume=True, input_config="raw"), progress=False)
    resumed = build(cfg.replace(resume=True, input_config="clean"), progress=False)
    assert resumed.written == ["train-00001-of-00002.parquet"]
    assert_same_content(decoded_rows(reference.output_dir), decoded_rows(resumed.output_dir))


def test_only_an_unrecorded_input_config_is_resolved_by_the_content_it_read():
    """A None recorded by an earlier version is matched by equal content digests; a configuration
    recorded by name is compared by name, whatever the content, and no digest at all matches nothing."""
    same_content = {"config": "clean", "content_hash": "h"}
    assert identity_differences({"input": {"config": None, "content_hash": "h"}}, {"input": same_content}) == {}
    assert identity_differences({"input": {"config": "raw", "content_hash": "h"}}, {"input": same_content}) == {
        "input.config": ("raw", "clean")
    }
    assert identity_differences({"input": {"config": None}}, {"input": {"config": "clean"}}) == {"input.config": (None, "clean")}


def test_a_moved_local_input_is_matched_only_by_a_content_digest_recorded_for_it(tmp_path):
    """A stored path that leads nowhere now names this run's input only when the recorded digest equals
    this run's: none recorded (a build that never hashed it) is no match."""
    here = tmp_path / "chats.jsonl"
    here.write_text("{}\n")
    gone = str(tmp_path / "moved-away" / "chats.jsonl")
    current = {"input": {"data": str(here), "content_hash": "h"}}
    assert identity_differences({"input": {"data": gone, "content_hash": "h"}}, current) == {}
    assert set(identity_differences({"input": {"data": gone, "content_hash": "other"}}, current)) == {"input.data", "input.content_hash"}
    assert identity_differences({"input": {"data": gone}}, {"input": {"data": str(here)}}) == {"input.data": (gone, str(here))}


def test_resume_refuses_a_local_target_whose_weights_changed(tmp_path, monkeypatch):
    """A checkpoint saved over the same folder keeps its config.json: only its weights tell."""
    target = make_tiny_target(tmp_path / "target", "llama", seed=0)
    cfg = small_config(tmp_path / "cache", target, max_samples=8)
    interrupted_build(cfg, monkeypatch, after_shards=1)
    make_tiny_target(tmp_path / "target", "llama", seed=1)  # new weights saved over the old
    monkeypatch.setattr(placement_module, "load_model", lambda *a, **k: pytest.fail("weights loaded before the identity check"))
    before = snapshot(tmp_path / "cache")
    with pytest.raises(ResumeMismatch, match=r"(?m)^  target\.weights_sample_sha256: cache has"):
        build(cfg.replace(resume=True), progress=False)
    assert snapshot(tmp_path / "cache") == before


def test_a_build_begun_before_weight_fingerprints_resumes_and_says_what_goes_unchecked(tmp_path, monkeypatch, caplog):
    reference = build(small_config(tmp_path / "reference", max_samples=8), progress=False)
    cfg = small_config(tmp_path / "cache", max_samples=8)
    interrupted_build(cfg, monkeypatch, after_shards=1)
    monkeypatch.undo()
    state = tmp_path / "cache" / ".eagle3_build" / "identity.json"
    older = json.loads(state.read_text())
    for field in ("weights_sample_sha256", "remote_code", "code_sha256"):  # as a build of an earlier version recorded it
        del older["target"][field]
    state.write_text(json.dumps(older))
    resumed = build(cfg.replace(resume=True), progress=False)
    assert "predates target.weights_sample_sha256: that field is not checked" in caplog.text
    assert "predates target.remote_code" not in caplog.text  # the target names no code of its own: nothing to check
    assert "predates target.code_sha256" not in caplog.text
    assert_same_content(decoded_rows(reference.output_dir), decoded_rows(resumed.output_dir))


def test_resume_refuses_a_local_target_whose_own_code_changed_or_is_no_longer_trusted(tmp_path, monkeypatch):
    """The code a target's auto_map names computes its outputs as much as its weights do: edited, or
    no longer run (transformers then runs its built-in class), the shards written would come from
    another model than the kept ones. Unchanged, the build resumes."""
    target = target_with_own_code(tmp_path / "scaled_target", scale=2.0)
    cfg = small_config(tmp_path / "cache", target, max_samples=8, trust_remote_code=True)
    interrupted_build(cfg, monkeypatch, after_shards=1)
    identity = json.loads((tmp_path / "cache" / BUILD_STATE_FILE).read_text())["target"]
    assert identity["remote_code"] is True and re.fullmatch(r"[0-9a-f]{64}", identity["code_sha256"])
    write_own_code(target, scale=3.0)
    monkeypatch.setattr(placement_module, "load_model", lambda *a, **k: pytest.fail("weights loaded before the identity check"))
    before = snapshot(tmp_path / "cache")
    with pytest.raises(ResumeMismatch, match=r"(?m)^  target\.code_sha256: cache has '[0-9a-f]{64}', this run has '[0-9a-f]{64}'$"):
        build(cfg.replace(resume=True), progress=False)
    write_own_code(target, scale=2.0)
    no_longer_trusted = (
        r"(?m)^  target\.code_sha256: cache has '[0-9a-f]{64}', this run has None\n"
        r"  target\.remote_code: cache has True, this run has False$"
    )
    with pytest.raises(ResumeMismatch, match=no_longer_trusted):
        build(cfg.replace(resume=True, trust_remote_code=False), progress=False)
    assert snapshot(tmp_path / "cache") == before
    monkeypatch.undo()
    resumed = build(cfg.replace(resume=True), progress=False)
    assert resumed.written == ["train-00001-of-00002.parquet"]
    reference = build(cfg.replace(output_dir=str(tmp_path / "reference")), progress=False)
    assert_same_content(decoded_rows(reference.output_dir), decoded_rows(resumed.output_dir))


def test_an_earlier_versions_build_of_a_target_with_own_code_resumes_and_says_what_goes_unchecked(tmp_path, monkeypatch, caplog):
    target = target_with_own_code(tmp_path / "earlier_target")
    cfg = small_config(tmp_path / "cache", target, max_samples=8, trust_remote_code=True)
    interrupted_build(cfg, monkeypatch, after_shards=1)
    state = tmp_path / "cache" / BUILD_STATE_FILE
    older = json.loads(state.read_text())
    del older["target"]["remote_code"], older["target"]["code_sha256"]  # as a build of an earlier version recorded it
    state.write_text(json.dumps(older))
    resumed = build(cfg.replace(resume=True), progress=False)
    assert resumed.written == ["train-00001-of-00002.parquet"]
    assert "predates target.remote_code: that field is not checked" in caplog.text
    assert "predates target.code_sha256: that field is not checked" in caplog.text


def test_weights_sample_hash_follows_the_bytes_not_the_folder(tmp_path):
    from builder.fingerprints import SAMPLED_BLOCK_BYTES, local_weights_sample_hash

    first = make_tiny_target(tmp_path / "first", "llama", seed=0)
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in first.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    assert local_weights_sample_hash(str(copy)) == local_weights_sample_hash(str(first)) is not None
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-SAMPLED_BLOCK_BYTES] ^= 1  # one bit of the last block: a sampled one
    weights.write_bytes(bytes(data))
    assert local_weights_sample_hash(str(copy)) != local_weights_sample_hash(str(first))
    assert local_weights_sample_hash("meta-llama/Llama-3.1-8B-Instruct") is None  # a Hub id: its commit is recorded


def test_each_shard_records_the_precision_it_was_computed_in_and_a_mixing_resume_warns(tmp_path, monkeypatch, caplog):
    cfg = small_config(tmp_path / "cache", max_samples=8)
    interrupted_build(cfg, monkeypatch, after_shards=1)
    monkeypatch.undo()
    first = shard_records(tmp_path / "cache")
    here = forward_module.compute_record()
    assert [record["compute"] for record in first.values()] == [here]
    assert here == {
        "device": "cpu",
        "dtype": "float32",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
    }
    name, record = next(iter(first.items()))
    record["compute"] = {
        "device": "cuda",
        "dtype": "bfloat16",
    }  # as if that shard had been built on a GPU (a record of before the finer fields)
    (tmp_path / "cache" / ".eagle3_build" / "shards" / f"{name}.json").write_text(json.dumps(record))
    resumed = build(cfg.replace(resume=True), progress=False)
    assert (
        'the shards already written were computed with {"device": "cuda", "dtype": "bfloat16"}; '
        'this run computes with {"device": "cpu", "dtype": "float32"}: the cache will mix precisions' in caplog.text
    )
    computes = {s["name"]: s["compute"] for s in read_manifest(resumed.output_dir)["shards"]}
    assert computes.pop(name) == {"device": "cuda", "dtype": "bfloat16"}
    assert list(computes.values()) == [here] * len(computes) and computes


def test_a_resume_on_a_machine_that_rounds_differently_warns(tmp_path, caplog):
    """Same device kind and dtype, another CPU instruction set: the shards are comparable only within a tolerance."""
    from builder.build_state import sidecar_path

    here = forward_module.compute_record()
    records = {"a": here | {"cpu_capability": "ANOTHER"}, "b": {"device": "cpu", "dtype": "float32"}, "c": here}
    for name, compute in records.items():
        sidecar_path(tmp_path, name).parent.mkdir(parents=True, exist_ok=True)
        sidecar_path(tmp_path, name).write_text(json.dumps({"name": name, "compute": compute}))
    sidecar_path(tmp_path, "d").write_text(json.dumps({"name": "d"}))  # recorded before shards said how they were computed
    forward_module.warn_if_precisions_mix(tmp_path, ["b", "c", "d"], here)
    assert caplog.text == ""  # an older record, with only the device kind and dtype, agrees where it has them
    forward_module.warn_if_precisions_mix(tmp_path, ["a", "b", "c", "d"], here)
    assert f"the shards already written were computed on {json.dumps(records['a'], sort_keys=True)}; this run computes on " in caplog.text
    assert (
        "may round differently, so one machine's `verify --recompute` checks the other's shards within a tolerance (fp32) or skips them"
        in caplog.text
    )
    assert "mix precisions" not in caplog.text


def shard_records(out: Path) -> dict:
    """The shard records of an unfinished build (no card yet), by shard name."""
    return {p.name.removesuffix(".json"): json.loads(p.read_text()) for p in sorted((out / ".eagle3_build" / "shards").glob("*.json"))}


def test_shards_are_written_off_the_forward_thread(tmp_path, monkeypatch):
    """No GPU idles on I/O: encoding, hashing and writing happen on the writer thread."""
    import threading

    import builder.shards as shards_module

    threads = set()
    real_add = shards_module.ShardWriter.add

    def recording_add(self, row):
        threads.add(threading.current_thread().name)
        return real_add(self, row)

    monkeypatch.setattr(shards_module.ShardWriter, "add", recording_add)
    build(small_config(tmp_path / "cache", max_samples=6), progress=False)
    assert threads == {"eagle3-shard-writer"}


def test_a_build_reads_the_targets_config_once(tmp_path, monkeypatch):
    """Start-up: the tokenizer and the weights reuse the config `prepare` parsed, instead of reading
    it again (for a Hub id, each read is also a request)."""
    from transformers import AutoConfig

    real, reads = AutoConfig.from_pretrained.__func__, []

    def counting(cls, *args, **kwargs):
        reads.append(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(counting))
    result = build(small_config(tmp_path / "cache", max_samples=4), progress=False)
    assert len(result.shards) == 1 and result.manifest is not None
    assert reads == [result.prepared.model_path]


def test_each_shard_counts_the_argmax_rows_in_the_draft_vocabulary(built):
    """The sidecar's `argmax_in_vocab` (counted per batch on the writer's dispatch thread) equals a
    count over the stored argmax of the shard's rows."""
    result, _ = built
    rows = decoded_rows(result.output_dir)
    selected = torch.as_tensor(result.prepared.selected_token_ids)
    start = 0
    counts = []
    for shard in result.manifest["shards"]:
        argmax = torch.cat([r["target_argmax"] for r in rows[start : start + shard["rows"]]])
        start += shard["rows"]
        counts.append(int(torch.isin(argmax.long(), selected).sum()))
        assert shard["argmax_in_vocab"] == counts[-1], shard["name"]
    assert 0 < sum(counts) < sum(s["loss_tokens"] for s in result.manifest["shards"])  # neither all nor none: the count means something


def test_the_summary_counts_shards_and_processes_in_words(built):
    """One process is "1 process"; the shards of a fresh build are all written by this run."""
    result, _ = built
    first = format_summary(result).splitlines()[0]
    shards = len(result.manifest["shards"])
    assert shards > 1
    assert first.endswith(f"{shards} shards written by 1 process, 0 already complete)")


def test_resume_takes_a_relative_local_target_and_input_from_another_working_directory(tmp_path, monkeypatch):
    """Begun in one folder with relative paths, resumed from another with absolute ones: the stored
    paths lead nowhere from there, and the content digests recorded for them tell the same input
    (resumed) from another one (refused)."""
    began_in, resumed_in = tmp_path / "relA", tmp_path / "relB"
    make_tiny_target(began_in / "tiny", "llama")
    chats = (Path(__file__).parents[1] / "builder/assets/chats/openai.jsonl").read_bytes()
    (began_in / "chats").mkdir()
    (began_in / "chats" / "chats.jsonl").write_bytes(chats)
    resumed_in.mkdir()
    monkeypatch.chdir(began_in)
    cfg = small_config(tmp_path / "cache", "tiny", input_data="chats")
    interrupted_build(cfg, monkeypatch, after_shards=1)
    monkeypatch.chdir(resumed_in)
    absolute = cfg.replace(resume=True, target_model=str(began_in / "tiny"), input_data=str(began_in / "chats"))

    (resumed_in / "changed").mkdir()  # the same rows and one more: another input
    (resumed_in / "changed" / "chats.jsonl").write_bytes(chats + chats.splitlines(keepends=True)[0])
    with pytest.raises(ResumeMismatch, match=r"(?m)^  input\.content_hash: cache has .*\n  input\.data: cache has 'chats', this run has "):
        build(absolute.replace(input_data=str(resumed_in / "changed")), progress=False)
    make_tiny_target(resumed_in / "other", "llama", seed=1)  # other weights: another target
    with pytest.raises(ResumeMismatch, match=r"(?m)^  target\.model: cache has 'tiny', this run has .*\n  target\.weights_sample_sha256"):
        build(absolute.replace(target_model=str(resumed_in / "other")), progress=False)
    assert len(build(absolute, progress=False).written) == 3  # resumed, not refused


def test_resume_of_a_cache_without_its_build_state_says_there_is_nothing_to_resume(tmp_path):
    """A finished cache copied or downloaded without `.eagle3_build`: not a build with other settings."""
    import shutil

    from helpers import says

    from builder.errors import ConfigError

    out = tmp_path / "cache"
    cfg = small_config(out, max_samples=4)
    build(cfg, progress=False)
    shutil.rmtree(out / BUILD_STATE_DIR)
    before = snapshot(out)
    finished = ("It holds a finished cache (its card, README.md) without its build state", "so there is nothing to resume")
    advice = ("The cache is complete", "eagle3-cache verify", "To build it again, choose a new --output-dir")
    with pytest.raises(
        ConfigError,
        match=says(f"--output-dir: expected an interrupted build to resume, with its build state ({BUILD_STATE_DIR})", *finished, *advice),
    ):
        build(cfg.replace(resume=True), progress=False)
    (out / "README.md").unlink()  # shards alone
    with pytest.raises(ConfigError, match=says("It holds shards (data/*.parquet) without its build state", "choose a new --output-dir")):
        build(cfg.replace(resume=True), progress=False)
    del before["README.md"]
    assert snapshot(out) == before


@pytest.mark.parametrize(("record", "what"), [("identity.json", "identity"), ("input.json", "record of the input commit read")])
def test_resume_of_a_build_whose_state_no_longer_decodes_says_what_to_do(tmp_path, record, what):
    """The build's identity, or its record of the input commit read, cut short since it was written:
    the resume cannot check this run against the build, so it stops saying so, changing nothing,
    rather than with a JSON error."""
    from helpers import says

    from builder.errors import ConfigError

    out = tmp_path / "cache"
    cfg = small_config(out, max_samples=4, shard_size=2)
    build(cfg, progress=False)
    damaged = out / BUILD_STATE_DIR / record
    damaged.write_text(damaged.read_text()[:5])
    before = snapshot(out)
    refused = says(
        f"--output-dir: expected an interrupted build to resume, with its {what} ({BUILD_STATE_DIR}/{record})",
        f"{damaged} is damaged",
        "nothing was changed",
        "Build again into a new --output-dir",
    )
    with pytest.raises(ConfigError, match=refused):
        build(cfg.replace(resume=True), progress=False)
    assert snapshot(out) == before


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_lock_file_that_cannot_be_created_is_a_clear_error():
    """/proc/self takes no new folder from anyone, root included: an OSError, told as what to change."""
    from helpers import says

    from builder.errors import ConfigError
    from builder.lock import CacheLock

    with pytest.raises(
        ConfigError, match=says("--output-dir", "got '/proc/self/eagle3-cache'", "Creating /proc/self/eagle3-cache", "Choose a writable")
    ):
        CacheLock(Path("/proc/self/eagle3-cache")).acquire()


def test_an_offline_build_of_a_downloaded_hub_target_records_the_commit_its_files_load_from(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE (set by conftest) with the model in the local Hub cache, as on compute nodes: the
    commit is the snapshot's, found without asking the Hub, by branch or by commit."""
    from huggingface_hub import constants

    from builder.embedded import resolve_target

    commit = "0123456789abcdef" * 2 + "01234567"
    hub_cache_holding(tmp_path / "hub", "someorg/tiny", commit, Path(resolve_target("tiny-llama")))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert constants.HF_HUB_OFFLINE
    for name, revision in (("main", None), ("pinned", commit)):
        result = build(small_config(tmp_path / name, "someorg/tiny", max_samples=4, target_revision=revision), progress=False)
        target = read_manifest(result.output_dir)["identity"]["target"]
        assert target["revision"] == commit and target["config_sha256"] is None and target["remote_code"] is None


def test_a_hub_target_missing_from_the_local_hub_cache_is_refused_saying_what_to_do(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from builder.errors import InputError
    from builder.target import resolved_revision

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        InputError,
        match=says("'someorg/absent' (revision v2) in the local Hub cache", "found OSError", "`hf download`", "local model directory"),
    ):
        resolved_revision("someorg/absent", "v2")
