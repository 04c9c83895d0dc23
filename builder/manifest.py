"""The manifest: everything that shapes a cache's bytes (identity) plus what the build produced.

The identity is recorded in `.eagle3_build/identity.json` before the first shard is written,
so an interrupted build can be resumed (and a mismatched resume refused) before the card,
which is written last, exists. Each finished shard leaves a small sidecar record there too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import ResumeMismatch

FORMAT_VERSION = 2  # 2: column encodings (byte planes + zstd) and xxh3-128 checksums; 1: raw columns, sha256
BUILD_STATE_DIR = ".eagle3_build"
BUILD_STATE_FILE = f"{BUILD_STATE_DIR}/identity.json"
VOCAB_FILE = "vocab/vocab.safetensors"
LM_HEAD_FILE = "vocab/lm_head.safetensors"  # `hidden` caches: the target's head rows


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def recorded_checksum(manifest: dict, record: dict) -> tuple[str, str]:
    """(algorithm, hex digest) the manifest records for a file (shard, vocab or head rows);
    caches of format version 1 recorded sha256 under that name."""
    algorithm = manifest.get("checksum_algorithm", "sha256")
    return algorithm, record["checksum"] if "checksum" in record else record[algorithm]


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def identity_differences(stored: dict, current: dict) -> dict:
    """`{field: (stored, current)}` for every differing identity field, dotted names."""
    a, b = flatten(stored), flatten(current)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def read_identity(output_dir: Path) -> dict | None:
    path = output_dir / BUILD_STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def check_resume(output_dir: Path, identity: dict) -> None:
    """Refuse (changing nothing) when the stored identity differs from this run's."""
    stored = read_identity(output_dir)
    if stored is None:
        raise ResumeMismatch({"identity": ("missing: the directory holds no resumable eagle3-cache build", "present")})
    differences = identity_differences(stored, identity)
    if differences:
        raise ResumeMismatch(differences)


def sidecar_path(output_dir: Path, shard_name: str) -> Path:
    return output_dir / BUILD_STATE_DIR / "shards" / f"{shard_name}.json"


def read_sidecar(output_dir: Path, shard_name: str) -> dict | None:
    path = sidecar_path(output_dir, shard_name)
    return json.loads(path.read_text()) if path.exists() else None
