"""Build settings are defined once, as BuildConfig's fields; `eagle3-cache build` derives its
options from them, so a default, a flag or a check cannot differ between the CLI and the API."""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import get_type_hints

import pytest

from builder.cli import build_parser, config_from_args, main, shown_default
from builder.config import BuildConfig, flag_of, settings, validate
from builder.errors import ConfigError

HINTS = get_type_hints(BuildConfig)


def subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def options_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def api_default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.metadata["cli_default"]


def test_cli_defaults_are_build_config_defaults():
    options = options_of(subparser("build"))
    for f in settings():
        if f.metadata["api_only"]:
            continue
        assert options[f.name].default == api_default(f), f.name
    # The settings the API requires: the command line's defaults, and every other default the API's own.
    required = {f.name: f.metadata["cli_default"] for f in settings() if f.default is dataclasses.MISSING}
    assert sorted(required) == ["input_data", "output_dir", "target_model"]
    assert config_from_args(build_parser().parse_args(["build"])) == BuildConfig(**required)


def test_the_api_still_requires_the_target_input_and_output():
    with pytest.raises(TypeError, match="missing 3 required keyword-only arguments: 'target_model', 'input_data', and 'output_dir'"):
        BuildConfig()


def test_the_readme_names_the_settings_the_api_requires_and_their_command_line_defaults():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    paragraph = readme[readme.index("`builder.BuildConfig(...)`") :].split("\n\n")[0]
    for f in settings():
        if f.default is dataclasses.MISSING:
            assert f"`{f.name}`" in paragraph and f"`{f.metadata['cli_default']}`" in paragraph, f.name


def non_default_value(f: dataclasses.Field):
    """A command-line value for the setting and the value it should reach BuildConfig as."""
    hint, default = HINTS[f.name], api_default(f)
    if hint is bool:
        return None, True
    if f.metadata["choices"]:
        choice = next(c for c in f.metadata["choices"] if c != default)
        return choice, choice
    if hint == tuple[int, ...] | None:
        return "2, 5,7", (2, 5, 7)
    if hint in (int, int | None):
        value = (default or 0) + 3
        return str(value), value
    return f"{f.name}-value", f"{f.name}-value"


def test_every_setting_is_reachable_from_the_cli():
    build_options = options_of(subparser("build"))
    assert set(build_options) - {f.name for f in settings()} == {"quiet"}  # the only option that is not a setting
    parser = build_parser()
    for f in settings():
        if f.metadata["api_only"]:
            assert f.name not in build_options
            continue
        text, expected = non_default_value(f)
        argv = ["build", flag_of(f.name)] + ([text] if text is not None else [])
        cfg = config_from_args(parser.parse_args(argv))
        assert getattr(cfg, f.name) == expected != api_default(f), f.name
        moved = [g.name for g in settings() if getattr(cfg, g.name) != api_default(g)]
        assert moved == [f.name]


def test_help_shows_each_default_and_names_each_choice(capsys):
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for f in settings():
        if f.metadata["api_only"]:
            continue
        shown = shown_default(f.metadata["shown_default"], api_default(f))
        if shown is not None:
            assert re.search(rf"{flag_of(f.name)}\b.*?\(default: {re.escape(str(shown))}\)", text), f.name
        for choice in f.metadata["choices"] or ():
            assert choice in f.metadata["help"], (f.name, choice)


def test_verify_help_says_which_compute_the_rounding_tolerance_serves_and_when_it_exits_2():
    from builder.verify import ROUNDING_STEPS, TOLERABLE_DTYPES

    description = " ".join(subparser("verify").description.split())
    assert TOLERABLE_DTYPES == ("float32", "float64")
    assert f"within {ROUNDING_STEPS} rounding steps in fp32/fp64 compute" in description
    assert "skipped in bf16/fp16 compute" in description
    assert "no shard left stops with exit status 2" in description
    cannot_run = description.split("2 when verify cannot run", 1)[1]
    for reason in ("no finished cache there", "an unknown repo or config", "a damaged card", "another target", "nothing to recompute"):
        assert reason in cannot_run, reason


def test_push_shares_the_hub_settings():
    push, build = options_of(subparser("push")), options_of(subparser("build"))
    hub = [f.name for f in settings() if f.metadata["group"] == "hub"]
    assert hub == ["hub_config", "hub_branch", "hub_tag", "private"]
    for name in hub:
        assert (push[name].default, push[name].help) == (build[name].default, build[name].help)


MINIMUMS = [f for f in settings() if f.metadata["minimum"] is not None]


@pytest.mark.parametrize("f", MINIMUMS, ids=[f.name for f in MINIMUMS])
def test_each_declared_minimum_is_checked(tmp_path, f):
    in_use = {"target_format": "topk"} if f.name == "topk" else {}  # --topk is refused where no format reads it
    base = BuildConfig(target_model="tiny-llama", input_data="sample-chats", output_dir=str(tmp_path / "out"), **in_use)
    lowest = f.metadata["minimum"]
    validate(base.replace(**{f.name: lowest}))
    with pytest.raises(ConfigError, match=rf"^{flag_of(f.name)}: expected an integer >= {lowest}, got {lowest - 1}$"):
        validate(base.replace(**{f.name: lowest - 1}))


CHOICES = [f for f in settings() if f.metadata["choices"]]


@pytest.mark.parametrize("f", CHOICES, ids=[f.name for f in CHOICES])
def test_each_declared_choice_list_is_checked(tmp_path, capsys, f):
    base = BuildConfig(target_model="tiny-llama", input_data="sample-chats", output_dir=str(tmp_path / "out"))
    for choice in f.metadata["choices"]:
        validate(base.replace(**{f.name: choice}))
    with pytest.raises(ConfigError, match=rf"^{flag_of(f.name)}: expected one of {', '.join(f.metadata['choices'])}, got 'int8'$"):
        validate(base.replace(**{f.name: "int8"}))
    # argparse takes any string: the error is the same one line as from the API
    assert main(["build", flag_of(f.name), "int8", "--output-dir", str(tmp_path / "cli")]) == 2
    assert capsys.readouterr().err == f"error: {flag_of(f.name)}: expected one of {', '.join(f.metadata['choices'])}, got 'int8'\n"


SIZES = [f for f in settings() if callable(f.metadata["shown_default"])]  # --help shows them in MiB or GiB


@pytest.mark.parametrize("f", SIZES, ids=[f.name for f in SIZES])
def test_a_size_option_takes_the_units_its_help_shows(capsys, f):
    assert [f.name for f in SIZES] == ["row_group_bytes", "sort_window_bytes"]
    parser = build_parser()
    for text, size in (("64MiB", 64 << 20), ("2 GiB", 2 << 30), ("1.5KiB", 1536), ("500MB", 500_000_000), ("4096", 4096)):
        assert getattr(config_from_args(parser.parse_args(["build", flag_of(f.name), text])), f.name) == size, text
    with pytest.raises(SystemExit):
        parser.parse_args(["build", flag_of(f.name), "lots"])
    assert f"argument {flag_of(f.name)}: expected a number of bytes or a size like 64MiB or 4GiB, got 'lots'" in capsys.readouterr().err


NOT_NONE = [f for f in settings() if type(None) not in getattr(HINTS[f.name], "__args__", ())]


@pytest.mark.parametrize("f", NOT_NONE, ids=[f.name for f in NOT_NONE])
def test_none_is_refused_for_a_setting_that_has_no_none(tmp_path, f):
    """From the API (settings gathered with None for "not given"): refused before any work, not a KeyError
    at the card once every shard is written (`target_format`) or a ValueError once the target is loaded."""
    base = BuildConfig(target_model="tiny-llama", input_data="sample-chats", output_dir=str(tmp_path / "out"))
    if f.metadata["choices"]:
        expected = f"one of {', '.join(f.metadata['choices'])}"
    elif f.metadata["minimum"] is not None:
        expected = f"an integer >= {f.metadata['minimum']}"
    else:
        expected = {bool: "True or False", int: "an integer", str: "a value"}[HINTS[f.name]]
    hint = "Pass one" if f.default is dataclasses.MISSING else f"Leave it out for its default, {f.default!r}"
    with pytest.raises(ConfigError, match=rf"^{flag_of(f.name)}: expected {re.escape(expected)}, got None. {re.escape(hint)}.$"):
        validate(base.replace(**{f.name: None}))


def test_the_cli_skips_the_interpreters_final_collection(tmp_path):
    """Any command, even one that stops at --help, leaves every object frozen when the process exits,
    so the exit does not walk what torch, transformers and datasets created."""
    import os
    import subprocess
    import sys

    probe = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count()))\n"  # runs after the CLI's (LIFO)
        "from builder.cli import main\n"
        "main(['build', '--help'])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    frozen = re.search(r"frozen at exit: (\d+)", done.stdout)
    assert frozen is not None, done.stdout[-500:] + done.stderr[-2000:]
    assert int(frozen.group(1)) > 10_000  # argparse, builder and their imports at the least


def test_a_build_runs_with_its_startup_objects_frozen_and_gives_them_back(monkeypatch):
    """The collector stays on during a build but skips what the startup imports made; afterwards the
    caller's collector is as it was: nothing frozen, collection enabled."""
    import gc
    import sys

    from builder import cli

    seen = {}

    def record(args):
        seen.update(frozen=gc.get_freeze_count(), enabled=gc.isenabled(), imported=[m for m in cli.MODEL_IMPORTS if m in sys.modules])
        return 0

    monkeypatch.setattr(cli, "report_build", record)
    assert gc.get_freeze_count() == 0
    assert main(["build"]) == 0
    assert seen["frozen"] > 10_000 and seen["enabled"] is True
    assert seen["imported"] == list(cli.MODEL_IMPORTS)
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    gc.freeze()  # a caller that freezes objects itself keeps them frozen
    try:
        frozen = gc.get_freeze_count()
        assert main(["build"]) == 0
        assert gc.get_freeze_count() > frozen * 0.9  # not unfrozen (0); a few may have been freed since
    finally:
        gc.unfreeze()


def test_quiet_builds_draw_no_progress_bar(tmp_path, capsys):
    """--quiet silences the libraries' bars too: no "Loading weights" bar from transformers."""
    flags = ["--quiet", "--max-samples", "4", "--seq-length", "64", "--draft-vocab-size", "200"]
    code = main(["build", *flags, "--output-dir", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "Loading weights" not in captured.err and "it/s]" not in captured.err, captured.err[-2000:]


def test_path_settings_expand_the_home_folder_as_the_shell_does(tmp_path, monkeypatch):
    """`~` in a path given to the Python API means the home folder, as the command line's shell reads it: not a
    folder named `~` under the working directory. Names that are not paths (a Hub id, an embedded name, a JSON
    device map) are left as they are."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "template.jinja").write_text("{{ messages }}")
    cfg = BuildConfig(
        target_model="~/models/llama",
        input_data="~/chats.jsonl",
        output_dir="~/caches/x",
        chat_template="~/template.jinja",
        device_map="~/map.json",
    )
    assert (cfg.target_model, cfg.input_data, cfg.output_dir, cfg.chat_template, cfg.device_map) == (
        f"{tmp_path}/models/llama",
        f"{tmp_path}/chats.jsonl",
        f"{tmp_path}/caches/x",
        f"{tmp_path}/template.jinja",
        f"{tmp_path}/map.json",
    )
    assert cfg.replace(output_dir="~/caches/y").output_dir == f"{tmp_path}/caches/y"
    named = BuildConfig(target_model="org/model", input_data="sample-chats", output_dir="out", device_map='{"": "cpu"}')
    assert (named.target_model, named.input_data, named.output_dir, named.device_map) == ("org/model", "sample-chats", "out", '{"": "cpu"}')
    validate(BuildConfig(target_model="tiny-llama", input_data="sample-chats", output_dir="~/out", chat_template="~/template.jinja"))


INTEGERS = [f for f in settings() if int in (HINTS[f.name], *getattr(HINTS[f.name], "__args__", ()))]


@pytest.mark.parametrize("f", INTEGERS, ids=[f.name for f in INTEGERS])
@pytest.mark.parametrize("flag_value", [True, False])
def test_a_bool_is_refused_for_an_integer_setting(tmp_path, f, flag_value):
    """bool is a subclass of int: `shard_size=True` must not be taken as 1 sample per shard."""
    assert {"shard_size", "batch_size", "seq_length", "draft_vocab_size", "topk", "max_samples", "writer_threads"} <= {
        f.name for f in INTEGERS
    }
    in_use = {"target_format": "topk"} if f.name == "topk" else {}
    base = BuildConfig(target_model="tiny-llama", input_data="sample-chats", output_dir=str(tmp_path / "out"), **in_use)
    minimum = f.metadata["minimum"]
    expected = "an integer" if minimum is None else f"an integer >= {minimum}"
    with pytest.raises(ConfigError, match=rf"^{flag_of(f.name)}: expected {expected}, got {flag_value}. True and False are not numbers.$"):
        validate(base.replace(**{f.name: flag_value}))


def test_a_bool_is_refused_as_an_aux_layer_id(tmp_path):
    base = BuildConfig(target_model="tiny-llama", input_data="sample-chats", output_dir=str(tmp_path / "out"))
    with pytest.raises(
        ConfigError, match=r"^--aux-layer-ids: expected integer layer ids, got \(True, 3\). True and False are not numbers.$"
    ):
        validate(base.replace(aux_layer_ids=(True, 3)))
