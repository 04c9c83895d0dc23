"""Input chat data -> a `datasets.Dataset` of rows, then the seeded selection.

Local JSON/JSONL rows are read as text (one `raw` string per row) and parsed during the
tokenizing map: a malformed line then becomes one skipped row instead of a failed load,
and rows whose fields differ in type never meet Arrow's schema inference.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import logging
from functools import partial
from pathlib import Path

import datasets
import numpy as np
from datasets.data_files import EmptyDatasetError, get_data_patterns, resolve_pattern, sanitize_patterns
from datasets.utils.info_utils import is_small_dataset

from .conversations import ROW_COLUMNS_READ
from .errors import InputError
from .files import COMPRESSED_SUFFIXES, refuse_pattern_paths

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
# What `save_to_disk` writes; a `dataset_info.json` alone is also what LLaMA-Factory's data folders hold.
SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")
UTF8_BOM = b"\xef\xbb\xbf"
# This file's source: a release that reads the same bytes into other rows (a fix to the JSON or
# Parquet reading) must not take the rows an earlier release cached for them.
READER_CODE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def is_local(spec: str) -> bool:
    return Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")) or spec.endswith(DATA_SUFFIXES)


def local_splits(spec: str, config: str | None = None) -> tuple[dict[str, list[Path]], str | None]:
    """Split name -> data files of a local file or folder (a single file is the `train` split), and
    the configuration of a folder's card they were taken from (None without one)."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(
            f"--input-data: {spec!r} does not exist; expected a .json/.jsonl/.parquet file, a directory of them, or a Hub dataset id"
        )
    if path.is_file():
        _refuse_config(config, spec)
        if path.suffix not in DATA_SUFFIXES:
            raise InputError(f"--input-data: {spec!r} has suffix {path.suffix!r}; expected one of {', '.join(DATA_SUFFIXES)}")
        return {"train": [path]}, None
    splits, config = folder_splits(path, spec, config)
    if not splits:
        raise InputError(
            f"--input-data: directory {spec!r} holds no {'/'.join(DATA_SUFFIXES)} files; point it at a directory with data files"
        )
    return splits, config


def folder_splits(folder: Path, spec: str, config: str | None = None) -> tuple[dict[str, list[Path]], str | None]:
    """Split the data files of a folder as `datasets.load_dataset(folder)` does, with its own patterns.

    The `configs` of a README.md (a Hub dataset downloaded with `hf download`) say which files
    each split of each configuration holds. Without them, split names in file or folder names
    (`train`/`validation`/`test` and their synonyms, as in `sharegpt_train.jsonl` or
    `data/test-00000-of-00001.parquet`) make splits, and a folder without them is one `train`
    split. Hidden files and folders (`.ipynb_checkpoints/`) are never read. Returns the splits and
    the configuration read (--input-config, else the card's default; None without configs).
    """
    base = folder.resolve().as_posix()
    refuse_pattern_paths([base], "--input-data", InputError)
    configs = card_configs(folder)
    if configs:
        config = _config_name(configs, config, spec)
        params = configs[config]
        if params.get("data_dir"):
            base = f"{base}/{params['data_dir']}"
        patterns = sanitize_patterns(params["data_files"]) if params.get("data_files") else None
    else:
        _refuse_config(config, spec)
        patterns = None
    patterns = patterns or inferred_split_patterns(base)
    splits = {}
    for split, split_patterns in patterns.items():
        # In `datasets`' order: pattern by pattern as listed, each one's files sorted as whole path strings
        # (`en-gb/` before `en/`), so rows keep the positions a build of the same files from the Hub gives them.
        # A file two patterns match is read twice, as there.
        files = [Path(f) for pattern in split_patterns for f in _resolve_data_files(pattern, base, str(folder / "README.md"))]
        if files:
            splits[str(split)] = files
    if not splits:
        _refuse_data_in_no_split(folder, spec, config if configs else None, patterns)
    if not configs:
        _warn_unsplit_files(folder, splits)
    return splits, config


def _refuse_data_in_no_split(folder: Path, spec: str, config: str | None, patterns: dict) -> None:
    """Data files that no split holds: say what named the splits, rather than that there are no data files."""
    data = sorted(Path(f).relative_to(folder.resolve()).as_posix() for f in _data_files("**", folder.resolve().as_posix()))
    if not data:
        return
    if config is not None:
        named_by = f"the `configs` of its README.md (configuration {config!r})"
        fix = "fix the configuration's data_files (or data_dir) in the README.md, or remove the README.md to split by file names"
    else:
        named_by = "the split names in its file and folder names"
        fix = "rename the files so that each one's split name is in its name, or give the data files as a folder of their own"
    split_patterns = {str(split): list(split_patterns) for split, split_patterns in patterns.items()}
    raise InputError(
        f"--input-data: directory {spec!r} holds data files ({', '.join(data[:5])}{' ...' if len(data) > 5 else ''}), and "
        f"{named_by} give splits whose patterns match none of them ({split_patterns}); "
        f"expected splits that hold its data files: {fix}"
    )


def inferred_split_patterns(base: str) -> dict[str, list[str]]:
    """Split name -> patterns, as `datasets.data_files.get_data_patterns` infers them, from the data files
    alone: there, any file counts, and a `train.py` or `notes_test.txt` beside the data names a split
    that holds none of it. {} where the folder holds no data files."""
    try:
        from datasets.data_files import _get_data_files_patterns  # the resolver-taking form of get_data_patterns
    except ImportError:  # a `datasets` without it: its own inference, over every file
        try:
            return get_data_patterns(base)
        except EmptyDatasetError:
            return {}
    try:
        return _get_data_files_patterns(partial(_data_files, base=base))
    except FileNotFoundError:  # no pattern matched a data file
        return {}


def card_configs(folder: Path) -> dict[str, dict]:
    """The `configs` field of the folder's README.md (name -> data_files, data_dir, ...), or {}."""
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    try:
        return dict(MetadataConfigs.from_dataset_card_data(DatasetCard.load(readme).data))
    except Exception as err:  # YAML or `configs` that `datasets` rejects, in a file we do not own
        raise InputError(
            f"--input-data: the `configs` in {readme} cannot be read ({type(err).__name__}: {_one_line(err)}); "
            "expected the YAML header of a Hub dataset card: fix it, or remove the README.md from the folder"
        ) from None


def _config_name(configs: dict[str, dict], config: str | None, spec: str) -> str:
    """--input-config, else the card's default config (as `datasets` picks it)."""
    if config is not None:
        if config not in configs:
            raise InputError(
                f"--input-config: {spec!r} has configurations {sorted(configs)}, not {config!r}; pass --input-config with one of them"
            )
        return config
    defaults = [name for name, params in configs.items() if len(configs) == 1 or name == "default" or params.get("default")]
    if len(defaults) != 1:
        raise InputError(
            f"--input-config: {spec!r} has configurations {sorted(configs)} and {'several defaults' if defaults else 'no default'}; "
            "pass --input-config with one of them"
        )
    return defaults[0]


def _refuse_revision(revision: str | None, spec: str) -> None:
    if revision is not None:
        raise InputError(
            f"--input-revision: {revision!r} names a revision of a Hub dataset, and the local path {spec!r} has none "
            "(its files' content is hashed instead); drop --input-revision"
        )


def _refuse_config(config: str | None, spec: str) -> None:
    if config is not None:
        raise InputError(
            f"--input-config: {config!r} names a configuration, and the local path {spec!r} has none "
            "(a folder has them as `configs` in its README.md); drop --input-config"
        )


def _data_files(pattern: str, base: str) -> list[str]:
    """The files under `base` matching `pattern` that `datasets` reads as data: ours, compressed or not."""
    try:
        files = resolve_pattern(pattern, base)
    except FileNotFoundError:  # `datasets` says "no file matches" this way
        return []
    return [f for f in files if _is_data_file(f)]


def _is_data_file(name: str) -> bool:
    suffixes = Path(name).suffixes
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in DATA_SUFFIXES


def _is_compressed(name: str) -> bool:
    return Path(name).suffix in COMPRESSED_SUFFIXES


def _resolve_data_files(pattern: str, base: str, card: str) -> list[str]:
    if not glob.has_magic(pattern):  # a file named outright: `datasets` refuses it missing, never skips it
        _refuse_missing_named_file(pattern, base, card)
    files = _data_files(pattern, base)
    compressed = sorted(Path(f).name for f in files if _is_compressed(f))
    if compressed:  # `datasets` would read them: never leave them out unseen
        raise InputError(
            f"--input-data: {', '.join(compressed[:3])}{' ...' if len(compressed) > 3 else ''} in {base} "
            f"{'is' if len(compressed) == 1 else 'are'} compressed; expected {'/'.join(DATA_SUFFIXES)} files as they are: "
            "decompress them first"
        )
    return files


def _refuse_missing_named_file(pattern: str, base: str, card: str) -> None:
    try:
        named = resolve_pattern(pattern, base)
    except FileNotFoundError:
        raise InputError(
            f"--input-data: the `configs` of {card} name the data file {pattern!r}, and {base} holds no such file; "
            "expected every file a configuration names to exist: restore it, or fix data_files in the README.md"
        ) from None
    if not any(_is_data_file(f) for f in named):
        raise InputError(
            f"--input-data: the `configs` of {card} name {pattern!r} as a data file; expected a "
            f"{'/'.join(DATA_SUFFIXES)} file: convert it, or fix data_files in the README.md"
        )


def _warn_unsplit_files(folder: Path, splits: dict[str, list[Path]]) -> None:
    """Files the split names leave out are not read (as in `datasets`); say which, so none goes missing
    unseen. A compressed one among them is named too, and not refused: it is never read."""
    root = folder.resolve()
    split_files = {f for files in splits.values() for f in files}
    left_out = sorted(Path(f) for f in _data_files("**", root.as_posix()) if Path(f) not in split_files)
    if splits and left_out:
        names = ", ".join(_left_out_name(p, root) for p in left_out[:5]) + (" ..." if len(left_out) > 5 else "")
        log.warning(
            "--input-data: %s: %d data file(s) match no split (%s) and are not read; splits are %s",
            folder,
            len(left_out),
            names,
            sorted(splits),
        )


def _left_out_name(path: Path, root: Path) -> str:
    name = str(path.relative_to(root))
    return f"{name}, compressed" if _is_compressed(name) else name


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in SAVED_DATASET_MARKERS)


def content_hash(files: list[Path]) -> str:
    """Identity of local input: names and bytes of every file, so a changed file is a changed input."""
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def rows_fingerprint(digest: str) -> str:
    """The rows' cache key: the files' content hash and the code that reads them into rows."""
    return hashlib.sha256(f"{digest}|{READER_CODE_VERSION}".encode()).hexdigest()[:32]


def _json_rows(files: list[str], key: str):
    """Generator for Dataset.from_generator; `key` (see rows_fingerprint) only feeds its cache fingerprint:
    `datasets` knows a generator by its name, not by its code."""
    for name in files:
        with open(name, "rb") as f:
            head = f.read(1 << 12).removeprefix(UTF8_BOM).lstrip()
        if head.startswith(b"[") and _is_json_array(name):
            yield from _json_array_rows(name)
        elif head.startswith(b"{") and _is_one_json_object(name):
            raise InputError(
                f"--input-data: {name} is one JSON object spread over several lines, not rows; expected JSON Lines (one "
                "conversation object per line) or a JSON array of them: rewrite it with the rows in one of those forms"
            )
        else:
            with open(name, "rb") as f:
                for number, line in enumerate(f):
                    if number == 0:
                        line = line.removeprefix(UTF8_BOM)  # editors on Windows start files with one
                    if line.strip():
                        yield {"raw": line}  # bytes: invalid UTF-8 is judged per row, later


def _parquet_schemas(files: list[Path]) -> list:
    """Each file's schema, from its footer: the part an interrupted download or copy loses first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schemas = []
    for path in files:
        try:
            schemas.append(pq.read_schema(path).remove_metadata())
        except pa.ArrowException as err:
            raise InputError(
                f"--input-data: {path} is not a readable Parquet file ({_one_line(err)}); expected a whole Parquet file: "
                "check that it is not damaged or cut short (an interrupted download or copy), and fetch or write it again"
            ) from None
    return schemas


def _check_parquet_columns(files: list[Path], schemas: list) -> None:
    """`datasets` cannot load Parquet files with different columns as one table; say which differ."""
    first = schemas[0].names
    for path, schema in zip(files[1:], schemas[1:]):
        names = schema.names
        if sorted(names) != sorted(first):
            raise InputError(
                f"--input-data: Parquet files {files[0].name} (columns {first}) and {path.name} (columns {names}) "
                "differ; expected one set of columns per input: give ShareGPT and OpenAI rows as separate inputs, or as JSON Lines"
            )


def _from_json_files(files: list[Path], digest: str) -> datasets.Dataset:
    key = rows_fingerprint(digest)
    try:
        ds = datasets.Dataset.from_generator(_json_rows, gen_kwargs={"files": [str(p) for p in files], "key": key})
    except datasets.exceptions.DatasetGenerationError as err:
        if isinstance(err.__cause__, InputError):  # raised in the generator; `datasets` wraps it
            raise err.__cause__ from None
        if isinstance(err.__cause__, datasets.arrow_writer.SchemaInferenceError):  # the generator yielded nothing
            names = ", ".join(p.name for p in files)
            raise InputError(
                f"--input-data: {names} holds no rows; expected one JSON object per line (JSON Lines) or a JSON array of objects"
            ) from None
        raise
    return datasets.Dataset(ds.data, info=ds.info, split=ds.split, fingerprint=key)


# How much of a JSON file starting with `{` tells a pretty-printed object from JSON Lines whose
# first line is damaged: never the whole file, which can be tens of GB.
FORM_HEAD_BYTES = 1 << 22


def _is_one_json_object(name: str) -> bool:
    """A pretty-printed object: its first line is no JSON value, and the file is one object. Decided
    from the head alone: a larger file is one object when no later line in the head begins a row and
    the head parses as the start of an object; anything else is (bad) JSON Lines, judged row by row."""
    with open(name, "rb") as f:
        head = f.read(FORM_HEAD_BYTES + 1)
    whole = len(head) <= FORM_HEAD_BYTES
    head = head[:FORM_HEAD_BYTES].removeprefix(UTF8_BOM)
    lines = head.split(b"\n")
    if len(lines) == 1 and not whole:
        return False  # a first line longer than the head: not pretty-printed
    if _json_value(lines[0]) is not _NOT_JSON:
        return False  # JSON Lines
    if whole:
        return isinstance(_json_value(head), dict)
    if any(_begins_a_row(line) for line in lines[1:]):
        return False  # JSON Lines whose first line was cut short or damaged
    return _starts_an_object(head)


def _is_json_array(name: str) -> bool:
    """A file starting with `[` is one JSON array, unless its first line is a whole JSON value and more
    follows it, which no JSON file can hold: JSON Lines whose first row is an array, a bad row like any
    other. A first line longer than the head is an array written on one line."""
    with open(name, "rb") as f:
        head = f.read(FORM_HEAD_BYTES + 1)
    whole = len(head) <= FORM_HEAD_BYTES
    first, newline, rest = head[:FORM_HEAD_BYTES].removeprefix(UTF8_BOM).lstrip().partition(b"\n")
    more = bool(rest.strip()) or not whole
    return not (newline and more and _json_value(first) is not _NOT_JSON)


def _begins_a_row(line: bytes) -> bool:
    """A JSON Lines row begins at the line's start with `{` and its first key on that line (the head
    may cut the rest). In a pretty-printed object a nested object is indented, or, with `indent=0`,
    its `{` ends its line (`{}` when empty): its keys follow on lines of their own."""
    return line.startswith(b"{") and line[1:].lstrip(b" \t").startswith(b'"')


_NOT_JSON = object()


def _json_value(data: bytes):
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _NOT_JSON


def _starts_an_object(head: bytes) -> bool:
    """Whether `head`, cut from a longer file, is valid JSON up to the cut: the parser fails only there,
    in the middle of a string (which it names by its start) or of the last few characters."""
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False).lstrip()  # a cut character is left out
    except UnicodeDecodeError:
        return False
    if not text.startswith("{"):
        return False
    try:
        value, end = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError as err:
        return err.msg.startswith("Unterminated string") or err.pos >= len(text) - 8
    return isinstance(value, dict) and not text[end:].strip()


def _json_array_rows(name: str):
    try:
        with open(name, encoding="utf-8-sig") as f:  # a leading byte-order mark is not JSON
            rows = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(
            f"--input-data: {name} starts like a JSON array but is not valid JSON ({err}); fix the file or write it as JSON Lines"
        ) from None
    for row in rows:
        yield {"raw": _row_bytes(row)}


def _row_bytes(row) -> bytes:
    """A row as its JSON line. Text UTF-8 cannot hold (a lone surrogate escape such as "\\ud83d")
    stays escaped, so that row alone is judged when parsed, as the same line of a JSONL file is."""
    try:
        return json.dumps(row, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(row).encode()


def load_rows(
    spec: str, *, config: str | None = None, split: str | None = None, revision: str | None = None
) -> tuple[datasets.Dataset, dict]:
    """Load the raw rows of one split and describe the input for the manifest, with the configuration
    read (a name --input-config was left to default to) rather than the flag as typed. `revision`: a
    Hub dataset's branch, tag or commit (--input-revision)."""
    if not spec.strip():
        raise InputError(
            "--input-data is empty; expected a .json/.jsonl/.parquet file, a directory of them, a saved dataset or a Hub dataset id"
        )
    if not is_local(spec):
        return _load_hub(spec, config, split, revision)
    _refuse_revision(revision, spec)
    path = Path(spec).expanduser().resolve()
    if is_saved_dataset(path):
        _refuse_config(config, spec)
        loaded = _load_saved_dataset(path, spec)
        if isinstance(loaded, datasets.Dataset):  # one split, under the name `datasets` gave it, if any
            name = str(loaded.split or "train")
            loaded, split = {name: loaded}, split or name
        name = _split_name(loaded, split, spec)
        ds = loaded[name]
        info = {"input_data": str(spec), "kind": "saved_dataset", "config": None, "split": name, "content_hash": ds._fingerprint}
        # A format set before saving (numpy, torch, pandas) is saved with it: rows must reach the tokenizer as Python objects.
        return ds.with_format(None), info
    splits, config = local_splits(spec, config)
    name = _split_name(splits, split, spec)
    files = splits[name]
    if {p.suffix == ".parquet" for p in files} == {True, False}:
        raise InputError(f"--input-data: directory {spec!r} mixes Parquet and JSON files in split {name!r}; keep one kind per input")
    digest = content_hash(files)  # keys every cache below: a file rewritten with its size and mtime is still a new input
    ds = _from_parquet_files(files, digest) if files[0].suffix == ".parquet" else _from_json_files(files, digest)
    return ds, {"input_data": str(spec), "kind": "files", "config": config, "split": name, "content_hash": digest}


def _load_saved_dataset(path: Path, spec: str):
    """`datasets.load_from_disk`, with a folder it cannot read (a file missing or cut short by an
    interrupted copy) named rather than failing with the library's raw error."""
    import pyarrow as pa

    try:
        return datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as err:
        raise InputError(
            f"--input-data: {spec!r} is a saved dataset (it holds {' or '.join(SAVED_DATASET_MARKERS)}) that `datasets` "
            f"cannot load ({type(err).__name__}: {_one_line(err)}); expected the whole folder `save_to_disk` wrote: check "
            "that no file is missing or cut short (an interrupted copy), and copy or save it again"
        ) from None


def _from_parquet_files(files: list[Path], digest: str) -> datasets.Dataset:
    """`datasets` keys its Parquet cache, and the rows' fingerprint, by path and modification time,
    which `cp -p` or `rsync -a` keep over new bytes: the cache goes in a folder of its own per
    content hash and reading code, which is the rows' fingerprint too, keying every cache made
    from them (the tokenizing map)."""
    refuse_pattern_paths([Path(p).absolute() for p in files], "--input-data", InputError)
    schemas = _parquet_schemas(files)
    _check_parquet_columns(files, schemas)
    features = _parquet_features(files, schemas)
    key = rows_fingerprint(digest)
    cache_dir = str(Path(datasets.config.HF_DATASETS_CACHE) / "eagle3_cache_inputs" / key)
    try:
        ds = datasets.load_dataset("parquet", data_files=[str(p) for p in files], split="train", features=features, cache_dir=cache_dir)
    except (datasets.exceptions.DatasetGenerationError, ValueError, TypeError) as err:
        raise InputError(
            f"--input-data: Parquet files {', '.join(p.name for p in files)} cannot be read as one table "
            f"({_one_line(err.__cause__ or err)}); expected readable Parquet files of one schema: check that none is damaged "
            "or cut short, and rewrite them with one schema, or as JSON Lines"
        ) from None
    return datasets.Dataset(ds.data, info=ds.info, split=ds.split, fingerprint=key)


def _parquet_features(files: list[Path], schemas: list) -> datasets.Features | None:
    """One schema for Parquet parts written in chunks, whose nested structs differ (a `tool_calls`
    field only where a chunk had tool calls); None where every file has the same schema."""
    import pyarrow as pa

    if all(schema.equals(schemas[0]) for schema in schemas[1:]):
        return None
    for path, schema in zip(files[1:], schemas[1:]):
        try:
            pa.unify_schemas([schemas[0], schema], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
            raise InputError(
                f"--input-data: Parquet files {files[0].name} and {path.name} hold the same columns with types that do not "
                f"agree ({_one_line(err)}); expected one schema for every file: rewrite them with one schema, or as JSON Lines"
            ) from None
    return datasets.Features.from_arrow_schema(pa.unify_schemas(schemas, promote_options="permissive"))


def _load_hub(repo_id: str, config: str | None, split: str | None, revision: str | None):
    from .hub_inputs import hub_source, json_columns

    builder, loaded = _hub_splits(repo_id, config, revision)
    ds = _pick_split(loaded, split, repo_id)
    config = ds.info.config_name or config  # the one `datasets` read: without --input-config, the dataset's default
    source = hub_source(builder, repo_id, config or builder.config.name, split or "train", ds._fingerprint)
    info = {
        "input_data": repo_id,
        "kind": "hub",
        "config": config,
        "split": split or "train",
        "content_hash": source.content_hash or ds._fingerprint,
        "revision": source.commit,  # informational: another commit with the same data files and card settings is the same input
        # What earlier versions recorded: the rows `datasets` named by the commit, and the data files' hash alone (at the same commit)
        "earlier_content_hashes": [ds._fingerprint, *source.earlier_hashes],
    }
    typed_as_json = [column for column in json_columns(ds.features) if _top_column(column) in ROW_COLUMNS_READ]
    if typed_as_json:  # a Json column the build never reads (metadata) changes no text: the rows stay `datasets`' own
        return _read_again_row_by_row(repo_id, split or "train", source, typed_as_json, ds, info)
    return ds, info


def _top_column(path: str) -> str:
    """The row's column a feature path (`messages[].content`) lies in."""
    return path.split(".", 1)[0].split("[", 1)[0]


def _read_again_row_by_row(repo_id: str, split: str, source, columns: list[str], ds: datasets.Dataset, info: dict):
    """The rows of the split's JSON data files as the reader of local files reads them, where `datasets` typed
    `columns` as Json and so changed text in them (see hub_inputs.json_data_files). Their content hash is another
    than the rows `datasets` made: a build of those holds the changed text, and is not resumed (it and the names
    earlier versions recorded for it are the altered hashes, which the refusal names)."""
    from .hub_inputs import json_data_files, read_row_by_row

    files = json_data_files(repo_id, split, source, columns)
    if files is None:
        return ds, info
    log.info("--input-data: %s (split %s): `datasets` typed %s as Json; its JSON data files are read row by row", repo_id, split, columns)
    content_hash = read_row_by_row(source.content_hash)
    altered = [info["content_hash"], *info["earlier_content_hashes"]]
    rows = _from_json_files(files, content_hash)
    return rows, info | {"content_hash": content_hash, "earlier_content_hashes": [], "altered_content_hashes": altered}


def _hub_splits(repo_id: str, config: str | None, revision: str | None):
    """The builder and every split of a Hub dataset, as `datasets.load_dataset` loads them: the builder
    tells which commit and files it read."""
    from huggingface_hub import is_offline_mode

    from .hub_inputs import copy_at_revision

    try:
        builder = datasets.load_dataset_builder(repo_id, name=config, revision=revision)
        builder = copy_at_revision(builder, repo_id, config, revision)  # offline, `datasets` reads its newest copy
        builder.download_and_prepare()
        return builder, builder.as_dataset(in_memory=is_small_dataset(builder.info.dataset_size))
    except InputError:
        raise
    except datasets.exceptions.DatasetNotFoundError as err:
        raise InputError(
            f"--input-data: Hub dataset {repo_id!r} was not found ({_one_line(err)}); "
            f"check the id{' and --input-revision' if revision else ''}, or give a local path"
        ) from None
    except datasets.exceptions.DatasetGenerationError as err:  # `datasets` fails the whole load on one bad JSON line
        cause = err.__cause__ or err
        raise InputError(
            f"--input-data: `datasets` cannot load Hub dataset {repo_id!r} ({type(cause).__name__}: {_one_line(cause)}); "
            "expected data files it can read whole (one malformed JSON line fails the whole load): download them "
            f"(`hf download {repo_id} --repo-type dataset --local-dir DIR`) and give DIR as --input-data, where JSON files "
            "are read row by row and bad lines are skipped and counted"
        ) from None
    except (ConnectionError, FileNotFoundError, ValueError) as err:  # offline or unreachable, a malformed id, a missing config
        if isinstance(err, ValueError):
            _refuse_config_the_hub_dataset_lacks(repo_id, config, revision)
        hint = (
            "HF_HUB_OFFLINE is set, so only datasets already in the local cache load: unset it, or give a local path"
            if is_offline_mode()
            else "check the path or the id, the network, --input-config and --input-revision"
        )
        raise InputError(
            f"--input-data: {repo_id!r} is not a local path, and as a Hub dataset it could not be loaded "
            f"({type(err).__name__}: {_one_line(err)}); expected a .json/.jsonl/.parquet file, a directory of them, "
            f"a saved dataset or a reachable Hub dataset id: {hint}"
        ) from None


def _refuse_config_the_hub_dataset_lacks(repo_id: str, config: str | None, revision: str | None) -> None:
    """`datasets` refuses a configuration the dataset lacks, or none where it has several and no default,
    with a ValueError like any other: say it as for a local folder's card, since the dataset was reached.
    Nothing where its configurations cannot be listed, or the one read is there."""
    from datasets.inspect import get_dataset_default_config_name

    try:
        names = datasets.get_dataset_config_names(repo_id, revision=revision)
        default = get_dataset_default_config_name(repo_id, revision=revision) if config is None else None
    except Exception as err:  # unreachable, or no configurations to list: the caller's error stands
        log.debug("could not list the configurations of %s: %r", repo_id, err)
        return
    _config_name({str(name): {"default": name == default} for name in names}, config, repo_id)


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pick_split(loaded, split: str | None, spec: str) -> datasets.Dataset:
    return loaded[_split_name(loaded, split, spec)]


def _split_name(splits, split: str | None, spec: str) -> str:
    """The split to read: --split, else `train`; an error lists the splits there are."""
    wanted = split or "train"
    if wanted not in splits:
        raise InputError(f"--split: {spec!r} has splits {sorted(splits)}, not {wanted!r}; pass --split with one of them")
    return wanted


def select_rows(ds: datasets.Dataset, seed: int, max_samples: int | None) -> tuple[datasets.Dataset, np.ndarray]:
    """The seeded permutation of every input kind, cut to max_samples; returns the source indices too."""
    order = np.random.default_rng(seed).permutation(len(ds))
    if max_samples is not None:
        order = order[:max_samples]
    return ds.select(order), order
