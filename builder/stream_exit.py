"""A clean exit after a stream stopped mid-shard.

`datasets` streams a shard by handing Arrow the Python file object it opened, and Arrow reads
it on its own threads. When a stream stops early (a `break` out of the loop, an iterator still
open at exit), the reads Arrow had already started go on, and each needs the GIL. Should the
interpreter finalize first, those threads end mid-task, and at process exit Arrow's thread pool
waits for them forever (or the process aborts). `datasets` closes the file as soon as its read
stops, yet Arrow keeps the last reference to it until its own reads end. So at exit the reads
still open are closed, then this process waits, with the GIL released, until no closed shard
file of a stream is left alive.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import io
import itertools
import logging
import os
import threading
import time
import types
import weakref

log = logging.getLogger(__name__)

RELEASE_TIMEOUT_S = 30.0  # a row group's reads end within seconds; past this, exit anyway
# Iterators over `datasets` streams still open, closed at exit while every module still works: left
# to module teardown, closing one hits `datasets`' handlers after pyarrow is gone.
OPEN_READS: weakref.WeakSet = weakref.WeakSet()
STREAMED_SHARDS: set[str] = set()  # "<config folder>data/<shard file>" of every cache streamed here


def track_stream(rows) -> None:
    """Close this `datasets` iterator at exit if it is still open."""
    OPEN_READS.add(rows)


def track_shards(paths) -> None:
    """Shard paths, relative to the repo or folder root, that streams of this process may read."""
    STREAMED_SHARDS.update(str(p).replace("\\", "/") for p in paths)


def _forget_the_parents_streams() -> None:
    """A forked child has none of its parent's Arrow threads: the parent's streams, and the files
    their reads hold, are not the child's to close or wait for (its own reads register anew)."""
    OPEN_READS.clear()
    STREAMED_SHARDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_the_parents_streams)


@atexit.register
def finish_streams() -> None:
    for rows in list(OPEN_READS):
        try:
            rows.close()
        except Exception as err:  # noqa: BLE001 - e.g. a stream another thread is reading: close the others, then wait
            log.debug("could not close a stream at exit: %s", err)
    wait_for_released_shards()


def wait_for_released_shards(timeout: float = RELEASE_TIMEOUT_S, on_waiting=None) -> int:
    """Block, with the GIL released, until every closed shard file of a stream still alive is
    freed (Arrow lets go of it when its reads end); returns how many were freed meanwhile.
    `on_waiting`: called once those files are known, before blocking (a test's hook)."""
    if not STREAMED_SHARDS:
        return 0
    held = shard_files(closed_only=True)
    if held:  # a file kept only by a reference cycle is not waiting on Arrow (a full collection only when needed)
        del held
        with _unfrozen():  # a cycle frozen by `gc.freeze()` too (an fsspec file is always in one)
            gc.collect()
        held = shard_files(closed_only=True)
    if not held:
        return 0
    freed = threading.Semaphore(0)
    watches = [weakref.ref(f, lambda _ref: freed.release()) for f in held]
    clear_frames_holding(held)
    del held
    if on_waiting is not None:
        on_waiting()
    deadline = time.monotonic() + timeout
    count = 0
    while count < len(watches) and freed.acquire(timeout=max(0.0, deadline - time.monotonic())):
        count += 1
    if count < len(watches):
        log.warning(
            "%d streamed shard file(s) still held after %.0f s at exit; exiting anyway (the process may hang in Arrow's thread pool)",
            len(watches) - count,
            timeout,
        )
    return count


def clear_frames_holding(files: list) -> None:
    """Clear the finished frames that hold these files. A read that failed mid-shard leaves its frame,
    and the closed file in it, in the error's traceback; an error that ends the program is kept until
    the process ends (`sys.last_value`), so the file would never be freed. The traceback still says
    where the read failed: only the frames' locals go."""
    with _unfrozen():
        frames = [r for r in gc.get_referrers(*files) if type(r) is types.FrameType]
    for frame in frames:
        with contextlib.suppress(RuntimeError):  # a frame still running cannot be cleared
            frame.clear()


@contextlib.contextmanager
def _unfrozen():
    """Objects frozen by `gc.freeze()` (as a CLI exit does) are seen by gc.get_objects() and gc.get_referrers() too."""
    frozen = gc.get_freeze_count()
    if frozen:
        gc.unfreeze()
    try:
        yield
    finally:
        if frozen:
            gc.freeze()


def shard_files(closed_only: bool) -> list:
    """Live file objects (local or fsspec) whose name or path ends with a streamed shard's path."""
    suffixes = tuple(STREAMED_SHARDS)
    with _unfrozen():
        everything = gc.get_objects()
    # The buffered file `open(path, "rb")` gives, or an fsspec file; not the raw file inside the former.
    # (By type: `isinstance` would ask each object its `__class__`, and some warn when asked.) Each type
    # is asked once, and the heap (millions of objects in a training process) is filtered in C.
    kinds = {kind for kind in set(map(type, everything)) if issubclass(kind, io.IOBase) and not issubclass(kind, io.RawIOBase)}
    files = itertools.compress(everything, map(kinds.__contains__, map(type, everything)))
    return [file for file in files if _is_shard_file(file, suffixes, closed_only)]


def _is_shard_file(file, suffixes: tuple, closed_only: bool) -> bool:
    try:
        name = getattr(file, "path", None) or getattr(file, "name", None)
        named = isinstance(name, str) and name.replace("\\", "/").endswith(suffixes)
        return named and (file.closed or not closed_only)
    except Exception:  # noqa: BLE001 - any file object may be asked; one that cannot say is not a shard's
        return False
