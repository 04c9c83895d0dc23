"""One build per cache: an exclusive `flock` on `.eagle3_build/lock`, whose content names the holder
(rank 0), and a shared one on `.eagle3_build/writers.lock` that every process of the build holds
while it writes. A build takes the first and then checks that nobody holds the second: the other
ranks of a build whose rank 0 stopped (a launcher that does not stop them) may still be writing.

The kernel drops the locks when their holder dies (even by SIGKILL), so a dead build's lock is
taken over with no staleness guesswork and no race between two processes taking it over.
The files are never deleted: unlinking a locked file lets a second process lock a new inode.

A push (`eagle3-cache push`) holds the same lock for its duration (`hold_for_push`): it is refused
while a build writes the cache, and a build (or another push) of it is refused while it reads it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .errors import ConfigError, Eagle3CacheError
from .files import is_disk_full

LOCK_FILE = ".eagle3_build/lock"
WRITERS_FILE = ".eagle3_build/writers.lock"
LOCK_FILE_MODE = 0o666  # less the umask, as every file of a cache: in a group-shared folder the group can resume the build


class CacheLocked(Eagle3CacheError):
    pass


def holder_info(command: str = "build") -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": command}


class CacheLock:
    """`command`: "build", or "push" (which holds it while it reads the cache, and is told so when refused)."""

    def __init__(self, output_dir: Path, command: str = "build"):
        self.path = Path(output_dir) / LOCK_FILE
        self.command = command
        self._fd: int | None = None
        self._writable = True

    def acquire(self) -> None:
        self._lock(self._open())

    def _lock(self, fd: int) -> bool:
        """Lock `fd`, the lock file opened; False (a push's only) where the file system keeps no locks."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheLocked(self._refusal(self._holder())) from None
        except OSError as err:  # ENOLCK, ENOSYS, EOPNOTSUPP: the file system keeps no locks
            os.close(fd)
            if self.command == "push":  # a build refuses such a file system: none writes the cache
                return False
            raise ConfigError(
                "--output-dir",
                str(self.path.parent.parent),
                "a directory whose file system supports file locks (flock), which keep a second build off this cache",
                f"Locking {self.path} failed ({err.strerror or err}). Choose a directory on a local disk, or on a "
                "network file system with locking enabled.",
            ) from err
        self._fd = fd  # held from here: `release` unlocks and closes it even if naming the holder fails
        try:
            check_no_writers(self.path.parent.parent, self.command)
        except BaseException:
            self.release()
            raise
        if self._writable:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(holder_info(self.command)).encode())
            os.fsync(fd)
        return True

    def _refusal(self, holder: dict) -> str:
        """Why the lock is refused, by whom, and what to do, as the refused command is told."""
        out, pushing = self.path.parent.parent, holder.get("command") == "push"
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} (since {holder.get('since', '?')})"
        if self.command == "push" and pushing:
            return (
                f"push: {out} is being pushed by {who}; expected no other push of it (one push of a cache at a time). "
                "Nothing was uploaded. Wait for that push to finish or stop it, then run this push again: what is "
                "already on the branch is not uploaded again."
            )
        if self.command == "push":
            return (
                f"push: {out} is being written by a build, {who}; expected a finished cache that no build writes: "
                "pushing it now could upload a cache still being written. Nothing was uploaded. Wait for that build to "
                "finish (or stop it, and finish it with the same build command and --resume), then run this push again."
            )
        if pushing:
            return (
                f"--output-dir: {out} is being pushed to the Hub by {who}; expected no push or other build of it while "
                "this build writes it. Wait for that push to finish or stop it, then run this build again."
            )
        return (
            f"--output-dir: {out} is being written by {who}; expected no other build on it. "
            "Wait for that build to finish or stop it (its lock goes with it), then rerun with --resume."
        )

    def _open(self) -> int:
        """The lock file, created with its folder; a folder that cannot be created is the user's to change."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_CREAT | os.O_RDWR, LOCK_FILE_MODE)
        except OSError as err:
            if is_disk_full(err):
                raise  # the caller reports a full disk as such
            raise ConfigError(
                "--output-dir",
                str(self.path.parent.parent),
                "a directory this build can create and write to",
                f"Creating {err.filename or self.path} failed ({err.strerror or err}). Choose a writable --output-dir.",
            ) from err

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self._fd is not None:
            if self._writable:
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def check_no_writers(output_dir: Path, command: str = "build") -> None:
    """No process of another build holds the writers' lock: taken exclusively for a moment, under
    the cache lock (which keeps every new build out meanwhile), then let go."""
    path = Path(output_dir) / WRITERS_FILE
    fd = open_lock_file(path) if command == "push" else os.open(path, os.O_CREAT | os.O_RDWR, LOCK_FILE_MODE)
    if fd is None:  # never created: no build ever wrote here
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if command == "push":
            raise CacheLocked(
                f"push: {output_dir} is still being written by processes of a build (its other ranks: the build's first "
                "process stopped, but they did not); expected a finished cache that no build writes. Nothing was uploaded. "
                f"Stop them (their locks go with them; `fuser {path}` lists them on each node), finish the build with the "
                "same build command and --resume, then push again."
            ) from None
        raise CacheLocked(
            f"--output-dir: {output_dir} is still being written by processes of another build (its other ranks: the "
            "build's first process stopped, but they did not); expected no other build on it. Stop them (their locks "
            f"go with them; `fuser {path}` lists them on each node), then rerun with --resume."
        ) from None
    finally:
        os.close(fd)  # closing lets go of the lock


def open_lock_file(path: Path) -> int | None:
    """A lock file a push opens: read-only where this user may not write it (a group-shared cache: flock takes
    no write access); None where it does not exist and cannot be created (no build ever locked it)."""
    try:
        return os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    except PermissionError:
        return os.open(path, os.O_RDONLY)


def hold_for_push(cache_dir: Path) -> CacheLock | None:
    """The cache's lock, held by a push until it `release`s it: a push refuses a cache a build (or another push)
    holds, and keeps them off it meanwhile. None where no build can write the cache: it holds no lock file (no
    build ever started there: a copied or downloaded cache), or its file system keeps no locks (a build refuses it)."""
    lock = CacheLock(cache_dir, command="push")
    fd = open_lock_file(lock.path)
    if fd is None:
        return None
    lock._writable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR  # else the holder goes unnamed
    return lock if lock._lock(fd) else None


class WriterHold:
    """The writers' lock in shared mode, held by every process of a build while it writes."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / WRITERS_FILE
        self._fd: int | None = None

    def hold(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, LOCK_FILE_MODE)
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a starting build checks, under the cache lock
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
