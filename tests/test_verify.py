"""`verify`: an intact cache passes; each kind of damage is named with its shard."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import configs_removed, first_config_renamed, index_cut_short, says, small_config
from hub_server import TOKEN, hub_fixtures
from huggingface_hub import DatasetCard, HfApi

from builder.errors import Eagle3CacheError
from builder.files import file_hash
from builder.forward import FAULT_ENV
from builder.manifest import argmax_coverage, bytes_per_token
from builder.pipeline import build
from builder.push import PushTarget, push_cache
from builder.reader import RowDecoder, read_draft_vocab, read_manifest, read_vocab
from builder.shards import CHECKSUM_ALGORITHM, decode_value, encode_value, shard_name
from builder.verify import recompute_samples, verify_cache

SHARD = "train-00001-of-00004.parquet"
REPAIR = f"to repair: delete data/{SHARD} and run the build again with --resume (it rebuilds only the missing shards)"
RESTORE_CARD = "Restore the card (run the build command again with --resume: it writes the card again, computing nothing), or rebuild"


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    return build(small_config(tmp_path_factory.mktemp("verify") / "cache"), progress=False).output_dir


@pytest.fixture
def cache(intact, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(intact, copy)
    return copy


def test_intact_cache_passes_with_recompute(intact):
    assert verify_cache(intact) == []
    assert verify_cache(intact, recompute=5, seed=3) == []


def test_a_cache_path_with_a_tilde_is_verified_in_the_home_folder(cache, tmp_path, monkeypatch):
    """`~` means the home folder, as the command line's shell reads it: what is checked is the cache there."""
    monkeypatch.setenv("HOME", str(cache.parent))
    monkeypatch.chdir(cache)
    assert verify_cache(f"~/{cache.name}") == []
    (cache / "data" / "train-00000-of-00004.parquet").unlink()
    assert any("train-00000-of-00004.parquet" in problem for problem in verify_cache(f"~/{cache.name}"))


@pytest.mark.parametrize(
    "settings",
    [
        dict(target_format="topk", topk=8, aux_dtype="fp8"),
        dict(target_format="hidden", aux_dtype="fp8", dtype="bf16", store_full_head=True),
        dict(dtype="bf16", compression="none", draft_vocab_size=None),  # the whole vocabulary is the draft's
    ],
    ids=["topk-fp8", "hidden-fp8-bf16", "probs-bf16-raw-whole-vocab"],
)
def test_intact_caches_of_other_formats_pass(tmp_path, settings):
    """What verify compares with its rows and records (every count, coverage and bytes per token) is what each
    format's build writes."""
    cache = build(small_config(tmp_path / "cache", **settings), progress=False).output_dir
    assert verify_cache(cache) == []


def test_flipped_byte_is_caught(cache):
    path = cache / "data" / SHARD
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert verify_cache(cache) == [f"data/{SHARD}: checksum differs from the manifest (the file is damaged); {REPAIR}"]


def test_a_file_the_card_reads_as_a_shard_but_the_manifest_does_not_list_is_caught(cache):
    (cache / "data" / "train-copy-of-00004.parquet").write_bytes((cache / "data" / SHARD).read_bytes())
    (cache / "data" / f"{SHARD}.bak").write_bytes((cache / "data" / SHARD).read_bytes())  # the card's pattern skips it
    (cache / "data" / "notes.txt").write_text("not named like a shard: not a problem")
    stray = "data/train-copy-of-00004.parquet: not in the manifest, but the card reads it as a shard (data/train-*-of-00004.parquet)"
    assert verify_cache(cache) == [f"{stray}: move it out of data/"]


def test_truncated_shard_is_caught(cache):
    path = cache / "data" / SHARD
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    assert verify_cache(cache) == [f"data/{SHARD}: {size // 2} bytes, the manifest says {size} (truncated or replaced); {REPAIR}"]


def test_missing_shard_is_caught_saying_how_to_repair_it(cache):
    (cache / "data" / SHARD).unlink()
    assert verify_cache(cache) == [
        f"data/{SHARD}: missing; to repair: run the build again with --resume (it rebuilds only the missing shards)"
    ]
    build(small_config(cache, resume=True), progress=False)  # as the message says
    assert verify_cache(cache) == []


def test_a_missing_or_damaged_vocab_file_is_caught_saying_how_to_repair_it(cache):
    vocab = cache / "vocab" / "vocab.safetensors"
    data = bytearray(vocab.read_bytes())
    data[-3] ^= 0x01
    vocab.write_bytes(bytes(data))
    repair = "to repair: run the build again with --resume (it writes the vocab file again, computing no shard)"
    assert verify_cache(cache) == [f"vocab/vocab.safetensors: checksum differs from the manifest (the file is damaged); {repair}"]
    vocab.unlink()
    assert verify_cache(cache) == [f"vocab/vocab.safetensors: missing; {repair}"]
    build(small_config(cache, resume=True), progress=False)  # as the message says
    assert verify_cache(cache) == []


def test_edited_manifest_is_caught(cache):
    card = DatasetCard.load(cache / "README.md")
    card.data["eagle3_cache"]["identity"]["seq_length"] = 80
    card.save(cache / "README.md")
    problems = verify_cache(cache)
    assert problems[0].startswith("README.md: the manifest's identity fields no longer match its fingerprint")
    assert any("outside [1, seq_length 80]" in p for p in problems)  # rows longer than the claimed length


def rewrite_with_perturbed_aux(cache, shard_name: str) -> None:
    """A consistent but wrong shard (as a buggy build would write): checksums updated to match."""
    rewrite_values(cache, shard_name, "aux_hidden_states", lambda values: values + 1e-3, rows=1)


def rewrite_values(cache, shard_name: str, column: str, change, rows: int | None = None) -> None:
    """`change` applied to the fp32 values of `column` in the shard's first `rows` rows (all: None),
    stored as byte planes + zstd (the default) with the shard's record updated to agree."""
    path = cache / "data" / shard_name
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    for k in range(len(values) if rows is None else rows):
        values[k] = b"".join(encode_value(change(decode_value(values[k], torch.float32)), "byte_planes_zstd").parts)
    table = table.set_column(table.schema.get_field_index(column), column, pa.array(values, pa.binary()))
    pq.write_table(table, path, compression="none")
    card = DatasetCard.load(cache / "README.md")
    for shard in card.data["eagle3_cache"]["shards"]:
        if shard["name"] == shard_name:
            shard["bytes"], shard["checksum"] = path.stat().st_size, file_hash(path, CHECKSUM_ALGORITHM)
    manifest = card.data["eagle3_cache"]
    manifest["totals"]["bytes"] = sum(shard["bytes"] for shard in manifest["shards"])
    manifest["totals"]["bytes_per_token"] = bytes_per_token(manifest["shards"])
    card.data["dataset_info"]["splits"][0]["num_bytes"] = manifest["totals"]["bytes"]
    card.save(cache / "README.md")


def test_recompute_catches_wrong_but_consistent_aux(cache):
    rewrite_with_perturbed_aux(cache, SHARD)
    assert verify_cache(cache) == []  # structurally fine
    sample_id = pq.read_table(cache / "data" / SHARD, columns=["sample_id"])["sample_id"][0].as_py()
    problems = verify_cache(cache, recompute=14)  # every sample
    assert len(problems) == 1
    assert problems[0].startswith(f"data/{SHARD}/{sample_id}: aux_hidden_states differs from a live recompute")


def drop_first_supervised_token(cache, shard_name: str) -> tuple[str, int]:
    """The shard's first sample loses its first supervised token: its loss mask and its target rows
    (probs, argmax) agree, and so does the shard's record: (its sample id, the position cleared)."""
    path = cache / "data" / shard_name
    table = pq.read_table(path)
    rows = table.to_pylist()
    row = rows[0]
    mask = torch.frombuffer(bytearray(row["loss_mask"]), dtype=torch.uint8).clone()
    supervised = mask.nonzero().squeeze(1)
    mask[supervised[0]] = 0
    for column in ("target_probs", "target_argmax"):
        values = decode_value(row[column], torch.float32 if column == "target_probs" else torch.int32)
        kept = values.view(len(supervised), -1)[1:].reshape(-1)
        row[column] = b"".join(encode_value(kept.contiguous(), "byte_planes_zstd").parts)
    row["loss_mask"] = mask.numpy().tobytes()
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path, compression="none")
    dropped_argmax = int(decode_value(table.column("target_argmax")[0].as_py(), torch.int32)[0])
    dropped_hit = int(draft_vocab_mask(cache)[dropped_argmax])

    def agree(data):
        manifest = data["eagle3_cache"]
        for shard in manifest["shards"]:
            if shard["name"] == shard_name:
                shard |= {"bytes": path.stat().st_size, "checksum": file_hash(path, CHECKSUM_ALGORITHM)}
                shard["loss_tokens"] -= 1
                shard["argmax_in_vocab"] -= dropped_hit
        manifest["totals"]["bytes"] = sum(shard["bytes"] for shard in manifest["shards"])
        manifest["totals"]["bytes_per_token"] = bytes_per_token(manifest["shards"])
        data["dataset_info"]["splits"][0]["num_bytes"] = manifest["totals"]["bytes"]
        manifest["totals"]["loss_tokens"] -= 1
        manifest["totals"]["argmax_coverage"] = argmax_coverage(manifest["shards"])

    edit_card(cache, agree)
    return row["sample_id"], int(supervised[0])


def draft_vocab_mask(cache) -> torch.Tensor:
    """A bool per target token id: True for the cache's draft vocabulary, as the build counts argmax_in_vocab by."""
    vocab = read_vocab(cache)
    return torch.zeros(len(vocab["token_counts"]), dtype=torch.bool).index_fill_(0, vocab["selected_token_ids"], True)


def test_recompute_compares_the_samples_tokens_and_loss_masks_with_their_input_rows(cache):
    sample_id, position = drop_first_supervised_token(cache, SHARD)
    assert verify_cache(cache) == []  # every file as its record says, every row as its loss mask says
    source_index = pq.read_table(cache / "data" / SHARD, columns=["source_index"])["source_index"][0].as_py()
    assert verify_cache(cache, recompute=14) == [  # the target's outputs at the other positions match
        f"data/{SHARD}/{sample_id}: loss_mask differs from input row {source_index} tokenized now (0 at position {position}, "
        "where the row gives 1): this run tokenizes with the conversation rules and tokenizers, transformers and jinja2 "
        f"versions the build recorded, so the sample was damaged; {REPAIR}"
    ]


def test_a_correct_cache_that_another_version_tokenizes_otherwise_is_warned_of_not_called_damaged(cache, monkeypatch, caplog):
    """Conversation rules changed since the build (user turns now tokenize otherwise), or the build
    recorded no tokenizing versions (as before they were recorded): verify cannot tell the difference
    from damage, and a resume would refuse the shard for it, so a warning names what differs and no
    shard is called damaged."""
    import builder.tokenize

    def spaced_questions(messages: list[dict]) -> list[dict]:
        return [m | {"content": m["content"].replace("?", " ?")} if m["role"] == "user" else m for m in messages]

    real = builder.tokenize.normalize_row
    monkeypatch.setattr(builder.tokenize, "normalize_row", lambda row: spaced_questions(real(row)))
    edited = builder.tokenize.TOKENIZE_CODE_VERSION + "+spaced"
    versions = read_manifest(cache)["versions"]
    earlier = {k: v for k, v in versions.items() if k not in ("tokenize_code", "tokenizers", "jinja2")}
    for recorded, code_version, differing in (
        (versions, edited, f"tokenize_code {edited} here, {versions['tokenize_code']} for the build"),
        (earlier, builder.tokenize.TOKENIZE_CODE_VERSION, f"tokenize_code {builder.tokenize.TOKENIZE_CODE_VERSION} here, not recorded"),
    ):
        monkeypatch.setattr(builder.tokenize, "TOKENIZE_CODE_VERSION", code_version)
        edit_card(cache, lambda data, recorded=recorded: data["eagle3_cache"].__setitem__("versions", recorded))
        caplog.clear()
        assert verify_cache(cache, recompute=14) == []  # the target's outputs match the stored tokens
        (warning,) = [r.getMessage() for r in caplog.records if "tokenized now" in r.getMessage()]
        assert re.match(
            r"verify --recompute: \d+ recomputed sample\(s\) hold other token ids or loss masks than their input rows tokenized "
            rf"now \(data/train-\d+-of-00004\.parquet/\S+: input_ids differs from input row \d+ tokenized now .*\), and this run "
            rf"tokenizes with other versions than the build recorded \({re.escape(differing)}",
            warning,
        ), warning
        assert warning.endswith("Not counted as damage; to tell, verify with the versions the build recorded")


DATED_TEMPLATE = "{{- bos_token }}<|system|>\nToday Date: {{ strftime_now('%d %b %Y') }}<|end|>\n"


def test_recompute_does_not_compare_the_tokens_of_a_template_that_writes_the_day_it_runs(tmp_path, monkeypatch, caplog):
    """Llama 3.2 and 3.3's templates write "Today Date" into the system turn: verified on another day, every
    row tokenizes otherwise, and no sample is damaged."""
    import datetime

    import transformers.utils.chat_template_utils as chat_template_utils

    target = tiny_target_copy(tmp_path / "target")
    template = (target / "chat_template.jinja").read_text()
    (target / "chat_template.jinja").write_text(DATED_TEMPLATE + template.split("{{- bos_token }}", 1)[1])
    cache = build(small_config(tmp_path / "cache", target=target, max_samples=4), progress=False).output_dir

    class NextDay(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime.now(tz) + datetime.timedelta(days=1)

    monkeypatch.setattr(chat_template_utils, "datetime", NextDay)
    assert verify_cache(cache, target_model=str(target), recompute=4) == []
    assert (
        "verify --recompute: the recomputed samples' token ids and loss masks are not compared with their input rows: the "
        "chat template writes the day it runs into them (it calls strftime_now), so on another day than the build's they "
        "hold another date"
    ) in caplog.text


def test_recompute_tokenizes_its_samples_without_the_tokenizing_cache(intact, tmp_path, monkeypatch):
    """The tokenizing cache keys a map by the rows, tokenizer and versions, not by what a template reads as it
    renders (the day): the recompute tokenizes its few rows afresh, and caches nothing a later one would read."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    assert verify_cache(intact, recompute=3) == []
    assert list((tmp_path / "datasets").glob("eagle3_cache_tokenized/*")) == []


def test_recompute_says_so_where_the_input_rows_cannot_be_tokenized_again(cache, monkeypatch, caplog):
    import builder.inputs
    from builder.errors import InputError

    drop_first_supervised_token(cache, SHARD)
    build_input = read_manifest(cache)["identity"]["input"]["data"]
    load_rows = builder.inputs.load_rows

    def moved(*args, **kwargs):
        raise InputError("--input-data: no such file")

    def changed(*args, **kwargs):
        rows, info = load_rows(*args, **kwargs)
        return rows, info | {"content_hash": "0" * 64}

    note = "verify --recompute: the recomputed samples' token ids and loss masks are not compared with their input rows: "
    for load, why in (
        (moved, f"the build's input {build_input!r} cannot be read here (no such file): verify needs the files the build read at "),
        (changed, f"the build's input {build_input!r} has changed since (its content hash is {'0' * 64}, the build's "),
    ):
        monkeypatch.setattr(builder.inputs, "load_rows", load)
        caplog.clear()
        assert verify_cache(cache, recompute=14) == []  # the target's outputs match the stored tokens
        assert any(record.getMessage().startswith(note + why) for record in caplog.records), caplog.text


def test_recompute_reads_a_relative_input_path_from_the_directory_the_build_ran_in(tmp_path, monkeypatch, caplog):
    """A relative --input-data is recorded as given: verify reads it from where it runs, and says so."""
    from builder.embedded import resolve_input

    shutil.copytree(resolve_input("sample-chats"), tmp_path / "chats")
    monkeypatch.chdir(tmp_path)
    cache = build(small_config(tmp_path / "cache", input_data="chats"), progress=False).output_dir
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    relative = (
        f"(a relative path: the build read it from the directory it ran in, and verify reads it from the one it runs in, {elsewhere}: "
        "run verify from the build's)"
    )
    assert verify_cache(cache, recompute=2) == []
    assert f"the build's input 'chats' is not here: verify needs the files the build read at chats, unchanged {relative}" in caplog.text
    assert "--input" not in caplog.text and "give a local path" not in caplog.text  # the build's flags: verify has none
    (elsewhere / "chats").mkdir()
    (elsewhere / "chats" / "other.jsonl").write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n')
    caplog.clear()
    assert verify_cache(cache, recompute=2) == []
    assert re.search(
        r"the build's input 'chats' has changed since \(its content hash is \w+, the build's \w+\) " + re.escape(relative), caplog.text
    )
    monkeypatch.chdir(tmp_path)
    caplog.clear()
    assert verify_cache(cache, recompute=2) == []
    assert "not compared with their input rows" not in caplog.text


def set_shard_compute(cache, names: set[str], compute: dict) -> None:
    """Record shards as computed elsewhere (as a resume on another machine would have)."""
    card = DatasetCard.load(cache / "README.md")
    for shard in card.data["eagle3_cache"]["shards"]:
        if shard["name"] in names:
            shard["compute"] = compute
    card.save(cache / "README.md")


GPU_BF16 = {"device": "cuda", "dtype": "bfloat16"}


def test_recompute_compares_only_shards_computed_like_this_machine(cache, caplog):
    other = "train-00002-of-00004.parquet"
    rewrite_with_perturbed_aux(cache, SHARD)
    rewrite_with_perturbed_aux(cache, other)
    set_shard_compute(cache, {other}, GPU_BF16)  # its live recompute here could not match anyway
    assert verify_cache(cache) == []
    problems = verify_cache(cache, recompute=14)  # every sample
    assert [p.split("/")[1] for p in problems] == [SHARD]  # the damage in the comparable shard is still caught
    assert (
        f'skipping 1 shard(s) computed with {{"device": "cuda", "dtype": "bfloat16"}} (this machine computes with '
        f'{{"device": "cpu", "dtype": "float32"}}, which rounds differently): {other}' in caplog.text
    )


def one_step_up(values: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(values, torch.full_like(values, float("inf")))


def test_recompute_of_shards_computed_on_another_machine_of_this_kind_allows_a_few_rounding_steps(cache, caplog):
    from builder.forward import compute_record

    here = compute_record()
    rewrite_values(cache, SHARD, "aux_hidden_states", one_step_up)  # as another CPU's rounding could leave them
    rewrite_values(cache, SHARD, "target_probs", one_step_up)
    names = [f"data/{SHARD}/{id}" for id in pq.read_table(cache / "data" / SHARD, columns=["sample_id"])["sample_id"].to_pylist()]
    for recorded in (here, {"device": "cpu", "dtype": "float32"}):  # the same machine; a record of before the finer fields
        set_shard_compute(cache, {SHARD}, recorded)
        problems = verify_cache(cache, recompute=14)  # exact: one rounding step is a difference
        assert [p.split(": ")[0] for p in problems] == [n for n in names for _ in range(2)], problems
        assert problems[0].startswith(f"{names[0]}: aux_hidden_states differs from a live recompute (max abs diff ")

    other = here | {"cpu_capability": "ANOTHER"}
    set_shard_compute(cache, {SHARD}, other)
    report = verify_cache(cache, recompute=14)
    assert report == [] and report.recomputed == 14
    assert (
        f"verify --recompute: data/{SHARD} was computed on {json.dumps(other, sort_keys=True)}, and this machine is "
        f"{json.dumps(here, sort_keys=True)}: it may round differently, so their samples are compared within 16 rounding "
        "steps of float32, not bit for bit" in caplog.text
    )


def test_damage_beyond_the_tolerance_is_caught_saying_the_machine_may_round_differently(cache):
    from builder.forward import compute_record

    rewrite_with_perturbed_aux(cache, SHARD)
    set_shard_compute(cache, {SHARD}, compute_record() | {"torch": "another version"})
    sample_id = pq.read_table(cache / "data" / SHARD, columns=["sample_id"])["sample_id"][0].as_py()
    assert verify_cache(cache, recompute=14) == [
        f"data/{SHARD}/{sample_id}: aux_hidden_states differs from a live recompute by more than 16 rounding steps (max abs "
        "diff 0.001): this machine may round differently from the one that computed the shard, or the sample is damaged; "
        "recompute on the build's kind of machine to tell"
    ]


def test_in_fp32_a_zeroed_probability_row_or_scaled_aux_states_are_damage_on_another_machine_of_this_kind(cache):
    from builder.forward import compute_record

    rewrite_values(cache, SHARD, "target_probs", lambda v: torch.cat([torch.zeros_like(v[:1]), v[1:]]), rows=1)  # one row zeroed
    rewrite_values(cache, SHARD, "aux_hidden_states", lambda v: v * 0.9, rows=1)
    set_shard_compute(cache, {SHARD}, compute_record() | {"cpu_capability": "ANOTHER"})
    sample_id = pq.read_table(cache / "data" / SHARD, columns=["sample_id"])["sample_id"][0].as_py()
    problems = verify_cache(cache, recompute=14)
    assert [p.split(" differs from a live recompute by more than 16 rounding steps")[0] for p in problems] == [
        f"data/{SHARD}/{sample_id}: aux_hidden_states",
        f"data/{SHARD}/{sample_id}: target_probs",
    ], problems


def test_a_bound_relative_to_a_row_maximum_misses_no_zeroed_probability_row_and_no_scaled_aux_token():
    from builder.verify import LossRows, Tolerance, tolerant_differences

    tolerance = Tolerance(16, torch.finfo(torch.float32).eps)
    columns = {"aux_hidden_states": {"per": "token"}, "target_probs": {"per": "loss"}}
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.8, 0.1, 0.1]])
    at_loss = LossRows(probs, torch.full((2,), 1e6), torch.zeros(2), torch.zeros(2))  # logits so large the slack exceeds each p
    aux = torch.tensor([[3e5, -2e5, 1e5], [1.0, -0.5, 0.25]])  # a token with massive activations beside an ordinary one
    live = {"aux_hidden_states": aux, "target_probs": probs}

    def damaged(**stored) -> list[str]:
        return [key for key, _ in tolerant_differences(live | stored, live, tolerance, at_loss, columns)]

    assert damaged() == []
    assert damaged(aux_hidden_states=one_step_up(aux), target_probs=one_step_up(probs)) == []
    assert damaged(target_probs=probs * torch.tensor([[1.0], [0.0]])) == ["target_probs"]
    assert damaged(aux_hidden_states=aux * torch.tensor([[1.0], [0.9]])) == ["aux_hidden_states"]


def test_ids_may_trade_places_only_on_a_near_tie_of_their_logits():
    from builder.verify import LossRows, Tolerance

    tolerance = Tolerance(16, torch.finfo(torch.float32).eps)  # slack: 2 * 16 * eps * 10 = 3.8e-5 for logits up to 10
    logits = torch.tensor([[10.0, 2.0, 2.0 - 1e-5, 0.0, -1.0]])
    probs = torch.softmax(logits, -1)  # the draft vocabulary is the whole vocabulary here
    live_ids = torch.tensor([[0, 1]])
    live_values = probs.log().gather(1, live_ids)

    def topk_beyond(stored_ids):
        stored_values = probs.log().gather(1, stored_ids)  # what the other machine stored for its ids
        at_loss = LossRows(probs, logits.abs().amax(-1), torch.zeros(1), torch.zeros(1))
        return bool(tolerance.topk_not_tied(stored_ids, live_ids, stored_values, at_loss).any())

    assert not topk_beyond(live_ids)
    assert not topk_beyond(torch.tensor([[0, 2]]))  # in at the k-th place on a near-tie
    assert topk_beyond(torch.tensor([[0, 3]]))  # not near the k-th
    at_loss = LossRows(probs, logits.abs().amax(-1), torch.zeros(1), torch.zeros(1))
    assert bool(tolerance.topk_not_tied(torch.tensor([[1, 0]]), live_ids, live_values, at_loss).any())  # ids swapped, values not

    def argmax_beyond(stored, live):
        at_loss = LossRows(probs, logits.abs().amax(-1), logits[:, stored], logits[:, live])
        return bool(tolerance.argmax_not_tied(torch.tensor([stored]), torch.tensor([live]), at_loss).any())

    assert not argmax_beyond(2, 1) and argmax_beyond(3, 1) and not argmax_beyond(1, 1)


def test_recompute_refuses_when_no_shard_was_computed_like_this_machine(cache, capsys):
    from builder.cli import main

    set_shard_compute(cache, {s["name"] for s in read_manifest(cache)["shards"]}, GPU_BF16)
    with pytest.raises(Eagle3CacheError, match=r"every shard was computed with \{\"device\": \"cuda\".*Run the recompute on the kind"):
        verify_cache(cache, recompute=3)
    assert main(["verify", str(cache), "--recompute", "3"]) == 2  # an error, not a report of damage
    assert "error: verify --recompute: every shard was computed with" in capsys.readouterr().err
    assert verify_cache(cache) == []  # the structural checks do not depend on it


def compute_in_bf16(monkeypatch) -> None:
    """Compute as a GPU does (bf16), on this CPU."""
    import builder.forward
    import builder.placement
    import builder.target

    for module in (builder.target, builder.forward, builder.placement):
        monkeypatch.setattr(module, "compute_device", lambda: (torch.device("cpu"), torch.bfloat16))


@pytest.fixture(scope="module")
def bf16_intact(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        compute_in_bf16(monkeypatch)
        return build(small_config(tmp_path_factory.mktemp("verify_bf16") / "cache"), progress=False).output_dir


def test_in_bf16_shards_computed_on_another_machine_of_this_kind_are_skipped_not_compared_loosely(
    bf16_intact, tmp_path, monkeypatch, caplog
):
    from builder.forward import compute_record

    cache = tmp_path / "cache"
    shutil.copytree(bf16_intact, cache)
    rewrite_values(cache, SHARD, "target_probs", torch.zeros_like)  # damage that 16 bf16 steps of the largest logit would pass
    rewrite_values(cache, SHARD, "aux_hidden_states", lambda v: v * 0.9)
    compute_in_bf16(monkeypatch)
    here = compute_record()
    assert {s["compute"]["dtype"] for s in read_manifest(cache)["shards"]} == {"bfloat16"}
    other = here | {"cpu_capability": "ANOTHER"}
    set_shard_compute(cache, {SHARD}, other)
    report = verify_cache(cache, recompute=14)  # every sample
    assert report == [] and report.recomputed == 10  # the other shards, compared exactly
    assert (
        f"skipping 1 shard(s) computed on {json.dumps(other, sort_keys=True)}, and this machine is {json.dumps(here, sort_keys=True)} "
        "(they differ in cpu_capability): it may round differently, and in bfloat16 a tolerance for that is too coarse to tell "
        f"rounding from damage, so no sample can be compared: {SHARD}" in caplog.text
    )

    set_shard_compute(cache, {s["name"] for s in read_manifest(cache)["shards"]}, other | {"torch": "another version"})
    with pytest.raises(
        Eagle3CacheError,
        match=r"every shard was computed on .*\(they differ in cpu_capability, torch\): .*too coarse to tell rounding from damage, so no "
        r"sample can be compared\. Run the recompute on the kind of machine that built the cache, with the same cpu_capability, torch ",
    ):
        verify_cache(cache, recompute=14)


def test_shards_of_another_kind_and_bf16_shards_of_another_machine_are_refused_together():
    from builder.verify import comparable_shards

    here = {"device": "cuda", "dtype": "float16", "gpu": "A", "torch": "2"}
    manifest = {"shards": [{"name": "a", "compute": GPU_BF16}, {"name": "b", "compute": here | {"gpu": "B"}}]}
    with pytest.raises(
        Eagle3CacheError,
        match=r'computed with \{"device": "cuda", "dtype": "bfloat16"\}, .* could match; the others on \{.*"gpu": "B".*\} .*'
        r"\(they differ in gpu\): .*in float16 a tolerance .* Run the recompute .* with the same gpu \(the structural checks passed\)\.$",
    ):
        comparable_shards(manifest, here)
    manifest["shards"].append({"name": "c", "compute": here})
    assert comparable_shards(manifest, here) == {"c": None}
    fp32 = {"device": "cpu", "dtype": "float32", "cpu_capability": "AVX2"}
    assert comparable_shards({"shards": [{"name": "a", "compute": fp32}]}, fp32 | {"cpu_capability": "AVX512"}) == {"a": fp32}


def test_verify_command_exit_status(cache, capsys):
    from builder.cli import main

    assert main(["verify", str(cache)]) == 0
    assert capsys.readouterr().out.strip().endswith(": OK")
    (cache / "data" / SHARD).unlink()
    assert main(["verify", str(cache)]) == 1
    assert f"FAIL data/{SHARD}: missing" in capsys.readouterr().out


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_cache.py"
# Up to 256 tokens: every shard mixes lengths, so batching pads rows and changes float rounding.
CLI = ["--max-samples", "14", "--shard-size", "4", "--seq-length", "256", "--draft-vocab-size", "300", "--dtype", "fp32", "--quiet"]


def test_recompute_rebuilds_each_shards_own_batches_after_a_resume_changed_them(tmp_path):
    out = tmp_path / "cache"
    names = [shard_name(k, 4) for k in range(4)]
    first = {"batch_size": 1, "max_tokens_per_batch": 256, "row_group_bytes": 128 << 20, "sort_window_bytes": 4 << 30}
    flags = ["--batch-size", "1", "--max-tokens-per-batch", "256"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--output-dir", str(out), *CLI, *flags],
        env={**os.environ, FAULT_ENV: "after_shard:2"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in (out / "data").glob("*.parquet")) == names[:2]

    second = {
        "batch_size": 8,
        "max_tokens_per_batch": 8 * 256,
        "row_group_bytes": 4 << 20,
        "sort_window_bytes": 64 << 20,
    }  # a shard per padded batch
    result = build(small_config(out, seq_length=256, **second, resume=True), progress=False)
    assert result.written == names[2:]
    manifest = read_manifest(out)
    assert [s["batching"] for s in manifest["shards"]] == [first, first, second, second]
    assert verify_cache(out, recompute=14) == []  # every sample, in its shard's own batches: bit for bit in fp32

    # Rebuilt with the last run's settings instead, the first run's samples no longer match.
    current = manifest | {"shards": [{k: v for k, v in s.items() if k != "batching"} for s in manifest["shards"]]}
    problems = recompute_samples(out, current, 14, 0, None)
    assert {p.split("/")[1] for p in problems} == set(names[:2]), problems


# ---- where the cache is: refusals, and one config of a repo holding several ---------------------


def test_no_finished_cache_is_an_error_saying_what_to_do_not_a_traceback(cache, tmp_path, capsys):
    from builder.cli import main

    (cache / "README.md").unlink()  # as an interrupted build leaves it: the card is written last
    cases = [
        (cache, r"has no README.md.*an interrupted build has none: resume it with --resume\)"),
        (tmp_path / "nowhere", r"'.*nowhere' is neither a directory nor a Hub dataset repo id"),
        ("tester/nowhere", r"tester/nowhere: no local directory of that name, and the Hub cannot be asked: offline mode is enabled"),
    ]
    for location, message in cases:
        with pytest.raises(Eagle3CacheError, match=message):
            verify_cache(location)
        assert main(["verify", str(location)]) == 2  # a refusal, not "damage found"
        assert capsys.readouterr().err.startswith("error: verify: ")


hub_server, hub = hub_fixtures()


def test_a_pushed_cards_shard_sha256_that_differs_from_the_file_is_caught(hub, intact):
    """A pushed card records each shard's sha256 (its LFS oid), and load_cache refuses a branch whose file has
    another: verify, which reads every byte, tells the same."""
    from builder.reader import ShardFilesMismatch, load_cache

    push_cache(intact, PushTarget("tester/sha"))
    api = HfApi(endpoint=hub.url, token=TOKEN)
    card = DatasetCard.load(api.hf_hub_download("tester/sha", "README.md", repo_type="dataset"))
    recorded = card.data["eagle3_cache"]["shards"][1]["sha256"]
    card.data["eagle3_cache"]["shards"][1]["sha256"] = "0" * 64
    api.upload_file(path_or_fileobj=str(card).encode(), path_in_repo="README.md", repo_id="tester/sha", repo_type="dataset")
    with pytest.raises(ShardFilesMismatch, match="another sha256 than recorded"):
        load_cache("tester/sha")
    assert verify_cache("tester/sha") == [
        f"README.md: shard {SHARD}'s record says sha256 {'0' * 64}, the file's is {recorded}: load_cache refuses a repo whose "
        "shard has another sha256 than its card records. "
        "Restore the card: push the cache to tester/sha again from an intact local copy (check it first with eagle3-cache "
        "verify DIR): eagle3-cache push DIR tester/sha uploads again each shard whose bytes differ on the branch, and the card; "
        "a tag names a fixed version, so give the repaired one a new --hub-tag"
    ]


def test_a_hub_branch_without_a_card_gets_the_hubs_advice_not_a_builds(hub, intact):
    """A push lands its card last: main holds no card where the push went to another branch, or stopped
    partway. The advice is the push's (re-run it, or read the branch), as the reader gives it, not a build's."""
    push_cache(intact, PushTarget("tester/branch-only", branch="next"))
    with pytest.raises(Eagle3CacheError, match=r"has no README.md .*a push that stopped partway has none: re-run the push") as refused:
        verify_cache("tester/branch-only")
    assert "--revision" in str(refused.value) and "--resume" not in str(refused.value)
    assert verify_cache("tester/branch-only", revision="next") == []


def test_verify_one_config_of_a_repo_holding_several(hub, intact, capsys):
    from builder.cli import main

    for config in ("llama", "short"):
        push_cache(intact, PushTarget("tester/multi", config=config))
    hub.reset_counters()
    assert main(["verify", "tester/multi", "--name", "llama"]) == 0
    assert capsys.readouterr().out.strip().endswith("tester/multi: OK")
    downloaded = {path for _, path, _ in hub.requests("GET")}
    assert any("/llama/data/" in p for p in downloaded), downloaded
    assert not any("/short/" in p for p in downloaded), downloaded  # only its own folder (and the root card)
    hub.reset_counters()
    assert main(["verify", "tester/multi", "--name", "short"]) == 0  # its shards are the same bytes: already here
    assert any(p.endswith("/short/README.md") for _, p, _ in hub.requests("GET")), hub.requests()
    with pytest.raises(Eagle3CacheError, match=r"holds several caches \['llama', 'short'\]: pass one of them with --name"):
        verify_cache("tester/multi")
    with pytest.raises(Eagle3CacheError, match=r"holds several caches \['llama', 'short'\], not 'mistral'"):
        verify_cache("tester/multi", name="mistral")
    with pytest.raises(Eagle3CacheError, match=r"tester/absent: no local directory of that name, and no dataset repo on http"):
        verify_cache("tester/absent")
    with pytest.raises(Eagle3CacheError, match=r"tester/multi has no revision 'v9': pass an existing branch, tag or commit"):
        verify_cache("tester/multi", revision="v9")


def test_a_repo_holding_several_caches_is_refused_before_any_shard_is_downloaded(hub, intact, capsys):
    from builder.cli import main

    for config in ("llama", "short"):
        push_cache(intact, PushTarget("tester/several", config=config))
    hub.reset_counters()
    with pytest.raises(Eagle3CacheError, match=r"tester/several holds several caches \['llama', 'short'\]: pass one of them with --name"):
        verify_cache("tester/several")
    assert main(["verify", "tester/several"]) == 2
    assert "pass one of them with --name" in capsys.readouterr().err
    assert [path for _, path, _ in hub.requests("GET", "/resolve/")] == [
        path for _, path, _ in hub.requests("GET", "/resolve/.*/README.md$")
    ]  # the root card alone
    assert hub.requests("GET", "/resolve/")


def test_damage_found_in_a_hub_repo_says_to_push_again_from_an_intact_local_copy(hub, intact):
    """The build's --resume cannot reach the repo: a push from an intact copy uploads the damaged shard again."""
    from huggingface_hub import HfApi

    push_cache(intact, PushTarget("tester/damaged", config="llama"))
    damaged = bytearray((intact / "data" / SHARD).read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.upload_file(path_or_fileobj=bytes(damaged), path_in_repo=f"llama/data/{SHARD}", repo_id="tester/damaged", repo_type="dataset")
    assert verify_cache("tester/damaged", name="llama", revision="main") == [
        f"data/{SHARD}: checksum differs from the manifest (the file is damaged); to repair: push the cache to tester/damaged at "
        "revision main again from an intact local copy (check it first with eagle3-cache verify DIR): eagle3-cache push DIR "
        "tester/damaged --hub-config llama --hub-branch main uploads again each shard whose bytes differ on the branch, and "
        "the card; a tag names a fixed version, so give the repaired one a new --hub-tag"
    ]
    push_cache(intact, PushTarget("tester/damaged", config="llama"))  # as the message says
    assert verify_cache("tester/damaged", name="llama") == []

    card = (intact / "README.md").read_text()
    api.upload_file(
        path_or_fileobj=card[: len(card) // 2].encode(), path_in_repo="llama/README.md", repo_id="tester/damaged", repo_type="dataset"
    )
    with pytest.raises(
        Eagle3CacheError,
        match=r"is never closed .*, as in a card cut short or edited by hand\. Restore it: push the cache to tester/damaged again",
    ):
        verify_cache("tester/damaged", name="llama")


def test_card_damage_found_on_a_branch_or_under_a_tag_names_them_in_the_push_it_advises(hub, intact):
    """The advice for card damage the problem list reports (not a refusal) too; followed literally, it repairs the
    branch verified, and a tag (a fixed version) is answered by a new one."""
    from huggingface_hub import HfApi

    from builder.cli import main

    repo, api = "tester/on-dev", HfApi(endpoint=hub.url, token=TOKEN)
    push_cache(intact, PushTarget(repo, branch="dev", tag="v1"))
    card = Path(api.hf_hub_download(repo, "README.md", repo_type="dataset", revision="dev")).read_text()
    renamed = card.replace("  - split: train\n", "  - split: training\n", 1).encode()
    api.upload_file(path_or_fileobj=renamed, path_in_repo="README.md", repo_id=repo, repo_type="dataset", revision="dev")
    [problem] = verify_cache(repo, revision="dev")
    assert re.match(
        says(
            "README.md: the card's configs",
            "name no train split with a path",
            f"Restore the card: push the cache to {repo} at revision dev again from an intact local copy",
            f"eagle3-cache push DIR {repo} --hub-branch dev uploads again",
        ),
        problem,
    )
    assert "[--hub-branch" not in problem
    api.create_tag(repo, tag="v2", revision="dev", repo_type="dataset")  # the damage, tagged
    assert main(advised_push(problem, intact)) == 0
    assert verify_cache(repo, revision="dev") == []

    [problem] = verify_cache(repo, revision="v2")
    assert re.match(
        says(
            f"eagle3-cache push DIR {repo} [--hub-branch BRANCH] --hub-tag NEW_TAG uploads again",
            "v2 is a tag, which names a fixed version: give the repaired one a new tag",
        ),
        problem,
    )
    assert main(advised_push(problem, intact)) == 0
    assert verify_cache(repo, revision="NEW_TAG") == []


def advised_push(message: str, cache: Path) -> list[str]:
    """The push command a verify message advises, as the CLI's arguments: its DIR the intact local copy, its
    optional flags (in brackets) left out."""
    command = re.search(r"eagle3-cache (push DIR .*?) uploads again", message).group(1)
    return [str(cache) if word == "DIR" else word for word in re.sub(r" \[[^]]*\]", "", command).split()]


def cut_short(text: str) -> str:
    return text[: len(text) // 2]


def cut_above_its_key(text: str) -> str:
    """A card cut short above the key of a cache's card or an index card: what is left shows neither."""
    return text[: text.index("eagle3_cache_index:" if "eagle3_cache_index:" in text else "eagle3_cache:")]


def yaml_broken(text: str) -> str:  # the Hub refuses this in a root card; a config's it takes
    return text.replace("eagle3_cache:\n", "eagle3_cache: [\n", 1)


@pytest.mark.parametrize(
    "config, path, damage",
    [
        (None, "README.md", cut_short),
        ("llama", "llama/README.md", yaml_broken),
        ("llama", "llama/README.md", cut_short),
        ("llama", "README.md", index_cut_short),
        ("llama", "llama/README.md", cut_above_its_key),  # what is left reads as no front matter, in a folder the index lists
    ],
)
def test_a_card_damaged_in_a_hub_repo_is_restored_by_the_push_verify_advises(hub, intact, config, path, damage):
    from huggingface_hub import HfApi

    from builder.cli import main

    repo = f"tester/restore-{config}-{damage.__name__}".replace("_", "-")
    push_cache(intact, PushTarget(repo, config=config))
    api = HfApi(endpoint=hub.url, token=TOKEN)
    text = Path(api.hf_hub_download(repo, path, repo_type="dataset")).read_text()
    api.upload_file(path_or_fileobj=damage(text).encode(), path_in_repo=path, repo_id=repo, repo_type="dataset")
    with pytest.raises(Eagle3CacheError, match=rf"{re.escape(path)} is damaged: .*Restore it: push the cache to {repo} again") as refused:
        verify_cache(repo, name=config)
    assert main(advised_push(str(refused.value), intact)) == 0
    assert verify_cache(repo, name=config) == []


def negative_rows(text: str) -> str:
    card = DatasetCard(text)
    card.data["eagle3_cache"]["shards"][1]["rows"] = -4
    return str(card)


@pytest.mark.parametrize("config, path", [(None, "README.md"), ("llama", "llama/README.md")])
def test_a_damaged_hub_card_is_named_by_the_repo_at_the_commit_verified_not_by_its_copy_in_the_local_hub_cache(hub, intact, config, path):
    """The user named the repo; the local Hub cache's copy of the card is no file they know of (and a push, not an
    edit of that copy, repairs it): named as the reader and other Hub messages name a repo's file."""
    repo = f"tester/named-{config}"
    push_cache(intact, PushTarget(repo, config=config))
    api = HfApi(endpoint=hub.url, token=TOKEN)
    text = Path(api.hf_hub_download(repo, path, repo_type="dataset")).read_text()
    for damage in (cut_short, negative_rows):  # its front matter, and its manifest
        api.upload_file(path_or_fileobj=damage(text).encode(), path_in_repo=path, repo_id=repo, repo_type="dataset")
        commit = api.list_repo_commits(repo, repo_type="dataset")[0].commit_id
        with pytest.raises(Eagle3CacheError) as refused:
            verify_cache(repo, name=config)
        assert str(refused.value).startswith(f"verify: {repo}@{commit[:12]}: {path} is damaged: "), str(refused.value)
        assert "snapshots" not in str(refused.value)

    push_cache(intact, PushTarget(repo, config=config))
    commit = api.list_repo_commits(repo, repo_type="dataset")[0].commit_id
    if config is None:  # a config the repo does not hold: its card is missing
        with pytest.raises(Eagle3CacheError) as refused:
            verify_cache(repo, name="short")
        assert str(refused.value) == (
            f"verify: {repo}@{commit[:12]}: short has no README.md (the card, with the manifest); the cache is at the root of "
            f"{repo}@{commit[:12]}, which holds no configs: leave out --name short"
        )


def test_a_damaged_index_verified_without_a_name_is_restored_by_a_push_of_one_of_its_configs(hub, intact):
    """A push without a config is refused by a repo holding several caches; a push of any one of them writes the
    index again from the configs' folders, so verify's advice names one."""
    from builder.cli import main

    repo = "tester/restore-index-unnamed"
    for config in ("llama", "short"):
        push_cache(intact, PushTarget(repo, config=config))
    api = HfApi(endpoint=hub.url, token=TOKEN)
    text = Path(api.hf_hub_download(repo, "README.md", repo_type="dataset")).read_text()
    api.upload_file(path_or_fileobj=index_cut_short(text).encode(), path_in_repo="README.md", repo_id=repo, repo_type="dataset")
    with pytest.raises(Eagle3CacheError, match=r"README\.md is damaged: .*Restore it: push one of the repo's caches") as refused:
        verify_cache(repo)
    command = re.search(r"eagle3-cache (push DIR .*?) writes the index card again", str(refused.value)).group(1)
    assert main([{"DIR": str(intact), "CONFIG": "short"}.get(word, word) for word in command.split()]) == 0
    with pytest.raises(Eagle3CacheError, match=r"holds several caches \['llama', 'short'\]: pass one of them with --name"):
        verify_cache(repo)
    assert verify_cache(repo, name="llama") == [] and verify_cache(repo, name="short") == []


@pytest.mark.parametrize("damage", [index_cut_short, configs_removed, first_config_renamed])
def test_a_root_index_card_that_no_longer_offers_a_config_is_refused_by_load_cache_with_verifys_advice(hub, intact, monkeypatch, damage):
    """`datasets` opens a config by the root card's `configs`: an index card damaged so that they leave out a config
    its index lists is refused by load_cache as verify refuses it, with the same advice, not with `datasets`' own
    "BuilderConfig not found". The root card is read for this only once `datasets` has refused the config: a load
    that opens downloads nothing more."""
    from builder import source as source_module
    from builder.cli import main
    from builder.manifest import ManifestError
    from builder.reader import load_cache

    repo = f"tester/unoffered-{damage.__name__}".replace("_", "-")
    for config in ("llama", "short"):
        push_cache(intact, PushTarget(repo, config=config))
    fetched, download = [], source_module.download_file
    monkeypatch.setattr(source_module, "download_file", lambda repo_id, path, *rest: fetched.append(path) or download(repo_id, path, *rest))
    assert sum(1 for _ in load_cache(repo, name="llama", layout="raw")) == 14
    assert "README.md" not in fetched and "llama/README.md" in fetched
    api = HfApi(endpoint=hub.url, token=TOKEN)
    text = Path(api.hf_hub_download(repo, "README.md", repo_type="dataset")).read_text()
    api.upload_file(path_or_fileobj=damage(text).encode(), path_in_repo="README.md", repo_id=repo, repo_type="dataset")
    with pytest.raises(Eagle3CacheError, match=r"README\.md is damaged: ") as verified:
        verify_cache(repo, name="llama")
    advice = str(verified.value)
    with pytest.raises(
        ManifestError,
        match=says(f"{repo}@", ": README.md is damaged: ", f"Restore it: push the cache to {repo} again", "--hub-config llama"),
    ) as loaded:
        load_cache(repo, name="llama", layout="raw")
    assert str(loaded.value).split(" is damaged: ")[1] == advice.split(" is damaged: ")[1]
    assert main(advised_push(advice, intact)) == 0
    assert verify_cache(repo, name="llama") == []
    assert sum(1 for _ in load_cache(repo, name="llama", layout="raw")) == 14


def test_a_config_the_index_lists_whose_card_was_removed_from_the_hub_is_restored_by_the_push_verify_advises(hub, intact):
    """A push commits a config's card with its entry in the index, so a listed config without its card lost it
    since: verify and load_cache say which config, which card, and to push it again, not that a push stopped
    partway (nor that the repo holds one cache at its root)."""
    from builder.cli import main
    from builder.manifest import CardNotFound
    from builder.reader import load_cache

    repo = "tester/card-removed"
    for config in ("llama", "short"):
        push_cache(intact, PushTarget(repo, config=config))
    HfApi(endpoint=hub.url, token=TOKEN).delete_file("llama/README.md", repo, repo_type="dataset")
    listed = "lists the config 'llama', whose card is missing: a push commits a config's card together with its entry in the index"
    with pytest.raises(Eagle3CacheError, match=says("llama has no README.md", listed, f"push DIR {repo} --hub-config llama")) as verified:
        verify_cache(repo, name="llama")
    advice = str(verified.value)
    with pytest.raises(CardNotFound, match=says("(config llama): no llama/README.md; the index card README.md ", listed)) as loaded:
        load_cache(repo, name="llama", layout="raw")
    assert "stopped partway" not in str(loaded.value) and "at its root" not in advice
    assert str(loaded.value).split("whose card is missing: ")[1] == advice.split("whose card is missing: ")[1]
    assert main(advised_push(advice, intact)) == 0
    assert sum(1 for _ in load_cache(repo, name="llama", layout="raw")) == 14


def prose_above_its_key(text: str) -> str:
    """A line of prose put at the top of a card's front matter: its YAML no longer parses (`: ` twice), and what it
    shows below the prose could be a README's own text."""
    return text.replace("---\n", "---\nRead this first: our notes: below\n", 1)


def advised_hf_commands(message: str, replace: dict[str, str]) -> list[list[str]]:
    """The `hf` commands a message advises, as the CLI's arguments, with its placeholders replaced."""
    commands = [command.strip() for command in re.findall(r"\bhf (?:download|upload) [^,;(]*", message)]
    return [[replace.get(word, word) for word in command.split()[1:]] for command in commands]


LOCAL_CARD, EARLIER_INDEX = "the card of the intact local copy", "the index card of the branch's last commit before the damage"
HF = [sys.executable, "-c", "import sys; from huggingface_hub.cli.hf import main; sys.exit(main())"]


@pytest.mark.parametrize(
    "config, path, damage, put_back, refused_alone",
    [
        ("llama", "README.md", cut_above_its_key, EARLIER_INDEX, "is not an eagle3-cache card"),
        ("llama", "llama/README.md", prose_above_its_key, LOCAL_CARD, "is not eagle3-cache's"),
    ],
)
def test_a_card_a_push_cannot_tell_from_another_datasets_is_restored_in_the_two_steps_verify_advises(
    hub, intact, tmp_path, capsys, config, path, damage, put_back, refused_alone
):
    """A card damaged so that it shows no key of eagle3-cache's with only YAML above it cannot be told from another
    dataset's, and a push refuses to replace it, as it must (test_hub: a README quoting a key of ours): verify and
    load_cache say so, and how to put a card back first: a cache's from its intact local copy, an index (only the Hub
    holds one) from the commit before the damage."""
    from huggingface_hub import HfApi

    from builder.cli import main
    from builder.reader import load_cache

    repo = f"tester/unrecognised-{config}-{damage.__name__}".replace("_", "-")
    push_cache(intact, PushTarget(repo, config=config))
    api = HfApi(endpoint=hub.url, token=TOKEN)
    text = Path(api.hf_hub_download(repo, path, repo_type="dataset")).read_text()
    api.upload_file(path_or_fileobj=damage(text).encode(), path_in_repo=path, repo_id=repo, repo_type="dataset")
    before_the_damage = api.list_repo_commits(repo, repo_type="dataset")[1].commit_id
    with pytest.raises(
        Eagle3CacheError,
        match=says(
            f"{path} is damaged: its YAML front matter, which holds the manifest, ",
            "a push cannot tell it from another dataset's card, and refuses to replace it. Restore it in two steps: ",
            f"upload {put_back} in its place",
            f"hf upload {repo} ",
            f" {path} --repo-type dataset",
            f"; then push the cache to {repo} again",
        ),
    ) as refused:
        verify_cache(repo, name=config)
    advice = str(refused.value)
    if path != "README.md" or config is None:  # load_cache reads the config's card, not the index
        with pytest.raises(Eagle3CacheError) as loaded:
            load_cache(repo, name=config)
        assert str(loaded.value).split(" is damaged: ")[1] == advice.split(" is damaged: ")[1]
    assert main(advised_push(advice, intact)) == 2  # the push alone
    assert refused_alone in capsys.readouterr().err
    commands = advised_hf_commands(advice, {"DIR/README.md": str(intact / "README.md"), "COMMIT": before_the_damage})
    assert [command[0] for command in commands] == (["download", "upload"] if put_back == EARLIER_INDEX else ["upload"])
    for command in commands:
        subprocess.run(HF + command, cwd=tmp_path, check=True, capture_output=True)
    assert main(advised_push(advice, intact)) == 0
    assert verify_cache(repo, name=config) == []


@pytest.mark.parametrize("configs", [[None], ["llama", "short"]], ids=["one cache", "several caches"])
def test_a_root_card_cut_above_its_key_verified_without_a_name_is_restored_from_the_commit_before_the_damage(
    hub, intact, tmp_path, configs
):
    """What is left of a root card cut short above its key tells neither that it is eagle3-cache's nor whether it was
    a cache's card or the index of configs in sub-folders. A push of a cache to the root would replace an index with
    a cache beside the configs, so verify and load_cache without a name advise what is right for both: the root card
    the branch held before the damage, put back with `hf`; then verify again."""
    from huggingface_hub import HfApi

    from builder.reader import load_cache

    repo = f"tester/root-cut-{len(configs)}"
    for config in configs:
        push_cache(intact, PushTarget(repo, config=config))
    api = HfApi(endpoint=hub.url, token=TOKEN)
    text = Path(api.hf_hub_download(repo, "README.md", repo_type="dataset")).read_text()
    api.upload_file(path_or_fileobj=cut_above_its_key(text).encode(), path_in_repo="README.md", repo_id=repo, repo_type="dataset")
    before_the_damage = api.list_repo_commits(repo, repo_type="dataset")[1].commit_id
    with pytest.raises(
        Eagle3CacheError,
        match=says(
            "README.md is damaged: its YAML front matter, which holds the manifest, ",
            "a push cannot tell it from another dataset's card, and refuses to replace it",
            "whether it was a cache's card or the index card of a repo holding several caches",
            "upload the root card of the branch's last commit before the damage in its place",
            f"hf download {repo} README.md --repo-type dataset --revision COMMIT",
            f"hf upload {repo} restored/README.md README.md --repo-type dataset",
            f"HfApi().list_repo_commits('{repo}', repo_type='dataset')",
            f"then verify the repo again: eagle3-cache verify {repo} (with --name CONFIG",
        ),
    ) as refused:
        verify_cache(repo)
    advice = str(refused.value)
    assert "eagle3-cache push" not in advice  # a push to the root is the wrong kind for an index
    with pytest.raises(Eagle3CacheError) as loaded:
        load_cache(repo)
    assert str(loaded.value).split(" is damaged: ")[1] == advice.split(" is damaged: ")[1]
    commands = advised_hf_commands(advice, {"COMMIT": before_the_damage})
    assert [command[0] for command in commands] == ["download", "upload"]
    for command in commands:
        subprocess.run(HF + command, cwd=tmp_path, check=True, capture_output=True)
    for config in configs:
        assert verify_cache(repo, name=config) == []
        assert sum(1 for _ in load_cache(repo, name=config, streaming=True)) == 14
    if configs != [None]:
        assert not any(path.startswith("data/") for path in api.list_repo_files(repo, repo_type="dataset"))  # no root cache
        with pytest.raises(Eagle3CacheError, match=re.escape(f"{repo} holds several caches {configs}: pass one of them with --name")):
            verify_cache(repo)


# ---- the manifest outside the fingerprint ------------------------------------------------------


def edit_card(cache, edit) -> None:
    card = DatasetCard.load(cache / "README.md")
    edit(card.data)
    card.save(cache / "README.md")


def test_a_shard_removed_with_its_entry_or_listed_twice_is_caught(cache):
    def drop_shard(data):
        data["eagle3_cache"]["shards"] = [s for s in data["eagle3_cache"]["shards"] if s["name"] != SHARD]

    (cache / "data" / SHARD).unlink()
    edit_card(cache, drop_shard)
    problems = verify_cache(cache)
    assert any(p.startswith(f"README.md: the manifest lists no data/{SHARD}, though its shards are numbered of 4") for p in problems)
    assert any(p.startswith("README.md: totals.samples is 14, the shards sum to 10") for p in problems), problems

    def list_twice(data):
        shards = data["eagle3_cache"]["shards"]
        shards.append(shards[0])

    edit_card(cache, list_twice)
    name = shard_name(0, 4)
    assert f"README.md: the manifest lists data/{name} 2 times (readers would yield its rows as often)" in "\n".join(verify_cache(cache))


def test_edited_totals_and_dataset_info_are_caught(cache):
    totals = read_manifest(cache)["totals"]

    def edit_totals(data):
        data["eagle3_cache"]["totals"] |= {"samples": 15, "tokens": 1, "loss_tokens": 3, "bytes": 2, "argmax_coverage": 0.5}
        data["dataset_info"]["splits"][0] |= {"num_examples": 15, "num_bytes": 2}

    edit_card(cache, edit_totals)
    assert verify_cache(cache) == [
        "README.md: totals.samples is 15, the shards sum to 14: restore the card, or rebuild",
        f"README.md: totals.tokens is 1, the shards sum to {totals['tokens']}: restore the card, or rebuild",
        f"README.md: totals.loss_tokens is 3, the shards sum to {totals['loss_tokens']}: restore the card, or rebuild",
        f"README.md: totals.bytes is 2, the shards sum to {totals['bytes']}: restore the card, or rebuild",
        f"README.md: totals.argmax_coverage is 0.5, the shards' argmax_in_vocab over their loss_tokens give "
        f"{totals['argmax_coverage']}: restore the card, or rebuild",
        "README.md: dataset_info says 15 examples in split 'train', the shards hold 14: restore the card, or rebuild",
        f"README.md: dataset_info says 2 bytes in split 'train', the shards hold {totals['bytes']}: restore the card, or rebuild",
    ]


def test_edited_bytes_per_token_and_token_coverage_are_caught(cache):
    """The card shows both; bytes_per_token is the shards' bytes over their tokens, token_coverage the share of the
    loss-masked tokens the vocab file counts whose id it selects (the draft vocabulary)."""
    totals = read_manifest(cache)["totals"]
    edit_card(cache, lambda data: data["eagle3_cache"]["totals"].update(bytes_per_token=totals["bytes_per_token"] / 2, token_coverage=1.0))
    assert verify_cache(cache) == [
        f"README.md: totals.token_coverage is 1.0, the share of the loss-masked tokens vocab/vocab.safetensors counts whose id "
        f"is in its draft vocabulary is {totals['token_coverage']}: restore the card, or rebuild",
        f"README.md: totals.bytes_per_token is {totals['bytes_per_token'] / 2}, the shards' bytes over their tokens give "
        f"{totals['bytes_per_token']}: restore the card, or rebuild",
    ]


def test_a_shard_records_counts_edited_with_the_totals_are_caught(cache):
    """The totals are checked as the sums of the shard records, so a record edited together with the totals
    passes that check: the records' token, loss-token and argmax-in-vocabulary counts are compared with the rows
    they describe."""
    manifest = read_manifest(cache)
    first = manifest["shards"][0]
    assert first["argmax_in_vocab"] > 0

    def edit_record_and_totals(data):
        record = data["eagle3_cache"]["shards"][0]
        record |= {"tokens": record["tokens"] + 2, "loss_tokens": record["loss_tokens"] + 1}
        record["argmax_in_vocab"] -= 1
        data["eagle3_cache"]["totals"]["tokens"] += 2
        data["eagle3_cache"]["totals"]["loss_tokens"] += 1
        data["eagle3_cache"]["totals"]["argmax_coverage"] = argmax_coverage(data["eagle3_cache"]["shards"])
        data["eagle3_cache"]["totals"]["bytes_per_token"] = bytes_per_token(data["eagle3_cache"]["shards"])

    edit_card(cache, edit_record_and_totals)
    assert verify_cache(cache) == [
        f"README.md: shard {first['name']}'s record says {first['tokens'] + 2} tokens, its rows hold {first['tokens']}. {RESTORE_CARD}",
        f"README.md: shard {first['name']}'s record says {first['loss_tokens'] + 1} loss_tokens, its rows hold "
        f"{first['loss_tokens']}. {RESTORE_CARD}",
        f"README.md: shard {first['name']}'s record says {first['argmax_in_vocab'] - 1} argmax_in_vocab, its rows hold "
        f"{first['argmax_in_vocab']}. {RESTORE_CARD}",
    ]


def test_a_shard_records_rows_edited_are_caught_saying_to_restore_the_card(cache):
    """The file is as its checksum says, so the record was edited: the card is what to restore, and the intact shard
    is not called one that samples were dropped from or added to, which advised deleting it."""
    edit_card(cache, lambda data: data["eagle3_cache"]["shards"][1].update(rows=5))
    assert verify_cache(cache) == [
        "README.md: totals.samples is 14, the shards sum to 15: restore the card, or rebuild",
        "README.md: dataset_info says 14 examples in split 'train', the shards hold 15: restore the card, or rebuild",
        f"data/{SHARD}: 4 rows, the manifest says 5 (the file is as its checksum says: the record was edited). {RESTORE_CARD}",
    ]


def test_a_shard_records_bytes_edited_are_caught_saying_to_restore_the_card_not_to_delete_the_shard(cache):
    """The file's checksum is the record's, so the file is intact and its size in the record was edited."""
    size = (cache / "data" / SHARD).stat().st_size
    edit_card(cache, lambda data: data["eagle3_cache"]["shards"][1].update(bytes=size + 1))
    problems = verify_cache(cache)
    edited = "the file is as its checksum says: the record was edited"
    assert f"data/{SHARD}: {size} bytes, the manifest says {size + 1} ({edited}). {RESTORE_CARD}" in problems
    assert not any("delete data/" in p for p in problems), problems


def test_dataset_info_bytes_edited_alone_are_caught(cache):
    """`num_bytes` is the split size the Hub shows: the shards' bytes, as the card writes it."""
    shard_bytes = read_manifest(cache)["totals"]["bytes"]
    assert verify_cache(cache) == []
    edit_card(cache, lambda data: data["dataset_info"]["splits"][0].update(num_bytes=shard_bytes + 1))
    assert verify_cache(cache) == [
        f"README.md: dataset_info says {shard_bytes + 1} bytes in split 'train', the shards hold {shard_bytes}: "
        "restore the card, or rebuild"
    ]


def test_dataset_info_features_that_differ_from_the_shards_columns_are_caught(cache):
    """`datasets` (and load_cache through it) reads the shards with the features the card declares: a column's type
    edited there stops every read, and a column left out or added reads other columns than the shards hold."""
    from builder.local_shards import DamagedShard
    from builder.reader import load_cache

    def retype(data):
        data["dataset_info"]["features"] = [
            f | {"dtype": "string"} if f["name"] == "target_probs" else f for f in data["dataset_info"]["features"]
        ]

    edit_card(cache, retype)
    with pytest.raises(DamagedShard, match=r"Invalid UTF8 payload.*eagle3-cache verify"):  # verify then names the card
        list(load_cache(cache, streaming=True))
    assert verify_cache(cache) == [
        "README.md: dataset_info.features gives column target_probs the type 'string', where the shards' column is 'binary': "
        f"`datasets` and load_cache read the shards by these features and would fail or misread them. {RESTORE_CARD}"
    ]
    edit_card(
        cache, lambda data: data["dataset_info"].update(features=data["dataset_info"]["features"][:-1] + [{"name": "x", "dtype": "int64"}])
    )
    assert verify_cache(cache) == [
        "README.md: dataset_info.features gives no column target_probs, where the shards' column is 'binary': `datasets` and "
        f"load_cache read the shards by these features and would fail or misread them. {RESTORE_CARD}",
        "README.md: dataset_info.features gives column x the type 'int64', where the shards hold no such column: `datasets` "
        f"and load_cache read the shards by these features and would fail or misread them. {RESTORE_CARD}",
    ]


# ---- what the recompute can compare -----------------------------------------------------------


def target_failing_in_shards(tmp_path, intact, shards: list[int]) -> Path:
    """The embedded target with NaN embeddings for one token found in a single sample of each of
    these shards (and nowhere else): those samples fail, the others are stored as before."""
    from safetensors.torch import load_file, save_file

    from builder.embedded import resolve_target

    names = [s["name"] for s in read_manifest(intact)["shards"]]
    ids = {n: [r.as_py() for r in pq.read_table(intact / "data" / n, columns=["input_ids"])["input_ids"]] for n in names}
    tokens = {n: [set(torch.frombuffer(bytearray(b), dtype=torch.int32).tolist()) for b in rows] for n, rows in ids.items()}
    everywhere = [t for rows in tokens.values() for row in rows for t in row]
    poisoned = [min(t for row in tokens[names[k]] for t in row if everywhere.count(t) == 1) for k in shards]
    target = tmp_path / "target"
    shutil.copytree(resolve_target("tiny-llama"), target)
    weights = load_file(target / "model.safetensors")
    weights["model.embed_tokens.weight"][poisoned] = float("nan")
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def test_recompute_says_how_many_samples_it_compared_and_refuses_when_none_can_be(intact, tmp_path, capsys):
    from builder.cli import main

    some = build(small_config(tmp_path / "some", target_failing_in_shards(tmp_path / "a", intact, [0, 1, 2])), progress=False)
    failed = read_manifest(some.output_dir)["failed"]
    assert sorted(f["shard"] for f in failed) == [shard_name(k, 4) for k in range(3)]
    assert main(["verify", str(some.output_dir), "--recompute", "5"]) == 0  # the last shard holds 2 samples
    assert "OK (only 2 of the 5 samples asked for could be recomputed, see the warnings; they match)" in capsys.readouterr().out

    every = build(small_config(tmp_path / "every", target_failing_in_shards(tmp_path / "b", intact, [0, 1, 2, 3])), progress=False)
    assert sorted(f["shard"] for f in read_manifest(every.output_dir)["failed"]) == [shard_name(k, 4) for k in range(4)]
    with pytest.raises(Eagle3CacheError, match=r"no sample can be recomputed: every shard that could match holds failed samples"):
        verify_cache(every.output_dir, recompute=3)
    assert main(["verify", str(every.output_dir), "--recompute", "3"]) == 2
    assert verify_cache(every.output_dir) == []


def test_recompute_refuses_another_target_naming_the_fields_that_differ(intact, tmp_path):
    from safetensors.torch import load_file, save_file

    from builder.embedded import resolve_target

    same = tmp_path / "same"  # the build's target, moved: only the path differs
    shutil.copytree(resolve_target("tiny-llama"), same)
    assert verify_cache(intact, recompute=2, target_model=str(same)) == []
    retrained = tmp_path / "retrained"
    shutil.copytree(same, retrained)
    weights = load_file(retrained / "model.safetensors")
    save_file({k: v * 1.01 for k, v in weights.items()}, str(retrained / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Eagle3CacheError, match=r"retrained is not the target the cache was built with:\n  target.weights_sample_sha256: "):
        verify_cache(intact, recompute=2, target_model=str(retrained))
    config = json.loads((retrained / "config.json").read_text())
    (retrained / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 1e-5}))
    with pytest.raises(Eagle3CacheError, match=r"target.config_sha256: the cache has \w+, .*retrained has \w+\n  target.weights"):
        verify_cache(intact, recompute=2, target_model=str(retrained))
    retokenized = tmp_path / "retokenized"  # same weights, another special token: other ids and masks
    shutil.copytree(same, retokenized)
    tokenizer_config = json.loads((retokenized / "tokenizer_config.json").read_text())
    (retokenized / "tokenizer_config.json").write_text(json.dumps(tokenizer_config | {"pad_token": "<|unk|>"}))
    with pytest.raises(Eagle3CacheError, match=r"retokenized is not the target the cache was built with:\n  tokenizer_sha256: the cache"):
        verify_cache(intact, recompute=2, target_model=str(retokenized))


def test_recompute_runs_the_targets_own_code_where_the_build_did_and_refuses_it_edited(tmp_path, capsys):
    """A build that ran the code the target's auto_map names is recomputed with that code (transformers'
    built-in class would match no sample), which --trust-remote-code must allow; code edited since the
    build is another target."""
    from tiny_targets import target_with_own_code, write_own_code

    from builder.cli import main

    target = target_with_own_code(tmp_path / "verify_scaled_target", scale=2.0)
    cache = build(small_config(tmp_path / "cache", target, max_samples=4, trust_remote_code=True), progress=False).output_dir
    with pytest.raises(Eagle3CacheError, match=says("built running the target's own code", "Pass --trust-remote-code")):
        verify_cache(cache, recompute=2)
    assert main(["verify", str(cache), "--recompute", "2", "--trust-remote-code"]) == 0
    assert "OK (the recomputed samples match)" in capsys.readouterr().out
    write_own_code(target, scale=3.0)
    with pytest.raises(
        Eagle3CacheError,
        match=r"verify_scaled_target is not the target the cache was built with:\n  target\.code_sha256: the cache has [0-9a-f]{64}, ",
    ):
        verify_cache(cache, recompute=2, trust_remote_code=True)


# ---- which target counts as the build's ---------------------------------------------------------


def tiny_target_copy(directory: Path) -> Path:
    from builder.embedded import resolve_target

    shutil.copytree(resolve_target("tiny-llama"), directory)
    return directory


def test_recompute_after_a_build_with_another_chat_template_from_a_tokenizer_without_one(tmp_path):
    """The tokenizer has no template of its own, the build was given one: the special tokens are compared."""
    from builder.embedded import NO_GENERATION_TEMPLATE

    target = tiny_target_copy(tmp_path / "target")
    (target / "chat_template.jinja").unlink()
    cfg = small_config(tmp_path / "cache", target=target, max_samples=4, chat_template=str(NO_GENERATION_TEMPLATE))
    cache = build(cfg, progress=False).output_dir
    assert verify_cache(cache, target_model=str(target), recompute=2) == []


def test_the_same_target_named_by_a_hub_id_has_no_local_fingerprints_to_compare(intact):
    """A Hub id pins its commit; the local fingerprints of the folder the cache was built from are not compared."""
    from builder.embedded import resolve_target
    from builder.prepare import target_differences
    from builder.target import load_config, load_tokenizer

    config = load_config(resolve_target("tiny-llama"), None, False)
    tokenizer = load_tokenizer(resolve_target("tiny-llama"), None, False, config=config)
    manifest = read_manifest(intact)
    assert manifest["identity"]["target"]["weights_sample_sha256"] is not None
    assert target_differences(manifest, "tester/tiny-llama", config, tokenizer) == {}
    other = config.to_dict() | {"vocab_size": config.vocab_size + 1}
    assert set(target_differences(manifest, "tester/tiny-llama", type(config)(**other), tokenizer)) == {"target_vocab_size"}


def test_weight_fingerprints_count_only_the_files_transformers_loads(tmp_path):
    """A trainer's leftovers beside the weights do not change the fingerprint; a build that recorded
    the earlier fingerprint (every weight-like file) still matches the same folder."""
    from builder.build_state import identity_differences
    from builder.fingerprints import earlier_weights_sample_hashes, local_weights_sample_hash, same_weights

    clean = tiny_target_copy(tmp_path / "clean")
    trained = tiny_target_copy(tmp_path / "trained")
    (trained / "training_args.bin").write_bytes(b"trainer state")
    assert local_weights_sample_hash(trained) == local_weights_sample_hash(clean)
    earlier = earlier_weights_sample_hashes(trained)["every_file"]
    assert earlier != local_weights_sample_hash(trained) and same_weights(earlier, str(trained), by_an_earlier_version=True)
    assert not same_weights(earlier, str(trained))  # a cache of this version recorded this version's way
    assert not same_weights(earlier, str(clean), by_an_earlier_version=True)
    stored = {"target": {"model": str(trained), "weights_sample_sha256": earlier}}
    current = {"target": {"model": str(trained), "weights_sample_sha256": local_weights_sample_hash(trained)}}
    assert identity_differences(stored, current) == {}
    (trained / "model.safetensors").write_bytes(bytes(reversed((trained / "model.safetensors").read_bytes())))
    assert not same_weights(earlier, str(trained), by_an_earlier_version=True)
    changed = {"target": {"model": str(trained), "weights_sample_sha256": local_weights_sample_hash(trained)}}
    assert set(identity_differences(stored, changed)) == {"target.weights_sample_sha256"}


# ---- across shards: what no shard shows alone --------------------------------------------------


def record_shards_as_they_are(cache, names: set[str]) -> None:
    """Update these shards' records, the totals and dataset_info to agree with their files (as a
    buggy writer or resume would leave them): every per-shard check then passes."""

    in_vocab = draft_vocab_mask(cache)

    def agree(data):
        manifest = data["eagle3_cache"]
        decode = RowDecoder(manifest)
        for shard in manifest["shards"]:
            if shard["name"] in names:
                path = cache / "data" / shard["name"]
                rows = [decode(row) for row in pq.read_table(path).to_pylist()]
                shard |= {"rows": len(rows), "bytes": path.stat().st_size, "checksum": file_hash(path, CHECKSUM_ALGORITHM)}
                shard |= {"tokens": sum(r["num_tokens"] for r in rows), "loss_tokens": sum(int(r["loss_mask"].sum()) for r in rows)}
                shard["argmax_in_vocab"] = sum(int(in_vocab[r["target_argmax"].long()].sum()) for r in rows)
        for key in ("rows", "tokens", "bytes", "loss_tokens"):
            manifest["totals"]["samples" if key == "rows" else key] = sum(s[key] for s in manifest["shards"])
        manifest["totals"]["argmax_coverage"] = argmax_coverage(manifest["shards"])
        manifest["totals"]["bytes_per_token"] = bytes_per_token(manifest["shards"])
        data["dataset_info"]["splits"][0] |= {"num_examples": manifest["totals"]["samples"], "num_bytes": manifest["totals"]["bytes"]}

    edit_card(cache, agree)


def test_a_shard_replaced_by_a_copy_of_another_is_caught(cache):
    first = shard_name(0, 4)
    (cache / "data" / SHARD).write_bytes((cache / "data" / first).read_bytes())
    record_shards_as_they_are(cache, {SHARD})
    indices = pq.read_table(cache / "data" / first, columns=["source_index"])["source_index"].to_pylist()
    assert verify_cache(cache) == [
        f"data/{SHARD}: holds 4 sample(s) (source_index {', '.join(map(str, sorted(indices)))}) also held by data/{first}: "
        "source_index is unique in a cache, so rows were duplicated, and the samples that belong in their place are missing; "
        "to repair: delete the shard that should not hold them (if unsure, each of these) and run the build again with "
        "--resume (it rebuilds only the missing shards), or rebuild"
    ]


def test_a_row_dropped_from_a_shard_but_the_last_is_caught(cache):
    path = cache / "data" / SHARD
    pq.write_table(pq.read_table(path).slice(1), path, compression="none")
    record_shards_as_they_are(cache, {SHARD})
    assert verify_cache(cache) == [
        f"data/{SHARD}: 3 samples, where the build puts 4, as every shard but the last (--shard-size): samples were "
        f"dropped or added; {REPAIR}"
    ]


def test_a_failed_record_naming_a_shard_the_manifest_does_not_list_is_caught(cache):
    failure = {"sample_id": "x", "source_index": 999, "shard": "train-00009-of-00004.parquet", "reason": "non_finite_output"}
    edit_card(cache, lambda data: data["eagle3_cache"].__setitem__("failed", [failure]))
    assert verify_cache(cache) == [
        "README.md: failed sample 'x' (source_index 999) is recorded in data/train-00009-of-00004.parquet, which the "
        "manifest does not list: restore the card, or rebuild"
    ]


@pytest.fixture(scope="module")
def whole_input(tmp_path_factory):
    """A cache of every row of a 10-row input (no --max-samples cut): the build's input order is known."""
    from builder.embedded import resolve_input

    folder = tmp_path_factory.mktemp("whole")
    lines = (Path(resolve_input("sample-chats")) / "openai.jsonl").read_text().splitlines()[:10]
    (folder / "chats.jsonl").write_text("\n".join(lines) + "\n")
    return build(small_config(folder / "cache", input_data=str(folder / "chats.jsonl"), max_samples=None), progress=False).output_dir


def test_shards_swapped_with_their_records_are_caught_where_the_input_order_is_known(whole_input, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(whole_input, cache)
    names = [s["name"] for s in read_manifest(cache)["shards"]]
    assert len(names) == 3 and verify_cache(cache) == []
    first, second = (cache / "data" / names[0]).read_bytes(), (cache / "data" / names[1]).read_bytes()
    (cache / "data" / names[0]).write_bytes(second)
    (cache / "data" / names[1]).write_bytes(first)
    record_shards_as_they_are(cache, set(names[:2]))
    assert verify_cache(cache) == [
        f"data/{names[1]}: holds samples the build takes before some of data/{names[0]}'s (shards fill in turn along the "
        "input's order of --shuffle-seed 42): the two were swapped, or one rewritten with other samples; to repair: "
        f"delete data/{names[0]} and data/{names[1]} and run the build again with --resume (it rebuilds only the missing shards)"
    ]


def test_a_column_dtype_or_layout_edited_in_the_card_is_caught_and_the_shards_checked_as_written(tmp_path, capsys):
    """bf16 values read as fp16 have the same size and shapes: only the identity tells them apart."""
    from builder.cli import main

    cache = build(small_config(tmp_path / "cache", dtype="bf16"), progress=False).output_dir
    written = read_manifest(cache)

    def edit(data):
        manifest = data["eagle3_cache"]
        manifest["columns"]["aux_hidden_states"]["dtype"] = "fp16"
        manifest["columns"]["target_probs"]["encoding"] = "raw"
        manifest["layout"]["aux_dtype"] = "fp16"
        manifest["columns"]["final_hidden"] = manifest["columns"].pop("target_argmax")

    edit_card(cache, edit)
    described = (
        "for the cache its identity (target_format probs, dtype bf16, aux_dtype bf16, draft_vocab_size 300, compression zstd) "
        "and hidden_size (64) describe: readers would decode the shards otherwise than they were written. Restore the card (run "
        "the build command again with --resume: it writes the card again, computing nothing), or rebuild"
    )
    assert verify_cache(cache) == [  # the shards themselves checked against the columns the build wrote: intact
        f"README.md: the manifest's {difference} {described}"
        for difference in (
            "columns.aux_hidden_states.dtype is 'fp16'; the build writes 'bf16'",
            "columns.final_hidden is listed; the build writes no such column",
            "columns.target_argmax is missing; the build writes that column",
            "columns.target_probs.encoding is 'raw'; the build writes 'byte_planes_zstd'",
            "layout.aux_dtype is 'fp16'; the build writes 'bf16'",
        )
    ]
    assert main(["verify", str(cache)]) == 1
    capsys.readouterr()
    edit_card(cache, lambda data: data["eagle3_cache"].update(columns=written["columns"], layout=written["layout"]))
    assert verify_cache(cache) == []


def test_a_target_vocab_size_edited_in_the_card_is_caught(cache):
    """Readers size the draft-to-target mapping (t2d) by it; the vocab file counts every token of the target."""
    size = read_manifest(cache)["target_vocab_size"]
    edit_card(cache, lambda data: data["eagle3_cache"].update(target_vocab_size=size + 1))
    assert verify_cache(cache) == [
        f"README.md: the manifest's target_vocab_size {size + 1} differs from the {size} tokens vocab/vocab.safetensors counts: "
        "readers would size the draft-to-target mapping wrong. Restore the card (run the build command again with --resume: "
        "it writes the card again, computing nothing), or rebuild"
    ]
    edit_card(cache, lambda data: data["eagle3_cache"].update(target_vocab_size=size))
    assert verify_cache(cache) == []


def test_special_token_ids_edited_in_the_card_are_caught(cache):
    """Readers select a smaller draft vocabulary from the vocab file's counts and the card's special_token_ids:
    ids other than those the stored draft vocabulary was selected with make such a read pick other tokens."""
    specials = read_manifest(cache)["special_token_ids"]
    smaller = read_draft_vocab(cache, 100).selected_token_ids
    edit_card(cache, lambda data: data["eagle3_cache"].update(special_token_ids=specials[:-1]))
    assert not torch.equal(read_draft_vocab(cache, 100).selected_token_ids, smaller)
    (problem,) = verify_cache(cache)
    assert re.fullmatch(
        rf"README\.md: the manifest's special_token_ids {re.escape(str(specials[:-1]))} select another draft vocabulary from "
        r"vocab/vocab\.safetensors's counts than the 300 tokens it stores \(token \d+ at position 3, where it stores "
        rf"{specials[-1]}\): readers selecting a smaller draft vocabulary would pick other tokens\. {re.escape(RESTORE_CARD)}",
        problem,
    )
    for edited in ([*specials, specials[0]], [*specials, 1024], [*specials, True], "0, 1"):
        edit_card(cache, lambda data, edited=edited: data["eagle3_cache"].update(special_token_ids=edited))
        assert verify_cache(cache) == [
            f"README.md: the manifest's special_token_ids is {json.dumps(edited)}, where the build records distinct token ids "
            "within 0..1023: readers selecting a smaller draft vocabulary would fail or pick other tokens. " + RESTORE_CARD
        ]
    edit_card(cache, lambda data: data["eagle3_cache"].update(special_token_ids=specials))
    assert verify_cache(cache) == []


def test_special_token_ids_edited_in_a_whole_vocabulary_cache_are_caught_by_the_recompute(tmp_path):
    """A cache storing the whole vocabulary (in id order) shows no edit to the special ids in its files, yet a read of
    a smaller draft vocabulary selects with them: the recompute, which loads the build's tokenizer, compares them."""
    whole = build(small_config(tmp_path / "whole", draft_vocab_size=None, max_samples=4), progress=False).output_dir
    specials = read_manifest(whole)["special_token_ids"]
    smaller = read_draft_vocab(whole, 100).selected_token_ids
    edit_card(whole, lambda data: data["eagle3_cache"].update(special_token_ids=specials[:-1]))
    assert not torch.equal(read_draft_vocab(whole, 100).selected_token_ids, smaller)
    assert verify_cache(whole) == []  # the files alone cannot show it
    assert verify_cache(whole, recompute=2) == [
        f"README.md: the manifest's special_token_ids {specials[:-1]} are not those of the build's tokenizer ({specials}): "
        f"readers selecting a smaller draft vocabulary would pick other tokens. {RESTORE_CARD}"
    ]
    edit_card(whole, lambda data: data["eagle3_cache"].update(special_token_ids=specials))
    assert verify_cache(whole, recompute=2) == []


def test_a_card_whose_data_files_leave_out_listed_shards_is_caught(cache):
    def narrow(data):
        data["configs"][0]["data_files"][0]["path"] = "data/train-0000[01]-of-00004.parquet"

    edit_card(cache, narrow)
    assert verify_cache(cache) == [
        f"data/{shard_name(k, 4)}: listed in the manifest, but the card's data_files (data/train-0000[01]-of-00004.parquet) do "
        "not match it, so readers would leave its rows out (the build writes data/train-*-of-00004.parquet). "
        f"{RESTORE_CARD}"
        for k in (2, 3)
    ]


def test_a_card_whose_configs_name_no_train_split_is_caught(cache, capsys):
    """`datasets` and load_cache read the train split the configs name: renamed, or its line deleted, they
    read no shard (a card with no configs at all is read by the folder's default layout)."""
    from builder.cli import main

    text = (cache / "README.md").read_text()
    shards = '"data/train-*-of-00004.parquet"'
    edits = [
        (
            "  - split: train\n",
            "  - split: training\n",
            f'[{{"config_name": "default", "data_files": [{{"split": "training", "path": {shards}}}]}}]',
        ),
        ("  - split: train\n    path:", "  - path:", f'[{{"config_name": "default", "data_files": [{{"path": {shards}}}]}}]'),
        ("- config_name: default\n", "", f'{{"data_files": [{{"split": "train", "path": {shards}}}]}}'),  # no longer a list
    ]
    for old, new, configs in edits:
        (cache / "README.md").write_text(text.replace(old, new, 1))
        assert verify_cache(cache) == [
            f"README.md: the card's configs ({configs}) name no train split with a path, so `datasets` and load_cache cannot read "
            f"the shards (the build writes split train with path data/train-*-of-00004.parquet). {RESTORE_CARD}"
        ]
        assert main(["verify", str(cache)]) == 1
    build(small_config(cache, resume=True), progress=False)  # as the message says
    assert verify_cache(cache) == []
    capsys.readouterr()
    (cache / "README.md").write_text(text.replace("  data_files:\n  - split: train\n    path: ", "  data_files: ", 1))
    assert verify_cache(cache) == []  # a pattern with no split named: `datasets` reads it as the train split


def test_a_build_that_deleted_its_uploaded_shards_is_verified_on_the_hub(hub, tmp_path, capsys):
    from builder.cli import main

    cfg = small_config(tmp_path / "cache", push_to_hub="tester/uploaded", delete_local_after_upload=True)
    out = build(cfg, progress=False).output_dir
    assert not list((out / "data").glob("*.parquet"))
    message = (
        f"verify: 4 of the 4 shards of {out} are not here but on the Hub (train-00000-of-00004.parquet, "
        "train-00001-of-00004.parquet, train-00002-of-00004.parquet, ...): the build uploaded them and then deleted them "
        "here (--delete-local-after-upload), as their build records show. Verify the repo the build pushed to instead: "
        "eagle3-cache verify REPO_ID"
    )
    with pytest.raises(Eagle3CacheError, match=re.escape(message)):
        verify_cache(out)
    capsys.readouterr()
    assert main(["verify", str(out)]) == 2  # nothing here could be checked: not damage
    assert f"error: {message}" in capsys.readouterr().err
    assert main(["verify", "tester/uploaded"]) == 0


def test_a_negative_recompute_count_is_refused_saying_what_is_expected(cache, capsys):
    from builder.cli import main

    with pytest.raises(SystemExit) as exit_status:
        main(["verify", str(cache), "--recompute", "-2"])
    assert exit_status.value.code == 2
    assert "argument --recompute: expected a whole number of samples, 0 or more (0: recompute none), got '-2'" in capsys.readouterr().err
    with pytest.raises(Eagle3CacheError, match=r"--recompute: expected a whole number of samples, 0 or more \(0: recompute none\), got -2"):
        verify_cache(cache, recompute=-2)


def test_flags_verify_would_ignore_are_refused_saying_why(cache, capsys):
    from builder.cli import main

    cases = [
        (
            ["--revision", "v9"],
            {"revision": "v9"},
            rf"--revision: expected a Hub dataset repo id to verify, got 'v9'\. {re.escape(str(cache))} is a local directory, "
            r"which has no revisions, so the flag would be ignored: leave it out, or verify the repo the cache was pushed to "
            r"\(eagle3-cache verify REPO_ID --revision v9\)",
        ),
        (
            ["--seed", "3"],
            {"seed": 3},
            r"--seed: expected --recompute N as well, got 3\. Without it the flag is ignored\. It chooses the samples to recompute\.",
        ),
        (
            ["--target-model", "tiny-llama"],
            {"target_model": "tiny-llama"},
            r"--target-model: expected --recompute N as well, got 'tiny-llama'\. Without it the flag is ignored\. Only a "
            r"recompute runs the target\.",
        ),
    ]
    for flags, arguments, message in cases:
        with pytest.raises(Eagle3CacheError, match=message):
            verify_cache(cache, **arguments)
        assert main(["verify", str(cache), *flags]) == 2
        assert re.search(message, capsys.readouterr().err)
    assert main(["verify", str(cache), "--seed", "0", "--recompute", "0"]) == 2  # given, if as its default value
    capsys.readouterr()
    assert main(["verify", str(cache), "--seed", "3", "--recompute", "1"]) == 0


@pytest.mark.parametrize("mark", ["", "\ufeff"], ids=["plain", "byte-order mark"])  # some editors save the mark
def test_a_card_cut_short_or_with_broken_yaml_is_called_damaged_saying_how_to_restore_it(cache, capsys, mark):
    from builder.cli import main

    text = (cache / "README.md").read_text()
    closing = text.index("\n---", 4)
    cases = [
        (text[: len(text) // 2], "begins but is never closed (a line holding only ---)"),
        (text[:closing] + '\n  broken: "never closed' + text[closing:], "does not parse (while scanning a quoted scalar"),
    ]
    for damaged, why in cases:
        (cache / "README.md").write_text(mark + damaged, encoding="utf-8")
        message = f"verify: {cache / 'README.md'} is damaged: its YAML front matter, which holds the manifest, {why}"
        with pytest.raises(Eagle3CacheError, match=re.escape(message) + r".*Restore it: run the build command again with --resume"):
            verify_cache(cache)
        assert main(["verify", str(cache)]) == 2
        assert capsys.readouterr().err.startswith(f"error: {message}")
    (cache / "README.md").write_text(text)
    edit_card(cache, lambda data: data["eagle3_cache"].pop("shards"))  # whole YAML, but lines of the manifest removed
    with pytest.raises(Eagle3CacheError, match=r"README.md is damaged: its manifest has no shards, as in a card cut short"):
        verify_cache(cache)
    (cache / "README.md").write_text("---\nlicense: mit\n---\n# another dataset\n")  # whole, and not ours
    with pytest.raises(Eagle3CacheError, match="it is not an eagle3-cache dataset card"):
        verify_cache(cache)


# ---- what a hidden cache is read through: its head file and logit terms --------------------------


@pytest.fixture(scope="module")
def hidden_intact(tmp_path_factory):
    return build(small_config(tmp_path_factory.mktemp("verify_hidden") / "cache", target_format="hidden"), progress=False).output_dir


@pytest.fixture
def hidden_cache(hidden_intact, tmp_path):
    copy = tmp_path / "hidden"
    shutil.copytree(hidden_intact, copy)
    return copy


def rewrite_head_file(cache, change) -> None:
    """The head file's tensors changed by `change`, with the manifest's checksum updated to agree."""
    from safetensors.torch import load_file, save_file

    path = cache / "vocab" / "lm_head.safetensors"
    save_file({k: v.contiguous() for k, v in change(load_file(path)).items()}, str(path))
    edit_card(cache, lambda data: data["eagle3_cache"]["lm_head_file"].__setitem__("checksum", file_hash(path, CHECKSUM_ALGORITHM)))


def test_a_missing_or_damaged_head_file_is_caught_saying_how_to_repair_it(hidden_cache):
    head = hidden_cache / "vocab" / "lm_head.safetensors"
    data = bytearray(head.read_bytes())
    data[-3] ^= 0x01
    head.write_bytes(bytes(data))
    assert verify_cache(hidden_cache) == [
        "vocab/lm_head.safetensors: missing or its checksum differs from the manifest (every hidden-format sample depends on "
        "it); to repair: delete vocab/lm_head.safetensors and run the build again with --resume (it writes the head rows "
        "again from the target, computing no shard)"
    ]
    head.unlink()
    build(small_config(hidden_cache, target_format="hidden", resume=True), progress=False)  # as the message says
    assert verify_cache(hidden_cache) == []


def test_recompute_compares_a_hidden_caches_head_rows_and_logit_terms_with_the_target(hidden_cache):
    assert verify_cache(hidden_cache, recompute=2) == []
    rewrite_head_file(hidden_cache, lambda head: head | {"draft_rows": head["draft_rows"].flip(0)})  # rows in the wrong order
    assert verify_cache(hidden_cache) == []  # every file as its record says
    problems = verify_cache(hidden_cache, recompute=2)
    assert len(problems) == 1
    assert problems[0].startswith("vocab/lm_head.safetensors: draft_rows differs from the target's head (max abs diff ")
    assert problems[0].endswith(
        "every sample of this hidden cache is read through it: to repair: delete vocab/lm_head.safetensors and run the build "
        "again with --resume (it writes the head rows again from the target, computing no shard)"
    )

    rewrite_head_file(hidden_cache, lambda head: head | {"draft_rows": head["draft_rows"].flip(0), "bias": torch.ones(1024)})
    assert verify_cache(hidden_cache, recompute=2) == [
        "vocab/lm_head.safetensors: holds a bias the target's head does not have; every sample of this hidden cache is read "
        "through it: to repair: delete vocab/lm_head.safetensors and run the build again with --resume (it writes the head "
        "rows again from the target, computing no shard)"
    ]

    rewrite_head_file(hidden_cache, lambda head: {"draft_rows": head["draft_rows"]})
    edit_card(hidden_cache, lambda data: data["eagle3_cache"]["head_transform"].__setitem__("final_logit_softcapping", 30.0))
    assert verify_cache(hidden_cache) == []  # outside the fingerprint
    (problem,) = verify_cache(hidden_cache, recompute=2)
    assert re.match(
        r"README.md: the manifest's head_transform is \{.*'final_logit_softcapping': 30.0.*\}, where the target gives "
        r"\{.*'final_logit_softcapping': None.*\}: readers would apply other logit terms than the target's\. Restore the card",
        problem,
    )


def refused_as_damaged(location, part: str, capsys) -> None:
    """The card without `part` of its manifest: verify refuses it as damaged, saying how to restore it."""
    from builder.cli import main

    text = (location / "README.md").read_text()
    edit_card(location, lambda data: data["eagle3_cache"].pop(part))
    message = rf"README.md is damaged: its manifest has no {part}, as in a card cut short or edited by hand\. Restore it"
    with pytest.raises(Eagle3CacheError, match=message):
        verify_cache(location)
    assert main(["verify", str(location), "--recompute", "2"]) == 2  # a refusal, not a traceback
    assert re.search(message, capsys.readouterr().err)
    (location / "README.md").write_text(text)


def test_a_hidden_cache_recorded_before_a_logit_term_existed_passes(hidden_cache):
    """An earlier version recorded no lm_head_multiplier: absent, as None, the term applies nothing."""
    edit_card(hidden_cache, lambda data: data["eagle3_cache"]["head_transform"].pop("lm_head_multiplier"))
    assert verify_cache(hidden_cache, recompute=2) == []


def test_a_hidden_cache_whose_manifest_has_no_head_file_or_logit_terms_is_called_damaged(hidden_cache, capsys):
    for part in ("lm_head_file", "head_transform"):
        refused_as_damaged(hidden_cache, part, capsys)


def test_a_manifest_without_the_build_settings_a_recompute_rebuilds_batches_from_is_called_damaged(cache, capsys):
    refused_as_damaged(cache, "build", capsys)

    def drop_batching(data):
        for shard in data["eagle3_cache"]["shards"]:
            shard.pop("batching")  # as recorded before shards carried their own: the build's settings rebuild the batches
        data["eagle3_cache"]["build"].pop("max_tokens_per_batch")

    edit_card(cache, drop_batching)
    with pytest.raises(Eagle3CacheError, match=r"its manifest has no build\.max_tokens_per_batch, as in a card cut short"):
        verify_cache(cache, recompute=2)


def test_a_manifest_lacking_a_field_of_a_shard_column_layout_or_identity_is_called_damaged(cache, capsys):
    """Each field verify reads, deleted from the card: a refusal saying which, not a traceback."""
    from builder.cli import main

    text = (cache / "README.md").read_text()
    deletions = {
        f"shards[{SHARD}].checksum": lambda m: m["shards"][1].pop("checksum"),
        f"shards[{SHARD}].rows": lambda m: m["shards"][1].pop("rows"),
        f"shards[{SHARD}].bytes": lambda m: m["shards"][1].pop("bytes"),
        f"shards[{SHARD}].tokens": lambda m: m["shards"][1].pop("tokens"),
        f"shards[{SHARD}].loss_tokens": lambda m: m["shards"][1].pop("loss_tokens"),
        f"shards[{SHARD}].argmax_in_vocab": lambda m: m["shards"][1].pop("argmax_in_vocab"),
        f"shards[{SHARD}].batching.batch_size": lambda m: m["shards"][1]["batching"].pop("batch_size"),
        "columns.aux_hidden_states.dtype": lambda m: m["columns"]["aux_hidden_states"].pop("dtype"),
        "columns.input_ids.arrow": lambda m: m["columns"]["input_ids"].pop("arrow"),
        "columns.sample_id.arrow": lambda m: m["columns"].__setitem__("sample_id", None),  # its only line deleted
        "layout.aux_width": lambda m: m["layout"].pop("aux_width"),
        "identity.seq_length": lambda m: m["identity"].pop("seq_length"),
        "identity.input.shuffle_seed": lambda m: m["identity"]["input"].pop("shuffle_seed"),
        "vocab_file.checksum": lambda m: m["vocab_file"].pop("checksum"),
        "hidden_size": lambda m: m.pop("hidden_size"),
        "special_token_ids": lambda m: m.pop("special_token_ids"),
        "build.pad_token_id": lambda m: m["build"].pop("pad_token_id"),  # a recompute would pad with another id
    }
    for part, delete in deletions.items():
        edit_card(cache, lambda data, delete=delete: delete(data["eagle3_cache"]))
        message = f"README.md is damaged: its manifest has no {re.escape(part)}, as in a card cut short or edited by hand. Restore it"
        with pytest.raises(Eagle3CacheError, match=message):
            verify_cache(cache)
        assert main(["verify", str(cache)]) == 2
        assert re.search(message, capsys.readouterr().err)
        (cache / "README.md").write_text(text)


COUNT = "a count (a whole number, 0 or more)"
TOKEN_ID = "a token id (a whole number, 0 or more)"


@pytest.mark.parametrize(
    "part, value, found, expected",
    [
        ("shards.1.rows", "4", 'the string "4"', COUNT),
        ("shards.1.bytes", 4.5, "the number 4.5", COUNT),
        ("shards.1.tokens", "12", 'the string "12"', COUNT),
        ("shards.1.loss_tokens", {"a": 1}, 'the mapping {"a": 1}', COUNT),
        ("shards.1.argmax_in_vocab", [5], "the list [5]", COUNT),
        ("shards.1.rows", -4, "the number -4", COUNT),
        ("shards.1.bytes", -1, "the number -1", COUNT),
        ("shards.1.tokens", -12, "the number -12", COUNT),
        ("shards.1.loss_tokens", -3, "the number -3", COUNT),
        ("shards.1.argmax_in_vocab", -5, "the number -5", COUNT),
        ("shards.1.rows", True, "the boolean true", COUNT),
        ("totals", "x", 'the string "x"', "a mapping"),
        ("totals.samples", "14", 'the string "14"', COUNT),
        ("totals.tokens", -1, "the number -1", COUNT),
        ("totals.loss_tokens", -2, "the number -2", COUNT),
        ("totals.bytes", -3, "the number -3", COUNT),
        ("skipped", [1], "the list [1]", "a mapping"),
        ("skipped.template_error", "3", 'the string "3"', COUNT),  # summed into the input's row count
        ("skipped.template_error", -1, "the number -1", COUNT),
        ("duplicate_ids", -1, "the number -1", COUNT),
        ("build.pad_token_id", "abc", 'the string "abc"', TOKEN_ID),
        ("build.pad_token_id", True, "the boolean true", TOKEN_ID),
        ("build.pad_token_id", -1, "the number -1", TOKEN_ID),  # a recompute would embed it: an IndexError, on CUDA a device assert
        ("checksum_algorithm", "md5", 'the string "md5"', "a checksum algorithm (sha256, xxh3_128)"),  # every file hashed by it
        ("columns", ["sample_id"], 'the list ["sample_id"]', "a mapping"),
        ("shards", {"train-00000-of-00004.parquet": 4}, 'the mapping {"train-00000-of-00004.parquet": 4}', "a list"),
        ("failed", "none", 'the string "none"', "a list"),
        ("identity.shard_size", "4", 'the string "4"', COUNT),  # every shard's size is compared with it
    ],
)
def test_a_manifest_part_holding_another_kind_of_value_is_called_damaged(cache, capsys, part, value, found, expected):
    """A count verify sums, its totals, or the id a recompute pads with, edited into another kind of value (a count
    or that id below 0 among them): a refusal naming it, what it holds and what is expected, not a traceback or a
    report of other damage."""
    from builder.cli import main

    *path, key = part.split(".")

    def set_part(data):
        record = data["eagle3_cache"]
        for step in path:
            record = record[int(step)] if isinstance(record, list) else record[step]
        record[key] = value

    edit_card(cache, set_part)
    named = part.replace("shards.1.", f"shards[{SHARD}].")
    message = f"README.md is damaged: its manifest's {named} is {found}, where {expected} is expected"
    with pytest.raises(Eagle3CacheError, match=re.escape(message) + r", .*Restore it"):
        verify_cache(cache)
    assert main(["verify", str(cache), "--recompute", "2"]) == 2
    assert re.search(re.escape(message), capsys.readouterr().err)


@pytest.mark.parametrize(
    "part, value, named, found, expected",
    [
        ("failed", ["row 3"], "failed[0]", 'the string "row 3"', "a mapping"),
        ("failed", [{"sample_id": "x", "shard": SHARD}], "failed[0].source_index", None, None),
        ("failed", [{"sample_id": "x", "shard": SHARD, "source_index": "3"}], "failed[0].source_index", 'the string "3"', COUNT),
        ("shards.1.name", 7, "shards[1].name", "the number 7", "a string"),
    ],
)
def test_a_list_entry_of_the_manifest_holding_another_kind_of_value_is_called_damaged(cache, capsys, part, value, named, found, expected):
    """An entry of the lists verify walks (failed samples, shards), edited into another kind of value or lacking what
    verify reads of it: a refusal naming it, not a traceback."""
    from builder.cli import main

    *path, key = part.split(".")

    def set_part(data):
        record = data["eagle3_cache"]
        for step in path:
            record = record[int(step)] if isinstance(record, list) else record[step]
        record[key] = value

    edit_card(cache, set_part)
    damage = f"its manifest has no {named}" if found is None else f"its manifest's {named} is {found}, where {expected} is expected"
    with pytest.raises(Eagle3CacheError, match=re.escape(f"README.md is damaged: {damage}") + r", .*Restore it"):
        verify_cache(cache)
    assert main(["verify", str(cache)]) == 2


def test_card_parts_outside_the_manifest_of_another_shape_are_reported_not_a_traceback(cache):
    edit_card(cache, lambda data: data["dataset_info"].update(splits={"num_bytes": 1, "num_examples": 14}))  # its `- name` line deleted
    assert verify_cache(cache) == [
        'README.md: dataset_info.splits is {"num_bytes": 1, "num_examples": 14}, not a list of splits (name, num_examples). '
        f"{RESTORE_CARD}"
    ]
    build(small_config(cache, resume=True), progress=False)  # as the message says
    assert verify_cache(cache) == []


def test_shards_the_manifests_columns_cannot_decode_are_reported_not_a_traceback(cache):
    """Where the identity no longer matches its fingerprint, the shards are checked against the card's
    own columns: edited too, their values may not even decode."""
    from helpers import record_in_card

    edit_card(cache, lambda data: data["eagle3_cache"]["identity"].update(seq_length=95))
    edit_card(cache, lambda data: data["eagle3_cache"]["columns"]["aux_hidden_states"].update(shape=["L", 191]))
    problems = verify_cache(cache)
    assert problems[0].startswith("README.md: the manifest's identity fields no longer match its fingerprint")
    assert any(
        p.startswith(f"data/{SHARD}: its rows cannot be decoded as the manifest's columns say (shape '[-1, 191]' is invalid")
        for p in problems
    )
    record_in_card(cache)  # the fingerprint over the edited identity: the card's columns are compared with it
    assert not any("cannot be decoded" in p for p in verify_cache(cache))


def test_a_cache_recorded_before_the_sort_window_had_a_setting_is_recomputed(cache):
    """Caches recorded before shards carried their batching, and before the sort window had a setting of
    its own, sorted within 4 row groups: their batches are rebuilt from that."""

    def as_recorded_then(data):
        for shard in data["eagle3_cache"]["shards"]:
            shard.pop("batching")
        data["eagle3_cache"]["build"].pop("sort_window_bytes")

    edit_card(cache, as_recorded_then)
    assert verify_cache(cache, recompute=14) == []
