"""What a build hands `assemble_manifest`, given directly: no data, no model, no forward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tiny_targets import tiny_tokenizer
from transformers import LlamaConfig

from builder.config import BuildConfig
from builder.files import write_bytes_atomic
from builder.manifest import FORMAT_VERSION, VOCAB_FILE
from builder.prepare import Prepared

VOCAB_SIZE = 1024  # the tiny tokenizer's
HIDDEN = 16
VOCAB_BYTES = b"the vocab file's bytes"
IDENTITY = {
    "format_version": FORMAT_VERSION,
    "target": {"model": "tiny-llama", "revision": None},
    "seq_length": 32,
    "aux_layer_ids": [1, 2, 4],
    "aux_convention": "the output of each decoder layer",
    "draft_vocab_size": 4,
    "dtype": "bf16",
    "target_format": "topk",
    "selected_token_ids_sha256": "0" * 64,
}
TOKEN_COUNTS = np.zeros(VOCAB_SIZE, dtype=np.int64)
TOKEN_COUNTS[[5, 6, 7, 8, 9]] = [40, 30, 20, 6, 4]  # 100 loss-masked tokens
SELECTED = np.array([0, 1, 5, 6], dtype=np.int64)  # 70 of them in the draft vocab
SHARDS = [  # the sidecars of two finished shards
    {
        "name": "train-00000-of-00002.parquet",
        "rows": 3,
        "bytes": 1000,
        "checksum": "a" * 32,
        "tokens": 60,
        "loss_tokens": 20,
        "argmax_in_vocab": 15,
        "failed": [{"sample_id": "s7", "source_index": 7, "shard": "train-00000-of-00002.parquet", "reason": "non_finite_output"}],
    },
    {
        "name": "train-00001-of-00002.parquet",
        "rows": 2,
        "bytes": 600,
        "checksum": "b" * 32,
        "tokens": 40,
        "loss_tokens": 20,
        "argmax_in_vocab": 19,
    },
]


def prepared(out: Path, identity: dict = IDENTITY) -> Prepared:
    cfg = BuildConfig(
        target_model="tiny-llama", input_data="conversations.jsonl", output_dir=str(out), target_format="topk", topk=2, batch_size=4
    )
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, num_hidden_layers=6, num_attention_heads=2)
    return Prepared(
        cfg=cfg,
        model_path="tiny-llama",
        tokenizer=tiny_tokenizer(),
        model_config=config,
        aux_layer_ids=[1, 2, 4],
        samples=None,  # the manifest is assembled from the records below, not from the samples
        skipped={"too_long": 2, "no_assistant_turn": 1},
        token_counts=TOKEN_COUNTS,
        selected_token_ids=SELECTED,
        special_token_ids=[0, 1, 2, 3],  # the tiny tokenizer's bos, eos, pad, unk
        identity=identity,
        duplicate_ids=1,
    )


def write_vocab_file(out: Path) -> None:
    write_bytes_atomic(Path(out) / VOCAB_FILE, VOCAB_BYTES)
