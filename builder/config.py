"""Build settings: one frozen record, checked before any data or weights load.

Each field of `BuildConfig` is the one definition of a setting: its type, default, help
text, command-line group and checks (`setting` metadata). `eagle3-cache build` derives
its options from these fields (builder/cli.py), so the CLI and the Python API share
every default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path

from .build_state import holds_cache
from .embedded import DEFAULT_INPUT, DEFAULT_TARGET
from .errors import ConfigError
from .files import expand_home
from .formats import AUX_DTYPES, TARGET_FORMATS
from .shards import COMPRESSIONS

DTYPES = ("bf16", "fp16", "fp32")
# Command-line option groups, in --help order: {key: title}.
SETTING_GROUPS = {
    "target": "target",
    "input": "input",
    "cache": "cache",
    "placement": "placement (targets larger than one GPU)",
    "run": "run",
    "writer": "writer",
    "upload": "upload while building",
    "hub": "hub",
}


def parse_layer_ids(text: str) -> tuple[int, ...]:
    """`--aux-layer-ids 1,13,28` (commas or spaces)."""
    try:
        return tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,13,28, got {text!r}") from None


SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
    "TIB": 1 << 40,
}


def parse_size(text: str) -> int:
    """`--row-group-bytes 64MiB`: a number of bytes, or a size in the units --help shows the default in."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a number of bytes or a size like 64MiB or 4GiB, got {text!r}")
    return int(float(match.group(1)) * SIZE_UNITS[(match.group(2) or "").upper()])


def setting(
    default=dataclasses.MISSING,
    *,
    group: str,
    help: str,
    cli_default=dataclasses.MISSING,
    shown_default=None,
    choices: tuple[str, ...] | None = None,
    minimum: int | None = None,
    metavar: str | None = None,
    parse=None,
    api_only: bool = False,
    path: bool = False,
):
    """A BuildConfig field with what the command line and `validate` need to know about it.

    `cli_default`: the command line's value for a setting the Python API requires.
    `shown_default`: what --help says the default means, where the value alone does not
    (None), or a function of the value (a size in MiB); otherwise --help shows the value itself.
    `choices`, `minimum`: checked by `validate` (a clear error, not argparse's).
    `api_only`: no command-line option.
    `path`: a leading `~` is the home folder (`expand_home`).
    """
    if group not in SETTING_GROUPS:
        raise ValueError(f"setting group {group!r}: expected one of {list(SETTING_GROUPS)}")
    if default is dataclasses.MISSING and cli_default is dataclasses.MISSING and not api_only:
        raise ValueError(f"a required setting needs a cli_default for the command line ({help!r})")
    metadata = dict(
        group=group,
        help=help,
        cli_default=cli_default,
        shown_default=shown_default,
        choices=choices,
        minimum=minimum,
        metavar=metavar,
        parse=parse,
        api_only=api_only,
        path=path,
    )
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    # ---- target
    target_model: str = setting(
        group="target", help="local model dir, Hub model id, or an embedded name", cli_default=DEFAULT_TARGET, path=True
    )
    target_revision: str | None = setting(None, group="target", help="Hub revision (branch, tag or commit) of the target")
    trust_remote_code: bool = setting(False, group="target", help="allow custom model/tokenizer code from the target repo")
    chat_template: str | None = setting(
        None,
        group="target",
        help="chat template overriding the tokenizer's: a Jinja file, or a chat_template.json",
        metavar="FILE",
        path=True,
    )
    aux_layer_ids: tuple[int, ...] | None = setting(
        None, group="target", help="decoder layers whose outputs feed the draft", shown_default="1,N//2-1,N-4", parse=parse_layer_ids
    )
    # ---- input
    input_data: str = setting(
        group="input",
        help=".json/.jsonl/.parquet file, a directory of them, a saved dataset, a Hub dataset id, or an embedded name",
        cli_default=DEFAULT_INPUT,
        path=True,
    )
    input_config: str | None = setting(
        None, group="input", help="dataset config name (a Hub dataset's, or one in a local folder's README.md configs)"
    )
    input_revision: str | None = setting(None, group="input", help="Hub revision (branch, tag or commit) of a Hub dataset --input-data")
    split: str | None = setting(None, group="input", help="dataset split", shown_default="train")
    max_samples: int | None = setting(None, group="input", help="use the first N rows of the shuffled input", minimum=1)
    shuffle_seed: int = setting(42, group="input", help="seed of the input permutation", minimum=0)
    seq_length: int = setting(2048, group="input", help="right-truncate samples to this many tokens", minimum=2)
    num_proc: int = setting(1, group="input", help="processes for tokenization", minimum=1)
    strict: bool = setting(False, group="input", help="stop on the first invalid row instead of skipping and counting it")
    # NeMo Automodel's loss-mask options (its defaults: both off, so both are supervised)
    mask_generation_prompt: bool = setting(
        False,
        group="input",
        help="leave out of the loss mask the tokens the chat template's generation prompt supplies to each assistant turn "
        "(role header, an empty <think></think>); NeMo Automodel's option of that name",
        shown_default="supervised",
    )
    mask_reasoning_content: bool = setting(
        False,
        group="input",
        help="leave the rendered reasoning_content of assistant turns out of the loss mask; NeMo Automodel's option of that name",
        shown_default="supervised",
    )
    # ---- cache
    output_dir: str = setting(group="cache", help="cache directory", cli_default="eagle3-cache-out", path=True)
    draft_vocab_size: int | None = setting(
        None, group="cache", help="draft vocabulary size", shown_default="the full target vocab", minimum=1
    )
    dtype: str = setting("bf16", group="cache", help="storage dtype of float tensors: bf16, fp16 or fp32", choices=DTYPES)
    target_format: str = setting(
        "probs",
        group="cache",
        help="probs (dense draft-vocab probs, exact), topk (the K largest log-probs), "
        "or hidden (final hidden state; logits recomputed by the reader)",
        choices=TARGET_FORMATS,
    )
    topk: int = setting(64, group="cache", help="K of --target-format topk", minimum=1)
    aux_dtype: str | None = setting(
        None,
        group="cache",
        help="storage of aux hidden states: bf16, fp16, fp32 or fp8 (e4m3, one scale per token)",
        shown_default="--dtype",
        choices=AUX_DTYPES,
    )
    store_full_head: bool = setting(
        False, group="cache", help="hidden format: store every lm_head row, so any draft vocabulary can be read without a rebuild"
    )
    shard_size: int = setting(1000, group="cache", help="samples per Parquet shard", minimum=1)
    row_group_bytes: int = setting(
        128 << 20,
        group="cache",
        help="bytes per Parquet row group: a number, or a size like 64MiB",
        shown_default=lambda v: f"{v >> 20} MiB",
        minimum=1,
        parse=parse_size,
    )
    # ---- placement
    gpus_per_target: int = setting(
        1, group="placement", help="GPUs one target replica spans; launch with --num_processes = GPUs / N", minimum=1
    )
    max_memory_per_gpu: str | None = setting(
        None, group="placement", help="memory budget per GPU, e.g. 70GiB: leaves room for activations", shown_default="the GPU's total"
    )
    device_map: str | None = setting(
        None,
        group="placement",
        help='explicit placement: accelerate\'s "auto", "balanced", "balanced_low_0" or "sequential", a JSON object {module: device}, '
        "or a JSON file",
        path=True,
    )
    # ---- run
    batch_size: int = setting(8, group="run", help="max samples per forward batch", minimum=1)
    max_tokens_per_batch: int | None = setting(
        None, group="run", help="token budget per forward batch, padding included", shown_default="batch size x seq length"
    )
    sort_window_bytes: int = setting(
        4 << 30,
        group="run",
        help="host memory for the rows sorted by length before batching (rows are written in build order; a size like 8GiB): "
        "bigger pads less",
        shown_default=lambda v: f"{v >> 30} GiB",
        minimum=1,
        parse=parse_size,
    )
    resume: bool = setting(False, group="run", help="continue an interrupted build in --output-dir (identity must match)")
    dry_run: bool = setting(False, group="run", help="print the plan (samples, tokens, vocab coverage, sizes) and write nothing")
    # ---- writer: compression shapes the bytes (identity); threads only the speed
    compression: str = setting(
        "zstd", group="writer", help="zstd (lossless: byte planes + zstd, decoded bit-exact) or none", choices=COMPRESSIONS
    )
    writer_threads: int | None = setting(
        None,
        group="writer",
        help="threads encoding and compressing rows per process",
        shown_default="this process's share of the cores, at most 8",
        minimum=1,
    )
    # ---- upload each shard as soon as it is written, then card and tag
    push_to_hub: str | None = setting(
        None,
        group="upload",
        help="upload each shard to this Hub dataset repo as soon as it is written; card and tag last",
        metavar="REPO_ID",
    )
    delete_local_after_upload: bool = setting(
        False, group="upload", help="remove each shard locally once uploaded: local disk for only a few shards"
    )
    # ---- hub (shared with `eagle3-cache push`)
    hub_config: str | None = setting(
        None,
        group="hub",
        help="put the cache in sub-folder NAME as config NAME (several caches per repo)",
        shown_default="the repo root",
        metavar="NAME",
    )
    hub_branch: str = setting("main", group="hub", help="branch to commit to, created from main if missing")
    hub_tag: str | None = setting(None, group="hub", help="tag naming this version, created only once every file is committed")
    private: bool = setting(
        False, group="hub", help="create the repo private (without it: the namespace's default visibility; an existing repo keeps its own)"
    )

    def __post_init__(self):
        # The Python API reads `~/caches/x` as the command line's shell does (frozen: set once, here)
        for f in settings():
            if f.metadata["path"]:
                object.__setattr__(self, f.name, expand_home(getattr(self, f.name)))

    def replace(self, **changes) -> BuildConfig:
        return dataclasses.replace(self, **changes)

    @property
    def storage_aux_dtype(self) -> str:
        return self.aux_dtype or self.dtype

    @property
    def token_budget(self) -> int:
        """Tokens per forward batch (padding included): the default keeps --batch-size full-length rows."""
        return self.max_tokens_per_batch or self.batch_size * self.seq_length


def settings() -> tuple[dataclasses.Field, ...]:
    """BuildConfig's fields, in command-line order."""
    return dataclasses.fields(BuildConfig)


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(cfg: BuildConfig) -> None:
    """Checks that need nothing but the flags themselves."""
    _check_declared(cfg)
    if cfg.max_memory_per_gpu is not None:
        from .placement import parse_bytes

        parse_bytes(cfg.max_memory_per_gpu)
    if cfg.device_map is not None:
        from .placement import read_device_map

        read_device_map(cfg.device_map)
    if cfg.row_group_bytes > 1 << 30:  # a column of one row group must stay under Arrow's 2 GiB offsets
        raise ConfigError("--row-group-bytes", cfg.row_group_bytes, "at most 1 GiB (1073741824)")
    if cfg.max_tokens_per_batch is not None and cfg.max_tokens_per_batch < cfg.seq_length:
        raise ConfigError(
            "--max-tokens-per-batch",
            cfg.max_tokens_per_batch,
            f"at least --seq-length ({cfg.seq_length})",
            "A batch must hold at least one full-length sample.",
        )
    if cfg.draft_vocab_size is not None and cfg.target_format == "topk" and cfg.topk > cfg.draft_vocab_size:
        raise ConfigError("--topk", cfg.topk, f"at most --draft-vocab-size ({cfg.draft_vocab_size})")
    if cfg.aux_layer_ids is not None:
        if not cfg.aux_layer_ids:
            raise ConfigError("--aux-layer-ids", cfg.aux_layer_ids, "at least one layer id")
        if any(isinstance(i, bool) for i in cfg.aux_layer_ids):
            raise ConfigError("--aux-layer-ids", cfg.aux_layer_ids, "integer layer ids", NOT_A_NUMBER)
        if len(set(cfg.aux_layer_ids)) != len(cfg.aux_layer_ids):
            raise ConfigError("--aux-layer-ids", list(cfg.aux_layer_ids), "distinct layer ids", "Remove the duplicates.")
    if cfg.chat_template is not None and not Path(cfg.chat_template).is_file():
        found = "It is a folder: name the template file in it." if Path(cfg.chat_template).is_dir() else "The file does not exist."
        raise ConfigError("--chat-template", cfg.chat_template, "a path to a Jinja template file or a chat_template.json", found)
    if cfg.delete_local_after_upload and not cfg.push_to_hub:
        raise ConfigError("--delete-local-after-upload", True, "--push-to-hub REPO_ID as well", "Without a push the shards would be lost.")
    _check_flags_have_their_use(cfg)
    _check_flags_not_overridden(cfg)
    _check_target_revision(cfg)
    _check_input_revision(cfg)
    _check_push_target(cfg)
    _check_output_dir(cfg)


# A setting that only means something alongside another: {field: (is it in use, the flag it needs, why)}
DEPENDENT_SETTINGS = {
    "topk": (lambda cfg: cfg.target_format == "topk", "--target-format topk", "Other formats store no top K."),
    "store_full_head": (lambda cfg: cfg.target_format == "hidden", "--target-format hidden", "Only hidden caches store head rows."),
    **{
        name: (lambda cfg: bool(cfg.push_to_hub), "--push-to-hub REPO_ID", "To publish a finished cache, pass it to `eagle3-cache push`.")
        for name in ("hub_config", "hub_branch", "hub_tag", "private")
    },
}


def _check_flags_have_their_use(cfg: BuildConfig) -> None:
    """A setting given a value of its own (not its default) where nothing reads it is refused rather
    than silently ignored: the user meant something the build would not do."""
    defaults = {f.name: f.default for f in settings()}
    for name, (in_use, needed, why) in DEPENDENT_SETTINGS.items():
        value = getattr(cfg, name)
        if value != defaults[name] and not in_use(cfg):
            raise ConfigError(flag_of(name), value, f"{needed} as well", f"Without it the flag is ignored. {why}")


# A setting that another one, when given, makes meaningless: {field: (the other field, why)}
OVERRIDDEN_SETTINGS = {
    name: ("device_map", "--device-map places the target as it says, so the flag would be ignored and recorded as if it had.")
    for name in ("gpus_per_target", "max_memory_per_gpu")
}


def _check_flags_not_overridden(cfg: BuildConfig) -> None:
    """A setting given a value of its own where another setting decides instead is refused, naming both."""
    defaults = {f.name: f.default for f in settings()}
    for name, (other, why) in OVERRIDDEN_SETTINGS.items():
        value = getattr(cfg, name)
        if value != defaults[name] and getattr(cfg, other) != defaults[other]:
            raise ConfigError(flag_of(name), value, f"no {flag_of(other)} alongside it", f"{why} Leave out one of the two.")


def _check_target_revision(cfg: BuildConfig) -> None:
    """A revision names a commit of a Hub model: a local or embedded target has none, and the manifest
    would record none."""
    if cfg.target_revision is None:
        return
    from .embedded import resolve_target

    if Path(resolve_target(cfg.target_model)).exists():
        raise ConfigError(
            "--target-revision",
            cfg.target_revision,
            "a Hub model id as --target-model",
            f"{cfg.target_model!r} is a local directory or an embedded target, which has no revisions, so the flag would "
            "be ignored (the manifest records a local target's files' hashes instead). Leave it out, or pass the Hub id "
            "of the model to build from that revision.",
        )


def _check_input_revision(cfg: BuildConfig) -> None:
    """A revision names a commit of a Hub dataset: a local or embedded input has none (its files' content is
    hashed instead)."""
    if cfg.input_revision is None:
        return
    from .embedded import resolve_input
    from .inputs import is_local

    if is_local(resolve_input(cfg.input_data)):
        raise ConfigError(
            "--input-revision",
            cfg.input_revision,
            "a Hub dataset id as --input-data",
            f"{cfg.input_data!r} is a local path or an embedded input, which has no revisions, so the flag would be "
            "ignored (the manifest records a local input's content hash instead). Leave it out, or pass the Hub id of "
            "the dataset to read it at that revision.",
        )


def _check_push_target(cfg: BuildConfig) -> None:
    """--push-to-hub: the repo id, config, branch and tag names and a token's presence, which need no
    network, are checked with the other flags, not once the input is tokenized (a dry run too)."""
    if not cfg.push_to_hub:
        return
    from .push_target import PushTarget, validate_target

    validate_target(PushTarget(cfg.push_to_hub, config=cfg.hub_config, branch=cfg.hub_branch, tag=cfg.hub_tag, private=cfg.private))


def _check_declared(cfg: BuildConfig) -> None:
    """Each setting's declared `minimum` and `choices`, an integer setting's type (a bool is none); None only where
    the setting's type has it (unset)."""
    hints = typing.get_type_hints(BuildConfig)
    for f in settings():
        value = getattr(cfg, f.name)
        if value is None:
            if type(None) not in typing.get_args(hints[f.name]):
                _refuse_none(f, hints[f.name])
            continue
        if int in (hints[f.name], *typing.get_args(hints[f.name])):
            _an_integer(flag_of(f.name), value, f.metadata["minimum"])
        if f.metadata["choices"] is not None and value not in f.metadata["choices"]:
            raise ConfigError(flag_of(f.name), value, f"one of {', '.join(f.metadata['choices'])}")


def _refuse_none(f: dataclasses.Field, hint) -> None:
    """None given for a setting that has no None (settings gathered with None for "not given"), refused before
    it reaches the build: there it failed late, as the card of a `--target-format` None once every shard was written."""
    if f.metadata["choices"] is not None:
        expected = f"one of {', '.join(f.metadata['choices'])}"
    elif f.metadata["minimum"] is not None:
        expected = f"an integer >= {f.metadata['minimum']}"
    else:
        expected = {bool: "True or False", int: "an integer"}.get(hint, "a value")
    advice = "Pass one" if f.default is dataclasses.MISSING else f"Leave it out for its default, {f.default!r}"
    raise ConfigError(flag_of(f.name), None, expected, f"{advice}.")


NOT_A_NUMBER = "True and False are not numbers."


def _an_integer(flag: str, value, minimum: int | None) -> None:
    """bool is a subclass of int: `shard_size=True` would otherwise be taken as 1."""
    expected = "an integer" if minimum is None else f"an integer >= {minimum}"
    if isinstance(value, bool):
        raise ConfigError(flag, value, expected, NOT_A_NUMBER)
    if not isinstance(value, int) or (minimum is not None and value < minimum):
        raise ConfigError(flag, value, expected)


def _check_output_dir(cfg: BuildConfig) -> None:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError("--output-dir", cfg.output_dir, "a directory (or a path to create)", "It is a file.")
    blocking = next((p for p in out.absolute().parents if p.exists() and not p.is_dir()), None)
    if not out.exists() and blocking is not None:
        raise ConfigError("--output-dir", cfg.output_dir, "a directory (or a path to create)", f"{blocking} is a file, not a folder.")
    if cfg.dry_run:
        return
    if (out / "README.md").exists() and not holds_cache(out):
        raise ConfigError(
            "--output-dir",
            cfg.output_dir,
            "an empty or new directory, or an eagle3-cache build to resume",
            "It holds a README.md that is not an eagle3-cache card, which the build's card would replace; choose another directory.",
        )
    if holds_cache(out) and not cfg.resume:
        raise ConfigError(
            "--output-dir",
            cfg.output_dir,
            "an empty or new directory",
            "It already holds an eagle3-cache build; pass --resume to continue it, or choose another directory.",
        )
    if out.is_dir() and not os.access(out, os.W_OK):
        raise ConfigError("--output-dir", cfg.output_dir, "a writable directory", "Check its permissions.")
    if not out.exists():
        _check_creatable(cfg.output_dir, out)


def _check_creatable(flag_value: str, out: Path) -> None:
    """A new --output-dir is created inside its nearest existing folder: one this process cannot write
    to is refused now, not once the input is tokenized and the lock file cannot be created."""
    ancestor = next(p for p in out.absolute().parents if p.exists())
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(
            "--output-dir",
            flag_value,
            "a directory this build can create (a path under a folder it can write to)",
            f"{ancestor}, the nearest folder of it that exists, is not writable. Choose a writable --output-dir.",
        )


def resolve_aux_layer_ids(requested: tuple[int, ...] | None, num_layers: int) -> list[int]:
    """Default `[1, N//2 - 1, N - 4]` (NeMo Automodel / SpecForge); any distinct in-range ids otherwise."""
    if requested is None:
        if num_layers < 7:
            raise ConfigError(
                "--aux-layer-ids",
                None,
                f"explicit ids for a target with only {num_layers} layers",
                "The default [1, N//2-1, N-4] needs at least 7 layers to give three distinct layers.",
            )
        return [1, num_layers // 2 - 1, num_layers - 4]
    bad = [i for i in requested if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(
            "--aux-layer-ids",
            list(requested),
            f"ids in [0, {num_layers - 1}] (the target has {num_layers} decoder layers)",
            f"Out of range: {bad}.",
        )
    return list(requested)
