"""Every invalid flag fails before any data or weights load, naming the flag and the value;
the CLI prints one `error:` line (exit 2); `--dry-run` prints the plan and writes nothing."""

import os
import re

import numpy as np
import pytest
from helpers import says

import builder.placement as placement_mod
import builder.prepare as prepare_mod
import builder.target as target_mod
from builder.build_state import BUILD_STATE_DIR, BUILD_STATE_FILE
from builder.cli import main
from builder.config import BuildConfig, resolve_aux_layer_ids, validate
from builder.errors import ConfigError


def cfg(tmp_path, **changes):
    return BuildConfig(target_model="tiny-llama", input_data="sample-chats", output_dir=str(tmp_path / "out"), **changes)


# (flag in BuildConfig, value, the message's regex); each message names the flag, the value and what was expected.
INVALID = [
    ("seq_length", 0, r"--seq-length: expected an integer >= 2, got 0"),
    ("seq_length", 1, r"--seq-length: expected an integer >= 2, got 1"),
    ("batch_size", 0, r"--batch-size: expected an integer >= 1, got 0"),
    ("batch_size", -3, r"--batch-size: expected an integer >= 1, got -3"),
    ("shard_size", 0, r"--shard-size: expected an integer >= 1, got 0"),
    ("max_samples", 0, r"--max-samples: expected an integer >= 1, got 0"),
    ("draft_vocab_size", 0, r"--draft-vocab-size: expected an integer >= 1, got 0"),
    ("num_proc", 0, r"--num-proc: expected an integer >= 1, got 0"),
    ("row_group_bytes", 0, r"--row-group-bytes: expected an integer >= 1, got 0"),
    ("sort_window_bytes", 0, r"--sort-window-bytes: expected an integer >= 1, got 0"),
    ("shuffle_seed", -1, r"--shuffle-seed: expected an integer >= 0, got -1"),
    ("seq_length", 2.5, r"--seq-length: expected an integer >= 2, got 2.5"),
    ("max_tokens_per_batch", 100, r"--max-tokens-per-batch: expected at least --seq-length \(2048\), got 100\. A batch must hold"),
    ("dtype", "fp8", r"--dtype: expected one of bf16, fp16, fp32, got 'fp8'"),
    ("dtype", "bfloat16", r"--dtype: expected one of bf16, fp16, fp32, got 'bfloat16'"),
    ("target_format", "logits", r"--target-format: expected one of probs, topk, hidden, got 'logits'"),
    ("aux_layer_ids", (1, 3, 1), r"--aux-layer-ids: expected distinct layer ids, got \[1, 3, 1\]\. Remove the duplicates\."),
    ("aux_layer_ids", (), r"--aux-layer-ids: expected at least one layer id, got \(\)"),
]


@pytest.mark.parametrize("field, value, message", INVALID, ids=[f"{f}={v}" for f, v, _ in INVALID])
def test_validate_rejects(tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=f"^{message}") as info:
        validate(cfg(tmp_path, **{field: value}))
    assert info.value.flag == "--" + field.replace("_", "-")


def test_validate_accepts_the_boundaries(tmp_path):
    validate(
        cfg(
            tmp_path,
            seq_length=2,
            batch_size=1,
            shard_size=1,
            max_samples=1,
            draft_vocab_size=1,
            num_proc=1,
            shuffle_seed=0,
            max_tokens_per_batch=2,
            aux_layer_ids=(0,),
        )
    )
    validate(cfg(tmp_path, dtype="fp16"))
    validate(cfg(tmp_path, dtype="fp32"))


def test_missing_chat_template(tmp_path):
    missing = tmp_path / "nope.jinja"
    with pytest.raises(
        ConfigError,
        match=says("--chat-template", "Jinja template file", str(missing), "does not exist"),
    ):
        validate(cfg(tmp_path, chat_template=str(missing)))


def test_a_chat_template_that_is_a_folder_is_called_one(tmp_path):
    """The tokenizer's folder, say: not a file that does not exist."""
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    with pytest.raises(ConfigError, match=says("--chat-template", "Jinja template file", str(folder), "It is a folder")):
        validate(cfg(tmp_path, chat_template=str(folder)))


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(ConfigError, match=says("--output-dir", "expected a directory", str(tmp_path / "out"), "is a file")):
        validate(cfg(tmp_path))
    with pytest.raises(ConfigError, match="It is a file"):
        validate(cfg(tmp_path, dry_run=True))


@pytest.mark.parametrize(
    "marker", ["README.md", "data/train-00000-of-00001.parquet", f"{BUILD_STATE_DIR}/shards/train-00000-of-00001.parquet.json"]
)
def test_output_dir_holding_a_cache_needs_resume(tmp_path, marker):
    """Its card, a shard, or a shard's record (the shard uploaded and deleted here): what a new build would lose."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / BUILD_STATE_FILE).parent.mkdir()
    (tmp_path / "out" / BUILD_STATE_FILE).write_text("{}")
    path = tmp_path / "out" / marker
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("---\neagle3_cache: {}\n---\n" if marker == "README.md" else "{}")  # a card: the manifest's key
    with pytest.raises(
        ConfigError,
        match=says("--output-dir", "empty or new directory", str(tmp_path / "out"), "already holds an eagle3-cache build", "--resume"),
    ):
        validate(cfg(tmp_path))
    validate(cfg(tmp_path, resume=True))


def test_output_dir_holding_only_the_state_of_a_start_that_failed_takes_a_new_build(tmp_path):
    """A build state and nothing written with it (the target failed to load): the same command, fixed, starts over."""
    (tmp_path / "out" / BUILD_STATE_FILE).parent.mkdir(parents=True)
    (tmp_path / "out" / BUILD_STATE_FILE).write_text("{}")
    validate(cfg(tmp_path))
    validate(cfg(tmp_path, resume=True))
    validate(cfg(tmp_path, dry_run=True))


def test_empty_existing_output_dir_is_fine(tmp_path):
    (tmp_path / "out" / "other").mkdir(parents=True)
    validate(cfg(tmp_path))


# ---- aux layer ids, once the target's config is read ------------------------------------------


def test_default_aux_layer_ids():
    assert resolve_aux_layer_ids(None, 32) == [1, 15, 28]
    assert resolve_aux_layer_ids(None, 8) == [1, 3, 4]
    assert resolve_aux_layer_ids((7, 0, 3), 8) == [7, 0, 3]  # explicit ids keep their order


@pytest.mark.parametrize("requested, bad", [((1, 3, 8), "[8]"), ((-1, 2), "[-1]"), ((9, 10), "[9, 10]")])
def test_out_of_range_aux_layer_ids(requested, bad):
    with pytest.raises(
        ConfigError,
        match=says("--aux-layer-ids", "[0, 7]", "8 decoder layers", f"Out of range: {bad}"),
    ):
        resolve_aux_layer_ids(requested, 8)


@pytest.mark.parametrize("layers", [1, 4, 6])
def test_too_few_layers_for_the_default(layers):
    with pytest.raises(
        ConfigError,
        match=says("--aux-layer-ids", "explicit ids", f"only {layers} layers", "at least 7 layers"),
    ):
        resolve_aux_layer_ids(None, layers)


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if model weights, or (unless allowed) the config, tokenizer or data load."""

    def forbid(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} loaded before the flags were checked")

        return fail

    for module in (target_mod, placement_mod):
        monkeypatch.setattr(module, "load_model", forbid("model weights"))
    monkeypatch.setattr(prepare_mod, "load_rows", forbid("input data"))
    monkeypatch.setattr(prepare_mod, "load_tokenizer", forbid("tokenizer"))
    monkeypatch.setattr(prepare_mod, "load_config", forbid("model config"))
    return monkeypatch


def test_out_of_range_aux_ids_fail_before_data_loads(tmp_path, monkeypatch):
    # The config must be read for this check; the data and the weights must not.
    monkeypatch.setattr(prepare_mod, "load_rows", lambda *a, **k: pytest.fail("input data loaded"))
    monkeypatch.setattr(placement_mod, "load_model", lambda *a, **k: pytest.fail("model weights loaded"))
    with pytest.raises(ConfigError, match=r"--aux-layer-ids: expected ids in \[0, 7\] .*Out of range: \[8\]"):
        prepare_mod.prepare(cfg(tmp_path, aux_layer_ids=(1, 8)))


# ---- the CLI ------------------------------------------------------------------------------


CLI_INVALID = [
    (["--dtype", "fp8"], "--dtype: expected one of bf16, fp16, fp32, got 'fp8'"),
    (["--seq-length", "0"], "--seq-length: expected an integer >= 2, got 0"),
    (["--batch-size", "0"], "--batch-size: expected an integer >= 1, got 0"),
    (["--shard-size", "0"], "--shard-size: expected an integer >= 1, got 0"),
    (["--max-samples", "0"], "--max-samples: expected an integer >= 1, got 0"),
    (["--draft-vocab-size", "0"], "--draft-vocab-size: expected an integer >= 1, got 0"),
    (["--num-proc", "0"], "--num-proc: expected an integer >= 1, got 0"),
    (
        ["--max-tokens-per-batch", "100"],
        "--max-tokens-per-batch: expected at least --seq-length (2048), got 100. A batch must hold at least one full-length sample.",
    ),
    (["--target-format", "logits"], "--target-format: expected one of probs, topk, hidden, got 'logits'"),
    (["--aux-layer-ids", "2,2,5"], "--aux-layer-ids: expected distinct layer ids, got [2, 2, 5]. Remove the duplicates."),
]


@pytest.mark.parametrize("argv, line", CLI_INVALID, ids=[a[0] for a, _ in CLI_INVALID])
def test_cli_bad_flag_is_one_error_line(tmp_path, capsys, nothing_loads, argv, line):
    code = main(["build", "--output-dir", str(tmp_path / "out"), *argv])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err == f"error: {line}\n"
    assert captured.out == ""
    assert not (tmp_path / "out").exists()


def test_cli_missing_chat_template(tmp_path, capsys, nothing_loads):
    assert main(["build", "--output-dir", str(tmp_path / "out"), "--chat-template", str(tmp_path / "t.jinja")]) == 2
    assert (
        capsys.readouterr().err == "error: --chat-template: expected a path to a Jinja template file or a chat_template.json, "
        f"got '{tmp_path / 't.jinja'}'. The file does not exist.\n"
    )


def test_cli_output_dir_with_a_cache(tmp_path, capsys, nothing_loads):
    (tmp_path / "out" / "data").mkdir(parents=True)
    (tmp_path / "out" / "data" / "train-00000-of-00001.parquet").write_bytes(b"")
    assert main(["build", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output-dir: expected an empty or new directory, got '{tmp_path / 'out'}'. It already holds")
    assert err.count("\n") == 1


def test_cli_out_of_range_aux_ids(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(placement_mod, "load_model", lambda *a, **k: pytest.fail("model weights loaded"))
    monkeypatch.setattr(prepare_mod, "load_rows", lambda *a, **k: pytest.fail("input data loaded"))
    assert main(["build", "--output-dir", str(tmp_path / "out"), "--aux-layer-ids", "1,3,8"]) == 2
    assert (
        capsys.readouterr().err
        == "error: --aux-layer-ids: expected ids in [0, 7] (the target has 8 decoder layers), got [1, 3, 8]. Out of range: [8].\n"
    )


def test_cli_unreadable_input_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(placement_mod, "load_model", lambda *a, **k: pytest.fail("model weights loaded"))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"messages": [')
    for data, start in [(str(tmp_path / "missing.jsonl"), "error: --input-data: "), (str(broken), "error: --input-data: ")]:
        assert main(["build", "--quiet", "--output-dir", str(tmp_path / "out"), "--input-data", data]) == 2
        err = capsys.readouterr().err
        assert err.startswith(start) and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_template_that_is_not_prefix_stable_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(placement_mod, "load_model", lambda *a, **k: pytest.fail("model weights loaded"))
    template = tmp_path / "last_only.jinja"
    template.write_text(
        "{{ bos_token }}{% set m = messages[-1] %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    code = main(["build", "--output-dir", str(tmp_path / "out"), "--chat-template", str(template), "--max-samples", "5"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    # Each row is skipped as template_not_prefix_stable; with none left the build stops, naming why.
    assert re.search(
        r"^error: no usable rows: all 5 selected rows .*\{'template_not_prefix_stable': 5\}.* is template_not_prefix_stable: "
        r"the chat template does not render messages\[:\d+\] as a prefix of the whole conversation.*--chat-template",
        err,
    )


def test_cli_bad_layer_list_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["build", "--aux-layer-ids", "1,x"])
    assert info.value.code == 2
    assert "argument --aux-layer-ids: expected comma-separated integers like 1,13,28, got '1,x'" in capsys.readouterr().err


# ---- --dry-run ---------------------------------------------------------------------------


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(placement_mod, "load_model", lambda *a, **k: pytest.fail("model weights loaded"))
    out = tmp_path / "out"
    # Uncompressed, the estimate is exact bytes that can be worked out by hand below.
    assert main(["build", "--dry-run", "--quiet", "--compression", "none", "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert not out.exists()

    # The same numbers, computed here from the prepared samples.
    prep = prepare_mod.prepare(BuildConfig(target_model="tiny-llama", input_data="sample-chats", output_dir=str(out), dry_run=True))
    num_tokens = np.asarray(prep.samples["num_tokens"])
    loss = int(np.sum(prep.samples["num_loss_tokens"]))
    p50, p90, p99 = (int(x) for x in np.percentile(num_tokens, [50, 90, 99]))
    assert text.startswith("Build plan (dry run: nothing written)\n")
    assert re.search(r"^  valid samples +300$", text, re.M)
    assert re.search(r"^  skipped rows +0 *$", text, re.M)
    assert re.search(rf"^  tokens +{num_tokens.sum():,}$", text, re.M)
    assert re.search(rf"^  loss-masked tokens +{loss:,}$", text, re.M)
    assert re.search(rf"^  length p50/p90/p99/max +{p50}/{p90}/{p99}/{num_tokens.max()}$", text, re.M)
    assert p50 < p90 <= p99 <= num_tokens.max() <= 2048
    assert re.search(r"^  vocab +target 1,024, draft 1,024$", text, re.M)
    assert re.search(r"^  draft-vocab coverage 100\.00% of loss-masked tokens$", text, re.M)
    assert re.search(r"^  aux layers +\[1, 3, 4\]$", text, re.M)
    for name in ("probs", "topk", "hidden"):
        assert re.search(rf"^    {name} +[\d,.]+ MB +\([\d,.]+x smaller than the reference\)$", text, re.M), name
    # Reference: 300 samples x 2048 positions x (3 int64 fields + aux 3x64 bf16 + 1024 bf16 probs + 1 bool).
    assert 300 * 2048 * (24 + 192 * 2 + 1024 * 2 + 1) == 1_509_580_800
    assert re.search(r"^    reference padded dense layout 1,509\.58 MB$", text, re.M)
    probs = num_tokens.sum() * (4 + 1 + 192 * 2) + loss * (1024 * 2 + 4)
    assert f"    {'probs':8s} {probs / 1e6:12,.2f} MB" in text


def test_dry_run_with_a_draft_vocab_reports_its_coverage(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("an existing cache")  # a dry run may look at a built cache
    assert main(["build", "--dry-run", "--quiet", "--output-dir", str(out), "--draft-vocab-size", "100", "--max-samples", "40"]) == 0
    text = capsys.readouterr().out
    prep = prepare_mod.prepare(
        BuildConfig(
            target_model="tiny-llama", input_data="sample-chats", output_dir=str(out), dry_run=True, draft_vocab_size=100, max_samples=40
        )
    )
    coverage = prep.token_counts[prep.selected_token_ids].sum() / prep.token_counts.sum()
    assert 0.5 < coverage < 1.0
    assert re.search(r"^  valid samples +40$", text, re.M)
    assert re.search(r"^  vocab +target 1,024, draft 100$", text, re.M)
    assert f"  draft-vocab coverage {coverage:.2%} of loss-masked tokens\n" in text
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]


def test_rows_over_two_gib_are_refused_before_weights(tmp_path, monkeypatch):
    """A 1024-token row with a full-vocabulary fp32 `probs` layout would be written fine; one whose
    encoded size passes 2 GiB (forced here by a tiny limit) is refused with what to change."""
    import builder.prepare as prepare_module
    from builder.config import BuildConfig
    from builder.prepare import prepare

    monkeypatch.setattr(prepare_module, "MAX_ROW_BYTES", 100_000)
    cfg = BuildConfig(
        target_model="tiny-llama", input_data="sample-chats", output_dir=str(tmp_path / "out"), max_samples=20, seq_length=512
    )
    with pytest.raises(
        ConfigError,
        match=says("--seq-length", "2 GiB per value", "got 512", "--target-format topk or hidden"),
    ):
        prepare(cfg)


def test_the_two_gib_limit_is_each_columns_value_and_the_advice_fits_the_column_over_it(tmp_path, monkeypatch):
    """Each tensor of a row is a Parquet value of its own column. The longest sample (512 tokens, 374
    supervised) stores 196,608 bytes of aux states (3 x 64 bf16 per token, plus at most 27 of zstd planes'
    header) and 11,968 of probs over 16 draft tokens: 212,632 in all. Under a 200,000-byte limit every value
    fits, so the build goes on; under 100,000 the aux states do not, and only a shorter --seq-length or
    fp8 aux states make them smaller (the draft vocabulary and target format change other columns)."""
    import builder.prepare as prepare_module
    from builder.config import BuildConfig
    from builder.prepare import prepare

    cfg = BuildConfig(
        target_model="tiny-llama",
        input_data="sample-chats",
        output_dir=str(tmp_path / "out"),
        max_samples=20,
        seq_length=512,
        draft_vocab_size=16,
    )
    monkeypatch.setattr(prepare_module, "MAX_ROW_BYTES", 200_000)
    assert max(prepare(cfg).samples["num_tokens"]) == 512
    monkeypatch.setattr(prepare_module, "MAX_ROW_BYTES", 100_000)
    with pytest.raises(ConfigError) as refused:
        prepare(cfg)
    message = str(refused.value)
    assert re.search(
        says("--seq-length", "got 512", "2 GiB per value", "512 tokens (374 supervised)", "aux_hidden_states", "--aux-dtype fp8"), message
    )
    assert "--draft-vocab-size" not in message and "--target-format" not in message


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_new_output_dir_whose_nearest_existing_folder_is_not_writable_is_refused(tmp_path):
    """/proc/self takes no new folder from anyone, root included (whom no folder mode stops)."""
    out = "/proc/self/eagle3-cache/new"
    with pytest.raises(
        ConfigError,
        match=says(
            "--output-dir", f"got '{out}'", "/proc/self, the nearest folder of it that exists, is not writable", "Choose a writable"
        ),
    ):
        validate(cfg(tmp_path).replace(output_dir=out))
    validate(cfg(tmp_path).replace(output_dir=out, dry_run=True))  # a dry run writes nothing


# ---- --push-to-hub: the target's names and a token are checked with the other flags -------------


PUSH_INVALID = [
    (["--push-to-hub", "not a repo id"], "repo id: expected 'user/name'"),
    (["--push-to-hub", "user/cache", "--hub-tag", "bad..ref"], "--hub-tag: expected a git ref name"),
    (["--push-to-hub", "user/cache", "--hub-branch=-dev"], "--hub-branch: expected a git ref name"),
    (["--push-to-hub", "user/cache", "--hub-config", "data"], "--hub-config: expected a folder name"),
]


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["build", "dry-run"])
@pytest.mark.parametrize("argv, message", PUSH_INVALID, ids=[" ".join(a[2:]) or a[1] for a, _ in PUSH_INVALID])
def test_a_bad_push_target_fails_before_anything_loads(tmp_path, capsys, nothing_loads, argv, message, dry_run):
    nothing_loads.setenv("HF_TOKEN", "hf_present")
    assert main(["build", "--output-dir", str(tmp_path / "out"), *dry_run, *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {message}") and not captured.out, captured.err
    assert not (tmp_path / "out").exists()


def test_a_push_without_a_token_fails_before_anything_loads(tmp_path, capsys, nothing_loads):
    from huggingface_hub import constants

    nothing_loads.delenv("HF_TOKEN", raising=False)
    nothing_loads.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    nothing_loads.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    assert main(["build", "--output-dir", str(tmp_path / "out"), "--push-to-hub", "user/cache"]) == 2
    assert re.search(says("pushing to user/cache: no Hugging Face token found", "HF_TOKEN"), capsys.readouterr().err)


# ---- a flag nothing would read is refused, not ignored ---------------------------------------------


UNUSED = [
    (["--topk", "8"], "--topk: expected --target-format topk as well, got 8"),
    (["--target-format", "hidden", "--topk", "8"], "--topk: expected --target-format topk as well, got 8"),
    (["--store-full-head"], "--store-full-head: expected --target-format hidden as well, got True"),
    (["--target-format", "topk", "--store-full-head"], "--store-full-head: expected --target-format hidden as well, got True"),
    (["--hub-tag", "v1"], "--hub-tag: expected --push-to-hub REPO_ID as well, got 'v1'"),
    (["--hub-config", "small"], "--hub-config: expected --push-to-hub REPO_ID as well, got 'small'"),
    (["--hub-branch", "dev"], "--hub-branch: expected --push-to-hub REPO_ID as well, got 'dev'"),
    (["--private"], "--private: expected --push-to-hub REPO_ID as well, got True"),
]


@pytest.mark.parametrize("argv, line", UNUSED, ids=[" ".join(a) for a, _ in UNUSED])
def test_a_flag_its_settings_would_ignore_is_refused_naming_what_it_needs(tmp_path, capsys, nothing_loads, argv, line):
    assert main(["build", "--output-dir", str(tmp_path / "out"), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {line}. Without it the flag is ignored.") and not captured.out, captured.err
    assert not (tmp_path / "out").exists()


def test_dependent_flags_at_their_defaults_or_with_what_they_need_are_accepted(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_present")
    validate(cfg(tmp_path, topk=64, store_full_head=False, hub_branch="main", hub_tag=None, hub_config=None, private=False))
    validate(cfg(tmp_path, target_format="topk", topk=8))
    validate(cfg(tmp_path, target_format="hidden", store_full_head=True))
    validate(cfg(tmp_path, push_to_hub="user/cache", hub_tag="v1", hub_config="small", hub_branch="dev", private=True))


OVERRIDDEN = [
    (
        ["--device-map", "balanced", "--gpus-per-target", "2"],
        "--gpus-per-target: expected no --device-map alongside it, got 2. --device-map places the target as it says, so the "
        "flag would be ignored and recorded as if it had. Leave out one of the two.",
    ),
    (
        ["--device-map", '{"": "cpu"}', "--max-memory-per-gpu", "70GiB"],
        "--max-memory-per-gpu: expected no --device-map alongside it, got '70GiB'. --device-map places the target as it says, "
        "so the flag would be ignored and recorded as if it had. Leave out one of the two.",
    ),
    (
        ["--target-revision", "v9.9"],
        "--target-revision: expected a Hub model id as --target-model, got 'v9.9'. 'tiny-llama' is a local directory or an "
        "embedded target, which has no revisions, so the flag would be ignored (the manifest records a local target's "
        "files' hashes instead). Leave it out, or pass the Hub id of the model to build from that revision.",
    ),
]


@pytest.mark.parametrize("argv, line", OVERRIDDEN, ids=[" ".join(a[-2:]) for a, _ in OVERRIDDEN])
def test_a_flag_another_setting_would_override_is_refused_naming_both(tmp_path, capsys, nothing_loads, argv, line):
    assert main(["build", "--output-dir", str(tmp_path / "out"), "--dry-run", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {line}\n" and not captured.out
    assert not (tmp_path / "out").exists()


def test_a_revision_of_a_hub_target_and_placement_flags_without_a_device_map_are_accepted(tmp_path):
    validate(cfg(tmp_path, target_revision="v9.9").replace(target_model="meta-llama/Llama-3.1-8B-Instruct"))
    validate(cfg(tmp_path, gpus_per_target=2, max_memory_per_gpu="70GiB"))
    validate(cfg(tmp_path, device_map="balanced", gpus_per_target=1))
    with pytest.raises(ConfigError, match=r"^--target-revision: expected a Hub model id as --target-model, got 'main'"):
        validate(cfg(tmp_path, target_revision="main").replace(target_model=str(tmp_path)))  # a local directory
