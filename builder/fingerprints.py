"""Fingerprints of a local target's files, recorded in a build's identity: its config, a cheap
sample of the weight files transformers loads, and the code of its own it names. A Hub target
records its commit instead."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
# The weights transformers loads from a local folder: the first of these that exists.
LOADING_ORDER = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
SAMPLED_BLOCKS, SAMPLED_BLOCK_BYTES = 256, 4096


def local_weights_sample_hash(model_path: str) -> str | None:
    """A local target's weights, fingerprinted cheaply: each weight file's name and size and 256
    evenly spaced 4 KiB blocks of it (1 MiB read per file, where hashing every byte would read the
    whole model at each start). A checkpoint saved over the same folder (retrained, fine-tuned,
    merged: its values change throughout) hashes differently; an edit confined to a few bytes may
    not. Only the files transformers loads count (a trainer's `optimizer.pt` or `training_args.bin`
    beside them does not). None for a Hub id, whose commit is recorded instead."""
    folder = Path(model_path)
    return _sampled_hash(loaded_weight_files(folder)) if folder.is_dir() else None


# How this version chooses the files it fingerprints, recorded beside the fingerprint: caches that lack
# it were fingerprinted by an earlier version, whose ways (`earlier_weights_sample_hashes`) they may match.
WEIGHTS_FILES = "loaded"


def earlier_weights_sample_hashes(model_path: str) -> dict[str, str]:
    """The fingerprints earlier versions recorded for the same folder, by how they chose its files:
    `every_file` (every weight-like file) and `index_first` (an index's files before the single file
    transformers loads first; absent when the index names files that are gone). Empty for a Hub id."""
    folder = Path(model_path)
    if not folder.is_dir():
        return {}
    hashes = {"every_file": _sampled_hash(_weight_like_files(folder))}
    index_first = _index_first_files(folder)
    if index_first is not None:
        hashes["index_first"] = _sampled_hash(index_first)
    return hashes


def same_weights(recorded: str | None, model_path: str, by_an_earlier_version: bool = False) -> bool:
    """The local target's weights are the recorded ones: by this version's fingerprint, or, for a
    cache an earlier version fingerprinted (`by_an_earlier_version`), by one of its ways."""
    if recorded is None or recorded == local_weights_sample_hash(model_path):
        return True
    if not by_an_earlier_version:
        return False
    way = next((way for way, digest in earlier_weights_sample_hashes(model_path).items() if digest == recorded), None)
    if way == "index_first":
        warn_index_first(model_path)
    return way is not None


def warn_index_first(model_path: str) -> None:
    log.warning(
        "%s: the cache recorded a fingerprint of the files its weights index names, not of the model.safetensors "
        "(or pytorch_model.bin) beside it that transformers loads (an earlier eagle3-cache chose the index in a folder "
        "holding both). Those files are unchanged, so the target is accepted; a change to the loaded file since the "
        "build cannot be seen. If you replaced it, build into a new --output-dir.",
        model_path,
    )


def loaded_weight_files(folder: Path) -> list[Path]:
    """The files transformers loads weights from, found in its order: the file its config names
    (`transformers_weights`), else `model.safetensors`, its index, `pytorch_model.bin`, its index.
    A folder re-saved in another layout keeps the earlier files beside the new ones, and only the
    first found is loaded. In a layout of another kind, every weight-like file."""
    explicit = _explicit_weights(folder)
    for name in [explicit] if explicit else LOADING_ORDER:
        if (folder / name).is_file():
            return _indexed_files(folder, name) if name.endswith(".index.json") else [folder / name]
    return _weight_like_files(folder)


def _explicit_weights(folder: Path) -> str | None:
    """The weights file (or index) a config names under `transformers_weights`, which transformers loads first."""
    try:
        name = json.loads((folder / "config.json").read_text()).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def _indexed_files(folder: Path, index: str) -> list[Path]:
    """The files an index maps weights to; each must be there, as transformers will load every one."""
    files = sorted({folder / name for name in _weight_map(folder, index).values()})
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise ConfigError(
            "--target-model",
            str(folder),
            f"every weight file its {index} names",
            f"Missing: {', '.join(missing)}. transformers loads the weights through {index} ({_why_loaded(index)}): "
            "restore the files, or remove the stale index if the weights are saved another way.",
        )
    return files


def _weight_map(folder: Path, index: str) -> dict:
    """An index's `weight_map` (tensor name -> file name), refused by what is wrong with it where it has none."""
    try:
        weight_map = json.loads((folder / index).read_text())["weight_map"]
        if isinstance(weight_map, dict) and all(isinstance(name, str) for name in weight_map.values()):
            return weight_map
        found = f"a weight_map of {type(weight_map).__name__}"
    except (OSError, UnicodeDecodeError, ValueError) as err:
        found = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
    except (KeyError, TypeError):
        found = "no weight_map"
    raise ConfigError(
        "--target-model",
        str(folder),
        f"a {index} holding a JSON object whose weight_map maps each tensor name to its file name",
        f"Found {found}. transformers loads the weights through {index} ({_why_loaded(index)}): restore the index "
        "from the model's source, or remove it if the weights are saved another way.",
    )


def _why_loaded(index: str) -> str:
    if index not in LOADING_ORDER:
        return "config.json names it under transformers_weights"
    return f"the folder has no {' or '.join(LOADING_ORDER[: LOADING_ORDER.index(index)])}"


def _index_first_files(folder: Path) -> list[Path] | None:
    """The files earlier versions fingerprinted: an index's files first, else a single weight file;
    None where the index cannot be read or names files that are gone (no build could have hashed them)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            try:
                files = sorted({folder / name for name in json.loads((folder / index).read_text())["weight_map"].values()})
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return None
            return files if all(path.is_file() for path in files) else None
    return loaded_weight_files(folder)


def _weight_like_files(folder: Path) -> list[Path]:
    return sorted({p for pattern in WEIGHT_FILE_PATTERNS for p in folder.glob(pattern)})


def _sampled_hash(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            for block in range(SAMPLED_BLOCKS):
                f.seek(max(size - SAMPLED_BLOCK_BYTES, 0) * block // (SAMPLED_BLOCKS - 1))
                digest.update(f.read(SAMPLED_BLOCK_BYTES))
    return digest.hexdigest()


def local_config_hash(model_path: str) -> str | None:
    """The local config's sha256, over its parsed JSON with sorted keys (formatting does not count)."""
    config = Path(model_path) / "config.json"
    if not config.exists():
        return None
    return hashlib.sha256(json.dumps(json.loads(config.read_text()), sort_keys=True).encode()).hexdigest()


# Where a target names its own code: `auto_map`, which transformers follows with trust_remote_code.
CODE_CONFIGS = ("config.json", "tokenizer_config.json")


def names_custom_code(model_config, tokenizer) -> bool:
    """The target's config or tokenizer config names code of its own (an `auto_map`)."""
    return bool(getattr(model_config, "auto_map", None)) or bool(getattr(tokenizer, "init_kwargs", {}).get("auto_map"))


def local_code_hash(model_path: str) -> str | None:
    """A local target's own code: the sha256 of the module files its `auto_map` entries name, and of
    the files they import relatively (what transformers copies and runs with trust_remote_code), by
    name and bytes; a named file that is missing counts as missing. None for a Hub id (its commit pins
    the code) or a folder naming no code of its own."""
    folder = Path(model_path)
    if not folder.is_dir():
        return None
    names = code_files(folder)
    if not names:
        return None
    digest = hashlib.sha256()
    for name in names:
        path = folder / name
        digest.update(f"{name}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest() if path.is_file() else b"missing")
    return digest.hexdigest()


def code_files(folder: Path) -> list[str]:
    """The module files a folder's `auto_map` entries name, with those they import relatively, found
    as transformers finds them (`from .module import ...` is `module.py` beside the importer)."""
    from transformers.dynamic_module_utils import get_relative_imports

    pending, found = [f"{module}.py" for module in auto_map_modules(folder)], set()
    while pending:
        name = pending.pop()
        if name not in found:
            found.add(name)
            pending += [f"{module}.py" for module in get_relative_imports(folder / name)] if (folder / name).is_file() else []
    return sorted(found)


def auto_map_modules(folder: Path) -> set[str]:
    """The modules named by `auto_map` in a folder's config and tokenizer config: "module.Class", or a
    list of them for a tokenizer. A reference into another repo ("repo--module.Class") loads that repo's
    code, not the folder's: the config's hash records the reference."""
    modules = set()
    for config in CODE_CONFIGS:
        try:
            auto_map = json.loads((folder / config).read_text()).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue
        references = auto_map.values() if isinstance(auto_map, dict) else auto_map
        for entry in references:
            for reference in entry if isinstance(entry, (list, tuple)) else [entry]:
                if isinstance(reference, str) and "--" not in reference and "." in reference:
                    modules.add(reference.rsplit(".", 1)[0])
    return modules
