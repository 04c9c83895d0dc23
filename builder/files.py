"""Writing files so that a reader (or a resumed build) never sees half of one, telling a full
disk apart from other failures, and hashing files.

Every file is written under a temp name next to its target (`.NAME.tmp-PID`, one pattern, so a
resumed build can remove exactly the leftovers of a killed writer) and renamed over the target
once complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import xxhash

from .errors import DiskFull

TEMP_GLOB = ".*.tmp-*"  # matches every name `temp_path` gives, and nothing a cache keeps
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
HASHES = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


def expand_home(path):
    """A path given to the Python API with `~` (or `~user`) at its start made the home folder, as the shell
    makes it for the command line: not a folder named `~` under the working directory. Anything else passes
    unchanged, of the type given: a Hub repo id, an embedded name or a JSON object never starts with `~`."""
    if isinstance(path, str) and path.startswith("~"):
        return os.path.expanduser(path)
    if isinstance(path, Path) and path.parts[:1] and path.parts[0].startswith("~"):
        return Path(os.path.expanduser(path))
    return path


def temp_path(path: Path) -> Path:
    """Where `path` is written before it is complete: a hidden name in the same folder (so the
    final rename stays on one file system), per process (ranks never share one)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_leftovers(folder: Path, recursive: bool = False) -> None:
    """Delete the temp files of writers that were killed before their rename (in sub-folders too
    when `recursive`). Files only: a hidden temp folder is another writer's (an export in progress)."""
    for leftover in (Path(folder).rglob if recursive else Path(folder).glob)(TEMP_GLOB):
        if leftover.is_file() or leftover.is_symlink():
            leftover.unlink(missing_ok=True)


@contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yields the temp path to write `path`'s content to; when the block ends without error it
    replaces `path` durably (the content is fsynced before the rename, the folder after it),
    otherwise it is removed and `path` stays as it was. Whatever writes the temp path (our own
    code, `safetensors`, `save_file`) needs no fsync of its own."""
    path = Path(path)
    made = _missing_folders(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        fsync_file(tmp)  # the content before the name: a power cut must not leave a new name over missing bytes
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for folder in (path.parent, *(f.parent for f in made)):  # the new name, and each folder made for it
        fsync_dir(folder)


@contextmanager
def mode_of_open(path: Path) -> Iterator[None]:
    """For a writer that makes `path` with a mode of its own (safetensors' save_file makes a temp file
    of mode 0600 and renames it over `path`): `path` ends with the mode open() gives a new file there,
    as every other file the project writes: 0o666 less the umask (or as the folder's default ACL
    says), so a cache or an export in a group-shared folder is readable by the group. That mode is
    read off an empty file made at `path` first, not from the umask: the umask is read only by
    setting it (os.umask), process-wide, racing files other threads make meanwhile."""
    path = Path(path)
    path.unlink(missing_ok=True)  # a leftover of the same name would keep its own mode
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = stat.S_IMODE(os.stat(path).st_mode)
    yield
    os.chmod(path, mode)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a rename, a new name) survive a power cut, which keeps them only
    up to the folder's last fsync."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _missing_folders(folder: Path) -> list[Path]:
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, data: dict) -> None:
    write_bytes_atomic(path, json.dumps(data, indent=2, sort_keys=True).encode())


# ---- a full disk ------------------------------------------------------------------------------


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


def disk_full_error(err: OSError) -> DiskFull:
    return DiskFull(
        f"no space left writing {getattr(err, 'filename', None) or 'the cache'} ({err.strerror}); "
        + written_shards_stay_valid("Free space (or raise the quota)")
    )


def written_shards_stay_valid(fix: str) -> str:
    """How every failed write's message ends: what was kept, and how to go on once `fix` is done."""
    return f"every shard already written is complete and valid. {fix}, then rerun with --resume."


@contextmanager
def disk_full_as_error() -> Iterator[None]:
    """A full disk (or quota) inside the block is raised as `DiskFull`, saying what to do."""
    try:
        yield
    except OSError as err:
        if not is_disk_full(err):
            raise
        raise disk_full_error(err) from err


# ---- hashes -----------------------------------------------------------------------------------


def new_hash(algorithm: str):
    if algorithm not in HASHES:
        raise ValueError(f"checksum algorithm {algorithm!r}: expected one of {sorted(HASHES)}")
    return HASHES[algorithm]()


def file_hash(path: Path, algorithm: str) -> str:
    """Hex digest of a file's bytes, streamed through `algorithm` (a name in `HASHES`)."""
    h = new_hash(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# glob's pattern characters, fsspec's chained-URL separator, and what opens an environment variable
MISREAD_IN_PATHS = ("*", "?", "[", "::", "$")


def misread_in_path(path) -> list[str]:
    """What `datasets` would not read literally in a local path: it resolves every data path as a
    glob pattern (its file system has no escape, so `cache[1]` matches `cache1`) and as an fsspec
    URL (`a::b` chains two file systems), and without streaming it expands environment variables
    in the files it found (`c$HOME` reads `c/home/user`). Any `$` counts: the reader's environment
    may hold a variable that the builder's does not."""
    return [part for part in MISREAD_IN_PATHS if part in str(path)]


COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip")  # data files `datasets` decompresses; eagle3-cache does not


def refuse_pattern_paths(paths, what: str, error: type[Exception] = ValueError) -> None:
    """Refuse a path `datasets` would read as another (other files, or none, without an error)."""
    for path in paths:
        found = misread_in_path(path)
        if found:
            raise error(
                f"{what}: the path {str(path)!r} contains {', '.join(map(repr, found))}, which `datasets` reads as a file "
                "pattern, a chained URL or an environment variable: it would read the files of other paths, or none; "
                f"expected a path without any of {', '.join(map(repr, MISREAD_IN_PATHS))}: rename the folder or move the files"
            )
