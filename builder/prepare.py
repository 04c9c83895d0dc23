"""Everything before the target's weights load: flags, tokenizer, config, input rows,
tokenization, bad-row accounting, draft vocabulary and the build's identity."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from . import __version__
from .build_state import read_identity
from .config import BuildConfig, resolve_aux_layer_ids, validate
from .embedded import resolve_input, resolve_target
from .errors import BadRowError, ConfigError, InputError
from .fingerprints import WEIGHTS_FILES, local_code_hash, local_config_hash, local_weights_sample_hash, names_custom_code, same_weights
from .inputs import load_rows, select_rows
from .manifest import FORMAT_VERSION
from .target import AUX_CONVENTION, load_config, load_tokenizer, resolved_revision, text_config
from .tokenize import read_template_file, recorded_tokenizer_hashes, template_bytes, template_of, tokenize_rows, tokenizer_hash
from .vocab import (
    PAD_ID_WITHOUT_PAD_TOKEN,
    array_hash,
    count_loss_tokens,
    earlier_special_token_ids,
    select_draft_vocab,
    special_token_ids,
)

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    cfg: BuildConfig
    model_path: str
    tokenizer: object
    model_config: object
    aux_layer_ids: list[int]
    samples: datasets.Dataset  # valid tokenized samples, in build order
    skipped: dict[str, int]
    token_counts: np.ndarray  # [V] loss-masked token counts
    selected_token_ids: np.ndarray  # [Vd]
    special_token_ids: list[int]  # the ids selected_token_ids starts with, as the card records them
    identity: dict
    duplicate_ids: int = 0  # valid samples whose sample_id an earlier valid sample already has
    tokenizer_hashes: frozenset[str] = frozenset()  # those a build of this tokenizer may have recorded (recorded_tokenizer_hashes)
    input_hashes: frozenset[str] = frozenset()  # those a build of this input may have recorded: an earlier version's, of a Hub input
    input_revision: str | None = None  # the Hub dataset commit read; not in the identity, which hashes the data files read
    # Those a build of the same Hub input recorded for rows whose text `datasets` changed (its Json columns), which this
    # run reads row by row: its resume is refused, saying so
    altered_input_hashes: frozenset[str] = frozenset()

    @property
    def vocab_size(self) -> int:
        return text_config(self.model_config).vocab_size

    @property
    def hidden_size(self) -> int:
        return text_config(self.model_config).hidden_size

    @property
    def layout(self):
        from .formats import Layout

        cfg = self.cfg
        return Layout(
            cfg.target_format,
            cfg.dtype,
            cfg.storage_aux_dtype,
            min(cfg.topk, len(self.selected_token_ids)),
            len(self.selected_token_ids),
            len(self.aux_layer_ids) * self.hidden_size,
            self.hidden_size,
        )

    @property
    def num_shards(self) -> int:
        return -(-len(self.samples) // self.cfg.shard_size)


def prepare(cfg: BuildConfig) -> Prepared:
    validate(cfg)
    model_path = resolve_target(cfg.target_model)
    model_config = load_config(model_path, cfg.target_revision, cfg.trust_remote_code)
    tokenizer = load_tokenizer(model_path, cfg.target_revision, cfg.trust_remote_code, config=model_config)
    num_layers = text_config(model_config).num_hidden_layers
    aux_layer_ids = resolve_aux_layer_ids(cfg.aux_layer_ids, num_layers)
    check_decoder_layers(model_config, cfg.trust_remote_code)
    target = target_identity(cfg, model_path, model_config, tokenizer)  # before tokenizing: it can refuse the target
    template = template_of(tokenizer, read_template_file(cfg.chat_template) if cfg.chat_template else None)

    rows, input_info = load_rows(resolve_input(cfg.input_data), config=cfg.input_config, split=cfg.split, revision=cfg.input_revision)
    rows, source_indices = select_rows(rows, cfg.shuffle_seed, cfg.max_samples)
    tokenized = tokenize_rows(
        rows,
        source_indices,
        tokenizer,
        template,
        cfg.seq_length,
        cfg.num_proc,
        mask_generation_prompt=cfg.mask_generation_prompt,
        mask_reasoning_content=cfg.mask_reasoning_content,
    )
    samples, skipped = split_valid(tokenized, cfg.strict)
    duplicates = count_duplicate_ids(samples)
    check_context_length(cfg, model_config, samples)

    vocab_size = text_config(model_config).vocab_size
    counts = count_loss_tokens(samples, vocab_size)
    specials, selected = draft_vocabulary(cfg, tokenizer, counts, vocab_size)
    check_topk(cfg, len(selected), vocab_size)
    identity = build_identity(cfg, target, tokenizer, template, input_info, aux_layer_ids, selected)
    prepared = Prepared(
        cfg,
        model_path,
        tokenizer,
        model_config,
        aux_layer_ids,
        samples,
        skipped,
        counts,
        selected,
        specials,
        identity,
        duplicates,
        recorded_tokenizer_hashes(tokenizer, template),
        frozenset(input_info.get("earlier_content_hashes", ())),
        input_info.get("revision"),
        frozenset(input_info.get("altered_content_hashes", ())),
    )
    check_row_sizes(prepared)
    return prepared


def draft_vocabulary(cfg: BuildConfig, tokenizer, counts: np.ndarray, vocab_size: int) -> tuple[list[int], np.ndarray]:
    """(special ids, `selected_token_ids`). A resumed build that an earlier version began for a
    tokenizer without a pad token selected its vocabulary without pad id 0: its shards hold
    supervision over that vocabulary, so it continues with it rather than mix two in one cache."""
    specials = special_token_ids(tokenizer, vocab_size)
    selected = select_draft_vocab(counts, cfg.draft_vocab_size, specials)
    earlier = earlier_special_token_ids(tokenizer, vocab_size)
    if not cfg.resume or earlier == specials:
        return specials, selected
    recorded = (read_identity(Path(cfg.output_dir)) or {}).get("selected_token_ids_sha256")
    earlier_selected = select_draft_vocab(counts, cfg.draft_vocab_size, earlier)
    if recorded == array_hash(selected) or recorded != array_hash(earlier_selected):
        return specials, selected  # this version's vocabulary, or another build (refused by check_resume)
    log.warning(
        "--resume: the build in %s began with an earlier version's draft vocabulary: the tokenizer has no pad token, and "
        "that version gave it no pad id among the special ids, where this one gives it id %d as NeMo Automodel does. "
        "The resume continues with the vocabulary its shards were written with; build into a new --output-dir for NeMo's",
        cfg.output_dir,
        PAD_ID_WITHOUT_PAD_TOKEN,
    )
    return earlier, earlier_selected


def check_context_length(cfg: BuildConfig, model_config, samples: datasets.Dataset) -> None:
    """A sample longer than the target's context: refused where positions are learned (the position
    table has no row for it, and the forward would fail mid-build); otherwise (rotary positions, or
    none at all) the target runs, but its supervision past the trained context is extrapolated."""
    config = text_config(model_config)
    context = getattr(config, "max_position_embeddings", None)
    longest = max(samples["num_tokens"], default=0)
    if not isinstance(context, int) or longest <= context:
        return
    if has_position_table(model_config, context, cfg.trust_remote_code):
        raise ConfigError(
            "--seq-length",
            cfg.seq_length,
            f"at most the target's context of {context} tokens (max_position_embeddings): it learned one position embedding per position",
            f"The longest sample has {longest} tokens after truncation; lower --seq-length to {context}.",
        )
    log.warning(
        "--seq-length %d: the longest sample has %d tokens, past the target's context of %d (max_position_embeddings); "
        "the target runs past it (it has no table of learned positions), but its supervision there is extrapolated, "
        "not what it was trained on. Lower --seq-length to %d to keep every position within the context",
        cfg.seq_length,
        longest,
        context,
        context,
    )


def weightless_target(model_config, trust_remote_code: bool, purpose: str):
    """The target's module tree on the meta device, or None where it cannot be built here (it is then
    not refused on a guess: what `purpose` looks for is checked once the weights load, or not at all)."""
    from .placement import meta_model

    try:
        return meta_model(model_config, trust_remote_code)
    except Exception as err:  # noqa: BLE001 - only decides whether a check runs before the weights load
        log.debug("could not build the target on the meta device to %s: %r", purpose, err)
        return None


def check_decoder_layers(model_config, trust_remote_code: bool) -> None:
    """Refuse, before the input or the weights load, a target whose decoder layers (where the aux
    states are captured) cannot be found."""
    from .target import decoder_layers

    model = weightless_target(model_config, trust_remote_code, "find its decoder layers")
    if model is not None:
        decoder_layers(model, text_config(model_config).num_hidden_layers)


def has_position_table(model_config, context: int, trust_remote_code: bool) -> bool:
    """Learned absolute positions (OPT, GPT-2): an embedding table of about `context` rows beside the
    token embeddings, found in a weightless copy of the model. Rotary, ALiBi and state-space models
    have none; a model that cannot be built here is not refused on a guess."""
    import torch

    model = weightless_target(model_config, trust_remote_code, "look for a position table")
    if model is None:
        return False
    vocab = text_config(model_config).vocab_size
    tables = (m for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.num_embeddings != vocab)
    return any(context <= table.num_embeddings <= context + 2 for table in tables)  # OPT keeps 2 offset rows


def check_topk(cfg: BuildConfig, draft_vocab_size: int, vocab_size: int) -> None:
    """K of --target-format topk must fit the draft vocabulary as resolved (the whole target
    vocabulary without --draft-vocab-size, or with a larger one)."""
    if cfg.target_format != "topk" or cfg.topk <= draft_vocab_size:
        return
    if cfg.draft_vocab_size is None:
        source = f"the target's full vocabulary, {vocab_size} tokens, as no --draft-vocab-size was given"
    else:
        source = f"{draft_vocab_size} tokens: --draft-vocab-size {cfg.draft_vocab_size} capped at the target's vocabulary"
    raise ConfigError(
        "--topk",
        cfg.topk,
        f"at most the draft vocabulary size ({source})",
        f"Lower --topk to {draft_vocab_size} or less, or use --target-format probs to store the whole draft distribution.",
    )


MAX_ROW_BYTES = 2**31 - 1  # one Parquet binary value (Arrow's int32 offsets)


def check_row_sizes(prep: Prepared) -> None:
    """Refuse, before any weights load, a sample one of whose tensors could not be written: each is one
    binary value of its own column (shards.py), which Arrow's int32 offsets keep under 2 GiB."""
    from .formats import TORCH_DTYPES
    from .shards import column_encodings, max_added_bytes

    tokens = np.asarray(prep.samples["num_tokens"], dtype=np.int64)
    loss = np.asarray(prep.samples["num_loss_tokens"], dtype=np.int64)
    if not len(tokens):
        return
    columns, encodings = prep.layout.columns(), column_encodings(prep.layout, prep.cfg.compression)
    over = {}
    for name, nbytes in prep.layout.column_position_bytes().items():
        header = max_added_bytes(TORCH_DTYPES[columns[name]["dtype"]].itemsize, encodings[name])
        sizes = (tokens if columns[name]["per"] == "token" else loss) * nbytes + header
        if sizes.max() > MAX_ROW_BYTES:
            over[name] = int(sizes.argmax()), int(sizes.max())
    if not over:
        return
    found = "; ".join(
        f"a sample of {int(tokens[i])} tokens ({int(loss[i])} supervised) would store {size / 2**30:.1f} GiB in its {name}"
        for name, (i, size) in over.items()
    )
    fp8 = prep.cfg.storage_aux_dtype == "fp8"  # aux states already in 1 byte: only fewer tokens shrink them
    advice = [
        "Lower --seq-length",
        *dict.fromkeys(ROW_SIZE_ADVICE[n] for n in over if n in ROW_SIZE_ADVICE and not (fp8 and n.startswith("aux"))),
    ]
    raise ConfigError(
        "--seq-length",
        prep.cfg.seq_length,
        "samples each of whose tensors stays under Parquet's 2 GiB per value",
        f"{found[0].upper()}{found[1:]}. {', or '.join(advice)}.",
    )


# What shrinks a column's value besides a shorter --seq-length.
ROW_SIZE_ADVICE = {
    "aux_hidden_states": "store the aux states in 1 byte with --aux-dtype fp8",
    "target_probs": "lower --draft-vocab-size, or use --target-format topk or hidden",
    "topk_logprobs": "lower --topk",
    "topk_ids": "lower --topk",
    "final_hidden": "use --target-format probs or topk",
}


def split_valid(tokenized: datasets.Dataset, strict: bool) -> tuple[datasets.Dataset, dict[str, int]]:
    reasons = tokenized["skip_reason"]
    bad = [i for i, reason in enumerate(reasons) if reason]
    if bad and strict:
        row = tokenized[bad[0]]
        raise BadRowError(
            f"--strict: input row {row['source_index']} (id {row['sample_id']!r}) is invalid: "
            f"{row['skip_reason']}: {row['skip_detail']}. Fix or drop the row, or run without --strict to skip and count bad rows."
        )
    skipped = dict(sorted(Counter(reasons[i] for i in bad).items()))
    for i in bad[:5]:
        row = tokenized[i]
        log.warning("skipping input row %s: %s: %s", row["source_index"], row["skip_reason"], row["skip_detail"])
    if bad:
        log.warning("skipped %d of %d rows: %s", len(bad), len(reasons), skipped)
    if not reasons:
        raise InputError(
            "--input-data: the input holds no rows; expected at least one chat row (a JSON object per line, "
            "a JSON array of objects, or a table with 'conversations' or 'messages')"
        )
    if len(bad) == len(reasons):  # nothing to build: refuse now rather than write an empty cache
        row = tokenized[bad[0]]
        raise InputError(
            f"no usable rows: all {len(reasons)} selected rows of --input-data were skipped (by reason: {skipped}); "
            f"the first, input row {row['source_index']} (id {row['sample_id']!r}), is {row['skip_reason']}: "
            f"{row['skip_detail']}. Fix the input or the chat template (--chat-template)"
        )
    valid = np.flatnonzero(np.asarray([not r for r in reasons], dtype=bool))
    return tokenized.select(valid), skipped


def count_duplicate_ids(samples: datasets.Dataset) -> int:
    """Ids are informational (a row without one gets its source index): duplicates are kept and
    counted, since `source_index` is the key that tells samples apart."""
    ids = samples["sample_id"]
    duplicates = len(ids) - len(set(ids))
    if duplicates:
        log.warning(
            "%d of %d samples share their id with another sample; all are kept (source_index is the unique key)", duplicates, len(ids)
        )
    return duplicates


def recorded_split(input_info: dict) -> str | None:
    """Local files were read as one split before they resolved into splits, and recorded none:
    their `train` split stays recorded as None, so the builds begun before still resume."""
    split = input_info.get("split")
    return None if input_info["kind"] != "hub" and split == "train" else split


def target_identity(cfg, model_path: str, model_config, tokenizer) -> dict:
    """What the target is: a Hub id's commit, or a local folder's fingerprints; and whether the code
    of its own that it names ran (`remote_code`: None where it names none, else whether it was trusted),
    with, for a local folder, that code's hash (a Hub commit pins its code)."""
    weights = local_weights_sample_hash(model_path)
    remote_code = bool(cfg.trust_remote_code) if names_custom_code(model_config, tokenizer) else None
    return {
        "model": cfg.target_model,
        "revision": resolved_revision(model_path, cfg.target_revision),
        "config_sha256": local_config_hash(model_path),
        "weights_sample_sha256": weights,
        "weights_files": WEIGHTS_FILES if weights is not None else None,
        "remote_code": remote_code,
        "code_sha256": local_code_hash(model_path) if remote_code else None,
    }


def build_identity(cfg, target: dict, tokenizer, template, input_info, aux_layer_ids, selected) -> dict:
    """Every field that shapes the cache's bytes; equal identities build equal caches."""
    return {
        "format_version": FORMAT_VERSION,
        "target": target,
        "tokenizer_sha256": tokenizer_hash(tokenizer, template),
        "chat_template_sha256": hashlib.sha256(template_bytes(template)).hexdigest(),
        "input": {
            "data": input_info["input_data"],
            "config": input_info["config"],  # as resolved: --input-config named or left to its default
            "split": recorded_split(input_info),
            "content_hash": input_info["content_hash"],
            "shuffle_seed": cfg.shuffle_seed,
            "max_samples": cfg.max_samples,
        },
        "seq_length": cfg.seq_length,
        # NeMo Automodel's loss-mask options, as its trainer checks them against its own settings.
        # Recorded as given: NeMo applies both after either way of finding assistant tokens, so with
        # {% generation %} blocks they are applied too (and change nothing where the blocks already
        # leave the header or the reasoning out).
        "mask_generation_prompt": bool(cfg.mask_generation_prompt),
        "mask_reasoning_content": bool(cfg.mask_reasoning_content),
        "aux_layer_ids": list(aux_layer_ids),
        "aux_convention": AUX_CONVENTION,
        "draft_vocab_size": int(len(selected)),
        "selected_token_ids_sha256": array_hash(selected),
        "dtype": cfg.dtype,
        "aux_dtype": cfg.storage_aux_dtype,
        "target_format": cfg.target_format,
        "topk": cfg.topk if cfg.target_format == "topk" else None,
        "store_full_head": cfg.store_full_head if cfg.target_format == "hidden" else None,
        "shard_size": cfg.shard_size,
        "compression": cfg.compression,
        "builder_format": f"eagle3-cache {__version__.split('.')[0]}",
    }


def target_differences(manifest: dict, model_path: str, config, tokenizer) -> dict:
    """`{field: (recorded, found)}` where a target is not the one a cache was built from, by the
    identity fields its build recorded: the local config, weights and own code fingerprints (compared
    where both sides have one: a Hub target records its commit instead; a folder whose code the build
    ran must still hold that code), the vocabulary size and the tokenizer."""
    identity, recorded = manifest["identity"], manifest["identity"]["target"]
    differences = _kind_differences(recorded, model_path)
    config_hash = local_config_hash(model_path)
    if None not in (recorded.get("config_sha256"), config_hash) and recorded["config_sha256"] != config_hash:
        differences["target.config_sha256"] = (recorded["config_sha256"], config_hash)
    weights = local_weights_sample_hash(model_path)
    earlier = "weights_files" not in recorded  # fingerprinted by an earlier version
    if weights is not None and not same_weights(recorded.get("weights_sample_sha256"), model_path, by_an_earlier_version=earlier):
        differences["target.weights_sample_sha256"] = (recorded["weights_sample_sha256"], weights)
    code = local_code_hash(model_path)
    if recorded.get("code_sha256") is not None and Path(model_path).is_dir() and code != recorded["code_sha256"]:
        differences["target.code_sha256"] = (recorded["code_sha256"], code)
    vocab_size = text_config(config).vocab_size
    if vocab_size != manifest["target_vocab_size"]:
        differences["target_vocab_size"] = (manifest["target_vocab_size"], vocab_size)
    return differences | _tokenizer_differences(identity, manifest.get("special_token_ids"), tokenizer, vocab_size)


def _kind_differences(recorded: dict, model_path: str) -> dict:
    """A local folder given for a Hub build's target: the build recorded only its commit, which no
    folder's files can be matched against, so any model with the same tokenizer would pass for it."""
    if recorded.get("revision") is not None and Path(model_path).is_dir():
        return {"target.revision": (recorded["revision"], f"no commit: a local folder, not {recorded['model']!r} from the Hub")}
    return {}


def _tokenizer_differences(identity: dict, recorded_specials, tokenizer, vocab_size: int) -> dict:
    """The tokenizer's hash, which covers the chat template too: compared when the tokenizer's own
    template is the one the build rendered with; after a build with another template
    (--chat-template), the special token ids (bos, eos, pad, unk) are compared instead."""
    try:
        template = template_of(tokenizer, None)
    except InputError:  # no template of its own: the build was given one
        template = None
    if template is not None and hashlib.sha256(template_bytes(template)).hexdigest() == identity.get("chat_template_sha256"):
        if identity["tokenizer_sha256"] in recorded_tokenizer_hashes(tokenizer, template):
            return {}
        return {"tokenizer_sha256": (identity["tokenizer_sha256"], tokenizer_hash(tokenizer, template))}
    specials = special_token_ids(tokenizer, vocab_size)
    # A cache built by an earlier version recorded the specials of its rule (no pad id where the tokenizer has none).
    if recorded_specials is None or recorded_specials in (specials, earlier_special_token_ids(tokenizer, vocab_size)):
        return {}
    return {"special_token_ids": (recorded_specials, specials)}
