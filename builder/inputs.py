"""Input chat data -> a `datasets.Dataset` of rows, then the seeded selection.

Local JSON/JSONL rows are read as text (one `raw` string per row) and parsed during the
tokenizing map: a malformed line then becomes one skipped row instead of a failed load,
and rows whose fields differ in type never meet Arrow's schema inference.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import numpy as np

from .errors import InputError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def is_local(spec: str) -> bool:
    return Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")) or spec.endswith(DATA_SUFFIXES)


def local_data_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(
            f"--input-data: {spec!r} does not exist; expected a .json/.jsonl/.parquet file, a directory of them, or a Hub dataset id"
        )
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise InputError(f"--input-data: {spec!r} has suffix {path.suffix!r}; expected one of {', '.join(DATA_SUFFIXES)}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise InputError(
            f"--input-data: directory {spec!r} holds no {'/'.join(DATA_SUFFIXES)} files; point it at a directory with data files"
        )
    kinds = {"parquet" if p.suffix == ".parquet" else "json" for p in files}
    if len(kinds) > 1:
        raise InputError(f"--input-data: directory {spec!r} mixes Parquet and JSON files; keep one kind per input")
    return files


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def content_hash(files: list[Path]) -> str:
    """Identity of local input: names and bytes of every file, so a changed file is a changed input."""
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _json_rows(files: list[str], stamps: list[str]):
    """Generator for Dataset.from_generator; `stamps` only feeds its cache fingerprint."""
    for name in files:
        with open(name, "rb") as f:
            head = f.read(1 << 12).lstrip()
        if head.startswith(b"["):
            yield from _json_array_rows(name)
        else:
            with open(name, "rb") as f:
                for line in f:
                    if line.strip():
                        yield {"raw": line}  # bytes: invalid UTF-8 is judged per row, later


def _check_parquet_columns(files: list[Path]) -> None:
    """`datasets` cannot load Parquet files with different columns as one table; say which differ."""
    import pyarrow.parquet as pq

    first = pq.read_schema(files[0]).names
    for path in files[1:]:
        names = pq.read_schema(path).names
        if sorted(names) != sorted(first):
            raise InputError(
                f"--input-data: Parquet files {files[0].name} (columns {first}) and {path.name} (columns {names}) "
                "differ; expected one set of columns per input: give ShareGPT and OpenAI rows as separate inputs, or as JSON Lines"
            )


def _from_json_files(files: list[Path], stamps: list[str]) -> datasets.Dataset:
    try:
        return datasets.Dataset.from_generator(_json_rows, gen_kwargs={"files": [str(p) for p in files], "stamps": stamps})
    except datasets.exceptions.DatasetGenerationError as err:
        if isinstance(err.__cause__, InputError):  # raised in the generator; `datasets` wraps it
            raise err.__cause__ from None
        if isinstance(err.__cause__, datasets.arrow_writer.SchemaInferenceError):  # the generator yielded nothing
            names = ", ".join(p.name for p in files)
            raise InputError(
                f"--input-data: {names} holds no rows; expected one JSON object per line (JSON Lines) or a JSON array of objects"
            ) from None
        raise


def _json_array_rows(name: str):
    try:
        with open(name, encoding="utf-8") as f:
            rows = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(
            f"--input-data: {name} starts like a JSON array but is not valid JSON ({err}); fix the file or write it as JSON Lines"
        ) from None
    for row in rows:
        yield {"raw": json.dumps(row, ensure_ascii=False).encode()}


def load_rows(spec: str, *, config: str | None = None, split: str | None = None) -> tuple[datasets.Dataset, dict]:
    """Load the raw rows and describe the input for the manifest."""
    if is_local(spec):
        path = Path(spec).expanduser().resolve()
        if is_saved_dataset(path):
            ds = _pick_split(datasets.load_from_disk(str(path)), split, spec)
            return ds, {"input_data": str(spec), "kind": "saved_dataset", "split": split, "content_hash": ds._fingerprint}
        files = local_data_files(spec)
        if files[0].suffix == ".parquet":
            _check_parquet_columns(files)
            ds = datasets.load_dataset("parquet", data_files=[str(p) for p in files], split="train")
        else:
            stamps = [f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
            ds = _from_json_files(files, stamps)
        return ds, {"input_data": str(spec), "kind": "files", "split": None, "content_hash": content_hash(files)}
    return _load_hub(spec, config, split)


def _load_hub(repo_id: str, config: str | None, split: str | None):
    from huggingface_hub import is_offline_mode

    try:
        loaded = datasets.load_dataset(repo_id, name=config)
    except datasets.exceptions.DatasetNotFoundError as err:
        raise InputError(
            f"--input-data: Hub dataset {repo_id!r} was not found ({_one_line(err)}); check the id, or give a local path"
        ) from None
    except (ConnectionError, FileNotFoundError, ValueError) as err:  # offline or unreachable, a malformed id, a missing config
        hint = (
            "HF_HUB_OFFLINE is set, so only datasets already in the local cache load: unset it, or give a local path"
            if is_offline_mode()
            else "check the path or the id, the network, and --input-config"
        )
        raise InputError(
            f"--input-data: {repo_id!r} is not a local path, and as a Hub dataset it could not be loaded "
            f"({type(err).__name__}: {_one_line(err)}); expected a .json/.jsonl/.parquet file, a directory of them, "
            f"a saved dataset or a reachable Hub dataset id: {hint}"
        ) from None
    ds = _pick_split(loaded, split, repo_id)
    return ds, {"input_data": repo_id, "kind": "hub", "config": config, "split": split or "train", "content_hash": ds._fingerprint}


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pick_split(loaded, split: str | None, spec: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.Dataset):
        return loaded
    wanted = split or "train"
    if wanted not in loaded:
        raise InputError(f"--split: {spec!r} has splits {sorted(loaded)}, not {wanted!r}; pass --split with one of them")
    return loaded[wanted]


def select_rows(ds: datasets.Dataset, seed: int, max_samples: int | None) -> tuple[datasets.Dataset, np.ndarray]:
    """The seeded permutation of every input kind, cut to max_samples; returns the source indices too."""
    order = np.random.default_rng(seed).permutation(len(ds))
    if max_samples is not None:
        order = order[:max_samples]
    return ds.select(order), order
