"""Exports for trainers that read their own offline formats.

- `nemo`: NeMo Automodel's `cached_target_path` layout (its format version 2): manifest.json,
  target_embeddings.safetensors and shard-NNNNNN.safetensors padded to seq_length, as its
  `precompute_eagle3` writes them: ids padded with the tokenizer's pad id before the shift,
  the draft columns in `selected_token_ids` order, and the loss-mask options the build applied.
- `specforge`: SpecForge's offline per-sample files and vocab mapping (needs a `hidden` cache of a
  target whose head is a bare lm_head, as SpecForge's is); SpecForge numbers the draft columns by
  ascending token id.
Both are produced from the reader, so they hold exactly what `load_cache` yields, with the aux
states decoded to the cache's --dtype: each trainer's files hold one float dtype.

An export is written in a hidden folder and becomes OUT's only once complete, so OUT is either a
complete export or as it was (absent, or empty, a mount point's `lost+found` aside): a full disk, a failed write or a SIGTERM removes
what was written (a SIGTERM once its files start moving into OUT waits until the export is complete;
Ctrl-C once it is complete leaves it whole).
An existing empty OUT is filled in place (the folder is made inside it and its files moved up, the
one whose presence marks a complete export last), so OUT keeps its mode, group and mount; a new
OUT is the folder made beside it, renamed. In the folder each file's name ends in `-part`, which no
trainer's reader takes for a file of the export (SpecForge's walks into hidden folders); it gets
its own name as it leaves the folder.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import itertools
import json
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .errors import Eagle3CacheError
from .faults import FaultPoints
from .files import DISK_FULL_ERRNOS, TEMP_GLOB, expand_home, fsync_dir, fsync_file, mode_of_open, temp_path
from .formats import TORCH_DTYPES
from .hub import NAME_PATTERN, has_repo_id_shape, is_hub_location
from .manifest import config_not_offered
from .reader import collate_nemo, load_cache, read_manifest, read_vocab
from .source import CacheSource, open_source
from .vocab import PAD_ID_WITHOUT_PAD_TOKEN, d2t_t2d

NEMO_SHARD_SIZE = 256  # the shard size NeMo's precompute_eagle3 documents
NEMO_FORMAT_VERSION = 2


class ExportError(Eagle3CacheError):
    pass


def export_cache(
    cache_dir: str | Path,
    to: str,
    out_dir: str | Path,
    *,
    name: str | None = None,
    revision: str | None = None,
    target_model: str | None = None,
    progress: bool = True,
) -> Path:
    """Write the cache at `cache_dir` in trainer `to`'s format to `out_dir` (new, or an empty folder).
    `name`: the config (sub-folder) of a repo or folder holding several caches, as load_cache's;
    `revision`: the branch, tag or commit of a Hub repo id (default: main).
    Every refusal (the format, OUT, the cache, the target) comes before anything is made."""
    cache, out = expand_home(Path(cache_dir)), expand_home(Path(out_dir))
    if to not in EXPORTS:
        raise ExportError(f"--to: expected one of {', '.join(EXPORTS)}, got {to!r}")
    check_out_folder(out)
    source = cache_source(cache, name, revision)
    write = EXPORTS[to](source, cache_manifest(source), target_model, progress)
    with terminated_as_interrupt(out), export_folder(out, LAST_WRITTEN[to]) as folder:
        write(folder)
    return out


def cache_source(cache: Path, name: str | None, revision: str | None) -> CacheSource:
    """The cache to export, opened once: on the Hub pinned to the commit `revision` (its branch, tag
    or commit; main by default) points at now, so its card, shards and draft vocabulary are all read
    from that one version even if a push moves the branch while the export runs. Refused with what
    to pass where there is no cache directory, or where a revision is given with one."""
    if not is_hub_location(cache):
        if not cache.is_dir():
            found = "is not a directory" if cache.exists() else "does not exist"
            raise ExportError(f"export: {cache} {found}; expected a cache directory: the --output-dir of a finished `eagle3-cache build`")
        if revision is not None:
            raise ExportError(revision_of_a_directory(cache, revision))
    return open_source(cache, revision=revision, name=name)


def revision_of_a_directory(cache: Path, revision: str) -> str:
    """Why --revision is refused with a local directory, and what to do: where the path is also written
    as a repo id, the repo was likely meant, and a folder of that name here hides it."""
    if has_repo_id_shape(cache):
        return (
            f"export: --revision {revision!r} is for a Hub dataset repo id, and {cache} is one, but it is also a local "
            "directory here, which has no revisions: a path that exists is read as the directory, so it hides the repo "
            f"of that name. To export the repo, run the command from another directory, or rename or move the folder "
            f"{cache}; to export the folder, leave out --revision"
        )
    return (
        f"export: --revision {revision!r} is for a Hub dataset repo id; {cache} is a local directory, which has no "
        "revisions, so the flag would be ignored: leave it out, or export the repo the cache was pushed to "
        f"(eagle3-cache export REPO_ID --revision {revision} ...)"
    )


def cache_manifest(source: CacheSource) -> dict:
    """The manifest of the cache to export, refused with what to pass where there is no finished cache,
    or where a local directory's root card does not list the config named (the reader finds a config's
    shards by that card, so a config folder with a card of its own is not enough)."""
    unoffered = config_not_offered(source) if source.name is not None and not source.on_hub else None
    if unoffered:
        raise ExportError(f"export: {source.describe()}: {unoffered}")
    try:
        return read_manifest(source)
    except FileNotFoundError as err:  # no card: not a cache, or a build that has not finished
        raise ExportError(f"export: {err}") from None


# ---- OUT complete or as it was --------------------------------------------------------------


def check_out_folder(out: Path) -> None:
    """Refuse an OUT the export would overwrite, or could not write in."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"export: {out} is a file; expected a new or empty directory for the export: pass another path")
    entries = listed(out) if out.exists() else []
    hidden = [entry for entry in entries if fnmatch.fnmatch(entry.name, TEMP_GLOB) and is_real_folder(entry)]
    files = [entry for entry in entries if entry not in hidden]
    if entries and not files:
        raise ExportError(
            f"export: {out} holds only {', '.join(entry.name for entry in entries)}, the hidden folder of an export that was "
            "killed before it finished; expected a new or empty directory for the export. If no export into it is running, "
            "delete that folder, then run the export again."
        )
    marker = next(filter(None, (marker_moving_up(folder, files) for folder in hidden)), None)
    if marker:
        raise ExportError(
            f"export: {out} holds the remains of an export that was killed before it finished: its hidden "
            f"{'folder' if len(hidden) == 1 else 'folders'} {', '.join(folder.name for folder in hidden)} and the files it "
            f"had moved up ({names_text(files)}), but no {marker}, the file that marks a complete export; expected a new or "
            f"empty directory for the export. If no export into it is running, delete those (everything in {out}"
            f"{f' but {LOST_FOUND}' if is_file_systems_lost_found(out / LOST_FOUND) else ''}), then run the export again."
        )
    if entries:
        raise ExportError(
            f"export: {out} is not empty: it holds {names_text(entries)}{lost_found_counted(entries)}; expected a new or empty "
            "directory for the export (an export never overwrites): pass a new directory"
        )
    check_no_killed_new_out(out)
    check_out_writable(out)


def listed(out: Path) -> list[Path]:
    """What an existing OUT holds (see held_by), refused where it cannot be listed (a drop-box
    folder one may write in, not read): whether it is empty, as an export needs, cannot be told."""
    try:
        return held_by(out)
    except OSError as err:
        raise ExportError(
            f"export: {out} cannot be listed ({err.strerror or err}); expected a new or empty directory the export can "
            "read and write in: check its permissions (it needs read as well as write) or pass another directory"
        ) from None


LOST_FOUND = "lost+found"  # where fsck puts what it recovers: every fresh ext file system's root holds one


def held_by(out: Path) -> list[Path]:
    """What OUT holds, but the file system's `lost+found` where OUT is a mount point: the root of a
    fresh ext file system holds one (often root's alone), so it counts as empty; the export never
    writes in it, moves it or deletes it. Anywhere else such a folder is a folder like any other:
    SpecForge's reader walks OUT's folders and would take the samples in it for the export's."""
    return sorted(entry for entry in out.iterdir() if not is_file_systems_lost_found(entry))


def is_file_systems_lost_found(entry: Path) -> bool:
    return entry.name == LOST_FOUND and is_real_folder(entry) and is_mount_point(entry.parent)


def is_real_folder(path: Path) -> bool:
    """Whether `path` is a folder itself, not a file nor a link (to a folder or not): only such a folder,
    named as an export names its hidden folder, is one; anything else of that name is someone's."""
    return path.is_dir() and not path.is_symlink()


def is_mount_point(folder: Path) -> bool:
    """Whether `folder` (or the folder a link to it names) is the root of a mounted file system."""
    return os.path.ismount(folder.resolve())


def lost_found_counted(entries: list[Path]) -> str:
    """Why a `lost+found` among what OUT holds counts: OUT is no mount point (see held_by)."""
    if not any(entry.name == LOST_FOUND for entry in entries):
        return ""
    return f" ({LOST_FOUND} is left out only at a mount point, a file system's root, which this folder is not)"


def check_no_killed_new_out(out: Path) -> None:
    """Refuse an OUT beside which an export into it as a new OUT left its hidden folder when killed
    (it holds what that export wrote, as large as the export): as for one left inside OUT, it is
    named, never deleted, since another export into OUT could be writing it."""
    left = killed_new_out_folders(out)
    if left:
        one = len(left) == 1
        raise ExportError(
            f"export: beside {out} is {'the hidden folder' if one else 'the hidden folders'} {', '.join(map(str, left))}, "
            f"{'the folder' if one else 'the folders'} of an export into {out} that was killed before it finished; expected "
            f"none beside a new or empty directory for the export. If no export into {out} is running, delete "
            f"{'that folder' if one else 'those folders'}, then run the export again."
        )


def killed_new_out_folders(out: Path) -> list[Path]:
    """The folders beside OUT named as an export into a new OUT names the folder it writes in
    (`.OUT.tmp-PID`, renamed to OUT once complete); a file or link of such a name is no export's."""
    final = out.resolve()  # where export_folder makes it
    prefix = temp_path(final).name.removesuffix(str(os.getpid()))
    try:
        beside = list(final.parent.iterdir())
    except OSError:  # a parent not made yet, or one this process cannot list
        return []
    return sorted(path for path in beside if path.name.startswith(prefix) and path.name[len(prefix) :].isdigit() and is_real_folder(path))


def marker_moving_up(folder: Path, files: list[Path]) -> str | None:
    """The marker file `folder` still holds when `files` (the rest of OUT) are what an export killed
    while moving its files up from `folder` into OUT leaves: files of that export's format, in the
    order they are moved (sorted by name, each before every name still only in the folder), a name
    in both being the same file (linked up, not yet unlinked from the folder). None otherwise."""
    if not files or not folder.is_dir() or not all(file.is_file() and not file.is_symlink() for file in files):
        return None
    left = {final_name(entry.name): entry for entry in folder.iterdir()}
    names = {file.name for file in files}
    for to, marker in LAST_WRITTEN.items():
        if marker not in left or not all(EXPORTED_FILES[to].fullmatch(name) for name in names):
            continue
        if not all(same_file(left[file.name], file) for file in files if file.name in left):
            continue
        unmoved = sorted(set(left) - names - {marker})
        if not unmoved or max(names) < unmoved[0]:
            return marker
    return None


def same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def names_text(files: list[Path], shown: int = 4) -> str:
    """`files`' names, the first and last of many with their count."""
    names = sorted(file.name for file in files)
    return ", ".join(names) if len(names) <= shown else f"{names[0]} … {names[-1]} ({len(names)} files)"


def check_out_writable(out: Path) -> None:
    """Refuse an OUT this process cannot write in (an existing one) or create (a new one), naming
    OUT: refused now, not once the target is read and the first file cannot be made."""
    if out.exists():
        if not os.access(out, os.W_OK | os.X_OK):
            raise ExportError(
                f"export: {out} is not writable; expected a new or empty directory the export can write in: "
                "check its permissions or pass another directory"
            )
        return
    nearest = next(parent for parent in out.absolute().parents if parent.exists())
    if not nearest.is_dir():  # a file where a folder was meant: no folder can be made under it
        raise ExportError(
            f"export: {out} cannot be created: {nearest} is a file, not a folder; expected a new directory under a folder "
            "you can write to, or an empty one you can write in: pass another directory"
        )
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ExportError(
            f"export: {out} cannot be created: {nearest}, the nearest folder of it that exists, is not writable; expected a "
            "new directory under a folder you can write to, or an empty one you can write in: pass another directory, or "
            f"have {out} made for you, writable by you"
        )


class WriteError(Exception):
    """A file of the export could not be written: `what` says which and why; `disk_full` whether
    for lack of space (None: the writer's error does not say)."""

    def __init__(self, what: str, disk_full: bool | None):
        super().__init__(what)
        self.what, self.disk_full = what, disk_full


@contextmanager
def export_folder(out: Path, last: str) -> Iterator[Path]:
    """Yields a new hidden folder to write the export in (each file under its `staged` name); once
    the block ends without error its files become OUT's, with their own names. An existing OUT (an
    empty folder) is filled in place, so it keeps its inode, mode, group and mount: the folder is
    made inside it and its files are moved up, `last` (the file whose presence marks a complete
    export) last. A new OUT is the folder made beside it, renamed. On any failure what was written
    is removed (with the parents made for a new OUT), OUT is left as it was, and a write error is
    raised as an ExportError."""
    final = out.resolve()  # OUT a link to an empty folder: the folder is filled, not the link
    in_place = final.is_dir()
    folder = temp_path(final / "export") if in_place else temp_path(final)
    made = [] if in_place else [parent for parent in (final.parent, *final.parent.parents) if not parent.exists()]
    moved: dict[Path, FileId] = {}  # each name in OUT a file is being or was moved up to, and that file
    try:
        shutil.rmtree(folder, ignore_errors=True)  # this process's own leftover, if any
        with writing(folder, str(out)):
            folder.mkdir(parents=True)
        yield folder
        hold_sigterm()  # every file written: from here SIGTERM waits until OUT holds the export (or is as it was)
        with writing(folder, str(out)):
            if not in_place:
                give_final_names(folder)
            fsync_dir(folder)  # every file was fsynced as written; now their names, before they move
            if in_place:
                move_up(folder, final, out, last, moved)
        if not in_place:
            publish(folder, final, out)
        EXPORT_FAULTS.reached("export_complete")  # OUT holds the complete export
    except BaseException as err:
        if out_holds_the_export(in_place, final / last, folder, final, moved):
            shutil.rmtree(folder, ignore_errors=True)  # an existing OUT's hidden folder: emptied by the move up
            raise  # an interrupt (Ctrl-C) once the export is complete stops the process but never removes the export
        written = folder_size(folder) + sum(path.stat().st_size for path in still_ours(moved))
        discard(folder, moved, made)
        if isinstance(err, WriteError):
            raise export_failed(err, out, written) from err.__cause__
        raise
    if in_place:
        shutil.rmtree(folder, ignore_errors=True)  # empty now: the export is complete whatever it holds
    for synced in (final if in_place else final.parent, *(parent.parent for parent in made)):  # each folder whose names changed
        fsync_dir(synced)


def out_holds_the_export(in_place: bool, marker: Path, folder: Path, final: Path, moved: dict[Path, FileId]) -> bool:
    """Whether the export is complete in OUT: its marker moved up into the existing OUT, or its
    folder renamed to the new OUT (the folder's own name is then gone, and OUT is there)."""
    if in_place:
        return marker in still_ours(moved)
    return not os.path.lexists(folder) and final.is_dir()


class Terminated(BaseException):
    """SIGTERM arrived while the export ran: raised where it runs, as Ctrl-C raises KeyboardInterrupt."""


def raise_terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut short the cleanup the first started
    raise Terminated


class HeldSigterm:
    """SIGTERM's handler while an export completes: records that it arrived instead of raising it."""

    def __init__(self):
        self.arrived = False

    def __call__(self, signum, frame) -> None:
        self.arrived = True


def hold_sigterm() -> None:
    """From now until terminated_as_interrupt ends, a SIGTERM is held instead of raised: the export's
    completion (its files moved into OUT or its folder renamed to OUT, then its hidden folder removed)
    runs to its end, or, failing, its removal does, so a complete export is never removed for the
    signal, nor said to be; terminated_as_interrupt then hands the signal to the process's own handling.
    Where terminated_as_interrupt does not raise SIGTERM (another thread, SIGTERM ignored) nothing changes."""
    if signal.getsignal(signal.SIGTERM) is raise_terminated:
        signal.signal(signal.SIGTERM, HeldSigterm())


@contextmanager
def terminated_as_interrupt(out: Path) -> Iterator[None]:
    """SIGTERM (a scheduler's time limit, `docker stop`, `kill`) stops the export as Ctrl-C does, so
    what it wrote is removed: by default SIGTERM ends the process where it stands. Once removed, the
    signal is handled as it would have been without the export: by default the process ends by it.
    A SIGTERM once the export is completing is held until it is complete, then handled so (hold_sigterm).
    Only the main thread receives signals; elsewhere, or where SIGTERM is ignored, nothing changes."""
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        yield
        return
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    except Terminated:
        pass  # export_folder has removed the partial export
    else:
        return  # the export is complete; a SIGTERM held meanwhile is handed on as it returns
    finally:
        held = signal.signal(signal.SIGTERM, previous)
        if isinstance(held, HeldSigterm) and held.arrived:
            os.kill(os.getpid(), signal.SIGTERM)  # to the process's own handling of it, OUT complete or as it was
    stopped = f"export: stopped by SIGTERM; the partial export was removed: nothing was left at {out}. Run the export again."
    if previous == signal.SIG_DFL:  # the signal ends the process before the error could be told
        print(f"error: {stopped}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # to the process's own handling of it
    raise ExportError(stopped)


def discard(folder: Path, moved: dict[Path, FileId], made: list[Path]) -> None:
    """Remove a failed export: its files already in OUT, its hidden folder, the parents made for OUT."""
    for path in still_ours(moved):
        with contextlib.suppress(OSError):
            path.unlink()
    shutil.rmtree(folder, ignore_errors=True)
    for parent in made:  # innermost first; one that holds something else now stays
        with contextlib.suppress(OSError):
            parent.rmdir()


FileId = tuple[int, int]  # (device, inode): the file itself, whatever name it has


def file_id(path: Path) -> FileId:
    status = os.lstat(path)
    return status.st_dev, status.st_ino


def still_ours(moved: dict[Path, FileId]) -> list[Path]:
    """The names in OUT that hold the file the export moved there: never one someone else made."""
    ours = []
    for path, moved_file in moved.items():
        with contextlib.suppress(OSError):  # a name never made: the move failed, or was not reached
            if file_id(path) == moved_file:
                ours.append(path)
    return ours


def move_up(folder: Path, final: Path, out: Path, last: str, moved: dict[Path, FileId]) -> None:
    """Move the complete export from `folder` up into OUT (within one file system: no copy), `last`
    once every other name is durable; refused where OUT holds anything else (filled meanwhile)."""
    if any(entry != folder for entry in held_by(final)):
        raise filled_while_running(out)
    for name in sorted(final_name(entry.name) for entry in folder.iterdir() if final_name(entry.name) != last):
        move_without_replacing(staged(folder / name), final / name, out, moved)
    fsync_dir(final)
    move_without_replacing(staged(folder / last), final / last, out, moved)


STAGED = "-part"  # ends each file's name while it is in the hidden folder


def staged(path: Path) -> Path:
    """Where the export's file `path` is written: a name no trainer's reader takes for a file of the
    export (`data_0.ckpt-part`: SpecForge's takes every `.ckpt` under OUT, in hidden folders too),
    whose stem is the file's own, so torch.save names its archive as it would in the final file."""
    return path.with_name(path.name + STAGED)


def final_name(name: str) -> str:
    return name.removesuffix(STAGED)


def give_final_names(folder: Path) -> None:
    """The files of a complete export their own names, in the folder that becomes the new OUT."""
    for entry in list(folder.iterdir()):
        os.rename(entry, folder / final_name(entry.name))


NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)  # a file system that has none


def move_without_replacing(source: Path, target: Path, out: Path, moved: dict[Path, FileId]) -> None:
    """Move a file to a name that must not exist: a hard link fails on an existing name at once (a
    rename would replace it), then the source is unlinked; without hard links, a rename after a check.
    The target is recorded first, with the file moved: an interrupt the moment the move is done
    still has it taken back out, and a name that holds another file is left alone."""
    moved[target] = file_id(source)
    try:
        os.link(source, target)
    except FileExistsError:
        raise filled_while_running(out) from None
    except OSError as err:
        if err.errno not in NO_HARD_LINKS:
            raise
        if os.path.lexists(target):
            raise filled_while_running(out) from None
        os.rename(source, target)
        return
    os.unlink(source)


def publish(folder: Path, final: Path, out: Path) -> None:
    """Rename the complete export to the new OUT, never over a folder made and filled meanwhile."""
    try:
        os.rename(folder, final)
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise filled_while_running(out) from None
        raise write_error(str(out), err.errno, err.strerror or str(err)) from err


def filled_while_running(out: Path) -> ExportError:
    return ExportError(
        f"export: {out} was filled (or made a file) while the export ran; an export never overwrites, so it was "
        "removed and nothing of it was left there. Pass a new directory, then run the export again."
    )


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) if folder.is_dir() else 0


def export_failed(err: WriteError, out: Path, written: int) -> ExportError:
    what, fix = err.what, "Fix the cause (the folder's permissions, the disk or its file system)"
    if err.disk_full:
        what = f"{what}, after writing {size_text(written)} of the export"
        fix = "Free space on that disk (or raise the quota), or export to another disk"
    elif err.disk_full is None:
        fix = "Free space if the disk is full, else fix the cause (the folder's permissions, the disk or its file system)"
    return ExportError(f"export: {what}; the partial export was removed: nothing was left at {out}. {fix}, then run the export again.")


def size_text(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


@contextmanager
def writing(path: Path, shown: str | None = None) -> Iterator[None]:
    """Errors of the writer inside the block as a WriteError naming `shown` (the file's name in the
    export): an OSError, safetensors' error (which carries the OS error in its text only) or
    torch.save's (which carries no cause at all)."""
    shown = shown or path.name
    try:
        yield
    except OSError as err:
        raise write_error(shown, err.errno, err.strerror or str(err)) from err
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        raise write_error(shown, int(code[1]) if code else None, str(err)) from err
    except RuntimeError as err:  # torch.save's stream writer: "unexpected pos ...", "file write failed"
        raise WriteError(f"writing {shown} failed ({err})", None) from err


def write_error(shown: str, code: int | None, reason: str) -> WriteError:
    if code in DISK_FULL_ERRNOS:
        return WriteError(f"no space left writing {shown} ({os.strerror(code)})", True)
    return WriteError(f"writing {shown} failed ({reason})", False if code is not None else None)


# The export's files, each written durably under its staged name in the hidden folder. A crash test
# kills the process the N-th time one is written (EAGLE3_CACHE_FAULT=export_file:N, see FaultPoints),
# or once OUT holds the complete export (export_complete:1).
EXPORT_FAULTS = FaultPoints()


def _save(tensors: dict, path: Path) -> None:
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with writing(path), mode_of_open(staged(path)):
        save_file(tensors, str(staged(path)))
        fsync_file(staged(path))
    EXPORT_FAULTS.reached("export_file")


def _torch_save(obj, path: Path) -> None:
    """torch.save under a name with the file's own stem (the archive inside is named after it, as
    SpecForge's are)."""
    with writing(path):
        torch.save(obj, staged(path))
        fsync_file(staged(path))
    EXPORT_FAULTS.reached("export_file")


def _write_text(path: Path, text: str) -> None:
    with writing(path):
        staged(path).write_text(text)
        fsync_file(staged(path))
    EXPORT_FAULTS.reached("export_file")


# ---- NeMo Automodel -------------------------------------------------------------------------


def nemo_shard(samples: list[dict], seq_length: int, topk: int | None, pad_id: int) -> dict[str, torch.Tensor]:
    batch = collate_nemo(samples, pad_to=seq_length)
    shard = {
        "input_ids": nemo_input_ids(batch["input_ids"], samples, seq_length, pad_id),
        "attention_mask": batch["attention_mask"].long(),
        "loss_mask": batch["loss_mask"].long(),
        "aux_hidden_states": batch["aux_hidden_states"],
        "position_mask": batch["position_mask"].bool(),
    }
    if topk:
        values, indices = batch["target_probs"].float().topk(topk, dim=-1)
        shard["target_probs_values"] = values.to(batch["target_probs"].dtype)
        shard["target_probs_indices"] = indices.to(torch.int32)
    else:
        shard["target_probs"] = batch["target_probs"]
    return shard


def nemo_input_ids(shifted: torch.Tensor, samples: list[dict], seq_length: int, pad_id: int) -> torch.Tensor:
    """NeMo pads a sample's ids with `pad_id` to seq_length and then shifts left with a zero tail:
    slots L-1 .. S-2 hold the pad id (the next token of the last real one), slot S-1 holds 0."""
    ids = shifted.long()
    for row, sample in enumerate(samples):
        length = min(sample["input_ids"].shape[0], seq_length)
        ids[row, length - 1 : seq_length - 1] = pad_id
    return ids


def nemo_topk(identity: dict) -> int | None:
    """K when the cache's top-k compresses the draft vocabulary; NeMo stores K >= Vd dense."""
    k = identity.get("topk") if identity["target_format"] == "topk" else None
    return k if k is not None and 0 < k < identity["draft_vocab_size"] else None


def nemo_pad_id(tokenizer) -> int:
    """The id NeMo pads a sample to seq_length with: its tokenizer pads it, with the pad id NeMo's
    loader gives it (0 where the tokenizer has none)."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else PAD_ID_WITHOUT_PAD_TOKEN


def prepare_nemo(source: CacheSource, manifest: dict, target_model: str | None, progress: bool) -> Callable[[Path], None]:
    """Check the target against the cache and read its embeddings and pad id (a wrong target is
    refused before anything is written); returns the export's writer."""
    identity = manifest["identity"]
    check_three_aux_layers(identity, "nemo")
    model, revision = target_model or identity["target"]["model"], identity["target"]["revision"]
    check_target_found(model, target_model is not None, identity["target"])
    config, tokenizer = target_config_and_tokenizer(model, revision)
    check_target_identity(manifest, model, config, tokenizer)
    embeddings = target_embeddings(model, revision, config)
    return functools.partial(write_nemo, source, manifest, embeddings, nemo_pad_id(tokenizer), progress)


EAGLE3_AUX_LAYERS = 3  # NeMo's and SpecForge's EAGLE-3 drafts: their fc reads three aux layers' states, 3 x the hidden size
TRAINER_NAMES = {"nemo": "NeMo", "specforge": "SpecForge"}


def check_three_aux_layers(identity: dict, to: str) -> None:
    """Refuse a cache the trainer's EAGLE-3 draft cannot train from: NeMo's recipe would refuse the
    export as built for another target (its aux width not 3 x the hidden size), SpecForge's draft
    asserts that width at its first step."""
    layers = list(identity["aux_layer_ids"])
    if len(layers) != EAGLE3_AUX_LAYERS:
        raise ExportError(
            f"export --to {to}: {TRAINER_NAMES[to]}'s EAGLE-3 draft takes the states of exactly {EAGLE3_AUX_LAYERS} aux "
            f"layers; this cache holds {len(layers)} (--aux-layer-ids {' '.join(map(str, layers))}). Build the cache again "
            "with three --aux-layer-ids, or without the flag for the default three."
        )


def write_nemo(source: CacheSource, manifest: dict, embeddings: torch.Tensor, pad_id: int, progress: bool, out: Path) -> None:
    identity = manifest["identity"]
    topk = nemo_topk(identity)
    shard_size, seq_length = nemo_shard_size(identity), identity["seq_length"]
    num_samples = 0
    shards = in_groups(exported_samples(source, identity, "nemo"), shard_size)
    total = -(-manifest["totals"]["samples"] // shard_size)
    for index, samples in enumerate(tqdm(shards, total=total, desc="Exporting (nemo)", disable=not progress)):
        _save(nemo_shard(samples, seq_length, topk, pad_id), out / f"shard-{index:06d}.safetensors")
        num_samples += len(samples)
    _save({"weight": embeddings}, out / "target_embeddings.safetensors")
    _write_text(out / "manifest.json", json.dumps(nemo_manifest(source, manifest, num_samples), indent=2))


AUX_STATES = {"nemo": "aux_hidden_states", "specforge": "aux_hidden_state"}  # their name in each layout's sample


def exported_samples(source: CacheSource, identity: dict, layout: str) -> Iterator[dict]:
    """The cache's samples in order (on the Hub, the source's commit), streamed (a map-style read
    would first convert every shard into an Arrow copy under HF_DATASETS_CACHE, and leave it there:
    a second copy of the cache), with the aux states in the cache's --dtype. Each trainer's files hold one float dtype, and its
    draft takes the aux states into layers of that dtype uncast: another dtype fails its first
    step. --aux-dtype is how the cache stores them, not what the trainer reads."""
    dtype = identity["dtype"]
    pinned = {"revision": source.commit, "name": source.name, "token": source.token}
    samples = iter(load_cache(source.location, layout=layout, streaming=True, aux_dtype=dtype, **pinned))
    if not may_overflow(identity["aux_dtype"], dtype):
        return samples
    return (aux_in_range(sample, index, AUX_STATES[layout], identity) for index, sample in enumerate(samples))


def may_overflow(stored: str, dtype: str) -> bool:
    """Whether decoding aux states stored as `stored` to `dtype` can exceed its range (fp8 is
    scaled in fp32, so its range is fp32's)."""
    source = torch.float32 if stored == "fp8" else TORCH_DTYPES[stored]
    return torch.finfo(TORCH_DTYPES[dtype]).max < torch.finfo(source).max


def aux_in_range(sample: dict, index: int, key: str, identity: dict) -> dict:
    """The sample, refused where its aux states overflowed the export's dtype: the build stores
    finite states only, so a non-finite one is a value beyond that dtype's range."""
    if not bool(sample[key].isfinite().all()):
        dtype, stored = identity["dtype"], identity["aux_dtype"]
        wider = "bf16 or fp32" if dtype == "fp16" else "fp32"
        raise ExportError(
            f"export: sample {index} of the cache has aux states beyond the range of {dtype} (largest finite value "
            f"{torch.finfo(TORCH_DTYPES[dtype]).max:g}); expected every aux state to fit the cache's --dtype {dtype}, the one "
            f"float dtype the export writes (the cache stores them as --aux-dtype {stored}). Build the cache again with "
            f"--dtype {wider}."
        )
    return sample


def in_groups(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    """Consecutive groups of `size` samples (the last one shorter), as they arrive."""
    while group := list(itertools.islice(samples, size)):
        yield group


def nemo_shard_size(identity: dict) -> int:
    """Samples per exported shard: the build's, at most NeMo's documented 256. A shard is built in
    memory padded to seq_length (NeMo's layout), so the build's default of 1,000 would hold about
    84 GB for an 8B target at 2,048 tokens; NeMo's reader takes any size its manifest names."""
    return min(identity["shard_size"], NEMO_SHARD_SIZE)


def nemo_manifest(source: CacheSource, manifest: dict, num_samples: int) -> dict:
    identity = manifest["identity"]
    return {
        "format_version": NEMO_FORMAT_VERSION,
        "target_model": identity["target"]["model"],
        "target_vocab_size": manifest["target_vocab_size"],
        "draft_vocab_size": identity["draft_vocab_size"],
        "seq_length": identity["seq_length"],
        "dtype": identity["dtype"],
        "num_samples": num_samples,
        "shard_size": nemo_shard_size(identity),
        # NeMo's meaning: 0 stores target_probs dense; a K >= draft_vocab_size is stored dense as well
        "target_probs_topk": identity["topk"] if identity["target_format"] == "topk" else 0,
        "aux_hidden_dim": manifest["columns"]["aux_hidden_states"]["shape"][1],
        "aux_layer_ids": list(identity["aux_layer_ids"]),
        "selected_token_ids": read_vocab(source)["selected_token_ids"].tolist(),
        "input_data": identity["input"]["data"],
        "split": identity["input"]["split"] or "train",
        "shuffle_seed": identity["input"]["shuffle_seed"],
        # The loss-mask options the build applied, in NeMo's meaning (both off unless the build set them).
        # NeMo's trainer refuses a cache whose options differ from its own, so these must be the truth.
        "mask_generation_prompt": bool(identity.get("mask_generation_prompt", False)),
        "mask_reasoning_content": bool(identity.get("mask_reasoning_content", False)),
    }


HUB_MODEL_ID = re.compile(rf"{NAME_PATTERN}(/{NAME_PATTERN})?")  # `name` or `namespace/name`


def check_target_found(model: str, given: bool, recorded: dict) -> None:
    """Refuse a target named by a path that does not exist here: the folder the manifest names is the
    build machine's (or relative to where the build ran), which a cache copied or pulled elsewhere
    lacks. The build recorded a Hub target's commit, so a recorded target without one was a folder,
    however it is written; a --target-model is taken for a Hub id where it is written as one. Said as
    the export's own problem: the loader's message is the build's (its flags)."""
    from .embedded import resolve_target

    path = resolve_target(model)
    hub_id = HUB_MODEL_ID.fullmatch(path) and (given or recorded.get("revision") is not None)
    if Path(path).exists() or hub_id:
        return
    named = f"--target-model {model!r}" if given else f"the target the cache was built from, {model!r} (its manifest's target.model),"
    raise ExportError(
        f"export --to nemo: {named} does not exist here; expected that checkpoint, as a local model folder or a Hub "
        "model id, for its input embeddings and pad id. Pass --target-model with the path of the checkpoint the cache "
        "was built from (a copy of it, unchanged since the build, is accepted)."
    )


def target_config_and_tokenizer(model: str, revision: str | None):
    from .embedded import resolve_target
    from .target import load_config, load_tokenizer

    config = load_config(resolve_target(model), revision, False)
    return config, load_tokenizer(resolve_target(model), revision, False, config=config)


def check_target_identity(manifest: dict, model: str, config, tokenizer) -> None:
    """Refuse a target that is not the one the cache was built from: its embeddings and pad id
    would go with supervision another model produced."""
    from .embedded import resolve_target
    from .prepare import target_differences

    differences = target_differences(manifest, resolve_target(model), config, tokenizer)
    if differences:
        lines = [f"  {field}: cache has {cached!r}, the target has {found!r}" for field, (cached, found) in sorted(differences.items())]
        raise ExportError(
            f"export --to nemo: the target {model!r} is not the model this cache was built from:\n" + "\n".join(lines) + "\n"
            "Its embeddings and pad id would not match the cached supervision. Pass --target-model with the checkpoint the "
            f"cache was built from ({manifest['identity']['target']['model']!r}, unchanged since the build), or build the cache "
            "again from this target."
        )


def target_embeddings(model: str, revision: str | None, config) -> torch.Tensor:
    """The target's input embedding matrix `[V, H]` fp32 (the draft shares it), read alone from its
    safetensors files: loading the model would hold all of it in fp32 to read one table."""
    from .embedded import resolve_target

    path = resolve_target(model)
    weight_map = safetensors_weight_map(path, revision)
    name, shape = embedding_tensor_name(config, weight_map) if weight_map else (None, None)
    if name is not None:
        from safetensors import safe_open

        with safe_open(checkpoint_file(path, revision, weight_map[name]), framework="pt") as f:
            if list(f.get_slice(name).get_shape()) == shape:
                return f.get_tensor(name).float()  # the dtype a full fp32 load converts it to
    # no safetensors (.bin checkpoints), or no tensor found for the embedding: load the model
    return loaded_model_embeddings(model, revision)


SAFETENSORS_INDEX, SAFETENSORS_FILE = "model.safetensors.index.json", "model.safetensors"


def safetensors_weight_map(path: str, revision: str | None) -> dict[str, str] | None:
    """`{tensor name: file name}` of a safetensors checkpoint: its index's weight map when sharded,
    else its one file's tensors. None without safetensors weights."""
    index = checkpoint_file(path, revision, SAFETENSORS_INDEX)
    if index is not None:
        return json.loads(Path(index).read_text())["weight_map"]
    single = checkpoint_file(path, revision, SAFETENSORS_FILE)
    if single is None:
        return None
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), SAFETENSORS_FILE)


def checkpoint_file(path: str, revision: str | None, filename: str) -> str | None:
    """A file of a local model folder, or of a Hub model (downloaded, or from the local Hub cache
    when offline); None when the model has no such file."""
    if Path(path).is_dir():
        return str(Path(path) / filename) if (Path(path) / filename).is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(path, filename, revision=revision)
    except EntryNotFoundError:  # the Hub's answer, or offline: not in the local Hub cache
        return None


def embedding_tensor_name(config, weight_map: dict[str, str]) -> tuple[str | None, list[int]]:
    """The checkpoint's name for the input embedding and its `[V, H]` shape, from a weightless `meta`
    instance built from the config: the parameter's name (or, tied, any of its names), else the one
    checkpoint name ending like it (multimodal wrappers store `language_model.model.embed_tokens`
    where the model names it `model.language_model.embed_tokens`)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embedding = model.get_input_embeddings().weight
    names = [name for name, param in model.named_parameters(remove_duplicate=False) if param is embedding]
    exact = [name for name in names if name in weight_map]
    tails = {".".join(name.split(".")[-2:]) for name in names}  # embed_tokens.weight, lm_head.weight
    ending = [key for key in weight_map if any(key == tail or key.endswith(f".{tail}") for tail in tails)]
    found = exact[:1] or (ending if len(ending) == 1 else [])
    return (found[0] if found else None), list(embedding.shape)


def loaded_model_embeddings(model: str, revision: str | None) -> torch.Tensor:
    from .embedded import resolve_target
    from .target import load_model

    try:
        loaded = load_model(resolve_target(model), revision, False, torch.device("cpu"), torch.float32)
    except OSError as err:
        raise ExportError(f"export: cannot load the target {model!r} for its embeddings ({err}); pass --target-model PATH") from None
    return loaded.get_input_embeddings().weight.detach().float().clone()


# ---- SpecForge ------------------------------------------------------------------------------


def prepare_specforge(source: CacheSource, manifest: dict, target_model: str | None, progress: bool) -> Callable[[Path], None]:
    """Refuse a cache without final hidden states, of another number of aux layers than three, or of a
    target whose head is more than lm_head's weight; returns the export's writer."""
    if manifest["identity"]["target_format"] != "hidden":
        raise ExportError(
            f"export --to specforge: SpecForge trains from final hidden states; {source.location} was built with "
            f"--target-format {manifest['identity']['target_format']}. Rebuild with --target-format hidden."
        )
    check_three_aux_layers(manifest["identity"], "specforge")
    check_bare_lm_head(source, manifest.get("head_transform") or {})
    return functools.partial(write_specforge, source, manifest, progress)


# SpecForge 0.2.0's offline TargetHead is a bare `nn.Linear(hidden, vocab, bias=False)` over the
# checkpoint's lm_head weight: any bias or logit term the target's head applies after it is lost.
# A multiplier or divisor of 1 changes no logit.
IDENTITY_SCALES = {"logit_scale": 1, "logits_scaling": 1, "lm_head_multiplier": 1}


def check_bare_lm_head(source: CacheSource, head_transform: dict) -> None:
    """Refuse a cache of a target whose logits are more than its lm_head's matmul: SpecForge would
    train its draft toward distributions that are not the target's."""
    terms = {term: value for term, value in head_transform.items() if changes_logits(term, value)}
    if terms:
        named = ", ".join("an lm_head bias" if term == "lm_head_bias" else f"{term}={value}" for term, value in terms.items())
        raise ExportError(
            f"export --to specforge: the target of {source.location} applies {named} to its logits beyond lm_head's "
            "weight (the manifest's head_transform); SpecForge's offline TargetHead is a bare lm_head weight, which "
            "would ignore them, so its training targets would not be the target's distributions. Export this cache "
            "with --to nemo, whose files hold the target's distributions with these terms applied, or build a "
            "--target-format probs or topk cache for NeMo."
        )


def changes_logits(term: str, value) -> bool:
    """Whether a head_transform entry changes the logits: absent terms are None (a bias is recorded
    only as True), a multiplier or divisor of 1 is none."""
    return value is not None and value is not False and IDENTITY_SCALES.get(term) != value


def write_specforge(source: CacheSource, manifest: dict, progress: bool, out: Path) -> None:
    samples = exported_samples(source, manifest["identity"], "specforge")
    for i, sample in enumerate(tqdm(samples, total=manifest["totals"]["samples"], desc="Exporting (specforge)", disable=not progress)):
        _torch_save(sample, out / f"data_{i}.ckpt")  # tensors only: loads with weights_only=True
    # SpecForge's draft column i is the i-th selected token in ascending id order (`d2t[i] = used[i] - i`);
    # its target is `softmax(logits[..., t2d])`, which takes the columns in that order.
    ascending = np.sort(read_vocab(source)["selected_token_ids"].numpy())
    d2t, t2d = d2t_t2d(ascending, manifest["target_vocab_size"])
    _torch_save({"d2t": torch.as_tensor(d2t, dtype=torch.int64), "t2d": torch.as_tensor(t2d)}, out / "vocab_mapping.pt")


EXPORTS = {"nemo": prepare_nemo, "specforge": prepare_specforge}  # --to: its checks, which return its writer
# The file whose presence marks a complete export: written last, and the last moved into an existing OUT.
# NeMo's reader starts from its manifest; SpecForge's config names the mapping file besides the folder.
LAST_WRITTEN = {"nemo": "manifest.json", "specforge": "vocab_mapping.pt"}
# Every other file each export writes (as its writer names them): what a killed export may have moved up.
EXPORTED_FILES = {
    "nemo": re.compile(r"shard-\d{6,}\.safetensors|target_embeddings\.safetensors"),
    "specforge": re.compile(r"data_\d+\.ckpt"),
}
