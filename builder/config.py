"""Build settings: one frozen record, checked before any data or weights load."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .formats import AUX_DTYPES, TARGET_FORMATS

DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class BuildConfig:
    target_model: str
    input_data: str
    output_dir: str
    target_revision: str | None = None
    input_config: str | None = None
    split: str | None = None
    max_samples: int | None = None
    shuffle_seed: int = 42
    seq_length: int = 2048
    draft_vocab_size: int | None = None
    batch_size: int = 8
    max_tokens_per_batch: int | None = None
    shard_size: int = 1000
    dtype: str = "bf16"
    aux_layer_ids: tuple[int, ...] | None = None
    target_format: str = "probs"
    topk: int = 64
    aux_dtype: str | None = None  # None: the same as dtype
    store_full_head: bool = False  # hidden format: all lm_head rows, so any draft vocab can be read
    row_group_bytes: int = 128 << 20
    resume: bool = False
    strict: bool = False
    dry_run: bool = False
    trust_remote_code: bool = False
    chat_template: str | None = None
    # NeMo Automodel's loss-mask options (its defaults: both off, so both are supervised)
    mask_generation_prompt: bool = False  # drop the tokens the generation prompt supplies (role header)
    mask_reasoning_content: bool = False  # drop the rendered reasoning_content
    num_proc: int = 1
    gpus_per_target: int = 1
    max_memory_per_gpu: str | None = None
    device_map: str | None = None
    push_to_hub: str | None = None  # upload each shard as soon as it is written, then card and tag
    hub_config: str | None = None
    hub_branch: str = "main"
    hub_tag: str | None = None
    private: bool = False
    delete_local_after_upload: bool = False
    # writer: compression shapes the bytes (identity); threads only the speed
    compression: str = "zstd"
    writer_threads: int | None = None  # None: this process's share of the host's cores, at most 8

    def replace(self, **changes) -> BuildConfig:
        return dataclasses.replace(self, **changes)

    @property
    def storage_aux_dtype(self) -> str:
        return self.aux_dtype or self.dtype

    @property
    def token_budget(self) -> int:
        """Tokens per forward batch (padding included): the default keeps --batch-size full-length rows."""
        return self.max_tokens_per_batch or self.batch_size * self.seq_length


def validate(cfg: BuildConfig) -> None:
    """Checks that need nothing but the flags themselves."""
    _at_least("--seq-length", cfg.seq_length, 2)
    _at_least("--batch-size", cfg.batch_size, 1)
    _at_least("--shard-size", cfg.shard_size, 1)
    _at_least("--num-proc", cfg.num_proc, 1)
    _at_least("--gpus-per-target", cfg.gpus_per_target, 1)
    if cfg.max_memory_per_gpu is not None:
        from .placement import parse_bytes

        parse_bytes(cfg.max_memory_per_gpu)
    _at_least("--row-group-bytes", cfg.row_group_bytes, 1)
    if cfg.row_group_bytes > 1 << 30:  # a column of one row group must stay under Arrow's 2 GiB offsets
        raise ConfigError("--row-group-bytes", cfg.row_group_bytes, "at most 1 GiB (1073741824)")
    _at_least("--shuffle-seed", cfg.shuffle_seed, 0)
    if cfg.max_samples is not None:
        _at_least("--max-samples", cfg.max_samples, 1)
    if cfg.draft_vocab_size is not None:
        _at_least("--draft-vocab-size", cfg.draft_vocab_size, 1)
    if cfg.max_tokens_per_batch is not None and cfg.max_tokens_per_batch < cfg.seq_length:
        raise ConfigError(
            "--max-tokens-per-batch",
            cfg.max_tokens_per_batch,
            f"at least --seq-length ({cfg.seq_length})",
            "A batch must hold at least one full-length sample.",
        )
    if cfg.dtype not in DTYPES:
        raise ConfigError("--dtype", cfg.dtype, f"one of {', '.join(DTYPES)}")
    if cfg.target_format not in TARGET_FORMATS:
        raise ConfigError("--target-format", cfg.target_format, f"one of {', '.join(TARGET_FORMATS)}")
    if cfg.aux_dtype is not None and cfg.aux_dtype not in AUX_DTYPES:
        raise ConfigError("--aux-dtype", cfg.aux_dtype, f"one of {', '.join(AUX_DTYPES)}")
    _at_least("--topk", cfg.topk, 1)
    if cfg.draft_vocab_size is not None and cfg.target_format == "topk" and cfg.topk > cfg.draft_vocab_size:
        raise ConfigError("--topk", cfg.topk, f"at most --draft-vocab-size ({cfg.draft_vocab_size})")
    if cfg.aux_layer_ids is not None:
        if not cfg.aux_layer_ids:
            raise ConfigError("--aux-layer-ids", cfg.aux_layer_ids, "at least one layer id")
        if len(set(cfg.aux_layer_ids)) != len(cfg.aux_layer_ids):
            raise ConfigError("--aux-layer-ids", list(cfg.aux_layer_ids), "distinct layer ids", "Remove the duplicates.")
    if cfg.chat_template is not None and not Path(cfg.chat_template).is_file():
        raise ConfigError("--chat-template", cfg.chat_template, "a path to a Jinja template file", "The file does not exist.")
    if cfg.delete_local_after_upload and not cfg.push_to_hub:
        raise ConfigError("--delete-local-after-upload", True, "--push-to-hub REPO_ID as well", "Without a push the shards would be lost.")
    _validate_writer(cfg)
    _check_output_dir(cfg)


def _validate_writer(cfg: BuildConfig) -> None:
    from .shards import COMPRESSIONS

    if cfg.compression not in COMPRESSIONS:
        raise ConfigError("--compression", cfg.compression, f"one of {', '.join(COMPRESSIONS)}")
    if cfg.writer_threads is not None:
        _at_least("--writer-threads", cfg.writer_threads, 1)


def _at_least(flag: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or value < minimum:
        raise ConfigError(flag, value, f"an integer >= {minimum}")


def _check_output_dir(cfg: BuildConfig) -> None:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError("--output-dir", cfg.output_dir, "a directory (or a path to create)", "It is a file.")
    if cfg.dry_run:
        return
    if holds_cache(out) and not cfg.resume:
        raise ConfigError(
            "--output-dir",
            cfg.output_dir,
            "an empty or new directory",
            "It already holds an eagle3-cache build; pass --resume to continue it, or choose another directory.",
        )
    if out.is_dir() and not os.access(out, os.W_OK):
        raise ConfigError("--output-dir", cfg.output_dir, "a writable directory", "Check its permissions.")


def holds_cache(out: Path) -> bool:
    from .build_state import BUILD_STATE_FILE

    return (out / BUILD_STATE_FILE).exists() or (out / "README.md").exists() or any(out.glob("data/*.parquet"))


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
