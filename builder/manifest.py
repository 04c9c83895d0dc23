"""The manifest: everything that shapes a cache's bytes (its identity, fingerprinted) plus what
the build produced. It lives in the dataset card's YAML under `eagle3_cache`.
"""

from __future__ import annotations

import hashlib
import json

FORMAT_VERSION = 2  # 2: column encodings (byte planes + zstd) and xxh3-128 checksums; 1: raw columns, sha256
VOCAB_FILE = "vocab/vocab.safetensors"
LM_HEAD_FILE = "vocab/lm_head.safetensors"  # `hidden` caches: the target's head rows


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def recorded_checksum(manifest: dict, record: dict) -> tuple[str, str]:
    """(algorithm, hex digest) the manifest records for a file (shard, vocab or head rows);
    caches of format version 1 recorded sha256 under that name."""
    algorithm = manifest.get("checksum_algorithm", "sha256")
    return algorithm, record["checksum"] if "checksum" in record else record[algorithm]
